"""The `rnnd` command. Subcommands that need torch (export, train) import it only when run."""

from __future__ import annotations

import argparse
import os
import sys

from rnnd import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnd", description="Streaming inference for stateful sequence models on Kafka.")
    parser.add_argument("--version", action="version", version=f"rnnd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from rnnd import bench_cmd, demo, tools
    from rnnd.daemon import cli as serve_cmd
    from rnnd.daemon import inspect as inspect_cmd
    from rnnd.daemon import verify as verify_cmd
    from rnnd.export import cli as export_cli

    serve_cmd.add_parser(sub)
    verify_cmd.add_parser(sub)
    demo.add_parser(sub)
    tools.add_parsers(sub)
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
    except Exception as e:
        code = getattr(e, "exit_code", None)
        if code is None:
            raise  # not an input error: a bug, so show the traceback
        if getattr(args, "debug", False):
            raise
        print(f"rnnd {args.command}: error: {e}", file=sys.stderr)
        return int(code)
