"""`rnnd broker`: the embedded Kafka-compatible broker (Tansu), kept running in the foreground.

For trying rnnd with one's own model without installing Kafka: ``rnnd broker`` in one
terminal, then ``rnnd topics create``, ``rnnd serve``, ``rnnd produce`` and ``rnnd tail``
against the address it prints. The address is the first line on stdout (``bootstrap:
127.0.0.1:PORT``) so that a script can start it in the background and read where it is;
everything else goes to stderr.

Storage is in memory: topics, records and committed offsets are gone when it stops. The
broker's own quirks (see ``rnnd.embedded_broker``) are those the tests run against.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

from rnnd.tools import ToolError

__all__ = ["DEFAULT_PORT", "add_parser", "run"]

DEFAULT_PORT = 9092


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="run a local Kafka-compatible broker (in memory) until Ctrl-C",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=_port, default=DEFAULT_PORT,
                   help=f"TCP port on 127.0.0.1 (default {DEFAULT_PORT}, Kafka's; 0: any free port)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="folder for the broker's log, tansu.log (default: a new temporary folder)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(run=run)


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, not {text}")
    return v


def _port_taken(port: int) -> bool:
    """Whether 127.0.0.1:port cannot be bound, checked with the options Tansu binds with (SO_REUSEADDR).

    Checked before starting because Tansu, on a taken port, panics and exits with status 0
    after printing "listening on": the error would otherwise come as a log excerpt.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            return e.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def _taken(port: int) -> ToolError:
    return ToolError(f"port {port} on 127.0.0.1 is in use (another broker?): choose another with --port, or "
                     "--port 0 for a free one")


def run(args: argparse.Namespace) -> int:
    """Start the broker, print its address, and wait for Ctrl-C or SIGTERM; then stop it. Exit 0 on a clean stop."""
    from rnnd.embedded_broker import EmbeddedBroker

    if args.port and _port_taken(args.port):
        raise _taken(args.port)
    broker = EmbeddedBroker(port=args.port or None, log_dir=args.log_dir)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    # Installed before the broker starts, so that a SIGTERM that arrives during start-up stops it too.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            broker.start()
        except RuntimeError as e:
            if args.port and _port_taken(args.port):  # taken between the check and the start
                raise _taken(args.port) from None
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ToolError(first, exit_code=1) from None
        print(f"bootstrap: {broker.bootstrap_servers}", flush=True)
        print(f"rnnd broker: Kafka-compatible broker (Tansu) on {broker.bootstrap_servers}, in memory: its topics "
              f"are gone when it stops. Log: {broker.log_path}. Ctrl-C stops it.", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if not broker.running:
                raise ToolError(f"the broker exited by itself; its log: {broker.log_path}", exit_code=1)
        name = signal.Signals(received[0]).name if received else "a signal"
        print(f"rnnd broker: stopping ({name})", file=sys.stderr, flush=True)
        return 0
    finally:
        broker.stop()
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
