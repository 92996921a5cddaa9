"""What a process needs to run children that must not outlive it: a free loopback port for one,
and a parent-death signal. Used by ``rnnd serve --workers`` (its workers) and by the local brokers
of the demo and the tests (``rnnd.broker_process``), so both behave alike when their parent dies.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

__all__ = ["free_port", "parent_death_signal"]


def free_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1.

    There is a short window in which another process could take the port before the child
    binds it; the child then fails to bind and exits, and its parent reports that.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes Linux send the child SIGTERM when its parent dies, even by SIGKILL.

    ``atexit`` does not run when Python is killed or crashes hard; this covers that case, so no
    orphan keeps serving, or holding a port. SIGTERM rather than SIGKILL, so that an orphan still
    stops the way it normally stops. Linux delivers the signal when the *thread* that forked
    exits, so it is only used when starting from the main thread: a child started from a worker
    thread (``asyncio.to_thread``) would otherwise die with that thread. A parent that died
    before the child set it is caught by comparing the parent pid afterwards.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def set_pdeathsig() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return set_pdeathsig
