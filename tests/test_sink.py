"""The sink: outputs go out as whole record batches, yet land exactly where Kafka's default
partitioner puts them, in order per key, every one acknowledged by ``flush`` — and a batch the
broker did not take is sent again.

Real broker, real aiokafka producer. The only stand-in is the failure: a producer wrapper
whose first ``send_batch`` reports an error, as the broker would on a lost connection.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from aiokafka.partitioner import DefaultPartitioner

from rnnd.daemon.kafka import Sink

PARTITIONS = 4


async def _read(bootstrap: str, topic: str, expect: int, timeout: float = 30.0) -> list[Any]:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await c.start()
    try:
        c.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        await c.seek_to_beginning()
        out: list[Any] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(out) < expect and loop.time() < deadline:
            for recs in (await c.getmany(timeout_ms=200)).values():
                out.extend(recs)
        await asyncio.sleep(0.3)  # nothing more should come
        for recs in (await c.getmany(timeout_ms=200)).values():
            out.extend(recs)
        return out
    finally:
        await c.stop()


async def _with_sink(bootstrap: str, body: Any, wrap: Any = None, **producer: Any) -> Any:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, **producer)
    await p.start()
    try:
        return await body(Sink(wrap(p) if wrap else p))
    finally:
        await p.stop()


def test_outputs_land_on_the_default_partitioners_partition_in_order(bootstrap: str, topic_factory) -> None:
    topic = topic_factory("sink-out", partitions=PARTITIONS)
    keys = [f"stream-{i}".encode() for i in range(300)] + [b"\xff\x00binary", "ключ".encode()]
    items = [(k, f'{{"n":{n}}}'.encode(), 1_700_000_000_000) for n in range(8) for k in keys]

    async def body(sink: Sink) -> None:
        for lo in range(0, len(items), 700):  # several calls, like several model calls
            await sink.send_many(topic, items[lo:lo + 700])
        assert await sink.flush()
        assert sink.unacknowledged == 0

    asyncio.run(_with_sink(bootstrap, body))
    got = asyncio.run(_read(bootstrap, topic, len(items)))
    assert len(got) == len(items)
    expected = {k: DefaultPartitioner()(k, list(range(PARTITIONS)), list(range(PARTITIONS))) for k in keys}
    per_key: dict[bytes, list[int]] = defaultdict(list)
    for r in sorted(got, key=lambda r: (r.partition, r.offset)):
        assert r.partition == expected[r.key], r.key
        per_key[r.key].append(int(r.value[5:-1]))
    assert all(seq == list(range(8)) for seq in per_key.values())
    assert len({p for p in expected.values()}) == PARTITIONS


def test_headers_explicit_partitions_and_records_larger_than_a_batch(bootstrap: str, topic_factory) -> None:
    topic = topic_factory("sink-side", partitions=PARTITIONS)
    big = b"x" * 40_000  # larger than the 16 KiB batches of this producer: sent on its own
    # then 1,500 records of ~24 bytes in one call: three 16 KiB batches' worth, cut where each is full
    many = [(b"m", b'{"n":%d,"pad":"%s"}' % (n, b"p" * 8)) for n in range(1500)]
    items = [(None, b'{"dead": 1}'), (b"k", big), (b"k", b"small"), (b"k2", b"changelog"), *many]
    headers = [[("rnnd.reason", b"not_json")], [("h", b"1")], [], [], *([] for _ in many)]

    async def body(sink: Sink) -> None:
        await sink.send_many(topic, items, partitions=[3, 1, 1, 2, *(0 for _ in many)], headers=headers)
        assert await sink.flush()

    asyncio.run(_with_sink(bootstrap, body, max_batch_size=16 * 1024, max_request_size=1024 * 1024))
    records = asyncio.run(_read(bootstrap, topic, len(items)))
    spread = sorted((r for r in records if r.key == b"m"), key=lambda r: r.offset)
    assert [r.value for r in spread] == [v for _, v in many] and {r.partition for r in spread} == {0}
    got = {(r.partition, r.value[:20]): r for r in records if r.key != b"m"}
    assert len(got) == 4
    assert list(got[(3, b'{"dead": 1}')].headers) == [("rnnd.reason", b"not_json")]
    assert got[(3, b'{"dead": 1}')].key is None
    assert got[(1, big[:20])].value == big and list(got[(1, big[:20])].headers) == [("h", b"1")]
    assert got[(1, b"small")].offset > got[(1, big[:20])].offset  # order kept across the oversize record
    assert got[(2, b"changelog")].key == b"k2"


class _FailFirstBatch:
    """The real producer, except that the first batch handed to it is reported as not delivered."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._p = producer
        self.failed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._p, name)

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future:
        if not self.failed:
            self.failed += 1
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(KafkaConnectionError("connection lost (injected)"))
            return fut
        return await self._p.send_batch(batch, topic, partition=partition)


def test_a_batch_the_broker_did_not_take_is_sent_again_by_flush(bootstrap: str, topic_factory) -> None:
    topic = topic_factory("sink-retry", partitions=PARTITIONS)
    items = [(f"k{i % 40}".encode(), f"v{i}".encode()) for i in range(400)]
    errors: list[int] = []
    wrapped: list[_FailFirstBatch] = []

    def wrap(p: AIOKafkaProducer) -> Any:
        wrapped.append(_FailFirstBatch(p))
        return wrapped[0]

    async def body(sink: Sink) -> None:
        sink.on_error = lambda: errors.append(1)
        await sink.send_many(topic, items)
        assert await sink.flush()

    asyncio.run(_with_sink(bootstrap, body, wrap=wrap))
    got = asyncio.run(_read(bootstrap, topic, len(items)))
    assert wrapped[0].failed == 1 and errors == [1]
    assert sorted(r.value for r in got) == sorted(v for _, v in items)  # all there, none twice


def test_records_carry_the_time_they_were_handed_over_not_the_time_the_pump_appends_them(
        bootstrap: str, topic_factory) -> None:
    """CreateTime as ``producer.send()`` sets it: the moment of the prediction. The pump appends
    later (here 50 ms later, the loop held on purpose; under load, a produce round trip later)."""
    topic = topic_factory("sink-ts", partitions=PARTITIONS)
    items = [(f"k{i}".encode(), b"v") for i in range(50)]
    window: list[int] = []

    async def body(sink: Sink) -> None:
        window.append(int(time.time() * 1000))
        await sink.send_many(topic, items)
        window.append(int(time.time() * 1000) + 1)
        time.sleep(0.05)  # the loop is held: the pump has not run yet
        assert await sink.flush()

    asyncio.run(_with_sink(bootstrap, body))
    got = asyncio.run(_read(bootstrap, topic, len(items)))
    assert len(got) == len(items)
    assert all(window[0] <= r.timestamp <= window[1] for r in got), (window, sorted({r.timestamp for r in got}))

