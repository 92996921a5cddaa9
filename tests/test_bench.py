"""The benchmark's contenders are right before they are fast (bench/, docs/benchmarks.md).

Every contender runs as the benchmark runs it — its own process, through ``bench.harness`` —
on a tiny workload against the session's broker, and must produce exactly one output per
input step; every contender with a model must reproduce the bundle's full-sequence reference
(``BundleModel.run_sequence``) within 1e-4 in model space. So a naive contender cannot be
accidentally slow (doing more than its job) or wrong (doing less), and the numbers in
docs/benchmarks.md compare programs that do the same work. Not timed: the contenders run
side by side to keep the test short.
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is a top-level folder of the checkout, not an installed package
    sys.path.insert(0, str(REPO))

from bench import harness, kafkaio, suite  # noqa: E402
from bench.common import ModelInfo  # noqa: E402
from bench.workloads import Data, Model  # noqa: E402


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


HAS_QUIX = _importable("quixstreams")
QUIX_SKIP = "quixstreams is not installed (the `bench` extra: pip install -e '.[bench]')"
MODEL_FREE = {"passthrough-json", "passthrough-orjson", "passthrough-min", "passthrough-uvloop", "passthrough-batch"}
# Variants the suite runs under their own names (other flags of the same programs): the numeric run covers
# those that change how outputs are produced or how the program runs.
VARIANTS = ("passthrough-min", "passthrough-uvloop", "passthrough-batch", "rnnd-uvloop")
MINIMAL = {"passthrough-min"}  # writes {"key", "partition", "offset", "j", "y"}, not the daemon's document
TOL = 1e-4


def _model(recipe_bundle, name: str) -> Model:
    bundle = recipe_bundle(name)
    return Model(name, bundle, bundle.with_suffix(".pt"))  # run_recipe writes both side by side


def _fill(bootstrap: str, model: Model, data: Data) -> tuple[str, list[tuple[bytes, bytes]]]:
    topic = harness.create_topic(bootstrap, f"bench-test-in-{uuid.uuid4().hex[:8]}", configs=harness.INPUT_CONFIGS)
    items = list(data.items(ModelInfo.load(model.bundle).spec))
    kafkaio.produce(bootstrap, topic, items)
    return topic, items


def _extra(name: str) -> tuple[str, ...]:
    """A shorter group session: Tansu's join pause is about half of it (3 s instead of 5 s)."""
    return ("--session-timeout-ms", "6000") if name in ("rnnd", "quix-store", "quix-dict") else ()


def _reference(model: Model, items: list[tuple[bytes, bytes]]) -> dict[bytes, np.ndarray]:
    """Each key's outputs over its whole sequence, in one call: y[T, O] in model space."""
    from rnnd.daemon.runtime import BundleModel

    bm = BundleModel(model.bundle)
    if bm.spec.mode == "seq2seq":
        return {}  # answers, checked message by message (test_seq2seq_contender)
    info = ModelInfo.load(model.bundle)
    seqs: dict[bytes, list] = defaultdict(list)
    for key, value in items:
        doc = orjson.loads(value)
        if info.numeric:
            x = doc["x"]
            seqs[key].extend(x if isinstance(x[0], list) else [x])
        else:
            seqs[key].extend(doc["tokens"])
    return {k: bm.run_sequence(info.model_input(rows)[None])[0][0] for k, rows in seqs.items()}


def _by_key(outputs: list[kafkaio.Output]) -> dict[bytes, list[dict]]:
    out: dict[bytes, list[dict]] = defaultdict(list)
    for o in outputs:
        out[o.key].append(o.doc)
    return {k: sorted(v, key=lambda d: d.get("step", (d.get("offset"), d.get("j")))) for k, v in out.items()}


def _names(exclude: tuple[str, ...] = ()) -> list[str]:
    return [n for n in harness.CONTENDERS if (HAS_QUIX or not n.startswith("quix")) and n not in exclude]


def _params(exclude: tuple[str, ...] = ()) -> list:
    """One test per contender; Quix's are skipped (with the reason) only when it is not importable."""
    return [pytest.param(n, marks=pytest.mark.skipif(not HAS_QUIX, reason=QUIX_SKIP)) if n.startswith("quix") else n
            for n in harness.CONTENDERS if n not in exclude]


SEQ2SEQ_ONLY = ("naive-seq2seq",)  # a consumer of seq2seq bundles alone
TOKEN_EXCLUDE = ("passthrough-json", "quix-store", *SEQ2SEQ_ONLY)  # the token path of each is covered by its siblings


def _check_counts(name: str, r: harness.RunResult, data: Data, items: list[tuple[bytes, bytes]], by_key: dict) -> None:
    assert r.ok, f"{name}: {r.error}"
    assert r.outputs == data.steps and r.distinct_ids == data.steps, name
    per_key: dict[bytes, int] = defaultdict(int)
    for key, value in items:
        doc = orjson.loads(value)
        per_key[key] += len(doc["tokens"]) if "tokens" in doc and data.kind == "tokens" else 1  # seq2seq: one answer
    assert {k: len(v) for k, v in by_key.items()} == dict(per_key), name
    if name in MINIMAL:
        for docs in by_key.values():
            assert all(set(d) == {"key", "partition", "offset", "j", "y"} for d in docs), name
        return
    for docs in by_key.values():  # steps 0..n-1, each exactly once, with the daemon's output fields
        assert [d["step"] for d in docs] == list(range(len(docs))), name
        assert {"key", "id", "topic", "partition", "offset", "index", "prediction", "warmup", "model",
                "input_ts", "output_ts"} <= set(docs[0]), name


@pytest.fixture(scope="module")
def runs(bootstrap, recipe_bundle, tmp_path_factory) -> dict[str, tuple]:
    """Both tiny workloads through their contenders, all side by side (the test is not timed):

    * numeric: 50 keys × 4 one-step messages, sensors (regression), every contender;
    * tokens: 5 keys × 3 messages of 8 tokens (one output per token), charlm (language model).
    """
    plans = {
        "numeric": (_model(recipe_bundle, "sensors"), Data("numeric", 50, 200, 1, seed=5, key_prefix="t-"),
                    [*_names(SEQ2SEQ_ONLY), *VARIANTS]),
        "tokens": (_model(recipe_bundle, "charlm"), Data("tokens", 5, 15, 8, seed=6, key_prefix="d-"),
                   _names(TOKEN_EXCLUDE)),
        "seq2seq": (_model(recipe_bundle, "reverse"), Data("letters", 20, 80, 1, seed=7, key_prefix="r-"),
                    ["naive-seq2seq", "rnnd"]),
    }
    filled = {w: _fill(bootstrap, model, data) for w, (model, data, _) in plans.items()}
    runner = harness.Runner(bootstrap, None, tmp_path_factory.mktemp("bench"), timeout=90)

    def one(job: tuple[str, str]) -> tuple[str, str, harness.RunResult, list[kafkaio.Output]]:
        w, name = job
        model, data, _ = plans[w]
        out: list[kafkaio.Output] = []
        contender, flags = suite._contender(name)
        r = runner.run(contender, model, filled[w][0], workload=w, keys=data.keys, messages=data.messages,
                       steps=data.steps, extra=(*flags, *_extra(contender.name)), collect=out)
        return w, name, r, out

    jobs = [(w, n) for w, (_, _, names) in plans.items() for n in names]
    with ThreadPoolExecutor(len(jobs)) as pool:
        done = list(pool.map(one, jobs))
    out = {}
    for w, (model, data, _) in plans.items():
        items = filled[w][1]
        out[w] = (model, data, items, {n: (r, o) for ww, n, r, o in done if ww == w}, _reference(model, items))
    return out


@pytest.mark.parametrize("name", [*_params(SEQ2SEQ_ONLY), *VARIANTS])
def test_numeric_contender(runs, name: str) -> None:
    model, data, items, results, ref = runs["numeric"]
    r, outputs = results[name]
    by_key = _by_key(outputs)
    _check_counts(name, r, data, items, by_key)
    if name in MODEL_FREE:
        return
    out = ModelInfo.load(model.bundle).spec.output
    mean, std = np.asarray(out.mean, dtype=np.float64), np.asarray(out.std, dtype=np.float64)
    for key, docs in by_key.items():
        got = np.array([[d["prediction"]["values"][n] for n in out.names] for d in docs])
        err = np.abs((got - mean) / std - ref[key]).max()
        assert err <= TOL, f"{name}: {key!r} differs from the full-sequence reference by {err:.2e}"


@pytest.mark.parametrize("name", _params(TOKEN_EXCLUDE))
def test_token_contender(runs, name: str) -> None:
    model, data, items, results, ref = runs["tokens"]
    r, outputs = results[name]
    by_key = _by_key(outputs)
    _check_counts(name, r, data, items, by_key)
    if name in MODEL_FREE:
        return
    vocab = {t: i for i, t in enumerate(ModelInfo.load(model.bundle).spec.output.vocab)}
    for key, docs in by_key.items():
        z = ref[key] - ref[key].max(axis=-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
        for t, d in enumerate(docs):
            nxt = d["prediction"]["next"]
            assert len(nxt) == 5, name
            for e in nxt:
                assert abs(e["p"] - probs[t, vocab[e["token"]]]) <= TOL, (name, key, t, e)


def test_bench_quick_plan_and_report() -> None:
    """The report's targets and table work on a results document without running anything."""
    from bench import report

    results = {"mode": "quick", "runs": [
        harness.RunResult("wide", "passthrough-min", "backlog", 10, 10, 10, outputs=10, distinct_ids=10,
                          steps_per_s=100.0, messages_per_s=100.0, steps_per_s_a=110.0),
        harness.RunResult("wide", "rnnd", "backlog", 10, 10, 10, outputs=10, distinct_ids=10, steps_per_s=95.0,
                          messages_per_s=95.0, steps_per_s_a=121.0, first_output_ms=300.0, longest_gap_ms=40.0,
                          loop_lag_max_ms=20.0),
        harness.RunResult("wide", "naive-onnx", "backlog", 10, 10, 10, ok=False, error="boom")],
        "memory": [{"streams": 1_000_000, "rss_bytes_per_stream": 1100.0, "raw_bytes_per_stream": 1024,
                    "ratio_to_raw": 1.07, "target_bytes_per_stream": 1792.0, "slot_alloc_us": 1.0,
                    "model": "m@1", "rss_growth_bytes": 1, "active": 1}],
        "compute": {}, "workloads": {}}
    text = report.table(results) + report.targets_text(results)
    assert "0.95×" in text and "1.10×" in text and "failed" in text  # clock B, clock A
    verdicts = {t["target"]: t["met"] for t in report.targets(results)}
    assert verdicts["wide backlog: rnnd ≥ 1.0× the minimal orjson pass-through"] is False
    assert verdicts["wide backlog: rnnd ≥ 6× the naive ONNX consumer"] is None
    assert verdicts["wide backlog: rnnd's longest gap between outputs ≤ 100 ms"] is True
    assert verdicts["wide backlog: rnnd's max event-loop lag ≤ 50 ms"] is True
    assert verdicts["wide backlog: rnnd's first output ≤ 250 ms after assignment"] is False
    assert any("1,000,000 streams" in k and v is True for k, v in verdicts.items())


@pytest.mark.parametrize("name", ["naive-seq2seq", "rnnd"])
def test_seq2seq_contender(runs, name: str) -> None:
    """One answer per message, each the answer the bundle gives that message's source alone."""
    from rnnd.daemon.runtime import BundleModel
    from rnnd.daemon.seq2seq import answer_one

    model, data, items, results, _ = runs["seq2seq"]
    r, outputs = results[name]
    _check_counts(name, r, data, items, _by_key(outputs))
    bundle = BundleModel(model.bundle)
    sources = {(o.doc["partition"], o.doc["offset"]) for o in outputs}
    assert len(sources) == data.messages
    by_key: dict[bytes, list[bytes]] = defaultdict(list)
    for key, value in items:
        by_key[key].append(value)
    for key, docs in _by_key(outputs).items():
        for d, value in zip(docs, by_key[key], strict=True):
            want = answer_one(bundle, np.asarray(orjson.loads(value)["tokens"], dtype=np.int64))
            assert d["prediction"]["output_ids"] == want.ids, name
            assert abs(d["prediction"]["logp"] - want.logp) <= 1e-4 * max(1, len(want.ids)), name


def test_the_arena_ceiling_measures_both_arenas() -> None:
    """``python -m bench.ceilings arena``: the host arena and device_state's path side by side (CPU here)."""
    from bench.ceilings import arena

    doc = arena(str(Path(__file__).parents[1] / "cli" / "demo_bundle" / "sensors.onnx"), [1, 32], 0.05, "cpu", 1_000)
    assert doc["provider"] == "CPUExecutionProvider" and [r["batch"] for r in doc["results"]] == [1, 32]
    assert all(r["host_steps_per_s"] > 0 and r["device_steps_per_s"] > 0 for r in doc["results"])


def test_the_pipeline_ceiling_answers_every_message_and_splits_its_time_by_stage() -> None:
    """``python -m bench.ceilings pipeline``: every message answered once (it raises otherwise), and the
    stages' times within the whole (each measured around its own calls)."""
    from bench.ceilings import pipeline

    doc = pipeline(str(Path(__file__).parents[1] / "cli" / "demo_bundle" / "sensors.onnx"), 3_000, 300, 1)
    us = doc["us_per_message"]
    stages = ("parse", "accept_many", "plan", "execute", "finish")
    assert doc["messages"] == 3_000 and all(us[k] > 0 for k in (*stages, "total"))
    assert doc["record_type"] != "ConsumerRecord"  # fed the C records, as the daemon's consumer is
    assert sum(us[k] for k in stages) <= us["total"]


def test_the_device_check_runs_its_cpu_rows_and_says_what_it_did_not_measure(capsys) -> None:
    """``python -m bench.gpu``: the CPU rows of both models, host and device state, and on a machine
    without CUDA (CI) a plain statement that the CUDA rows were not measured. Its fp16 conversion makes a
    bundle that declares fp16 and runs on the CPU too, within fp16's tolerance of the fp32 one."""
    from bench import gpu
    from rnnd.daemon.bundle import PRECISIONS
    from rnnd.daemon.runtime import BundleModel

    assert gpu.main(["--batches", "1,8", "--seconds", "0.01", "--hidden", "16"]) == 0
    out = capsys.readouterr().out
    assert ("the CUDA rows were NOT measured" in out) == (not gpu.providers())
    assert "| sensors (2-layer LSTM, H=64) | cpu | fp32 | device |" in out
    assert "| 2-layer LSTM, H=16 | cpu | fp32 | host |" in out
    large = BundleModel(gpu.large_lstm(16))
    assert [s.shape for s in large.spec.states] == [(2, 16), (2, 16)]
    half = BundleModel(gpu.fp16_of(gpu.large_lstm(16)))
    assert half.spec.precision == "fp16" and half.spec.state_hash == large.spec.state_hash
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([4 if d is None or isinstance(d, str) else d for d in i.shape])
             .astype(np.float32) for i in large.session.get_inputs()}
    y32, y16 = (m.session.run(None, feeds)[0] for m in (large, half))
    assert 0 < float(np.abs(y32 - y16).max()) <= PRECISIONS["fp16"]


def test_the_workers_target_is_judged_only_for_as_many_workers_as_the_free_cores_hold() -> None:
    """One worker using 1.07 of 2 cores beside a broker using 0.15 leaves room for one: the 2-worker
    ratio is reported but not judged; with 8 cores it is judged."""
    from bench import report

    def run(n: int, msgs: float) -> harness.RunResult:
        return harness.RunResult("workers", f"rnnd-w{n}", "backlog", 10, 10, 10, outputs=10, distinct_ids=10,
                                 seconds=1.0, steps_per_s=msgs, messages_per_s=msgs, cpu_s=1.07 * n,
                                 broker_cpu_s=0.15)

    def verdict(nproc: int) -> dict:
        results = {"mode": "full", "runs": [run(1, 100.0), run(2, 150.0)], "memory": [], "compute": {},
                   "workloads": {}, "machine": {"nproc": nproc}}
        [t] = [t for t in report.targets(results) if t["target"].startswith("workers")]
        return t

    small, large = verdict(2), verdict(8)
    assert small["met"] is None and report._verdict(small) == "beyond this machine"
    assert "0.75×" in small["measured"] and "room for 1" in small["measured"]
    assert large["met"] is False and report._verdict(large) == "MISSED"
