"""`rnnd demo` as the README runs it: trains its model, serves it, streams, exits 0."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import pytest


def test_demo_runs_and_exits_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rnnd", "demo", "--duration", "20", "--http-port", "0",
                           "--devices", "200", "--rate", "800"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "training the sensors recipe" in out and (tmp_path / "models" / "sensors.onnx").exists()
    assert "metrics http://127.0.0.1:" in out
    sent, received = map(int, re.search(r"done: (\d+) readings sent, (\d+) predictions received", out).groups())
    assert sent > 5000 and received > 0.5 * sent
    assert re.search(r"dev-0 reading #\d+ +temp actual", out)


def _demo_args(bundle, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rnnd", "demo", "--model", str(bundle), "--duration", "8", "--http-port", "0",
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
            proc.wait()


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
