"""The Python API (``rnnd.daemon.local.Session``) and `rnnd predict`, without Kafka.

The references are independent of the pipeline: each stream's whole sequence in one ONNX
Runtime call (``BundleModel.run_sequence``), as the e2e tests check the daemon. That
`rnnd predict` writes what the daemon writes is checked in tests/test_daemon_e2e.py, against
a daemon's output topic.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rnnd.daemon.errors import BundleError
from rnnd.daemon.local import Session
from rnnd.daemon.runtime import BundleModel


def streams(spec, n: int, seed: int) -> tuple[dict[str, np.ndarray], list[tuple[str, dict]]]:
    """``n`` streams of 1-12 raw steps each, sent as messages of 1-3 steps, interleaved at random."""
    rng = np.random.default_rng(seed)
    f = spec.input.n_features
    mean, std = np.array(spec.input.mean or [0.0] * f), np.array(spec.input.std or [1.0] * f)
    seqs, per_key = {}, {}
    for i in range(n):
        key = f"dev-{i}"
        raw = mean + std * rng.standard_normal((int(rng.integers(1, 13)), f))
        seqs[key] = raw
        cuts = np.cumsum(rng.integers(1, 4, size=len(raw)))
        per_key[key] = [{"x": raw[a:b].tolist()} for a, b in zip([0, *cuts], cuts, strict=False) if a < len(raw)]
    order = [k for k, msgs in per_key.items() for _ in msgs]
    random.Random(seed).shuffle(order)
    cursor = dict.fromkeys(per_key, 0)
    items = []
    for k in order:
        items.append((k, per_key[k][cursor[k]]))
        cursor[k] += 1
    return seqs, items


def reference(model: BundleModel, raw: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    spec = model.spec
    x = ((raw - np.array(spec.input.mean or 0.0)) / np.array(spec.input.std or 1.0)).astype(np.float32)[None]
    y, states = model.run_sequence(x, chunk=x.shape[1])
    return y[0], states


def values(spec, doc: dict) -> np.ndarray:
    out = spec.output
    vals = np.array([doc["prediction"]["values"][n] for n in out.names], dtype=np.float64)
    return (vals - np.array(out.mean or [0.0] * out.size)) / np.array(out.std or [1.0] * out.size)


def test_session_predicts_as_the_whole_sequence_and_continues_from_a_checkpoint(recipe_bundle) -> None:
    """300 interleaved streams through a Session, checkpointed half-way and restored into a new
    Session (sharing the open bundle) for the rest: every prediction, its step number and each
    stream's final state equal the bundle run over the stream's whole sequence in one call."""
    model = BundleModel(recipe_bundle("sensors"))
    spec = model.spec
    seqs, items = streams(spec, 300, seed=4)
    first = Session(model)
    docs = first.predict(items[: len(items) // 2])
    saved = first.checkpoint()
    second = Session(model)
    second.restore(saved)
    docs += second.predict(items[len(items) // 2:])
    assert not first.dead_letters and not second.dead_letters
    assert len(docs) == sum(len(r) for r in seqs.values())
    by_key: dict[str, list[dict]] = {}
    for d in docs:
        by_key.setdefault(d["key"], []).append(d)
    offsets = [d["offset"] for d in docs]
    assert len({d["id"] for d in docs}) == len(docs) and max(offsets) == len(items) - 1  # offsets continue
    worst = 0.0
    for key, raw in seqs.items():
        y, final = reference(model, raw)
        got = by_key[key]
        assert [d["step"] for d in got] == list(range(len(raw)))
        assert [d["warmup"] for d in got] == [s < spec.warmup_steps for s in range(len(raw))]
        worst = max(worst, float(np.abs(np.stack([values(spec, d) for d in got]) - y).max()))
        state = second.state(key)
        assert state is not None and list(state) == [s.name for s in spec.states]
        for want, decl, (name, have) in zip(final, spec.states, state.items(), strict=True):
            np.testing.assert_allclose(have, np.take(want, 0, axis=decl.batch_axis), atol=1e-5,
                                       err_msg=f"{key}: {name}")
    assert worst <= 1e-4, worst
    assert second.state("nobody") is None


def test_bad_messages_are_dead_letters_and_leave_the_streams_alone(recipe_bundle) -> None:
    model = BundleModel(recipe_bundle("sensors"))
    _, items = streams(model.spec, 20, seed=5)
    clean = Session(model).predict(items)
    session = Session(model)
    bad = [b"not json", {"x": [1.0]}, {"x": [float("nan")] * model.spec.input.n_features}, None]
    for i, (key, msg) in enumerate(items):
        session.send(key, msg)
        if i % 7 == 0:
            session.send(key, bad[i % len(bad)])
    docs = session.run()
    assert [(d["key"], d["step"], d["prediction"]) for d in docs] == [
        (d["key"], d["step"], d["prediction"]) for d in clean]
    assert len(session.dead_letters) == len(range(0, len(items), 7))
    assert {d["reason"] for d in session.dead_letters} >= {"not_json", "feature_count"}
    assert all(d["topic"] == "local" and d["message"] for d in session.dead_letters)


def test_restore_refuses_state_of_another_layout_and_what_is_not_a_checkpoint(recipe_bundle, window_bundle) -> None:
    stateful = Session(recipe_bundle("sensors"))
    stateful.predict(streams(stateful.model.spec, 3, seed=6)[1])
    saved = stateful.checkpoint()
    with pytest.raises(BundleError, match="another layout"):
        Session(window_bundle).restore(saved)
    for junk in (b"", b"{}", b"[1, 2]", json.dumps({"format": 9, "model": "m", "streams": [],
                                                    "next_offsets": {}}).encode()):
        with pytest.raises(BundleError, match="checkpoint"):
            Session(recipe_bundle("sensors")).restore(junk)
    with pytest.raises(TypeError):
        Session(recipe_bundle("sensors"), config=stateful.config, emit="every")


def run_predict(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rnnd", "predict", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_predict_scores_a_file_as_a_session_does_and_says_what_to_fix(recipe_bundle, tmp_path: Path) -> None:
    bundle = recipe_bundle("sensors")
    model = BundleModel(bundle)
    _, items = streams(model.spec, 50, seed=8)
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"device": k, **m}) + "\n" for k, m in items)
                    + '{"device": "dev-0", "x": [1, 2]}\n')
    out, dead = tmp_path / "out.jsonl", tmp_path / "dead.jsonl"
    r = run_predict(rows, "--model", bundle, "--key-column", "device", "--output", out, "--dead-letters", dead,
                    "--topic", "sensors-in")
    assert r.returncode == 0, r.stderr
    assert f"{len(items) + 1:,} messages" in r.stderr and "feature_count: 1" in r.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = Session(model, "sensors-in").predict(items)
    strip = ("input_ts", "output_ts")
    assert [{k: v for k, v in d.items() if k not in strip} for d in got] == [
        {k: v for k, v in d.items() if k not in strip} for d in want]
    assert [json.loads(line)["reason"] for line in dead.read_text().splitlines()] == ["feature_count"]

    for argv, fix in ((["--key-column", "nope"], "no key field"),
                      (["--key-column", "device", "--config", tmp_path / "missing.toml"], "missing.toml"),
                      (["--key-column", "device", "--partitions", "0"], "must be >= 1")):
        r = run_predict(rows, "--model", bundle, *argv)
        assert r.returncode == 2 and fix in r.stderr and "Traceback" not in r.stderr, r.stderr
    for argv, fix in (([], "give a file or --input-topic"),
                      (["--input-topic", "t", "--key-column", "device"], "--key-column applies to a file"),
                      (["--input-topic", "t", "--start-offset", "5", "--end-offset", "5"], "must be past"),
                      ([rows, "--key-column", "device", "--end-offset", "9"], "--end-offset applies to --input-topic")):
        r = run_predict("--model", bundle, *argv)
        assert r.returncode == 2 and fix in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_predict(rows, "--model", tmp_path / "missing.onnx", "--key-column", "device")
    assert r.returncode in (1, 2) and "missing.onnx" in r.stderr and "Traceback" not in r.stderr, r.stderr

    # A route of a config file with routes: its bundle and its serving settings (warmup = hold here).
    routes = tmp_path / "routes.toml"
    routes.write_text(f'[routes.s]\nmodel = "{bundle}"\ninput_topic = "sensors-in"\noutput_topic = "o"\n'
                      'warmup = "hold"\n[routes.t]\nmodel = "x.onnx"\ninput_topic = "t"\noutput_topic = "t-o"\n')
    r = run_predict(rows, "--config", routes, "--route", "s", "--key-column", "device", "--output", out,
                    "--topic", "sensors-in")
    assert r.returncode == 0, r.stderr
    held = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(held) < len(got) and [{k: v for k, v in d.items() if k not in strip} for d in held] == [
        {k: v for k, v in d.items() if k not in strip} for d in got if not d["warmup"]]
    for argv, fix in ((["--config", routes, "--route", "s", "--model", bundle], "give --model, or --route NAME"),
                      (["--route", "s"], "give --config"), (["--config", routes, "--model", bundle], "--route NAME")):
        r = run_predict(rows, "--key-column", "device", *argv)
        assert r.returncode == 2 and fix in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_readme_example_runs_verbatim(tmp_path: Path, monkeypatch) -> None:
    """README "Without Kafka": its Python block, run as written next to a bundle named model.onnx
    (the shipped sensors bundle, whose 8 features the example sends)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("From Python (`rnnd.daemon.local`", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    shutil.copy(Path(__file__).parents[1] / "cli" / "demo_bundle" / "sensors.onnx", tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    session, later = scope["session"], scope["later"]
    assert session.state("dev-1") is not None and session.dead_letters == []
    np.testing.assert_array_equal(later.state("dev-1")["h"], session.state("dev-1")["h"])


def test_device_state_checkpoints_restore_into_either_arena(recipe_bundle) -> None:
    """State kept by device_state (its code path on the CPU provider) checkpoints and restores both
    ways: a host Session continues a device one and the reverse, with the documents a host Session
    alone writes, bit for bit."""
    model = BundleModel(recipe_bundle("sensors"))
    _, items = streams(model.spec, 60, seed=9)
    half = len(items) // 2

    def run(first_on_device: bool, then_on_device: bool) -> list[dict]:
        first = Session(model, device_state=first_on_device)
        docs = first.predict(items[:half])
        second = Session(model, device_state=then_on_device)
        second.restore(first.checkpoint())
        docs += second.predict(items[half:])
        assert second.state("dev-3") is not None
        return [{k: v for k, v in d.items() if k not in ("output_ts", "input_ts")} for d in docs]  # the clock

    host = run(False, False)
    assert run(True, False) == host and run(False, True) == host and run(True, True) == host
