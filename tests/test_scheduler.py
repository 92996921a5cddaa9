"""Cellular batching: which steps of which streams go into each model call, and when controls apply.

A stand-in "model" checks each round from the outside: it reads the stream state the arena
holds (a marker: the number of steps the stream has run since its last reset), writes back
the marker advanced by the chunk length, and records the steps it was handed. The reference
is the per-key event sequence written down from the records alone (``R`` reset, the steps,
``E`` end); the scheduler must reproduce it exactly, with every chunk starting from the
state the previous one left.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pytest

from rnnd.daemon.bundle import BundleSpec, InputSpec, ModelInfo, OutputSpec, StateSpec
from rnnd.daemon.codec import Record
from rnnd.daemon.scheduler import Group, Scheduler, as_array
from rnnd.daemon.state import StateArena, Streams


def spec() -> BundleSpec:
    return BundleSpec(ModelInfo("s", "1"), "stateful", InputSpec("numeric", features=("a",)),
                      OutputSpec("regression", names=("y",)), (StateSpec("h", (1, 1), 1, "h_in", "h_out"),))


@dataclass
class Harness:
    """Streams + Scheduler + a fake model that checks state continuity and records what ran."""

    max_batch: int = 64
    max_chunk: int = 8
    capacity: int = 256
    max_steps: int = 1 << 30  # the round budget: out of the way unless a test sets it
    streams: Streams = field(init=False)
    sched: Scheduler = field(init=False)
    trace: dict[bytes, list] = field(default_factory=lambda: defaultdict(list))
    since_reset: dict[bytes, int] = field(default_factory=lambda: defaultdict(int))
    rounds: list[list[Group]] = field(default_factory=list)
    ended_slots: list[int] = field(default_factory=list)
    offset: int = 0

    def __post_init__(self) -> None:
        self.streams = Streams(spec(), self.capacity)
        self.sched = Scheduler(self.streams, self.max_batch, self.max_chunk, on_reset=self._reset, on_end=self._end,
                               max_steps=self.max_steps)

    def _reset(self, slot: int, r: Record) -> None:
        assert self.streams.keys[slot] == r.key
        self.trace[r.key].append("R")
        self.since_reset[r.key] = 0

    def _end(self, slot: int, r: Record) -> None:
        assert self.streams.keys[slot] == r.key  # still owned: on_end runs before the slot is released
        self.trace[r.key].append("E")
        self.since_reset[r.key] = 0
        self.ended_slots.append(slot)

    def add(self, key: bytes, steps: list, reset: bool = False, end: bool = False, partition: int = 0) -> Record:
        r = Record(key, partition, self.offset, 0, steps, reset, end)
        self.offset += 1
        self.sched.add(self.streams.slot(partition, key), r)
        return r

    def plan(self) -> list[Group]:
        groups = self.sched.next_batch()
        self.rounds.append(groups)
        seen: set[int] = set()
        for g in groups:
            assert g.t >= 1 and g.t & (g.t - 1) == 0 and g.t <= self.max_chunk, g.t
            assert len(g.rows) == len(g.refs) == g.size * g.t and len(g.first_step) == g.size
            assert not seen & set(g.slots), "a stream appears twice in one round"
            seen |= set(g.slots)
            arena = self.streams.arena
            assert isinstance(arena, StateArena)
            marker = arena.gather(np.asarray(g.slots))[0][0, :, 0]
            for i, slot in enumerate(g.slots):
                key = self.streams.keys[slot]
                assert key is not None
                # the chunk continues from the state and step count the stream left
                assert g.first_step[i] == self.since_reset[key] == marker[i] == self.streams.steps[slot]
                for j in range(g.t):
                    r, index = g.refs[i * g.t + j]
                    assert r.key == key and r.steps[index] == g.rows[i * g.t + j]
                    self.trace[key].append(g.rows[i * g.t + j])
                self.since_reset[key] += g.t
        assert len(seen) <= self.max_batch
        return groups

    def complete(self, groups: list[Group]) -> None:
        arena = self.streams.arena
        assert isinstance(arena, StateArena)
        for g in groups:
            slots = np.asarray(g.slots)
            new = arena.gather(slots)[0] + g.t
            arena.scatter(slots, [new])
            self.sched.complete(g)

    def drain(self, max_rounds: int = 10_000) -> None:
        for _ in range(max_rounds):
            if not self.sched.ready:
                return
            self.complete(self.plan())
        raise AssertionError("scheduler never became idle")

    def assert_settled(self) -> None:
        assert not self.sched.ready and self.sched.inflight == 0 and not self.sched.queues
        assert not self.streams.busy.any()


def find(streams: Streams, partition: int, key: bytes) -> int | None:
    return streams.index.get(partition, {}).get(key)


def pending_steps(h: Harness, slot: int) -> int:
    """Steps queued for ``slot`` and not yet handed to a model call."""
    return sum(len(r.steps) - r.cursor for r in h.sched.queues.get(slot, ()))


def expected_trace(records: list[tuple[list, bool, bool]]) -> list:
    out: list = []
    for steps, reset, end in records:
        out += ["R"] * reset + list(steps) + ["E"] * end
    return out


def test_single_step_records_run_one_step_per_stream_in_one_call() -> None:
    h = Harness()
    keys = [f"k{i}".encode() for i in range(10)]
    for k in keys:
        h.add(k, [(k, 0)])
    groups = h.plan()
    assert [(g.t, g.size) for g in groups] == [(1, 10)]
    assert groups[0].rows == [(k, 0) for k in keys]  # oldest ready stream first
    assert h.sched.inflight == 10 and int(h.streams.busy.sum()) == 10
    h.complete(groups)
    h.assert_settled()
    assert all(h.streams.steps[find(h.streams, 0, k)] == 1 for k in keys)


@pytest.mark.parametrize(("backlog", "max_chunk", "chunks"), [
    (1, 8, [1]), (2, 8, [2]), (3, 8, [2, 1]), (7, 8, [4, 2, 1]), (8, 8, [8]), (13, 8, [8, 4, 1]),
    (20, 8, [8, 8, 4]), (5, 1, [1] * 5), (6, 4, [4, 2]),
])
def test_backlog_runs_as_power_of_two_chunks(backlog: int, max_chunk: int, chunks: list[int]) -> None:
    h = Harness(max_chunk=max_chunk)
    steps = list(range(backlog))
    # the backlog arrives as several records; the chunks run across their boundaries
    for i in range(0, backlog, 3):
        h.add(b"k", steps[i:i + 3])
    h.drain()
    assert [g.t for groups in h.rounds for g in groups] == chunks
    assert h.trace[b"k"] == steps
    h.assert_settled()


def test_streams_with_different_backlogs_share_rounds_by_chunk_length() -> None:
    h = Harness(max_chunk=4)
    h.add(b"a", list(range(5)))
    h.add(b"b", [0])
    h.add(b"c", list(range(4)))
    first = h.plan()
    by_t = {g.t: [h.streams.keys[s] for s in g.slots] for g in first}
    assert by_t == {4: [b"a", b"c"], 1: [b"b"]}
    h.complete(first)
    h.drain()
    assert h.trace == {b"a": list(range(5)), b"b": [0], b"c": list(range(4))}
    h.assert_settled()


def test_reset_inside_a_backlog_cuts_the_chunk_and_applies_before_its_steps() -> None:
    h = Harness(max_chunk=8)
    h.add(b"k", [1, 2, 3])
    h.add(b"k", [4, 5], reset=True)
    h.add(b"k", [6])
    h.drain()
    assert h.trace[b"k"] == [1, 2, 3, "R", 4, 5, 6]
    assert [g.t for groups in h.rounds for g in groups] == [2, 1, 2, 1]
    h.assert_settled()


def test_control_only_reset_behind_a_backlog_is_applied() -> None:
    """A reset-only record queued behind steps must not be dropped when those steps complete."""
    h = Harness(max_chunk=8)
    h.add(b"k", [1, 2, 3])
    reset = h.add(b"k", [], reset=True)
    h.add(b"k", [4, 5])
    h.drain()
    assert h.trace[b"k"] == [1, 2, 3, "R", 4, 5]
    assert reset.remaining == 0  # its offset can be committed
    h.assert_settled()


def test_end_cuts_the_chunk_calls_on_end_and_releases_the_slot() -> None:
    h = Harness(max_chunk=8)
    h.add(b"k", [1, 2, 3, 4], end=True)
    slot = find(h.streams, 0, b"k")
    h.add(b"other", [9])
    h.drain()
    assert h.trace[b"k"] == [1, 2, 3, 4, "E"]
    assert h.ended_slots == [slot]
    assert find(h.streams, 0, b"k") is None and not h.streams.in_use[slot]
    assert h.streams.active == 1
    h.assert_settled()
    # the same key later is a new stream, from step 0
    h.add(b"k", [5])
    h.drain()
    assert h.trace[b"k"] == [1, 2, 3, 4, "E", 5]


def test_end_with_more_records_queued_resets_instead_of_releasing() -> None:
    h = Harness(max_chunk=8)
    h.add(b"k", [1, 2], end=True)
    slot = find(h.streams, 0, b"k")
    h.add(b"k", [3, 4, 5])
    h.add(b"k", [], end=True)
    h.add(b"k", [6])
    h.drain()
    assert h.trace[b"k"] == [1, 2, "E", 3, 4, 5, "E", 6]
    assert find(h.streams, 0, b"k") == slot  # kept: records followed each end
    assert h.streams.steps[slot] == 1
    h.assert_settled()


def test_control_only_end_for_an_unknown_stream() -> None:
    h = Harness()
    h.add(b"k", [], end=True)
    assert h.sched.inflight == 1
    h.drain()
    assert h.trace[b"k"] == ["E"] and h.streams.active == 0
    h.assert_settled()


def test_max_batch_is_respected_and_every_stream_gets_its_turn() -> None:
    h = Harness(max_batch=4)
    keys = [f"k{i}".encode() for i in range(10)]
    for k in keys:
        h.add(k, [0, 1, 2])
    h.drain()
    sizes = [sum(g.size for g in groups) for groups in h.rounds]
    assert max(sizes) == 4
    served: set[bytes] = set()
    for groups in h.rounds[:3]:  # round robin: three rounds of four cover all ten streams
        served |= {h.streams.keys[s] or b"" for g in groups for s in g.slots}
    assert served == set(keys)
    assert all(h.trace[k] == [0, 1, 2] for k in keys)
    h.assert_settled()


def test_inflight_and_busy_track_unapplied_steps_and_controls() -> None:
    h = Harness(max_chunk=2)
    h.add(b"a", [1, 2, 3], reset=True)
    h.add(b"b", [1], end=True)
    assert h.sched.inflight == 4 + 2
    a, b = find(h.streams, 0, b"a"), find(h.streams, 0, b"b")
    assert (h.streams.busy[a], h.streams.busy[b]) == (4, 2)
    assert pending_steps(h, a) == 3
    groups = h.plan()  # reset applied at once, 2 steps of a and 1 of b taken (not yet applied)
    assert h.sched.inflight == 5 and h.streams.busy[a] == 3
    h.complete(groups)
    assert h.sched.inflight == 2 and h.streams.busy[a] == 1 and pending_steps(h, a) == 1
    h.drain()
    h.assert_settled()


def test_drop_partition_forgets_queued_work() -> None:
    h = Harness()
    r1 = h.add(b"a", [1, 2], partition=1)
    h.add(b"b", [1], partition=2)
    r2 = h.add(b"c", [1, 2, 3], partition=1)
    dropped = h.sched.drop_partition(1)
    assert dropped == [r1, r2]
    assert h.sched.inflight == 1
    h.drain()
    assert set(h.trace) == {b"b"}


@pytest.mark.parametrize("seed", range(6))
def test_random_interleavings_match_the_per_key_reference(seed: int) -> None:
    """Random records (1..5 steps, random resets/ends) for 30 keys, arriving between and during rounds."""
    rng = random.Random(seed)
    h = Harness(max_batch=rng.choice([3, 16, 64]), max_chunk=rng.choice([1, 2, 4, 8]), capacity=64)
    keys = [f"k{i}".encode() for i in range(30)]
    sent: dict[bytes, list[tuple[list, bool, bool]]] = defaultdict(list)
    counter = 0
    pending = []
    for _ in range(400):
        key = rng.choice(keys)
        n = rng.randint(0, 5)
        reset = rng.random() < 0.12 or (n == 0 and rng.random() < 0.5)
        end = not reset and (rng.random() < 0.08 or n == 0)
        steps = list(range(counter, counter + n))
        counter += n
        pending.append((key, steps, reset, end))
        sent[key].append((steps, reset, end))
    while pending or h.sched.ready:
        for _ in range(rng.randint(0, 12)):
            if pending:
                h.add(*pending.pop(0))
        groups = h.plan()
        for _ in range(rng.randint(0, 3)):  # records that arrive while the model runs
            if pending:
                h.add(*pending.pop(0))
        h.complete(groups)
    for key in keys:
        assert h.trace.get(key, []) == expected_trace(sent[key]), key
    h.assert_settled()


def test_as_array_shapes() -> None:
    x = as_array([[1, 2], [3, 4], [5, 6], [7, 8]], 2, 2, numeric=True)
    assert x.dtype == np.float32 and x.shape == (2, 2, 2)
    np.testing.assert_array_equal(x[1, 0], [5, 6])
    ids = as_array([1, 2, 3, 4, 5, 6], 3, 2, numeric=False)
    assert ids.dtype == np.int64 and ids.tolist() == [[1, 2], [3, 4], [5, 6]]


def test_a_round_is_held_to_its_step_budget_and_the_rest_follows_in_order() -> None:
    """A backlog larger than a round's step budget runs over several rounds, none above the budget
    and each as full as the next chunk allows; the streams left over go first in the next round,
    and every stream still sees its steps in order (the harness checks continuity)."""
    h = Harness(max_batch=64, max_chunk=8, capacity=256, max_steps=100)
    rng = random.Random(3)
    sent: dict[bytes, list] = defaultdict(list)
    for i in range(400):
        key = f"k{rng.randrange(60)}".encode()
        steps = [[float(i * 10 + j)] for j in range(rng.choice((1, 3, 8)))]
        sent[key] += [s for s in steps]
        h.add(key, steps)
    order: list[list[int]] = []
    while h.sched.ready:
        first = list(h.sched.ready)
        groups = h.plan()
        steps = sum(g.size * g.t for g in groups)
        assert steps <= 100
        assert steps > 100 - 8 or not h.sched.ready or len(first) == sum(g.size for g in groups), steps
        # oldest first: the round took a prefix of the streams that were ready
        taken = [slot for g in groups for slot in g.slots]
        assert sorted(taken) == sorted(first[:len(taken)])
        order.append(taken)
        h.complete(groups)
    assert len(order) > 1
    assert {k: [x for x in v if x not in ("R", "E")] for k, v in h.trace.items()} == dict(sent)
    h.assert_settled()
