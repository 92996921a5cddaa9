"""Apache Kafka 4.x as a local process: a single KRaft node from Maven Central's jars.

The tests, the benchmarks and ``rnnd broker --kind kafka`` start real Apache Kafka with this,
beside Tansu (``rnnd.embedded_broker``): one JVM in combined mode
(``process.roles=broker,controller``) on loopback ports, its log dir formatted once with a
random cluster id. No distribution tarball and no Docker: the jars come from Maven Central,
resolved by ``requirements/kafka/pom.xml`` and checked against ``requirements/kafka/jars.sha256``
by :func:`fetch` (``make kafka``; the install step runs it). Starting needs no network.

What differs from Tansu, for the callers (measured here with aiokafka 0.14 on 4.4.0):

* the log is on disk: topics, records and committed offsets survive :meth:`ApacheKafka.restart`
  and a kill -9 of the broker;
* transactions and idempotent producers work (``processing_guarantee=exactly_once``), and
  ``read_committed`` readers really hide aborted records;
* ``end_offsets`` / ``seek_to_end`` are right, log compaction and retention run;
* topics are never created implicitly (``auto.create.topics.enable=false``, as in most
  production clusters); a group join has no fixed pause (``group.initial.rebalance.delay.ms=0``);
* it needs a JVM: ~4 s to start on two cores and ~400 MB of memory.

TLS and SASL listeners are optional (:class:`TlsListener`, ``scram_users``), so the security
tests talk to Kafka's own TLS and SASL/SCRAM implementations, not to a proxy.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rnnd.daemon.errors import BrokerSetupError

from .broker_process import BrokerProcess, can_connect, free_port, parent_death_signal

__all__ = ["VERSION", "ApacheKafka", "TlsListener", "classpath", "fetch", "java", "libs_dir"]

#: The Apache Kafka version the jars lock pins (requirements/kafka/pom.xml).
VERSION = "4.4.0"

#: Where the fetched jars live; outside the clone, so clean clones reuse them like pip's cache.
LIBS_ENV = "RNND_KAFKA_LIBS"

#: Printed by the broker once every listener accepts connections.
_READY_MARKER = b"Kafka Server started"

#: A controlled shutdown moves nothing on a single node, but the log is flushed and closed:
#: it takes 1-3 s here. Past this the broker is killed (a later start recovers the log).
STOP_GRACE_S = 30.0

#: JVM start, log recovery after a kill -9, and the metadata log replay take 4-15 s on two
#: busy cores; a minute means something is really wrong (the tail of the log says what).
STARTUP_TIMEOUT_S = 90.0

_FETCH_HINT = "run `make kafka` (or `python requirements/kafka/fetch.py`)"


def libs_dir() -> Path:
    """The folder holding the broker's jars: ``$RNND_KAFKA_LIBS`` or ``~/.cache/rnnd/apache-kafka-<version>``."""
    env = os.environ.get(LIBS_ENV)
    return Path(env) if env else Path.home() / ".cache" / "rnnd" / f"apache-kafka-{VERSION}"


def java() -> str:
    """The ``java`` executable (17 or newer), or a :class:`BrokerSetupError` that says how to get one."""
    found = shutil.which("java")
    if found is None:
        raise BrokerSetupError("Apache Kafka needs Java 17 or newer and `java` is not on PATH: install a JDK "
                               "(Debian: `apt-get install openjdk-17-jre-headless`)")
    try:
        out = subprocess.run([found, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BrokerSetupError(f"`{found} -version` failed ({e}): install a working JDK 17 or newer") from e
    m = re.search(r'version "(\d+)', out)
    if m is None or int(m.group(1)) < 17:
        raise BrokerSetupError(f"Apache Kafka {VERSION} needs Java 17 or newer; {found} is "
                               f"{m.group(1) if m else 'of unknown version'}: install a JDK 17")
    return found


def classpath() -> str:
    """The broker's classpath, or a :class:`BrokerSetupError` naming the fetch command."""
    libs = libs_dir()
    if not any(libs.glob(f"kafka_2.13-{VERSION}.jar")):
        raise BrokerSetupError(f"Apache Kafka {VERSION}'s jars are not in {libs}: {_FETCH_HINT}")
    return str(libs / "*")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_lock(lock: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            digest, name = line.split()
            out[name] = digest
    return out


def fetch(pom: Path, lock: Path, *, update: bool = False) -> Path:
    """Put the locked jars in :func:`libs_dir` (a no-op when they are there) and return the folder.

    Resolves ``pom`` with Maven (``dependency:copy-dependencies``, runtime scope) into a
    temporary folder, checks every jar against ``lock`` (name → sha256) and only then moves
    the folder into place, so an interrupted or mismatching fetch leaves nothing half-done.
    ``update``: write ``lock`` from what Maven resolved instead of checking against it.
    """
    target = libs_dir()
    locked = {} if update else _read_lock(lock)
    if not update and target.is_dir() and all(
            (target / n).is_file() and _digest(target / n) == d for n, d in locked.items()):
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerSetupError("fetching Apache Kafka's jars needs Maven and `mvn` is not on PATH "
                               "(Debian: `apt-get install maven`)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        result = subprocess.run([mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
                                 f"-DoutputDirectory={staging}", "-DincludeScope=runtime"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise BrokerSetupError(f"Maven could not resolve {pom} (is Maven Central reachable?):\n{tail}")
        got = {p.name: _digest(p) for p in staging.glob("*.jar")}
        if update:
            lines = [f"# sha256 of every jar {pom.name} resolves to (runtime scope); fetch.py checks them.",
                     "# Rewritten by `python requirements/kafka/fetch.py --update`; do not edit by hand."]
            lines += [f"{d}  {n}" for n, d in sorted(got.items())]
            lock.write_text("\n".join(lines) + "\n")
        else:
            wrong = sorted(n for n in set(got) | set(locked) if got.get(n) != locked.get(n))
            if wrong:
                raise BrokerSetupError(f"the jars Maven resolved differ from {lock} ({', '.join(wrong[:5])}"
                                       f"{' …' if len(wrong) > 5 else ''}): review and refresh the lock with "
                                       "`python requirements/kafka/fetch.py --update`")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(frozen=True)
class TlsListener:
    """Kafka's own TLS for the ``SSL`` (mutual TLS) and ``SASL_SSL`` listeners, from PEM files.

    ``key``: the broker's PKCS#8 private key, unencrypted (Kafka's PEM keystore cannot read
    the PBES2 encryption that OpenSSL and ``cryptography`` write; the file's permissions guard
    it instead); ``cert``: its certificate; ``ca``: the CA that signs the clients' certificates
    (the ``SSL`` listener demands one; ``SASL_SSL`` does not).
    """

    cert: Path
    key: Path
    ca: Path


class ApacheKafka(BrokerProcess):
    """One Apache Kafka node (broker and controller) in ``data_dir``, started and stopped by pid.

    Listeners on 127.0.0.1: ``PLAINTEXT`` always (:attr:`bootstrap_servers`), and with ``tls``
    an ``SSL`` one that demands a client certificate (:attr:`ssl_bootstrap_servers`) and a
    ``SASL_SSL`` one for ``scram_users`` (name → password, SCRAM-SHA-256 and -512, and PLAIN)
    (:attr:`sasl_bootstrap_servers`). The ports are picked at the first :meth:`start` and kept
    by :meth:`restart`, so clients bootstrapped before a restart find the broker again.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *, port: int | None = None,
                 tls: TlsListener | None = None,
                 scram_users: Mapping[str, str] | None = None, heap_mb: int = 768,
                 configs: Mapping[str, str] | None = None,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        super().__init__()
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="rnnd-kafka-"))
        self.requested_port = port  # the PLAINTEXT port (None: a free one); the others are always free ones
        self.tls = tls
        self.scram_users = dict(scram_users or {})
        if self.scram_users and tls is None:
            raise ValueError("scram_users need the SASL_SSL listener, which needs tls")
        self.heap_mb = heap_mb
        self.configs = dict(configs or {})
        self.startup_timeout_s = startup_timeout_s
        self._ports: dict[str, int] = {}

    # -- addresses and state ----------------------------------------------------------------

    def _port(self, listener: str) -> int:
        if listener not in self._ports:
            raise RuntimeError(f"ApacheKafka has no {listener} listener (not started, or not configured)")
        return self._ports[listener]

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self._port('PLAINTEXT')}"

    @property
    def ssl_bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self._port('SSL')}"

    @property
    def sasl_bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self._port('SASL_SSL')}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    # -- configuration ----------------------------------------------------------------------

    def _properties(self) -> dict[str, str]:
        p = self._ports
        listeners = {"PLAINTEXT": p["PLAINTEXT"], "CONTROLLER": p["CONTROLLER"]}
        if self.tls is not None:
            listeners |= {"SSL": p["SSL"], "SASL_SSL": p["SASL_SSL"]}
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{p['CONTROLLER']}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listeners": ",".join(f"{n}://127.0.0.1:{port}" for n, port in listeners.items()),
            "advertised.listeners": ",".join(f"{n}://127.0.0.1:{port}" for n, port in listeners.items()
                                             if n != "CONTROLLER"),
            "listener.security.protocol.map": ",".join(f"{n}:{'PLAINTEXT' if n == 'CONTROLLER' else n}"
                                                       for n in listeners),
            "log.dirs": str(self.data_dir / "log"),
            # One node: every internal topic with one replica, and few partitions (the defaults,
            # 50 each, cost seconds of a two-core machine at the first group or transaction).
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "num.partitions": "4",
        }
        if self.tls is not None:
            t = self.tls
            props |= {
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(self._keystore_path()),
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": str(t.ca),
                "listener.name.ssl.ssl.client.auth": "required",
                "listener.name.sasl_ssl.ssl.client.auth": "none",
                "sasl.enabled.mechanisms": "SCRAM-SHA-256,SCRAM-SHA-512,PLAIN",
                "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "listener.name.sasl_ssl.plain.sasl.jaas.config":
                    "org.apache.kafka.common.security.plain.PlainLoginModule required "
                    + " ".join(f'user_{u}="{pw}"' for u, pw in self.scram_users.items()) + ";",
            }
        return props | self.configs

    def _keystore_path(self) -> Path:
        return self.data_dir / "broker-keystore.pem"

    def _write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.tls is not None:  # Kafka's PEM keystore: the key, then the certificate chain, in one file
            keystore = self._keystore_path()
            keystore.touch(mode=0o600)
            keystore.write_bytes(self.tls.key.read_bytes() + self.tls.cert.read_bytes())
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in self._properties().items()))
        (self.data_dir / "log4j2.properties").write_text(
            "status = warn\n"
            "appender.file.type = File\nappender.file.name = file\n"
            f"appender.file.fileName = {self.log_path}\nappender.file.append = true\n"
            "appender.file.layout.type = PatternLayout\nappender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = INFO\nrootLogger.appenderRef.file.ref = file\n"
            # The request logger and the controller's per-record chatter are noise at INFO.
            "logger.state.name = state.change.logger\nlogger.state.level = WARN\n")
        return path

    def _jvm(self) -> list[str]:
        return [java(), f"-Xms{min(256, self.heap_mb)}m", f"-Xmx{self.heap_mb}m", "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}", "-cp", classpath()]

    def _format(self, config: Path) -> None:
        """Format the log dir once (KRaft needs it): a random cluster id, and the SCRAM users."""
        if (self.data_dir / "log" / "meta.properties").exists():
            return
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        argv = [*self._jvm(), "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(config)]
        for user, password in self.scram_users.items():
            for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                argv.append(f"--add-scram={mech}=[name={user},password={password}]")
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"formatting {self.data_dir / 'log'} failed:\n{result.stdout}{result.stderr}")

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> ApacheKafka:
        """Start the node (formatting its log dir the first time) and wait until it serves; return self."""
        if self.running:
            return self
        if not self._ports:
            names = ["PLAINTEXT", "CONTROLLER"] + (["SSL", "SASL_SSL"] if self.tls is not None else [])
            self._ports = {n: free_port() for n in names}
            if self.requested_port:
                self._ports["PLAINTEXT"] = self.requested_port
        config = self._write_config()
        self._format(config)
        with self.log_path.open("ab") as log:
            offset = log.tell()
            proc = subprocess.Popen([*self._jvm(), "kafka.Kafka", str(config)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=parent_death_signal())
        self._started(proc)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                self._forget()
                raise RuntimeError(f"Apache Kafka exited with status {code} while starting. "
                                   f"Last lines of {self.log_path}:\n{self._tail(offset, 25)}")
            if _READY_MARKER in self._read_log(offset) and can_connect(self._ports["PLAINTEXT"]):
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"Apache Kafka did not start within {self.startup_timeout_s:.0f} s. "
                                   f"Last lines of {self.log_path}:\n{self._tail(offset, 25)}")
            time.sleep(0.05)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM (a controlled shutdown), then SIGKILL after ``grace_s``. Safe to call repeatedly."""
        super().stop(grace_s)

    def kill(self) -> None:
        """SIGKILL: the broker dies mid-write; the next :meth:`start` recovers its log."""
        proc, self._proc = self._proc, None
        self._forget()
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self) -> ApacheKafka:
        """Stop and start again on the same ports and log dir: everything on the log survives."""
        self.stop()
        return self.start()

    def __repr__(self) -> str:
        return f"ApacheKafka({self.data_dir}, {'pid=' + str(self.pid) if self.running else 'stopped'})"
