"""Kafka fixtures: one embedded Tansu broker and one Apache Kafka node per test session, or an external cluster.

Loaded by ``tests/conftest.py`` (``sys.path.insert(0, str(TESTS))`` then
``from kafka_fixtures import *``); the tests run with ``--import-mode=importlib``, so this
module is found through that path entry, not as a package.

Tests reach the broker through :func:`bootstrap` (and :func:`topic_factory`). Which broker
that is, is :func:`broker_kind`: Tansu unless a module opts into more with a module-level
``BROKERS = ("tansu", "kafka")`` (or a test with ``@pytest.mark.brokers("tansu", "kafka")``),
in which case each of its tests runs once per broker, ids ``[tansu]`` and ``[kafka]``
(tests/conftest.py's ``pytest_generate_tests``). Both brokers start lazily, the first time a
test needs them, and live until the session ends.

Set ``RNND_TEST_BOOTSTRAP=host:port`` to run the same tests against an external cluster
(e.g. the one in deploy/) instead: every opted-in test then runs once, as ``[external]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from rnnd.apache_kafka import ApacheKafka, TlsListener
from rnnd.daemon.errors import BrokerSetupError
from rnnd.embedded_broker import EmbeddedBroker, create_topics

__all__ = ["BOOTSTRAP_ENV", "BROKER_KINDS", "EXTERNAL", "SCRAM_USER", "KafkaListeners", "TopicFactory",
           "apache_kafka", "bootstrap", "broker", "broker_kind", "kafka_security", "kafka_topics", "run_async",
           "start_or_fail", "topic_factory"]

#: Environment variable naming external bootstrap servers to test against instead of Tansu.
BOOTSTRAP_ENV = "RNND_TEST_BOOTSTRAP"
#: The brokers a module can opt into (``BROKERS = (...)``); the first is what other tests get.
BROKER_KINDS = ("tansu", "kafka")
#: :func:`broker_kind` when ``$RNND_TEST_BOOTSTRAP`` is set: the one broker every test gets.
EXTERNAL = "external"
#: The SCRAM (and PLAIN) user of the session's Apache Kafka node.
SCRAM_USER = "rnnd-test"


class TopicFactory(Protocol):
    """``make(prefix, partitions=4, configs=None) -> topic name`` (see :func:`topic_factory`)."""

    def __call__(self, prefix: str, partitions: int = 4, configs: dict[str, str] | None = None) -> str: ...


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion from synchronous code and return its result.

    Uses ``asyncio.run`` normally; when called while an event loop is already running in
    this thread (a fixture used from inside an async helper), it runs the coroutine on a
    fresh loop in a helper thread, because ``asyncio.run`` refuses to nest.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=target, name="kafka-fixtures-run-async")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker | None]:
    """The session's embedded broker, or None when testing against ``$RNND_TEST_BOOTSTRAP``.

    For tests that must restart or kill the broker. Restarting it wipes every topic (memory
    storage), which affects every later test in the session: prefer a separate
    ``EmbeddedBroker()`` for such tests, and skip when this is None. Its log lies in pytest's
    temporary folder (``broker.log_path``), kept for the last few sessions like all of them.
    """
    if os.environ.get(BOOTSTRAP_ENV):
        yield None
        return
    b = EmbeddedBroker(log_dir=tmp_path_factory.mktemp("tansu"))
    b.start()
    try:
        yield b
    finally:
        b.stop()


def start_or_fail(node: ApacheKafka) -> ApacheKafka:
    """Start ``node``; a machine without Java or the jars FAILS the test with the one-line fix.

    Not a skip: a suite that silently skips its Apache Kafka runs looks green while it tests
    only Tansu. ``BrokerSetupError``'s message is the fix (install a JDK, ``make kafka``).
    """
    try:
        return node.start()
    except BrokerSetupError as e:
        pytest.fail(str(e), pytrace=False)


@dataclass(frozen=True)
class KafkaListeners:
    """The session's Apache Kafka node with what a client needs for each of its listeners.

    ``ssl_bootstrap_servers`` demands a client certificate signed by ``ca`` (``client_cert`` /
    ``client_key`` is one, key unencrypted); ``sasl_bootstrap_servers`` is SASL_SSL (server
    TLS only) for ``username`` / ``password`` with SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN;
    ``password_file`` holds the password for ``--sasl-password-file``. ``pki`` (a
    ``tls_certs.CA``) issues more certificates from the same CA.
    """

    node: ApacheKafka
    ca: Path
    client_cert: Path
    client_key: Path
    username: str
    password: str
    password_file: Path
    pki: Any

    @property
    def bootstrap_servers(self) -> str:
        return self.node.bootstrap_servers

    @property
    def ssl_bootstrap_servers(self) -> str:
        return self.node.ssl_bootstrap_servers

    @property
    def sasl_bootstrap_servers(self) -> str:
        return self.node.sasl_bootstrap_servers

    def ssl_flags(self) -> list[str]:
        """``rnnd serve/produce/tail`` flags for mutual TLS on :attr:`ssl_bootstrap_servers`."""
        return ["--security-protocol", "SSL", "--ssl-cafile", str(self.ca), "--ssl-certfile", str(self.client_cert),
                "--ssl-keyfile", str(self.client_key)]

    def sasl_flags(self, mechanism: str = "SCRAM-SHA-512") -> list[str]:
        """The same flags for SASL_SSL on :attr:`sasl_bootstrap_servers`; the password from its file."""
        return ["--security-protocol", "SASL_SSL", "--ssl-cafile", str(self.ca), "--sasl-mechanism", mechanism,
                "--sasl-username", self.username, "--sasl-password-file", str(self.password_file)]


@pytest.fixture(scope="session")
def kafka_security(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaListeners]:
    """The session's Apache Kafka node with TLS and SASL listeners, started at first use.

    One node for the whole session (a JVM costs ~5 s and ~400 MB); its log and
    ``server.log`` lie in pytest's temporary folder, kept for the last few sessions.
    Started whatever ``$RNND_TEST_BOOTSTRAP`` says: the tests that ask for it test this
    node's own listeners, which an external cluster may not have.
    """
    from tls_certs import make_ca

    pki = make_ca(tmp_path_factory.mktemp("kafka-pki"))
    server = pki.issue("apache-kafka", hosts=("127.0.0.1", "localhost"))
    client = pki.issue("rnnd-test-client", client=True)
    password = "scram-" + uuid.uuid4().hex  # unique, so a test can look for it in logs and output
    password_file = pki.folder / "sasl-password"
    password_file.write_text(password + "\n")
    node = ApacheKafka(tmp_path_factory.mktemp("apache-kafka"), tls=TlsListener(server.cert, server.key, pki.cert),
                       scram_users={SCRAM_USER: password})
    start_or_fail(node)
    try:
        yield KafkaListeners(node, pki.cert, client.cert, client.key, SCRAM_USER, password, password_file, pki)
    finally:
        node.stop()


@pytest.fixture(scope="session")
def apache_kafka(kafka_security: KafkaListeners) -> ApacheKafka:
    """The session's Apache Kafka node (:func:`kafka_security`'s), for tests that need no listener but PLAINTEXT.

    Never restart or kill it: every later Kafka test of the session uses it. A test that
    must, starts its own ``ApacheKafka`` (through :func:`start_or_fail`).
    """
    return kafka_security.node


@pytest.fixture(scope="session")
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Which broker :func:`bootstrap` is: ``"tansu"``, ``"kafka"`` or ``"external"``.

    Parametrised by tests/conftest.py for the modules and tests that opt into several
    brokers; any other test gets Tansu (or the external cluster when one is set).
    """
    default = EXTERNAL if os.environ.get(BOOTSTRAP_ENV) else BROKER_KINDS[0]
    return str(getattr(request, "param", default))


@pytest.fixture(scope="session")
def bootstrap(request: pytest.FixtureRequest, broker_kind: str) -> str:
    """Bootstrap servers of :func:`broker_kind`'s broker: ``$RNND_TEST_BOOTSTRAP``, Tansu's, or Kafka's PLAINTEXT.

    The brokers are looked up by name, not depended on, so that a run of Kafka tests only
    never starts Tansu and a run of Tansu tests never starts a JVM.
    """
    external = os.environ.get(BOOTSTRAP_ENV)
    if external:
        return external
    if broker_kind == "kafka":
        node: ApacheKafka = request.getfixturevalue("apache_kafka")
        return node.bootstrap_servers
    assert broker_kind == "tansu", broker_kind
    tansu: EmbeddedBroker | None = request.getfixturevalue("broker")
    assert tansu is not None
    return tansu.bootstrap_servers


@pytest.fixture
def topic_factory(bootstrap: str) -> Iterator[TopicFactory]:
    """A callable that creates a fresh, uniquely named topic and returns its name.

    Topics are always created explicitly because the broker would otherwise auto-create
    them on first use with a default partition count (4 on Tansu); Apache Kafka here never
    creates one implicitly. On an external cluster the topics are deleted again at teardown
    (best effort); the embedded brokers' storage disappears with them anyway.
    """
    created: list[str] = []

    def make(prefix: str, partitions: int = 4, configs: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        run_async(create_topics(bootstrap, {name: partitions}, {name: dict(configs)} if configs else None))
        created.append(name)
        return name

    yield make

    if created and os.environ.get(BOOTSTRAP_ENV):
        with contextlib.suppress(Exception):
            run_async(_delete_topics(bootstrap, created))


@pytest.fixture
def kafka_topics(topic_factory: TopicFactory) -> TopicFactory:
    """Alias of :func:`topic_factory`."""
    return topic_factory


async def _delete_topics(bootstrap: str, names: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        await admin.delete_topics(names, timeout_ms=5000)
    finally:
        await admin.close()
