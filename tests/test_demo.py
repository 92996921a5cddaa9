"""`rnnd demo` as the README runs it: trains its model, serves it, streams, exits 0."""

from __future__ import annotations

import re
import subprocess
import sys


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
