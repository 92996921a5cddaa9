"""Broker quirks are worked around in one module, and the workarounds do what their docstrings say.

Every call that only works because of, or around, a broker's quirk or aiokafka's private
parts lives in ``rnnd.daemon.kafka.quirks``; a second copy elsewhere would drift (one fixed,
the other not). The behaviour tests run against the real broker: on Tansu they fail for the
naive calls the workarounds replace (``seek_to_end``, a metadata request naming a topic).
"""

from __future__ import annotations

import ast
import asyncio
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord
from kafka_fixtures import TopicFactory, run_async

from rnnd.daemon.kafka import (
    broker_answers,
    install_raw_records,
    known_partition_count,
    partitions_of,
    position_at_end,
    read_to_end,
    reader,
    topic_partitions,
)
from rnnd.daemon.kafka.quirks import RAW_RECORDS
from rnnd.embedded_broker import EmbeddedBroker, create_topics

REPO = Path(__file__).resolve().parents[1]
QUIRKS = REPO / "daemon" / "kafka" / "quirks.py"
#: The contenders' own Kafka code is "what users would write" and stays theirs (docs/benchmarks.md).
CONTENDERS = (REPO / "bench" / "contenders", REPO / "bench" / "common.py")

#: Attributes whose use is a workaround, a quirk-prone call, or aiokafka's private parts.
FORBIDDEN = {
    "_client": "aiokafka's private client object",
    "get_random_node": "a method of the client object",
    "fetch_all_metadata": "a method of the client object",
    "force_metadata_update": "a method of the client object",
    "end_offsets": "wrong on Tansu (the start of the newest batch + 1)",
    "seek_to_end": "wrong on Tansu (the start of the newest batch + 1)",
    "describe_topics": "naming a topic creates it on Tansu: quirks.topic_partitions asks for all",
    "list_topics": "quirks.topic_partitions answers the same with partitions",
    "PartitionRecords": "aiokafka's fetcher internals (quirks.install_raw_records)",
    "_consumer_record": "aiokafka's fetcher internals (quirks.install_raw_records)",
    "_builder": "a producer batch's C builder (quirks.append_records)",
    "_relative_offset": "a producer batch's record count (quirks.append_records)",
}


def _offences(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute):
            if node.attr in FORBIDDEN:
                found.append(f"{where}: .{node.attr} ({FORBIDDEN[node.attr]})")
            elif isinstance(node.value, ast.Attribute) and node.value.attr == "client":
                found.append(f"{where}: .client.{node.attr} (inside a producer's client object)")
        elif (isinstance(node, ast.keyword) and node.arg == "auto_offset_reset"
              and isinstance(node.value, ast.Constant) and node.value.value == "latest"):
            found.append(f'{where}: auto_offset_reset="latest" (wrong on Tansu)')
    return found


def test_broker_quirks_and_private_client_access_live_in_quirks_py_only() -> None:
    files = [p for folder in ("daemon", "cli", "bench") for p in (REPO / folder).rglob("*.py")
             if p != QUIRKS and not any(p == c or c in p.parents for c in CONTENDERS)]
    assert len(files) > 30 and REPO / "daemon" / "verify.py" in files
    offences = [o for p in files for o in _offences(p)]
    assert offences == [], "move these behind a function of rnnd.daemon.kafka.quirks:\n" + "\n".join(offences)
    assert _offences(QUIRKS), "the check no longer sees the workarounds it is meant to confine"


async def _admin(bootstrap: str) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    return admin


def test_topic_lookups_find_partitions_and_never_create_the_topic_looked_for(bootstrap: str,
                                                                            topic_factory: TopicFactory) -> None:
    known = topic_factory("quirks-known", partitions=3)
    ghost = f"quirks-ghost-{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        consumer = reader({"bootstrap_servers": bootstrap}, "rnnd-test")
        await consumer.start()  # before the next topic exists: its metadata must be asked for again
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        admin = await _admin(bootstrap)
        try:
            later = f"quirks-later-{uuid.uuid4().hex[:8]}"
            await create_topics(bootstrap, {later: 2})
            found = await topic_partitions(admin)
            assert found[known] == [0, 1, 2] and found[later] == [0, 1] and ghost not in found
            assert await partitions_of(consumer, known) == [0, 1, 2]
            assert await partitions_of(consumer, later) == [0, 1]
            assert await partitions_of(consumer, ghost) == []
            assert known_partition_count(producer, ghost) == 0  # not in its cache, and no request made
            await producer.partitions_for(known)
            assert known_partition_count(producer, known) == 3
            assert ghost not in await admin.list_topics()  # none of the lookups created it
        finally:
            await admin.close()
            await producer.stop()
            await consumer.stop()

    run_async(asyncio.wait_for(body(), 60))


def test_position_at_end_lands_after_the_newest_batch_and_read_to_end_reads_everything(
        bootstrap: str, topic_factory: TopicFactory) -> None:
    """After batches of 5 and 3 records, Tansu's ListOffsets says the end is 6: ``seek_to_end`` would
    replay the last two. The high watermark says 8."""
    topic = topic_factory("quirks-end", partitions=2)

    async def body() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50)
        await producer.start()
        try:
            for batch in ([f"a{i}" for i in range(5)], [f"b{i}" for i in range(3)]):
                for v in batch:
                    await producer.send(topic, v.encode(), partition=0)
                await producer.flush()  # one record batch each
            tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]  # partition 1 stays empty

            everything: list[bytes] = []
            consumer = reader({"bootstrap_servers": bootstrap}, "rnnd-test")
            await consumer.start()
            try:
                await read_to_end(consumer, tps, lambda tp, recs: everything.extend(r.value for r in recs))
            finally:
                await consumer.stop()
            assert everything == [f"a{i}".encode() for i in range(5)] + [f"b{i}".encode() for i in range(3)]

            # An offset range [2, 6): cut at its end, and read no further than the fetch that passed it.
            ranged: list[bytes] = []
            consumer = reader({"bootstrap_servers": bootstrap}, "rnnd-test")
            await consumer.start()
            try:
                await read_to_end(consumer, tps, lambda tp, recs: ranged.extend(r.value for r in recs),
                                  max_records=1, start=2, end=6)
                assert await consumer.position(tps[0]) == 6  # one record a fetch: stopped at the end
            finally:
                await consumer.stop()
            assert ranged == [b"a2", b"a3", b"a4", b"b0"]

            consumer = reader({"bootstrap_servers": bootstrap}, "rnnd-test")
            await consumer.start()
            try:
                consumer.assign(tps)
                await position_at_end(consumer, tps)
                assert [await consumer.position(tp) for tp in tps] == [8, 0]
                await (await producer.send(topic, b"after", partition=0))
                got: list[bytes] = []
                for _ in range(20):
                    for recs in (await consumer.getmany(timeout_ms=250)).values():
                        got += [r.value for r in recs]
                    if got:
                        break
                assert got == [b"after"]
            finally:
                await consumer.stop()
        finally:
            await producer.stop()

    run_async(asyncio.wait_for(body(), 60))


def test_a_consumer_marked_raw_reads_c_records_with_the_fields_the_pipeline_reads_and_others_keep_theirs(
        bootstrap: str, topic_factory: TopicFactory) -> None:
    """The daemon's input consumer (``RAW_RECORDS``) gets aiokafka's parsed C records: the same offset,
    timestamp, key, value and headers as the ConsumerRecord an unmarked consumer in the same
    process gets for the same record."""
    topic = topic_factory("quirks-raw", partitions=1)
    assert install_raw_records() and install_raw_records()  # installed once, then idempotent

    async def read(marked: bool) -> list:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                    group_id=f"raw-{uuid.uuid4().hex[:8]}",
                                    **({"value_deserializer": RAW_RECORDS} if marked else {}))
        await consumer.start()
        try:
            got: list = []
            for _ in range(40):
                for recs in (await consumer.getmany(timeout_ms=250)).values():
                    got += recs
                if len(got) >= 3:
                    return got
            raise AssertionError(f"read {len(got)} of 3 records")
        finally:
            await consumer.stop()

    async def body() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for i, headers in enumerate(([], [("trace", b"t-1")], [("a", b"1"), ("b", b"")])):
                await (await producer.send(topic, b'{"x":[%d]}' % i, key=b"k%d" % i, partition=0,
                                           timestamp_ms=1_700_000_000_000 + i, headers=headers))
        finally:
            await producer.stop()
        raw, plain = await read(True), await read(False)
        assert all(type(r) is ConsumerRecord for r in plain)
        assert not any(isinstance(r, ConsumerRecord) for r in raw)
        fields = ("offset", "timestamp", "key", "value")
        assert [tuple(getattr(r, f) for f in fields) for r in raw] == [tuple(getattr(r, f) for f in fields)
                                                                     for r in plain]
        assert [list(r.headers) for r in raw] == [list(r.headers) for r in plain] == [
            [], [("trace", b"t-1")], [("a", b"1"), ("b", b"")]]

    run_async(asyncio.wait_for(body(), 60))


def test_broker_answers_while_the_broker_runs_and_not_once_it_stopped(tmp_path: Path) -> None:
    async def body(broker: EmbeddedBroker) -> tuple[bool, bool]:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        await producer.start()
        try:
            up = await broker_answers(producer.client, 2.0)
            broker.stop()
            down = await broker_answers(producer.client, 2.0)
            return up, down
        finally:
            await producer.stop()

    with EmbeddedBroker(log_dir=tmp_path) as broker:
        assert asyncio.run(asyncio.wait_for(body(broker), 60)) == (True, False)
