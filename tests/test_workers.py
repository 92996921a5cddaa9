"""`rnnd serve --workers N`: N worker processes in one consumer group behind one endpoint, stopped together.

The end-to-end tests run the real command on the embedded broker with the product recipe's bundle;
`rnnd verify` is the oracle for the outputs, the combined /metrics (label ``worker``) shows who did
what, and the supervisor's log line names the workers' pids, which must all be gone at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from cli_checks import one_line_error
from daemon_harness import DaemonProcess, consume, free_port, produce
from test_durability import check, topics, verify, wait_for_line, workload

from rnnd.daemon import config, settings
from rnnd.daemon.metrics import Metrics
from rnnd.daemon.service.workers import combine, worker_env

REQUIRED = {"model": "m.onnx", "input_topic": "in", "output_topic": "out"}


def worker_pids(log: str) -> list[int]:
    """The workers' pids, from the supervisor's line "... worker 0 pid 123 port 4567, worker 1 pid ..."."""
    found = re.findall(r"worker (\d+) pid (\d+) port \d+", log)
    assert found, log[-3000:]
    return [int(pid) for _, pid in sorted(found)]


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody has reaped yet has exited too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def all_gone(pids: list[int], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_workers_see_the_settings_the_supervisor_resolved() -> None:
    """Each worker's environment loads to the supervisor's settings, but one worker, its own loopback port.

    From flags, with a secret among them; the supervisor's own RNND_* settings and config file are not
    passed on (the resolved values replace them), the variables that are not settings are."""
    cfg = config.load({**REQUIRED, "workers": "3", "commit_interval_s": "0.5", "create_topics": "false",
                       "security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u",
                       "sasl_password": "s3cret"}, env={})
    env = worker_env(cfg, 2, 4321, {"PATH": "/bin", "RNND_CONFIG": "gone.toml", "RNND_MAX_BATCH": "7",
                                    "RNND_DEBUG": "1"})
    assert env["PATH"] == "/bin" and env["RNND_DEBUG"] == "1" and env[settings.WORKER_ENV] == "2"
    assert "RNND_CONFIG" not in env and "RNND_MAX_BATCH" not in env and "RNND_WORKERS" not in env
    assert config.load(env=env) == settings.replace(cfg, workers=1, http_host="127.0.0.1", http_port=4321)
    assert config.load(env=env).group_id == ""  # unset: every worker derives the same group from the model
    # An admin endpoint: each worker has its own, on loopback, which the supervisor's forwards to.
    with_admin = settings.replace(cfg, admin_address="0.0.0.0:9465")
    env = worker_env(with_admin, 1, 4321, {}, admin_port=5432)
    assert config.load(env=env).admin_address == "127.0.0.1:5432"


def test_combined_metrics_label_every_sample_with_its_worker() -> None:
    first, second = Metrics(), Metrics()
    first.predictions.inc(2)
    second.assigned.set(3)
    text = combine([(0, first.exposition().decode()), (1, second.exposition().decode())]).decode()
    lines = text.splitlines()
    assert 'rnnd_predictions_total{worker="0"} 2.0' in lines and 'rnnd_predictions_total{worker="1"} 0.0' in lines
    assert 'rnnd_assigned_partitions{worker="1"} 3.0' in lines
    assert lines.count("# TYPE rnnd_predictions_total counter") == 1
    assert lines.count("# TYPE rnnd_batch_size histogram") == 1
    samples = [ln for ln in lines if ln and not ln.startswith("#")]
    assert samples and all('worker="' in ln for ln in samples)


def test_two_workers_share_the_partitions_and_stop_together(bootstrap: str, recipe_bundle: Any,
                                                            tmp_path: Path) -> None:
    bundle = recipe_bundle("product")
    topic_in, topic_out = topics(bootstrap, "workers", 4)
    items, steps = workload(keys=60, messages=1500, seed=21)
    admin = free_port()
    with DaemonProcess(bundle, bootstrap, topic_in, topic_out, "--workers", "2", "--admin-address",
                       f"127.0.0.1:{admin}", group=f"g-{topic_in}", log_dir=tmp_path) as d:
        d.start()
        pids = worker_pids(d.log())
        assert len(pids) == 2
        produce(bootstrap, topic_in, items)
        assert len(consume(bootstrap, topic_out, steps, timeout=60)) >= steps
        metrics = d.metrics()
        assigned = [metrics[("rnnd_assigned_partitions", (("worker", w),))] for w in "01"]
        assert sorted(assigned) == [2.0, 2.0], assigned  # the group protocol's split of 4 partitions
        consumed = [metrics[("rnnd_messages_consumed_total", (("topic", topic_in), ("worker", w)))] for w in "01"]
        assert all(c > 0 for c in consumed) and sum(consumed) == len(items), consumed
        assert d.http("/healthz")[0] == 200 and d.http("/readyz")[0] == 200
        # POST /admin/reload reaches both workers (the file is the one serving: nothing to do)
        req = urllib.request.Request(f"http://127.0.0.1:{admin}/admin/reload", method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["result"] == "unchanged" and [w["worker"] for w in answer["workers"]] == [0, 1], answer
        assert all(w["status"] == 200 and w["serving"] == "product@1" for w in answer["workers"]), answer
        assert d.stop() == 0
    assert all_gone(pids, timeout=5)  # the supervisor waited for them: gone when it is
    log = d.log()
    assert "Traceback" not in log
    assert re.search(r"worker 0 rnnd\.daemon: partitions \[\d", log) and re.search(r"worker 1 rnnd\.daemon: ", log)
    code, report = verify(bundle, bootstrap, topic_in, topic_out)
    check(report, steps, "at_least_once")
    assert report["duplicated"] == 0, report  # graceful rebalances and shutdown repeat nothing
    assert code == 0


def test_more_workers_than_partitions_is_said_and_a_dead_worker_stops_all(bootstrap: str, recipe_bundle: Any,
                                                                           tmp_path: Path) -> None:
    """One partition for two workers: a warning. Then one worker is killed: the supervisor stops the
    other and exits with the dead one's code (128 + SIGKILL), in one line naming it."""
    topic_in, topic_out = topics(bootstrap, "workers-crash", 1)
    with DaemonProcess(recipe_bundle("product"), bootstrap, topic_in, topic_out, "--workers", "2",
                       group=f"g-{topic_in}", log_dir=tmp_path) as d:
        d.start()
        wait_for_line(d, "has 1 partition(s) for 2 workers: 1 worker(s) get none and idle")
        pids = worker_pids(d.log())
        os.kill(pids[1], signal.SIGKILL)
        assert d.wait(60) == 128 + signal.SIGKILL
    assert all_gone(pids, timeout=5)
    assert f"worker 1 (pid {pids[1]}) was killed by SIGKILL unasked: stopping the other workers; exiting 137" \
        in d.log()
    assert "Traceback" not in d.log()


def test_the_workers_stop_when_the_supervisor_is_killed(bootstrap: str, recipe_bundle: Any, tmp_path: Path) -> None:
    topic_in, topic_out = topics(bootstrap, "workers-orphan", 2)
    with DaemonProcess(recipe_bundle("product"), bootstrap, topic_in, topic_out, "--workers", "2",
                       group=f"g-{topic_in}", log_dir=tmp_path) as d:
        d.start()
        pids = worker_pids(d.log())
        assert d.kill() == -signal.SIGKILL
        assert all_gone(pids), d.log()[-3000:]
    assert "Traceback" not in d.log()


def test_a_refused_worker_count_is_one_line(rnnd: Any) -> None:
    res = rnnd("serve", "--model", "m.onnx", "--input-topic", "in", "--output-topic", "out", "--workers", "0")
    one_line_error(res, 2, "workers from --workers must be between 1 and 1024, not 0")


def test_a_busy_port_stops_the_supervisor_before_any_worker(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "rnnd", "serve", "--model", str(tmp_path / "m.onnx"),
                              "--input-topic", "in", "--output-topic", "out", "--workers", "2", "--http-host",
                              "127.0.0.1", "--http-port", str(port)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"cannot serve /metrics on 127.0.0.1:{port}" in lines[0], res.stderr
