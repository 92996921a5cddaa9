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
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from .quirks import append_records, known_partition_count

__all__ = ["Headers", "Sink", "default_partitions"]

log = logging.getLogger("rnnd.kafka")


Headers = list[tuple[str, bytes]]
# A part of a send_many queued for a partition: its delivery future, and what to send again if it
# fails (topic, partition, the records, their headers, their timestamp).
_Sent = tuple[asyncio.Future, str, int, list[tuple], "list[Headers] | None", int]
# What waits for a partition's pump: the records, their headers, their timestamp, their delivery.
_Queued = tuple[list[tuple], "list[Headers] | None", int, asyncio.Future]


_M = np.uint32(0x5BD1E995)  # murmur2's mixing constant
_SEED = 0x9747B28C


def default_partitions(keys: Sequence[bytes], partitions: int) -> list[int]:
    """The partition Kafka's default partitioner gives each keyed record (murmur2 of the key), as
    the Java clients and aiokafka place it; ``rnnd predict`` places a file's keys the same way.

    murmur2 runs on numpy's uint32 (which wraps as the hash's 32-bit arithmetic does) over every
    key of one length together: 0.16 µs a key in a batch of 10,000, where aiokafka's pure-Python
    murmur2 takes 1.7. A stream's first output pays it once; on a backlog of 10,000 new streams
    aiokafka's cost 17 ms of the event loop (100,000 new streams: 0.17 s).
    """
    out = [0] * len(keys)
    by_length: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        by_length.setdefault(len(key), []).append(i)
    with np.errstate(over="ignore"):
        for length, idx in by_length.items():
            data = np.frombuffer(b"".join([keys[i] for i in idx]), dtype=np.uint8).reshape(len(idx), length)
            h = np.full(len(idx), (_SEED ^ length) & 0xFFFFFFFF, dtype=np.uint32)
            whole = length // 4 * 4
            if whole:
                blocks = np.ascontiguousarray(data[:, :whole]).view("<u4")
                for j in range(whole // 4):
                    k = blocks[:, j] * _M
                    k ^= k >> np.uint32(24)
                    k *= _M
                    h *= _M
                    h ^= k
            extra = length - whole
            if extra >= 3:
                h ^= data[:, whole + 2].astype(np.uint32) << np.uint32(16)
            if extra >= 2:
                h ^= data[:, whole + 1].astype(np.uint32) << np.uint32(8)
            if extra >= 1:
                h ^= data[:, whole].astype(np.uint32)
                h *= _M
            h ^= h >> np.uint32(13)
            h *= _M
            h ^= h >> np.uint32(15)
            for i, p in zip(idx, ((h & np.uint32(0x7FFFFFFF)) % np.uint32(partitions)).tolist(), strict=True):
                out[i] = p
    return out


class Sink:
    """The producer, plus the bookkeeping that makes ``flush`` mean 'everything acknowledged'.

    Records go to the producer as whole record batches (aiokafka's ``create_batch``/
    ``send_batch``), not one ``send()`` per record: per record, ``send()`` costs a
    partition-set lookup, a pure-Python murmur2 hash, a future and an accumulator append —
    together more than the model's share of a step (docs/benchmarks.md). A pump per partition
    hands them over in the background, everything that queued up meanwhile in one go (``_pump``).
    Partitions follow Kafka's default partitioner (murmur2 of the key), cached per key, so a
    stream's predictions land where any Kafka client would have put them.

    Records carry the time ``send_many`` was called (CreateTime), as ``producer.send()`` stamps
    its records: the moment rnnd made the prediction, not the later moment the pump appends it
    to a batch (up to a produce round trip later, while the partition's previous batch is in flight).
    """

    def __init__(self, producer: AIOKafkaProducer, on_error: Callable[[], None] | None = None) -> None:
        self.producer = producer
        self.on_error = on_error
        # One entry per batch handed to the producer: its future, and what to send again if it fails.
        self._sent: list[_Sent] = []
        self._partitions: dict[str, int] = {}  # topic → partition count
        # topic → key → partition (None, a record without a key, is never stored: its partition is random)
        self._key_partition: dict[str, dict[bytes | None, int]] = {}
        # Per partition: the records waiting for its pump, and the pump (one task, while any wait).
        self._queued: dict[tuple[str, int], list[_Queued]] = {}
        self._pumps: dict[tuple[str, int], asyncio.Task] = {}
        self._queued_count = 0
        self._room = asyncio.Event()  # set when a pump takes queued records
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
        now = int(time.time() * 1000)
        if partitions is None:
            partitions = await self._partitions_of(topic, [item[0] for item in items])
        if len(set(partitions)) == 1:  # one partition: no regrouping
            self._sent += self._send_partition(topic, partitions[0], list(items),
                                               None if headers is None else list(headers), now)
        else:
            by_partition: dict[int, list[int]] = {}
            for i, p in enumerate(partitions):
                idx = by_partition.get(p)
                if idx is None:
                    idx = by_partition[p] = []
                idx.append(i)
            for p, idx in by_partition.items():
                self._sent += self._send_partition(topic, p, [items[i] for i in idx],
                                                   None if headers is None else [headers[i] for i in idx], now)
        while self._queued_count > _MAX_QUEUED:  # the producer is behind: wait here, not in memory
            self._room.clear()
            await self._room.wait()

    def _send_partition(self, topic: str, partition: int, items: list[tuple],
                        headers: list[Headers] | None, timestamp: int) -> list[_Sent]:
        """Queue ``items`` for the partition's pump; what to track for them (one delivery for all)."""
        delivery = asyncio.get_running_loop().create_future()
        delivery.add_done_callback(_taken)
        tp = (topic, partition)
        self._queued.setdefault(tp, []).append((items, headers, timestamp, delivery))
        self._queued_count += 1
        if tp not in self._pumps:
            self._pumps[tp] = asyncio.get_running_loop().create_task(self._pump(topic, partition))
        return [(delivery, topic, partition, items, headers, timestamp)]

    async def _pump(self, topic: str, partition: int) -> None:
        """Hand the partition's queued records to the producer, everything queued so far at once.

        aiokafka keeps one produce request in flight per broker and takes a partition's next
        batch only when the previous one has left (``send_batch`` waits for that). Queued
        records therefore go out together, in as few batches as they fit: outputs of several
        model calls made during one produce round trip share the next request, instead of each
        call's batch waiting for a round trip of its own (under live load that queue was
        rnnd's latency). Order within the partition is kept: one pump per partition.
        """
        tp = (topic, partition)
        queue = self._queued[tp]
        try:
            while queue:
                entries, queue[:] = list(queue), []
                self._queued_count -= len(entries)
                self._room.set()
                await self._send_entries(topic, partition, entries)
        finally:
            self._pumps.pop(tp, None)

    async def _send_entries(self, topic: str, partition: int, entries: list[_Queued]) -> None:
        producer = self.producer
        waiters = [_Delivery(d) for _, _, _, d in entries]
        batch: Any = None
        members: list[_Delivery] = []

        async def submit(send: Any, holders: list[_Delivery]) -> None:
            for w in holders:
                w.pending += 1
            try:
                fut = await send
            except Exception as e:  # accumulator full past request_timeout_ms, producer closed: flush resends
                err = e if isinstance(e, KafkaError) else KafkaError(repr(e))
                for w in holders:
                    w.failed(err)
                return
            def settle(f: asyncio.Future, holders: list[_Delivery] = holders) -> None:
                for w in holders:
                    w.settled(f)

            fut.add_done_callback(settle)

        for (items, headers, ts, _), w in zip(entries, waiters, strict=True):
            i, n = 0, len(items)
            while i < n:
                if batch is None:
                    batch, members = producer.create_batch(), []
                taken = append_records(batch, items, headers, ts, i)
                if taken:
                    i += taken
                    if not members or members[-1] is not w:
                        members.append(w)
                    if i == n:
                        break
                if members:  # full: it goes out, and items[i] starts the next
                    batch.close()
                    await submit(producer.send_batch(batch, topic, partition=partition), members)
                    batch = None
                    continue
                # larger than an empty batch: the producer's own path sizes (or refuses) it
                key, value = items[i][0], items[i][1]
                h = (headers[i] or None) if headers is not None else None
                await submit(producer.send(topic, value=value, key=key, headers=h, partition=partition,
                                           timestamp_ms=ts), [w])
                i += 1
        if batch is not None and members:
            batch.close()  # complete: sent at once, no linger
            await submit(producer.send_batch(batch, topic, partition=partition), members)
        for w in waiters:
            w.sealed()

    async def _partitions_of(self, topic: str, keys: list[bytes | None]) -> list[int]:
        """Each key's partition, by Kafka's default partitioner (cached per key); a record without a
        key goes to a random partition, as aiokafka's default partitioner sends it."""
        n = await self._partition_count(topic)
        cache = self._key_partition[topic]
        found = list(map(cache.get, keys))  # None: a new key, or no key
        if None in found:
            new = [i for i, p in enumerate(found) if p is None]
            keyed = [i for i in new if keys[i] is not None]
            if len(cache) + len(keyed) > 1_000_000:
                cache.clear()
            for i, p in zip(keyed, default_partitions(cast(list[bytes], [keys[i] for i in keyed]), n), strict=True):
                found[i] = cache[keys[i]] = p
            for i in new:
                if keys[i] is None:
                    found[i] = random.randrange(n)
        return cast(list[int], found)

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
            for _, topic, partition, items, headers, ts in failed:
                todo += self._send_partition(topic, partition, items, headers, ts)

    @property
    def unacknowledged(self) -> int:
        return sum(len(s[3]) for s in self._sent if not s[0].done())


_MAX_QUEUED = 256  # send_many calls' records waiting for their pumps before send_many waits


class _Delivery:
    """One queued ``send_many`` part: its delivery resolves when every batch holding its records is acknowledged."""

    __slots__ = ("delivery", "error", "open", "pending")

    def __init__(self, delivery: asyncio.Future) -> None:
        self.delivery = delivery
        self.pending = 0  # batches handed over, not yet settled
        self.open = True  # more batches may still take its records
        self.error: BaseException | None = None

    def failed(self, error: BaseException) -> None:
        self.pending -= 1
        self.error = self.error or error
        self._maybe_done()

    def settled(self, fut: asyncio.Future) -> None:
        self.pending -= 1
        if fut.cancelled():
            self.error = self.error or KafkaError("delivery cancelled")
        elif fut.exception() is not None:
            self.error = self.error or fut.exception()
        self._maybe_done()

    def sealed(self) -> None:
        self.open = False
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.open or self.pending or self.delivery.done():
            return
        if self.error is not None:
            self.delivery.set_exception(self.error)
        else:
            self.delivery.set_result(None)


def _taken(fut: asyncio.Future) -> None:
    """Mark a delivery's error as seen: :meth:`Sink.flush` reads deliveries by polling, and one that
    fails after its sink gave up on it (a fenced transaction, a stop) would otherwise be printed
    by asyncio as "never retrieved" when collected."""
    if not fut.cancelled():
        fut.exception()


def _error(fut: asyncio.Future) -> BaseException:
    if fut.cancelled():
        return KafkaError("delivery cancelled")
    return fut.exception() or KafkaError("?")


def _reason(fut: asyncio.Future) -> str:
    if fut.cancelled():
        return "cancelled"
    exc = fut.exception()
    return f"{type(exc).__name__}: {exc}" if exc else "?"
