"""The serving hot path: the fetch loop (with backpressure) and the infer loop (with publishing).

* ``Fetcher``  Kafka → ``pipeline.accept_many`` (decode, queue); dead letters → their topic.
               Pauses fetching while too many steps wait (``Backpressure``).
* ``Inferrer`` ``pipeline.plan`` → ``execute`` on a worker thread → ``finish`` → outputs to the
               sink. Eager: runs whenever there is work, so batches grow with load.

The two share one event loop, and neither may hold it long: while one works, the other's
results wait, and so do the producer, the checkpoint and /metrics. So the fetcher takes a
fetch in slices of ``INTAKE_SLICE`` records and yields after each one (a model call that
finished meanwhile is finished and the next one started before the next slice); a round of
model calls is held to ``scheduler.MAX_ROUND_STEPS`` steps, and the infer loop yields between
finishing one round and planning the next. A slice or a half-round is ~5-15 ms of Python, and
a loop iteration runs every task's turn, so a timer waits at most a few of them:
``rnnd_event_loop_lag_seconds`` measures it (wide backlog on 2 cores: max ~25 ms; when a
backlog was taken in whole, an outside timeline saw /metrics unanswered for 1.4 s).

Everything here runs once per slice or per model call, never per message, except what
``accept_many`` does; the per-round work is written flat (locals bound before the loops).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from ..config import ServeConfig
from ..metrics import Metrics
from ..pipeline import Pipeline
from .budgets import FETCH_POLL_MS, FETCH_RETRY_S, INTAKE_SLICE, SLOT_WAIT_S
from .clients import Clients
from .housekeeping import Readiness
from .publish import Publisher

log = logging.getLogger("rnnd.daemon")


class Assignment(set[TopicPartition]):
    """The input partitions assigned and ready to serve (the rebalancer keeps it current, in place),
    and how often each has been taken away (revoked, or dropped after a failed transaction).

    A fetch is taken in slices, and the loop runs other tasks between them: a rebalance may
    take a partition away mid-fetch, and even give it back. The rest of that fetch then
    belongs to the partition's next owner (or to this member's own re-read, from its restored
    position), so the fetcher checks the count, not only membership, before each slice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.taken_away: dict[int, int] = {}

    def take_away(self, tps: set[TopicPartition] | list[TopicPartition]) -> None:
        self.difference_update(tps)
        for tp in tps:
            self.taken_away[tp.partition] = self.taken_away.get(tp.partition, 0) + 1


class Backpressure:
    """Pauses the assigned partitions above ``max_inflight_steps`` waiting steps, resumes them below half."""

    def __init__(self, cfg: ServeConfig, pipeline: Pipeline, metrics: Metrics, clients: Clients,
                 assigned: Assignment) -> None:
        self.limit = cfg.max_inflight_steps
        self.scheduler = pipeline.scheduler
        self.gauge = metrics.paused
        self.clients = clients
        self.assigned = assigned
        self.paused = False

    def check(self) -> None:
        inflight = self.scheduler.inflight
        if not self.paused and inflight > self.limit:
            self.clients.consumer.pause(*self.assigned)
            self.paused = True
            self.gauge.set(1)
        elif self.paused and inflight <= self.limit // 2:
            self.clients.consumer.resume(*self.assigned)
            self.paused = False
            self.gauge.set(0)


class Fetcher:
    def __init__(self, cfg: ServeConfig, pipeline: Pipeline, metrics: Metrics, clients: Clients,
                 backpressure: Backpressure, publisher: Publisher, readiness: Readiness,
                 assigned: Assignment, stopping: asyncio.Event, work: asyncio.Event) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.metrics = metrics
        self.clients = clients
        self.backpressure = backpressure
        self.publisher = publisher
        self.readiness = readiness
        self.assigned = assigned  # the rebalancer keeps it current
        self.stopping = stopping
        self.work = work  # set: the infer loop has something to do

    async def run(self) -> None:
        consumer = self.clients.consumer
        assert consumer is not None
        cfg = self.cfg
        messages = self.metrics.messages.labels(cfg.input_topic)
        accept = self.pipeline.accept_many
        stopping, work, assigned = self.stopping, self.work, self.assigned
        backpressure, readiness = self.backpressure, self.readiness
        send_dead_letters = not cfg.exactly_once
        while not stopping.is_set():
            backpressure.check()
            try:
                batches = await consumer.getmany(timeout_ms=FETCH_POLL_MS, max_records=cfg.fetch_max_records)
                readiness.kafka_ok = True
            except KafkaError as e:
                readiness.failed("fetch")
                log.warning("fetch failed (%s); retrying", e)
                await asyncio.sleep(FETCH_RETRY_S)
                continue
            if stopping.is_set():
                break  # not accepted, not committed: the next owner reads them
            taken_away = assigned.taken_away
            for tp, records in batches.items():
                if tp not in assigned:
                    # Fetched while the partition's state is still being restored: read it again later.
                    with contextlib.suppress(Exception):
                        consumer.seek(tp, records[0].offset)
                    continue
                owned = taken_away.get(tp.partition, 0)
                for start in range(0, len(records), INTAKE_SLICE):
                    if taken_away.get(tp.partition, 0) != owned:
                        break  # taken away meanwhile: the rest is read again by whoever owns it now
                    part = records[start:start + INTAKE_SLICE]
                    taken = accept(tp.partition, part)
                    while taken < len(part):
                        # All max_streams slots hold streams with queued steps: let the model work
                        # some off before a new stream can take (or evict) a slot.
                        work.set()
                        await asyncio.sleep(SLOT_WAIT_S)
                        if stopping.is_set():
                            return
                        taken += accept(tp.partition, part[taken:])
                    messages.inc(taken)
                    work.set()
                    if send_dead_letters:  # exactly-once: only the checkpoint sends them, inside its transactions
                        await self.publisher.send_side_outputs()
                    # Hand the loop on: the infer task finishes a call that ended meanwhile and starts
                    # the next on what was just accepted. getmany returns without suspending while
                    # fetched data is buffered, so without this a backlog would be taken in whole
                    # before the first call, and live steps would wait behind it.
                    await asyncio.sleep(0)


class Inferrer:
    """Model calls, one at a time, on a worker thread (ONNX Runtime releases the GIL)."""

    def __init__(self, cfg: ServeConfig, pipeline: Pipeline, publisher: Publisher, backpressure: Backpressure,
                 call_lock: asyncio.Lock, work: asyncio.Event) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.publisher = publisher
        self.backpressure = backpressure
        self.call_lock = call_lock  # Locks.call: this loop never takes Locks.commit
        self.work = work
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnnd-infer")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        pipeline = self.pipeline
        publish = self.publisher.publish
        backpressure = self.backpressure
        call_lock, work, executor = self.call_lock, self.work, self.executor
        max_wait = self.cfg.max_wait_ms / 1000
        min_batch = self.cfg.min_batch
        while True:
            await work.wait()
            work.clear()
            while True:
                if max_wait and len(pipeline.scheduler.ready) < min_batch and not pipeline.answering:
                    await asyncio.sleep(max_wait)
                async with call_lock:
                    calls = pipeline.plan()
                    if calls or pipeline.starting:
                        calls = await loop.run_in_executor(executor, pipeline.execute, calls)
                    outputs = pipeline.finish(calls)  # with no calls: outputs of controls alone
                    # Published under the lock: a checkpoint never sees steps applied whose outputs
                    # are not yet in the producer.
                    await publish(outputs)
                if not calls:
                    break
                if backpressure.paused:
                    backpressure.check()
                # Hand the loop on between finishing a round and planning the next: each is ~10 ms
                # of Python, and the other tasks (the fetcher's next slice, the producer's sends)
                # get their turn between them rather than after both.
                await asyncio.sleep(0)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
