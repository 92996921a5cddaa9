"""Durable state with real daemon processes: kill -9, rebalances, broker restarts, model upgrades.

The oracle is `rnnd verify`: it recomputes every stream offline (one call per stream segment,
from the initial state) and compares each prediction id in the output topic. The crash
schedule runs on Tansu (at-least-once) and on Apache Kafka in both guarantees, at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import random
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from daemon_harness import DaemonProcess, consume, produce
from kafka_fixtures import start_or_fail

from rnnd.apache_kafka import ApacheKafka
from rnnd.daemon.runtime import BundleModel
from rnnd.embedded_broker import EmbeddedBroker, create_topics

#: Every broker test here runs on Tansu and on Apache Kafka (tests/conftest.py).
BROKERS = ("tansu", "kafka")


class LiveProducer(threading.Thread):
    """Writes messages at a fixed rate while the test kills and restarts daemons.

    ``idempotent`` (Apache Kafka only: Tansu refuses InitProducerId) makes the producer's own retries
    safe: without it a batch the broker wrote but did not acknowledge before a restart is written twice,
    and the input holds more steps than the test sent."""

    def __init__(self, bootstrap: str, topic: str, items: list[tuple[bytes, dict]], rate: float,
                 idempotent: bool = False, hold: int = 0) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.items, self.rate = bootstrap, topic, items, rate
        self.idempotent = idempotent
        self.sent = 0
        self.error: BaseException | None = None
        # The last ``hold`` messages wait for ``go``: a phase of the test that must see live input gets
        # it however long the phases before it took on a loaded machine.
        self.hold = hold
        self.go = threading.Event()

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:
            self.error = e

    async def _run(self) -> None:
        p = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5,
                             enable_idempotence=self.idempotent)
        await p.start()
        try:
            start = time.monotonic()
            for i, (key, value) in enumerate(self.items):
                if self.hold and i == len(self.items) - self.hold and not self.go.is_set():
                    await p.flush()
                    while not self.go.is_set():
                        await asyncio.sleep(0.05)
                    start = time.monotonic() - i / self.rate  # the rest at the rate, from now
                await p.send(self.topic, key=key, value=json.dumps(value).encode())
                self.sent = i + 1
                ahead = start + (i + 1) / self.rate - time.monotonic()
                if ahead > 0.01:
                    await p.flush()
                    await asyncio.sleep(ahead)
            await p.flush()
        finally:
            await p.stop()


def workload(keys: int, messages: int, seed: int) -> tuple[list[tuple[bytes, dict]], int]:
    rng = np.random.default_rng(seed)
    items, steps = [], 0
    for _ in range(messages):
        key = f"dev-{int(rng.integers(keys))}".encode()
        n = 3 if rng.random() < 0.1 else 1
        x = rng.uniform(-1, 1, size=(n, 1)).round(6).tolist()
        items.append((key, {"x": x if n > 1 else x[0]}))
        steps += n
    return items, steps


def verify(bundle, bootstrap: str, topic_in: str, topic_out: str, *extra: str) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "rnnd", "verify", "--model", str(bundle), "--bootstrap-servers", bootstrap,
         "--input-topic", topic_in, "--output-topic", topic_out, "--json", *extra],
        capture_output=True, text=True, timeout=300)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def wait_complete(bundle, bootstrap: str, topic_in: str, topic_out: str, expected_steps: int,
                  timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        _, report = verify(bundle, bootstrap, topic_in, topic_out)
        if (report["missing"] == 0 and report["expected"] >= expected_steps) or time.monotonic() > deadline:
            return report
        time.sleep(2)


def topics(bootstrap: str, prefix: str, partitions: int) -> tuple[str, str]:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(bootstrap, {f"{name}-in": partitions, f"{name}-out": partitions}))
    return f"{name}-in", f"{name}-out"


def wait_for_line(d: DaemonProcess, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in d.log():
        assert d.proc is not None and d.proc.poll() is None, d.log()[-3000:]
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout}s:\n{d.log()[-3000:]}"
        time.sleep(0.02)


def verify_as(guarantee: str, bundle, bootstrap: str, topic_in: str, topic_out: str) -> tuple[int, dict]:
    """`rnnd verify` with the daemon's guarantee: under exactly_once a duplicate fails it (exit 1)."""
    return verify(bundle, bootstrap, topic_in, topic_out, "--processing-guarantee", guarantee)


def check(report: dict[str, Any], steps: int, guarantee: str) -> None:
    assert report["expected"] == steps
    assert report["missing"] == 0 and report["wrong"] == 0 and report["unexpected"] == 0, report
    assert report["max_error"] <= 1e-4
    if guarantee == "exactly_once":
        assert report["duplicated"] == 0, report


def crash_schedule(where: str, guarantee: str, bootstrap: str, bundle, tmp_path) -> tuple[int, dict[str, Any], int]:
    """Live input (≥ 20,000 steps over 300 keys) while: 6 kill -9s at random moments, two of them the
    moment a restore begins; then two replicas, a third joining mid-stream, one killed, one leaving
    gracefully. Then `rnnd verify` with the daemons' guarantee: its exit code, its report, the steps sent."""
    topic_in, topic_out = topics(bootstrap, f"crash-{where}-{guarantee}", 6)
    items, steps = workload(keys=300, messages=18_000, seed=11)
    assert steps >= 20_000
    group = f"g-{topic_in}"
    mode = ("--processing-guarantee", guarantee)
    folder = tmp_path / f"{where}-{guarantee}"
    folder.mkdir()

    def daemon() -> DaemonProcess:
        return DaemonProcess(bundle, bootstrap, topic_in, topic_out, *mode, group=group, log_dir=folder)

    # ~64 s during the kills; the last 2,000 messages (8 s) wait for the replicas, so that they see live
    # input however long the kills took
    producer = LiveProducer(bootstrap, topic_in, items, rate=250, idempotent=where == "kafka", hold=2_000)
    producer.start()
    rng = random.Random(7)
    logs: list[str] = []
    for kill in range(6):
        with daemon() as d:
            if kill in (1, 4):  # the moment a restore begins (once the changelog holds state)
                d.start(wait_ready=False)
                wait_for_line(d, "restoring partitions")
            else:  # mid-batch, mid-checkpoint, mid-transaction
                d.start()
                time.sleep(rng.uniform(0.3, 2.5))
            assert d.kill() == -9
            logs.append(d.log())
    assert producer.is_alive() and producer.error is None
    with contextlib.ExitStack() as running:  # a failed assertion leaves no replica behind
        a, b = (running.enter_context(daemon()).start() for _ in range(2))
        producer.go.set()
        time.sleep(2)
        c = running.enter_context(daemon()).start()  # joins mid-stream: takes partitions from a and b
        time.sleep(2)
        assert b.kill() == -9  # its partitions move after the session timeout (their transactions aborted)
        time.sleep(1)
        committed = a.metric("rnnd_transactions_total", outcome="committed")
        assert a.stop() == 0  # leaves gracefully (checkpoint, then its partitions move): c takes everything
        producer.join(120)
        assert producer.error is None and producer.sent == len(items)
        wait_complete(bundle, bootstrap, topic_in, topic_out, steps, timeout=180)
        committed += c.metric("rnnd_transactions_total", outcome="committed")
        assert (committed > 0) == (guarantee == "exactly_once")
        assert c.stop() == 0
    logs += [a.log(), b.log(), c.log()]
    assert "revoked" in a.log() and "restored" in c.log()
    assert not [line for log in logs for line in log.splitlines() if "Traceback" in line]
    code, report = verify_as(guarantee, bundle, bootstrap, topic_in, topic_out)
    return code, report, steps


@pytest.mark.brokers("tansu")  # ``bootstrap`` is Tansu's; the Kafka node comes from ``apache_kafka``
def test_crash_schedule_loses_nothing(bootstrap, apache_kafka, recipe_bundle, tmp_path):
    """The crash schedule on Tansu (at-least-once: it has no transactions) and on Apache Kafka in both
    guarantees, all three at once on their own topics and groups: the same moments and the same machine
    load for each, in the wall time of one. At-least-once: no prediction missing or wrong (duplicates
    are printed); exactly-once: none duplicated either."""
    bundle = recipe_bundle("product")
    runs = (("tansu", "at_least_once", bootstrap), ("kafka", "at_least_once", apache_kafka.bootstrap_servers),
            ("kafka", "exactly_once", apache_kafka.bootstrap_servers))
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        futures = {(w, g): pool.submit(crash_schedule, w, g, bs, bundle, tmp_path) for w, g, bs in runs}
        results = {k: f.result() for k, f in futures.items()}
    for (where, guarantee), (code, report, steps) in results.items():
        check(report, steps, guarantee)
        assert code == 0, report
        print(f"{where}, {guarantee}: after 7 kill -9s, a join and a graceful leave, {report['duplicated']} "
              f"duplicated predictions ({report['duplicated_identical']} identical), max error "
              f"{report['max_error']:.1e}")


def test_broker_restart_while_serving(recipe_bundle, tmp_path):
    """Memory storage loses the broker's data on restart: only the daemon's behaviour is checked."""
    bundle = recipe_bundle("product")
    with EmbeddedBroker(log_dir=tmp_path) as broker:
        bs = broker.bootstrap_servers
        asyncio.run(create_topics(bs, {"in": 2, "out": 2}))
        produce(bs, "in", [(b"k", {"x": [0.1]})] * 5)
        with DaemonProcess(bundle, bs, "in", "out", log_dir=tmp_path) as d:
            d.start()
            assert len(consume(bs, "out", 5, timeout=30)) == 5
            broker.stop()
            time.sleep(4)
            assert d.proc.poll() is None, d.log()
            assert d.http("/healthz")[0] == 200
            broker.start()
            asyncio.run(create_topics(bs, {"in": 2, "out": 2}))
            deadline = time.monotonic() + 90
            got = []
            while time.monotonic() < deadline and not got:
                produce(bs, "in", [(b"after", {"x": [0.2]})])
                got = [o for o in consume(bs, "out", 1, timeout=5) if o.key == b"after"]
            assert got, d.log()[-3000:]
            assert d.proc.poll() is None
            assert d.stop() == 0
            assert "Traceback" not in d.log()


def steps_by_key(items: list[tuple[bytes, dict]]) -> dict[bytes, int]:
    """How many steps each key's messages hold (a message is one step, or a list of steps)."""
    out: dict[bytes, int] = {}
    for key, value in items:
        x = value["x"]
        out[key] = out.get(key, 0) + (len(x) if isinstance(x[0], list) else 1)
    return out


def test_broker_restart_keeps_state_and_outputs_on_apache_kafka(recipe_bundle, tmp_path):
    """Kafka's log persists: after a broker restart the streams go on where they were.

    A private node (the session's must not be restarted), restarted twice with the same keys
    before and after: once under a serving daemon, which must ride it out with its state;
    once with no daemon running, so the next daemon has only what the broker kept (the
    changelog, the committed offsets) to go on from. `rnnd verify` recomputes every stream
    in one piece, and each key's steps after a restart must continue its count: a daemon
    that lost state or offsets, or a broker that lost records, fails here. (Waiting is by
    counting outputs, verify runs once at the end: each run of it is a process of its own.)
    """
    bundle = recipe_bundle("product")
    phases = [workload(keys=40, messages=600, seed=seed)[0] for seed in (11, 12, 13)]
    per_phase = [steps_by_key(items) for items in phases]
    assert all(set(p) == set(per_phase[0]) for p in per_phase)  # the same streams in every phase
    total = sum(sum(p.values()) for p in per_phase)
    node = start_or_fail(ApacheKafka(tmp_path / "kafka"))
    try:
        bs = node.bootstrap_servers
        asyncio.run(create_topics(bs, {"in": 2, "out": 2}))
        sent = [produce(bs, "in", phases[0])]
        with DaemonProcess(bundle, bs, "in", "out", group="g-restart", log_dir=tmp_path) as d:
            d.start()
            first = sum(per_phase[0].values())
            assert len(consume(bs, "out", first, timeout=60, settle=1.0)) == first
            node.stop()
            time.sleep(4)
            assert d.proc.poll() is None, d.log()
            assert d.http("/healthz")[0] == 200
            node.start()
            sent.append(produce(bs, "in", phases[1]))
            second = first + sum(per_phase[1].values())
            assert len(consume(bs, "out", second, timeout=90, settle=1.0)) >= second
            assert d.proc.poll() is None
            assert d.stop() == 0
        node.restart()  # nothing runs: the streams' state is on the broker's disk only
        with DaemonProcess(bundle, bs, "in", "out", group="g-restart", log_dir=tmp_path) as d2:
            d2.start()
            sent.append(produce(bs, "in", phases[2]))
            assert len(consume(bs, "out", total, timeout=90, settle=1.0)) >= total
            assert d2.stop() == 0
        assert f"restored {len(per_phase[0])} stream(s)" in d2.log(), d2.log()[-3000:]
        assert "Traceback" not in d.log() + d2.log()
        code, report = verify(bundle, bs, "in", "out")
        assert report["expected"] == total
        assert report["missing"] == 0 and report["wrong"] == 0 and report["unexpected"] == 0, report
        assert code == 0
        outputs = consume(bs, "out", total, timeout=60, settle=1.0)
    finally:
        node.stop()
    phase_of = {(s.partition, s.offset): i for i, phase in enumerate(sent) for s in phase}
    steps: dict[tuple[int, bytes], set[int]] = {}
    for o in outputs:
        steps.setdefault((phase_of[(o.value["partition"], o.value["offset"])], o.key), set()).add(o.value["step"])
    start = dict.fromkeys(per_phase[0], 0)
    for i, counts in enumerate(per_phase):
        for key, n in counts.items():
            assert sorted(steps[(i, key)]) == list(range(start[key], start[key] + n)), (i, key)
            start[key] += n


@pytest.mark.brokers("tansu")  # ``bootstrap`` is Tansu's; the Kafka node comes from ``apache_kafka``
def test_model_upgrade_policies(bootstrap, apache_kafka, upgrade_bundles, tmp_path):
    """The upgrade schedule on Tansu and on Apache Kafka at once, each on its own topics and group
    (the wall time of one: Tansu's group joins pause 3 s each, five daemons in a row)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(upgrade_schedule, bs, upgrade_bundles, tmp_path / where)
                   for where, bs in (("tansu", bootstrap), ("kafka", apache_kafka.bootstrap_servers))]
        for f in futures:
            f.result()


def upgrade_schedule(bootstrap: str, upgrade_bundles, tmp_path) -> None:
    """v1 → v2 (same state layout: streams continue) → v3 (another layout: refused; then served by
    the previous model when told so; then restarted from initial state when told so)."""
    tmp_path.mkdir()
    v1, v2, v3 = upgrade_bundles
    m1, m2, m3 = BundleModel(v1), BundleModel(v2), BundleModel(v3)
    assert m1.spec.state_hash == m2.spec.state_hash != m3.spec.state_hash
    rng = np.random.default_rng(9)
    xs = rng.uniform(-1, 1, size=(6, 1)).astype(np.float32)
    topic_in, topic_out = topics(bootstrap, "up", 1)
    group = f"g-{topic_in}"

    def run(bundle, first: int, last: int, *extra: str) -> list[dict]:
        produce(bootstrap, topic_in, [(b"s", {"x": xs[i].tolist()}) for i in range(first, last)])
        with DaemonProcess(bundle, bootstrap, topic_in, topic_out, *extra, group=group, log_dir=tmp_path) as d:
            d.start()
            outs = [o.value for o in consume(bootstrap, topic_out, last, timeout=30, settle=0.5)]
            assert d.stop() == 0
        return sorted(outs, key=lambda v: v["offset"])[first:last]

    def y(model: BundleModel, x: np.ndarray, state=None):
        out, state = model.run_sequence(x[None], chunk=1, states=state)
        return out[0, :, 0], state

    out1 = run(v1, 0, 2)
    _, state_after_v1 = y(m1, xs[:2])
    # Compatible upgrade: the stream continues — its step count and its state.
    out2 = run(v2, 2, 4)
    assert [v["step"] for v in out2] == [2, 3] and {v["model"] for v in out2} == {m2.spec.model.ref}
    ref2, _ = y(m2, xs[2:4], state_after_v1)
    assert np.max(np.abs(np.array([v["prediction"]["values"]["x_prev_times_x"] for v in out2]) - ref2)) <= 1e-4
    assert [v["step"] for v in out1] == [0, 1]
    # Incompatible: refused by default, with the way out in the message.
    d = DaemonProcess(v3, bootstrap, topic_in, topic_out, group=group, log_dir=tmp_path).start(wait_ready=False)
    assert d.wait(60) == 2
    assert "on_state_mismatch" in d.log()
    # ... served by the previous model when the operator says so,
    prev = run(v3, 4, 5, "--on-state-mismatch", "previous", "--previous-model", str(v2))
    assert prev[0]["model"] == m2.spec.model.ref and prev[0]["step"] == 4
    # ... or the streams restart from their initial state on the new model.
    reset = run(v3, 5, 6, "--on-state-mismatch", "reset")
    assert reset[0]["model"] == m3.spec.model.ref and reset[0]["step"] == 0
    ref3, _ = y(m3, xs[5:6])
    assert abs(reset[0]["prediction"]["values"]["x_prev_times_x"] - ref3[0]) <= 1e-4
