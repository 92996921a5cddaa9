"""The sink: the producer, plus the bookkeeping that makes ``flush`` mean 'every output acknowledged'.

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
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from .quirks import known_partition_count

__all__ = ["Headers", "Sink"]

log = logging.getLogger("rnnd.kafka")


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
        self.last_error: BaseException | None = None  # why the last unacknowledged record was refused

    async def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None,
                   partition: int | None = None) -> None:
        await self.send_many(topic, [(key, value)], None if partition is None else [partition],
                             None if headers is None else [headers])

    async def send_many(self, topic: str, items: Sequence[tuple], partitions: Sequence[int] | None = None,
                        headers: Sequence[Headers] | None = None, sources: Sequence[int] | None = None) -> None:
        """Hand ``items`` to the producer, in order per partition.

        ``items`` are tuples whose first two elements are key and value (more are ignored: the
        pipeline's outputs pass as they are). ``partitions`` (one per item) overrides the key's
        partition: the changelog's partitions mirror the input's. ``headers``: one list per item.
        ``sources``: the input partitions the items came from, which only the exactly-once
        ``TransactionalSink`` needs (one producer serves them all here).
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
            now = known_partition_count(self.producer, topic)
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
                self.last_error = _error(failed[0][0])
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
    elif (error := fut.exception()) is not None:
        delivery.set_exception(error)
    else:
        delivery.set_result(fut.result())


def _error(fut: asyncio.Future) -> BaseException:
    if fut.cancelled():
        return KafkaError("delivery cancelled")
    return fut.exception() or KafkaError("?")


def _reason(fut: asyncio.Future) -> str:
    if fut.cancelled():
        return "cancelled"
    exc = fut.exception()
    return f"{type(exc).__name__}: {exc}" if exc else "?"
