"""The serving hot path: the fetch loop (with backpressure) and the infer loop (with publishing).

* ``Fetcher``  Kafka → ``pipeline.accept_many`` (decode, queue); dead letters → their topic.
               Pauses fetching while too many steps wait (``Backpressure``).
* ``Inferrer`` ``pipeline.plan`` → ``execute`` on a worker thread → ``finish`` → outputs to the
               sink. Eager: runs whenever there is work, so batches grow with load.

Everything here runs once per fetch or per model call, never per message, except what
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
from .budgets import FETCH_POLL_MS, FETCH_RETRY_S, SLOT_WAIT_S
from .clients import Clients
from .housekeeping import Readiness
from .publish import Publisher

log = logging.getLogger("rnnd.daemon")


class Backpressure:
    """Pauses the assigned partitions above ``max_inflight_steps`` waiting steps, resumes them below half."""

    def __init__(self, cfg: ServeConfig, pipeline: Pipeline, metrics: Metrics, clients: Clients,
                 assigned: set[TopicPartition]) -> None:
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
                 assigned: set[TopicPartition], stopping: asyncio.Event, work: asyncio.Event) -> None:
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
            n = 0
            for tp, records in batches.items():
                if tp not in assigned:
                    # Fetched while the partition's state is still being restored: read it again later.
                    with contextlib.suppress(Exception):
                        consumer.seek(tp, records[0].offset)
                    continue
                taken = accept(tp.partition, records)
                while taken < len(records):
                    # All max_streams slots hold streams with queued steps: let the model work
                    # some off before a new stream can take (or evict) a slot.
                    work.set()
                    await asyncio.sleep(SLOT_WAIT_S)
                    if stopping.is_set():
                        return
                    taken += accept(tp.partition, records[taken:])
                n += taken
            if n:
                messages.inc(n)
                work.set()
                if send_dead_letters:  # exactly-once: only the checkpoint sends them, inside its transactions
                    await self.publisher.send_side_outputs()
                # Let the infer task start a model call on what was just accepted. getmany returns
                # without suspending while fetched data is buffered, so without this yield a backlog
                # is accepted whole before the first call (and live steps wait behind the fetches).
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
                if max_wait and len(pipeline.scheduler.ready) < min_batch:
                    await asyncio.sleep(max_wait)
                async with call_lock:
                    calls = pipeline.plan()
                    if calls:
                        calls = await loop.run_in_executor(executor, pipeline.execute, calls)
                    outputs = pipeline.finish(calls)  # with no calls: outputs of controls alone
                    # Published under the lock: a checkpoint never sees steps applied whose outputs
                    # are not yet in the producer.
                    await publish(outputs)
                if not calls:
                    break
                if backpressure.paused:
                    backpressure.check()

    def close(self) -> None:
        self.executor.shutdown(wait=True)
