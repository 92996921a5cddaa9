"""aiokafka plumbing: client settings, topic set-up, and the sink that never loses an output.

Delivery is at-least-once: an input offset is committed only after every output derived
from it has been acknowledged by the broker (the checkpoint flushes the ``Sink`` first).
A send that fails is sent again, so a broker outage delays outputs but does not drop them;
a resend may reorder outputs of one key, which their ids and step numbers make harmless.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from .config import ServeConfig
from .errors import TopicLayoutError

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
            raise MissingTopic(f"input topic {input_topic!r} does not exist on the brokers at "
                               f"{cfg.bootstrap_servers}: create it (rnnd topics create, with these settings and "
                               "the partition count you want: partitions bound how many replicas can share the "
                               "work) or check the name")
        meta = await admin.describe_topics([input_topic])
        parts = len(meta[0].get("partitions") or [])
        missing = [t for t in outputs if t not in existing]
        if missing and cfg.create_topics:
            replication = await default_replication(admin)
            new = [NewTopic(t, num_partitions=parts, replication_factor=replication,
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


async def broker_answers(client: Any, timeout: float) -> bool:
    """Whether a broker answers a request now: the liveness signal behind /readyz.

    A fetch that finds no broker returns empty-handed, like one that finds no data, so the
    consumer alone cannot tell an outage from a quiet topic. ``client`` is a producer's
    ``AIOKafkaClient``: its connections carry no long-polling fetch that would hold up the
    request. ApiVersions is the smallest request every broker answers.
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


#: Replicas of a topic rnnd creates: Kafka's usual production choice, fewer on a smaller cluster.
#: (aiokafka's NewTopic refuses Kafka's "broker default" of -1, so the count is chosen here.)
MAX_DEFAULT_REPLICATION = 3


async def default_replication(admin: AIOKafkaAdminClient) -> int:
    """Replication factor for new topics: the number of brokers, at most MAX_DEFAULT_REPLICATION."""
    cluster = await admin.describe_cluster()
    return max(1, min(MAX_DEFAULT_REPLICATION, len(cluster.get("brokers") or ())))


Headers = list[tuple[str, bytes]]
# A batch handed to the producer: its delivery future, and what to send again if it fails
# (topic, partition, the records, their headers).
_Sent = tuple[asyncio.Future, str, int, list[tuple], "list[Headers] | None"]


class Sink:
    """The producer, plus the bookkeeping that makes ``flush`` mean 'everything acknowledged'.

    Records go to the producer as whole record batches, one per partition per ``send_many``
    (aiokafka's ``create_batch``/``send_batch``), not one ``send()`` per record: per record,
    ``send()`` costs a partition-set lookup, a pure-Python murmur2 hash, a future and an
    accumulator append — together more than the model's share of a step (docs/benchmarks.md).
    Partitions follow Kafka's default partitioner (murmur2 of the key), cached per key, so a
    stream's predictions land where any Kafka client would have put them.
    """

    def __init__(self, producer: AIOKafkaProducer, on_error: Callable[[], None] | None = None) -> None:
        self.producer = producer
        self.on_error = on_error
        # One entry per batch handed to the producer: its future, and what to send again if it fails.
        self._sent: list[_Sent] = []
        self._partitions: dict[str, int] = {}  # topic → partition count
        self._key_partition: dict[str, dict[bytes, int]] = {}  # topic → key → partition
        self._tails: dict[tuple[str, int], asyncio.Task] = {}  # the last hand-over per partition
        self._handing: deque[asyncio.Task] = deque()  # hand-overs, oldest first

    async def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None,
                   partition: int | None = None) -> None:
        await self.send_many(topic, [(key, value)], None if partition is None else [partition],
                             None if headers is None else [headers])

    async def send_many(self, topic: str, items: Sequence[tuple], partitions: Sequence[int] | None = None,
                        headers: Sequence[Headers] | None = None) -> None:
        """Hand ``items`` to the producer, in order per partition.

        ``items`` are tuples whose first two elements are key and value (more are ignored: the
        pipeline's outputs pass as they are). ``partitions`` (one per item) overrides the key's
        partition: the changelog's partitions mirror the input's. ``headers``: one list per item.
        """
        if not items:
            return
        if partitions is None:
            n = await self._partition_count(topic)
            cache = self._key_partition[topic]
            partitions = []
            for item in items:
                key = item[0]
                p = cache.get(key) if key is not None else random.randrange(n)
                if p is None:
                    p = (murmur2(key) & 0x7FFFFFFF) % n
                    if len(cache) >= 1_000_000:
                        cache.clear()
                    cache[key] = p
                partitions.append(p)
        if len(set(partitions)) == 1:  # one partition: no regrouping
            self._sent += self._send_partition(topic, partitions[0], list(items),
                                               None if headers is None else list(headers))
        else:
            by_partition: dict[int, list[int]] = {}
            for i, p in enumerate(partitions):
                idx = by_partition.get(p)
                if idx is None:
                    idx = by_partition[p] = []
                idx.append(i)
            for p, idx in by_partition.items():
                self._sent += self._send_partition(topic, p, [items[i] for i in idx],
                                                   None if headers is None else [headers[i] for i in idx])
        while len(self._handing) > _MAX_HANDING:  # the producer is behind: wait here, not in memory
            await asyncio.wait([self._handing[0]])
            self._drop_handed()

    def _send_partition(self, topic: str, partition: int, items: list[tuple],
                        headers: list[Headers] | None) -> list[_Sent]:
        """Cut ``items`` into record batches and hand each to the producer; what to track for each."""
        producer = self.producer
        handed: list[_Sent] = []
        i, n = 0, len(items)
        while i < n:
            start = i
            batch = producer.create_batch()
            append = batch.append
            while i < n:
                item = items[i]
                h = headers[i] if headers is not None else _NO_HEADERS
                if append(key=item[0], value=item[1], timestamp=None, headers=h) is None:
                    break  # full: the rest goes in the next batch
                i += 1
            if i == start:  # one record larger than a batch: the producer's own path sizes (or refuses) it
                i += 1
                batch = None
            else:
                batch.close()  # complete: sent at once, no linger
            chunk = items[start:i]
            hs = None if headers is None else headers[start:i]
            handed.append((self._hand_over(topic, partition, batch, chunk, hs), topic, partition, chunk, hs))
        return handed

    def _hand_over(self, topic: str, partition: int, batch: Any, items: list[tuple],
                   headers: list[Headers] | None) -> asyncio.Future:
        """Give a batch to the producer in the background; the returned future is its delivery.

        ``send_batch`` waits until the partition's previous batch has left for the broker. Awaited
        in line, that wait (a produce round trip) would hold up the next model call; in the
        background, batches of one partition still go out in order, chained one behind the other.
        """
        loop = asyncio.get_running_loop()
        delivery = loop.create_future()
        tp = (topic, partition)
        task = loop.create_task(self._submit(self._tails.get(tp), topic, partition, batch, items, headers, delivery))
        self._tails[tp] = task
        self._handing.append(task)
        self._drop_handed()
        return delivery

    async def _submit(self, previous: asyncio.Task | None, topic: str, partition: int, batch: Any,
                      items: list[tuple], headers: list[Headers] | None, delivery: asyncio.Future) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])  # the partition's order
        try:
            if batch is not None:
                fut = await self.producer.send_batch(batch, topic, partition=partition)
            else:
                fut = await self.producer.send(topic, value=items[0][1], key=items[0][0],
                                               headers=headers[0] if headers else None, partition=partition)
        except Exception as e:  # accumulator full past request_timeout_ms, producer closed: flush resends
            if not delivery.done():
                delivery.set_exception(e if isinstance(e, KafkaError) else KafkaError(repr(e)))
            return
        fut.add_done_callback(lambda f: _settle(delivery, f))

    def _drop_handed(self) -> None:
        handing = self._handing
        while handing and handing[0].done():
            handing.popleft()

    async def _partition_count(self, topic: str) -> int:
        n = self._partitions.get(topic)
        if n is None:
            n = self._partitions[topic] = len(await self.producer.partitions_for(topic))
            self._key_partition[topic] = {}
        return n

    def _refresh_partitions(self) -> None:
        """Partitions can be added to a topic: keys then hash anew, as in every Kafka producer."""
        for topic, n in list(self._partitions.items()):
            try:
                now = len(self.producer.client.cluster.partitions_for_topic(topic) or ())
            except Exception:
                continue
            if now and now != n:
                log.info("topic %s now has %d partitions (was %d)", topic, now, n)
                self._partitions[topic] = now
                self._key_partition[topic] = {}

    async def flush(self, stopping: Callable[[], bool] = lambda: False) -> bool:
        """Wait until every record sent before this call is acknowledged, resending failures.

        Returns False only if ``stopping()`` became true with records still unacknowledged.
        Sends made while this runs (other tasks keep producing) are left for the next flush.
        """
        self._refresh_partitions()
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
                log.warning("%d record(s) not acknowledged (%s); sending them again", sum(len(s[3]) for s in failed),
                            _reason(failed[0][0]))
            if stopping():
                self._sent = failed + unfinished + self._sent
                return False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            todo = unfinished
            for _, topic, partition, items, headers in failed:
                todo += self._send_partition(topic, partition, items, headers)

    @property
    def unacknowledged(self) -> int:
        return sum(len(s[3]) for s in self._sent if not s[0].done())


_NO_HEADERS: Headers = []  # never mutated: aiokafka only iterates it
_MAX_HANDING = 256  # batches given to the background before send_many waits


def _settle(delivery: asyncio.Future, fut: asyncio.Future) -> None:
    if delivery.done():
        return
    if fut.cancelled():
        delivery.set_exception(KafkaError("delivery cancelled"))
    elif fut.exception() is not None:
        delivery.set_exception(fut.exception())
    else:
        delivery.set_result(fut.result())


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
