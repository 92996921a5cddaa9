"""Kafka fixtures: one embedded Tansu broker per test session, or an external cluster.

Loaded by ``tests/conftest.py`` (``sys.path.insert(0, str(TESTS))`` then
``from kafka_fixtures import *``); the tests run with ``--import-mode=importlib``, so this
module is found through that path entry, not as a package.

Set ``RNND_TEST_BOOTSTRAP=host:port`` to run the same tests against a real Apache Kafka
(e.g. the one in deploy/); otherwise a Tansu broker is started on a free port for the
session and stopped at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, Protocol

import pytest

from rnnd.embedded_broker import EmbeddedBroker, create_topics

__all__ = ["BOOTSTRAP_ENV", "TopicFactory", "bootstrap", "broker", "kafka_topics", "run_async", "topic_factory"]

#: Environment variable naming external bootstrap servers to test against instead of Tansu.
BOOTSTRAP_ENV = "RNND_TEST_BOOTSTRAP"


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


@pytest.fixture(scope="session")
def bootstrap(broker: EmbeddedBroker | None) -> str:
    """Bootstrap servers for the session: ``$RNND_TEST_BOOTSTRAP`` or the embedded broker's."""
    external = os.environ.get(BOOTSTRAP_ENV)
    if external:
        return external
    assert broker is not None
    return broker.bootstrap_servers


@pytest.fixture
def topic_factory(bootstrap: str) -> Iterator[TopicFactory]:
    """A callable that creates a fresh, uniquely named topic and returns its name.

    Topics are always created explicitly because the broker would otherwise auto-create
    them on first use with a default partition count (4 on Tansu). On an external cluster
    the topics are deleted again at teardown (best effort); the embedded broker's memory
    storage disappears with it anyway.
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
