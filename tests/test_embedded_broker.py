"""The embedded Tansu broker and the Kafka fixtures, exercised with real aiokafka clients."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from rnnd.embedded_broker import EmbeddedBroker, broker_binary, create_topics

if "kafka_fixtures" not in sys.modules:  # conftest.py has not loaded the Kafka fixtures (yet)
    sys.path.insert(0, str(Path(__file__).parent))
    from kafka_fixtures import bootstrap, broker, broker_kind, topic_factory  # noqa: F401

N_MESSAGES = 200
N_KEYS = 23


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not reaped) still answers kill(0); it holds no port and does no harm.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


async def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    # No idempotence: Tansu rejects aiokafka's InitProducerId (see docs).
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=k) for k, v in records]
        await producer.flush()
        for f in futures:
            await f  # raises if any record was not acknowledged
    finally:
        await producer.stop()


async def _produce_and_consume(bootstrap: str, topic: str) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    records = [(f"key-{i % N_KEYS}".encode(), f"value-{i}".encode()) for i in range(N_MESSAGES)]
    await _produce(bootstrap, topic, records)

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"test-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # "latest" computes wrong offsets on Tansu
    )
    await consumer.start()
    got: list[tuple[int, bytes | None, bytes | None]] = []
    try:
        deadline = time.monotonic() + 30  # the group join alone pauses ~3 s on Tansu
        while len(got) < N_MESSAGES and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for tp, msgs in batches.items():
                got.extend((tp.partition, m.key, m.value) for m in msgs)
            if batches:
                await consumer.commit()
        assert len(got) == N_MESSAGES, f"received {len(got)} of {N_MESSAGES}"

        per_partition: dict[int, int] = defaultdict(int)
        for p, _, _ in got:
            per_partition[p] += 1
        assert len(per_partition) > 1, "keys should spread over more than one partition"
        committed = {p: await consumer.committed(TopicPartition(topic, p)) for p in range(4)}
        assert {p: committed[p] for p in per_partition} == dict(per_partition)
    finally:
        await consumer.stop()

    assert sorted(v for _, _, v in got) == sorted(v for _, v in records)
    partitions_of_key: dict[bytes | None, set[int]] = defaultdict(set)
    for p, k, _ in got:
        partitions_of_key[k].add(p)
    assert set(partitions_of_key) == {k for k, _ in records}
    assert all(len(ps) == 1 for ps in partitions_of_key.values()), partitions_of_key


def test_produce_and_consume_keyed_messages_in_a_group(bootstrap: str, topic_factory) -> None:
    topic = topic_factory("embedded-roundtrip", partitions=4)
    asyncio.run(asyncio.wait_for(_produce_and_consume(bootstrap, topic), timeout=60))


async def _topic_names(bootstrap: str) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await admin.list_topics()  # lists all topics; naming one would auto-create it
    finally:
        await admin.close()


async def _restart_scenario(b: EmbeddedBroker) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    topic = f"restart-{uuid.uuid4().hex[:8]}"
    address, old_pid = b.bootstrap_servers, b.pid
    await create_topics(address, {topic: 2})
    producer = AIOKafkaProducer(bootstrap_servers=address, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"before", key=b"k")

        await asyncio.to_thread(b.restart)
        assert b.bootstrap_servers == address
        assert b.pid is not None and b.pid != old_pid
        assert topic not in await _topic_names(address), "memory storage should have lost the topic"

        await create_topics(address, {topic: 2})
        # The producer started before the restart reconnects by itself.
        md = await producer.send_and_wait(topic, b"after", key=b"k")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(bootstrap_servers=address, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, md.partition)])
        batches = await consumer.getmany(timeout_ms=5000)
        values = [m.value for msgs in batches.values() for m in msgs]
    finally:
        await consumer.stop()
    assert values == [b"after"]


def test_restart_keeps_the_address_and_accepts_produces(tmp_path: Path) -> None:
    with EmbeddedBroker(log_dir=tmp_path) as b:
        port = b.port
        asyncio.run(asyncio.wait_for(_restart_scenario(b), timeout=60))
        assert b.port == port
    assert b.pid is None
    b.stop()  # idempotent


def test_start_fails_clearly_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        b = EmbeddedBroker(port=s.getsockname()[1], log_dir=tmp_path)
        with pytest.raises(RuntimeError, match="exited"):
            b.start()
        assert b.pid is None
        assert "Address in use" in b.log_path.read_text()


@pytest.mark.parametrize("how", ["normal-exit", "sigkill"])
def test_no_orphan_broker_after_the_python_process_ends(how: str, tmp_path: Path) -> None:
    """atexit covers a normal exit; on Linux the parent-death signal covers SIGKILL."""
    if how == "sigkill" and not sys.platform.startswith("linux"):
        pytest.skip("parent-death signal is Linux-only")
    code = textwrap.dedent(
        f"""
        import sys, time
        from rnnd.embedded_broker import EmbeddedBroker
        b = EmbeddedBroker(log_dir={str(tmp_path)!r}).start()
        print(b.pid, flush=True)
        if {how == "sigkill"!r}:
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    pid = int(proc.stdout.readline())
    assert _pid_alive(pid)
    if how == "sigkill":
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    deadline = time.monotonic() + 10
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"broker pid {pid} outlived its Python process ({how})")


def test_broker_binary_is_executable() -> None:
    path = broker_binary()
    assert path.is_file() and os.access(path, os.X_OK)
