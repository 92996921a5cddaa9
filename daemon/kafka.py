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
    """Settings shared by consumer, producer and admin client (security lands here)."""
    return {"bootstrap_servers": cfg.bootstrap_servers}


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
                        configs: dict[str, dict[str, str]] | None = None) -> int:
    """Create missing output topics with the input's partition count; return that count."""
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
        return parts
    finally:
        await admin.close()


class MissingTopic(KafkaError):
    """The input topic is not there (retried: it may be created by a deployment job)."""


def _single_broker(admin: AIOKafkaAdminClient) -> bool:
    try:
        return len(admin._client.cluster.brokers()) <= 1  # no public accessor
    except Exception:
        return True


class Sink:
    """The producer, plus the bookkeeping that makes ``flush`` mean 'everything acknowledged'."""

    def __init__(self, producer: AIOKafkaProducer, on_error: Callable[[], None] | None = None) -> None:
        self.producer = producer
        self._sent: list[tuple[asyncio.Future, str, bytes | None, bytes, list | None]] = []
        self.on_error = on_error

    async def send(self, topic: str, key: bytes | None, value: bytes,
                   headers: list[tuple[str, bytes]] | None = None) -> None:
        fut = await self.producer.send(topic, value=value, key=key, headers=headers)
        self._sent.append((fut, topic, key, value, headers))

    async def flush(self, stopping: Callable[[], bool] = lambda: False) -> bool:
        """Wait until every output sent so far is acknowledged, resending failures.

        Returns False only if ``stopping()`` became true with outputs still unacknowledged.
        """
        backoff = 0.2
        while True:
            await self.producer.flush()
            sent, self._sent = self._sent, []
            failed = [s for s in sent if s[0].cancelled() or s[0].exception() is not None]
            if not failed:
                return True
            if self.on_error:
                self.on_error()
            log.warning("%d output(s) not acknowledged (%s); sending them again", len(failed),
                        _reason(failed[0][0]))
            if stopping():
                self._sent = failed + self._sent
                return False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            for _, topic, key, value, headers in failed:
                try:
                    fut = await self.producer.send(topic, value=value, key=key, headers=headers)
                except KafkaError:
                    fut = asyncio.get_running_loop().create_future()
                    fut.set_exception(KafkaError("send failed"))
                self._sent.append((fut, topic, key, value, headers))

    @property
    def unacknowledged(self) -> int:
        return sum(1 for s in self._sent if not s[0].done())


def _reason(fut: asyncio.Future) -> str:
    if fut.cancelled():
        return "cancelled"
    exc = fut.exception()
    return f"{type(exc).__name__}: {exc}" if exc else "?"
