"""The Kafka clients the daemon uses, made by a factory it is handed.

The factory is the seam between the daemon and aiokafka: ``AiokafkaFactory`` makes the real
clients (through ``rnnd.daemon.kafka``, where every client setting and broker quirk lives); a
test hands the daemon a factory of fakes and runs the real daemon, pipeline and bundle
in-process, with no broker. ``Clients`` holds the live clients of one connection, which every
part of the daemon reads (they exist only between a successful connect and the close).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

from .. import changelog, kafka
from ..config import ServeConfig
from ..errors import ConfigError
from .budgets import CLIENT_STOP_S, TRANSACTION_PROBE_S

log = logging.getLogger("rnnd.daemon")


class ClientFactory(Protocol):
    """What the daemon needs from Kafka. Clients are returned not started (the daemon starts them)."""

    async def ensure_topics(self, cfg: ServeConfig, input_topic: str, outputs: list[str],
                            configs: dict[str, dict[str, str]], copartitioned: tuple[str, ...]) -> int: ...

    def producer(self, cfg: ServeConfig) -> Any: ...

    def consumer(self, cfg: ServeConfig, group_id: str) -> Any: ...

    def restorer(self, cfg: ServeConfig) -> Any: ...

    def sink(self, producer: Any, on_error: Callable[[], None]) -> Any: ...

    def transactional_producer(self, cfg: ServeConfig, transactional_id: str) -> Any: ...

    async def broker_answers(self, producer: Any, timeout: float) -> bool: ...


class AiokafkaFactory:
    """The real clients: aiokafka's, with rnnd's settings."""

    async def ensure_topics(self, cfg: ServeConfig, input_topic: str, outputs: list[str],
                            configs: dict[str, dict[str, str]], copartitioned: tuple[str, ...]) -> int:
        return await kafka.ensure_topics(cfg, input_topic, outputs, configs=configs, copartitioned=copartitioned)

    def producer(self, cfg: ServeConfig) -> Any:
        from aiokafka import AIOKafkaProducer

        return AIOKafkaProducer(**kafka.producer_settings(cfg))

    def consumer(self, cfg: ServeConfig, group_id: str) -> Any:
        from aiokafka import AIOKafkaConsumer

        kafka.install_raw_records()  # consumer_settings marks this consumer's records to be taken raw
        return AIOKafkaConsumer(**kafka.consumer_settings(cfg, group_id))

    def restorer(self, cfg: ServeConfig) -> Any:
        """Reads the changelog outside the group: a join would rebalance the daemon's own group."""
        return kafka.reader(kafka.client_settings(cfg), f"{cfg.client_id}-restore")

    def sink(self, producer: Any, on_error: Callable[[], None]) -> Any:
        return kafka.Sink(producer, on_error=on_error)

    def transactional_producer(self, cfg: ServeConfig, transactional_id: str) -> Any:
        from aiokafka import AIOKafkaProducer

        return AIOKafkaProducer(**kafka.transactional_producer_settings(cfg, transactional_id,
                                                                        kafka.TRANSACTION_TIMEOUT_MS))

    async def broker_answers(self, producer: Any, timeout: float) -> bool:
        return await kafka.broker_answers(producer.client, timeout)


class Clients:
    """The live clients of one connection: None until ``open`` makes them, and again after ``close``.

    The sink outlives ``close`` (it holds no connection of its own): a task that is still
    finishing when the daemon closes finds a sink whose sends fail, not a missing one.
    """

    def __init__(self, factory: ClientFactory, cfg: ServeConfig, group_id: str, changelog_topic: str) -> None:
        self.factory = factory
        self.cfg = cfg
        self.group_id = group_id
        self.changelog_topic = changelog_topic
        self.consumer: Any = None
        self.producer: Any = None
        self.restorer: Any = None  # only with durable state (changelog=true)
        self.sink: Any = None  # kafka.Sink over the producer

    async def open(self, listener: Any, on_produce_error: Callable[[], None]) -> None:
        """One try: topics checked (and made), clients started, the consumer subscribed.

        Raises what the factory raises (``kafka.MissingTopic``, KafkaError, OSError); the
        caller retries after ``close``.
        """
        cfg, factory = self.cfg, self.factory
        outputs = [cfg.output_topic, cfg.dlq_topic] + ([self.changelog_topic] if cfg.changelog else [])
        await factory.ensure_topics(cfg, cfg.input_topic, outputs, {self.changelog_topic: changelog.TOPIC_CONFIGS},
                                    (self.changelog_topic,) if cfg.changelog else ())
        self.producer = factory.producer(cfg)
        await self.producer.start()
        if cfg.changelog:
            self.restorer = factory.restorer(cfg)
            await self.restorer.start()
        if cfg.exactly_once:
            await self._check_transactions()
            group, topic = self.group_id, cfg.input_topic
            self.sink = kafka.TransactionalSink(
                lambda p: factory.transactional_producer(cfg, kafka.transactional_id(group, topic, p)),
                lambda producer: factory.sink(producer, on_produce_error), group, topic)
        else:
            self.sink = factory.sink(self.producer, on_produce_error)
        self.consumer = factory.consumer(cfg, self.group_id)
        await self.consumer.start()
        self.consumer.subscribe([cfg.input_topic], listener=listener)

    async def _check_transactions(self) -> None:
        """Exactly-once is refused at start, in one line, on a broker without transactions (or without the ACL).

        The probe uses its own transactional id (``<group>.probe``), never a partition's, so it
        fences no replica at work.
        """
        cfg = self.cfg
        probe = self.factory.transactional_producer(cfg, f"{self.group_id}.probe")
        why = await kafka.transactions_supported(probe, TRANSACTION_PROBE_S)
        if why is not None:
            raise ConfigError(f"processing_guarantee=exactly_once cannot work on {cfg.bootstrap_servers}: {why}; "
                              "use processing_guarantee=at_least_once there", "processing_guarantee")

    async def close(self) -> None:
        """Stop every client that was started; each stop is bounded (``CLIENT_STOP_S``)."""
        if isinstance(self.sink, kafka.TransactionalSink):
            await self.sink.close_all()  # open transactions aborted: what they held is re-made by the next owner
        if self.restorer is not None:
            with contextlib.suppress(Exception):
                await self.restorer.stop()
            self.restorer = None
        if self.consumer is not None:
            try:  # leaves the group: partitions move on at once
                await asyncio.wait_for(self.consumer.stop(), CLIENT_STOP_S)
            except (Exception, TimeoutError) as e:
                log.warning("consumer stop: %r", e)
            self.consumer = None
        if self.producer is not None:
            try:
                await asyncio.wait_for(self.producer.stop(), CLIENT_STOP_S)
            except (Exception, TimeoutError) as e:
                log.warning("producer stop: %r", e)
            self.producer = None
