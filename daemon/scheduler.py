"""Cellular batching: which steps of which streams go into the next model call.

Each call advances many streams at once and never holds two steps of one stream side by
side (a stream's next step needs the state its previous step produced). A stream with a
backlog — a text message, or records that queued while the model was busy — runs several
steps as one T>1 chunk instead: one row of ``x[B, T, ...]``, which the fused RNN kernels
loop over far faster than T separate calls. Chunk lengths are powers of two so that one
round makes at most log2(max_chunk)+1 calls; what does not fit runs in the next round.

Dispatch is eager: ``next_batch`` is called whenever the model is free, so the batch grows
with load and a lone step is never held back waiting for company (unless max_wait_ms asks
for that, see ``service.loops.Inferrer``).

A round is also held to ``max_steps`` steps in all. Its outputs are encoded and handed to the
producer on the event loop, a few microseconds per step; an unbounded round over a backlog
(1024 streams × 64 steps) would hold the loop for about half a second, with no fetch, output
or /metrics answer meanwhile.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain, islice

import numpy as np

from .codec import Record
from .state import Streams

#: Most steps in one round (all its calls together). Finishing a round (scatter, encode, hand to
#: the producer) is ~8 µs of event-loop work per step, so 1,024 keep it near 10 ms. On the wide
#: backlog, 1,024 with the infer loop's yield between rounds took the max loop lag from 77 ms
#: (2,048, no yield) to 23 ms, and throughput did not drop. ONNX Runtime's fixed cost per call
#: (~30 µs) stays small next to a call's ~1 ms of work at this size. The price: a long-chunk
#: workload (50 text streams × 64 tokens) no longer fits one round (docs/benchmarks.md).
MAX_ROUND_STEPS = 1024


@dataclass
class Group:
    """One model call: B streams, T steps each."""

    t: int
    slots: list[int] = field(default_factory=list)
    rows: list = field(default_factory=list)  # B*T raw steps, row-major (stream, step)
    refs: list[tuple[Record, int]] = field(default_factory=list)  # (record, index in record) per step
    first_step: list[int] = field(default_factory=list)  # each stream's step count before this call

    @property
    def size(self) -> int:
        return len(self.slots)


class Scheduler:
    def __init__(self, streams: Streams, max_batch: int, max_chunk: int,
                 on_reset: Callable[[int, Record], None] | None = None,
                 on_end: Callable[[int, Record], None] | None = None, max_steps: int = MAX_ROUND_STEPS) -> None:
        self.streams = streams
        self.max_batch = max_batch
        self.max_chunk = max_chunk
        self.max_steps = max(max_steps, max_chunk)  # a stream's full chunk always fits
        self.queues: dict[int, deque[Record]] = {}
        self.ready: dict[int, None] = {}  # insertion-ordered set: streams with work, oldest first
        self.inflight = 0  # steps and controls accepted but not yet applied
        self.on_reset = on_reset
        self.on_end = on_end
        # Streams (re)started from a context this round, slot → context: the pipeline runs
        # init(context) for them before the round's calls (``Pipeline.execute``).
        self.starts: dict[int, list[float]] = {}

    def add(self, slot: int, record: Record) -> None:
        q = self.queues.get(slot)
        if q is None:
            q = self.queues[slot] = deque()
        q.append(record)
        self.streams.busy[slot] += record.remaining
        self.inflight += record.remaining
        self.ready[slot] = None

    def next_batch(self, limit: int | None = None) -> list[Group]:
        """Take work for the next round, for at most ``limit`` streams (default max_batch): groups keyed
        by chunk length T."""
        groups: dict[int, Group] = {}
        taken = steps_taken = 0
        ready, queues = self.ready, self.queues
        room = self.max_steps - self.max_chunk  # below it, the next stream's chunk still fits
        most = self.max_batch if limit is None else min(limit, self.max_batch)
        while taken < most and ready and steps_taken <= room:
            # Oldest first, no more than the batch can hold: the rest stay ready for the next round.
            for slot in list(islice(ready, most - taken)):
                if steps_taken > room:
                    break
                del ready[slot]
                q = queues[slot]
                self._apply_controls(slot, q)
                if not q:
                    del queues[slot]
                    continue
                t = self._take(slot, q, groups)
                if t:
                    taken += 1
                    steps_taken += t
        steps = self.streams.steps
        for g in groups.values():
            g.first_step = steps[g.slots].tolist()
        return list(groups.values())

    def _take(self, slot: int, q: deque[Record], groups: dict[int, Group]) -> int:
        head = q[0]
        available = len(head.steps) - head.cursor
        if len(q) > 1 and available < self.max_chunk and not head.end:
            for r in islice(q, 1, None):
                if r.reset:
                    break  # a reset cuts the chunk: the steps after it start from the initial state
                available += len(r.steps) - r.cursor
                if available >= self.max_chunk or r.end:
                    break  # an `end` control cuts the chunk: the steps after it belong to a new stream
        t = min(available, self.max_chunk)
        if t == 0:
            return 0
        t = 1 << (t.bit_length() - 1)
        g = groups.get(t)
        if g is None:
            g = groups[t] = Group(t)
        g.slots.append(slot)
        need = t
        rows, refs = g.rows, g.refs
        for r in q:
            c = r.cursor
            n = min(need, len(r.steps) - c)
            if n == 1:  # one step (T=1, or a backlog of one-step messages): the common case
                rows.append(r.steps[c])
                refs.append((r, c))
            elif n:
                rows.extend(r.steps[c:c + n])
                refs.extend([(r, i) for i in range(c, c + n)])
            r.cursor = c + n
            need -= n
            if need == 0:
                break
        return t

    def complete(self, group: Group) -> None:
        """The call for ``group`` ran and its state was scattered: account and re-queue.

        Vectorised over the group's streams: per step, only the record's countdown is touched.
        """
        t = group.t
        streams = self.streams
        slots = np.asarray(group.slots, dtype=np.int64)
        refs = group.refs
        for r, _ in refs:
            r.remaining -= 1
        last = refs if t == 1 else refs[t - 1::t]  # each stream's last step in this call
        streams.steps[slots] += t
        streams.busy[slots] -= t
        streams.last_offset[slots] = [r.offset for r, _ in last]
        streams.last_index[slots] = [i for _, i in last]
        streams.last_used[slots] = streams.clock()
        streams.dirty.update(group.slots)
        self.inflight -= t * len(group.slots)
        queues, ready = self.queues, self.ready
        for slot in group.slots:
            q = queues.get(slot)
            if q:
                # A record is done once its steps ran and no control of it is pending: a control-only
                # reset behind a backlog has no steps but must still be applied by _apply_controls.
                while q and q[0].cursor == len(q[0].steps) and not (q[0].end or q[0].reset):
                    q.popleft()
                if q:
                    ready[slot] = None
                else:
                    del queues[slot]

    def _apply_controls(self, slot: int, q: deque[Record]) -> None:
        """Controls at the head of the queue take effect now, in order with the steps."""
        while q:
            r = q[0]
            if r.reset and r.cursor == 0:
                r.reset = False
                self._done(slot, r)
                self.streams.reset(slot)
                if r.context is not None:
                    self.starts[slot] = r.context
                self.streams.applied(slot, r.offset, -1)
                if self.on_reset:
                    self.on_reset(slot, r)
            if r.cursor < len(r.steps):
                return
            if r.end:
                r.end = False
                self._done(slot, r)
                if self.on_end:
                    self.on_end(slot, r)
                q.popleft()
                if q:
                    self.streams.reset(slot)  # what follows starts a new stream under the same key
                    # index past the last step: the record's `end` is applied too (see changelog.py)
                    self.streams.applied(slot, r.offset, len(r.steps))
                else:
                    self.streams.release(slot, "end")
                continue
            q.popleft()

    def _done(self, slot: int, r: Record) -> None:
        r.remaining -= 1
        self.streams.busy[slot] -= 1
        self.inflight -= 1

    def drop_partition(self, partition: int) -> list[Record]:
        """Forget queued work of a revoked partition; return the records it held."""
        dropped = []
        for slot in [s for s in self.queues if int(self.streams.partition[s]) == partition]:
            q = self.queues.pop(slot)
            self.ready.pop(slot, None)
            for r in q:
                self.inflight -= r.remaining
                dropped.append(r)
        return dropped


def as_array(rows: list, b: int, t: int, numeric: bool) -> np.ndarray:
    if numeric:  # rows of equal length (the decoder checked each): read flat, 0.13 against 0.18 µs a row
        n = len(rows[0]) if rows else 0
        x = np.fromiter(chain.from_iterable(rows), dtype=np.float32, count=len(rows) * n)
        return x.reshape(b, t, n)
    return np.array(rows, dtype=np.int64).reshape(b, t)
