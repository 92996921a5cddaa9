"""The harness's own Kafka traffic: filling input topics, pacing live traffic, reading outputs.

The harness competes for the same two cores as the contender it measures, so its producer
is librdkafka (``confluent_kafka``, installed with the ``bench`` extra through quixstreams)
where available: it fills a topic at ~700k messages/s and paces live traffic at a few percent
of a core, where aiokafka would take most of a core. aiokafka is the fallback.

``python -m bench.kafkaio --rate R --count N ...`` is the live-traffic producer: a separate
process, so its CPU is not charged to the harness's measurements of others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson


def produce(bootstrap: str, topic: str, items: Iterable[tuple[bytes, bytes]], rate: float = 0.0,
            linger_ms: int = 1) -> int:
    """Send ``items``; at ``rate`` messages/s when given (paced every millisecond), else at once.

    Returns the number sent. Record timestamps are set by the client at send time (CreateTime):
    they are the start of each message's end-to-end latency.
    """
    try:
        from confluent_kafka import Producer
    except ImportError:
        return asyncio.run(_produce_aiokafka(bootstrap, topic, items, rate, linger_ms))
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": linger_ms, "acks": "all",
                  "enable.idempotence": False, "queue.buffering.max.messages": 1_000_000,
                  "log_level": 3})
    n = 0
    start = time.perf_counter()
    for key, value in items:
        if rate:
            due = start + n / rate
            delay = due - time.perf_counter()
            if delay > 0.001:
                p.poll(0)
                time.sleep(delay)
        while True:
            try:
                p.produce(topic, key=key, value=value)
                break
            except BufferError:
                p.poll(0.01)
        n += 1
        if n % 1000 == 0:
            p.poll(0)
    left = p.flush(60)
    if left:
        raise RuntimeError(f"{left} message(s) to {topic} not acknowledged within 60 s")
    return n


async def _produce_aiokafka(bootstrap: str, topic: str, items: Iterable[tuple[bytes, bytes]], rate: float,
                            linger_ms: int) -> int:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=linger_ms, max_batch_size=1024 * 1024)
    await p.start()
    n = 0
    start = time.perf_counter()
    try:
        for key, value in items:
            if rate:
                delay = start + n / rate - time.perf_counter()
                if delay > 0.001:
                    await asyncio.sleep(delay)
            await p.send(topic, value=value, key=key)
            n += 1
        await p.flush()
    finally:
        await p.stop()
    return n


@dataclass
class Output:
    """One output record as the harness needs it."""

    timestamp: int  # CreateTime set by the contender's producer at send time (ms)
    key: bytes
    doc: dict[str, Any]


def read_all(bootstrap: str, topic: str, expect: int, timeout: float = 120.0, settle: float = 0.5,
             parse: bool = True) -> list[Output]:
    """Read ``topic`` from the start until ``expect`` records (then ``settle`` s more, to catch extras)."""
    return asyncio.run(_read_all(bootstrap, topic, expect, timeout, settle, parse))


async def _read_all(bootstrap: str, topic: str, expect: int, timeout: float, settle: float,
                    parse: bool) -> list[Output]:
    from aiokafka import TopicPartition

    from rnnd.daemon.kafka import partitions_of, reader

    c = reader({"bootstrap_servers": bootstrap}, "rnnd-bench-reader", max_partition_fetch_bytes=8 * 1024 * 1024,
               fetch_max_bytes=64 * 1024 * 1024)
    await c.start()
    try:
        deadline = time.monotonic() + timeout
        parts: list[int] = []
        while not parts and time.monotonic() < deadline:
            parts = await partitions_of(c, topic)
            if not parts:
                await asyncio.sleep(0.1)
        if not parts:
            return []
        c.assign([TopicPartition(topic, p) for p in parts])
        await c.seek_to_beginning()
        out: list[Output] = []
        settle_until = None
        while time.monotonic() < deadline:
            batches = await c.getmany(timeout_ms=100, max_records=50_000)
            for recs in batches.values():
                out.extend(Output(r.timestamp, r.key, orjson.loads(r.value) if parse else {}) for r in recs)
            if len(out) >= expect:
                settle_until = settle_until or time.monotonic() + settle
                if time.monotonic() >= settle_until:
                    break
        return out
    finally:
        await c.stop()


def delete_topics(bootstrap: str, names: list[str]) -> None:
    """Best effort: the embedded broker keeps everything in memory, and a full run writes ~2M records."""

    async def run() -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        await admin.start()
        try:
            await admin.delete_topics(names, timeout_ms=5000)
        finally:
            await admin.close()

    with contextlib.suppress(Exception):  # freeing memory is an optimisation, never a failure
        asyncio.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    """The live-traffic producer: ``--count`` messages of a workload at ``--rate`` messages/s."""
    from bench import workloads
    from bench.common import ModelInfo

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--kind", default="numeric")
    p.add_argument("--keys", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--steps-per-message", type=int, default=1)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--key-prefix", default="live-")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--linger-ms", type=int, default=1)
    args = p.parse_args(argv)
    spec = ModelInfo.load(args.model).spec
    data = workloads.Data(args.kind, args.keys, args.count, args.steps_per_message, args.seed, args.key_prefix)
    items = list(data.items(spec))  # generated before the clock starts
    t0 = time.time()
    n = produce(args.bootstrap, args.topic, items, rate=args.rate, linger_ms=args.linger_ms)
    took = time.time() - t0
    print(orjson.dumps({"sent": n, "seconds": took, "rate": n / took if took else 0.0}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
