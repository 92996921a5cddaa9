"""The daemon: the pipeline wired to Kafka, plus checkpoints, backpressure, health and shutdown.

Four tasks share one event loop:

* ``_fetch``      Kafka → ``pipeline.accept`` (decode, queue); dead letters → their topic.
                  Pauses fetching while too many steps wait (backpressure).
* ``_infer``      ``pipeline.plan`` → ``execute`` on a worker thread → ``finish`` → outputs to
                  the sink. Eager: runs whenever there is work, so batches grow with load.
* ``_checkpoint`` every ``commit_interval_s``: commit points → flush the sink (every output
                  acknowledged) → commit input offsets. A crash anywhere re-delivers inputs
                  whose outputs may already exist (same ids), never loses one.
* ``_housekeep``  TTL eviction, gauges, consumer lag.

SIGTERM/SIGINT: stop fetching, finish queued steps, flush, commit, leave the group, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from . import kafka
from .config import ServeConfig
from .metrics import HttpServer, Metrics
from .pipeline import Pipeline
from .runtime import ProviderChoice, open_bundle

log = logging.getLogger("rnnd.daemon")


class Daemon:
    def __init__(self, cfg: ServeConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.model, self.provider = open_bundle(cfg.model, cfg.provider, cfg.provider_fallback, cfg.intra_op_threads,
                                                cfg.ort_spinning)
        spec = self.model.spec
        self.pipeline = Pipeline(self.model, cfg, cfg.input_topic, self.metrics, provider=self.provider.label)
        self.group_id = cfg.group_id or f"rnnd-{spec.model.name}"
        self.http = HttpServer(self.metrics, self.is_ready, cfg.http_host, cfg.http_port)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.sink: kafka.Sink | None = None
        self.assigned: set[TopicPartition] = set()
        self._stopping = asyncio.Event()
        self._work = asyncio.Event()
        self._connected = False
        self._joined = False  # the first assignment (possibly empty) arrived: we are in the group
        self._kafka_ok = False
        self._paused = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnnd-infer")
        self._commit_lock = asyncio.Lock()
        # Held from plan() to finish(): a revocation must not drop streams under a running call.
        self._call_lock = asyncio.Lock()
        self._report_model(self.provider)

    # --- lifecycle ------------------------------------------------------------------------
    async def run(self, install_signals: bool = True) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT) if install_signals else ():
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
                loop.add_signal_handler(sig, self.stop)
        await self.http.start()
        log.info("serving %s on %s (requested %s) | http://%s:%d/metrics | %s → %s", self.model.spec.model.ref,
                 self.provider.actual, self.provider.requested, self.cfg.http_host, self.http.port,
                 self.cfg.input_topic, self.cfg.output_topic)
        try:
            await self._connect()
            if self._stopping.is_set():
                return 0
            tasks = [asyncio.create_task(c, name=n) for n, c in (
                ("fetch", self._fetch()), ("infer", self._infer()), ("checkpoint", self._checkpoint_loop()),
                ("housekeep", self._housekeep()))]
            stop = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and t.exception() is not None:
                    log.error("task %s failed: %r", t.get_name(), t.exception())
                    raise t.exception()  # type: ignore[misc]
            await self._drain(tasks)
            return 0
        finally:
            await self._close()

    def stop(self) -> None:
        if not self._stopping.is_set():
            log.info("stopping: finishing queued steps, flushing outputs, committing offsets")
            self._stopping.set()
            self._work.set()

    def is_ready(self) -> bool:
        return self._connected and self._joined and self._kafka_ok and not self._stopping.is_set()

    async def _connect(self) -> None:
        """Connect with retry and backoff: a broker that is down at start is waited for, not fatal."""
        backoff = 0.5
        cfg = self.cfg
        while not self._stopping.is_set():
            try:
                await kafka.ensure_topics(cfg, cfg.input_topic, [cfg.output_topic, cfg.dlq_topic])
                self.producer = AIOKafkaProducer(**kafka.producer_settings(cfg))
                await self.producer.start()
                self.consumer = AIOKafkaConsumer(**kafka.consumer_settings(cfg, self.group_id))
                await self.consumer.start()
                self.consumer.subscribe([cfg.input_topic], listener=_Rebalance(self))
                self.sink = kafka.Sink(self.producer, on_error=self._kafka_error("produce"))
                self._connected = self._kafka_ok = True
                self.metrics.ready.set(1)
                log.info("connected to %s as group %s", cfg.bootstrap_servers, self.group_id)
                return
            except (KafkaError, OSError) as e:
                await self._close_clients()
                self.metrics.kafka_errors.labels("connect").inc()
                log.warning("Kafka at %s not reachable (%s: %s); retrying in %.1fs", cfg.bootstrap_servers,
                            type(e).__name__, e, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, 10.0)

    async def _drain(self, tasks: list[asyncio.Task]) -> None:
        """After stop(): the fetch task has ended; let the infer task empty the queues, then commit."""
        started = time.monotonic()
        deadline = started + 30
        while self.pipeline.busy() and time.monotonic() < deadline:
            self._work.set()
            await asyncio.sleep(0.01)
        left = self.pipeline.scheduler.inflight
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._send_side_outputs()
        await self.checkpoint(final=True)
        log.info("drained in %.2fs (%d step(s) left unapplied, to be re-read by the next owner)",
                 time.monotonic() - started, left)

    async def _close(self) -> None:
        await self._close_clients()
        await self.http.stop()
        self._executor.shutdown(wait=True)
        self.metrics.ready.set(0)

    async def _close_clients(self) -> None:
        if self.consumer is not None:
            try:  # leaves the group: partitions move on at once
                await asyncio.wait_for(self.consumer.stop(), 15)
            except (Exception, TimeoutError) as e:
                log.warning("consumer stop: %r", e)
            self.consumer = None
        if self.producer is not None:
            try:
                await asyncio.wait_for(self.producer.stop(), 15)
            except (Exception, TimeoutError) as e:
                log.warning("producer stop: %r", e)
            self.producer = None

    # --- tasks ----------------------------------------------------------------------------
    async def _fetch(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        cfg = self.cfg
        messages = self.metrics.messages.labels(cfg.input_topic)
        accept = self.pipeline.accept
        while not self._stopping.is_set():
            self._backpressure()
            try:
                batches = await consumer.getmany(timeout_ms=100, max_records=cfg.fetch_max_records)
                self._kafka_ok = True
            except KafkaError as e:
                self._kafka_error("fetch")()
                log.warning("fetch failed (%s); retrying", e)
                await asyncio.sleep(1.0)
                continue
            if self._stopping.is_set():
                break  # not accepted, not committed: the next owner reads them
            n = 0
            for tp, records in batches.items():
                if tp not in self.assigned:
                    continue
                for r in records:
                    while not accept(r.key, r.value, tp.partition, r.offset, r.timestamp):
                        # All max_streams slots hold streams with queued steps: let the model work
                        # some off before a new stream can take (or evict) a slot.
                        self._work.set()
                        await asyncio.sleep(0.002)
                        if self._stopping.is_set():
                            return
                    n += 1
            if n:
                messages.inc(n)
                self._work.set()
                await self._send_side_outputs()

    def _backpressure(self) -> None:
        assert self.consumer is not None
        inflight = self.pipeline.scheduler.inflight
        if not self._paused and inflight > self.cfg.max_inflight_steps:
            self.consumer.pause(*self.assigned)
            self._paused = True
            self.metrics.paused.set(1)
        elif self._paused and inflight <= self.cfg.max_inflight_steps // 2:
            self.consumer.resume(*self.assigned)
            self._paused = False
            self.metrics.paused.set(0)

    async def _infer(self) -> None:
        loop = asyncio.get_running_loop()
        pipeline = self.pipeline
        latency = self.metrics.latency
        predictions = self.metrics.predictions
        max_wait = self.cfg.max_wait_ms / 1000
        while True:
            await self._work.wait()
            self._work.clear()
            while True:
                if max_wait and len(pipeline.scheduler.ready) < self.cfg.min_batch:
                    await asyncio.sleep(max_wait)
                async with self._call_lock:
                    calls = pipeline.plan()
                    if calls:
                        calls = await loop.run_in_executor(self._executor, pipeline.execute, calls)
                    outputs = pipeline.finish(calls)  # with no calls: outputs of controls alone
                await self._publish(outputs, latency, predictions)
                if not calls:
                    break
                if self._paused:
                    self._backpressure()

    async def _publish(self, outputs: list, latency, predictions) -> None:
        if not outputs:
            return
        assert self.sink is not None
        topic = self.cfg.output_topic
        send = self.sink.send
        now = time.time()
        for o in outputs:
            await send(topic, o.key, o.value)
            latency.observe(max(0.0, now - o.input_timestamp / 1000))
        predictions.inc(len(outputs))

    async def _send_side_outputs(self) -> None:
        """Dead letters (and, with durable state, changelog records) produced outside the infer task."""
        dead = self.pipeline.take_dead_letters()
        if not dead or self.sink is None:
            return
        for d in dead:
            await self.sink.send(self.cfg.dlq_topic, d.key, d.encode(), headers=[("rnnd.reason", d.reason.encode())])

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.commit_interval_s)
            await self.checkpoint()

    async def checkpoint(self, partitions: set[int] | None = None, final: bool = False) -> None:
        """Outputs acknowledged → offsets committed, in that order."""
        if self.consumer is None or self.sink is None:
            return
        async with self._commit_lock:
            points = self.pipeline.offsets.commit_points()
            if partitions is not None:
                points = {p: o for p, o in points.items() if p in partitions}
            # The final checkpoint gives a dead broker 30 s; the inputs are then simply re-read later.
            give_up = time.monotonic() + 30
            flushed = await self.sink.flush(stopping=lambda: final and time.monotonic() > give_up)
            if not flushed:
                return
            owned = {tp.partition for tp in self.assigned}
            offsets = {TopicPartition(self.cfg.input_topic, p): OffsetAndMetadata(o, "")
                       for p, o in points.items() if p in owned}
            if not offsets:
                return
            try:
                await self.consumer.commit(offsets)
                self.pipeline.offsets.mark_committed(points)
                self.metrics.commits.inc()
                self._kafka_ok = True
            except KafkaError as e:
                self._kafka_error("commit")()
                log.warning("commit failed (%s: %s); will retry", type(e).__name__, e)

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            evicted = self.pipeline.streams.evict_idle()
            if evicted:
                log.info("evicted %d stream(s) idle for over %.0fs", evicted, self.cfg.stream_ttl_s)
            for ev in self.pipeline.take_evictions():
                if ev.reason == "lru":
                    log.info("evicted least recently used streams: max_streams=%d reached", self.cfg.max_streams)
                    break
            self._update_lag()

    def _update_lag(self) -> None:
        if self.consumer is None:
            return
        for tp in list(self.assigned):
            high = self.consumer.highwater(tp)
            p = self.pipeline.offsets.partitions.get(tp.partition)
            if high is not None:
                last = p.last if p else -1
                self.metrics.lag.labels(str(tp.partition)).set(max(0, high - (last + 1)))

    # --- rebalance ------------------------------------------------------------------------
    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        mine = {tp.partition for tp in revoked if tp.topic == self.cfg.input_topic}
        if not mine:
            return
        deadline = time.monotonic() + 30
        while any(self.pipeline.pending_in(p) for p in mine) and time.monotonic() < deadline:
            self._work.set()
            await asyncio.sleep(0.005)
        async with self._call_lock:
            await self._send_side_outputs()
            await self.checkpoint(partitions=mine)
            dropped = sum(self.pipeline.revoke(p) for p in mine)
        self.assigned -= set(revoked)
        for p in mine:
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(str(p))
        self.metrics.assigned.set(len(self.assigned))
        log.info("partitions %s revoked: checkpointed, %d stream(s) dropped", sorted(mine), dropped)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        mine = {tp for tp in assigned if tp.topic == self.cfg.input_topic}
        for tp in mine:
            self.pipeline.offsets.forget(tp.partition)
        self.assigned |= mine
        self._joined = True
        self.metrics.assigned.set(len(self.assigned))
        log.info("partitions %s assigned", sorted(tp.partition for tp in mine))

    # --- helpers --------------------------------------------------------------------------
    def _kafka_error(self, op: str):
        def mark() -> None:
            self._kafka_ok = False
            self.metrics.kafka_errors.labels(op).inc()
        return mark

    def _report_model(self, choice: ProviderChoice) -> None:
        spec = self.model.spec
        if choice.fallback:
            log.warning("provider %s is not available: FALLING BACK to %s (provider_fallback=true)",
                        choice.requested, choice.actual)
        self.metrics.model_info.labels(spec.model.name, spec.model.version, choice.label, choice.requested,
                                       str(choice.fallback).lower(), spec.state_hash).set(1)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def on_partitions_revoked(self, revoked):
        await self.daemon.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned):
        await self.daemon.on_assigned(set(assigned))


def serve(cfg: ServeConfig) -> int:
    """Run the daemon until SIGTERM/SIGINT; the exit code for the CLI."""
    return asyncio.run(_serve(cfg))


async def _serve(cfg: ServeConfig) -> int:
    daemon = Daemon(cfg)
    return await daemon.run()
