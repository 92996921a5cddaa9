"""The daemon's core loop (accept → plan → execute → finish) on real bundles, without Kafka.

Hundreds of records for ~50 keys arrive in random interleavings, with 1..5 steps each, some
while the model is running. Whatever the batching did, every key's predictions must equal
the bundle run over that key's whole sequence in one call (``BundleModel.run_sequence`` with
``chunk=len``, or ``run_windows``), de-normalised by hand here; every step must produce
exactly one output with a unique id that points back at the input step it came from; and
the commit point must never pass a record whose steps are not all out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from rnnd.daemon.bundle import InputSpec, OutputSpec, RandomInit, TokenizerSpec
from rnnd.daemon.codec import Output
from rnnd.daemon.config import ConfigError, ServeConfig
from rnnd.daemon.device import DeviceArena
from rnnd.daemon.pipeline import Pipeline
from rnnd.daemon.runtime import BundleModel
from rnnd.daemon.tokenizer import Tokenizer
from rnnd.export import zoo
from rnnd.export.exporter import ExportOptions, export_bundle
from rnnd.export.parity import ParityPlan

TOPIC = "in"
TOL = 1e-4
QUICK_PARITY = ParityPlan(batches=(1, 3), chunks=(1, 4), steps=12)  # the export's own check; not under test

NUM_IN = InputSpec("numeric", features=("a", "b", "c"), mean=(1.0, -2.0, 30.0), std=(2.0, 0.5, 4.0))
NUM_OUT = OutputSpec("regression", names=("y1", "y2"), mean=(0.5, -10.0), std=(2.0, 3.0))
WIN_IN = InputSpec("numeric", features=("u", "v"), mean=(5.0, -1.0), std=(3.0, 0.25))
WIN_OUT = OutputSpec("regression", names=("z",), mean=(100.0,), std=(7.0,))
WORDS = tuple(f"w{i}" for i in range(10))
VOCAB = ("<pad>", "<unk>", *WORDS)
TOK_IN = InputSpec("tokens", tokenizer=TokenizerSpec("word", VOCAB, unk_id=1, pad_id=0))
TOK_OUT = OutputSpec("classification", labels=("neg", "neu", "pos"))


# --- bundles (exported once per module) -----------------------------------------------------------


def _export(path: Path, model: torch.nn.Module, **opts: Any) -> BundleModel:
    export_bundle(model, ExportOptions(parity=QUICK_PARITY, **opts), path)
    return BundleModel(path)


@pytest.fixture(scope="module")
def gru(tmp_path_factory: pytest.TempPathFactory) -> BundleModel:
    torch.manual_seed(11)
    model = zoo.build(cell="gru", n_features=3, hidden=8, out_size=2)
    return _export(tmp_path_factory.mktemp("gru") / "gru.onnx", model, name="gru", input=NUM_IN, output=NUM_OUT,
                   warmup_steps=3)


@pytest.fixture(scope="module")
def lstm_tokens(tmp_path_factory: pytest.TempPathFactory) -> BundleModel:
    torch.manual_seed(12)
    model = zoo.build(cell="lstm", vocab_size=len(VOCAB), embed_dim=6, hidden=8, out_size=3)
    return _export(tmp_path_factory.mktemp("lstm") / "lstm.onnx", model, name="tok", input=TOK_IN,
                   output=TOK_OUT, warmup_steps=2)


@pytest.fixture(scope="module")
def window(tmp_path_factory: pytest.TempPathFactory) -> BundleModel:
    torch.manual_seed(13)
    model = zoo.build(arch="window", kind="bilstm", n_features=2, hidden=8, out_size=1)
    return _export(tmp_path_factory.mktemp("win") / "win.onnx", model, name="win", input=WIN_IN, output=WIN_OUT,
                   mode="window", window=5, warmup_steps=4)


# --- traffic --------------------------------------------------------------------------------------


@dataclass
class Sent:
    """One input record as a producer sent it, and what the test knows about it."""

    key: bytes
    partition: int
    offset: int
    value: bytes
    steps: list  # raw steps: feature lists (NaN allowed) or token ids
    reset: bool = False
    end: bool = False
    dead: bool = False
    echo: dict[str, Any] = field(default_factory=dict)

    @property
    def timestamp(self) -> int:
        return 1_000_000 + 10 * self.offset + self.partition


def numeric_steps(rng: random.Random, n: int, spec: InputSpec, nan_rate: float = 0.0) -> list[list[float]]:
    """Raw values around the training distribution, so normalisation matters."""
    scale = list(zip(spec.mean, spec.std, strict=True))
    return [[math.nan if rng.random() < nan_rate else m + s * rng.gauss(0, 1) for m, s in scale] for _ in range(n)]


def numeric_value(rng: random.Random, steps: list[list[float]], features: tuple[str, ...],
                  extra: dict[str, Any]) -> bytes:
    """One of the documented forms of x, chosen at random; Python json so that NaN goes out as NaN."""
    form = rng.choice(["rows", "named-rows", "flat", "named"] if len(steps) == 1 else ["rows", "named-rows"])
    if form == "rows":
        x: Any = steps
    elif form == "named-rows":
        x = [dict(zip(features, row, strict=True)) for row in steps]
    elif form == "flat":
        x = steps[0]
    else:
        x = dict(zip(features, steps[0], strict=True))
    return json.dumps({"x": x, **extra}).encode()


def token_value(rng: random.Random, ids: list[int], extra: dict[str, Any]) -> bytes:
    """As token ids or as text, at random.

    <pad>/<unk> are not words (the word tokenizer splits them into "<", "unk", ">"): only ids
    can carry them.
    """
    if rng.random() < 0.5 or min(ids) < 2:
        return orjson.dumps({"tokens": ids, **extra})
    return orjson.dumps({"text": " ".join(VOCAB[i].upper() for i in ids), **extra})  # the tokenizer lower-cases


def make_traffic(rng: random.Random, n_keys: int, n_records: int, kind: str, spec: InputSpec,
                 controls: bool = False, dead_rate: float = 0.0, nan_rate: float = 0.0,
                 end_every_key: bool = False) -> list[Sent]:
    """Records for random keys over three partitions (key → partition fixed, as Kafka's partitioner does)."""
    keys = [f"key-{i}".encode() for i in range(n_keys)]
    offsets = [0, 0, 0]
    sent = []

    def add(key: bytes, steps: list, reset: bool = False, end: bool = False) -> None:
        partition = int(key.split(b"-")[1]) % 3
        extra: dict[str, Any] = {}
        if rng.random() < 0.2:
            extra = {"event_time": rng.randint(0, 10**9), "client_id": f"c{rng.randint(0, 9)}"}
        if reset or end:
            extra["control"] = "reset" if reset else "end"
        dead = rng.random() < dead_rate
        if dead:
            value = orjson.dumps({"x": [[1.0]], "tokens": [1]})  # two inputs: a dead letter for any model
        elif not steps:
            value = orjson.dumps(extra)
        elif kind == "tokens":
            value = token_value(rng, steps, extra)
        else:
            value = numeric_value(rng, steps, spec.features, extra)
        sent.append(Sent(key, partition, offsets[partition], value, steps, reset, end, dead,
                         {k: v for k, v in extra.items() if k in ("event_time", "client_id")}))
        offsets[partition] += 1

    for _ in range(n_records):
        key = rng.choice(keys)
        n = rng.randint(1, 5)
        steps = ([rng.randrange(len(VOCAB)) for _ in range(n)] if kind == "tokens"
                 else numeric_steps(rng, n, spec, nan_rate))
        reset = controls and rng.random() < 0.1
        end = controls and not reset and rng.random() < 0.1
        if controls and rng.random() < 0.08:  # a control-only record
            only_reset = rng.random() < 0.5
            add(key, [], reset=only_reset, end=not only_reset)
        add(key, steps, reset, end)
    if end_every_key:
        for key in keys:
            add(key, [], end=True)
    return sent


# --- driving the pipeline --------------------------------------------------------------------------


@dataclass
class Result:
    docs: list[dict[str, Any]]  # every output, in emission order
    dead: int
    commit_checks: int
    refused: int  # accept_many() said "not now" (all stream slots hold queued work)


def drive(pipeline: Pipeline, sent: list[Sent], rng: random.Random,
          check: Callable[[Pipeline, int, list[dict[str, Any]]], None] | None = None,
          already_accepted: int = 0, burst: int = 25) -> Result:
    """Accept records in random bursts (some while a call is 'running'), plan/execute/finish until idle."""
    docs: list[dict[str, Any]] = []
    by_offset = {(s.partition, s.offset): s for s in sent}
    i = already_accepted
    checks = refused = 0

    def accept(n: int) -> None:
        nonlocal i, refused
        for _ in range(n):
            if i < len(sent):
                s = sent[i]
                if pipeline.accept_many(s.partition, [s]) == 0:
                    refused += 1
                    return  # every slot holds queued work: offer it again after the model ran
                i += 1
                if rng.random() < 0.05:  # a re-fetch of something already accepted: ignored
                    old = sent[rng.randrange(i)]
                    assert pipeline.accept_many(old.partition, [old]) == 1

    for _ in range(5_000):  # a few hundred rounds at most; more means work that is never applied
        if i >= len(sent) and not pipeline.busy():
            break
        accept(rng.randint(0, burst))
        calls = pipeline.plan()
        accept(rng.randint(0, 3))
        outputs = pipeline.finish(pipeline.execute(calls))
        for o in outputs:
            assert type(o) is Output
            doc = orjson.loads(o.value)
            assert o.key == doc["key"].encode()
            assert doc["input_ts"] == by_offset[(doc["partition"], doc["offset"])].timestamp
            # latency runs from the record that triggered the output: the step's, or the end control's
            trigger = {s.timestamp for s in sent if s.key == o.key and (s.end or not doc.get("ended"))}
            assert o.input_timestamp in trigger and o.input_timestamp >= doc["input_ts"]
            docs.append(doc)
        if check is not None:
            check(pipeline, i, docs)
            checks += 1
    else:
        raise AssertionError(f"the pipeline never became idle: {pipeline.scheduler.inflight} steps/controls "
                             "accepted but never applied")
    docs += [orjson.loads(o.value) for o in pipeline.finish([])]  # nothing left: a no-op
    assert pipeline.scheduler.inflight == 0 and not pipeline.streams.busy.any()
    return Result(docs, len(pipeline.take_dead_letters()), checks, refused)


def config(**kw: Any) -> ServeConfig:
    base = {"model": "x", "input_topic": TOPIC, "output_topic": "out", "max_batch": 16, "max_chunk": 8,
            "top_k": 10, "stream_ttl_s": 0.0}
    return ServeConfig(**{**base, **kw}).validate()


# --- the independent reference -----------------------------------------------------------------------


@dataclass
class Expected:
    key: bytes
    step: int
    y: np.ndarray  # model-space output of this step
    last_of_segment: bool
    ended: bool  # the segment closed with an end control


def normalise(steps: list[list[float]], spec: InputSpec) -> np.ndarray:
    """Raw → model space in float64; NaN becomes 0 (non_finite=zero replaces it with the raw mean)."""
    x = (np.asarray(steps, dtype=np.float64) - np.asarray(spec.mean)) / np.asarray(spec.std)
    return np.nan_to_num(x, nan=0.0).astype(np.float32)


def reference(model: BundleModel, sent: list[Sent]) -> dict[tuple[int, int, int], Expected]:
    """Split each key's records into segments at reset/end and run each segment in one call."""
    spec = model.spec
    segments: dict[bytes, list[list[tuple[Sent, int]]]] = defaultdict(lambda: [[]])
    closed_by_end: dict[int, bool] = {}
    for s in sent:
        if s.dead:
            continue
        segs = segments[s.key]
        if s.reset and segs[-1]:
            segs.append([])
        segs[-1].extend((s, j) for j in range(len(s.steps)))
        if s.end:
            closed_by_end[id(segs[-1])] = True
            segs.append([])
    out: dict[tuple[int, int, int], Expected] = {}
    for key, segs in segments.items():
        for seg in segs:
            if not seg:
                continue
            raw = [s.steps[j] for s, j in seg]
            if spec.input.kind == "tokens":
                x = np.asarray(raw, dtype=np.int64)[None]
            else:
                x = normalise(raw, spec.input)[None]
            y = model.run_windows(x)[0] if spec.mode == "window" else model.run_sequence(x, chunk=len(seg))[0][0]
            for step, (s, j) in enumerate(seg):
                out[(s.partition, s.offset, j)] = Expected(key, step, y[step], step == len(seg) - 1,
                                                           closed_by_end.get(id(seg), False))
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def check_doc(doc: dict[str, Any], exp: Expected, model: BundleModel, sent: Sent) -> None:
    spec = model.spec
    assert doc["key"] == exp.key.decode() and doc["step"] == exp.step, (doc, exp)
    assert doc["warmup"] is (exp.step < spec.warmup_steps)
    assert doc["model"] == spec.model.ref and doc["topic"] == TOPIC
    for k, v in sent.echo.items():
        assert doc[k] == v
    pred = doc["prediction"]
    if spec.output.kind == "regression":
        want = exp.y.astype(np.float64) * np.asarray(spec.output.std) + np.asarray(spec.output.mean)
        got = [pred["values"][name] for name in spec.output.names]
        # de-normalised by hand; the tolerance applies in model space: |got - want| / std <= TOL
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL * max(spec.output.std))
    else:
        p = softmax(exp.y.astype(np.float64))
        labels = spec.output.labels
        assert pred["label"] == labels[int(np.argmax(p))]
        np.testing.assert_allclose([pred["probs"][lab] for lab in labels], p, rtol=0, atol=TOL)


def check_outputs(result: Result, model: BundleModel, sent: list[Sent],
                  emitted: Callable[[Expected], bool] = lambda e: True) -> dict[tuple[int, int, int], Expected]:
    """Exactly one output for each step ``emitted`` selects, each equal to the reference."""
    expected = reference(model, sent)
    by_offset = {(s.partition, s.offset): s for s in sent}
    ids = [d["id"] for d in result.docs]
    assert len(ids) == len(set(ids)), "duplicate output ids"
    got = {}
    for d in result.docs:
        assert d["id"] == f"{TOPIC}/{d['partition']}/{d['offset']}/{d['index']}"
        coord = (d["partition"], d["offset"], d["index"])
        assert coord in expected, f"output for no input step: {d['id']}"
        check_doc(d, expected[coord], model, by_offset[coord[:2]])
        got[coord] = d
    want = {c for c, e in expected.items() if emitted(e)}
    assert set(got) == want, (len(got), len(want))
    # per key, outputs come out in step order (a consumer of the output topic sees them in order)
    per_key: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for d in result.docs:
        per_key[d["key"]].append((d["partition"], d["offset"], d["index"]))
    for coords in per_key.values():
        assert coords == sorted(coords)
    assert result.dead == sum(s.dead for s in sent)
    return expected


# --- tests -----------------------------------------------------------------------------------------


def exact_commit_check(sent: list[Sent], spec_steps: Callable[[Sent], int]):
    """The commit point of each partition is the first record not fully output (or last accepted + 1)."""
    def check(pipeline: Pipeline, accepted: int, docs: list[dict[str, Any]]) -> None:
        done: dict[tuple[int, int], int] = defaultdict(int)
        for d in docs:
            done[(d["partition"], d["offset"])] += 1
        points = pipeline.offsets.commit_points()
        for p in {s.partition for s in sent[:accepted]}:
            mine = [s for s in sent[:accepted] if s.partition == p]
            open_ = [s.offset for s in mine if not s.dead and done[(p, s.offset)] < spec_steps(s)]
            assert points.get(p) == min(open_, default=mine[-1].offset + 1), (p, points, open_[:3])
    return check


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_gru_numeric_matches_full_sequence_reference(gru: BundleModel, seed: int) -> None:
    rng = random.Random(seed)
    sent = make_traffic(rng, n_keys=50, n_records=300, kind="numeric", spec=NUM_IN, dead_rate=0.05, nan_rate=0.03)
    pipeline = Pipeline(gru, config(non_finite="zero", max_batch=rng.choice([7, 64]), max_chunk=rng.choice([4, 8])),
                        TOPIC)
    result = drive(pipeline, sent, rng, exact_commit_check(sent, lambda s: len(s.steps)))
    assert result.commit_checks > 5
    check_outputs(result, gru, sent)
    assert any(d["warmup"] for d in result.docs) and not all(d["warmup"] for d in result.docs)
    last = {p: max(s.offset for s in sent if s.partition == p) for p in range(3)}
    assert pipeline.offsets.commit_points() == {p: o + 1 for p, o in last.items()}


@pytest.mark.parametrize("seed", [5, 15, 25])
def test_gru_with_reset_and_end_controls(gru: BundleModel, seed: int) -> None:
    """Controls split a key's sequence into independent streams; each restarts at step 0."""
    rng = random.Random(seed)
    sent = make_traffic(rng, n_keys=40, n_records=300, kind="numeric", spec=NUM_IN, controls=True)
    assert sum(s.reset for s in sent) > 10 and sum(s.end for s in sent) > 10
    assert any(s.reset and not s.steps for s in sent)
    pipeline = Pipeline(gru, config(max_chunk=8), TOPIC)

    def check(pipeline: Pipeline, accepted: int, docs: list[dict[str, Any]]) -> None:
        done: dict[tuple[int, int], int] = defaultdict(int)
        for d in docs:
            done[(d["partition"], d["offset"])] += 1
        for p, point in pipeline.offsets.commit_points().items():
            below = [s for s in sent[:accepted] if s.partition == p and s.offset < point]
            assert all(done[(p, s.offset)] == len(s.steps) for s in below)

    result = drive(pipeline, sent, rng, check)
    check_outputs(result, gru, sent)
    last = {p: max(s.offset for s in sent if s.partition == p) for p in range(3)}
    assert pipeline.offsets.commit_points() == {p: o + 1 for p, o in last.items()}


def test_lstm_tokens_matches_full_sequence_reference(lstm_tokens: BundleModel) -> None:
    rng = random.Random(3)
    sent = make_traffic(rng, n_keys=50, n_records=250, kind="tokens", spec=TOK_IN, dead_rate=0.03)
    pipeline = Pipeline(lstm_tokens, config(max_chunk=4), TOPIC)
    result = drive(pipeline, sent, rng, exact_commit_check(sent, lambda s: len(s.steps)))
    check_outputs(result, lstm_tokens, sent)


def test_window_mode_matches_run_windows(window: BundleModel) -> None:
    rng = random.Random(4)
    sent = make_traffic(rng, n_keys=50, n_records=250, kind="numeric", spec=WIN_IN, controls=True)
    pipeline = Pipeline(window, config(), TOPIC)
    result = drive(pipeline, sent, rng)
    expected = check_outputs(result, window, sent)
    assert max(e.step for e in expected.values()) >= 10  # streams ran well past their first window


def test_warmup_hold_leaves_out_warmup_predictions(gru: BundleModel) -> None:
    rng = random.Random(6)
    sent = make_traffic(rng, n_keys=50, n_records=200, kind="numeric", spec=NUM_IN, controls=True)
    result = drive(Pipeline(gru, config(warmup="hold"), TOPIC), sent, rng)
    check_outputs(result, gru, sent, emitted=lambda e: e.step >= gru.spec.warmup_steps)
    assert result.docs and not any(d["warmup"] for d in result.docs)


def test_emit_every_third_step(lstm_tokens: BundleModel) -> None:
    rng = random.Random(7)
    sent = make_traffic(rng, n_keys=50, n_records=200, kind="tokens", spec=TOK_IN, controls=True)
    result = drive(Pipeline(lstm_tokens, config(emit="every:3"), TOPIC), sent, rng)
    check_outputs(result, lstm_tokens, sent, emitted=lambda e: (e.step + 1) % 3 == 0)


def test_emit_end_gives_the_last_prediction_of_each_ended_stream(gru: BundleModel) -> None:
    rng = random.Random(8)
    sent = make_traffic(rng, n_keys=50, n_records=200, kind="numeric", spec=NUM_IN, controls=True,
                        end_every_key=True)
    result = drive(Pipeline(gru, config(emit="end"), TOPIC), sent, rng)
    assert result.docs and all(d["ended"] is True for d in result.docs)
    check_outputs(result, gru, sent, emitted=lambda e: e.last_of_segment and e.ended)


@pytest.mark.parametrize(("max_streams", "burst"), [(16, 4), (6, 25)])
def test_lru_evicted_streams_restart_from_the_initial_state(gru: BundleModel, max_streams: int, burst: int) -> None:
    """More keys than max_streams: an evicted key's next record starts a fresh stream in a reused slot.

    Its predictions must come from the initial state, not from the state the slot's previous
    owner left there. Segments are read off the outputs (a key's step count restarting at 0)
    and each is checked against the bundle run over that segment alone. With bursts larger
    than max_streams, accept_many() must refuse ("not now") rather than fail, and lose nothing.
    """
    rng = random.Random(10)
    sent = make_traffic(rng, n_keys=50, n_records=300, kind="numeric", spec=NUM_IN)
    pipeline = Pipeline(gru, config(max_streams=max_streams, max_chunk=8), TOPIC)
    result = drive(pipeline, sent, rng, burst=burst)
    assert (result.refused > 0) == (burst > max_streams)
    evictions: dict[bytes, int] = defaultdict(int)
    for ev in pipeline.take_evictions():
        assert ev.reason == "lru"
        evictions[ev.key] += 1
    assert sum(evictions.values()) > 50
    by_offset = {(s.partition, s.offset): s for s in sent}
    per_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in result.docs:
        per_key[d["key"]].append(d)
    assert sum(len(v) for v in per_key.values()) == sum(len(s.steps) for s in sent)
    assert len({d["id"] for d in result.docs}) == len(result.docs)
    restarts = 0
    for key, docs in per_key.items():
        starts = [i for i, d in enumerate(docs) if d["step"] == 0]
        assert starts[0] == 0 and len(starts) - 1 <= evictions[key.encode()]
        restarts += len(starts) - 1
        for a, b in zip(starts, [*starts[1:], len(docs)], strict=True):
            seg = docs[a:b]
            assert [d["step"] for d in seg] == list(range(len(seg)))
            raw = [by_offset[(d["partition"], d["offset"])].steps[d["index"]] for d in seg]
            y = gru.run_sequence(normalise(raw, NUM_IN)[None], chunk=len(seg))[0][0]
            for d, y_t in zip(seg, y, strict=True):
                check_doc(d, Expected(key.encode(), d["step"], y_t, False, False), gru,
                          by_offset[(d["partition"], d["offset"])])
    assert restarts > 20  # evicted keys did come back, into reused slots


def test_commit_point_stays_below_an_unprocessed_record(gru: BundleModel) -> None:
    """Records accepted but not yet run hold the commit point at the first of them."""
    rng = random.Random(9)
    sent = make_traffic(rng, n_keys=5, n_records=30, kind="numeric", spec=NUM_IN)
    pipeline = Pipeline(gru, config(), TOPIC)
    for s in sent:
        pipeline.accept_many(s.partition, [s])
    first = {p: min(s.offset for s in sent if s.partition == p) for p in range(3)}
    assert pipeline.offsets.commit_points() == first
    outputs = pipeline.finish(pipeline.execute(pipeline.plan()))  # one round: the first step(s) of each key
    assert outputs
    points = pipeline.offsets.commit_points()
    for p, point in points.items():
        assert point <= max(s.offset for s in sent if s.partition == p)
    pipeline.offsets.mark_committed(points)
    assert pipeline.offsets.commit_points() == {}  # nothing new to commit
    result = drive(pipeline, sent, rng, already_accepted=len(sent))
    assert len(outputs) + len(result.docs) == sum(len(s.steps) for s in sent)
    last = {p: max(s.offset for s in sent if s.partition == p) for p in range(3)}
    assert pipeline.offsets.commit_points() == {p: o + 1 for p, o in last.items()}


# --- offsets through accept_many -------------------------------------------------------------------


def test_offsets_commit_the_first_unfinished_record_per_partition(gru: BundleModel) -> None:
    """A dead letter, a re-fetch, and a later record of another stream finishing first."""
    pipeline = Pipeline(gru, config(max_chunk=1), TOPIC)
    row = [1.0, -2.0, 30.0]
    a = Sent(b"a", 0, 10, orjson.dumps({"x": [row, row]}), [row, row])
    b = Sent(b"b", 0, 11, orjson.dumps({"x": row}), [row])
    dead = Sent(b"d", 0, 12, orjson.dumps({"x": [[1.0]], "tokens": [1]}), [], dead=True)
    c = Sent(b"c", 1, 0, orjson.dumps({"x": row}), [row])
    assert pipeline.accept_many(0, [a, b, dead]) == 3 and pipeline.accept_many(1, [c]) == 1
    assert pipeline.accept_many(0, [b]) == 1 and pipeline.scheduler.inflight == 4  # a re-fetch: taken, ignored
    assert len(pipeline.take_dead_letters()) == 1
    offsets = pipeline.offsets
    assert offsets.commit_points() == {0: 10, 1: 0}
    pipeline.finish(pipeline.execute(pipeline.plan()))  # one step each: b and c are done, a is not
    # finish drops what is done at each partition's front, before any commit point is asked for:
    # c is gone; b waits behind a, which is not done
    assert not offsets.partitions[1].records and offsets.partitions[0].records[0].offset == 10
    assert offsets.commit_points() == {0: 10, 1: 1} and offsets.pending(0) == 1
    offsets.mark_committed({1: 1})
    pipeline.finish(pipeline.execute(pipeline.plan()))
    assert offsets.commit_points() == {0: 13}  # past the dead letter too
    offsets.mark_committed({0: 13})
    assert offsets.commit_points() == {}
    offsets.mark_committed({0: 5})  # an older point never moves the mark back
    assert offsets.commit_points() == {} and offsets.pending(0) == offsets.pending(1) == 0
    offsets.forget(1)
    assert 1 not in offsets.partitions and offsets.pending(1) == 0


# --- generation after a prompt ------------------------------------------------------------------------


def test_generate_at_end_generates_once_per_message_from_the_state_after_its_last_step(recipe_bundle) -> None:
    """generate_at=end: a message is a prompt read whole. Only its last step's prediction carries
    the continuation, and that is the greedy roll-out from the state after it, computed here one
    call at a time; the other steps' predictions carry none."""
    model = BundleModel(recipe_bundle("charlm"))
    assert model.spec.input.tokenizer is not None
    tok, vocab = Tokenizer(model.spec.input.tokenizer), model.spec.output.vocab
    # equal lengths, so that several messages end in the same model call
    prompts = {b"a": ["the quick", " brown"], b"b": ["hello fox"], b"c": ["a red hen"], b"d": ["x"]}
    sent = [Sent(k, 0, 10 * n + j, orjson.dumps({"text": text}), tok.encode(text).tolist())
            for n, (k, texts) in enumerate(prompts.items()) for j, text in enumerate(texts)]
    pipeline = Pipeline(model, config(generate_tokens=5, generate_at="end"), TOPIC)
    docs = drive(pipeline, sent, random.Random(3)).docs
    assert len(docs) == sum(len(s.steps) for s in sent)
    for key, texts in prompts.items():
        mine = sorted((d for d in docs if d["key"] == key.decode()), key=lambda d: d["step"])
        ids = np.array([tok.encode("".join(texts))])
        state = model.initial_state(1)
        ends, at = set(), 0
        for text in texts:
            at += len(tok.encode(text))
            ends.add(at - 1)
        for t, doc in enumerate(mine):
            y, state = model.run(ids[:, t:t + 1], state)
            if t not in ends:
                assert "generated" not in doc["prediction"], (key, t)
                continue
            cur, s2, picked = y[:, 0], [a.copy() for a in state], []
            for i in range(5):
                picked.append(int(cur.argmax()))
                if i + 1 < 5:
                    yy, s2 = model.run(np.array([[picked[-1]]], dtype=np.int64), s2)
                    cur = yy[:, 0]
            assert doc["prediction"]["generated_ids"] == picked, (key, t)
            assert doc["prediction"]["generated"] == "".join(vocab[i] for i in picked)


# --- the course's stateful moving average ------------------------------------------------------------


def test_moving_average_recipe_served_step_by_step_is_the_mean_of_the_last_five_inputs(recipe_bundle) -> None:
    """Messages of 1-3 steps for 30 streams, in random interleavings and batches: each prediction
    after the warm-up is the arithmetic mean of its stream's last 5 inputs (to the model's
    accuracy), which holds only if each stream's state is carried across messages and calls."""
    model = BundleModel(recipe_bundle("moving_average"))
    rng = random.Random(5)
    nprng = np.random.default_rng(5)
    inputs = {f"s{i}".encode(): nprng.uniform(-1, 1, 40).tolist() for i in range(30)}
    sent, offsets, cursor = [], [0, 0, 0], {k: 0 for k in inputs}
    while any(c < 40 for c in cursor.values()):
        key = rng.choice([k for k, c in cursor.items() if c < 40])
        n = min(rng.randint(1, 3), 40 - cursor[key])
        rows = [[v] for v in inputs[key][cursor[key]:cursor[key] + n]]
        p = int(key[1:]) % 3  # a stream lives in one partition
        sent.append(Sent(key, p, offsets[p], orjson.dumps({"x": rows}), rows))
        offsets[p] += 1
        cursor[key] += n
    docs = drive(Pipeline(model, config(), TOPIC), sent, rng).docs
    assert len(docs) == 30 * 40
    worst = 0.0
    for d in docs:
        step, x = d["step"], inputs[d["key"].encode()]
        assert d["warmup"] == (step < 4)
        if step >= 4:
            worst = max(worst, abs(d["prediction"]["values"]["mean_last_5"] - float(np.mean(x[step - 4:step + 1]))))
    assert worst < 0.06, worst


# --- a random initial state ---------------------------------------------------------------------------


RANDOM = RandomInit("normal", (0.0, 0.8), seed=7)


@pytest.fixture(scope="module")
def gru_random(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, BundleModel]:
    torch.manual_seed(11)
    model = zoo.build(cell="gru", n_features=3, hidden=8, out_size=2).eval()
    return model, _export(tmp_path_factory.mktemp("grur") / "gru-random.onnx", model, name="gru-random",
                          input=NUM_IN, output=NUM_OUT, random_init=RANDOM)


def test_random_initial_state_is_drawn_per_key_and_reproduced_by_a_restart(gru_random) -> None:
    """Each stream starts from its own draw: its predictions are PyTorch's from that state (and not
    from zeros). A second pipeline — a restart, another replica — given the same traffic writes the
    same predictions; the bundle's seed decides the draw."""
    torch_model, model = gru_random
    spec = model.spec
    assert [s.init for s in spec.states] == ["random"] and spec.states[0].init_random == RANDOM
    sent = make_traffic(random.Random(21), n_keys=12, n_records=60, kind="numeric", spec=NUM_IN)
    runs = [drive(Pipeline(model, config(), TOPIC), sent, random.Random(seed)).docs for seed in (1, 2)]
    by_id = [{d["id"]: d["prediction"]["values"] for d in docs} for docs in runs]
    assert len(by_id[0]) == sum(len(s.steps) for s in sent) and by_id[0] == by_id[1]
    out_mean, out_std = np.asarray(NUM_OUT.mean), np.asarray(NUM_OUT.std)
    worst = gap_from_zeros = 0.0
    for key in {s.key for s in sent}:
        mine = [s for s in sent if s.key == key]
        x = torch.from_numpy(normalise([row for s in mine for row in s.steps], NUM_IN))[None]
        h0 = torch.from_numpy(spec.states[0].initial_for(key)).unsqueeze(1)
        with torch.no_grad():
            want = torch_model(x, h0)[0][0].numpy() * out_std + out_mean
            from_zeros = torch_model(x, torch.zeros_like(h0))[0][0].numpy() * out_std + out_mean
        got = np.array([[by_id[0][f"{TOPIC}/{s.partition}/{s.offset}/{j}"][n] for n in NUM_OUT.names]
                        for s in mine for j in range(len(s.steps))])
        worst = max(worst, float(np.max(np.abs(got - want))))
        gap_from_zeros = max(gap_from_zeros, float(np.max(np.abs(got[0] - from_zeros[0]))))
    assert worst < 1e-4 and gap_from_zeros > 1e-2
    a, b = (spec.states[0].initial_for(k) for k in (b"key-1", b"key-2"))
    other_seed = dataclasses.replace(spec.states[0], init_random=dataclasses.replace(RANDOM, seed=8))
    assert not np.allclose(a, b) and not np.allclose(a, other_seed.initial_for(b"key-1"))
    assert np.array_equal(a, spec.states[0].initial_for(b"key-1"))


# --- a stream started from a context: init(context) -> state ---------------------------------------------

CAP_VOCAB = ("<pad>", "<unk>", *(f"w{i}" for i in range(10)))


@pytest.fixture(scope="module")
def captioner(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, BundleModel]:
    from user_models import Captioner

    torch.manual_seed(14)
    model = Captioner(vocab_size=len(CAP_VOCAB), context_size=6).eval()
    tok = TokenizerSpec("word", CAP_VOCAB, unk_id=1, pad_id=0)
    return model, _export(tmp_path_factory.mktemp("cap") / "cap.onnx", model, name="cap",
                          input=InputSpec("tokens", tokenizer=tok),
                          output=OutputSpec("language_model", vocab=CAP_VOCAB), context_size=6)


@pytest.mark.parametrize("device_state", [False, True])
def test_streams_started_from_a_context_follow_pytorch_from_init_of_that_context(captioner,
                                                                                device_state: bool) -> None:
    """Captioning's shape: each caption starts from its image's representation. Streams start from
    a context (with their first tokens, or in a control-only start), some start over from a new
    context mid-way, one never gets one (zeros); in random batches. Every prediction equals
    PyTorch's init(context) followed by the module over that caption's tokens (``device_state``:
    the init graph's states scattered into the device arena)."""
    torch_model, model = captioner
    assert model.spec.start is not None and model.spec.start.size == 6
    rng, nprng = random.Random(8), np.random.default_rng(8)
    by_key: dict[bytes, list[tuple[dict[str, Any], list[int]]]] = defaultdict(list)
    segments: list[tuple[bytes, list[float] | None, list[int]]] = []  # the reference's captions

    def add(key: bytes, doc: dict[str, Any], steps: list[int], start: list[float] | None) -> None:
        by_key[key].append((doc, steps))
        if start is not None or not segments or segments[-1][0] != key:
            segments.append((key, start, []))
        segments[-1][2].extend(steps)

    for n in range(16):
        key = f"c{n}".encode()
        for _caption in range(1 if n % 4 else 2):  # every fourth stream gets a second image
            context = nprng.standard_normal(6).round(4).tolist() if n != 15 else None
            words = [rng.randrange(2, len(CAP_VOCAB)) for _ in range(rng.randint(2, 6))]
            if context is None:
                add(key, {"tokens": words}, words, None)
            elif n % 3 == 0:  # a control-only start, then the tokens
                add(key, {"control": "start", "context": context}, [], context)
                add(key, {"tokens": words[:2]}, words[:2], None)
                if words[2:]:
                    add(key, {"tokens": words[2:]}, words[2:], None)
            else:
                add(key, {"context": context, "tokens": words}, words, context)
    # streams interleaved at random, each in its own order; offsets in arrival order per partition
    sent: list[Sent] = []
    offsets = [0, 0, 0]
    while by_key:
        key = rng.choice(list(by_key))
        doc, steps = by_key[key].pop(0)
        p = int(key[1:]) % 3
        sent.append(Sent(key, p, offsets[p], orjson.dumps(doc), steps))
        offsets[p] += 1
        if not by_key[key]:
            del by_key[key]
    docs = drive(Pipeline(model, config(top_k=len(CAP_VOCAB), device_state=device_state), TOPIC), sent, rng).docs
    assert len(docs) == sum(len(s.steps) for s in sent)
    mine = defaultdict(list)
    for d in docs:
        mine[d["key"].encode()].append(d)
    worst, cursor = 0.0, defaultdict(int)
    for key, context, ids in segments:
        got = sorted(mine[key], key=lambda d: (d["offset"], d["index"]))[cursor[key]:cursor[key] + len(ids)]
        cursor[key] += len(ids)
        h0 = (torch_model.init(torch.tensor([context])) if context is not None
              else torch.zeros(1, 1, torch_model.gru.hidden_size))
        with torch.no_grad():
            p = torch.softmax(torch_model(torch.tensor([ids]), h0)[0][0], dim=-1).numpy()
        assert [d["step"] for d in got] == list(range(len(ids)))
        for t, d in enumerate(got):
            assert d["token_id"] == ids[t]
            for nxt in d["prediction"]["next"]:
                worst = max(worst, abs(nxt["p"] - float(p[t, CAP_VOCAB.index(nxt["token"])])))
    assert worst < 1e-4, worst


def test_the_init_graph_is_sealed_with_the_rest_of_the_bundle(tmp_path: Path) -> None:
    """The init(context) graph lives in the bundle's metadata: the content hash covers it, so an
    edited one is refused like any other change."""
    import base64

    import onnx

    from rnnd.daemon.bundle import BundleIntegrityError
    from user_models import Captioner

    torch.manual_seed(15)
    path = tmp_path / "cap.onnx"
    tok = TokenizerSpec("word", CAP_VOCAB, unk_id=1, pad_id=0)
    _export(path, Captioner(vocab_size=len(CAP_VOCAB), context_size=3).eval(), name="cap",
            input=InputSpec("tokens", tokenizer=tok), output=OutputSpec("language_model", vocab=CAP_VOCAB),
            context_size=3)
    proto = onnx.load(str(path))
    entry = next(p for p in proto.metadata_props if p.key == "rnnd.graph.init")
    graph = onnx.load_from_string(base64.b64decode(entry.value))
    weight = graph.graph.initializer[0]
    weight.raw_data = bytes([weight.raw_data[0] ^ 1]) + weight.raw_data[1:]  # one bit of one weight
    entry.value = base64.b64encode(graph.SerializeToString()).decode()
    with pytest.raises(BundleIntegrityError, match="was modified after export"):
        BundleModel(proto.SerializeToString())


# --- device-resident state ------------------------------------------------------------------------


@pytest.mark.parametrize("bundle", ["gru", "lstm_tokens", "gru_random"])
def test_device_state_gives_exactly_what_the_host_arena_gives(request: pytest.FixtureRequest, bundle: str) -> None:
    """The same traffic (controls, dead letters, LRU evictions, re-fetches, the same random bursts) through
    a pipeline with the host arena and one with device_state, here on the CPU provider: the same
    documents, the same changelog records, and the same state in every slot, bit for bit."""
    fixture = request.getfixturevalue(bundle)
    model: BundleModel = fixture[1] if isinstance(fixture, tuple) else fixture
    spec = model.spec
    kind = spec.input.kind
    traffic = make_traffic(random.Random(7), n_keys=60, n_records=400, kind=kind,
                           spec=spec.input, dead_rate=0.03, controls=True)
    runs = []
    for device_state in (False, True):
        pipeline = Pipeline(model, config(max_chunk=4, max_batch=16, max_streams=40, device_state=device_state),
                            TOPIC)
        records: list[tuple[int, bytes, bytes | None]] = []

        def checkpoint(p: Pipeline, accepted: int, docs: list[dict[str, Any]], into: list = records) -> None:
            if accepted % 7 == 0:
                into += p.changelog_records()

        result = drive(pipeline, traffic, random.Random(8), checkpoint)
        records += pipeline.changelog_records()
        docs = [{k: v for k, v in d.items() if k != "output_ts"} for d in result.docs]
        slots = np.flatnonzero(pipeline.streams.in_use)
        assert isinstance(pipeline.streams.arena, DeviceArena) == device_state
        runs.append((docs, records, pipeline.streams.arena.get_many(slots)))
    (host_docs, host_records, host_state), (dev_docs, dev_records, dev_state) = runs
    assert len(host_docs) > 300 and dev_docs == host_docs
    assert dev_records == host_records and len(host_records) > 100
    for a, b in zip(host_state, dev_state, strict=True):
        assert a.shape == b.shape and np.array_equal(a, b)


def test_device_state_is_refused_where_it_cannot_work(window: BundleModel, gru: BundleModel) -> None:
    with pytest.raises(ConfigError, match=r"device_state is for stateful bundles; win@.* is a window bundle"):
        Pipeline(window, config(device_state=True), TOPIC)
    with pytest.raises(ConfigError, match="forecast_horizon must be 0 with device_state, not 3"):
        config(device_state=True, forecast_horizon=3)


@pytest.mark.parametrize("device_state", [False, True])
def test_batch_buckets_pad_every_call_to_a_power_of_two_and_change_no_prediction(gru: BundleModel,
                                                                                device_state: bool) -> None:
    """batch_buckets: the model sees only batches of 1, 2, 4, 8, 16 rows (the padding is a spare slot's);
    every document and every stream's state is what the unpadded pipeline gives."""
    traffic = make_traffic(random.Random(3), n_keys=50, n_records=300, kind="numeric", spec=NUM_IN, controls=True)
    runs = []
    for buckets in (False, True):
        pipeline = Pipeline(gru, config(max_batch=16, batch_buckets=buckets, device_state=device_state), TOPIC)
        seen: list[int] = []
        execute = pipeline.execute

        def counted(calls: list, execute: Callable = execute, seen: list[int] = seen) -> list:
            seen += [len(c.x) for c in calls]
            return execute(calls)

        pipeline.execute = counted  # type: ignore[method-assign]
        result = drive(pipeline, traffic, random.Random(4))
        docs = [{k: v for k, v in d.items() if k != "output_ts"} for d in result.docs]
        slots = np.flatnonzero(pipeline.streams.in_use)
        runs.append((docs, pipeline.streams.arena.get_many(slots), seen))
    (docs, state, plain), (padded_docs, padded_state, padded) = runs
    assert padded_docs == docs and len(docs) > 200
    for a, b in zip(state, padded_state, strict=True):
        assert np.array_equal(a, b)
    assert set(padded) <= {1, 2, 4, 8, 16} and set(plain) - {1, 2, 4, 8, 16}  # unpadded: other widths occur
