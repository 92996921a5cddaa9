"""The daemon's one idea, without Kafka: records → steps → batched model calls → predictions.

    accept_many()  decode records (or dead-letter them), find their streams, queue their steps
    plan()         take the next round of work from the scheduler; gather inputs and state
    execute()      run the model (ONNX Runtime; safe to call on a worker thread)
    finish()       scatter the new state back, turn outputs into predictions, encode them, and
                   return the output records the emit rules (``emit.Emitter``) let out

The daemon drives these four against Kafka. Keeping them free of I/O is what lets the tests
and the benchmarks drive exactly the same code with plain lists of records.

A seq2seq bundle runs through ``Seq2SeqPipeline``, the same four stages with a different
model stage: a message is one step (its whole source), and its answer takes as many rounds
as it has tokens, in ``seq2seq.Cells`` beside the other messages being answered.
``pipeline_for`` picks the class from the bundle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from typing import Any, Protocol, cast

import numpy as np

from . import changelog, codec
from .bundle import BundleSpec
from .codec import DeadLetter, Output, Record
from .config import ConfigError, ServeConfig
from .device import DeviceArena, placement_of
from .emit import Emitter
from .heads import Forecaster, Generator, Heads
from .metrics import Metrics
from .offsets import Offsets
from .runtime import BundleModel
from .scheduler import Group, Scheduler, as_array
from .seq2seq import Answer, Cells, encoded
from .state import Arena, ArenaFactory, Eviction, StateArena, Streams, WindowArena, host_arena

#: emit=end: what is kept of a stream's latest prediction, to encode should the stream end before
#: its next one: the step's (record, index), its stream step, prediction, output time, non-finite.
Kept = tuple[tuple[Record, int], int, bytes, int, bool]


class InputRecord(Protocol):
    """What ``accept_many`` reads of an input record: aiokafka's ConsumerRecord has these attributes."""

    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...


@dataclass
class Call:
    """One planned model call and, after execute(), its results."""

    group: Group
    x: np.ndarray
    slots: np.ndarray
    states: list[Any]  # host arrays, or device values (device_state)
    y: np.ndarray | None = None
    new_states: list[Any] = field(default_factory=list)
    seconds: float = 0.0
    forecast: np.ndarray | None = None
    generated: np.ndarray | None = None
    generated_rows: list[int] | None = None  # generate_at=end: the rows ``generated`` belongs to (None: all)
    padded: int = 0  # batch_buckets: rows of the spare slot after the streams' (their results are dropped)


class Pipeline:
    def __init__(self, model: BundleModel, cfg: ServeConfig, topic: str, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        check_config(model, cfg)
        spec = model.spec
        self.cfg = cfg
        self.topic = topic
        self.metrics = metrics
        self.window = spec.mode == "window"
        self.numeric = spec.input.kind == "numeric"
        self.on_device = cfg.device_state  # check_config: a stateful bundle's
        make: ArenaFactory = host_arena
        if self.on_device:
            placement = placement_of(model.session)
            self.device = placement.device, placement.device_id

            def make(spec: BundleSpec, capacity: int) -> Arena:
                return DeviceArena(spec, capacity, placement)
        # batch_buckets: one spare slot past the streams' (index max_streams), whose rows pad a call
        self.buckets = cfg.batch_buckets
        self.spare = cfg.max_streams
        spare = int(self.buckets)
        self.streams = Streams(spec, cfg.max_streams, cfg.stream_ttl_s, clock=clock,
                               arena=lambda spec, capacity: make(spec, capacity + spare))
        self.streams.on_evict.append(self._evicted)
        rollout = cfg.forecast_horizon > 0 or cfg.generate_tokens > 0
        # Forecasts and generation start from the state after each step, so steps run one at a time;
        # a seq2seq step is a whole message, answered before the stream's next one starts.
        max_chunk = 1 if (self.window or rollout or spec.mode == "seq2seq") else cfg.max_chunk
        self.scheduler = Scheduler(self.streams, cfg.max_batch, max_chunk, on_reset=self._on_reset,
                                   on_end=self._on_end)
        self.offsets = Offsets()
        self.generate_at_end = cfg.generate_at == "end"
        self.starting: dict[int, list[float]] = {}  # slot → context: init(context) runs before this round's calls
        self.emitter: Emitter[Kept] = Emitter.from_config(cfg, spec.warmup_steps)
        self.dead: list[DeadLetter] = []
        self.outputs: list[Output] = []
        self.evictions: list[Eviction] = []
        self.tombstones: list[tuple[int, bytes]] = []  # (partition, key): streams ended or evicted
        self.durable = cfg.changelog
        self.copied_headers = cfg.copied_headers
        self._use(model)
        if metrics:  # read at scrape time: always current, nothing to update on the hot path
            metrics.active_streams.set_function(lambda: self.streams.active)
            metrics.state_bytes.set_function(lambda: self.streams.state_bytes)
            metrics.inflight.set_function(lambda: self.scheduler.inflight)

    def _use(self, model: BundleModel) -> None:
        """Everything made from the bundle (its spec and sessions), and nothing else: what ``swap`` replaces.

        Streams, queued steps, offsets and kept predictions are the daemon's, not the bundle's,
        and stay as they are.
        """
        spec = self.spec = model.spec
        cfg = self.cfg
        self.model = model
        self.model_ref = spec.model.ref
        self.decoder = codec.Decoder(spec, cfg, self.topic)
        self.heads = Heads(spec, cfg.top_k, self.metrics)
        self.forecaster = Forecaster(model, cfg.forecast_horizon) if cfg.forecast_horizon else None
        self.generator = (Generator(model, cfg.generate_tokens, cfg.generate_strategy, cfg.top_k, cfg.generate_seed)
                          if cfg.generate_tokens else None)
        if (self.forecaster or self.generator) and self.window:
            raise ValueError("forecasts and generation need a stateful bundle")
        self.normalise = spec.input.normalise if spec.input.normalised else None
        self.warmup = spec.warmup_steps
        self.emitter.warm_up(spec.warmup_steps)
        self._layout_hash = spec.state_hash
        tokenizer = spec.input.tokenizer
        echo = tokenizer is not None and spec.input.kind == "tokens" and spec.mode != "seq2seq"
        self.encoder = codec.Encoder(self.topic, self.model_ref, self.warmup,
                                     tokenizer.vocab if echo and tokenizer else None)

    def swap(self, model: BundleModel, reset: bool = False) -> bool:
        """Serve ``model`` from the next round on (a hot reload); True once it serves.

        Called between rounds (under the daemon's call lock: no call planned and not finished).
        Its input must read as the serving one's (``upgrade.upgrade`` decides that, and ``reset``):
        the steps already queued were decoded for the serving bundle. ``reset``: its state layout
        differs, so every stream starts over on it (``Streams.adopt``) and what ``emit=end`` kept
        of a stream's last prediction is dropped, as a reset control drops it.
        """
        check_config(model, self.cfg)
        used = self.streams.adopt(model.spec, reset)
        if reset:
            for slot in used:
                self.emitter.forget(slot)
        self._use(model)
        return True

    # --- accept ---------------------------------------------------------------------------
    def accept_many(self, partition: int, records: Sequence[InputRecord]) -> int:
        """Take a fetch's records of one partition, in offset order; returns how many were taken.

        Fewer than ``len(records)`` means 'not now' for the next one: every stream slot is held
        by a stream with queued steps, so a new stream must wait until the model has worked some
        off; call again with the rest. A record at or below an offset already taken (a re-fetch)
        counts as taken and is ignored. The loop body runs once per input record, so it is
        written flat.
        """
        po = self.offsets.partition(partition)
        decode = self.decoder.decode
        streams = self.streams
        index = streams.index.get(partition)
        add = self.scheduler.add
        track = po.records.append
        last_offset = streams.last_offset
        copied = self.copied_headers
        n = 0
        for r in records:
            offset = r.offset
            if offset <= po.last:
                n += 1
                continue  # fetched again (after a seek): already taken
            headers = None
            if copied:
                given = getattr(r, "headers", None)  # aiokafka's ConsumerRecord has them; plain test records not
                if given:
                    headers = [(k, v) for k, v in given if k in copied] or None
            item = decode(r.key, r.value, partition, offset, r.timestamp)
            if item.__class__ is DeadLetter:
                self._dead_letter(dataclass_replace(item, headers=headers) if headers else item)
            else:
                rec: Record = item  # type: ignore[assignment]  # not a dead letter, so a Record (its key is set)
                rec.headers = headers
                key = rec.key
                slot = index.get(key) if index is not None else None
                if slot is not None and last_offset[slot] >= offset:
                    streams.skip_applied(slot, rec)  # a replay after a restore
                if rec.remaining:
                    if slot is None:
                        try:
                            slot = streams.slot(partition, key)
                        except MemoryError:
                            return n
                        index = streams.index[partition]
                    add(slot, rec)
                    track(rec)
            po.last = offset
            n += 1
        return n

    def _dead_letter(self, dead: DeadLetter) -> None:
        self.dead.append(dead)
        if self.metrics:
            self.metrics.dead_letters.labels(dead.reason).inc()

    # --- plan / execute / finish ----------------------------------------------------------
    def plan(self) -> list[Call]:
        calls = []
        normalise = self.normalise
        groups = self.scheduler.next_batch()
        self.starting, self.scheduler.starts = self.scheduler.starts, {}
        for g in groups:
            slots = np.asarray(g.slots, dtype=np.int64)
            x = as_array(g.rows, len(g.slots), g.t, self.numeric)
            if normalise is not None:
                x = normalise(x)
            padded = 0
            if self.buckets and (padded := (1 << (len(slots) - 1).bit_length()) - len(slots)):
                slots = np.concatenate([slots, np.full(padded, self.spare, dtype=np.int64)])
                x = np.concatenate([x, np.zeros((padded, *x.shape[1:]), dtype=x.dtype)])
            if self.window:
                arena = self.streams.arena
                assert isinstance(arena, WindowArena)
                x = arena.push_and_window(slots, self.streams.steps[slots], x[:, 0])
                states: list[np.ndarray] = []
            else:
                arena = self.streams.arena
                assert isinstance(arena, StateArena | DeviceArena)
                states = arena.gather(slots)
            calls.append(Call(g, np.ascontiguousarray(x), slots, states, padded=padded))
        return calls

    def execute(self, calls: list[Call]) -> list[Call]:
        """ONNX Runtime work only (releases the GIL): safe on a worker thread.

        Also run when ``starting`` holds streams with no call this round (a control-only start).
        """
        if self.starting:
            self._start(calls)
        for c in calls:
            t0 = time.perf_counter()
            if self.on_device:
                c.y, c.new_states = self.model.run_bound(c.x, c.states, *self.device)
            else:
                c.y, c.new_states = self.model.run(c.x, c.states)
            c.seconds = time.perf_counter() - t0
            if self.forecaster is not None:
                c.forecast = self.forecaster.roll(c.y[:, -1], c.new_states)
            if self.generator is not None:
                refs = c.group.refs  # one step per stream: rows and refs correspond
                rows = ([j for j, (r, i) in enumerate(refs) if i == len(r.steps) - 1] if self.generate_at_end
                        else None)
                if rows is None:
                    c.generated = self.generator.generate(c.y[:, -1], c.new_states, [(r.partition, r.offset, i)
                                                                                    for r, i in refs])
                elif rows:
                    arena = self.streams.arena
                    assert isinstance(arena, StateArena)  # generation needs a stateful bundle
                    c.generated_rows = rows
                    c.generated = self.generator.generate(
                        c.y[rows, -1], arena.rows(c.new_states, rows),
                        [(refs[j][0].partition, refs[j][0].offset, refs[j][1]) for j in rows])
        return calls

    def _start(self, calls: list[Call]) -> None:
        """init(context) for the streams started this round, into the arena, and into the states
        their calls gathered at ``plan`` (before this ran): one call of the start graph for all."""
        starting, self.starting = self.starting, {}
        arena = self.streams.arena
        assert isinstance(arena, StateArena | DeviceArena)  # a context start needs a stateful bundle
        slots = np.fromiter(starting, dtype=np.int64, count=len(starting))
        arena.scatter(slots, self.model.start_state(np.asarray(list(starting.values()), dtype=np.float32)))
        for c in calls:
            if np.isin(c.slots, slots).any():
                c.states = arena.gather(c.slots)

    def finish(self, calls: list[Call]) -> list[Output]:
        now_ms = int(time.time() * 1000)
        m = self.metrics
        for c in calls:
            g = c.group
            assert c.y is not None
            if not self.window:
                arena = self.streams.arena
                assert isinstance(arena, StateArena | DeviceArena)
                arena.scatter(c.slots, c.new_states)
            y = (c.y[:len(g.slots)] if c.padded else c.y).reshape(-1, c.y.shape[-1])  # [B*T, O] like g.refs
            if c.forecast is None and c.generated is None:
                preds = self.heads.encoded(y)
            else:
                preds = self.heads.with_rollouts(y, c.forecast, c.generated, self.decoder.tokenizer, c.generated_rows)
            self._emit(g, preds, now_ms, self.heads.nonfinite(y, g.refs, c.forecast))
            self.scheduler.complete(g)
            if m:
                m.batch_size.observe(len(g.slots))
                m.chunk_steps.observe(g.t)
                m.inference_seconds.observe(c.seconds)
                m.steps.inc(len(g.slots) * g.t)
        self.offsets.trim()
        out, self.outputs = self.outputs, []
        return out

    def _emit(self, g: Group, preds: list[bytes], now_ms: int, nonfinite: list[int] | None = None) -> None:
        """The group's output records, routed by the emit and warm-up settings."""
        t = g.t
        steps = g.first_step if t == 1 else [f + j for f in g.first_step for j in range(t)]
        emitter = self.emitter
        wanted = emitter.wanted(steps, g.slots, t)
        if wanted is None:  # the default: every prediction goes out
            self.outputs += self.encoder.outputs(g.refs, steps, preds, now_ms, nonfinite)
            return
        refs = g.refs
        bad = set(nonfinite) if nonfinite else ()
        if emitter.at_end:  # encoded only if its stream ends before its next prediction
            emitter.keep([(refs[j], steps[j], preds[j], now_ms, j in bad) for j in wanted], wanted, g.slots, t)
            return
        if wanted:
            self.outputs += self.encoder.outputs([refs[i] for i in wanted], [steps[i] for i in wanted],
                                                 [preds[i] for i in wanted], now_ms,
                                                 [k for k, i in enumerate(wanted) if i in bad] if bad else None)

    # --- controls and evictions -----------------------------------------------------------
    def _on_reset(self, slot: int, record: Record) -> None:
        self.emitter.forget(slot)

    def _on_end(self, slot: int, record: Record) -> None:
        kept = self.emitter.ended(slot)
        if kept is not None:  # emit=end: the document as it would have been written when made
            ref, step, pred, made_ms, bad = kept
            doc = self.encoder.outputs([ref], [step], [pred], made_ms, [0] if bad else None)[0].value
            # latency runs from the end control
            self.outputs.append(Output(record.key, codec.with_fields(doc, {"ended": True}), record.timestamp,
                                       record.partition, record.headers))
        if self.metrics:
            self.metrics.stream_ends.inc()

    def _evicted(self, event: Eviction) -> None:
        """A stream left its slot: ended, or evicted (TTL/LRU). Evictions are counted here and nowhere
        else (``rnnd_evictions_total``); ``take_evictions`` hands the events on for the daemon's log."""
        self.emitter.forget(event.slot)
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
        slots = [slot for slot in streams.dirty if streams.keys[slot] is not None]
        tensors = streams.arena.get_many(np.array(slots, dtype=np.int64)) if slots else []  # one copy per tensor
        for j, slot in enumerate(slots):
            key = streams.keys[slot]
            assert key is not None
            state = changelog.StreamState([t[j] for t in tensors], int(streams.steps[slot]),
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
            self.emitter.forget(slot)
        n = self.streams.drop_partition(partition)
        self.offsets.forget(partition)
        return n

    def busy(self) -> bool:
        return self.scheduler.inflight > 0

    @property
    def answering(self) -> int:
        """Messages part-way through their answer (seq2seq; 0 here): the model must not wait for
        company (max_wait_ms) while they are, or every token of theirs would wait too."""
        return 0

    def pending_in(self, partition: int) -> int:
        return self.offsets.pending(partition)


# --- seq2seq ------------------------------------------------------------------------------------


def pipeline_for(model: BundleModel, cfg: ServeConfig, topic: str, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> Pipeline:
    """The pipeline a bundle calls for: ``Seq2SeqPipeline`` for an encoder–decoder, else ``Pipeline``."""
    if model.spec.mode == "seq2seq":
        return Seq2SeqPipeline(model, cfg, topic, metrics, clock)
    return Pipeline(model, cfg, topic, metrics, clock)


def check_config(model: BundleModel, cfg: ServeConfig) -> None:
    """The settings that only some bundles take, checked against this one (at start and at a swap)."""
    spec = model.spec
    s2s = spec.seq2seq
    for setting in ("device_state", "batch_buckets"):
        if getattr(cfg, setting) and spec.mode != "stateful":
            raise ConfigError(f"{setting} is for stateful bundles; {spec.model.ref} is a {spec.mode} bundle, whose "
                              "state is not per-stream tensors the model carries: leave it false", setting)
    if s2s is None:
        if cfg.beam_size != 1 or cfg.max_output_len:
            name = "beam_size" if cfg.beam_size != 1 else "max_output_len"
            raise ConfigError(f"{name} is for seq2seq bundles; {spec.model.ref} is a {spec.mode} bundle: leave it "
                              "unset", name)
        return
    if cfg.max_output_len > s2s.max_output_len:
        raise ConfigError(f"max_output_len must be at most {s2s.max_output_len} for {spec.model.ref} (the "
                          f"bundle's, as exported), not {cfg.max_output_len}", "max_output_len")
    if cfg.emit != "every":
        raise ConfigError(f"emit must be left at 'every' for a seq2seq bundle, not {cfg.emit!r}: it picks steps "
                          "of a stream, and a seq2seq bundle answers every message", "emit")


@dataclass
class Round(Call):
    """A seq2seq round: the messages that join the cells (``(record, index, slot)``, source) and those
    the round's decoder call answered."""

    arrivals: list[tuple[tuple[Record, int, int], Any]] = field(default_factory=list)  # a source: ids, or an array
    answers: list[tuple[object, Answer]] = field(default_factory=list)
    rows: int = 0  # hypotheses in the decoder call


class SourceDecoder:
    """The codec's decoder, each record's steps made one step: the whole source of one message.
    ``verify`` decodes with it too, so that the oracle takes exactly the sources the daemon takes."""

    def __init__(self, decoder: codec.Decoder, max_source_len: int) -> None:
        self.inner = decoder
        self.tokenizer = decoder.tokenizer
        self.max_len = max_source_len

    def decode(self, key: bytes | None, value: bytes | None, partition: int, offset: int,
               timestamp: int) -> Record | DeadLetter:
        item = self.inner.decode(key, value, partition, offset, timestamp)
        if item.__class__ is DeadLetter:
            return item
        rec: Record = item  # type: ignore[assignment]
        if not rec.steps:
            return rec  # a control alone
        if len(rec.steps) > self.max_len:
            return DeadLetter(codec.TOO_MANY_STEPS, f"the source has {len(rec.steps)} steps; this bundle reads at "
                              f"most {self.max_len} (its max_source_len)", self.inner.topic, partition, offset,
                              timestamp, key, value)
        rec.steps = [rec.steps]
        rec.remaining = 1 + int(rec.reset) + int(rec.end)
        return rec


# While answers are in flight, arrivals join the cells once max_batch / ADMIT_BATCH_FRACTION of them
# are ready, or after ADMIT_MAX_HOLD rounds at most (a few ms: a decoder round of 1,000 rows takes
# ~1.5 ms on 2 cores); into idle cells they join at once. Why wait at all: the encoder runs once
# per source length per round, and its cost per source falls with the batch (reverse recipe, S=7:
# 9 µs at 16 sources, 6 µs at 64); gathering cut a round's cost per message by 8% at 1,000 in flight.
ADMIT_BATCH_FRACTION = 8
ADMIT_MAX_HOLD = 2


class Seq2SeqPipeline(Pipeline):
    """Each message's answer, decoded beside every other message in flight (``seq2seq.Cells``).

    A stream's messages are answered in order, one at a time (the scheduler holds a stream's
    next step until its previous one completed), so a stream's answers leave in input order;
    across streams a short answer overtakes a long one. A message counts as applied (its
    offset may be committed) only once its answer is out, so a crash mid-answer repeats it.
    """

    def __init__(self, model: BundleModel, cfg: ServeConfig, topic: str, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_messages = max(1, cfg.max_batch // cfg.beam_size)
        self._held = 0  # rounds the ready arrivals have been held back to gather (ADMIT_MAX_HOLD)
        self._next: tuple[BundleModel, bool] | None = None  # a swap waiting for the answers in flight
        super().__init__(model, cfg, topic, metrics, clock)

    def _use(self, model: BundleModel) -> None:
        super()._use(model)
        s2s = model.spec.seq2seq
        assert s2s is not None
        cfg = self.cfg
        self.decoder = SourceDecoder(self.decoder, s2s.max_source_len)  # type: ignore[assignment]
        self.cells = Cells(model, cfg.beam_size, cfg.max_output_len or None, cfg.length_penalty)
        self._vocab, self._separator = model.spec.output.vocab, s2s.separator

    def swap(self, model: BundleModel, reset: bool = False) -> bool:
        """As ``Pipeline.swap``, once the answers in flight are out: each answer is one model's, so
        no message joins the cells until then (``plan``), and the swap happens there."""
        if len(self.cells):
            check_config(model, self.cfg)
            self._next = (model, reset)
            return False
        self._next = None
        return super().swap(model, reset)

    @property
    def answering(self) -> int:
        return len(self.cells)

    def revoke(self, partition: int) -> int:
        """Also drop the partition's answers in flight: their records are uncommitted, so the partition's
        next owner answers them again (under the call lock, like every change to the cells)."""
        self.cells.drop(lambda tag: cast(tuple[Record, int, int], tag)[0].partition == partition)
        return super().revoke(partition)

    def plan(self) -> list[Call]:
        if self._next is not None and not len(self.cells):
            self.swap(*self._next)  # the last answer of the serving bundle is out
        room = self.max_messages - len(self.cells) if self._next is None else 0
        gather = min(room, self.max_messages // ADMIT_BATCH_FRACTION)
        if len(self.cells) and len(self.scheduler.ready) < gather and self._held < ADMIT_MAX_HOLD:
            room, self._held = 0, self._held + 1  # answers in flight: let arrivals gather a little
        else:
            self._held = 0
        groups = self.scheduler.next_batch(limit=room) if room > 0 else []
        self.scheduler.starts = {}
        arrivals: list[tuple[tuple[Record, int, int], Any]] = []
        normalise = self.normalise
        for g in groups:
            for slot, (rec, i) in zip(g.slots, g.refs, strict=True):
                src = rec.steps[i]  # token ids as they are: the cells make one array per source length
                if normalise is not None:
                    src = normalise(np.asarray(src, dtype=np.float32)).astype(np.float32)
                arrivals.append(((rec, i, slot), src))
        if not arrivals and not len(self.cells):
            return []
        return [Round(Group(1), np.empty(0), np.empty(0, dtype=np.int64), [], arrivals=arrivals)]

    def execute(self, calls: list[Call]) -> list[Call]:
        for c in calls:
            assert isinstance(c, Round)
            t0 = time.perf_counter()
            self.cells.add(c.arrivals)
            c.rows = self.cells.rows
            c.answers = self.cells.step()
            c.seconds = time.perf_counter() - t0
        return calls

    def finish(self, calls: list[Call]) -> list[Output]:
        now_ms = int(time.time() * 1000)
        m = self.metrics
        for c in calls:
            assert isinstance(c, Round)
            if c.answers:
                g = Group(1)
                for tag, _ in c.answers:
                    rec, i, slot = cast(tuple[Record, int, int], tag)
                    g.slots.append(slot)
                    g.refs.append((rec, i))
                g.first_step = self.streams.steps[g.slots].tolist()
                preds = encoded([a for _, a in c.answers], self._vocab, self._separator)
                bad = [j for j, (_, a) in enumerate(c.answers) if a.nonfinite] or None
                self._emit(g, preds, now_ms, bad)
                self.scheduler.complete(g)
                if m and bad:
                    m.nonfinite.inc(len(bad))
            if m:
                m.batch_size.observe(c.rows)
                m.inference_seconds.observe(c.seconds)
                m.steps.inc(len(c.answers))
        self.offsets.trim()
        out, self.outputs = self.outputs, []
        return out
