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
* ``_watch_broker`` asks a broker for a tiny answer every ``BROKER_CHECK_INTERVAL_S``: /readyz
                  turns 503 once none has answered for ``broker_unreachable_s``.

SIGTERM/SIGINT: stop fetching, finish queued steps, flush, commit, leave the group, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from . import changelog, kafka
from .config import ConfigError, ServeConfig
from .metrics import HttpServer, Metrics
from .pipeline import Pipeline
from .runtime import BundleModel, ProviderChoice, open_bundle

log = logging.getLogger("rnnd.daemon")

#: How often the broker is asked whether it is there (``kafka.broker_answers``), and how long
#: an answer may take. Short next to ``broker_unreachable_s`` (10 s by default), so that
#: readiness follows an outage and a recovery within about a second of that setting.
BROKER_CHECK_INTERVAL_S = 1.0
BROKER_CHECK_TIMEOUT_S = 2.0


class Daemon:
    def __init__(self, cfg: ServeConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.model, self.provider = open_bundle(cfg.model, cfg.provider, cfg.provider_fallback, cfg.intra_op_threads,
                                                cfg.ort_spinning)
        self.model = self._choose_model(self.model)
        spec = self.model.spec
        self.pipeline = Pipeline(self.model, cfg, cfg.input_topic, self.metrics, provider=self.provider.label)
        self.group_id, self.changelog_topic = changelog.group_and_topic(cfg.group_id, cfg.changelog_topic,
                                                                        cfg.input_topic, spec.model.name)
        cfg.check_changelog_topic(self.changelog_topic)  # its default name comes from the model's
        self.restorer: AIOKafkaConsumer | None = None
        self.exit_code = 0
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
        self._last_answer = 0.0  # monotonic time a broker last answered (connect, broker check)
        self._paused = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnnd-infer")
        self._commit_lock = asyncio.Lock()
        # Held from plan() to finish(): a revocation must not drop streams under a running call.
        self._call_lock = asyncio.Lock()
        self._report_model(self.provider)
        self.metrics.messages.labels(cfg.input_topic)  # a series at 0 before the first message
        self.metrics.ready.set_function(lambda: float(self.is_ready()))  # what /readyz answers, when scraped

    # --- lifecycle ------------------------------------------------------------------------
    async def run(self, install_signals: bool = True) -> int:
        loop = asyncio.get_running_loop()
        self.metrics.watch_gc()
        for sig in (signal.SIGTERM, signal.SIGINT) if install_signals else ():
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
                loop.add_signal_handler(sig, self.stop)
        try:
            await self.http.start()
        except OSError as e:
            log.error("cannot serve /metrics on %s:%d (%s): choose another http_port or http_host",
                      self.cfg.http_host, self.cfg.http_port, e.strerror or e)
            return 2
        log.info("serving %s on %s (requested %s) | http://%s:%d/metrics | %s → %s", self.model.spec.model.ref,
                 self.provider.actual, self.provider.requested, self.cfg.http_host, self.http.port,
                 self.cfg.input_topic, self.cfg.output_topic)
        try:
            await self._connect()
            if self._stopping.is_set():
                return 0
            tasks = [asyncio.create_task(c, name=n) for n, c in (
                ("fetch", self._fetch()), ("infer", self._infer()), ("checkpoint", self._checkpoint_loop()),
                ("housekeep", self._housekeep()), ("watch", self._watch_broker()))]
            stop = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and t.exception() is not None:
                    log.error("task %s failed: %r", t.get_name(), t.exception())
                    raise t.exception()  # type: ignore[misc]
            await self._drain(tasks)
            return self.exit_code
        finally:
            await self._close()

    def stop(self) -> None:
        if not self._stopping.is_set():
            log.info("stopping: finishing queued steps, flushing outputs, committing offsets")
            self._stopping.set()
            self._work.set()

    def is_ready(self) -> bool:
        return (self._connected and self._joined and self._kafka_ok and not self._stopping.is_set()
                and time.monotonic() - self._last_answer < self.cfg.broker_unreachable_s)

    async def _connect(self) -> None:
        """Connect with retry and backoff: a broker that is down at start is waited for, not fatal.

        So is a missing input topic (a deployment job may create it after the daemon starts):
        readiness stays false and each try says which topic is missing where.
        """
        backoff = 0.5
        cfg = self.cfg
        while not self._stopping.is_set():
            try:
                outputs = [cfg.output_topic, cfg.dlq_topic] + ([self.changelog_topic] if cfg.changelog else [])
                await kafka.ensure_topics(cfg, cfg.input_topic, outputs,
                                          configs={self.changelog_topic: changelog.TOPIC_CONFIGS},
                                          copartitioned=(self.changelog_topic,) if cfg.changelog else ())
                self.producer = AIOKafkaProducer(**kafka.producer_settings(cfg))
                await self.producer.start()
                if cfg.changelog:
                    self.restorer = AIOKafkaConsumer(**kafka.client_settings(cfg), group_id=None,
                                                     enable_auto_commit=False, auto_offset_reset="earliest",
                                                     client_id=f"{cfg.client_id}-restore")
                    await self.restorer.start()
                self.consumer = AIOKafkaConsumer(**kafka.consumer_settings(cfg, self.group_id))
                await self.consumer.start()
                self.consumer.subscribe([cfg.input_topic], listener=_Rebalance(self))
                self.sink = kafka.Sink(self.producer, on_error=self._kafka_error("produce"))
                self._connected = self._kafka_ok = True
                self._last_answer = time.monotonic()
                log.info("connected to %s as group %s", cfg.bootstrap_servers, self.group_id)
                return
            except kafka.MissingTopic as e:  # the brokers answered: nothing is unreachable
                await self._close_clients()
                log.warning("%s; waiting for it (not ready), checking again in %.1fs", e, backoff)
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
        self.metrics.unwatch_gc()
        await self._close_clients()
        await self.http.stop()
        self._executor.shutdown(wait=True)

    async def _close_clients(self) -> None:
        if self.restorer is not None:
            with contextlib.suppress(Exception):
                await self.restorer.stop()
            self.restorer = None
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
        accept = self.pipeline.accept_many
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
                    # Fetched while the partition's state is still being restored: read it again later.
                    with contextlib.suppress(Exception):
                        consumer.seek(tp, records[0].offset)
                    continue
                taken = accept(tp.partition, records)
                while taken < len(records):
                    # All max_streams slots hold streams with queued steps: let the model work
                    # some off before a new stream can take (or evict) a slot.
                    self._work.set()
                    await asyncio.sleep(0.002)
                    if self._stopping.is_set():
                        return
                    taken += accept(tp.partition, records[taken:])
                n += taken
            if n:
                messages.inc(n)
                self._work.set()
                await self._send_side_outputs()
                # Let the infer task start a model call on what was just accepted. getmany returns
                # without suspending while fetched data is buffered, so without this yield a backlog
                # is accepted whole before the first call (and live steps wait behind the fetches).
                await asyncio.sleep(0)

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
                    # Published under the lock: a checkpoint never sees steps applied whose outputs
                    # are not yet in the producer.
                    await self._publish(outputs, latency, predictions)
                if not calls:
                    break
                if self._paused:
                    self._backpressure()

    async def _publish(self, outputs: list, latency, predictions) -> None:
        if not outputs:
            return
        assert self.sink is not None
        await self.sink.send_many(self.cfg.output_topic, outputs)
        ts = np.fromiter((o[2] for o in outputs), np.float64, len(outputs))
        latency.observe_many(np.maximum(time.time() - ts / 1000, 0.0))
        predictions.inc(len(outputs))

    async def _send_side_outputs(self) -> None:
        """Dead letters (and, with durable state, changelog records) produced outside the infer task."""
        dead = self.pipeline.take_dead_letters()
        if not dead or self.sink is None:
            return
        await self.sink.send_many(self.cfg.dlq_topic, [(d.key, d.encode()) for d in dead],
                                  headers=[[("rnnd.reason", d.reason.encode())] for d in dead])

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.commit_interval_s)
            try:
                await self.checkpoint()
            except (KafkaError, OSError) as e:  # the broker went away mid-checkpoint: the next one retries
                self._kafka_error("checkpoint")()
                log.warning("checkpoint failed (%s: %s); will retry", type(e).__name__, e)

    async def checkpoint(self, partitions: set[int] | None = None, final: bool = False) -> None:
        """outputs acknowledged → changelog records acknowledged → input offsets committed.

        A crash between any two of these repeats outputs (same ids) and never loses one: the
        changelog only ever holds state whose outputs are acknowledged, and offsets are only
        committed for inputs whose state is in the changelog.
        """
        if self.consumer is None or self.sink is None:
            return
        # The final checkpoint gives a dead broker 30 s; the inputs are then simply re-read later.
        give_up = time.monotonic() + 30

        def stopping() -> bool:
            return final and time.monotonic() > give_up

        async with self._commit_lock:
            async with self._call_lock:  # no step is applied while the snapshot is taken
                await self._send_side_outputs()
                points = self.pipeline.offsets.commit_points()
                if not await self.sink.flush(stopping):
                    return
                records = self.pipeline.changelog_records() if self.cfg.changelog else []
                await self.sink.send_many(self.changelog_topic, [(k, v) for _, k, v in records],
                                          partitions=[p for p, _, _ in records])
            if records:
                self.metrics.changelog_records.inc(len(records))
                if not await self.sink.flush(stopping):
                    return
            if partitions is not None:
                points = {p: o for p, o in points.items() if p in partitions}
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
            await self._update_lag()

    async def _update_lag(self) -> None:
        """``rnnd_consumer_lag{partition}``: records from the next offset to commit to the high watermark.

        Not from the fetch position: a backlog is fetched long before it is processed (up to
        ``max_inflight_steps`` steps wait decoded in memory), and a lag that counted only what
        is not yet fetched would read 0 through all of it. The steps waiting are
        ``rnnd_inflight_steps``.
        """
        consumer = self.consumer
        if consumer is None:
            return
        for tp in list(self.assigned):
            high = consumer.highwater(tp)  # as of the partition's last fetch response
            if high is None:
                continue
            p = self.pipeline.offsets.partitions.get(tp.partition)
            if p is not None and p.last >= 0:
                p.commit_point()  # drops the finished records at the front
                first = p.records[0].offset if p.records else p.last + 1
            else:  # nothing taken since the assignment: where the consumer will read from
                try:
                    first = await asyncio.wait_for(consumer.position(tp), 0.5)
                except (KafkaError, TimeoutError, AssertionError, IllegalStateError):
                    continue  # revoked meanwhile, or no position yet: the next round
            self.metrics.lag.labels(str(tp.partition)).set(max(0, high - first))

    async def _watch_broker(self) -> None:
        """Keep ``_last_answer`` current; log when the brokers stop and start answering."""
        cfg = self.cfg
        lost = False
        while True:
            await asyncio.sleep(BROKER_CHECK_INTERVAL_S)
            if self.producer is None:
                continue
            now = time.monotonic()
            if await kafka.broker_answers(self.producer.client, BROKER_CHECK_TIMEOUT_S):
                if lost:
                    log.info("Kafka at %s answers again (silent for %.1fs): ready", cfg.bootstrap_servers,
                             now - self._last_answer)
                    lost = False
                self._last_answer = time.monotonic()
                continue
            self.metrics.kafka_errors.labels("broker_check").inc()
            silent = now - self._last_answer
            if not lost and silent >= cfg.broker_unreachable_s:
                lost = True
                log.warning("no broker at %s has answered for %.1fs: not ready (/readyz 503) until one does "
                            "(broker_unreachable_s=%g); outputs wait in memory, nothing is lost", cfg.bootstrap_servers,
                            silent, cfg.broker_unreachable_s)

    # --- rebalance ------------------------------------------------------------------------
    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        mine = {tp.partition for tp in revoked if tp.topic == self.cfg.input_topic}
        if not mine:
            return
        deadline = time.monotonic() + 30
        while any(self.pipeline.pending_in(p) for p in mine) and time.monotonic() < deadline:
            self._work.set()
            await asyncio.sleep(0.005)
        await self.checkpoint(partitions=mine)
        async with self._call_lock:
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
        if self.cfg.changelog and mine and self.consumer is not None:
            self.consumer.pause(*mine)  # nothing of a partition is processed before its state is back
            try:
                await self._restore(sorted(tp.partition for tp in mine))
            except changelog.ChangelogError as e:
                log.error("cannot restore state: %s", e)
                self.exit_code = e.exit_code
                self.stop()
                return
        self.assigned |= mine
        if self.consumer is not None and not self._paused:
            self.consumer.resume(*mine)
        self._joined = True
        self.metrics.assigned.set(len(self.assigned))
        log.info("partitions %s assigned", sorted(tp.partition for tp in mine))

    async def _restore(self, partitions: list[int]) -> None:
        """Before newly assigned partitions are processed: their streams' state from the changelog."""
        assert self.restorer is not None
        last_log = [time.monotonic()]

        def progress(n: int) -> None:
            if time.monotonic() - last_log[0] > 2:
                last_log[0] = time.monotonic()
                log.info("restoring partitions %s: %d changelog records read", partitions, n)

        result = await changelog.restore_partitions(self.restorer, self.changelog_topic, partitions, self.model.spec,
                                                    self.cfg.on_state_mismatch, progress)
        async with self._call_lock:
            for p, states in result.states.items():
                self.pipeline.restore(p, states)
        streams = sum(len(s) for s in result.states.values())
        self.metrics.restore_seconds.observe(result.seconds)
        self.metrics.restore_records.inc(result.records)
        self.metrics.restored_streams.inc(streams)
        if result.foreign:
            log.warning("%d changelog record(s) of another state layout ignored (on_state_mismatch=reset): those "
                        "streams restart from their initial state", result.foreign)
        log.info("restored %d stream(s) of partitions %s from %d changelog records in %.2fs", streams, partitions,
                 result.records, result.seconds)

    def _choose_model(self, model: BundleModel) -> BundleModel:
        """Model upgrade policy 'previous': keep serving the old bundle if the new state layout differs."""
        cfg = self.cfg
        if cfg.on_state_mismatch != "previous":
            return model
        if not cfg.previous_model:
            raise ConfigError("on_state_mismatch=previous needs previous_model (the bundle whose state the "
                              "changelog holds)")
        previous, _ = open_bundle(cfg.previous_model, cfg.provider, cfg.provider_fallback, cfg.intra_op_threads,
                                  cfg.ort_spinning)
        if previous.spec.state_hash == model.spec.state_hash:
            log.info("%s keeps the state layout of %s: streams continue on the new model", model.spec.model.ref,
                     previous.spec.model.ref)
            return model
        log.warning("%s has another state layout (%s) than %s (%s): KEEP SERVING %s (on_state_mismatch=previous); "
                    "switch with on_state_mismatch=reset", model.spec.model.ref, model.spec.state_hash,
                    previous.spec.model.ref, previous.spec.state_hash, previous.spec.model.ref)
        return previous

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
    if cfg.gc_threshold:
        # Every message allocates a few container objects that live until their checkpoint, so at
        # Python's default of 700 the collector runs every few hundred messages and its older
        # generations keep re-scanning the queued records. Process-wide, hence here and not in Daemon.
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(cfg.gc_threshold, gen1, gen2)
    loop_factory = _loop_factory(cfg.event_loop)
    log.info("event loop: %s", "uvloop" if loop_factory else "asyncio")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve(cfg))


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop runs the same asyncio code with its loop, sockets and timers in C. Offered because it is
    the usual first thing to try; on our benchmark it was within noise of the standard loop (Kafka
    traffic is few, large reads and writes). None: the standard loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise ConfigError("event_loop=uvloop but uvloop is not installed: pip install 'rnnd[uvloop]', or use "
                          "event_loop=asyncio") from None
    return uvloop.new_event_loop


async def _serve(cfg: ServeConfig) -> int:
    daemon = Daemon(cfg)
    gc.freeze()  # the model, its session and the imports live as long as the process: never scan them again
    return await daemon.run()
