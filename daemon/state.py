"""Per-stream state: one slot per stream in preallocated arrays, gathered and scattered by index.

``Streams`` maps (partition, key) to a slot and keeps the per-slot bookkeeping (step count,
last use, pending work) in flat numpy arrays; its arena holds the model state itself:

* ``StateArena`` (stateful bundles): one array per state tensor in the graph's own layout
  with the batch axis sized to ``capacity`` — e.g. ``[L, capacity, H]`` — so that gathering
  B streams is one ``np.take`` that yields the model's input layout directly.
* ``WindowArena`` (window bundles): a ring buffer of the last W inputs per stream.

The arrays are allocated once at ``max_streams`` with ``np.zeros``, which maps pages lazily:
memory grows with the slots actually used, and nothing is ever copied to grow. Freed slots
are reused last-in first-out, which keeps the touched region compact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .bundle import BundleSpec, StateSpec

if TYPE_CHECKING:
    from .codec import Record


def initial_values(spec: BundleSpec) -> list[np.ndarray | StateSpec | None]:
    """Per state: None (zeros), the value every stream starts from (learned), or the spec (random: each
    stream's own draw, ``StateSpec.initial_for``)."""
    return [None if s.init == "zeros" else s if s.init == "random" else s.initial() for s in spec.states]


class StateArena:
    def __init__(self, spec: BundleSpec, capacity: int) -> None:
        self.tensors = [np.zeros(s.graph_shape(capacity), dtype=s.dtype) for s in spec.states]
        self.adopt(spec)

    def adopt(self, spec: BundleSpec) -> None:
        """Start new streams from ``spec``'s initial values; the state held stays (same layout: same hash)."""
        self.specs = spec.states
        self.initial = initial_values(spec)
        self._axes = [s.batch_axis for s in spec.states]

    def gather(self, slots: np.ndarray) -> list[np.ndarray]:
        return [np.take(t, slots, axis=ax) for t, ax in zip(self.tensors, self._axes, strict=True)]

    def rows(self, states: list[np.ndarray], rows: list[int]) -> list[np.ndarray]:
        """Some streams' part of a call's states (graph layout: each state's batch axis)."""
        return [np.take(s, rows, axis=ax) for s, ax in zip(states, self._axes, strict=True)]

    def scatter(self, slots: np.ndarray, states: list[np.ndarray]) -> None:
        for t, ax, new in zip(self.tensors, self._axes, states, strict=True):
            t[(slice(None),) * ax + (slots,)] = new

    def init(self, slot: int, key: bytes, fresh: bool = False) -> None:
        """The initial state of the stream ``key`` into ``slot``. A ``fresh`` slot (never used) already
        holds zeros: its zero-initialised tensors are left untouched, which also leaves their pages unmapped."""
        for t, ax, value in zip(self.tensors, self._axes, self.initial, strict=True):
            if value is not None or not fresh:
                if isinstance(value, StateSpec):
                    value = value.initial_for(key)
                t[(slice(None),) * ax + (slot,)] = 0.0 if value is None else value

    def get(self, slot: int) -> list[np.ndarray]:
        """One stream's state, per-stream shapes (for the changelog)."""
        return [np.take(t, slot, axis=ax).copy() for t, ax in zip(self.tensors, self._axes, strict=True)]

    def get_many(self, slots: np.ndarray) -> list[np.ndarray]:
        """Streams' states, batch-first (``[n, *per-stream shape]``): a checkpoint's changelog records."""
        return [np.moveaxis(np.take(t, slots, axis=ax), ax, 0) for t, ax in zip(self.tensors, self._axes, strict=True)]

    def put(self, slot: int, values: list[np.ndarray]) -> None:
        for t, ax, v in zip(self.tensors, self._axes, values, strict=True):
            t[(slice(None),) * ax + (slot,)] = v

    @property
    def bytes_per_stream(self) -> int:
        return sum(s.nbytes for s in self.specs)


class WindowArena:
    """The last W inputs of each stream, oldest first once read through ``windows``."""

    def __init__(self, spec: BundleSpec, capacity: int) -> None:
        assert spec.window is not None
        self.w = spec.window
        tail = (spec.input.n_features,) if spec.input.kind == "numeric" else ()
        tok = spec.input.tokenizer
        self.fill = float(tok.pad_id) if tok is not None and tok.pad_id is not None else 0.0
        self.ring = np.full((capacity, self.w, *tail), self.fill, dtype=spec.input.dtype) if self.fill else \
            np.zeros((capacity, self.w, *tail), dtype=spec.input.dtype)
        self._arange = np.arange(self.w)

    def push_and_window(self, slots: np.ndarray, counts: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Write each stream's new input at its ring position; return the windows ``[B, W, ...]``.

        ``counts`` are the streams' step counts before this step (so the new input lands at
        ``counts % W``); a stream younger than W sees the pad value before its first input.
        """
        pos = counts % self.w
        self.ring[slots, pos] = x
        order = (pos[:, None] + 1 + self._arange[None, :]) % self.w
        return self.ring[slots[:, None], order]

    def adopt(self, spec: BundleSpec) -> None:
        """Nothing to take from another bundle: a window holds inputs, and the input reads the same."""

    def init(self, slot: int, key: bytes, fresh: bool = False) -> None:
        if not fresh:  # a fresh slot holds the fill value since allocation
            self.ring[slot] = self.fill

    def get(self, slot: int) -> list[np.ndarray]:
        return [self.ring[slot].copy()]

    def get_many(self, slots: np.ndarray) -> list[np.ndarray]:
        return [self.ring[slots]]

    def put(self, slot: int, values: list[np.ndarray]) -> None:
        self.ring[slot] = values[0]

    @property
    def bytes_per_stream(self) -> int:
        return int(self.ring[0].nbytes)


class Arena(Protocol):
    """What ``Streams`` and the pipeline ask of an arena: ``StateArena``, ``WindowArena``, ``device.DeviceArena``."""

    def adopt(self, spec: BundleSpec) -> None: ...
    def init(self, slot: int, key: bytes, fresh: bool = False) -> None: ...
    def get(self, slot: int) -> list[np.ndarray]: ...
    def get_many(self, slots: np.ndarray) -> list[np.ndarray]: ...
    def put(self, slot: int, values: list[np.ndarray]) -> None: ...
    @property
    def bytes_per_stream(self) -> int: ...


ArenaFactory = Callable[[BundleSpec, int], Arena]


def host_arena(spec: BundleSpec, capacity: int) -> Arena:
    """The host's arena for a bundle: a ring of inputs for a window bundle, else its state tensors."""
    return WindowArena(spec, capacity) if spec.mode == "window" else StateArena(spec, capacity)


@dataclass
class Eviction:
    partition: int
    key: bytes
    slot: int
    reason: str  # ttl | lru | end


class Streams:
    """(partition, key) → slot, with TTL and LRU eviction. Knows nothing of Kafka or the model."""

    def __init__(self, spec: BundleSpec, capacity: int, ttl_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, arena: ArenaFactory | None = None) -> None:
        """``arena``: makes the state arena for a spec and a capacity (``host_arena`` unless given:
        ``device.DeviceArena`` keeps the state on the model's device)."""
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.clock = clock
        self.new_arena = arena or host_arena
        self.arena: Arena = self.new_arena(spec, capacity)
        self.index: dict[int, dict[bytes, int]] = {}
        self.keys: list[bytes | None] = []
        self.partition = np.zeros(capacity, dtype=np.int32)
        self.steps = np.zeros(capacity, dtype=np.int64)
        self.last_used = np.zeros(capacity, dtype=np.float64)
        self.busy = np.zeros(capacity, dtype=np.int32)  # unapplied steps/controls: never evicted
        self.in_use = np.zeros(capacity, dtype=bool)
        # Input position of the last step applied (offset, index within that record): replayed
        # inputs at or before it are skipped, so a step is never applied twice.
        self.last_offset = np.full(capacity, -1, dtype=np.int64)
        self.last_index = np.full(capacity, -1, dtype=np.int64)
        self.dirty: set[int] = set()  # slots changed since the last checkpoint
        self._free: list[int] = []
        self._next = 0  # slots below this have been handed out at least once
        self.active = 0
        self.on_evict: list[Callable[[Eviction], None]] = []

    # --- lookup ---------------------------------------------------------------------------
    def slot(self, partition: int, key: bytes) -> int:
        """The stream's slot, allocating (and initialising) one for a new stream."""
        keys = self.index.get(partition)
        if keys is None:
            keys = self.index[partition] = {}
        slot = keys.get(key)
        if slot is None:
            fresh = not self._free and self._next < self.capacity  # never used: still as allocated
            slot = self._allocate()
            keys[key] = slot
            self.keys[slot] = key
            self.partition[slot] = partition
            self.steps[slot] = 0
            self.last_offset[slot] = -1
            self.last_index[slot] = -1
            self.in_use[slot] = True
            self.arena.init(slot, key, fresh)
            self.active += 1
        self.last_used[slot] = self.clock()
        return slot

    def _allocate(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next < self.capacity:
            self._next += 1
            self.keys.append(None)
            return self._next - 1
        self.evict_lru(max(1, self.capacity // 100))
        if not self._free:
            raise MemoryError(f"all {self.capacity} stream slots hold streams with pending steps; "
                              "raise max_streams or lower max_inflight_steps")
        return self._free.pop()

    # --- lifecycle ------------------------------------------------------------------------
    def reset(self, slot: int) -> None:
        self.steps[slot] = 0
        key = self.keys[slot]
        assert key is not None
        self.arena.init(slot, key)
        self.dirty.add(slot)

    def applied(self, slot: int, offset: int, index: int) -> None:
        """Steps up to (offset, index) are in the slot's state now."""
        self.last_offset[slot] = offset
        self.last_index[slot] = index
        self.dirty.add(slot)

    def skip_applied(self, slot: int, record: Record) -> None:
        """After a restore, replayed inputs whose steps the restored state already holds are skipped.

        The changelog records, per stream, the position (offset, index) of the last step applied.
        Records before it are dropped whole; the record at it resumes after that step. Outputs
        of skipped steps were acknowledged before the state was written (checkpoint order).
        """
        last = int(self.last_offset[slot])
        index = int(self.last_index[slot])
        if record.offset < last or index >= len(record.steps):
            record.remaining = 0  # the whole record, its controls included, is in the state
            return
        skipped = index + 1
        record.cursor = skipped
        record.remaining -= skipped + int(record.reset)
        record.reset = False

    def restore(self, partition: int, key: bytes, tensors: list[np.ndarray], step: int, offset: int,
                index: int) -> int:
        """Install a stream's durable state (from the changelog) into a slot."""
        slot = self.slot(partition, key)
        self.arena.put(slot, tensors)
        self.steps[slot] = step
        self.last_offset[slot] = offset
        self.last_index[slot] = index
        return slot

    def release(self, slot: int, reason: str = "end") -> None:
        key = self.keys[slot]
        if key is None:
            return
        partition = int(self.partition[slot])
        del self.index[partition][key]
        self.keys[slot] = None
        self.in_use[slot] = False
        self.dirty.discard(slot)
        self._free.append(slot)
        self.active -= 1
        event = Eviction(partition, key, slot, reason)
        for hook in self.on_evict:
            hook(event)

    def evict_lru(self, n: int) -> int:
        used = self.last_used[: self._next].copy()
        unusable = (self.busy[: self._next] > 0) | ~self.in_use[: self._next]
        used[unusable] = np.inf
        n = min(n, int((~unusable).sum()))
        if n <= 0:
            return 0
        victims = np.argpartition(used, n - 1)[:n]
        for slot in victims:
            self.release(int(slot), "lru")
        return n

    def evict_idle(self) -> int:
        if not self.ttl_s or not self.active:
            return 0
        now = self.clock()
        mask = self.last_used[: self._next] < now - self.ttl_s
        mask &= (self.busy[: self._next] == 0) & self.in_use[: self._next]
        victims = [int(s) for s in np.flatnonzero(mask)]
        for slot in victims:
            self.release(slot, "ttl")
        return len(victims)

    def drop_partition(self, partition: int) -> int:
        """Forget a revoked partition's streams (their state now belongs to another replica)."""
        keys = self.index.pop(partition, {})
        for slot in keys.values():
            self.keys[slot] = None
            self.in_use[slot] = False
            self.busy[slot] = 0
            self.dirty.discard(slot)
            self._free.append(slot)
        self.active -= len(keys)
        return len(keys)

    def adopt(self, spec: BundleSpec, reset: bool = False) -> list[int]:
        """Another bundle serves these streams from now on (a hot reload); returns the slots in use.

        Its state layout is the old one (equal ``state_hash``): every stream keeps its state and
        step count, and only new streams start from the new bundle's initial values. ``reset``:
        another layout, so every stream starts over from the new bundle's initial state at step 0
        (its input position stays, so inputs already applied are not applied again), and is
        marked changed, so that the next checkpoint writes the new layout to the changelog.
        """
        used = [int(s) for s in np.flatnonzero(self.in_use[: self._next])]
        if not reset:
            self.arena.adopt(spec)
            return used
        self.arena = self.new_arena(spec, self.capacity)
        for slot in used:
            key = self.keys[slot]
            assert key is not None
            self.arena.init(slot, key, fresh=True)  # the new arrays hold zeros (or the fill) everywhere
            self.steps[slot] = 0
            self.dirty.add(slot)
        return used

    def slots_of(self, partition: int) -> Iterator[tuple[bytes, int]]:
        return iter(self.index.get(partition, {}).items())

    @property
    def state_bytes(self) -> int:
        return self.active * self.arena.bytes_per_stream
