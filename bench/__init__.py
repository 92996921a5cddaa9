"""rnnd's benchmark: the daemon side by side with what users would run instead, and the ceilings.

    python -m bench            # the full comparison (≤ 10 min): table, bench/results/latest.json,
                               # docs/img/*.png, docs/benchmarks.md
    python -m bench --quick    # the same in ≤ 60 s, smaller workloads (bench/results/quick.json)
    rnnd bench [--quick]       # the same, through the rnnd command

Every contender is a real program over a real broker (the embedded Tansu, or Apache Kafka with
``--broker kafka``), started as its own process so that its CPU time is its own; all read the
same input topic with the same model.
See docs/benchmarks.md for the method and the latest numbers, ``bench.harness`` for the
measurement rule, and ``bench.contenders`` for the programs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["add_arguments", "main", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's flags (shared by ``python -m bench`` and ``rnnd bench``)."""
    p.add_argument("--quick", action="store_true", help="small workloads, about a minute (for routine use)")
    p.add_argument("--only", default="", help="comma-separated sections: compute, wide, deep, large, seq2seq, "
                                              "memory, scaling, workers, live, profile (default: all)")
    p.add_argument("--contenders", default="",
                   help="comma-separated contenders to run (default: all); one of: passthrough-json, "
                        "passthrough-orjson, naive-onnx, naive-torch, naive-seq2seq, quix-store, quix-dict, batched, "
                        "rnnd, rnnd-changelog, passthrough-min, passthrough-fw50 (live)")
    p.add_argument("--repeat", type=int, default=1, help="run each contender N times, interleaved; the "
                                                         "table shows medians (live runs: the median by p99)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="profile rnnd with py-spy on the wide backlog (default: on in full mode)")
    p.add_argument("--live-seconds", type=float, default=0.0, help="duration of the live runs (default 15, quick 4)")
    p.add_argument("--cache", type=Path, default=None, help="where trained/exported models are kept "
                                                            "(default .cache/bench)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/latest.json, "
                                                          "quick: bench/results/quick.json)")
    p.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=None,
                   help="write docs/benchmarks.md and docs/img/*.png (default: on in full mode)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-run limit in seconds")
    p.add_argument("--broker", choices=("tansu", "kafka"), default="tansu",
                   help="the broker: Tansu (default; the targets' table) or Apache Kafka 4.4 (its rows go to "
                        "bench/results/kafka.json and their own section of docs/benchmarks.md)")


def run(args: argparse.Namespace) -> int:
    """Run the comparison described by ``args``; print the table; write results (and docs)."""
    from bench import report, suite, workloads

    def split(s: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in s.split(",") if x.strip())

    opts = suite.Options(quick=args.quick, cache=args.cache or workloads.DEFAULT_CACHE, only=split(args.only),
                         contenders=split(args.contenders), repeat=max(1, args.repeat), profile=args.profile,
                         live_seconds=args.live_seconds, timeout=args.timeout, broker=args.broker,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    results = suite.run(opts)
    prog = "python -m bench" if sys.argv[0].endswith("__main__.py") else Path(sys.argv[0]).name
    results["command"] = " ".join([prog, *sys.argv[1:]])
    kafka = args.broker == "kafka"
    out = args.out or report.RESULTS / ("quick.json" if args.quick else "kafka.json" if kafka else "latest.json")
    report.write_json(results, out)
    print(report.table(results))
    print(report.kafka_targets_text(results) if kafka else report.targets_text(results))
    write_docs = (not args.quick) if args.write_docs is None else args.write_docs
    if write_docs:
        written = report.write_kafka_section(results) if kafka else report.write_docs(results)
        print("written: " + ", ".join(str(p) for p in [out, *written]), file=sys.stderr)
    else:
        print(f"written: {out}", file=sys.stderr)
    failed = [r for r in report.runs(results) if not r["ok"]]
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
