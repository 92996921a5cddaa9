"""aiokafka plumbing: client settings, topic set-up, and the sink that never loses an output.

Delivery is at-least-once: an input offset is committed only after every output derived
from it has been acknowledged by the broker (the checkpoint flushes the ``Sink`` first).
A send that fails is sent again, so a broker outage delays outputs but does not drop them;
a resend may reorder outputs of one key, which their ids and step numbers make harmless.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from .config import ServeConfig

log = logging.getLogger("rnnd.kafka")


def client_settings(cfg: ServeConfig) -> dict[str, Any]:
    """Settings shared by consumer, producer and admin client: where Kafka is, and how to connect securely.

    The security part (TLS context, SASL login) is built anew for each client, so a client made
    after a rotated certificate or password file was replaced uses the new one.
    """
    from .security import KafkaSecurity, client_kwargs

    return {"bootstrap_servers": cfg.bootstrap_servers, **client_kwargs(KafkaSecurity.from_settings(cfg))}


def consumer_settings(cfg: ServeConfig, group_id: str) -> dict[str, Any]:
    return {
        **client_settings(cfg),
        "group_id": group_id,
        "client_id": f"{cfg.client_id}-consumer",
        "enable_auto_commit": False,
        # "earliest": a new group reads the topic from its start. (Tansu also reports wrong
        # offsets for "latest"; see docs/architecture.md.)
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
        "fetch_max_wait_ms": cfg.fetch_max_wait_ms,
        "fetch_max_bytes": 32 * 1024 * 1024,
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": max(1000, cfg.session_timeout_ms // 3),
        "max_poll_interval_ms": 300_000,
    }


def producer_settings(cfg: ServeConfig) -> dict[str, Any]:
    return {
        **client_settings(cfg),
        "client_id": f"{cfg.client_id}-producer",
        "acks": "all",
        "linger_ms": cfg.linger_ms,
        "max_batch_size": 1024 * 1024,
        "compression_type": None if cfg.compression == "none" else cfg.compression,
        "request_timeout_ms": 30_000,
    }


async def ensure_topics(cfg: ServeConfig, input_topic: str, outputs: list[str],
                        configs: dict[str, dict[str, str]] | None = None,
                        copartitioned: tuple[str, ...] = ()) -> int:
    """Create missing output topics with the input's partition count; return that count.

    Topics in ``copartitioned`` (the state changelog) must have exactly the input's partition
    count: changelog partition p holds the streams of input partition p.
    """
    admin = AIOKafkaAdminClient(**client_settings(cfg), client_id=f"{cfg.client_id}-admin")
    await admin.start()
    try:
        # List first: describing an unknown topic makes some brokers auto-create it.
        existing = set(await admin.list_topics())
        if input_topic not in existing:
            raise MissingTopic(f"input topic {input_topic!r} does not exist: create it first, with the partition "
                               "count you want (partitions bound how many replicas can share the work)")
        meta = await admin.describe_topics([input_topic])
        parts = len(meta[0].get("partitions") or [])
        missing = [t for t in outputs if t not in existing]
        if missing and cfg.create_topics:
            new = [NewTopic(t, num_partitions=parts, replication_factor=1 if _single_broker(admin) else -1,
                            topic_configs=(configs or {}).get(t, {})) for t in missing]
            try:
                await admin.create_topics(new)
                log.info("created topics %s with %d partitions", ", ".join(missing), parts)
            except TopicAlreadyExistsError:
                pass
        for topic in copartitioned:
            if topic in existing:
                other = len((await admin.describe_topics([topic]))[0].get("partitions") or [])
                if other != parts:
                    raise TopicLayoutError(
                        f"state changelog {topic!r} has {other} partitions but input topic {input_topic!r} has "
                        f"{parts}: they must be co-partitioned (a changelog partition holds the streams of the same "
                        "input partition). Recreate the changelog with the input's partition count")
        return parts
    finally:
        await admin.close()


class MissingTopic(KafkaError):
    """The input topic is not there (retried: it may be created by a deployment job)."""


class TopicLayoutError(RuntimeError):
    """Topics exist but cannot work together; retrying will not help. Exit code 2."""

    exit_code = 2


def _single_broker(admin: AIOKafkaAdminClient) -> bool:
    try:
        return len(admin._client.cluster.brokers()) <= 1  # no public accessor
    except Exception:
        return True


class Sink:
    """The producer, plus the bookkeeping that makes ``flush`` mean 'everything acknowledged'."""

    def __init__(self, producer: AIOKafkaProducer, on_error: Callable[[], None] | None = None) -> None:
        self.producer = producer
        self._sent: list[tuple[asyncio.Future, str, bytes | None, bytes | None, list | None, int | None]] = []
        self.on_error = on_error

    async def send(self, topic: str, key: bytes | None, value: bytes | None,
                   headers: list[tuple[str, bytes]] | None = None, partition: int | None = None) -> None:
        fut = await self.producer.send(topic, value=value, key=key, headers=headers, partition=partition)
        self._sent.append((fut, topic, key, value, headers, partition))

    async def flush(self, stopping: Callable[[], bool] = lambda: False) -> bool:
        """Wait until every output sent before this call is acknowledged, resending failures.

        Returns False only if ``stopping()`` became true with outputs still unacknowledged.
        Sends made while this runs (other tasks keep producing) are left for the next flush.
        """
        backoff = 0.2
        todo, self._sent = self._sent, []
        while True:
            await self.producer.flush()
            waiting = [s[0] for s in todo if not s[0].done()]
            if waiting:
                await asyncio.wait(waiting, timeout=30)
            unfinished = [s for s in todo if not s[0].done()]
            failed = [s for s in todo if s[0].done() and (s[0].cancelled() or s[0].exception() is not None)]
            if not failed and not unfinished:
                return True
            if failed:
                if self.on_error:
                    self.on_error()
                log.warning("%d output(s) not acknowledged (%s); sending them again", len(failed),
                            _reason(failed[0][0]))
            if stopping():
                self._sent = failed + unfinished + self._sent
                return False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            todo = unfinished
            for _, topic, key, value, headers, partition in failed:
                try:
                    fut = await self.producer.send(topic, value=value, key=key, headers=headers, partition=partition)
                except KafkaError:
                    fut = asyncio.get_running_loop().create_future()
                    fut.set_exception(KafkaError("send failed"))
                todo.append((fut, topic, key, value, headers, partition))

    @property
    def unacknowledged(self) -> int:
        return sum(1 for s in self._sent if not s[0].done())


def _reason(fut: asyncio.Future) -> str:
    if fut.cancelled():
        return "cancelled"
    exc = fut.exception()
    return f"{type(exc).__name__}: {exc}" if exc else "?"


async def read_to_end(consumer, tps: list, on_batch: Callable[[Any, list], None], idle_s: float = 2.0,
                      max_records: int = 20_000) -> None:
    """Read assigned partitions from their beginning to their current end.

    The end is each partition's high watermark as a fetch reports it — not ``end_offsets()``,
    which some brokers (Tansu) answer wrongly; code written this way is also right on Apache
    Kafka. A partition that reports no watermark for ``idle_s`` is taken as empty.
    """
    import time

    consumer.assign(list(tps))
    await consumer.seek_to_beginning(*tps)
    started = time.monotonic()
    pending = set(tps)
    while pending:
        batch = await consumer.getmany(*pending, timeout_ms=200, max_records=max_records)
        for tp, recs in batch.items():
            if recs:
                on_batch(tp, recs)
        for tp in list(pending):
            high = consumer.highwater(tp)
            at_end = high is not None and await consumer.position(tp) >= high
            silent = high is None and time.monotonic() - started > idle_s
            if at_end or silent:
                pending.discard(tp)
