"""The daemon in-process, with fake Kafka clients: the checkpoint's order and guards, revocation under a call,
and exactly-once's transactions (their content, an aborted one's recovery, fencing).

The real ``Daemon``, ``Pipeline`` and a real trained bundle (the product recipe); only the
Kafka clients are fakes, handed to the daemon through its client factory. Every call that
matters for delivery — a send to the sink, a flush and what it acknowledged, a commit, a
partition's streams dropped, a model call's start and end — goes into one list in the order
it happened, and the tests read the order off that list. The real-broker tests
(test_daemon_e2e.py, test_durability.py) show the same guarantees end to end; these show
which step of the daemon provides each.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson
import pytest
from aiokafka import TopicPartition

from rnnd.daemon.config import ServeConfig
from rnnd.daemon.service import Daemon, checkpoint, rebalance

IN, OUT = "in", "out"
TP0 = TopicPartition(IN, 0)
#: A commit or a flush waits for the broker, as the real ones do: other tasks run meanwhile.
ROUND_TRIP_S = 0.01


class Fetched(NamedTuple):
    """A fetched record, with the attributes of aiokafka's ConsumerRecord that the daemon reads."""

    key: bytes | None
    value: bytes | None
    offset: int
    timestamp: int


class FakeConsumer:
    """The group member: records the daemon's commits; its assignment is changed by the test."""

    def __init__(self, log: list[tuple]) -> None:
        self.log = log
        self.listener: Any = None
        self.queued: dict[TopicPartition, list[Fetched]] = {}
        self.high: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        self.commits: list[dict[int, int]] = []
        self.fed = asyncio.Event()

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    def assignment(self) -> set[TopicPartition]:
        return {TP0}  # what the tests assign (``started``)

    def feed(self, tp: TopicPartition, values: list[tuple[bytes, bytes]]) -> None:
        start = self.high.get(tp, 0)
        records = [Fetched(k, v, start + i, int(time.time() * 1000)) for i, (k, v) in enumerate(values)]
        self.queued.setdefault(tp, []).extend(records)
        self.high[tp] = start + len(records)
        self.fed.set()

    async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        ready = {tp: recs for tp, recs in self.queued.items() if recs and tp not in self.paused}
        if not ready:
            self.fed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.fed.wait(), timeout_ms / 1000)
            return {}
        for tp in ready:
            self.queued[tp] = []
        return ready

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.log.append(("seek", tp.partition, offset))

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)

    async def commit(self, offsets: dict) -> None:
        await asyncio.sleep(ROUND_TRIP_S)
        committed = {tp.partition: meta.offset for tp, meta in offsets.items()}
        self.commits.append(committed)
        self.log.append(("commit", committed))

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.high.get(tp)

    def last_stable_offset(self, tp: TopicPartition) -> int | None:
        return self.high.get(tp)

    async def position(self, tp: TopicPartition) -> int:
        return 0


class FakeReader:
    """The changelog restorer: an empty changelog (each partition ends at 0 and is read to there)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def assign(self, tps: list) -> None: ...

    async def seek_to_beginning(self, *tps: Any) -> None: ...

    async def getmany(self, *tps: Any, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        return {}

    def highwater(self, tp: Any) -> int:
        return 0

    def last_stable_offset(self, tp: Any) -> int:
        return 0

    async def position(self, tp: Any) -> int:
        return 0


class FakeSink:
    """``kafka.Sink``'s contract: ``flush`` returns once everything sent before it is acknowledged, or
    False when ``stopping()`` turns true first; unacknowledged records stay for the next flush.

    ``fail_flushes``: which flushes (counted from 1) find the broker not acknowledging; each of
    them waits for ``stopping()``, as the real one does, and returns False.
    """

    def __init__(self, log: list[tuple]) -> None:
        self.log = log
        self.pending: list[tuple[str, bytes | None, bytes | None]] = []
        self.acked: list[tuple[str, bytes | None, bytes | None]] = []
        self.flushes = 0
        self.fail_flushes: set[int] = set()
        self.last_error: BaseException | None = None

    async def send_many(self, topic: str, items, partitions=None, headers=None, sources=None) -> None:
        if not items:
            return
        self.pending += [(topic, item[0], item[1]) for item in items]
        self.log.append(("send", topic, len(items)))

    async def flush(self, stopping: Callable[[], bool] = lambda: False) -> bool:
        self.flushes += 1
        if self.flushes in self.fail_flushes:
            while not stopping():
                await asyncio.sleep(0.005)
            self.log.append(("flush", False, {}))
            return False
        await asyncio.sleep(ROUND_TRIP_S)
        acked: dict[str, int] = {}
        for topic, _, _ in self.pending:
            acked[topic] = acked.get(topic, 0) + 1
        self.acked += self.pending
        self.pending = []
        self.log.append(("flush", True, acked))
        return True

    def outputs(self) -> list[dict]:
        return [orjson.loads(v) for t, _, v in self.pending + self.acked if t == OUT]


class FakeClients:
    """The daemon's client factory, making the fakes above and keeping them for the test: ``group``
    (the consumer), ``out`` (the sink), ``log`` (what happened, in order)."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.group = FakeConsumer(self.log)
        self.out = FakeSink(self.log)

    async def ensure_topics(self, cfg, input_topic, outputs, configs, copartitioned) -> int:
        return 1

    def producer(self, cfg: ServeConfig) -> Any:
        return FakeReader()  # start/stop is all the daemon asks of it; the sink stands in for the rest

    def consumer(self, cfg: ServeConfig, group_id: str) -> FakeConsumer:
        return self.group

    def restorer(self, cfg: ServeConfig) -> FakeReader:
        return FakeReader()

    def sink(self, producer: Any, on_error: Callable[[], None]) -> FakeSink:
        return self.out

    async def broker_answers(self, producer: Any, timeout: float) -> bool:
        return True


class HeldCalls:
    """Wraps ``pipeline.execute`` (which runs on the worker thread): each model call waits until released."""

    def __init__(self, log: list[tuple], execute: Callable) -> None:
        self.log = log
        self.execute = execute
        self.gate = threading.Semaphore(0)
        self.started = self.ended = self.released = 0

    def __call__(self, calls: list) -> list:
        self.started += 1
        self.log.append(("call", "start"))
        assert self.gate.acquire(timeout=20), "a model call was never released"
        try:
            return self.execute(calls)
        finally:
            self.ended += 1
            self.log.append(("call", "end"))

    def release_waiting(self) -> None:
        if self.started > self.released:
            self.released += 1
            self.gate.release()


def make_daemon(bundle, fakes: FakeClients, **settings: Any) -> Daemon:
    cfg = ServeConfig(model=str(bundle), bootstrap_servers="fake:9092", input_topic=IN, output_topic=OUT,
                      http_host="127.0.0.1", http_port=0, commit_interval_s=3600, **settings).validate()
    daemon = Daemon(cfg, clients=fakes)
    revoke = daemon.pipeline.revoke

    def logged_revoke(partition: int) -> int:
        fakes.log.append(("revoke", partition))
        return revoke(partition)

    daemon.pipeline.revoke = logged_revoke  # type: ignore[method-assign]
    return daemon


async def until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def started(daemon: Daemon, fakes: FakeClients) -> asyncio.Task:
    """The daemon running, connected, and assigned partition 0 of the input."""
    run = asyncio.create_task(daemon.run(install_signals=False))
    await until(lambda: fakes.group.listener is not None and daemon.readiness.connected)
    await fakes.group.listener.on_partitions_assigned({TP0})
    await until(daemon.is_ready)
    return run


async def stopped(daemon: Daemon, run: asyncio.Task) -> None:
    daemon.stop()
    assert await asyncio.wait_for(run, 30) == 0


def values(key: bytes, *xs: float) -> list[tuple[bytes, bytes]]:
    return [(key, orjson.dumps({"x": [x]})) for x in xs]


def since(log: list[tuple], mark: int, *kinds: str) -> list[tuple]:
    return [e for e in log[mark:] if e[0] in kinds]


def test_a_checkpoint_acknowledges_outputs_then_changelog_then_commits(recipe_bundle) -> None:
    """Steps 3 → 4 → 5 → 6: the commit comes after the changelog is acknowledged, which comes after
    every output (predictions and dead letters) is; the commit is the offset after the last input."""
    fakes = FakeClients()

    async def scenario() -> None:
        daemon = make_daemon(recipe_bundle("product"), fakes)
        run = await started(daemon, fakes)
        fakes.group.feed(TP0, [*values(b"a", 0.5, 0.25), (b"bad", b"not json"), *values(b"b", 1.0),
                                  *values(b"c", -1.0, 2.0)])
        await until(lambda: len(fakes.out.outputs()) == 5 and not daemon.pipeline.busy())
        mark = len(fakes.log)
        await daemon.checkpointer.checkpoint()
        assert since(fakes.log, mark, "send", "flush", "commit") == [
            ("flush", True, {OUT: 5, f"{IN}.dlq": 1}),
            ("send", daemon.changelog_topic, 3),
            ("flush", True, {daemon.changelog_topic: 3}),
            ("commit", {0: 6}),
        ]
        changelog = sorted(k for t, k, _ in fakes.out.acked if t == daemon.changelog_topic)
        assert changelog == [b"a", b"b", b"c"]
        await stopped(daemon, run)

    asyncio.run(scenario())


def test_nothing_is_committed_after_a_failed_flush(recipe_bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush that is not acknowledged ends the checkpoint there: outputs unacknowledged → no
    changelog records and no commit; changelog unacknowledged → no commit. The next checkpoint
    acknowledges what was left and commits."""
    monkeypatch.setattr(checkpoint, "FINAL_CHECKPOINT_S", 0.05)  # how long a final checkpoint waits for acks
    fakes = FakeClients()
    sink, consumer = fakes.out, fakes.group

    async def scenario() -> None:
        daemon = make_daemon(recipe_bundle("product"), fakes)
        run = await started(daemon, fakes)
        consumer.feed(TP0, [*values(b"a", 0.5, 0.25), *values(b"b", 1.0)])
        await until(lambda: len(sink.outputs()) == 3 and not daemon.pipeline.busy())

        # The outputs' flush is not acknowledged: nothing of the changelog is sent, nothing committed.
        mark = len(fakes.log)
        sink.fail_flushes = {sink.flushes + 1}
        await daemon.checkpointer.checkpoint(final=True)
        assert since(fakes.log, mark, "send", "flush", "commit") == [("flush", False, {})]
        assert consumer.commits == []
        # The next checkpoint acknowledges the outputs, then the changelog, then commits.
        mark = len(fakes.log)
        await daemon.checkpointer.checkpoint()
        assert since(fakes.log, mark, "send", "flush", "commit") == [
            ("flush", True, {OUT: 3}),
            ("send", daemon.changelog_topic, 2),
            ("flush", True, {daemon.changelog_topic: 2}),
            ("commit", {0: 3}),
        ]

        # The changelog's flush is not acknowledged: no commit.
        consumer.feed(TP0, values(b"a", 0.75) + values(b"c", 0.125))
        await until(lambda: len(sink.outputs()) == 5 and not daemon.pipeline.busy())
        mark = len(fakes.log)
        sink.fail_flushes = {sink.flushes + 2}
        await daemon.checkpointer.checkpoint(final=True)
        assert since(fakes.log, mark, "send", "flush", "commit") == [
            ("flush", True, {OUT: 2}),
            ("send", daemon.changelog_topic, 2),
            ("flush", False, {}),
        ]
        assert consumer.commits == [{0: 3}]
        # The next checkpoint has no new state to write; its flush acknowledges the records the
        # last one left, and only then does it commit.
        mark = len(fakes.log)
        await daemon.checkpointer.checkpoint()
        assert since(fakes.log, mark, "send", "flush", "commit") == [
            ("flush", True, {daemon.changelog_topic: 2}),
            ("commit", {0: 5}),
        ]
        await stopped(daemon, run)

    asyncio.run(scenario())


def test_model_calls_go_on_while_a_periodic_checkpoint_flushes(recipe_bundle) -> None:
    """Step 4 (the outputs' flush, a produce round trip or more) runs without the call lock: a step
    fed while the flush waits is applied and its output sent before the flush returns. It is not
    in this checkpoint: the changelog records were taken at the snapshot (stream a only) and the
    commit is the snapshot's (the offset after a's input)."""
    fakes = FakeClients()
    sink, consumer = fakes.out, fakes.group

    async def scenario() -> None:
        daemon = make_daemon(recipe_bundle("product"), fakes)
        run = await started(daemon, fakes)
        consumer.feed(TP0, values(b"a", 0.5))
        await until(lambda: len(sink.outputs()) == 1 and not daemon.pipeline.busy())
        flush = sink.flush
        fed = False

        async def flush_while_b_arrives(stopping: Callable[[], bool] = lambda: False) -> bool:
            nonlocal fed
            if not fed:
                fed = True
                consumer.feed(TP0, values(b"b", 0.25))
                await until(lambda: len(sink.outputs()) == 2, timeout=10)  # b's call ran meanwhile
            return await flush(stopping)

        sink.flush = flush_while_b_arrives  # type: ignore[method-assign]
        mark = len(fakes.log)
        await daemon.checkpointer.checkpoint()
        assert since(fakes.log, mark, "send", "flush", "commit") == [
            ("send", OUT, 1),  # b's output, during the flush
            ("flush", True, {OUT: 2}),
            ("send", daemon.changelog_topic, 1),  # a's state only
            ("flush", True, {daemon.changelog_topic: 1}),
            ("commit", {0: 1}),
        ]
        assert [k for t, k, _ in sink.acked if t == daemon.changelog_topic] == [b"a"]
        await stopped(daemon, run)

    asyncio.run(scenario())


async def revoke_during_a_held_call(daemon: Daemon, fakes: FakeClients) -> HeldCalls:
    """Three inputs of one stream (one step per call: max_chunk=1); the first call is held while
    the partition is revoked; then each call is released as it starts, until the revocation is done."""
    held = HeldCalls(fakes.log, daemon.pipeline.execute)
    daemon.pipeline.execute = held  # type: ignore[method-assign]
    fakes.group.feed(TP0, values(b"a", 0.5, 0.25, 1.0))
    await until(lambda: held.started == 1)
    revoking = asyncio.create_task(fakes.group.listener.on_partitions_revoked({TP0}))
    await asyncio.sleep(0.3)
    # The call is running: the revocation waits, whatever its budget. Nothing is dropped or committed.
    assert not revoking.done()
    assert since(fakes.log, 0, "revoke", "commit") == []
    assert daemon.pipeline.streams.active == 1
    while not revoking.done():
        held.release_waiting()
        await asyncio.sleep(0.01)
    await revoking
    return held


def calls_running_at(log: list[tuple], entry: tuple) -> int:
    before = log[: log.index(entry)]
    return before.count(("call", "start")) - before.count(("call", "end"))


def log_intake_and_rounds(daemon: Daemon, log: list[tuple], after_slice: Callable[[int], None] = lambda n: None,
                          ) -> None:
    """Log each slice the fetcher took in (when it is in), each round's plan and finish (the three run
    on the event loop, so the log has them in the order the loop ran them), and each model call's
    end (on the worker thread: when the call ended). ``after_slice(k)`` runs after the k-th slice."""
    pipeline = daemon.pipeline
    accept, plan, execute, finish = pipeline.accept_many, pipeline.plan, pipeline.execute, pipeline.finish
    slices = 0

    def logged_accept(partition: int, records: Any) -> int:
        nonlocal slices
        taken = accept(partition, records)
        slices += 1
        log.append(("accept", taken))
        after_slice(slices)
        return taken

    def logged_plan() -> list:
        calls = plan()
        log.append(("plan", sum(c.group.size * c.group.t for c in calls)))
        return calls

    def logged_execute(calls: list) -> list:
        done = execute(calls)
        log.append(("call-end",))
        return done

    def logged_finish(calls: list) -> list:
        log.append(("finish", len(calls)))
        return finish(calls)

    pipeline.accept_many = logged_accept  # type: ignore[method-assign]
    pipeline.plan = logged_plan  # type: ignore[method-assign]
    pipeline.execute = logged_execute  # type: ignore[method-assign]
    pipeline.finish = logged_finish  # type: ignore[method-assign]


def test_a_backlog_is_taken_in_slices_with_model_rounds_between(recipe_bundle) -> None:
    """Fair scheduling: one fetch of 6,000 records (3,000 streams) is decoded and queued at most
    ``INTAKE_SLICE`` records at a time; the first round is planned right after the first slice; a
    model call that ends while the rest is taken in is finished (its outputs encoded and sent)
    after at most two more slices, not after the whole backlog.

    So that a call does end mid-intake whatever the machine's speed, the second slice waits
    (blocking the loop, as slow work would) until the first call has ended."""
    from rnnd.daemon.service.budgets import INTAKE_SLICE

    fakes = FakeClients()
    n = 6000
    call_ended = threading.Event()

    def after_slice(k: int) -> None:
        if k == 2:
            assert call_ended.wait(20), "the first model call never ended"

    async def scenario() -> None:
        daemon = make_daemon(recipe_bundle("product"), fakes)
        log_intake_and_rounds(daemon, fakes.log, after_slice)
        execute = daemon.pipeline.execute

        def signalled(calls: list) -> list:
            done = execute(calls)
            call_ended.set()
            return done

        daemon.pipeline.execute = signalled  # type: ignore[method-assign]
        run = await started(daemon, fakes)
        mark = len(fakes.log)
        fakes.group.feed(TP0, [(f"k{i % 3000}".encode(), orjson.dumps({"x": [i / n]})) for i in range(n)])
        await until(lambda: len(fakes.out.outputs()) == n and not daemon.pipeline.busy())
        events = since(fakes.log, mark, "accept", "plan", "call-end", "finish")
        accepted = [e[1] for e in events if e[0] == "accept"]
        assert sum(accepted) == n and max(accepted) <= INTAKE_SLICE < n
        assert [e[0] for e in events[:2]] == ["accept", "plan"], events[:3]  # a round starts on the first slice
        last_accept = max(i for i, e in enumerate(events) if e[0] == "accept")
        ends = [i for i, e in enumerate(events[:last_accept]) if e[0] == "call-end"]
        assert ends, "no model call ended while the backlog was taken in"
        for i in ends:
            finish = next(j for j in range(i, len(events)) if events[j][0] == "finish")
            waited = sum(e[1] for e in events[i:finish] if e[0] == "accept")
            assert waited <= 2 * INTAKE_SLICE, (waited, events[i:finish])
        await stopped(daemon, run)

    asyncio.run(scenario())


def test_a_fetch_taken_away_mid_intake_is_not_taken_in_further(recipe_bundle) -> None:
    """A rebalance that takes the partition away between two slices of a fetch, and gives it back,
    ends that fetch's intake: its rest belongs to the partition's re-read from the restored
    position, not to this stale list (taken in, it would run ahead of steps still to be re-read)."""
    from rnnd.daemon.service.budgets import INTAKE_SLICE

    fakes = FakeClients()
    daemon_ref: list[Daemon] = []

    def after_slice(k: int) -> None:
        if k == 2:  # what the rebalancer does to the shared assignment: revoked, then assigned again
            daemon_ref[0].assigned.take_away({TP0})
            daemon_ref[0].assigned.add(TP0)

    async def scenario() -> None:
        daemon = make_daemon(recipe_bundle("product"), fakes)
        daemon_ref.append(daemon)
        log_intake_and_rounds(daemon, fakes.log, after_slice)
        run = await started(daemon, fakes)
        fakes.group.feed(TP0, [(b"k", orjson.dumps({"x": [i / 100]})) for i in range(5 * INTAKE_SLICE)])
        await until(lambda: len(since(fakes.log, 0, "accept")) >= 2 and not daemon.pipeline.busy())
        await asyncio.sleep(0.2)  # time for a wrong third slice to show up
        assert since(fakes.log, 0, "accept") == [("accept", INTAKE_SLICE)] * 2
        fakes.group.feed(TP0, [(b"k", orjson.dumps({"x": [0.5]}))])  # the next fetch is taken in
        await until(lambda: len(since(fakes.log, 0, "accept")) == 3)
        await stopped(daemon, run)

    asyncio.run(scenario())


def test_a_revocation_finishes_the_partitions_steps_then_checkpoints_then_drops(recipe_bundle) -> None:
    """A revocation during a model call waits for that call and for the partition's queued steps,
    has their outputs acknowledged and their offsets committed, and only then drops the streams."""
    fakes = FakeClients()

    async def scenario() -> None:
        daemon = make_daemon(recipe_bundle("product"), fakes, max_chunk=1)
        run = await started(daemon, fakes)
        await revoke_during_a_held_call(daemon, fakes)
        log = fakes.log
        assert since(log, 0, "call", "send", "flush", "commit", "revoke") == [
            ("call", "start"), ("call", "end"), ("send", OUT, 1),
            ("call", "start"), ("call", "end"), ("send", OUT, 1),
            ("call", "start"), ("call", "end"), ("send", OUT, 1),
            ("flush", True, {OUT: 3}),
            ("send", daemon.changelog_topic, 1),
            ("flush", True, {daemon.changelog_topic: 1}),
            ("commit", {0: 3}),
            ("revoke", 0),
        ]
        assert daemon.pipeline.streams.active == 0 and not daemon.assigned
        await stopped(daemon, run)

    asyncio.run(scenario())


def test_a_revocation_past_its_budget_still_waits_for_the_running_call(recipe_bundle,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With the wait for queued steps cut short, the call lock still keeps the revocation from
    checkpointing or dropping streams under a running call: the held call's output is
    acknowledged and its input committed before the drop; the steps not yet run are left (not
    committed) for the partition's next owner."""
    monkeypatch.setattr(rebalance, "REVOCATION_WAIT_S", 0.05)
    fakes = FakeClients()

    async def scenario() -> None:
        daemon = make_daemon(recipe_bundle("product"), fakes, max_chunk=1)
        run = await started(daemon, fakes)
        await revoke_during_a_held_call(daemon, fakes)
        log = fakes.log
        first_output = log.index(("send", OUT, 1))
        commit = log.index(("commit", {0: 1}))
        acked = [e for e in log[first_output:commit] if e[0] == "flush"]
        assert acked and acked[0] == ("flush", True, {OUT: 1})
        assert fakes.group.commits == [{0: 1}]
        assert log.index(("revoke", 0)) > commit
        assert calls_running_at(log, ("revoke", 0)) == 0
        assert daemon.pipeline.streams.active == 0 and not daemon.assigned
        await stopped(daemon, run)

    asyncio.run(scenario())


# --- exactly-once: one transaction per input partition -----------------------------------------------

class FakeTxnProducer:
    """One input partition's transactional producer: what it was asked, in the shared log.

    A commit makes its partition sink's records "committed" (what a read_committed reader
    would see) and its offset the group's committed offset; ``fakes.fail_commits[p]`` makes
    the partition's next commit raise that error instead, as a broker would.
    """

    def __init__(self, fakes: TxnFakes, transactional_id: str) -> None:
        self.fakes = fakes
        self.partition = int(transactional_id.rsplit(".", 1)[-1]) if transactional_id[-1].isdigit() else -1
        self.sink: FakeSink | None = None
        self.offset: int | None = None
        self.open = False

    @property
    def _txn_manager(self) -> Any:  # what quirks.in_transaction reads
        producer = self

        class Manager:
            def is_in_transaction(self) -> bool:
                return producer.open

        return Manager()

    async def start(self) -> None:
        self.fakes.log.append(("txn-start", self.partition))

    async def begin_transaction(self) -> None:
        self.open = True

    async def send_offsets_to_transaction(self, offsets: dict, group_id: str) -> None:
        [(_, self.offset)] = offsets.items()

    async def commit_transaction(self) -> None:
        await asyncio.sleep(ROUND_TRIP_S)
        if self.fakes.hang_commits:  # a broker that never answers
            await asyncio.Event().wait()
        error = self.fakes.fail_commits.pop(self.partition, None)
        if error is not None:
            raise error
        assert self.sink is not None
        self.fakes.committed += self.sink.acked
        self.sink.acked = []
        if self.offset is not None:
            self.fakes.group.committed_offsets[self.partition] = self.offset
        self.fakes.log.append(("txn-commit", self.partition, self.offset))
        self.offset, self.open = None, False

    async def abort_transaction(self) -> None:
        self.fakes.log.append(("txn-abort", self.partition))
        self.open = False

    async def stop(self) -> None: ...


class CommittedReader(FakeReader):
    """The changelog restorer over what committed transactions wrote to the changelog."""

    def __init__(self, fakes: TxnFakes) -> None:
        self.fakes = fakes
        self.read: dict[Any, int] = {}

    def _records(self, tp: Any) -> list[Fetched]:
        topic = tp.topic
        rows = [(k, v) for t, k, v in self.fakes.committed if t == topic]
        return [Fetched(k, v, i, 0) for i, (k, v) in enumerate(rows)]

    def assign(self, tps: list) -> None:
        self.read = dict.fromkeys(tps, 0)

    async def getmany(self, *tps: Any, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        out = {}
        for tp in tps:
            recs = self._records(tp)[self.read[tp]:]
            if recs:
                out[tp] = recs
                self.read[tp] += len(recs)
        return out

    def highwater(self, tp: Any) -> int:
        return len(self._records(tp))

    def last_stable_offset(self, tp: Any) -> int:
        return len(self._records(tp))

    async def position(self, tp: Any) -> int:
        return self.read.get(tp, 0)


class TxnFakes(FakeClients):
    """The factory for exactly-once: transactional producers, a sink per partition, a consumer that re-reads."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_commits: dict[int, BaseException] = {}
        self.hang_commits = False
        self.committed: list[tuple[str, bytes | None, bytes | None]] = []
        self.group.history = {}
        self.group.committed_offsets = {}
        feed, seek = self.group.feed, self.group.seek

        def remembering_feed(tp: TopicPartition, values: list[tuple[bytes, bytes]]) -> None:
            feed(tp, values)
            self.group.history.setdefault(tp, []).extend(self.group.queued[tp][-len(values):])

        def rereading_seek(tp: TopicPartition, offset: int) -> None:
            seek(tp, offset)
            self.group.queued[tp] = list(self.group.history.get(tp, [])[offset:])
            self.group.fed.set()

        async def committed(tp: TopicPartition) -> int | None:
            return self.group.committed_offsets.get(tp.partition)

        self.group.feed, self.group.seek, self.group.committed = remembering_feed, rereading_seek, committed
        self.sinks: dict[int, FakeSink] = {}

    def transactional_producer(self, cfg: ServeConfig, transactional_id: str) -> FakeTxnProducer:
        return FakeTxnProducer(self, transactional_id)

    def sink(self, producer: Any, on_error: Callable[[], None]) -> FakeSink:
        sink = FakeSink(self.log)
        producer.sink = self.sinks[producer.partition] = sink
        return sink

    def restorer(self, cfg: ServeConfig) -> FakeReader:
        return CommittedReader(self)

    def committed_outputs(self) -> list[dict]:
        return [orjson.loads(v) for t, _, v in self.committed if t == OUT]


def test_exactly_once_commits_a_partitions_outputs_state_and_offset_in_one_transaction(recipe_bundle) -> None:
    """Dead letters and state records join the outputs in the partition's transaction; the offset is
    committed with it (never by the consumer), and nothing is visible before the commit."""
    fakes = TxnFakes()

    async def scenario() -> None:
        daemon = make_daemon(recipe_bundle("product"), fakes, processing_guarantee="exactly_once")
        run = await started(daemon, fakes)
        assert ("txn-start", -1) in fakes.log  # the probe, before any partition's producer
        assert fakes.log.index(("txn-start", 0)) < len(fakes.log)
        fakes.group.feed(TP0, [*values(b"a", 0.5, 0.25), (b"bad", b"not json"), *values(b"b", 1.0),
                               *values(b"c", -1.0, 2.0)])
        await until(lambda: len(fakes.sinks[0].outputs()) == 5 and not daemon.pipeline.busy())
        assert fakes.committed == []
        mark = len(fakes.log)
        await daemon.checkpointer.checkpoint()
        assert since(fakes.log, mark, "send", "flush", "commit", "txn-commit") == [
            ("send", f"{IN}.dlq", 1),
            ("send", daemon.changelog_topic, 3),
            ("flush", True, {OUT: 5, f"{IN}.dlq": 1, daemon.changelog_topic: 3}),
            ("txn-commit", 0, 6),
        ]
        assert fakes.group.commits == []
        assert len(fakes.committed_outputs()) == 5
        assert daemon.metrics.registry.get_sample_value("rnnd_transactions_total", {"outcome": "committed"}) == 1
        await stopped(daemon, run)

    asyncio.run(scenario())


async def two_outputs_in_a_transaction(bundle: Any, fakes: TxnFakes) -> tuple[Daemon, asyncio.Task]:
    """An exactly-once daemon on partition 0 that has made two outputs, not yet committed."""
    daemon = make_daemon(bundle, fakes, processing_guarantee="exactly_once")
    run = await started(daemon, fakes)
    fakes.group.feed(TP0, values(b"a", 0.5, 0.25))
    await until(lambda: len(fakes.sinks[0].outputs()) == 2 and not daemon.pipeline.busy())
    return daemon, run


def test_an_unanswered_final_commit_does_not_hold_the_exit(recipe_bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly-once, and the broker never answers the shutdown's commit: the daemon gives up after
    FINAL_CHECKPOINT_S and exits 0, within the shutdown budget. Nothing of the open transaction is
    visible and the offset stays uncommitted, so the partition's next owner makes those outputs again."""
    monkeypatch.setattr(checkpoint, "FINAL_CHECKPOINT_S", 0.2)
    fakes = TxnFakes()

    async def scenario() -> None:
        daemon, run = await two_outputs_in_a_transaction(recipe_bundle("product"), fakes)
        fakes.hang_commits = True
        began = time.monotonic()
        daemon.stop()
        assert await asyncio.wait_for(run, 10) == 0
        assert time.monotonic() - began < 5
        assert fakes.committed == [] and fakes.group.committed_offsets.get(0) is None

    asyncio.run(scenario())


def test_a_failed_commit_is_aborted_and_the_partition_resumes_from_its_last_commit(recipe_bundle) -> None:
    """The second transaction's commit fails: the partition's streams are dropped, its transaction
    aborted, its producer started again, its state restored from the committed changelog and its
    input re-read from the committed offset. What the aborted transaction held is made again,
    identical, and committed once."""
    from aiokafka.errors import KafkaTimeoutError

    fakes = TxnFakes()

    async def scenario() -> None:
        daemon = make_daemon(recipe_bundle("product"), fakes, processing_guarantee="exactly_once")
        run = await started(daemon, fakes)
        fakes.group.feed(TP0, [*values(b"a", 0.5, 0.25), *values(b"b", 1.0)])
        await until(lambda: len(fakes.sinks[0].outputs()) == 3 and not daemon.pipeline.busy())
        await daemon.checkpointer.checkpoint()
        fakes.group.feed(TP0, [*values(b"a", 0.75), *values(b"c", 0.125)])
        await until(lambda: len(fakes.sinks[0].outputs()) == 2 and not daemon.pipeline.busy())  # uncommitted
        doomed = sorted((o["key"], o["step"], o["prediction"]["values"]) for o in fakes.sinks[0].outputs())
        mark = len(fakes.log)
        fakes.fail_commits[0] = KafkaTimeoutError()
        await daemon.checkpointer.checkpoint()
        await until(lambda: TP0 in daemon.assigned and len(fakes.sinks[0].outputs()) == 2  # a new producer's sink
                    and not daemon.pipeline.busy())
        assert since(fakes.log, mark, "revoke", "txn-abort", "txn-start", "seek") == [
            ("revoke", 0), ("txn-abort", 0), ("txn-start", 0), ("seek", 0, 3)]
        await daemon.checkpointer.checkpoint()
        outputs = fakes.committed_outputs()
        assert sorted((o["key"], o["step"]) for o in outputs) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("c", 0)]
        again = sorted((o["key"], o["step"], o["prediction"]["values"]) for o in outputs[3:])
        assert again == doomed  # the restored state made the same predictions
        assert daemon.metrics.registry.get_sample_value("rnnd_transactions_total", {"outcome": "aborted"}) == 1
        await stopped(daemon, run)

    asyncio.run(scenario())


def test_a_fenced_partition_is_left_to_its_new_owner(recipe_bundle) -> None:
    """ProducerFenced: another replica started the partition's producer (a rebalance this one has not
    seen yet). The partition is dropped and paused, and not started again here while the revocation
    may still come (two session timeouts); the revocation then ends the wait."""
    from aiokafka.errors import ProducerFenced

    fakes = TxnFakes()

    async def scenario() -> None:
        daemon, run = await two_outputs_in_a_transaction(recipe_bundle("product"), fakes)
        mark = len(fakes.log)
        fakes.fail_commits[0] = ProducerFenced()
        await daemon.checkpointer.checkpoint()
        await asyncio.sleep(0.2)
        assert since(fakes.log, mark, "revoke", "txn-start") == [("revoke", 0)]
        assert not daemon.assigned and TP0 in fakes.group.paused
        assert fakes.committed == []
        waiting = daemon.rebalancer._recovering[0]
        await fakes.group.listener.on_partitions_revoked({TP0})
        await asyncio.sleep(0)
        assert waiting.cancelled() and not daemon.rebalancer._recovering
        assert since(fakes.log, mark, "txn-start") == []
        await stopped(daemon, run)

    asyncio.run(scenario())


def test_a_reload_swaps_only_at_a_checkpoint_that_commits(recipe_bundle, upgrade_bundles, tmp_path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """While commits fail (a broker outage), a reload's checkpoints swap nothing and the old bundle keeps
    answering; the first one that commits swaps, under the call lock: every output before that commit
    is the old bundle's, every one after it the new one's."""
    import shutil

    from aiokafka.errors import KafkaConnectionError

    from rnnd.daemon.service import reload

    monkeypatch.setattr(reload, "RELOAD_RETRY_S", 0.05)
    v1, v2, _ = upgrade_bundles
    serving = tmp_path / "serving.onnx"
    shutil.copy(v1, serving)
    fakes = FakeClients()
    consumer, sink = fakes.group, fakes.out
    commit = consumer.commit
    failing = [True]

    async def flaky_commit(offsets: dict) -> None:
        if failing[0]:
            fakes.log.append(("commit failed",))
            raise KafkaConnectionError("broker away")
        await commit(offsets)

    consumer.commit = flaky_commit  # type: ignore[method-assign]

    async def scenario() -> None:
        daemon = make_daemon(serving, fakes, watch_model=False)
        run = await started(daemon, fakes)
        consumer.feed(TP0, values(b"a", 0.5, 0.25))
        await until(lambda: len(sink.outputs()) == 2 and not daemon.pipeline.busy())
        shutil.copy(v2, serving)
        swap = asyncio.create_task(daemon.reloader.reload("test"))
        await until(lambda: sum(e == ("commit failed",) for e in fakes.log) >= 3)
        consumer.feed(TP0, values(b"a", 0.125))  # answered meanwhile, by the old bundle
        await until(lambda: len(sink.outputs()) == 3)
        assert daemon.model.spec.model.ref == "product@1" and not swap.done()
        failing[0] = False
        outcome = await asyncio.wait_for(swap, 10)
        assert (outcome.result, outcome.serving) == ("swapped", "product@2")
        consumer.feed(TP0, values(b"a", 0.75))
        await until(lambda: len(sink.outputs()) == 4)
        assert sorted((o["offset"], o["model"]) for o in sink.outputs()) == [
            (0, "product@1"), (1, "product@1"), (2, "product@1"), (3, "product@2")]
        assert consumer.commits == [{0: 3}]  # the swap's commit: everything the old bundle applied
        assert daemon.metrics.reloads.labels("swapped")._value.get() == 1
        await stopped(daemon, run)

    asyncio.run(scenario())
