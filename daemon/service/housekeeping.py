"""What the daemon does besides serving: readiness, TTL eviction and its log, consumer lag, the broker
watch, the event-loop watch.

Readiness (/readyz) is "connected, in the group, the last Kafka call worked, a broker answered
within ``broker_unreachable_s``, not stopping". The broker watch supplies the last of these:
a fetch that finds no broker returns empty-handed like one that finds no data, so the fetch
loop alone cannot tell an outage from a quiet topic.

The event-loop watch measures what every other part only suffers: while one piece of work
holds the loop, no fetch, output, commit or /metrics request is served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from .. import kafka
from ..config import ServeConfig
from ..metrics import Metrics
from ..pipeline import Pipeline
from .budgets import (
    BROKER_CHECK_INTERVAL_S,
    BROKER_CHECK_TIMEOUT_S,
    HOUSEKEEP_INTERVAL_S,
    LAG_POSITION_TIMEOUT_S,
    LOOP_LAG_PROBE_S,
)
from .clients import ClientFactory, Clients

log = logging.getLogger("rnnd.daemon")


class Readiness:
    """The facts /readyz is made of, each set by the part of the daemon that learns it."""

    def __init__(self, cfg: ServeConfig, metrics: Metrics) -> None:
        self.unreachable_s = cfg.broker_unreachable_s
        self.metrics = metrics
        self.connected = False
        self.joined = False  # the first assignment (possibly empty) arrived: we are in the group
        self.kafka_ok = False  # the last fetch or commit worked
        self.last_answer = 0.0  # monotonic time a broker last answered (connect, broker check)

    def ready(self) -> bool:
        return (self.connected and self.joined and self.kafka_ok
                and time.monotonic() - self.last_answer < self.unreachable_s)

    def on_connected(self) -> None:
        self.connected = self.kafka_ok = True
        self.last_answer = time.monotonic()

    def failed(self, op: str) -> None:
        """A Kafka call failed in ``op`` (a label of ``rnnd_kafka_errors_total``): not ready until one works."""
        self.kafka_ok = False
        self.metrics.kafka_errors.labels(op).inc()

    def on_error(self, op: str) -> Callable[[], None]:
        """``failed(op)`` as a callback (the sink calls it when a send is not acknowledged)."""
        return lambda: self.failed(op)


class Housekeeper:
    """TTL eviction with its log lines, and the consumer-lag gauge, every ``HOUSEKEEP_INTERVAL_S``."""

    def __init__(self, cfg: ServeConfig, pipeline: Pipeline, metrics: Metrics, clients: Clients,
                 assigned: set[TopicPartition]) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.metrics = metrics
        self.clients = clients
        self.assigned = assigned

    async def run(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEP_INTERVAL_S)
            evicted = self.pipeline.streams.evict_idle()
            if evicted:
                log.info("evicted %d stream(s) idle for over %.0fs", evicted, self.cfg.stream_ttl_s)
            for ev in self.pipeline.take_evictions():
                if ev.reason == "lru":
                    log.info("evicted least recently used streams: max_streams=%d reached", self.cfg.max_streams)
                    break
            await self.update_lag()

    async def update_lag(self) -> None:
        """``rnnd_consumer_lag{partition}``: records from the next offset to commit to the high watermark.

        Not from the fetch position: a backlog is fetched long before it is processed (up to
        ``max_inflight_steps`` steps wait decoded in memory), and a lag that counted only what
        is not yet fetched would read 0 through all of it. The steps waiting are
        ``rnnd_inflight_steps``.
        """
        consumer = self.clients.consumer
        if consumer is None:
            return
        for tp in list(self.assigned):
            high = kafka.fetched_end(consumer, tp)  # as of the partition's last fetch response
            if high is None:
                continue
            p = self.pipeline.offsets.partitions.get(tp.partition)
            if p is not None and p.last >= 0:
                p.commit_point()  # drops the finished records at the front
                first = p.records[0].offset if p.records else p.last + 1
            else:  # nothing taken since the assignment: where the consumer will read from
                try:
                    first = await asyncio.wait_for(consumer.position(tp), LAG_POSITION_TIMEOUT_S)
                except (KafkaError, TimeoutError, AssertionError, IllegalStateError):
                    continue  # revoked meanwhile, or no position yet: the next round
            self.metrics.lag.labels(str(tp.partition)).set(max(0, high - first))


class BrokerWatch:
    """Keeps ``Readiness.last_answer`` current; logs when the brokers stop and start answering."""

    def __init__(self, cfg: ServeConfig, metrics: Metrics, clients: Clients, factory: ClientFactory,
                 readiness: Readiness) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.clients = clients
        self.factory = factory
        self.readiness = readiness

    async def run(self) -> None:
        cfg = self.cfg
        readiness = self.readiness
        lost = False
        while True:
            await asyncio.sleep(BROKER_CHECK_INTERVAL_S)
            producer = self.clients.producer
            if producer is None:
                continue
            now = time.monotonic()
            if await self.factory.broker_answers(producer, BROKER_CHECK_TIMEOUT_S):
                if lost:
                    log.info("Kafka at %s answers again (silent for %.1fs): ready", cfg.bootstrap_servers,
                             now - readiness.last_answer)
                    lost = False
                readiness.last_answer = time.monotonic()
                continue
            self.metrics.kafka_errors.labels("broker_check").inc()
            silent = now - readiness.last_answer
            if not lost and silent >= cfg.broker_unreachable_s:
                lost = True
                log.warning("no broker at %s has answered for %.1fs: not ready (/readyz 503) until one does "
                            "(broker_unreachable_s=%g); outputs wait in memory, nothing is lost", cfg.bootstrap_servers,
                            silent, cfg.broker_unreachable_s)


class LoopWatch:
    """Event-loop lag: a timer asks to be woken every ``LOOP_LAG_PROBE_S``; how late it is woken is
    how long the loop was held. Observed into ``rnnd_event_loop_lag_seconds`` (and its maximum)."""

    def __init__(self, metrics: Metrics) -> None:
        self.histogram = metrics.loop_lag
        self.maximum = metrics.loop_lag_max
        self.worst = 0.0

    async def run(self) -> None:
        clock = time.perf_counter
        while True:
            asked = clock()
            await asyncio.sleep(LOOP_LAG_PROBE_S)
            lag = max(0.0, clock() - asked - LOOP_LAG_PROBE_S)
            self.histogram.observe(lag)
            if lag > self.worst:
                self.worst = lag
                self.maximum.set(lag)
