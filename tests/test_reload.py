"""Hot reload: a bundle swapped in while serving, against per-version references.

The reference of a stream is computed one step at a time, each step by the bundle its output
names, the state carried from step to step: what "the stream continues on the new model" means.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import DaemonProcess, consume, free_port, produce

from rnnd.daemon.errors import BundleError
from rnnd.daemon.local import Session
from rnnd.daemon.runtime import BundleModel

FEATURE = "x_prev_times_x"


def reference(models: dict[str, BundleModel], xs: list[float], named: list[str]) -> np.ndarray:
    """One stream step by step, step i by the bundle ``named[i]``, its state carried over."""
    state = None
    out = []
    for x, ref in zip(xs, named, strict=True):
        y, state = models[ref].run_sequence(np.array([[[x]]], dtype=np.float32), chunk=1, states=state)
        out.append(float(y[0, 0, 0]))
    return np.array(out)


def test_a_swap_continues_every_stream_and_each_prediction_is_its_bundles(upgrade_bundles) -> None:
    v1, v2, _ = upgrade_bundles
    models = {m.spec.model.ref: m for m in (BundleModel(v1), BundleModel(v2))}
    rng = np.random.default_rng(3)
    xs = {f"k{i}": rng.uniform(-1, 1, 8).tolist() for i in range(30)}
    session = Session(v1)
    docs = session.predict([(k, {"x": [x]}) for i in range(4) for k, seq in xs.items() for x in [seq[i]]])
    assert "continues" in session.swap(v2)
    docs += session.predict([(k, {"x": [x]}) for i in range(4, 8) for k, seq in xs.items() for x in [seq[i]]])
    assert len(docs) == 8 * len(xs)
    for key, seq in xs.items():
        mine = sorted((d for d in docs if d["key"] == key), key=lambda d: d["step"])
        assert [d["step"] for d in mine] == list(range(8))
        named = [d["model"] for d in mine]
        assert named == [BundleModel(v1).spec.model.ref] * 4 + [BundleModel(v2).spec.model.ref] * 4
        got = np.array([d["prediction"]["values"][FEATURE] for d in mine])
        assert np.max(np.abs(got - reference(models, seq, named))) <= 1e-5, key


def test_another_state_layout_is_refused_unless_the_policy_resets_the_streams(upgrade_bundles) -> None:
    v1, _, v3 = upgrade_bundles
    m3 = BundleModel(v3)
    session = Session(v1)
    session.predict([("a", {"x": [0.5]}), ("a", {"x": [0.25]})])
    with pytest.raises(BundleError, match=r"another state layout .*on_state_mismatch=refuse"):
        session.swap(v3)
    assert session.predict([("a", {"x": [0.1]})])[0]["step"] == 2  # the serving bundle stays
    resetting = Session(v1, on_state_mismatch="reset")
    resetting.predict([("a", {"x": [0.5]}), ("a", {"x": [0.25]})])
    assert "restarts from its initial state" in resetting.swap(v3)
    after = resetting.predict([("a", {"x": [0.1]}), ("a", {"x": [0.7]})])
    assert [d["step"] for d in after] == [0, 1] and {d["model"] for d in after} == {m3.spec.model.ref}
    want = reference({m3.spec.model.ref: m3}, [0.1, 0.7], [m3.spec.model.ref] * 2)
    assert np.max(np.abs(np.array([d["prediction"]["values"][FEATURE] for d in after]) - want)) <= 1e-5


def test_another_input_or_model_name_is_refused(upgrade_bundles, recipe_bundle) -> None:
    v1, _, _ = upgrade_bundles
    session = Session(v1, on_state_mismatch="reset")
    with pytest.raises(BundleError, match=r"differs from product@1 in its input features, .* restart the daemon"):
        session.swap(recipe_bundle("sensors"))
    # Another model's name: the group and changelog named after the model would change at the next restart.
    with pytest.raises(BundleError, match=r"would join group rnnd-moving_average .*set group_id and changelog_topic"):
        session.swap(recipe_bundle("moving_average"))
    named = Session(v1, on_state_mismatch="reset", group_id="g", changelog_topic="g-state")
    assert "restarts from its initial state" in named.swap(recipe_bundle("moving_average"))


# --- the daemon --------------------------------------------------------------------------------------


def admin(port: int, method: str = "POST") -> tuple[int, dict | str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/admin/reload", method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        return e.code, json.loads(body) if body.startswith("{") else body


def put(source: Path, target: Path, corrupt: bool = False) -> None:
    """Replace ``target`` as a deployment should: written beside it, renamed over it."""
    data = bytearray(source.read_bytes())
    if corrupt:
        for i in range(len(data) // 2, len(data) // 2 + 16):
            data[i] ^= 0xFF
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, target)


@pytest.mark.brokers("tansu", "kafka")
def test_hot_reload_during_a_live_stream(bootstrap, broker_kind, topic_factory, upgrade_bundles, tmp_path) -> None:
    """A live stream over 40 keys while the bundle at the model path changes: v2 by the watch, a
    corrupted file and an incompatible bundle refused (by the watch and on the admin endpoint), v1
    again by POST /admin/reload. Every input gets exactly one output, each equal to the reference of
    the bundles its stream's outputs name; each partition switches bundle at one offset, no
    interleaving (a checkpoint boundary). At-least-once on Tansu, exactly-once on Apache Kafka."""
    v1, v2, v3 = upgrade_bundles
    models = {m.spec.model.ref: m for m in (BundleModel(v1), BundleModel(v2))}
    r1, r2 = BundleModel(v1).spec.model.ref, BundleModel(v2).spec.model.ref
    serving = tmp_path / "serving.onnx"
    shutil.copy(v1, serving)
    topic_in, topic_out = topic_factory("reload-in", 4), topic_factory("reload-out", 4)
    port = free_port()
    extra = ["--admin-address", f"127.0.0.1:{port}"]
    if broker_kind == "kafka":
        extra += ["--processing-guarantee", "exactly_once"]
    keys = [f"s{i}".encode() for i in range(40)]
    rng = np.random.default_rng(21)
    sent: dict[bytes, list[float]] = {k: [] for k in keys}
    stop = threading.Event()

    def stream() -> None:  # ~40 messages every 50 ms until told to stop
        while not stop.is_set():
            xs = rng.uniform(-1, 1, len(keys)).tolist()
            produce(bootstrap, topic_in, [(k, {"x": [x]}) for k, x in zip(keys, xs, strict=True)])
            for k, x in zip(keys, xs, strict=True):
                sent[k].append(x)
            time.sleep(0.05)

    with DaemonProcess(serving, bootstrap, topic_in, topic_out, *extra, log_dir=tmp_path) as d:
        d.start()
        producer = threading.Thread(target=stream)
        producer.start()
        try:
            def reloads(result: str) -> float:
                return d.metric("rnnd_model_reloads_total", result=result)

            def wait_for(result: str, n: float, timeout: float = 60) -> None:
                deadline = time.monotonic() + timeout
                while reloads(result) < n:
                    assert time.monotonic() < deadline, d.log()[-3000:]
                    time.sleep(0.1)

            time.sleep(1.5)
            put(v2, serving)  # 1. by the watch: continues every stream
            wait_for("swapped", 1)
            time.sleep(1.0)
            put(v2, serving, corrupt=True)  # 2. a corrupted file: refused by the watch
            wait_for("refused", 1)
            put(v3, serving)  # 3. another state layout: refused, on the admin endpoint too
            status, answer = admin(port)
            assert status == 409 and answer["result"] == "refused" and answer["serving"] == r2, answer
            assert "another state layout" in answer["message"]
            assert admin(port, "GET")[0] == 405
            time.sleep(1.0)
            put(v1, serving)  # 4. back to v1, on the admin endpoint (before the watch sees it settle)
            status, answer = admin(port)
            assert status == 200 and answer == {"result": "swapped", "serving": r1, "message": answer["message"]}
            time.sleep(1.5)
        finally:
            stop.set()
            producer.join()
        total = sum(len(v) for v in sent.values())
        outputs = consume(bootstrap, topic_out, total, timeout=90, settle=1.0, committed=broker_kind == "kafka")
        info = {labels: v for (name, labels), v in d.metrics().items() if name == "rnnd_model_info"}
        assert reloads("swapped") == 2 and reloads("refused") >= 2
        log = d.log()
        assert d.stop() == 0
    assert [dict(labels)["version"] for labels, v in info.items() if v == 1] == [BundleModel(v1).spec.model.version]
    assert "modified after export" in log and "REFUSED" in log  # the corrupted file: its content hash
    ids = [o.value["id"] for o in outputs]
    assert len(ids) == len(set(ids)) == total  # 0 missing, 0 duplicated
    by_key: dict[bytes, list[dict]] = {}
    for o in outputs:
        by_key.setdefault(o.key, []).append(o.value)
    for key, xs in sent.items():
        mine = sorted(by_key[key], key=lambda v: v["step"])
        assert [v["step"] for v in mine] == list(range(len(xs)))
        named = [v["model"] for v in mine]
        got = np.array([v["prediction"]["values"][FEATURE] for v in mine])
        err = np.max(np.abs(got - reference(models, xs, named)))
        assert err <= 1e-4, (key, err)  # 0 wrong
    # Each partition: v1, then v2, then v1 again, each bundle over one run of offsets.
    phases: dict[int, list[str]] = {}
    for o in sorted(outputs, key=lambda o: (o.value["partition"], o.value["offset"])):
        runs = phases.setdefault(o.value["partition"], [])
        if not runs or runs[-1] != o.value["model"]:
            runs.append(o.value["model"])
    assert set(map(tuple, phases.values())) == {(r1, r2, r1)}, phases


def test_a_crash_right_after_a_swap_replays_no_step_on_the_other_bundle(bootstrap, topic_factory, upgrade_bundles,
                                                                        tmp_path) -> None:
    """kill -9 as soon as POST /admin/reload answers, then a restart on the new bundle: every step the
    old bundle applied was committed at the swap's checkpoint, so the inputs read again are only
    the new bundle's, and a repeated output (at-least-once) is the same prediction by the same bundle."""
    v1, v2, _ = upgrade_bundles
    models = {m.spec.model.ref: m for m in (BundleModel(v1), BundleModel(v2))}
    serving = tmp_path / "serving.onnx"
    shutil.copy(v1, serving)
    topic_in, topic_out = topic_factory("crash-in", 2), topic_factory("crash-out", 2)
    port = free_port()
    keys = [f"s{i}".encode() for i in range(20)]
    rng = np.random.default_rng(8)
    sent: dict[bytes, list[float]] = {k: [] for k in keys}

    def burst(n: int) -> None:
        for _ in range(n):
            xs = rng.uniform(-1, 1, len(keys)).tolist()
            produce(bootstrap, topic_in, [(k, {"x": [x]}) for k, x in zip(keys, xs, strict=True)])
            for k, x in zip(keys, xs, strict=True):
                sent[k].append(x)

    common = ("--admin-address", f"127.0.0.1:{port}", "--no-watch-model", "--commit-interval-s", "30")
    d = DaemonProcess(serving, bootstrap, topic_in, topic_out, *common, group="g-crash", log_dir=tmp_path).start()
    try:
        burst(10)
        deadline = time.monotonic() + 30
        while d.metric("rnnd_predictions_total") < 10 * len(keys):
            assert time.monotonic() < deadline, d.log()[-3000:]
            time.sleep(0.05)
        put(v2, serving)
        status, answer = admin(port)  # no periodic commit in 30 s: only the swap's checkpoint commits
        assert status == 200 and answer["serving"] == models_ref(v2), answer
        burst(5)
        time.sleep(0.5)
    finally:
        d.kill()
    burst(5)
    with DaemonProcess(serving, bootstrap, topic_in, topic_out, *common, group="g-crash", log_dir=tmp_path) as again:
        again.start()
        total = sum(len(v) for v in sent.values())
        outputs = consume(bootstrap, topic_out, total, timeout=60, settle=1.0)
        assert again.stop() == 0
    first: dict[str, dict] = {}
    for o in outputs:
        seen = first.setdefault(o.value["id"], o.value)
        assert (seen["model"], seen["prediction"]) == (o.value["model"], o.value["prediction"]), o.value["id"]
    assert len(first) == total  # 0 missing
    by_key: dict[str, list[dict]] = {}
    for v in first.values():
        by_key.setdefault(v["key"], []).append(v)
    for key, xs in sent.items():
        mine = sorted(by_key[key.decode()], key=lambda v: v["step"])
        named = [v["model"] for v in mine]
        assert named == [models_ref(v1)] * 10 + [models_ref(v2)] * 10, key
        got = np.array([v["prediction"]["values"][FEATURE] for v in mine])
        assert np.max(np.abs(got - reference(models, xs, named))) <= 1e-4, key


def models_ref(path: Path) -> str:
    return BundleModel(path).spec.model.ref
