"""Every broker quirk rnnd works around, and every use of aiokafka's private parts, in one place.

rnnd runs against Apache Kafka in production and against Tansu 0.6 (the embedded broker of
the demo and the tests). Code written to the rules below is right on both; code that breaks
one of them works on one broker and fails on the other. Measured on Tansu 0.6 with aiokafka
0.14 (``tests/test_kafka_quirks.py`` holds the functions here to them):

* A metadata request that names a topic makes Tansu (and Kafka with
  ``auto.create.topics.enable``) create it, with 4 partitions on Tansu: asking whether
  ``ghost`` exists creates ``ghost``. So topics are only ever looked up in the metadata of
  *all* topics (:func:`topic_partitions`, :func:`partitions_of`).
* Tansu answers ListOffsets(latest) with the first offset of the newest record batch + 1: after
  batches of 5 and 3 records, ``end_offsets()`` says 6 and ``seek_to_end()`` lands on 6, where
  the end is 8. ``auto_offset_reset="latest"`` uses the same request. The high watermark that
  every fetch response carries (``consumer.highwater()``) says 8, on Tansu as on Kafka; so the
  end of a partition is read there, after one fetch (:func:`fetched_end`,
  :func:`position_at_end`), and new readers start at ``"earliest"`` (:data:`OFFSET_RESET`).
* Tansu refuses InitProducerId: an idempotent or transactional aiokafka producer fails to
  start (UnknownError). At-least-once leaves idempotence off (aiokafka's default) and never
  depends on it (outputs carry ids); exactly-once needs transactions, so the daemon probes
  for them at start and refuses the setting, in one line, on such a broker
  (:func:`transactions_supported`).
* Reading "to the end" under ``read_committed`` (the changelog restore, ``rnnd verify``, ``rnnd
  tail``) means to the last stable offset, not the high watermark: records of a transaction
  still open lie between the two and are not returned, so a reader waiting for the high
  watermark would wait for the transaction. Every fetch response carries both; with no
  transaction open they are equal (always, on Tansu), so :func:`fetched_end` reads the
  last stable offset.
* aiokafka turns a login the broker refuses (SASL: a wrong password, an unknown user) into the
  same ``KafkaConnectionError("Unable to bootstrap ...")`` as a broker that is down, and logs
  the broker's reason (``SaslAuthenticationFailed: ... invalid credentials ...``) at ERROR on its
  own logger. rnnd keeps that logger off the terminal, so :func:`watch_login_refusals` keeps the
  last such reason and :func:`login_refused` hands it to the message that says what to fix.
* When a transactional aiokafka producer is fenced (a newer owner of its id), its sender task
  ends and fails everything it holds: the error lands on its transaction manager's waiter (only
  the next ``begin``/``commit`` would await it) and on the drain waiter of every batch still
  queued (awaited only by a later batch of the same partition). A producer closed after the
  failure awaits none of them, and asyncio prints each as "Future exception was never
  retrieved", with a traceback, when it is collected. :func:`forget_failure` takes them before
  the producer is dropped.
* aiokafka wraps every fetched record in a ``ConsumerRecord`` dataclass (eleven fields, the key
  and value lengths, a tuple of the headers), in Python, on the event loop: 0.78 µs a record
  where reading its parsed C record costs 0.26 (2,000 records of the wide benchmark's size,
  best of 30). The daemon's input consumer reads only a record's offset, timestamp, key, value
  and headers, all of which the C record has, so it takes the C records as they are
  (:data:`RAW_RECORDS`, :func:`install_raw_records`). Every other consumer in the process
  still gets ``ConsumerRecord`` objects.
* A batch from ``producer.create_batch()`` takes records through a Python method per record (a
  closed check, a serializer call, keyword arguments) around its C builder: 0.22 µs a record,
  against 0.09 through the builder itself. The sink appends through the builder
  (:func:`append_records`), which also leaves a batch that is full open, where aiokafka's
  method closes it.
* aiokafka has no public way to ask a consumer for the partitions of all topics (its
  ``topics()`` keeps only the names), to read what a producer already knows about a topic's
  partitions without a request, to send one small request to any broker, or to ask a
  transactional producer whether a transaction is open or what its fatal error was. Those go
  through the client object (``consumer._client``, ``producer.client``, ``producer._txn_manager``)
  here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from aiokafka.errors import KafkaError

#: Where a reader without a committed position starts. Not "latest": see the module docstring.
OFFSET_RESET = "earliest"


async def topic_partitions(admin: Any) -> dict[str, list[int]]:
    """Every topic the brokers know, with its partition ids, from the metadata of all topics.

    Asking for all topics, never for one by name, is what keeps a lookup from creating the
    topic it looks for. Topics whose metadata carries an error (being deleted, not
    authorised) are left out, as if they did not exist.
    """
    described = await admin.describe_topics()
    return {t["topic"]: sorted(p["partition"] for p in t["partitions"]) for t in described if t["error_code"] == 0}


async def partitions_of(consumer: Any, topic: str) -> list[int]:
    """The partition ids of ``topic`` as the brokers know them now (empty: no such topic), through a consumer.

    A consumer outside a group knows the metadata of the topics that existed when it started;
    a topic made since then is found by asking for all topics again, which only its client can
    do (``consumer.topics()`` keeps the names and drops the partitions).
    """
    cluster = await consumer._client.fetch_all_metadata()
    return sorted(cluster.partitions_for_topic(topic) or ())


def known_partition_count(producer: Any, topic: str) -> int:
    """The partitions of ``topic`` in the producer's cached metadata (0: not known); asks no broker.

    aiokafka refreshes that metadata in the background (``metadata_max_age_ms``) but offers
    only ``partitions_for(topic)``, which waits for a refresh when the topic is unknown; this
    reads the cache as it is, cheaply enough to do at every flush.
    """
    try:
        return len(producer.client.cluster.partitions_for_topic(topic) or ())
    except Exception:  # a producer that is closing has no usable cluster view: "not known"
        return 0


def fetched_end(consumer: Any, tp: Any) -> int | None:
    """Where ``tp`` ends for a reader: the last stable offset of its last fetch response (None before one).

    Not ``end_offsets()``, which Tansu answers with the start of the newest batch (+1); and not
    the high watermark, which lies past an open transaction's records (see the module docstring).
    A broker that reports no stable offset (-1) has no transactions: its high watermark is the end.
    """
    stable = consumer.last_stable_offset(tp)
    if stable is not None and stable >= 0:
        return int(stable)
    return consumer.highwater(tp)


def in_transaction(producer: Any) -> bool:
    """Whether a transactional producer has a transaction open (aiokafka keeps that in its manager only)."""
    manager = getattr(producer, "_txn_manager", None)
    return bool(manager is not None and manager.is_in_transaction())


def forget_failure(producer: Any) -> None:
    """Take the error a failed transactional producer left on futures nobody will await.

    The caller already holds the same error from the call that failed; taking it here only
    keeps asyncio from printing it again as never retrieved."""
    waiters = [getattr(getattr(producer, "_txn_manager", None), "_transaction_waiter", None)]
    accumulator = getattr(producer, "_message_accumulator", None)
    for queue in getattr(accumulator, "_batches", {}).values():
        waiters += [getattr(batch, "_drain_waiter", None) for batch in queue]
    for waiter in waiters:
        if isinstance(waiter, asyncio.Future) and waiter.done() and not waiter.cancelled():
            waiter.exception()


async def transactions_supported(producer: Any, timeout_s: float) -> str | None:
    """Start ``producer`` (transactional) and begin a transaction: None if that works, else why not, in words.

    Tansu answers InitProducerId with UnknownError; a broker whose ACLs deny the id answers
    TransactionalIdAuthorizationFailed. Connection errors are raised (the caller retries).
    The producer is stopped either way.
    """
    from aiokafka.errors import (
        KafkaConnectionError,
        TransactionalIdAuthorizationFailed,
        UnknownError,
        UnsupportedVersionError,
    )

    try:
        await asyncio.wait_for(producer.start(), timeout_s)
        await asyncio.wait_for(producer.begin_transaction(), timeout_s)
        return None
    except (UnknownError, UnsupportedVersionError) as e:
        return f"the broker refused InitProducerId ({type(e).__name__}): it has no transactions (Tansu has none)"
    except TransactionalIdAuthorizationFailed:
        return ("the broker denies this transactional id: grant Write and Describe on TransactionalId "
                "prefix <group id> (docs/compatibility.md)")
    except KafkaConnectionError:
        raise
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), timeout_s)


async def position_at_end(consumer: Any, tps: Sequence[Any], timeout_s: float = 15.0) -> None:
    """Position every partition of ``tps`` (assigned to ``consumer``) at its current end.

    What ``seek_to_end()`` is meant to do, done with the high watermark: fetch once from the
    beginning, read where each partition ends, seek there. The records of that first fetch (at
    most one fetch's worth per partition) are dropped.

    :raises TimeoutError: when a partition reports no watermark within ``timeout_s`` (the
        message names the partitions).
    """
    await consumer.seek_to_beginning(*tps)
    deadline = time.monotonic() + timeout_s
    while any(fetched_end(consumer, tp) is None for tp in tps):
        if time.monotonic() > deadline:
            unknown = [tp.partition for tp in tps if fetched_end(consumer, tp) is None]
            raise TimeoutError(f"could not find where partitions {unknown} end within {timeout_s:.0f} s")
        await consumer.getmany(*tps, timeout_ms=200)
    for tp in tps:
        consumer.seek(tp, fetched_end(consumer, tp))


async def broker_answers(client: Any, timeout: float) -> bool:
    """Whether a broker answers a request now: the liveness signal behind /readyz.

    A fetch that finds no broker returns empty-handed, like one that finds no data, so the
    consumer alone cannot tell an outage from a quiet topic. ``client`` is a producer's
    ``AIOKafkaClient`` (``producer.client``): its connections carry no long-polling fetch that
    would hold up the request. ApiVersions is the smallest request every broker answers.
    """
    from aiokafka.protocol.admin import ApiVersionRequest

    try:
        node = client.get_random_node()
        if node is None:
            return False
        await asyncio.wait_for(client.send(node, ApiVersionRequest()), timeout)
        return True
    except (KafkaError, OSError, TimeoutError):
        return False


_REFUSED = re.compile(r"SaslAuthenticationFailed: [^\n]*")


class _LoginRefusals(logging.Handler):
    """On aiokafka's logger: the broker's reason for the last refused login (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.reason: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        m = _REFUSED.search(record.getMessage())
        if m:
            self.reason = m.group(0)


_LOGIN_REFUSALS = _LoginRefusals()


def watch_login_refusals() -> None:
    """Keep the reason of every login aiokafka sees refused (once per process; idempotent)."""
    logger = logging.getLogger("aiokafka")
    if _LOGIN_REFUSALS not in logger.handlers:
        logger.addHandler(_LOGIN_REFUSALS)


def login_refused() -> str | None:
    """The broker's reason for the last refused login since the last call, or None (and forget it)."""
    reason, _LOGIN_REFUSALS.reason = _LOGIN_REFUSALS.reason, None
    return reason


def RAW_RECORDS(value: bytes | None) -> bytes | None:
    """The input consumer's ``value_deserializer``: a mark that asks for its fetched records as
    aiokafka's parsed C records (``offset``, ``timestamp``, ``key``, ``value``, ``headers``: what
    ``Pipeline.accept_many`` reads) instead of ``ConsumerRecord`` objects built around them.

    Called as a deserializer only where :func:`install_raw_records` could not take hold (another
    aiokafka): then it returns the value unchanged, and the records are ConsumerRecords, as
    correct and 0.5 µs dearer each.
    """
    return value


def install_raw_records() -> bool:
    """Make fetches of consumers marked with :data:`RAW_RECORDS` yield the C records; idempotent.

    aiokafka's fetcher builds a ``PartitionRecords`` per fetched partition, by the module-level
    name, and calls its ``_consumer_record`` once per record; the subclass installed under that
    name returns the record itself for a marked consumer and defers to aiokafka otherwise.
    Returns False (and changes nothing) where aiokafka is not laid out so.
    """
    from aiokafka.consumer import fetcher

    base = getattr(fetcher, "PartitionRecords", None)
    if base is None or not hasattr(base, "_consumer_record"):
        return False
    if getattr(base, "_rnnd_raw", False):
        return True

    class _PartitionRecords(base):  # type: ignore[misc,valid-type]
        _rnnd_raw = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self._value_deserializer is RAW_RECORDS:
                self._consumer_record = _as_is  # an instance attribute: looked up before the class's

    fetcher.PartitionRecords = _PartitionRecords
    return True


def _as_is(tp: Any, record: Any) -> Any:
    return record


def fetched_records(topic: str, partition: int, data: bytes, offset: int) -> list[Any]:
    """The records a marked consumer's fetch yields for ``data`` (record batches as a fetch
    response holds them, the first at ``offset``): aiokafka's fetcher code, C records. For
    measuring the intake without a broker (``bench.ceilings pipeline``)."""
    from aiokafka.consumer import fetcher
    from aiokafka.record.memory_records import MemoryRecords
    from aiokafka.structs import TopicPartition

    install_raw_records()
    return list(fetcher.PartitionRecords(TopicPartition(topic, partition), MemoryRecords(data), [], offset, None,
                                         RAW_RECORDS, True, 0))


_NO_HEADERS: list[tuple[str, bytes]] = []  # never mutated: the builder only iterates it


def append_records(batch: Any, items: Sequence[tuple], headers: Sequence[list[tuple[str, bytes]]] | None,
                   timestamp: int, start: int = 0) -> int:
    """Append ``items[start:]`` ((key, value, ...) tuples, one header list each if ``headers``) to an
    aiokafka ``BatchBuilder`` until it is full; how many it took (0: ``items[start]`` does not fit).

    Through the batch's C builder, as ``BatchBuilder.append`` does, keeping its record count: the
    batch is then sent as any other (``close``, ``send_batch``).
    """
    append = batch._builder.append
    offset = batch._relative_offset
    i, n = start, len(items)
    while i < n:
        item = items[i]
        if append(offset, timestamp, item[0], item[1], headers[i] if headers is not None else _NO_HEADERS) is None:
            break
        offset += 1
        i += 1
    batch._relative_offset = offset
    return i - start
