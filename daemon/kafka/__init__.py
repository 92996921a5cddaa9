"""rnnd's Kafka layer: client settings, topic set-up, reading to the end, and the sink that never loses an output.

    clients   the settings every client is made with (security composed in); group-less readers
    quirks    every broker quirk and every use of aiokafka's private parts, each with the fact behind it
    topics    the daemon's topics at start: the input must exist, outputs and changelog match it
    reading   partitions from their beginning to their current end (changelog restore, verify)
    sink      batched produce, ``flush`` = everything acknowledged (at-least-once delivery)
    transactions  exactly-once: a transactional producer per input partition, one commit per checkpoint

Nothing here imports the daemon's configuration at run time (only its type, for hints), so
that the configuration and the changelog can use this layer without an import cycle.
"""

from __future__ import annotations

from ..errors import MissingTopicError
from .clients import (
    admin,
    client_settings,
    connection_settings,
    consumer_settings,
    producer_settings,
    reader,
    transactional_producer_settings,
)
from .quirks import (
    OFFSET_RESET,
    broker_answers,
    fetched_end,
    install_raw_records,
    known_partition_count,
    login_refused,
    partitions_of,
    position_at_end,
    topic_partitions,
    transactions_supported,
    watch_login_refusals,
)
from .reading import read_to_end
from .sink import Headers, Sink
from .topics import MAX_DEFAULT_REPLICATION, MissingTopic, default_replication, ensure_topics
from .transactions import TRANSACTION_TIMEOUT_MS, TransactionalSink, transactional_id

__all__ = [
    "MAX_DEFAULT_REPLICATION",
    "OFFSET_RESET",
    "TRANSACTION_TIMEOUT_MS",
    "Headers",
    "MissingTopic",
    "MissingTopicError",
    "Sink",
    "TransactionalSink",
    "admin",
    "broker_answers",
    "client_settings",
    "connection_settings",
    "consumer_settings",
    "default_replication",
    "ensure_topics",
    "fetched_end",
    "install_raw_records",
    "known_partition_count",
    "login_refused",
    "partitions_of",
    "position_at_end",
    "producer_settings",
    "read_to_end",
    "reader",
    "topic_partitions",
    "transactional_id",
    "transactional_producer_settings",
    "transactions_supported",
    "watch_login_refusals",
]
