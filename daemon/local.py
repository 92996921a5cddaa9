"""A bundle served in this process, from Python: the daemon's pipeline with no Kafka and no event loop.

    from rnnd.daemon.local import Session

    session = Session("models/sensors.onnx")            # any `rnnd serve` setting as a keyword
    session.send("dev-1", {"x": [0.1, 0.2, 0.3]})        # one input message, as on the input topic
    for doc in session.run():                            # the output documents, in output order
        print(doc["key"], doc["step"], doc["prediction"])
    session.state("dev-1")                               # {"h": array([...]), ...}
    saved = session.checkpoint()                         # bytes: every stream's state
    Session("models/sensors.onnx").restore(saved)        # ... continued elsewhere
    session.swap("models/sensors-v2.onnx")               # streams continue on a retrained model

A ``Session`` drives ``pipeline.Pipeline`` (``Seq2SeqPipeline`` for an encoder–decoder), the
code ``rnnd serve`` runs between its Kafka consumer and producer, with Kafka's parts played by
plain values:

* a message ``send`` takes is an input record at the next offset of its partition (0 unless
  given; a stream key belongs to one partition, as Kafka's partitioner would keep it);
* ``run`` does the daemon's rounds (plan, execute, finish) until every queued step is applied,
  and returns the documents the daemon would write to the output topic
  (schemas/output.schema.json), in the order it would write them;
* messages the daemon would dead-letter are kept in ``dead_letters``
  (schemas/dead-letter.schema.json documents), and never touch a stream's state;
* ``checkpoint`` holds what the daemon's changelog holds for every stream (its state tensors,
  step count and input position, in the changelog's binary encoding) and the next offset of
  each partition; ``restore`` installs it, refusing state of another layout (``BundleError``),
  as the daemon's restore does;
* ``swap`` replaces the bundle as the daemon's hot reload does (the same checks of its input and
  state layout, the same ``on_state_mismatch`` policy), between runs.

Predictions equal the daemon's for the same messages (``rnnd predict`` is this class over a
file; a test compares it with a daemon's output topic). Not thread-safe: one caller at a time.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from . import changelog
from .config import ServeConfig
from .config import replace as settings_replace
from .errors import BundleError
from .pipeline import Pipeline, pipeline_for
from .runtime import BundleModel, open_served
from .upgrade import upgrade

__all__ = ["Session"]

#: The topic name the output documents carry (their "topic" field and ids): no topic is read.
DEFAULT_TOPIC = "local"
#: Format of ``checkpoint``'s bytes (a JSON document; state records base64 inside it).
CHECKPOINT_FORMAT = 1

Message = Mapping[str, Any] | str | bytes


class _Record:
    """What ``Pipeline.accept_many`` reads of an input record (aiokafka's ConsumerRecord has these)."""

    __slots__ = ("key", "offset", "timestamp", "value")

    def __init__(self, key: bytes, value: bytes | None, offset: int, timestamp: int) -> None:
        self.key, self.value, self.offset, self.timestamp = key, value, offset, timestamp


class Session:
    """One bundle, its streams' state, and the daemon's pipeline over them; see the module docstring."""

    def __init__(self, model: str | Path | BundleModel, topic: str = DEFAULT_TOPIC, *,
                 config: ServeConfig | None = None, **settings: Any) -> None:
        """``model``: a bundle's path (opened with the ``provider`` setting), or a ``BundleModel`` already
        open (several sessions can share one). ``settings``: ``rnnd serve``'s, by their config names;
        or ``config``, settings already loaded (its model and topics are this session's)."""
        loaded = model if isinstance(model, BundleModel) else None
        name = loaded.spec.model.ref if loaded is not None else str(model)
        if config is not None and settings:
            raise TypeError("give settings as keywords or as config, not both")
        given: dict[str, Any] = {"model": name, "input_topic": topic, "output_topic": f"{topic}-out"}
        self.config = cfg = (settings_replace(config, **given) if config is not None
                             else ServeConfig(**given, **settings).validate())
        self.model = loaded or open_served(cfg.model, cfg)[0]
        self.pipeline: Pipeline = pipeline_for(self.model, cfg, topic)
        self.dead_letters: list[dict[str, Any]] = []
        self._next: dict[int, int] = {}  # partition -> the offset its next message takes
        self._applied: dict[int, int] = {}  # partition -> the offset after the last message run
        self._queued: dict[int, list[_Record]] = {}

    # --- input ------------------------------------------------------------------------------
    def send(self, key: str | bytes, message: Message | None, *, partition: int = 0, offset: int | None = None,
             timestamp: int | None = None) -> int:
        """Queue one input message for stream ``key`` (a dict, or its JSON text/bytes; None: an empty
        value, dead-lettered as the daemon does); returns its offset: ``offset`` (a record's own,
        read from a topic: past the partition's last), else the partition's next. Nothing runs until ``run``."""
        if partition < 0:
            raise ValueError(f"partition must be >= 0, not {partition}")
        following = self._next.get(partition, 0)
        if offset is None:
            offset = following
        elif offset < following:
            raise ValueError(f"offset {offset} of partition {partition} is not past its last ({following - 1})")
        self._next[partition] = offset + 1
        if timestamp is None:  # as a producer's CreateTime: the moment it was sent
            timestamp = int(time.time() * 1000)
        value = message if message is None or isinstance(message, bytes) else (
            message.encode() if isinstance(message, str) else orjson.dumps(message))
        self._queued.setdefault(partition, []).append(
            _Record(key.encode() if isinstance(key, str) else key, value, offset, timestamp))
        return offset

    def run(self) -> list[dict[str, Any]]:
        """Apply every queued message, in rounds as the daemon does; the output documents they made."""
        return [orjson.loads(v) for v in self.run_bytes()]

    def run_bytes(self) -> list[bytes]:
        """``run``, the documents as the bytes the daemon writes (one JSON object each)."""
        pipeline = self.pipeline
        out: list[bytes] = []
        for partition, records in self._queued.items():
            taken = 0
            while taken < len(records):
                n = pipeline.accept_many(partition, records[taken:])
                taken += n
                if taken < len(records):  # every stream slot holds queued work: apply some first
                    out += self._rounds()
            if records:
                self._applied[partition] = records[-1].offset + 1
        self._queued = {}
        out += self._rounds()
        return out

    def predict(self, messages: Iterable[tuple[str | bytes, Message | None]]) -> list[dict[str, Any]]:
        """``send`` each (key, message), then ``run``."""
        for key, message in messages:
            self.send(key, message)
        return self.run()

    def _rounds(self) -> list[bytes]:
        pipeline = self.pipeline
        out: list[bytes] = []
        while True:
            calls = pipeline.plan()
            if calls or pipeline.starting:
                calls = pipeline.execute(calls)
            out += [o.value for o in pipeline.finish(calls)]
            self.dead_letters += [orjson.loads(d.encode()) for d in pipeline.take_dead_letters()]
            pipeline.take_evictions()
            if not calls and not pipeline.busy():
                return out

    # --- the bundle ---------------------------------------------------------------------------
    def swap(self, model: str | Path | BundleModel) -> str:
        """Serve ``model`` from now on, as the daemon's hot reload does: every stream continues on it
        (the same state layout), or starts over on it (another layout, with ``on_state_mismatch=reset``);
        anything else is refused with a ``BundleError``, and the serving bundle stays. Messages sent
        and not yet run are run by the new bundle. Returns what became of the streams."""
        new = model if isinstance(model, BundleModel) else open_served(model, self.config)[0]
        plan = upgrade(self.model.spec, new.spec, self.config)
        if plan.action == "refuse":
            raise BundleError(f"{new.spec.model.ref} cannot take over from {self.model.spec.model.ref}: {plan.why}")
        swapped = self.pipeline.swap(new, reset=plan.action == "reset")
        assert swapped, "between runs no answer is in flight"
        self.model = new
        return plan.why

    # --- state ------------------------------------------------------------------------------
    def state(self, key: str | bytes, partition: int = 0) -> dict[str, np.ndarray] | None:
        """A stream's current state tensors by name (copies), or None for a stream not held."""
        k = key.encode() if isinstance(key, str) else key
        slot = self.pipeline.streams.index.get(partition, {}).get(k)
        if slot is None:
            return None
        spec = self.model.spec
        if spec.mode == "seq2seq":
            return {}  # an encoder–decoder keeps nothing per stream between messages
        names = ["window"] if spec.mode == "window" else [s.name for s in spec.states]
        tensors = self.pipeline.streams.arena.get(slot)
        return {n: np.array(t) for n, t in zip(names, tensors, strict=True)}

    def checkpoint(self) -> bytes:
        """Every stream's state and each partition's next offset, after the messages ``run`` applied.
        Messages sent but not yet run are not in it."""
        pipeline = self.pipeline
        streams = pipeline.streams
        records = []
        for partition in sorted(streams.index):
            for key, slot in streams.slots_of(partition):
                st = changelog.StreamState(streams.arena.get(slot), int(streams.steps[slot]),
                                           int(streams.last_offset[slot]), int(streams.last_index[slot]),
                                           self.model.spec.state_hash)
                records.append([partition, base64.b64encode(key).decode(),
                                base64.b64encode(changelog.encode(st)).decode()])
        return orjson.dumps({"format": CHECKPOINT_FORMAT, "model": self.model.spec.model.ref,
                             "next_offsets": {str(p): o for p, o in self._applied.items()}, "streams": records})

    def restore(self, data: bytes) -> None:
        """Install a ``checkpoint``: its streams' state, and offsets that continue after its own."""
        try:
            doc = orjson.loads(data)
            fmt, ref = doc["format"], doc["model"]
            entries = [(int(p), base64.b64decode(k, validate=True), base64.b64decode(v, validate=True))
                       for p, k, v in doc["streams"]]
            offsets = {int(p): int(o) for p, o in doc["next_offsets"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BundleError(f"not an rnnd Session checkpoint ({type(e).__name__}: {e})") from None
        if fmt != CHECKPOINT_FORMAT:
            raise BundleError(f"a Session checkpoint of format {fmt!r}; this rnnd reads format {CHECKPOINT_FORMAT}")
        spec = self.model.spec
        layout = changelog.layout_of(spec)
        by_partition: dict[int, dict[bytes, changelog.StreamState]] = {}
        for partition, key, raw in entries:
            if changelog.read_hash(raw) != spec.state_hash:
                raise BundleError(f"the checkpoint holds state of another layout (made by {ref}) than "
                                  f"{spec.model.ref}'s: it cannot continue those streams")
            by_partition.setdefault(partition, {})[key] = changelog.decode(raw, layout)
        for partition, states in by_partition.items():
            self.pipeline.restore(partition, states)
        for partition, offset in offsets.items():
            self._next[partition] = max(self._next.get(partition, 0), offset)
            self._applied[partition] = max(self._applied.get(partition, 0), offset)
