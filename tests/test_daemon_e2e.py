"""End to end: a real daemon process, a real broker, real bundles trained by our recipes.

For each mode the test interleaves ≥1,000 streams of random lengths over 4 partitions and
checks every key's predictions against an independent reference: the same bundle run by
ONNX Runtime over that key's whole sequence in one call. Exactly one prediction per input
step, with the id that names the input's coordinates.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from daemon_harness import DaemonProcess, Received, Sent, consume, produce

from rnnd.daemon.bundle import BundleSpec
from rnnd.daemon.heads import softmax
from rnnd.daemon.runtime import BundleModel
from rnnd.daemon.tokenizer import Tokenizer

#: Every broker test here runs on Tansu and on Apache Kafka (tests/conftest.py).
BROKERS = ("tansu", "kafka")
N_STREAMS = 1000


def interleave(per_key: dict[bytes, list[dict]], seed: int) -> list[tuple[bytes, dict]]:
    """Random merge of every key's messages, each key's own order kept."""
    rng = random.Random(seed)
    queues = {k: list(v) for k, v in per_key.items()}
    keys = [k for k, v in queues.items() for _ in v]
    rng.shuffle(keys)
    return [(k, queues[k].pop(0)) for k in keys]


def check_ids_and_steps(topic: str, sent: list[Sent], outputs: list[Received], steps_of: dict[int, int]) -> dict:
    """One output per input step; ids name (topic, partition, offset, index); steps count 0.. per key.

    Returns {key: [output value, ...]} in step order.
    """
    by_coord = {(s.partition, s.offset): s for s in sent}
    ids = [o.value["id"] for o in outputs]
    assert len(ids) == len(set(ids)), "duplicate prediction ids"
    expected = sum(steps_of[i] for i in range(len(sent)))
    assert len(outputs) == expected
    index_of = {(s.partition, s.offset): i for i, s in enumerate(sent)}
    per_key: dict[bytes, list[dict]] = defaultdict(list)
    for o in outputs:
        v = o.value
        src = by_coord[(v["partition"], v["offset"])]
        assert v["id"] == f"{topic}/{v['partition']}/{v['offset']}/{v['index']}"
        assert v["key"].encode() == src.key == o.key
        assert 0 <= v["index"] < steps_of[index_of[(v["partition"], v["offset"])]]
        per_key[o.key].append(v)
    for k, vs in per_key.items():
        vs.sort(key=lambda v: v["step"])
        assert [v["step"] for v in vs] == list(range(len(vs))), k
        order = [(v["offset"], v["index"]) for v in vs]
        assert order == sorted(order), f"{k!r}: steps applied out of order"
    return per_key


def same_as_predict(bundle, topic: str, items: list[tuple[bytes, dict]], outputs: list[Received], tmp_path,
                    bootstrap: str | None) -> None:
    """`rnnd predict` over the same messages as a file, keys placed as Kafka placed them (``--partitions``),
    and (given ``bootstrap``) over the input topic itself, as two ranges of offsets: every document the
    daemon wrote, id and all, is the one predict writes (times aside; the values within float32
    rounding: the two batch the streams differently)."""
    rows = tmp_path / "sent.jsonl"
    rows.write_text("".join(json.dumps({"stream": k.decode(), **m}) + "\n" for k, m in items))
    runs = [["--key-column", "stream", "--topic", topic, "--partitions", "4", str(rows)]]
    if bootstrap:
        middle = len(items) // 8  # about a half of each of the 4 partitions' offsets
        runs += [["--input-topic", topic, "--bootstrap-servers", bootstrap, "--end-offset", str(middle)],
                 ["--input-topic", topic, "--bootstrap-servers", bootstrap, "--start-offset", str(middle)]]
    results = []
    for n, argv in enumerate(runs):
        out = tmp_path / f"predicted-{n}.jsonl"
        r = subprocess.run([sys.executable, "-m", "rnnd", "predict", "--model", str(bundle), "--output", str(out),
                            *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        results.append({d["id"]: d for d in map(json.loads, out.read_text().splitlines())})
    daemon = {o.value["id"]: o.value for o in outputs}

    def same(predicted: dict[str, dict], times: tuple[str, ...]) -> None:
        for i, p in predicted.items():
            d = daemon[i]
            assert {k: v for k, v in p.items() if k not in ("prediction", *times)} == {
                k: v for k, v in d.items() if k not in ("prediction", *times)}, i
            for name, v in d["prediction"]["values"].items():
                assert p["prediction"]["values"][name] == pytest.approx(v, rel=1e-5, abs=1e-5), (i, name)

    assert results[0].keys() == daemon.keys()
    same(results[0], ("input_ts", "output_ts"))
    if bootstrap:  # a topic's records keep their timestamps too; the second range starts its streams afresh
        first, second = results[1], results[2]
        assert first.keys() | second.keys() == daemon.keys() and first and second and not first.keys() & second.keys()
        same(first, ("output_ts",))


def normalised_values(spec: BundleSpec, v: dict) -> np.ndarray:
    out = spec.output
    vals = np.array([v["prediction"]["values"][n] for n in out.names], dtype=np.float64)
    mean = np.array(out.mean or [0.0] * out.size)
    std = np.array(out.std or [1.0] * out.size)
    return (vals - mean) / std


@pytest.mark.parametrize("mode", ["stateful", "stateful-device", "window"])
def test_numeric_streams_match_full_sequence_reference(mode, bootstrap, topic_factory, recipe_bundle,
                                                       window_bundle, tmp_path):
    """``stateful-device``: the state kept by device_state's code path (on the CPU provider here)."""
    bundle = window_bundle if mode == "window" else recipe_bundle("sensors")
    model = BundleModel(bundle)
    spec = model.spec
    f = spec.input.n_features
    names = spec.input.features
    rng = np.random.default_rng(7)
    topic_in, topic_out = topic_factory("in", 4), topic_factory("out", 4)
    seqs: dict[bytes, np.ndarray] = {}
    per_key: dict[bytes, list[dict]] = {}
    for i in range(N_STREAMS):
        key = f"dev-{i}".encode()
        n = int(rng.integers(1, 13))
        mean = np.array(spec.input.mean or [0.0] * f)
        std = np.array(spec.input.std or [1.0] * f)
        raw = mean + std * rng.standard_normal((n, f))
        seqs[key] = raw
        msgs, t = [], 0
        while t < n:
            k = int(rng.integers(1, 4))
            chunk = raw[t:t + k]
            form = rng.integers(0, 3)
            if len(chunk) == 1 and form == 0:
                msgs.append({"x": chunk[0].tolist()})
            elif form == 1:
                msgs.append({"x": [dict(zip(names, row, strict=True)) for row in chunk.tolist()]})
            else:
                msgs.append({"x": chunk.tolist()})
            t += len(chunk)
        per_key[key] = msgs
    items = interleave(per_key, seed=1)
    sent = produce(bootstrap, topic_in, items)
    steps_of = {i: len(m["x"]) if isinstance(m["x"], list) and isinstance(m["x"][0], (list, dict)) else 1
                for i, (_, m) in enumerate(items)}
    total = sum(steps_of.values())
    assert total == sum(len(s) for s in seqs.values())
    extra = ["--device-state"] if mode == "stateful-device" else []
    with DaemonProcess(bundle, bootstrap, topic_in, topic_out, *extra, log_dir=tmp_path) as d:
        d.start()
        outputs = consume(bootstrap, topic_out, total, timeout=90, settle=0.5)
        by_key = check_ids_and_steps(topic_in, sent, outputs, steps_of)
        assert d.metric("rnnd_predictions_total") == total
        assert d.metric("rnnd_messages_consumed_total", topic=topic_in) == len(items)
        assert d.metric("rnnd_steps_total") == total
        assert d.metric("rnnd_active_streams") == N_STREAMS
        assert d.stop() == 0
    # rnnd predict runs the host arena: the device_state daemon's documents must equal its own
    same_as_predict(bundle, topic_in, items, outputs, tmp_path, bootstrap if mode == "stateful" else None)
    worst = 0.0
    for key, raw in seqs.items():
        x = ((raw - np.array(spec.input.mean or 0.0)) / np.array(spec.input.std or 1.0)).astype(np.float32)[None]
        ref = model.run_sequence(x, chunk=x.shape[1])[0][0] if mode != "window" else model.run_windows(x)[0]
        got = np.stack([normalised_values(spec, v) for v in by_key[key]])
        worst = max(worst, float(np.max(np.abs(got - ref))))
        warm = [v["warmup"] for v in by_key[key]]
        assert warm == [s < spec.warmup_steps for s in range(len(raw))]
    assert worst <= 1e-4, worst


def test_text_streams_match_full_sequence_reference(bootstrap, topic_factory, recipe_bundle, tmp_path):
    from rnnd.export.recipes.tasks import review

    bundle = recipe_bundle("sentiment")
    model = BundleModel(bundle)
    spec = model.spec
    tok = Tokenizer(spec.input.tokenizer)
    rng = np.random.default_rng(3)
    topic_in, topic_out = topic_factory("text-in", 4), topic_factory("text-out", 4)
    per_key: dict[bytes, list[dict]] = {}
    ids: dict[bytes, list[int]] = {}
    for i in range(N_STREAMS):
        key = f"chat-{i}".encode()
        words, _ = review(rng, int(rng.integers(1, 16)))
        if rng.random() < 0.2:
            words.insert(int(rng.integers(0, len(words))), "zyzzyva")  # unknown word → <unk>
        msgs, t = [], 0
        while t < len(words):
            k = int(rng.integers(1, 7))
            msgs.append({"text": " ".join(words[t:t + k]).upper() if rng.random() < 0.1 else " ".join(words[t:t + k])})
            t += k
        per_key[key] = msgs
        ids[key] = [i for m in msgs for i in tok.encode(m["text"]).tolist()]
    items = interleave(per_key, seed=2)
    sent = produce(bootstrap, topic_in, items)
    steps_of = {i: len(tok.encode(m["text"])) for i, (_, m) in enumerate(items)}
    total = sum(steps_of.values())
    with DaemonProcess(bundle, bootstrap, topic_in, topic_out, log_dir=tmp_path) as d:
        d.start()
        outputs = consume(bootstrap, topic_out, total, timeout=90, settle=0.5)
        by_key = check_ids_and_steps(topic_in, sent, outputs, steps_of)
        assert d.metric("rnnd_predictions_total") == total
        assert d.metric("rnnd_steps_total") == total
        # Messages of several tokens run as chunks: some calls have T > 1, and there are far fewer
        # calls than steps.
        calls = d.metric("rnnd_chunk_steps_count")
        assert d.metric("rnnd_chunk_steps_bucket", le="1.0") < calls < total / 4
        assert d.stop() == 0
    labels = spec.output.labels
    worst = 0.0
    for key, seq in ids.items():
        logits = model.run_sequence(np.array([seq], dtype=np.int64), chunk=len(seq))[0][0]
        ref = softmax(logits)
        got = np.array([[v["prediction"]["probs"][lab] for lab in labels] for v in by_key[key]])
        worst = max(worst, float(np.max(np.abs(got - ref))))
        assert [v["prediction"]["label"] for v in by_key[key]] == [labels[i] for i in ref.argmax(-1)]
    assert worst <= 1e-4, worst
