"""The daemon: builds the parts, hands each its collaborators, and runs them until it is stopped.

The parts share, by reference: the live ``Clients``, the set of assigned partitions (the
``Rebalancer`` keeps it current), the two ``Locks`` (order: commit, then call), the
``Readiness`` facts, and two events (``stopping``; ``work``: the infer loop has something
to do). Nothing else is shared, so each part can be read, and tested, on its own.

SIGTERM/SIGINT: stop fetching, finish queued steps, flush, commit, leave the group, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from aiokafka.errors import KafkaError

from .. import changelog, kafka
from ..config import ServeConfig
from ..metrics import HttpServer, Metrics, start_endpoints
from ..pipeline import pipeline_for
from ..runtime import BundleModel
from .budgets import CONNECT_BACKOFF_MAX_S, CONNECT_BACKOFF_S, DRAIN_POLL_S, DRAIN_S
from .checkpoint import Checkpointer, Locks
from .clients import AiokafkaFactory, ClientFactory, Clients
from .housekeeping import BrokerWatch, Housekeeper, LoopWatch, Readiness
from .loops import Assignment, Backpressure, Fetcher, Inferrer
from .models import open_model, report_model
from .publish import Publisher
from .rebalance import Rebalancer
from .reload import AdminServer, Reloader

log = logging.getLogger("rnnd.daemon")


class Daemon:
    """One bundle (replaceable while serving: ``reload``) served from one input topic. ``clients``: the Kafka
    client factory (aiokafka's by default)."""

    def __init__(self, cfg: ServeConfig, metrics: Metrics | None = None, clients: ClientFactory | None = None,
                 endpoints: bool = True) -> None:
        """``endpoints``: serve /metrics (and the admin endpoint) itself, and watch what belongs to the
        process (GC pauses, event-loop lag); a route's are its router's, once for all routes."""
        self.cfg = cfg
        self.metrics = metrics = metrics or Metrics()
        model, provider = open_model(cfg)
        self.pipeline = pipeline = pipeline_for(model, cfg, cfg.input_topic, metrics)
        self.group_id, self.changelog_topic = changelog.group_and_topic(cfg.group_id, cfg.changelog_topic,
                                                                        cfg.input_topic, model.spec.model.name)
        cfg.check_changelog_topic(self.changelog_topic)  # its default name comes from the model's
        self.exit_code = 0
        self.http = HttpServer(metrics, self.is_ready, cfg.http_host, cfg.http_port) if endpoints else None
        self.factory = factory = clients or AiokafkaFactory()
        self.clients = kc = Clients(factory, cfg, self.group_id, self.changelog_topic)
        self.assigned = Assignment()  # shared, updated in place by the rebalancer
        self.locks = locks = Locks()
        self._stopping = asyncio.Event()
        self._work = asyncio.Event()
        self.readiness = readiness = Readiness(cfg, metrics)
        self.publisher = Publisher(cfg, pipeline, metrics, kc)
        self.backpressure = Backpressure(cfg, pipeline, metrics, kc, self.assigned)
        self.fetcher = Fetcher(cfg, pipeline, metrics, kc, self.backpressure, self.publisher, readiness,
                               self.assigned, self._stopping, self._work)
        self.inferrer = Inferrer(cfg, pipeline, self.publisher, self.backpressure, locks.call, self._work)
        self.checkpointer = Checkpointer(cfg, pipeline, metrics, kc, locks, self.publisher, readiness,
                                         self.assigned, self.changelog_topic)
        self.rebalancer = Rebalancer(cfg, pipeline, metrics, kc, self.checkpointer, locks.call,
                                     self.backpressure, readiness, self.assigned, self._work, self.fail)
        self.checkpointer.recovery = self.rebalancer  # exactly-once: a failed transaction's partition comes back
        self.housekeeper = Housekeeper(cfg, pipeline, metrics, kc, self.assigned)
        self.broker_watch = BrokerWatch(cfg, metrics, kc, factory, readiness)
        self.loop_watch = LoopWatch(metrics) if endpoints else None
        self.reloader = Reloader(cfg, pipeline, metrics, self.checkpointer, provider, self._stopping)
        admin = cfg.admin_endpoint
        self.admin = AdminServer(self.reloader, *admin) if admin and endpoints else None
        report_model(metrics, model, provider)
        metrics.messages.labels(cfg.input_topic)  # a series at 0 before the first message
        metrics.ready.set_function(lambda: float(self.is_ready()))  # what /readyz answers, when scraped

    @property
    def model(self) -> BundleModel:
        """The bundle serving now (a hot reload replaces it)."""
        return self.pipeline.model

    # --- lifecycle ------------------------------------------------------------------------
    async def run(self, install_signals: bool = True) -> int:
        loop = asyncio.get_running_loop()
        if self.loop_watch is not None:
            self.metrics.watch_gc()
        handled = []
        for sig in (signal.SIGTERM, signal.SIGINT) if install_signals else ():
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
                loop.add_signal_handler(sig, self.stop)
                handled.append(sig)
        cfg = self.cfg
        if not await start_endpoints([(self.http, "/metrics", "http_port or http_host"),
                                      (self.admin, "/admin/reload", "admin_address")]):
            return 2
        provider = self.reloader.provider
        where = f" | http://{cfg.http_host}:{self.http.port}/metrics" if self.http is not None else ""
        log.info("serving %s on %s (requested %s)%s | %s → %s%s", self.model.spec.model.ref, provider.actual,
                 provider.requested, where, cfg.input_topic, cfg.output_topic, " (shadow)" if cfg.shadow else "")
        if self.admin is not None:
            log.info("admin endpoint: POST http://%s:%d/admin/reload", self.admin.host, self.admin.port)
        if cfg.watch_model:
            log.info("watching %s: a new bundle written there is checked and swapped in (watch_model)", cfg.model)
        try:
            await self._connect()
            if self._stopping.is_set():
                return 0
            tasks = [asyncio.create_task(c, name=n) for n, c in (
                ("fetch", self.fetcher.run()), ("infer", self.inferrer.run()), ("checkpoint", self.checkpointer.run()),
                ("housekeep", self.housekeeper.run()), ("watch", self.broker_watch.run()),
                *((("loop-watch", self.loop_watch.run()),) if self.loop_watch is not None else ()),
                *((("model-watch", self.reloader.watch()),) if cfg.watch_model else ()))]
            stop = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and t.exception() is not None:
                    log.error("task %s failed: %r", t.get_name(), t.exception())
                    raise t.exception()  # type: ignore[misc]
            await self._drain(tasks)
            return self.exit_code
        finally:
            await self._close()
            # Handlers off while the loop still runs: left to asyncio, a signal arriving while the
            # loop closes finds its wake-up pipe already closed (Python 3.11 closes it before it
            # removes the handlers) and prints a traceback on the way out.
            for sig in handled:
                loop.remove_signal_handler(sig)

    def stop(self) -> None:
        if not self._stopping.is_set():
            log.info("stopping: finishing queued steps, flushing outputs, committing offsets")
            self._stopping.set()
            self._work.set()

    def fail(self, exit_code: int) -> None:
        """Stop with ``exit_code`` (a part that cannot go on, e.g. a changelog that cannot be restored)."""
        self.exit_code = exit_code
        self.stop()

    def is_ready(self) -> bool:
        return self.readiness.ready() and not self._stopping.is_set()

    async def _connect(self) -> None:
        """Connect with retry and backoff: a broker that is down at start is waited for, not fatal.

        So is a missing input topic (a deployment job may create it after the daemon starts):
        readiness stays false and each try says which topic is missing where.
        """
        backoff = CONNECT_BACKOFF_S
        cfg = self.cfg
        while not self._stopping.is_set():
            try:
                await self.clients.open(self.rebalancer, self.readiness.on_error("produce"))
                self.readiness.on_connected()
                log.info("connected to %s as group %s", cfg.bootstrap_servers, self.group_id)
                return
            except kafka.MissingTopic as e:  # the brokers answered: nothing is unreachable
                await self.clients.close()
                log.warning("%s; waiting for it (not ready), checking again in %.1fs", e, backoff)
            except (KafkaError, OSError) as e:
                await self.clients.close()
                self.metrics.kafka_errors.labels("connect").inc()
                refused = kafka.login_refused()
                if refused:  # reachable, but the login is wrong: retried (a rotated secret file is re-read)
                    log.warning("Kafka at %s refused the login (%s): check sasl_mechanism, sasl_username and the "
                                "password; retrying in %.1fs", cfg.bootstrap_servers, refused, backoff)
                else:
                    log.warning("Kafka at %s not reachable (%s: %s); retrying in %.1fs", cfg.bootstrap_servers,
                                type(e).__name__, e, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, CONNECT_BACKOFF_MAX_S)

    async def _drain(self, tasks: list[asyncio.Task]) -> None:
        """After stop(): the fetch task has ended; let the infer task empty the queues, then commit."""
        started = time.monotonic()
        deadline = started + DRAIN_S
        while self.pipeline.busy() and time.monotonic() < deadline:
            self._work.set()
            await asyncio.sleep(DRAIN_POLL_S)
        left = self.pipeline.scheduler.inflight
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.publisher.send_side_outputs()
        await self.checkpointer.checkpoint(final=True)
        log.info("drained in %.2fs (%d step(s) left unapplied, to be re-read by the next owner)",
                 time.monotonic() - started, left)

    async def _close(self) -> None:
        self.metrics.unwatch_gc()
        self.rebalancer.close()
        await self.clients.close()
        if self.http is not None:
            await self.http.stop()
        if self.admin is not None:
            await self.admin.stop()
        self.inferrer.close()
