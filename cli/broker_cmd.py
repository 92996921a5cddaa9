"""`rnnd broker`: a local broker kept running in the foreground — Tansu, or Apache Kafka.

For trying rnnd with one's own model without installing Kafka: ``rnnd broker`` in one
terminal, then ``rnnd topics create``, ``rnnd serve``, ``rnnd produce`` and ``rnnd tail``
against the address it prints. The address is the first line on stdout (``bootstrap:
127.0.0.1:PORT``) so that a script can start it in the background and read where it is;
everything else goes to stderr.

``--kind tansu`` (the default): the embedded Kafka-compatible broker, instant, in memory
(topics, records and committed offsets are gone when it stops), no transactions; its quirks
(``rnnd.embedded_broker``) are those the tests run against. ``--kind kafka``: Apache Kafka
4.4, one KRaft node (``rnnd.apache_kafka``; Java 17 and ``make kafka`` first), with
transactions (``processing_guarantee=exactly_once``) and a log on disk that ``--data-dir``
keeps across runs.
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
from typing import Any

from rnnd.tools import ToolError

__all__ = ["DEFAULT_PORT", "add_parser", "run"]

DEFAULT_PORT = 9092


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="run a local broker (Tansu in memory, or Apache Kafka) until Ctrl-C",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=_port, default=DEFAULT_PORT,
                   help=f"TCP port on 127.0.0.1 (default {DEFAULT_PORT}, Kafka's; 0: any free port)")
    p.add_argument("--kind", choices=("tansu", "kafka"), default="tansu",
                   help="tansu: embedded, in memory, instant (default); kafka: Apache Kafka 4.4, one KRaft node, "
                        "with transactions and a log on disk (needs Java 17 and `make kafka`)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="tansu: folder for the broker's log, tansu.log (default: a new temporary folder)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="kafka: its log dir and server.log, kept and reused by the next run (default: a new "
                        "temporary folder)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(run=run)


def _kafka_version() -> str:
    from rnnd.apache_kafka import VERSION

    return VERSION


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
    kafka = args.kind == "kafka"
    if kafka and args.log_dir is not None:
        raise ToolError("--log-dir is Tansu's; Apache Kafka keeps its log in --data-dir")
    if not kafka and args.data_dir is not None:
        raise ToolError("--data-dir is Apache Kafka's (--kind kafka); Tansu keeps nothing but its log (--log-dir)")
    if args.port and _port_taken(args.port):
        raise _taken(args.port)
    broker: Any
    if kafka:
        from rnnd.apache_kafka import ApacheKafka, classpath, java

        java(), classpath()  # no Java or no jars: one line that says how to get them (BrokerSetupError)
        broker = ApacheKafka(args.data_dir, port=args.port or None)
        what = (f"Apache Kafka {_kafka_version()} (one KRaft node) on {{}}, log dir {broker.data_dir} (kept). "
                f"Log: {broker.log_path}.")
    else:
        from rnnd.embedded_broker import EmbeddedBroker

        broker = EmbeddedBroker(port=args.port or None, log_dir=args.log_dir)
        what = "Kafka-compatible broker (Tansu) on {}, in memory: its topics are gone when it stops. Log: {}."
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
        print(f"rnnd broker: {what.format(broker.bootstrap_servers, broker.log_path)} Ctrl-C stops it.",
              file=sys.stderr, flush=True)
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
