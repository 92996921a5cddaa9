"""Per-stream state: arenas gathered and scattered by slot, and the key → slot map with TTL/LRU.

The references are deliberately naive (a dict of per-stream arrays, a Python list of past
inputs), so that the vectorised indexing of the arenas is checked against something that
cannot share its mistakes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from rnnd.daemon.bundle import (
    BundleError,
    BundleSpec,
    InputSpec,
    ModelInfo,
    OutputSpec,
    RandomInit,
    StateSpec,
    TokenizerSpec,
    encode_array,
)
from rnnd.daemon.state import Eviction, StateArena, Streams, WindowArena

C0 = np.arange(5, dtype=np.float32) * 0.5 - 1.0  # the learned initial value of state "c"


def stateful_spec() -> BundleSpec:
    """Two state tensors: PyTorch layout (batch on axis 1, zeros) and batch-first (axis 0, learned)."""
    states = (
        StateSpec("h", (2, 3), 1, "h_in", "h_out"),
        StateSpec("c", (5,), 0, "c_in", "c_out", init="learned", init_value=encode_array(C0)),
    )
    return BundleSpec(ModelInfo("s", "1"), "stateful", InputSpec("numeric", features=("a",)),
                      OutputSpec("regression", names=("y",)), states)


def window_spec(w: int, tokens: bool = False, pad_id: int | None = 3) -> BundleSpec:
    if tokens:
        tok = TokenizerSpec("word", tuple(f"t{i}" for i in range(10)), unk_id=1, pad_id=pad_id)
        inp = InputSpec("tokens", tokenizer=tok)
    else:
        inp = InputSpec("numeric", features=("a", "b"))
    return BundleSpec(ModelInfo("w", "1"), "window", inp, OutputSpec("regression", names=("y",)), (), window=w)


class Clock:
    """An injected monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def find(streams: Streams, partition: int, key: bytes) -> int | None:
    """The stream's slot, or None: a look-up that, unlike ``Streams.slot``, allocates nothing."""
    return streams.index.get(partition, {}).get(key)


def per_stream(tensor: np.ndarray, axis: int, slot: int) -> np.ndarray:
    return np.take(tensor, slot, axis=axis)


# --- StateArena ---------------------------------------------------------------------------------


def test_gather_scatter_round_trip_by_slot() -> None:
    spec = stateful_spec()
    arena = StateArena(spec, capacity=10)
    assert [t.shape for t in arena.tensors] == [(2, 10, 3), (10, 5)]
    rng = np.random.default_rng(0)
    reference = {slot: [np.zeros((2, 3), np.float32), np.zeros(5, np.float32)] for slot in range(10)}
    for _ in range(20):
        slots = rng.choice(10, size=rng.integers(1, 6), replace=False)
        # gather: graph layout with the streams in the order asked for
        h, c = arena.gather(slots)
        assert h.shape == (2, len(slots), 3) and c.shape == (len(slots), 5)
        for i, s in enumerate(slots):
            np.testing.assert_array_equal(h[:, i], reference[s][0])
            np.testing.assert_array_equal(c[i], reference[s][1])
        # scatter: new per-stream values land in exactly those slots
        new_h = rng.standard_normal((2, len(slots), 3)).astype(np.float32)
        new_c = rng.standard_normal((len(slots), 5)).astype(np.float32)
        arena.scatter(slots, [new_h, new_c])
        for i, s in enumerate(slots):
            reference[int(s)] = [new_h[:, i].copy(), new_c[i].copy()]
        for slot in range(10):
            got = arena.get(slot)
            np.testing.assert_array_equal(got[0], reference[slot][0])
            np.testing.assert_array_equal(got[1], reference[slot][1])


def test_gather_returns_a_copy_not_a_view() -> None:
    """The model runs on the gathered arrays while the arena may be written: they must not alias."""
    arena = StateArena(stateful_spec(), capacity=4)
    h, c = arena.gather(np.array([1, 2]))
    h[:] = 7.0
    c[:] = 7.0
    assert not arena.tensors[0].any() and not arena.tensors[1].any()


def test_get_put_round_trip() -> None:
    arena = StateArena(stateful_spec(), capacity=4)
    h = np.arange(6, dtype=np.float32).reshape(2, 3)
    c = np.arange(5, dtype=np.float32) + 10
    arena.put(2, [h, c])
    np.testing.assert_array_equal(arena.tensors[0][:, 2], h)
    np.testing.assert_array_equal(arena.tensors[1][2], c)
    got = arena.get(2)
    np.testing.assert_array_equal(got[0], h)
    np.testing.assert_array_equal(got[1], c)
    got[0][:] = -1  # a copy: changing it leaves the arena alone
    np.testing.assert_array_equal(arena.tensors[0][:, 2], h)
    assert not arena.tensors[0][:, [0, 1, 3]].any()
    assert arena.bytes_per_stream == (6 + 5) * 4


def test_learned_initial_state_written_at_allocation_and_on_reset() -> None:
    streams = Streams(stateful_spec(), capacity=4)
    arena = streams.arena
    assert isinstance(arena, StateArena)
    a = streams.slot(0, b"a")
    np.testing.assert_array_equal(per_stream(arena.tensors[1], 0, a), C0)
    np.testing.assert_array_equal(per_stream(arena.tensors[0], 1, a), np.zeros((2, 3)))
    b = streams.slot(0, b"b")
    # the stream runs: its state changes, its step count grows
    arena.scatter(np.array([a, b]), [np.ones((2, 2, 3), np.float32), np.full((2, 5), 9.0, np.float32)])
    streams.steps[a] = 17
    streams.reset(a)
    assert streams.steps[a] == 0
    np.testing.assert_array_equal(per_stream(arena.tensors[1], 0, a), C0)
    np.testing.assert_array_equal(per_stream(arena.tensors[0], 1, a), np.zeros((2, 3)))
    # the other stream is untouched by the reset
    np.testing.assert_array_equal(per_stream(arena.tensors[1], 0, b), np.full(5, 9.0))
    np.testing.assert_array_equal(per_stream(arena.tensors[0], 1, b), np.ones((2, 3)))


def test_random_initial_state_is_each_keys_own_draw_at_allocation_on_reset_and_in_a_reused_slot() -> None:
    """A random initial state depends on the key (and the state's name and the seed), nothing else:
    not on the slot, the arena, the order streams arrive in, or whether it is a reset. It
    survives the bundle's JSON; bundles without one keep their metadata as before."""
    rand = RandomInit("uniform", (-0.5, 0.5), seed=3)
    spec = dataclasses.replace(stateful_spec(), states=(
        StateSpec("h", (2, 3), 1, "h_in", "h_out", init="random", init_random=rand),
        StateSpec("c", (5,), 0, "c_in", "c_out", init="learned", init_value=encode_array(C0))))
    assert BundleSpec.from_json(spec.to_json()) == spec
    assert "init_random" not in stateful_spec().to_json()  # zeros/learned bundles: metadata as before
    one, other = Streams(spec, capacity=2), Streams(spec, capacity=8)
    a1, b1 = one.slot(0, b"a"), one.slot(0, b"b")
    b2, a2 = other.slot(1, b"b"), other.slot(1, b"a")  # other order, other partition, other slots
    ha = per_stream(one.arena.tensors[0], 1, a1)
    np.testing.assert_array_equal(ha, per_stream(other.arena.tensors[0], 1, a2))
    np.testing.assert_array_equal(per_stream(one.arena.tensors[0], 1, b1), per_stream(other.arena.tensors[0], 1, b2))
    assert not np.allclose(ha, per_stream(one.arena.tensors[0], 1, b1)) and np.all(np.abs(ha) <= 0.5)
    np.testing.assert_array_equal(per_stream(one.arena.tensors[1], 0, a1), C0)  # the learned one beside it
    one.arena.scatter(np.array([a1]), [np.ones((2, 1, 3), np.float32), np.zeros((1, 5), np.float32)])
    one.reset(a1)
    np.testing.assert_array_equal(per_stream(one.arena.tensors[0], 1, a1), ha)
    one.release(a1)
    c = one.slot(0, b"c")  # a reused slot gets c's draw, not a's
    assert c == a1
    np.testing.assert_array_equal(per_stream(one.arena.tensors[0], 1, c), spec.states[0].initial_for(b"c"))
    reseeded = dataclasses.replace(spec.states[0], init_random=dataclasses.replace(rand, seed=4))
    assert not np.allclose(reseeded.initial_for(b"a"), ha)
    for bad in (("normal", (0.0, 0.0)), ("uniform", (1.0, 1.0)), ("cauchy", (0.0, 1.0)), ("normal", (math.nan, 1.0))):
        with pytest.raises(BundleError, match="random initial state"):
            RandomInit(*bad)  # type: ignore[arg-type]
    with pytest.raises(BundleError, match="a distribution goes with a random initial state"):
        StateSpec("h", (2,), 0, "h_in", "h_out", init="random")


# --- Streams -------------------------------------------------------------------------------------


def test_slot_is_stable_and_reused_after_release() -> None:
    streams = Streams(stateful_spec(), capacity=4)
    a, b = streams.slot(0, b"a"), streams.slot(0, b"b")
    assert a != b and streams.slot(0, b"a") == a and find(streams, 0, b"a") == a
    assert streams.active == 2
    arena = streams.arena
    assert isinstance(arena, StateArena)
    arena.put(a, [np.ones((2, 3), np.float32), np.ones(5, np.float32)])
    streams.steps[a] = 5
    events: list[Eviction] = []
    streams.on_evict.append(events.append)
    streams.release(a)
    assert events == [Eviction(0, b"a", a, "end")]
    assert find(streams, 0, b"a") is None and streams.active == 1 and not streams.in_use[a]
    c = streams.slot(0, b"c")
    assert c == a  # the freed slot is handed out again...
    assert streams.steps[c] == 0  # ...with fresh bookkeeping and fresh state, not a's
    np.testing.assert_array_equal(arena.get(c)[0], np.zeros((2, 3)))
    np.testing.assert_array_equal(arena.get(c)[1], C0)
    assert find(streams, 0, b"c") == c and streams.keys[c] == b"c"
    streams.release(c)
    streams.release(c)  # a free slot releases nothing (and calls no hook)
    assert streams.active == 1 and [e.key for e in events] == [b"a", b"c"]


def test_freed_slots_are_reused_last_in_first_out() -> None:
    """LIFO keeps the touched part of the preallocated arrays compact (module docstring)."""
    streams = Streams(stateful_spec(), capacity=8)
    slots = [streams.slot(0, bytes([65 + i])) for i in range(5)]
    streams.release(slots[1])
    streams.release(slots[3])
    assert streams.slot(0, b"x") == slots[3]
    assert streams.slot(0, b"y") == slots[1]
    assert streams.slot(0, b"z") == 5  # nothing free: the next never-used slot


def test_same_key_in_two_partitions_is_two_streams() -> None:
    streams = Streams(stateful_spec(), capacity=4)
    s0, s1 = streams.slot(0, b"k"), streams.slot(1, b"k")
    assert s0 != s1 and streams.active == 2
    assert (streams.partition[s0], streams.partition[s1]) == (0, 1)
    assert find(streams, 2, b"k") is None
    streams.release(s0)
    assert find(streams, 0, b"k") is None and find(streams, 1, b"k") == s1


def test_lru_evicts_the_least_recently_used_non_busy_stream() -> None:
    clock = Clock()
    streams = Streams(stateful_spec(), capacity=3, clock=clock)
    events: list[Eviction] = []
    streams.on_evict.append(events.append)
    slots = {}
    for t, key in enumerate([b"a", b"b", b"c"]):
        clock.now = float(t)
        slots[key] = streams.slot(0, key)
    clock.now = 3.0
    streams.slot(0, b"a")  # a is used again: b is now the least recently used
    clock.now = 4.0
    d = streams.slot(0, b"d")
    assert events == [Eviction(0, b"b", slots[b"b"], "lru")]
    assert d == slots[b"b"] and find(streams, 0, b"b") is None
    assert streams.active == 3
    # c is the oldest now, but it has pending work: the next oldest (a) goes instead
    streams.busy[slots[b"c"]] = 2
    clock.now = 5.0
    streams.slot(0, b"e")
    assert events[-1] == Eviction(0, b"a", slots[b"a"], "lru")
    assert find(streams, 0, b"c") == slots[b"c"]


def test_lru_never_evicts_busy_streams_and_says_why_when_all_are() -> None:
    clock = Clock()
    streams = Streams(stateful_spec(), capacity=3, clock=clock)
    for i, key in enumerate([b"a", b"b", b"c"]):
        clock.now = float(i)
        streams.busy[streams.slot(0, key)] = 1
    with pytest.raises(MemoryError, match=r"all 3 stream slots hold streams with pending steps.*max_streams"):
        streams.slot(0, b"d")
    assert streams.active == 3 and all(find(streams, 0, k) is not None for k in (b"a", b"b", b"c"))
    assert find(streams, 0, b"d") is None


def test_lru_batch_takes_the_oldest_non_busy() -> None:
    """Past 100 slots eviction frees 1% at once; those must still be the least recently used."""
    clock = Clock()
    rng = np.random.default_rng(1)
    streams = Streams(stateful_spec(), capacity=300, clock=clock)
    times = rng.permutation(300).astype(float)
    for i in range(300):
        clock.now = times[i]
        streams.slot(0, f"k{i}".encode())
    busy = {int(np.argmin(times))}  # the very oldest is busy
    streams.busy[list(busy)] = 1
    events: list[Eviction] = []
    streams.on_evict.append(events.append)
    clock.now = 1000.0
    streams.slot(0, b"new")
    idle = [i for i in np.argsort(times) if i not in busy]
    assert sorted(e.key for e in events) == sorted(f"k{i}".encode() for i in idle[:3])
    assert all(e.reason == "lru" for e in events) and streams.active == 300 - 3 + 1


def test_ttl_evicts_idle_streams_only() -> None:
    clock = Clock()
    streams = Streams(stateful_spec(), capacity=8, ttl_s=10.0, clock=clock)
    events: list[Eviction] = []
    streams.on_evict.append(events.append)
    a = streams.slot(0, b"a")
    clock.now = 5.0
    streams.slot(1, b"b")
    c = streams.slot(0, b"c")
    streams.busy[c] = 1  # idle as long as b, but has work queued
    clock.now = 10.0
    assert streams.evict_idle() == 0  # a is idle exactly ttl_s, not over
    clock.now = 12.0
    assert streams.evict_idle() == 1
    assert events == [Eviction(0, b"a", a, "ttl")]
    clock.now = 100.0
    assert streams.evict_idle() == 1
    assert [e.key for e in events] == [b"a", b"b"] and find(streams, 0, b"c") == c
    streams.slot(0, b"c")  # a lookup counts as use
    streams.busy[c] = 0
    clock.now = 105.0
    assert streams.evict_idle() == 0


def test_ttl_zero_never_evicts() -> None:
    clock = Clock()
    streams = Streams(stateful_spec(), capacity=4, ttl_s=0.0, clock=clock)
    streams.slot(0, b"a")
    clock.now = 1e9
    assert streams.evict_idle() == 0 and streams.active == 1


def test_drop_partition_forgets_its_streams_and_frees_their_slots() -> None:
    streams = Streams(stateful_spec(), capacity=6)
    events: list[Eviction] = []
    streams.on_evict.append(events.append)
    p1 = {streams.slot(1, k) for k in (b"a", b"b", b"c")}
    keep = streams.slot(2, b"a")
    streams.busy[list(p1)] = 4
    assert streams.drop_partition(1) == 3
    assert streams.drop_partition(1) == 0 and streams.drop_partition(9) == 0
    assert streams.active == 1 and find(streams, 1, b"a") is None and find(streams, 2, b"a") == keep
    assert not streams.busy[list(p1)].any() and not streams.in_use[list(p1)].any()
    assert events == []  # not an eviction: another replica owns these streams now
    assert list(streams.slots_of(2)) == [(b"a", keep)]
    reused = {streams.slot(3, k) for k in (b"x", b"y", b"z")}
    assert reused == p1 and streams.active == 4
    assert streams.state_bytes == 4 * streams.arena.bytes_per_stream


# --- WindowArena ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("w", "tokens", "pad_id"), [(5, False, None), (1, False, None), (4, True, 3),
                                                      (3, True, None)])
def test_window_matches_a_naive_history(w: int, tokens: bool, pad_id: int | None) -> None:
    spec = window_spec(w, tokens, pad_id)
    capacity = 6
    arena = WindowArena(spec, capacity)
    fill = pad_id if (tokens and pad_id is not None) else 0
    rng = np.random.default_rng(w)
    history: dict[int, list[np.ndarray]] = {s: [] for s in range(capacity)}
    for s in range(capacity):
        arena.init(s, b"k")
    for round_ in range(60):
        if round_ % 17 == 16:  # a reset: the stream starts over from the fill value
            s = int(rng.integers(capacity))
            arena.init(s, b"k")
            history[s] = []
        slots = rng.choice(capacity, size=rng.integers(1, capacity + 1), replace=False)
        if tokens:
            x = rng.integers(0, 10, size=len(slots)).astype(np.int64)
        else:
            x = rng.standard_normal((len(slots), 2)).astype(np.float32)
        counts = np.array([len(history[int(s)]) for s in slots], dtype=np.int64)
        got = arena.push_and_window(slots, counts, x)
        for i, s in enumerate(slots):
            history[int(s)].append(x[i])
            padded = [np.full_like(x[i], fill)] * w + history[int(s)]
            np.testing.assert_array_equal(got[i], np.stack(padded[-w:]))  # oldest → newest
        assert got.dtype == (np.int64 if tokens else np.float32)


def test_window_get_put_round_trip() -> None:
    arena = WindowArena(window_spec(3), 4)
    ring = np.arange(6, dtype=np.float32).reshape(3, 2)
    arena.put(1, [ring])
    np.testing.assert_array_equal(arena.get(1)[0], ring)
    assert not arena.ring[[0, 2, 3]].any()
    assert arena.bytes_per_stream == 3 * 2 * 4


def test_streams_of_a_window_bundle_initialise_the_ring_with_the_pad_id() -> None:
    streams = Streams(window_spec(4, tokens=True, pad_id=3), capacity=2)
    arena = streams.arena
    assert isinstance(arena, WindowArena)
    s = streams.slot(0, b"k")
    arena.ring[s] = 9
    streams.reset(s)
    np.testing.assert_array_equal(arena.ring[s], [3, 3, 3, 3])
