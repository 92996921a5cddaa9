"""What the local brokers share as processes: Tansu (``rnnd.embedded_broker``) and Apache Kafka (``rnnd.apache_kafka``).

Each runs in a session of its own (a Ctrl-C in the terminal goes to Python, which stops it in
order), receives SIGTERM on Linux if its parent dies without running ``atexit`` handlers, and is
registered so that every broker still running is stopped at interpreter exit. It is stopped by
pid: SIGTERM, then SIGKILL after a grace period. Its log is read back from the offset at which a
start began, so that a failed start reports its own lines.
"""

from __future__ import annotations

import atexit
import contextlib
import socket
import subprocess
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

from rnnd.daemon.children import free_port, parent_death_signal

__all__ = ["BrokerProcess", "can_connect", "free_port", "parent_death_signal"]


def can_connect(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


class BrokerProcess:
    """A broker process started by a subclass's ``start`` (which calls :meth:`_started`)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """The broker process id while it runs, else None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self.pid is not None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; waits for the exit. Safe to call repeatedly."""
        proc, self._proc = self._proc, None
        self._forget()
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()

    def _started(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        with _LIVE_LOCK:
            _LIVE.add(self)

    def _forget(self) -> None:
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _read_log(self, offset: int) -> bytes:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return b""

    def _tail(self, offset: int, lines: int = 20) -> str:
        text = self._read_log(offset).decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


#: Brokers started and not yet stopped, stopped at interpreter exit so none outlive the process.
_LIVE: set[BrokerProcess] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for b in live:
        with contextlib.suppress(Exception):
            b.stop(grace_s=2.0)
