"""`rnnd bench`: the benchmark of docs/benchmarks.md, through the rnnd command.

The benchmark lives in the top-level ``bench/`` folder of a source checkout (it needs the
``bench`` extra: quixstreams, matplotlib, psutil, py-spy); it is imported only when the
command runs, so that the installed daemon neither needs nor loads any of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``rnnd bench`` (its flags are the benchmark's own, from ``bench.add_arguments``)."""
    p = sub.add_parser("bench", help="benchmark rnnd against hand-written consumers and the ceilings",
                       description="Run the benchmark of docs/benchmarks.md (a source checkout with the "
                                   "`bench` extra installed). --quick takes about a minute.")
    bench = _import_bench()
    if bench is not None:
        bench.add_arguments(p)
    else:  # accept anything, so that `run` can say what is missing instead of argparse
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def _import_bench():  # -> module | None
    try:
        import bench
    except ImportError:
        # Installed in editable mode from a checkout: the checkout's root holds bench/.
        root = Path(__file__).resolve().parents[1]
        if not (root / "bench" / "__init__.py").is_file():
            return None
        sys.path.insert(0, str(root))
        try:
            import bench
        except ImportError:
            return None
    return bench


def run(args: argparse.Namespace) -> int:
    bench = _import_bench()
    if bench is None:
        print("rnnd bench: the benchmark is not part of this installation; run it from a source checkout "
              "(python -m bench) after `pip install -e '.[bench]'`", file=sys.stderr)
        return 2
    return int(bench.run(args))
