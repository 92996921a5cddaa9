"""Exactly-once on Apache Kafka, beyond the crash schedule (tests/test_durability.py runs that in both
guarantees): fencing, a broker restart, the refusal on Tansu, and `rnnd verify`'s strictness.

A frozen replica (SIGSTOP past its session timeout) shows the fencing end to end; the fencing itself
is shown on the broker by two transactional sinks opening one partition. Tansu has no
transactions: there the setting is refused at start, in one line.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess
from test_durability import LiveProducer, check, topics, verify_as, wait_complete, workload

from rnnd.daemon import config
from rnnd.daemon.errors import ConfigError


def test_a_frozen_replica_is_fenced_when_it_wakes(apache_kafka: Any, recipe_bundle: Any, tmp_path: Path) -> None:
    """SIGSTOP one of two replicas past its session timeout: the other takes its partitions (and fences its
    producers). Woken, the zombie learns of the rebalance or has its commit refused, whichever comes first
    (the refusal itself: ``test_a_partitions_new_producer_fences_the_old_one``); no prediction is written twice."""
    bootstrap = apache_kafka.bootstrap_servers
    bundle = recipe_bundle("product")
    topic_in, topic_out = topics(bootstrap, "zombie", 4)
    items, steps = workload(keys=200, messages=6000, seed=12)
    group = f"g-{topic_in}"

    def daemon() -> DaemonProcess:
        return DaemonProcess(bundle, bootstrap, topic_in, topic_out, "--processing-guarantee", "exactly_once",
                             group=group, log_dir=tmp_path)

    producer = LiveProducer(bootstrap, topic_in, items, rate=600, idempotent=True)
    producer.start()
    with daemon() as a, daemon() as b:
        a.start(), b.start()
        time.sleep(3)  # both serve their share
        restores = b.log().count("restored")
        a.send_signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 60
            while b.log().count("restored") == restores:  # b took a's partitions: a's transactional ids are b's now
                assert time.monotonic() < deadline, b.log()[-3000:]
                time.sleep(0.05)
            time.sleep(1)
        finally:
            a.send_signal(signal.SIGCONT)
        producer.join(120)
        assert producer.error is None
        wait_complete(bundle, bootstrap, topic_in, topic_out, steps, timeout=120)
        assert a.stop() == 0 and b.stop() == 0
    assert "another producer took their transactional ids" in a.log() or "revoked" in a.log(), a.log()[-3000:]
    code, report = verify_as("exactly_once", bundle, bootstrap, topic_in, topic_out)
    check(report, steps, "exactly_once")
    assert code == 0


def test_exactly_once_survives_a_broker_restart(recipe_bundle: Any, tmp_path: Path) -> None:
    """Mid-stream, the broker stops and starts again (its log persists): open transactions fail and are aborted,
    their partitions come back from their last commit, and the outputs stay exactly once."""
    from rnnd.apache_kafka import ApacheKafka

    bundle = recipe_bundle("product")
    with ApacheKafka(tmp_path / "kafka") as broker:
        bootstrap = broker.bootstrap_servers
        topic_in, topic_out = topics(bootstrap, "restart", 4)
        items, steps = workload(keys=100, messages=5000, seed=13)
        producer = LiveProducer(bootstrap, topic_in, items, rate=500, idempotent=True)
        producer.start()
        with DaemonProcess(bundle, bootstrap, topic_in, topic_out, "--processing-guarantee", "exactly_once",
                           log_dir=tmp_path) as d:
            d.start()
            time.sleep(3)
            broker.restart()
            assert d.proc is not None and d.proc.poll() is None, d.log()[-3000:]
            producer.join(180)
            assert producer.error is None and producer.sent == len(items)
            wait_complete(bundle, bootstrap, topic_in, topic_out, steps, timeout=180)
            assert d.stop() == 0
            assert "Traceback" not in d.log()
        code, report = verify_as("exactly_once", bundle, bootstrap, topic_in, topic_out)
        check(report, steps, "exactly_once")
        assert code == 0


def test_exactly_once_is_refused_on_a_broker_without_transactions(bootstrap: str, topic_factory: Any,
                                                                  recipe_bundle: Any, tmp_path: Path) -> None:
    """Tansu (the default test broker) has no transactions: exit 2 and one line that says what to do."""
    topic_in, topic_out = topic_factory("refuse-in", 2), topic_factory("refuse-out", 2)
    d = DaemonProcess(recipe_bundle("product"), bootstrap, topic_in, topic_out, "--processing-guarantee",
                      "exactly_once", log_dir=tmp_path).start(wait_ready=False)
    assert d.wait(60) == 2
    log = d.log()
    assert "Traceback" not in log
    [line] = [x for x in log.splitlines() if "processing_guarantee=exactly_once cannot work" in x]
    assert "no transactions" in line and "processing_guarantee=at_least_once" in line


def test_exactly_once_needs_the_changelog() -> None:
    argv = {"model": "m.onnx", "input_topic": "in", "output_topic": "out", "processing_guarantee": "exactly_once",
            "changelog": False}
    with pytest.raises(ConfigError, match="exactly_once needs changelog=true"):
        config.load(argv_values=argv, env={})


def test_a_partitions_new_producer_fences_the_old_one(apache_kafka: Any) -> None:
    """The mechanism under the zombie test, on the real broker: the second ``TransactionalSink`` to open a
    partition aborts what the first left open and fences it — the first's commit fails with ProducerFenced,
    and a read_committed reader sees only the second's records."""
    from aiokafka import AIOKafkaProducer, TopicPartition

    from rnnd.daemon import kafka
    from rnnd.daemon.kafka.quirks import fetched_end

    bootstrap = apache_kafka.bootstrap_servers
    topic_in, topic_out = topics(bootstrap, "fence", 1)
    group = f"g-{topic_in}"

    def sink() -> kafka.TransactionalSink:
        return kafka.TransactionalSink(
            lambda p: AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=kafka.transactional_id(
                group, topic_in, p), transaction_timeout_ms=kafka.TRANSACTION_TIMEOUT_MS),
            kafka.Sink, group, topic_in)

    async def scenario() -> list[bytes]:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: unhandled.append(context))
        old, new = sink(), sink()
        await old.open(0)
        await old.send_many(topic_out, [(b"k", b"zombie")], sources=[0])
        await new.open(0)  # fences `old`, aborts its open transaction
        await new.send_many(topic_out, [(b"k", b"owner")], sources=[0])
        done, failed = await new.commit({0: 1})
        assert done == {0} and not failed
        done, failed = await old.commit({0: 1})
        assert not done and kafka.TransactionalSink.fenced(failed[0]), failed
        await old.close_all()
        await new.close_all()
        reader = kafka.reader({"bootstrap_servers": bootstrap}, "fence-check")
        await reader.start()
        try:
            tp = TopicPartition(topic_out, 0)
            seen: list[bytes] = []
            await kafka.read_to_end(reader, [tp], lambda _, recs: seen.extend(r.value for r in recs))
            assert fetched_end(reader, tp) is not None
            return seen
        finally:
            await reader.stop()

    unhandled: list[dict] = []  # e.g. a fenced producer's error that nobody took ("never retrieved")
    assert asyncio.run(scenario()) == [b"owner"]
    gc.collect()  # what the scenario dropped is collected now, its loop's handler still set
    assert not unhandled, [(c.get("future"), c.get("source_traceback")) for c in unhandled]


def test_verify_counts_a_duplicate_as_a_failure_only_under_exactly_once() -> None:
    from rnnd.daemon.verify import Report

    assert Report(expected=2, received=3, duplicated=1).ok
    strict = Report(expected=2, received=3, duplicated=1, exactly_once=True)
    assert not strict.ok and "exactly_once: none allowed" in strict.text() and strict.text().endswith("FAILED")
    assert Report(expected=2, received=2, exactly_once=True).ok
