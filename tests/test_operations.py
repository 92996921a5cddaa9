"""What an operator sees, on a real daemon process and a real broker: metrics that exist from
the start, a lag that counts what waits, readiness that follows the broker, a missing topic
called missing, and non-finite predictions counted, marked, logged and verified."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from daemon_harness import DaemonProcess, consume, produce
from kafka_fixtures import run_async
from torch import nn

from rnnd.daemon import codec
from rnnd.daemon.bundle import BundleSpec, InputSpec, ModelInfo, OutputSpec, StateSpec, TokenizerSpec
from rnnd.daemon.heads import Heads
from rnnd.daemon.metrics import EVICTION_REASONS, KAFKA_OPS
from rnnd.daemon.runtime import BundleModel
from rnnd.embedded_broker import EmbeddedBroker, create_topics
from rnnd.export import StateDecl
from rnnd.export.exporter import ExportOptions, export_bundle
from rnnd.export.parity import ParityPlan

SCHEMAS = Path(__file__).parent.parent / "schemas"


def wait_for(condition, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"not within {timeout}s: {what}")


# --- metrics ---------------------------------------------------------------------------------

def test_metrics_exist_from_the_start(bootstrap, topic_factory, recipe_bundle, tmp_path):
    """A dashboard shows 0, not "No data": every known label value has its series at once,
    and the process metrics every Prometheus client exposes are there."""
    topic_in, topic_out = topic_factory("ops-m-in", 2), topic_factory("ops-m-out", 2)
    with DaemonProcess(recipe_bundle("product"), bootstrap, topic_in, topic_out, log_dir=tmp_path) as d:
        d.start()
        m = d.metrics()
        assert d.stop() == 0
    names = {name for name, _ in m}
    assert m[("process_resident_memory_bytes", ())] > 10e6
    assert m[("process_cpu_seconds_total", ())] > 0
    assert {"process_open_fds", "process_start_time_seconds", "python_info"} <= names
    assert len(codec.REASONS) >= 14
    for reason in codec.REASONS:
        assert m[("rnnd_dead_letters_total", (("reason", reason),))] == 0, reason
    for op in KAFKA_OPS:
        assert m[("rnnd_kafka_errors_total", (("op", op),))] == 0, op
    for reason in EVICTION_REASONS:
        assert m[("rnnd_evictions_total", (("reason", reason),))] == 0, reason
    assert m[("rnnd_nonfinite_predictions_total", ())] == 0
    assert m[("rnnd_messages_consumed_total", (("topic", topic_in),))] == 0


def test_lag_counts_fetched_but_waiting_records(bootstrap, topic_factory, recipe_bundle, tmp_path):
    """A backlog beyond max_inflight_steps, worked off slowly (3 streams, a 50 ms wait for
    company that never comes): while steps wait in memory, the lag includes them."""
    topic_in, topic_out = topic_factory("ops-lag-in", 1), topic_factory("ops-lag-out", 1)
    n = 1500
    produce(bootstrap, topic_in, [(f"k{i % 3}".encode(), {"x": [0.1]}) for i in range(n)])
    with DaemonProcess(recipe_bundle("product"), bootstrap, topic_in, topic_out, "--max-inflight-steps", "300",
                       "--max-batch", "4", "--min-batch", "4", "--max-wait-ms", "50", "--max-chunk", "1",
                       log_dir=tmp_path) as d:
        d.start()

        def waiting():
            m = d.metrics()
            lag = m.get(("rnnd_consumer_lag", (("partition", "0"),)))
            done = m.get(("rnnd_predictions_total", ()), 0)
            inflight = m.get(("rnnd_inflight_steps", ()), 0)
            return (lag, done, inflight) if lag is not None and 50 < done < n - 600 and inflight > 0 else None

        lag, done, inflight = wait_for(waiting, 30, "a scrape with predictions made and steps waiting")
        d.kill()
    # Every record not yet processed is in the lag (the lag may be up to a second old: larger)
    assert lag + done >= n, (lag, done, inflight)
    assert lag >= inflight > 0


# --- readiness and topics ----------------------------------------------------------------------

def test_readiness_follows_the_broker(recipe_bundle, tmp_path):
    """Not ready once no broker has answered for broker_unreachable_s; ready again when it is back."""
    with EmbeddedBroker(log_dir=tmp_path) as broker:
        run_async(create_topics(broker.bootstrap_servers, {"ops-r-in": 1, "ops-r-out": 1}))
        with DaemonProcess(recipe_bundle("product"), broker.bootstrap_servers, "ops-r-in", "ops-r-out",
                           "--broker-unreachable-s", "2", "--no-changelog", log_dir=tmp_path) as d:
            d.start()
            time.sleep(3)  # answers keep it ready past broker_unreachable_s
            assert d.http("/readyz")[0] == 200 and d.metric("rnnd_ready") == 1
            broker.stop()
            stopped = time.monotonic()
            wait_for(lambda: d.http("/readyz")[0] == 503, 10, "not ready after the broker stopped")
            elapsed = time.monotonic() - stopped
            assert elapsed <= 6
            if elapsed < 1.5:  # before broker_unreachable_s: only a Kafka call that failed may say so that early
                assert sum(d.metric("rnnd_kafka_errors_total", op=op)
                           for op in ("fetch", "commit", "checkpoint", "produce")) >= 1, elapsed
            assert d.http("/healthz")[0] == 200 and d.metric("rnnd_ready") == 0
            wait_for(lambda: "has answered for" in d.log(), 5, "the outage logged")
            assert d.metric("rnnd_kafka_errors_total", op="broker_check") >= 1
            broker.restart()
            wait_for(lambda: d.http("/readyz")[0] == 200, 20, "ready after the broker restarted")
            wait_for(lambda: "answers again" in d.log(), 5, "the recovery logged")
            assert d.proc.poll() is None
            assert d.stop() == 0


def test_missing_input_topic_is_reported_as_missing_and_waited_for(bootstrap, topic_factory, recipe_bundle,
                                                                    tmp_path):
    topic_in = f"ops-missing-{uuid.uuid4().hex[:8]}"
    topic_out = topic_factory("ops-missing-out", 2)
    with DaemonProcess(recipe_bundle("product"), bootstrap, topic_in, topic_out, log_dir=tmp_path) as d:
        d.start(wait_ready=False)
        wait_for(lambda: "does not exist" in d.log(), 20, "the missing topic logged")
        log = d.log()
        assert f"input topic '{topic_in}' does not exist on the brokers at {bootstrap}" in log
        assert "create it" in log and "check the name" in log
        assert "not reachable" not in log
        assert d.http("/healthz")[0] == 200 and d.http("/readyz")[0] == 503
        assert d.metric("rnnd_kafka_errors_total", op="connect") == 0
        run_async(create_topics(bootstrap, {topic_in: 2}))  # a deployment job creates it
        d.wait_ready(30)
        produce(bootstrap, topic_in, [(b"k", {"x": [0.5]})])
        assert len(consume(bootstrap, topic_out, 1, timeout=30)) == 1
        assert d.stop() == 0
    assert "Traceback" not in d.log()


# --- non-finite predictions --------------------------------------------------------------------

NF_IN = InputSpec("numeric", features=("a", "b", "c"), mean=(0.0, 0.0, 0.0), std=(0.5, 0.5, 1.0))
NF_OUT = OutputSpec("regression", names=("y1", "y2"), mean=(1.0, -1.0), std=(2.0, 3.0))
HUGE = [3e38, 0.0, 0.0]  # finite, and allowed (no valid range); normalised: +inf


class Overflowing(nn.Module):
    """A linear recurrence (no saturating activation): an infinite input makes the state
    infinite for good, and the outputs NaN or infinite from then on (inf - inf in the head)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def state_spec(self):
        return [StateDecl("h", (4,), 0)]

    def forward(self, x, h):
        ys = []
        for t in range(x.shape[1]):
            h = 0.5 * h + self.inp(x[:, t])
            ys.append(self.head(h))
        return torch.stack(ys, dim=1), h


@pytest.fixture(scope="module")
def overflowing_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(21)
    path = tmp_path_factory.mktemp("overflow") / "overflow.onnx"
    export_bundle(Overflowing(), ExportOptions(name="overflow", input=NF_IN, output=NF_OUT, warmup_steps=0,
                                               parity=ParityPlan(batches=(1, 3), chunks=(1, 4), steps=12)), path)
    return path


def test_nonfinite_predictions_counted_marked_logged_and_verified(bootstrap, topic_factory, overflowing_bundle,
                                                                  tmp_path):
    """One stream overflows; the 29 others, in the same batches, stay exact. The overflowing
    stream's predictions are null and marked, counted, logged once, and `rnnd verify` agrees."""
    model = BundleModel(overflowing_bundle)
    rng = np.random.default_rng(4)
    first, more = 12, 3
    steps = first + more
    seqs = {f"s{i}".encode(): rng.standard_normal((steps, 3)) for i in range(30)}
    bad_from = 4  # stream "s0" overflows at its 5th step, and stays non-finite (its state is infinite)
    seqs[b"s0"][bad_from] = HUGE
    n_bad = steps - bad_from
    # interleaved, one step per message, all waiting before the daemon starts: shared batches
    items = [(k, {"x": seq[t].tolist()}) for t in range(first) for k, seq in seqs.items()]
    later = [(k, {"x": seq[t].tolist()}) for t in range(first, steps) for k, seq in seqs.items()]
    topic_in, topic_out = topic_factory("ops-nf-in", 2), topic_factory("ops-nf-out", 2)
    produce(bootstrap, topic_in, items)
    with DaemonProcess(overflowing_bundle, bootstrap, topic_in, topic_out, log_dir=tmp_path) as d:
        d.start()
        consume(bootstrap, topic_out, len(items), timeout=60)
        assert d.metric("rnnd_nonfinite_predictions_total") == first - bad_from
        produce(bootstrap, topic_in, later)  # later model calls, within the log interval
        outs = consume(bootstrap, topic_out, len(items) + len(later), timeout=60, settle=0.5)
        assert d.metric("rnnd_nonfinite_predictions_total") == n_bad
        assert d.metric("rnnd_predictions_total") == len(items) + len(later)
        assert d.metric("rnnd_batch_size_sum") / d.metric("rnnd_batch_size_count") > 5  # streams shared calls
        assert d.stop() == 0
    by_key: dict[bytes, list[dict]] = defaultdict(list)
    for o in sorted(outs, key=lambda o: o.value["step"]):
        by_key[o.key].append(o.value)
    mean, std = np.array(NF_OUT.mean), np.array(NF_OUT.std)
    for key, seq in seqs.items():
        with np.errstate(over="ignore"):
            x = ((seq - np.array(NF_IN.mean)) / np.array(NF_IN.std)).astype(np.float32)[None]
        ref = model.run_sequence(x, chunk=steps)[0][0]  # the whole sequence in one call
        docs = by_key[key]
        assert [v["step"] for v in docs] == list(range(steps))
        finite = steps if key != b"s0" else bad_from
        assert np.isfinite(ref[:finite]).all() and not np.isfinite(ref[finite:]).any()
        got = np.array([[v["prediction"]["values"][n] for n in NF_OUT.names] for v in docs[:finite]])
        assert np.max(np.abs((got - mean) / std - ref[:finite])) <= 1e-4, key
        assert not any("nonfinite" in v for v in docs[:finite]), key
        for v in docs[finite:]:
            assert v["nonfinite"] is True and v["prediction"] == {"values": {"y1": None, "y2": None}}
    log = d.log()
    assert log.count("model output is NaN or infinite") == 1, log  # several calls within 10 s: one line
    assert "stream 's0'" in log
    # rnnd verify recomputes the same overflow: consistent, counted apart, not wrong
    proc = subprocess.run([sys.executable, "-m", "rnnd", "verify", "--model", str(overflowing_bundle),
                           "--bootstrap-servers", bootstrap, "--input-topic", topic_in, "--output-topic", topic_out,
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["wrong"] == 0 and report["missing"] == 0
    assert report["nonfinite"] == n_bad
    assert report["expected"] == len(items) + len(later)


def _spec(output: OutputSpec) -> BundleSpec:
    inp = (InputSpec("tokens", tokenizer=TokenizerSpec("char", output.vocab, unk_id=0, pad_id=0))
           if output.kind == "language_model" else InputSpec("numeric", features=("a",)))
    return BundleSpec(model=ModelInfo("m", "1"), mode="stateful", input=inp, output=output,
                      states=(StateSpec("h", (1, 4), 0, "h_in", "h_out"),))


@pytest.mark.parametrize("output", [
    OutputSpec("regression", names=("p", "q")),
    OutputSpec("classification", labels=("x", "y", "z")),
    OutputSpec("language_model", vocab=("a", "b", "c", "d")),
], ids=["regression", "classification", "language_model"])
def test_nonfinite_rows_are_null_marked_and_valid(output: OutputSpec) -> None:
    """Every output kind: a NaN/inf row gets nulls and the mark, its neighbours are untouched,
    the bulk encoding equals the dict form, and the document validates against the schema."""
    from jsonschema import Draft202012Validator

    heads = Heads(_spec(output), top_k=2)
    y = np.random.default_rng(1).standard_normal((4, output.size)).astype(np.float32)
    clean = heads.encoded(y.copy())
    y[1, 0] = np.nan
    y[3, -1] = np.inf
    encoded = heads.encoded(y)
    assert [orjson.loads(b) for b in encoded] == heads.predictions(y)
    assert encoded[0] == clean[0] and encoded[2] == clean[2]
    record = codec.Record(b"k", 0, 9, 1_700_000_000_000, [[0.0]] * 4)
    refs = [(record, i) for i in range(4)]
    bad = heads.nonfinite(y, refs)
    assert bad == [1, 3]
    assert heads.nonfinite(y[[0, 2]], refs[:2]) is None
    docs = [orjson.loads(d) for d in codec.Encoder("in", "m@1", 0).documents(refs, [0, 1, 2, 3], encoded, 5, bad)]
    assert [d.get("nonfinite") for d in docs] == [None, True, None, True]
    if output.kind == "regression":
        assert docs[1]["prediction"]["values"]["p"] is None and docs[3]["prediction"]["values"]["q"] is None
        assert docs[1]["prediction"]["values"]["q"] is not None  # a finite value stays
    elif output.kind == "classification":
        assert docs[1]["prediction"] == {"label": None, "probs": None}
    else:
        assert docs[3]["prediction"] == {"next": None}
    validator = Draft202012Validator(json.loads((SCHEMAS / "output.schema.json").read_text()))
    for doc in docs:
        assert not list(validator.iter_errors(doc)), doc


def test_nonfinite_log_is_rate_limited(monkeypatch, caplog) -> None:
    """One line per NONFINITE_LOG_INTERVAL_S, the next one saying how many were not logged;
    the metric counts every one."""
    from rnnd.daemon import heads as heads_module
    from rnnd.daemon.metrics import Metrics

    now = [1000.0]
    monkeypatch.setattr(heads_module.time, "monotonic", lambda: now[0])
    metrics = Metrics()
    heads = Heads(_spec(OutputSpec("regression", names=("p",))), top_k=1, metrics=metrics)
    y = np.array([[np.nan], [1.0], [np.inf]], dtype=np.float32)
    refs = [(codec.Record(f"k{i}".encode(), 0, i, 0, [[0.0]]), 0) for i in range(3)]
    with caplog.at_level("WARNING", logger="rnnd.heads"):
        for _ in range(5):  # 10 non-finite predictions in 4 s
            assert heads.nonfinite(y, refs) == [0, 2]
            now[0] += 1.0
        assert len(caplog.records) == 1 and "stream 'k0'" in caplog.records[0].getMessage()
        now[0] += heads_module.NONFINITE_LOG_INTERVAL_S
        heads.nonfinite(y, refs)
    assert len(caplog.records) == 2
    assert "8 more since the last such line" in caplog.records[1].getMessage()
    assert metrics.registry.get_sample_value("rnnd_nonfinite_predictions_total") == 12
