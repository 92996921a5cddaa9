"""The daemon's one idea, without Kafka: records → steps → batched model calls → predictions.

    accept()   decode a record (or dead-letter it), find its stream, queue its steps
    plan()     take the next round of work from the scheduler; gather inputs and state
    execute()  run the model (ONNX Runtime; safe to call on a worker thread)
    finish()   scatter the new state back, turn outputs into predictions, encode them

``app.py`` drives these four against Kafka. Keeping them free of I/O is what lets the tests
and the benchmarks drive exactly the same code with plain lists of records.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from . import changelog, codec
from .codec import DeadLetter, Record
from .config import ServeConfig
from .heads import Forecaster, Generator, Heads, shortest
from .metrics import Metrics
from .offsets import Offsets
from .runtime import BundleModel
from .scheduler import Group, Scheduler, as_array
from .state import Eviction, StateArena, Streams, WindowArena


class Incoming(NamedTuple):
    """An input record as ``accept`` needs it; aiokafka's ConsumerRecord has the same attributes."""

    key: bytes | None
    value: bytes | None
    offset: int
    timestamp: int


class Output(NamedTuple):
    """One record for the output topic. The hot path builds these as plain tuples (same layout)."""

    key: bytes
    value: bytes
    input_timestamp: int  # ms, the input record's timestamp (latency)


@dataclass
class Call:
    """One planned model call and, after execute(), its results."""

    group: Group
    x: np.ndarray
    slots: np.ndarray
    states: list[np.ndarray]
    y: np.ndarray | None = None
    new_states: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0
    forecast: np.ndarray | None = None
    generated: np.ndarray | None = None


class Pipeline:
    def __init__(self, model: BundleModel, cfg: ServeConfig, topic: str, metrics: Metrics | None = None,
                 provider: str = "cpu", clock: Callable[[], float] = time.monotonic) -> None:
        spec = self.spec = model.spec
        self.model = model
        self.cfg = cfg
        self.topic = topic
        self.metrics = metrics
        self.model_ref = spec.model.ref
        self.window = spec.mode == "window"
        self.numeric = spec.input.kind == "numeric"
        self.decoder = codec.Decoder(spec, cfg, topic)
        self.streams = Streams(spec, cfg.max_streams, cfg.stream_ttl_s, clock=clock)
        self.streams.on_evict.append(self._evicted)
        rollout = cfg.forecast_horizon > 0 or cfg.generate_tokens > 0
        # Forecasts and generation start from the state after each step, so steps run one at a time.
        max_chunk = 1 if (self.window or rollout) else cfg.max_chunk
        self.scheduler = Scheduler(self.streams, cfg.max_batch, max_chunk, on_reset=self._on_reset,
                                   on_end=self._on_end)
        self.offsets = Offsets()
        self.heads = Heads(spec, cfg.top_k, metrics)
        self.forecaster = Forecaster(model, cfg.forecast_horizon) if cfg.forecast_horizon else None
        self.generator = (Generator(model, cfg.generate_tokens, cfg.generate_strategy, cfg.top_k, cfg.generate_seed)
                          if cfg.generate_tokens else None)
        if (self.forecaster or self.generator) and self.window:
            raise ValueError("forecasts and generation need a stateful bundle")
        self.mean = np.asarray(spec.input.mean or [0.0] * spec.input.n_features, dtype=np.float32)
        self.inv_std = 1.0 / np.asarray(spec.input.std or [1.0] * spec.input.n_features, dtype=np.float32)
        self.normalise = bool(spec.input.mean or spec.input.std)
        self.emit_every = cfg.emit_every
        self.hold_warmup = cfg.warmup == "hold"
        self.warmup = spec.warmup_steps
        self.last_prediction: dict[int, bytes] = {}  # emit=end: per slot, the last output document
        self.dead: list[DeadLetter] = []
        self.outputs: list[tuple[bytes, bytes, int]] = []  # Output layout
        self.evictions: list[Eviction] = []
        self.tombstones: list[tuple[int, bytes]] = []  # (partition, key): streams ended or evicted
        self.durable = cfg.changelog
        self._layout_hash = spec.state_hash
        self.encoder = codec.Encoder(topic, self.model_ref, self.warmup)
        if metrics:  # read at scrape time: always current, nothing to update on the hot path
            metrics.active_streams.set_function(lambda: self.streams.active)
            metrics.state_bytes.set_function(lambda: self.streams.state_bytes)
            metrics.inflight.set_function(lambda: self.scheduler.inflight)

    # --- accept ---------------------------------------------------------------------------
    def accept(self, key: bytes | None, value: bytes | None, partition: int, offset: int, timestamp: int) -> bool:
        """Take one input record. False means 'not now': every stream slot is held by a stream with
        queued steps, so a new stream must wait until the model has worked some off (call again)."""
        return self.accept_many(partition, (Incoming(key, value, offset, timestamp),)) == 1

    def accept_many(self, partition: int, records: Sequence[Incoming]) -> int:
        """Take a fetch's records of one partition, in offset order; returns how many were taken.

        Fewer than ``len(records)`` means 'not now' for the next one (see ``accept``): call again
        with the rest. The loop body runs once per input record, so it is written flat.
        """
        po = self.offsets.partition(partition)
        decode = self.decoder.decode
        streams = self.streams
        index = streams.index.get(partition)
        add = self.scheduler.add
        track = po.records.append
        last_offset = streams.last_offset
        n = 0
        for r in records:
            offset = r.offset
            if offset <= po.last:
                n += 1
                continue  # fetched again (after a seek): already taken
            key = r.key
            item = decode(key, r.value, partition, offset, r.timestamp)
            if item.__class__ is DeadLetter:
                self._dead_letter(item)  # type: ignore[arg-type]
            else:
                slot = index.get(key) if index is not None else None
                if slot is not None and last_offset[slot] >= offset:
                    self._skip_applied(item, slot)  # type: ignore[arg-type]  # a replay after a restore
                if item.remaining:  # type: ignore[union-attr]
                    if slot is None:
                        try:
                            slot = streams.slot(partition, key)  # type: ignore[arg-type]
                        except MemoryError:
                            return n
                        index = streams.index[partition]
                    add(slot, item)  # type: ignore[arg-type]
                    track(item)  # type: ignore[arg-type]
            po.last = offset
            n += 1
        return n

    def _dead_letter(self, dead: DeadLetter) -> None:
        self.dead.append(dead)
        if self.metrics:
            self.metrics.dead_letters.labels(dead.reason).inc()

    def _skip_applied(self, record: Record, slot: int) -> None:
        """After a restore, replayed inputs whose steps the restored state already holds are skipped.

        The changelog records, per stream, the position (offset, index) of the last step applied.
        Records before it are dropped whole; the record at it resumes after that step. Outputs
        of skipped steps were acknowledged before the state was written (checkpoint order).
        """
        last = int(self.streams.last_offset[slot])
        index = int(self.streams.last_index[slot])
        if record.offset < last or index >= len(record.steps):
            record.remaining = 0  # the whole record, its controls included, is in the state
            return
        skipped = index + 1
        record.cursor = skipped
        record.remaining -= skipped + int(record.reset)
        record.reset = False

    # --- plan / execute / finish ----------------------------------------------------------
    def plan(self) -> list[Call]:
        calls = []
        for g in self.scheduler.next_batch():
            slots = np.asarray(g.slots, dtype=np.int64)
            x = as_array(g.rows, len(g.slots), g.t, self.numeric)
            if self.normalise:
                x = (x - self.mean) * self.inv_std
            if self.window:
                arena = self.streams.arena
                assert isinstance(arena, WindowArena)
                x = arena.push_and_window(slots, self.streams.steps[slots], x[:, 0])
                states: list[np.ndarray] = []
            else:
                arena = self.streams.arena
                assert isinstance(arena, StateArena)
                states = arena.gather(slots)
            calls.append(Call(g, np.ascontiguousarray(x), slots, states))
        return calls

    def execute(self, calls: list[Call]) -> list[Call]:
        """ONNX Runtime work only (releases the GIL): safe on a worker thread."""
        for c in calls:
            t0 = time.perf_counter()
            c.y, c.new_states = self.model.run(c.x, c.states)
            c.seconds = time.perf_counter() - t0
            if self.forecaster is not None:
                c.forecast = self.forecaster.roll(c.y[:, -1], c.new_states)
            if self.generator is not None:
                seeds = [(r.partition, r.offset, i) for r, i in c.group.refs]
                c.generated = self.generator.generate(c.y[:, -1], c.new_states, seeds)
        return calls

    def finish(self, calls: list[Call]) -> list[Output]:
        now_ms = int(time.time() * 1000)
        m = self.metrics
        for c in calls:
            g = c.group
            assert c.y is not None
            if not self.window:
                arena = self.streams.arena
                assert isinstance(arena, StateArena)
                arena.scatter(c.slots, c.new_states)
            y = c.y.reshape(-1, c.y.shape[-1])  # [B*T, O], row-major (stream, step) like g.refs
            if c.forecast is None and c.generated is None:
                preds = self.heads.encoded(y)
            else:
                docs = self.heads.predictions(y)
                if c.forecast is not None:
                    self._attach_forecast(docs, c.forecast)
                if c.generated is not None:
                    self._attach_generated(docs, c.generated)
                preds = [codec.encode(d) for d in docs]
            self._emit(g, preds, now_ms, self.heads.nonfinite(y, g.refs, c.forecast))
            self.scheduler.complete(g)
            if m:
                m.batch_size.observe(len(g.slots))
                m.chunk_steps.observe(g.t)
                m.inference_seconds.observe(c.seconds)
                m.steps.inc(len(g.slots) * g.t)
        return self._take_outputs()

    def _emit(self, g: Group, preds: list[bytes], now_ms: int, nonfinite: list[int] | None = None) -> None:
        """The group's output documents, routed by the emit and warm-up settings."""
        t = g.t
        steps = g.first_step if t == 1 else [f + j for f in g.first_step for j in range(t)]
        docs = self.encoder.documents(g.refs, steps, preds, now_ms, nonfinite)
        every = self.emit_every
        if every == 1 and not self.hold_warmup:  # the default: every step, as it comes
            self.outputs.extend([(r.key, doc, r.timestamp) for (r, _), doc in zip(g.refs, docs, strict=True)])
            return
        slots = g.slots if t == 1 else [s for s in g.slots for _ in range(t)]
        for (record, _), step, doc, slot in zip(g.refs, steps, docs, slots, strict=True):
            if every == 0:
                self.last_prediction[slot] = doc  # emitted when the stream ends
            elif not (step < self.warmup and self.hold_warmup) and (step + 1) % every == 0:
                self.outputs.append((record.key, doc, record.timestamp))

    def _attach_forecast(self, preds: list[dict[str, Any]], forecast: np.ndarray) -> None:
        names = self.heads.names
        for pred, rows in zip(preds, shortest(self.heads.values(forecast)), strict=True):
            pred["forecast"] = [dict(zip(names, r, strict=True)) for r in rows]

    def _attach_generated(self, preds: list[dict[str, Any]], ids: np.ndarray) -> None:
        vocab = self.heads.vocab
        tok = self.decoder.tokenizer
        for pred, row in zip(preds, ids.tolist(), strict=True):
            tokens = [vocab[i] for i in row]
            pred["generated"] = tok.join(tokens) if tok else tokens
            pred["generated_ids"] = row

    def _take_outputs(self) -> list[Output]:  # tuples of Output's layout
        out, self.outputs = self.outputs, []
        return out

    # --- controls and evictions -----------------------------------------------------------
    def _on_reset(self, slot: int, record: Record) -> None:
        self.last_prediction.pop(slot, None)

    def _on_end(self, slot: int, record: Record) -> None:
        doc = self.last_prediction.pop(slot, None)
        if doc is not None:
            self.outputs.append((record.key, codec.with_fields(doc, {"ended": True}), record.timestamp))
        if self.metrics:
            self.metrics.stream_ends.inc()

    def _evicted(self, event: Eviction) -> None:
        self.last_prediction.pop(event.slot, None)
        self.evictions.append(event)
        if self.durable:
            self.tombstones.append((event.partition, event.key))
        if self.metrics and event.reason in ("ttl", "lru"):
            self.metrics.evictions.labels(event.reason).inc()

    # --- durable state --------------------------------------------------------------------
    def changelog_records(self) -> list[tuple[int, bytes, bytes | None]]:
        """(partition, key, value) for every stream changed since the last call; tombstones first."""
        out: list[tuple[int, bytes, bytes | None]] = [(p, k, None) for p, k in self.tombstones]
        self.tombstones = []
        streams = self.streams
        for slot in streams.dirty:
            key = streams.keys[slot]
            if key is None:
                continue
            state = changelog.StreamState(streams.arena.get(slot), int(streams.steps[slot]),
                                          int(streams.last_offset[slot]), int(streams.last_index[slot]),
                                          self._layout_hash)
            out.append((int(streams.partition[slot]), key, changelog.encode(state)))
        streams.dirty.clear()
        return out

    def restore(self, partition: int, states: dict[bytes, changelog.StreamState]) -> None:
        for key, st in states.items():
            self.streams.restore(partition, key, st.tensors, st.step, st.offset, st.index)

    # --- housekeeping ---------------------------------------------------------------------
    def take_dead_letters(self) -> list[DeadLetter]:
        dead, self.dead = self.dead, []
        return dead

    def take_evictions(self) -> list[Eviction]:
        ev, self.evictions = self.evictions, []
        return ev

    def revoke(self, partition: int) -> int:
        """Drop a partition's queued work, streams and offsets (after its checkpoint)."""
        self.scheduler.drop_partition(partition)
        for _, slot in list(self.streams.slots_of(partition)):
            self.last_prediction.pop(slot, None)
        n = self.streams.drop_partition(partition)
        self.offsets.forget(partition)
        return n

    def busy(self) -> bool:
        return self.scheduler.inflight > 0

    def pending_in(self, partition: int) -> int:
        return self.offsets.pending(partition)
