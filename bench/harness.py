"""Start a contender as its own process, measure it with one rule, check its outputs.

The rule, the same for every contender:

* **start** = the moment the contender's consumer was assigned its partitions (the contenders
  report it; rnnd logs it — ``partitions [...] assigned`` in its JSON log; Quix through its
  assignment callback). Process start-up, model loading and the consumer-group join (a fixed
  ~3 s pause on Tansu) come before it and are excluded.
* **end** = the latest timestamp among the contender's output records. On Apache Kafka the
  output topics are created with ``message.timestamp.type=LogAppendTime``: the timestamp is
  the broker's, when the record reached the log, so every contender's produce path (its
  accumulator, its wait behind the request in flight) is counted alike. Tansu ignores that
  setting; there output records carry CreateTime, set by the contender's producer when it is
  handed the record (``send()``; rnnd's sink stamps its batches the same way; Quix is told to
  do the same, by default it copies the input's timestamp).
* **throughput** = steps / (end - start); messages/s likewise. That is clock B, from assignment,
  which counts what the program does before its first output; clock A (``steps_per_s_a``) runs
  from the first output to the last, as a harness that only sees the outputs would time it.
* **first output** = its time after start; **longest gap** = the longest pause between two
  consecutive outputs (a program that holds its event loop, or takes a backlog in whole before
  its first model call, shows it here); rnnd's **max loop lag** is its own
  ``rnnd_event_loop_lag_max_seconds`` at the end.
* **CPU** = the contender process's user+system CPU time (all its threads, and its child
  processes': the workers of ``rnnd serve --workers N``; from /proc/PID/stat, sampled every
  50 ms) between start and end, interpolated; per million steps. Peak RSS likewise sums them.
  The broker's CPU over the same window is recorded too.
* **latency** (live mode) = output record timestamp - input record timestamp (``input_ts`` in
  every output document), per step; the first second of traffic is excluded as warm-up.
* **correctness** = exactly one output per input step (the count, and distinct ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import kafkaio
from bench.workloads import REPO, Model

INPUT_CONFIGS = {"retention.ms": "604800000"}  # explicit: Quix derives its changelog's settings from it


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    kind: str = "script"  # script | rnnd
    module: str = ""
    args: tuple[str, ...] = ()
    torch: bool = False

    def command(self, python: str, bootstrap: str, input_topic: str, output_topic: str, model: Model, expect: int,
                report: Path, group: str, http_port: int = 0, extra: tuple[str, ...] = ()) -> list[str]:
        if self.kind == "rnnd":
            return [python, "-m", "rnnd", "serve", "--model", str(model.bundle), "--bootstrap-servers", bootstrap,
                    "--input-topic", input_topic, "--output-topic", output_topic, "--group-id", group,
                    "--http-host", "127.0.0.1", "--http-port", str(http_port), "--log-format", "json",
                    *extra]
        cmd = [python, "-m", self.module, "--bootstrap", bootstrap, "--input-topic", input_topic,
               "--output-topic", output_topic, "--model", str(model.bundle), "--expect", str(expect),
               "--report", str(report), "--group", group, *self.args, *extra]
        if self.torch:
            cmd += ["--checkpoint", str(model.checkpoint)]
        return cmd


CONTENDERS: dict[str, Contender] = {c.name: c for c in [
    Contender("passthrough-json", "I/O ceiling: aiokafka pass-through, stdlib json",
              module="bench.contenders.passthrough", args=("--codec", "json")),
    Contender("passthrough-orjson", "I/O ceiling: aiokafka pass-through, orjson",
              module="bench.contenders.passthrough", args=("--codec", "orjson")),
    Contender("naive-onnx", "naive ONNX consumer (one session.run per message)", module="bench.contenders.naive_onnx"),
    Contender("naive-torch", "naive PyTorch consumer (eager, 1 thread)", module="bench.contenders.naive_torch",
              torch=True),
    Contender("quix-store", "Quix Streams app, state in its store", module="bench.contenders.quix_app",
              args=("--state", "store")),
    Contender("quix-dict", "Quix Streams app, state in a dict", module="bench.contenders.quix_app",
              args=("--state", "dict")),
    Contender("batched", "simple batched ONNX consumer (rounds over pending keys)", module="bench.contenders.batched"),
    Contender("naive-seq2seq", "naive seq2seq consumer (each message encoded and decoded alone, greedy)",
              module="bench.contenders.naive_seq2seq"),
    Contender("rnnd", "rnnd serve", kind="rnnd"),
]}
# Variants the suite runs under their own names (bench.suite._contender): not separate programs.
VARIANTS = ("rnnd-changelog", "rnnd-eos", "rnnd-uvloop", "passthrough-min", "passthrough-uvloop",
            "passthrough-batch", "passthrough-fw50")


@dataclass
class RunResult:
    workload: str
    contender: str
    mode: str  # backlog | live
    keys: int
    messages: int
    steps: int
    outputs: int = 0
    distinct_ids: int = 0
    seconds: float = 0.0  # start → end (see the module docstring)
    steps_per_s: float = 0.0
    messages_per_s: float = 0.0
    first_to_last_s: float = 0.0  # clock A: first output → last output (start-up and the first call not counted)
    steps_per_s_a: float = 0.0  # outputs / first_to_last_s
    first_output_ms: float = 0.0  # start (assignment) → first output
    longest_gap_ms: float = 0.0  # the longest time between two consecutive outputs (by their timestamps)
    loop_lag_max_ms: float = -1.0  # rnnd: rnnd_event_loop_lag_max_seconds at the end (-1: not measured)
    cpu_s: float = 0.0
    cpu_s_per_m_steps: float = 0.0
    broker_cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    wall_s: float = 0.0  # the whole run: process start to exit, reading outputs included
    rate: float = 0.0  # live: offered messages/s
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_cdf: list[list[float]] = field(default_factory=list)  # [[ms, fraction], ...] (live)
    ok: bool = True
    error: str = ""
    note: str = ""
    batching: str = ""  # rnnd: model calls and their mean size, from its metrics

    def summary(self) -> str:
        if not self.ok:
            return f"{self.workload:6s} {self.mode:7s} {self.contender:20s} FAILED: {self.error[:200]}"
        lat = (f" p50 {self.latency_ms.get('p50', 0):.1f} ms p99 {self.latency_ms.get('p99', 0):.1f} ms"
               if self.latency_ms else "")
        return (f"{self.workload:6s} {self.mode:7s} {self.contender:20s} {self.messages_per_s:>10,.0f} msg/s "
                f"{self.steps_per_s:>10,.0f} steps/s  cpu {self.cpu_s_per_m_steps:6.1f} s/M steps{lat}"
                + (f"  [{self.batching}]" if self.batching else ""))


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def proc_cpu_rss(pid: int) -> tuple[float, int]:
    """User+system CPU seconds (all threads) and RSS bytes of ``pid``, from /proc (Linux).

    Read directly rather than through psutil so that the tests need nothing beyond the test
    extra; raises OSError when the process is gone."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # After the ")" closing the command name: field 3 (state) is fields[0], so utime (14) and
    # stime (15) are fields[11] and fields[12], rss (24, in pages) is fields[21].
    return (int(fields[11]) + int(fields[12])) / _TICK, int(fields[21]) * _PAGE


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (every thread's), from /proc: ``rnnd serve --workers N``'s workers."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def tree_cpu_rss(pid: int) -> tuple[float, int]:
    """:func:`proc_cpu_rss` of ``pid`` and its children together (a child that has exited drops out,
    so the sampler keeps the running maximum of the sum)."""
    cpu, rss = proc_cpu_rss(pid)
    for child in children(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            c, r = proc_cpu_rss(child)
            cpu, rss = cpu + c, rss + r
    return cpu, rss


class CpuSampler:
    """CPU seconds and RSS of some processes every ``interval`` s, on a thread of the harness."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.procs = {name: pid for name, pid in pids.items() if pid}
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in self.procs}
        self.peak_rss: dict[str, int] = dict.fromkeys(self.procs, 0)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-cpu", daemon=True)

    def start(self) -> CpuSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            for name, pid in self.procs.items():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    cpu, rss = tree_cpu_rss(pid)
                    samples = self.samples[name]
                    if samples:  # a worker that exited takes its CPU time out of the sum: keep the total
                        cpu = max(cpu, samples[-1][1])
                    samples.append((time.time() * 1000, cpu))
                    self.peak_rss[name] = max(self.peak_rss[name], rss)
            if self._stop.wait(self.interval):
                return

    def cpu_between(self, name: str, start_ms: float, end_ms: float) -> float:
        s = self.samples.get(name) or []
        if len(s) < 2:
            return 0.0
        ts, cpu = np.array([a for a, _ in s]), np.array([b for _, b in s])
        return float(np.interp(end_ms, ts, cpu) - np.interp(start_ms, ts, cpu))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_topic(bootstrap: str, name: str, partitions: int = 4, configs: dict[str, str] | None = None) -> str:
    from rnnd.embedded_broker import create_topics

    asyncio.run(create_topics(bootstrap, {name: partitions}, {name: dict(configs)} if configs else None))
    return name


@functools.cache
def serve_help() -> str:
    """``rnnd serve --help`` of the rnnd being measured (its flags change while it is developed)."""
    return subprocess.run([sys.executable, "-m", "rnnd", "serve", "--help"], capture_output=True, text=True,
                          cwd=REPO, check=False).stdout


def rnnd_flags() -> tuple[str, ...]:
    """``--no-changelog`` where this rnnd has it: the first throughput target is without durable state."""
    return ("--no-changelog",) if "--no-changelog" in serve_help() else ()


def _rnnd_assigned_ms(log: Path) -> int:
    """The time of rnnd's first non-empty ``partitions [...] assigned`` log line (JSON logs)."""
    if not log.exists():
        return 0
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        msg = doc.get("msg", "")
        if msg.startswith("partitions [") and msg.endswith("assigned") and not msg.startswith("partitions []"):
            ts = datetime.strptime(doc["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            return int(ts.timestamp() * 1000)
    return 0


def _rnnd_metrics(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()
    except (OSError, ValueError):
        return ""


def _metric(text: str, name: str) -> float:
    """The sum of a metric's samples (without labels, or over all of them); -1 if absent."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{")]
    return sum(values) if values else -1.0


def rnnd_batching(metrics: str) -> str:
    """How rnnd batched, from its own metrics: mean streams per model call and steps per stream."""
    calls = _metric(metrics, "rnnd_batch_size_count")
    if calls <= 0:
        return ""
    streams = _metric(metrics, "rnnd_batch_size_sum")
    steps = _metric(metrics, "rnnd_steps_total")
    if _metric(metrics, "rnnd_chunk_steps_count") <= 0:  # seq2seq: a call advances hypotheses, not streams
        return f"{calls:.0f} decoder calls, {streams / calls:.0f} hypotheses each"
    return f"{calls:.0f} model calls, {streams / calls:.0f} streams × {steps / max(1.0, streams):.1f} steps each"


@dataclass
class Live:
    """Live traffic for one run: ``count`` messages at ``rate``/s, produced by a separate process."""

    rate: float
    count: int
    keys: int
    kind: str = "numeric"
    steps_per_message: int = 1
    warmup_s: float = 1.0
    linger_ms: int = 5  # librdkafka's default and the daemon's; 1 ms makes Tansu burn most of a core on requests


# How often the harness asks rnnd's /metrics whether it is done. A scrape takes rnnd's event loop a
# few ms (330 series through prometheus-client); throughput is clocked by the outputs' own
# timestamps, so a slower poll only adds idle wall time after the last output. 0.1 and 0.5 s
# measured alike (wide and seq2seq backlogs, back to back): 0.5 s keeps the harness's own load down.
DONE_POLL_S = 0.5


class Runner:
    """Runs contenders against one broker; keeps logs and reports in ``workdir``."""

    def __init__(self, bootstrap: str, broker_pid: int | None, workdir: Path, timeout: float = 300.0,
                 log: Any = print, log_append_time: bool = False) -> None:
        self.bootstrap = bootstrap
        # Output topics stamped by the broker (see the module docstring); only Apache Kafka honours it.
        self.output_configs = {"message.timestamp.type": "LogAppendTime"} if log_append_time else None
        self.broker_pid = broker_pid
        self.workdir = workdir
        self.timeout = timeout
        self.log = log
        self._rnnd_flags: tuple[str, ...] | None = None
        self.profile_svg: Path | None = None

    @property
    def rnnd_args(self) -> tuple[str, ...]:
        if self._rnnd_flags is None:
            self._rnnd_flags = rnnd_flags()
        return self._rnnd_flags

    def run(self, contender: Contender, model: Model, input_topic: str, *, workload: str, keys: int, messages: int,
            steps: int, live: Live | None = None, profile: Path | None = None,
            extra: tuple[str, ...] = (), collect: list[kafkaio.Output] | None = None) -> RunResult:
        """One measured run. ``steps`` outputs are expected (one per input step); ``extra`` flags are
        added to the contender's command line; ``collect``, when given, receives the output records
        (the tests check their predictions)."""
        res = RunResult(workload, contender.name, "live" if live else "backlog", keys, messages, steps)
        tag = f"{workload}-{res.mode}-{contender.name}-{uuid.uuid4().hex[:6]}"
        out_topic = create_topic(self.bootstrap, f"{tag}-out", configs=self.output_configs)
        report, logf = self.workdir / f"{tag}.json", self.workdir / f"{tag}.log"
        port = free_port()
        cmd = contender.command(sys.executable, self.bootstrap, input_topic, out_topic, model, steps, report,
                                f"bench-{tag}", port, (*self.rnnd_args, *extra) if contender.kind == "rnnd" else extra)
        t_wall = time.monotonic()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(logf, "ab") as logfile:
            proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        sampler = CpuSampler({"contender": proc.pid, "broker": self.broker_pid or 0}).start()
        spy = None
        try:
            if profile is not None:
                # Attach once the interpreter runs (rnnd's first log line, during the group join;
                # a script: after its imports).
                if contender.kind == "rnnd":
                    _wait_for(lambda: logf.exists() and logf.stat().st_size > 0, proc, 60)
                else:
                    time.sleep(1.0)
                spy = _start_py_spy(proc.pid, profile)
            if live is not None:
                self._offer(contender, proc, report, logf, input_topic, model, live)
            self._wait_done(contender, proc, port, steps, logf)
        except Exception as e:
            res.ok, res.error = False, f"{type(e).__name__}: {e}"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            if spy is not None:
                _stop_py_spy(spy)
            sampler.stop()
        if res.ok and contender.kind == "script" and proc.returncode != 0:
            res.ok, res.error = False, f"exit code {proc.returncode}: {_tail(logf)}"
        assigned = (_rnnd_assigned_ms(logf) if contender.kind == "rnnd"
                    else json.loads(report.read_text()).get("assigned_ms", 0) if report.exists() else 0)
        # The program has exited (rnnd: drained and flushed on SIGTERM): every output is in the topic
        # by now, so a short settle suffices to catch any beyond the expected count.
        outputs = kafkaio.read_all(self.bootstrap, out_topic, steps, timeout=60, settle=0.2)
        if collect is not None:
            collect.extend(outputs)
        kafkaio.delete_topics(self.bootstrap, [out_topic])
        res.wall_s = time.monotonic() - t_wall
        self._measure(res, outputs, assigned, sampler, live)
        if contender.kind == "rnnd" and logf.with_suffix(".metrics").exists():
            metrics = logf.with_suffix(".metrics").read_text()
            res.batching = rnnd_batching(metrics)
            lag = _metric(metrics, "rnnd_event_loop_lag_max_seconds")
            res.loop_lag_max_ms = lag * 1000 if lag >= 0 else -1.0
        if not res.ok and not res.error.endswith(_tail(logf)):
            res.error += f" | log: {_tail(logf)}"
        return res

    def _offer(self, contender: Contender, proc: subprocess.Popen, report: Path, logf: Path, input_topic: str,
               model: Model, live: Live) -> None:
        """Wait until the contender holds its partitions, then run the live producer to the end."""
        deadline = time.monotonic() + 60
        marker = Path(f"{report}.assigned")
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode} before its partitions were assigned")
            if (contender.kind == "rnnd" and _rnnd_assigned_ms(logf)) or marker.exists():
                break
            time.sleep(0.05)
        else:
            raise TimeoutError("no partitions assigned within 60 s")
        time.sleep(0.5)  # its first fetch is under way
        cmd = [sys.executable, "-m", "bench.kafkaio", "--bootstrap", self.bootstrap, "--topic", input_topic,
               "--model", str(model.bundle), "--kind", live.kind, "--keys", str(live.keys), "--count", str(live.count),
               "--steps-per-message", str(live.steps_per_message), "--rate", str(live.rate),
               "--linger-ms", str(live.linger_ms)]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=self.timeout, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"live producer failed: {out.stderr[-500:]}")
        self.log(f"    live producer: {out.stdout.strip()}")

    def _wait_done(self, contender: Contender, proc: subprocess.Popen, port: int, steps: int, logf: Path) -> None:
        deadline = time.monotonic() + self.timeout
        if contender.kind == "script":
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"not done after {self.timeout:.0f} s") from None
            return
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"rnnd exited with {proc.returncode}: {_tail(logf)}")
            metrics = _rnnd_metrics(port)
            if _metric(metrics, "rnnd_predictions_total") >= steps:
                logf.with_suffix(".metrics").write_text(metrics)  # the last scrape: batching, latency
                return
            time.sleep(DONE_POLL_S)
        raise TimeoutError(f"rnnd not done after {self.timeout:.0f} s")

    @staticmethod
    def _measure(res: RunResult, outputs: list[kafkaio.Output], assigned: int, sampler: CpuSampler,
                 live: Live | None) -> None:
        res.outputs = len(outputs)
        # rnnd and the full pass-through carry an id; the minimal one is told apart by its coordinates
        res.distinct_ids = len({o.doc.get("id") or (o.doc.get("partition"), o.doc.get("offset"), o.doc.get("j"))
                                for o in outputs})
        res.peak_rss_mb = sampler.peak_rss.get("contender", 0) / 2**20
        if live is not None:
            res.rate = live.rate
        if res.ok and (res.outputs != res.steps or res.distinct_ids != res.steps):
            res.ok = False
            res.error = (f"expected {res.steps} outputs with distinct ids, got {res.outputs} "
                         f"({res.distinct_ids} distinct)")
        if not outputs or not assigned:
            if res.ok:
                res.ok, res.error = False, "no outputs" if not outputs else "no assignment time"
            return
        ts = np.fromiter((o.timestamp for o in outputs), dtype=np.int64, count=len(outputs))
        end, first = int(ts.max()), int(ts.min())
        res.seconds = max(1e-3, (end - assigned) / 1000)
        res.first_to_last_s = (end - first) / 1000
        res.steps_per_s_a = res.outputs / max(1e-3, res.first_to_last_s)
        res.first_output_ms = float(first - assigned)
        res.longest_gap_ms = float(np.diff(np.sort(ts)).max()) if len(ts) > 1 else 0.0
        res.steps_per_s = res.outputs / res.seconds
        res.messages_per_s = res.messages * (res.outputs / max(1, res.steps)) / res.seconds
        res.cpu_s = sampler.cpu_between("contender", assigned, end)
        res.broker_cpu_s = sampler.cpu_between("broker", assigned, end)
        res.cpu_s_per_m_steps = res.cpu_s / max(1, res.outputs) * 1e6
        if live is not None:
            inp = np.fromiter((o.doc["input_ts"] for o in outputs), dtype=np.int64, count=len(outputs))
            lat = (ts - inp).astype(np.float64)
            keep = inp >= inp.min() + live.warmup_s * 1000
            lat = np.sort(lat[keep] if keep.any() else lat)
            res.latency_ms = {"p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
                              "p99": float(np.percentile(lat, 99)), "max": float(lat.max()), "n": float(len(lat))}
            qs = np.linspace(0, 1, 201)
            res.latency_cdf = [[float(np.quantile(lat, q)), float(q)] for q in qs]
            # Live throughput is the offered rate by construction; keep the measured one for reference.


def _wait_for(cond: Any, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("process exited or timed out before it was ready to profile")
        time.sleep(0.05)


def _tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-n:].replace("\n", " | ")
    except OSError:
        return ""


def _start_py_spy(pid: int, out: Path) -> subprocess.Popen:
    """py-spy, sampling every thread of ``pid`` at 200 Hz until it exits, writing collapsed stacks
    (``--format raw``), from which ``bench.profile`` computes the hot spots."""
    spy = Path(sys.executable).with_name("py-spy")
    cmd = [str(spy), "record", "--pid", str(pid), "--rate", "200", "--threads", "--nonblocking",
           "--format", "raw", "--output", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(f"{out}.log", "wb"))  # noqa: SIM115
    time.sleep(0.5)
    return p


def _stop_py_spy(p: subprocess.Popen) -> None:
    try:
        p.wait(30)  # it stops by itself when the process it samples exits
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)
        p.wait(30)


def as_dict(r: RunResult) -> dict[str, Any]:
    return asdict(r)
