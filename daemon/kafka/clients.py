"""What every Kafka client rnnd makes is given: where the brokers are, security, and its role's settings.

One place for them, so that a setting (a TLS context, a fetch size, the offset reset a new
reader needs on Tansu) cannot differ between the daemon, ``rnnd verify`` and the tools.

The aiokafka classes are looked up when a client is made, not when this module is imported,
so that a test can stand in for them (``monkeypatch.setattr(aiokafka, "AIOKafkaProducer", ...)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..security import KafkaSecurity, client_kwargs
from .quirks import OFFSET_RESET, RAW_RECORDS

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    from ..config import ServeConfig


def connection_settings(bootstrap_servers: str, security: KafkaSecurity) -> dict[str, Any]:
    """Where Kafka is and how to connect securely: the settings every client starts from.

    The security part (TLS context, SASL login) is built anew at each call, so a client made
    after a rotated certificate or password file was replaced uses the new one.
    """
    return {"bootstrap_servers": bootstrap_servers, **client_kwargs(security)}


def client_settings(cfg: ServeConfig) -> dict[str, Any]:
    """Settings shared by the daemon's consumer, producer and admin client (see :func:`connection_settings`)."""
    return connection_settings(cfg.bootstrap_servers, KafkaSecurity.from_settings(cfg))


def consumer_settings(cfg: ServeConfig, group_id: str) -> dict[str, Any]:
    """The daemon's input consumer: a member of ``group_id`` that commits only what the checkpoint says."""
    return {
        **client_settings(cfg),
        "group_id": group_id,
        "client_id": f"{cfg.client_id}-consumer",
        "enable_auto_commit": False,
        # A new group reads the topic from its start (and "latest" is wrong on Tansu: quirks).
        "auto_offset_reset": OFFSET_RESET,
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
        "fetch_max_wait_ms": cfg.fetch_max_wait_ms,
        "fetch_max_bytes": 32 * 1024 * 1024,
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": max(1000, cfg.session_timeout_ms // 3),
        "max_poll_interval_ms": 300_000,
        "isolation_level": input_isolation(cfg),
        # Fetched records as aiokafka's C records, not ConsumerRecords built in Python (quirks).
        "value_deserializer": RAW_RECORDS,
    }


def producer_settings(cfg: ServeConfig) -> dict[str, Any]:
    """The daemon's producer: acks from every in-sync replica, since a checkpoint trusts an acknowledgement."""
    return {
        **client_settings(cfg),
        "client_id": f"{cfg.client_id}-producer",
        "acks": "all",
        "linger_ms": cfg.linger_ms,
        "max_batch_size": 1024 * 1024,
        "compression_type": None if cfg.compression == "none" else cfg.compression,
        "request_timeout_ms": 30_000,
    }


def transactional_producer_settings(cfg: ServeConfig, transactional_id: str, timeout_ms: int) -> dict[str, Any]:
    """One input partition's producer under exactly-once (``rnnd.daemon.kafka.transactions``).

    aiokafka turns idempotence on for a transactional producer (acks=all, ordered retries):
    the broker then drops the duplicates a retried produce request would write.
    """
    settings = producer_settings(cfg)
    return {**settings, "client_id": f"{cfg.client_id}-txn-{transactional_id.rsplit('.', 1)[-1]}",
            "transactional_id": transactional_id, "transaction_timeout_ms": timeout_ms}


def input_isolation(cfg: ServeConfig) -> str:
    """Exactly-once reads only committed inputs (an upstream transaction may still abort); at-least-once reads all."""
    return "read_committed" if cfg.exactly_once else "read_uncommitted"


def reader(connection: Mapping[str, Any], client_id: str, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer outside any consumer group, for partitions it is assigned by hand. Not started.

    Readers see committed records only (``read_committed``): the changelog restore must not
    feed in state of an aborted transaction, and ``rnnd verify``/``rnnd tail`` show what a
    downstream consumer of exactly-once outputs sees. Without transactions this reads everything.
    They read topics without joining a group: a join would rebalance the daemon's group (or
    anyone's) and pause for it, and none of them commits. With no group there is no committed
    position, so a partition starts at its beginning unless the reader seeks elsewhere. ``connection``: from
    :func:`connection_settings` or :func:`client_settings`; ``overrides``: fetch sizes and such.
    """
    import aiokafka

    settings = {**connection, "group_id": None, "enable_auto_commit": False, "auto_offset_reset": OFFSET_RESET,
                "client_id": client_id, "isolation_level": "read_committed", **overrides}
    return aiokafka.AIOKafkaConsumer(**settings)


def admin(connection: Mapping[str, Any], client_id: str, **overrides: Any) -> AIOKafkaAdminClient:
    """An admin client (topic lookups and creation). Not started."""
    import aiokafka.admin

    return aiokafka.admin.AIOKafkaAdminClient(**{**connection, "client_id": client_id, **overrides})
