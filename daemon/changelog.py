"""Durable stream state: the changelog record format and the restore of a partition.

The changelog is a compacted topic, co-partitioned with the input topic (partition p holds
the streams of input partition p), keyed by stream key. A record holds one stream's state
tensors, its step count, and the input position of the last step applied to it — so that
after a crash the replayed inputs up to that position are skipped: state is applied
exactly once. A tombstone (no value) records an `end` or an eviction.

Binary, versioned, little-endian (not JSON floats: exact and ~4x smaller)::

    magic   4s   b"RNDS"
    version B    1
    hash    16s  the bundle's state-spec hash (ascii hex): state of another layout is never fed in
    step    q    steps applied to the stream
    offset  q    input offset of the last record applied (its steps up to `index`)
    index   q    last step index applied within that record (-1: only its reset)
    count   B    number of tensors, then for each: nbytes I + raw bytes (dtype/shape from the spec)
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .bundle import BundleSpec
from .errors import ChangelogError
from .names import group_and_topic as group_and_topic  # re-exported: the daemon names its changelog through here

log = logging.getLogger("rnnd.changelog")

MAGIC = b"RNDS"
VERSION = 1
_HEAD = struct.Struct("<4sB16sqqqB")
_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class StreamState:
    """One stream's durable state, as it travels through the changelog."""

    tensors: list[np.ndarray]  # per-stream shapes, as StateArena.get returns them
    step: int
    offset: int
    index: int
    state_hash: str


def encode(state: StreamState) -> bytes:
    parts = [_HEAD.pack(MAGIC, VERSION, state.state_hash.encode(), state.step, state.offset, state.index,
                        len(state.tensors))]
    for t in state.tensors:
        raw = np.ascontiguousarray(t, dtype=t.dtype.newbyteorder("<")).tobytes()
        parts.append(_LEN.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def read_hash(value: bytes) -> str:
    if len(value) < _HEAD.size or value[:4] != MAGIC:
        raise ChangelogError("not an rnnd changelog record")
    return _HEAD.unpack_from(value)[2].decode()


def decode(value: bytes, layout: list[tuple[str, tuple[int, ...]]]) -> StreamState:
    """``layout``: (dtype, per-stream shape) of each tensor, from the bundle that reads it."""
    try:
        magic, version, h, step, offset, index, count = _HEAD.unpack_from(value)
    except struct.error:
        raise ChangelogError("truncated changelog record") from None
    if magic != MAGIC:
        raise ChangelogError("not an rnnd changelog record")
    if version != VERSION:
        raise ChangelogError(f"changelog record version {version} is not supported (this rnnd reads {VERSION})")
    if count != len(layout):
        raise ChangelogError(f"record has {count} state tensors, the model {len(layout)}")
    pos = _HEAD.size
    tensors = []
    for dtype, shape in layout:
        (n,) = _LEN.unpack_from(value, pos)
        pos += _LEN.size
        want = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if n != want or pos + n > len(value):
            raise ChangelogError(f"state tensor of {n} bytes, the model expects {want}")
        little = np.dtype(dtype).newbyteorder("<")
        tensors.append(np.frombuffer(value, dtype=little, count=n // little.itemsize, offset=pos)
                       .astype(dtype).reshape(shape))
        pos += n
    return StreamState(tensors, step, offset, index, h.decode())


def layout_of(spec: BundleSpec) -> list[tuple[str, tuple[int, ...]]]:
    """What one stream's durable state looks like for this bundle (window mode: the input ring)."""
    if spec.mode == "window":
        assert spec.window is not None
        tail = (spec.input.n_features,) if spec.input.kind == "numeric" else ()
        return [(spec.input.dtype, (spec.window, *tail))]
    return [(s.dtype, tuple(s.shape)) for s in spec.states]


#: Topic configs of the changelog: only the last record per stream key matters.
TOPIC_CONFIGS = {"cleanup.policy": "compact"}


@dataclass
class RestoreResult:
    states: dict[int, dict[bytes, StreamState]]  # partition -> key -> state
    records: int
    seconds: float
    foreign: int  # records of another state layout (see on_state_mismatch)


async def restore_partitions(consumer, topic: str, partitions: list[int], spec: BundleSpec, on_mismatch: str,
                             progress: Callable[[int], None] | None = None, idle_s: float = 2.0) -> RestoreResult:
    """Read changelog ``partitions`` to their ends, all at once; the last record per key wins.

    ``consumer``: a started reader outside any group (``kafka.reader``). Where a partition
    ends, and when one that reports nothing for ``idle_s`` counts as empty: ``kafka.read_to_end``.
    """
    from aiokafka import TopicPartition

    from .kafka.reading import read_to_end  # here: the record format above needs no Kafka client

    layout = layout_of(spec)
    want_hash = spec.state_hash
    states: dict[int, dict[bytes, StreamState]] = {p: {} for p in partitions}
    counts = {"records": 0, "foreign": 0}
    started = time.monotonic()

    def take(tp, recs: list) -> None:
        into = states[tp.partition]
        for r in recs:
            counts["records"] += 1
            if r.value is None:
                into.pop(r.key, None)
                continue
            h = read_hash(r.value)
            if h != want_hash:
                counts["foreign"] += 1
                if on_mismatch == "reset":
                    into.pop(r.key, None)
                    continue
                raise ChangelogError(
                    f"changelog {topic}[{tp.partition}] holds state of layout {h}, but {spec.model.ref} has "
                    f"layout {want_hash}: feeding it in would be wrong. Serve the model that wrote it, or choose "
                    "on_state_mismatch=reset (streams restart from their initial state) or =previous (keep "
                    "serving previous_model)")
            into[r.key] = decode(r.value, layout)
        if progress:
            progress(counts["records"])

    await read_to_end(consumer, [TopicPartition(topic, p) for p in partitions], take, idle_s=idle_s)
    records, foreign = counts["records"], counts["foreign"]
    return RestoreResult(states, records, time.monotonic() - started, foreign)
