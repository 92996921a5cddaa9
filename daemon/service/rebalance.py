"""Partitions coming and going: checkpoint before a partition leaves, restore its state before it is served.

A revocation is graceful: the partition's queued steps are finished (for at most
``REVOCATION_WAIT_S``), checkpointed, and only then are its streams dropped, under the call
lock, so never under a running model call. An assignment pauses the new partitions, restores
their streams from the changelog (durable state), and only then lets them be fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiokafka import ConsumerRebalanceListener, TopicPartition

from .. import changelog
from ..bundle import BundleSpec
from ..config import ServeConfig
from ..errors import ChangelogError
from ..metrics import Metrics
from ..pipeline import Pipeline
from .budgets import RESTORE_LOG_EVERY_S, REVOCATION_POLL_S, REVOCATION_WAIT_S
from .checkpoint import Checkpointer
from .clients import Clients
from .housekeeping import Readiness
from .loops import Backpressure

log = logging.getLogger("rnnd.daemon")


class Rebalancer(ConsumerRebalanceListener):
    """The consumer's rebalance listener. aiokafka awaits these callbacks before it rejoins the group."""

    def __init__(self, cfg: ServeConfig, spec: BundleSpec, pipeline: Pipeline, metrics: Metrics, clients: Clients,
                 checkpointer: Checkpointer, call_lock: asyncio.Lock, backpressure: Backpressure,
                 readiness: Readiness, assigned: set[TopicPartition], work: asyncio.Event,
                 on_fatal: Callable[[int], None]) -> None:
        self.cfg = cfg
        self.spec = spec
        self.pipeline = pipeline
        self.metrics = metrics
        self.clients = clients
        self.checkpointer = checkpointer
        self.call_lock = call_lock  # Locks.call, taken alone (never with Locks.commit held)
        self.backpressure = backpressure
        self.readiness = readiness
        self.assigned = assigned  # kept current here, in place: the other parts share this set
        self.work = work
        self.on_fatal = on_fatal  # stop the daemon with this exit code

    async def on_partitions_revoked(self, revoked) -> None:
        await self.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        await self.on_assigned(set(assigned))

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        mine = {tp.partition for tp in revoked if tp.topic == self.cfg.input_topic}
        if not mine:
            return
        deadline = time.monotonic() + REVOCATION_WAIT_S
        while any(self.pipeline.pending_in(p) for p in mine) and time.monotonic() < deadline:
            self.work.set()
            await asyncio.sleep(REVOCATION_POLL_S)
        await self.checkpointer.checkpoint(partitions=mine)
        async with self.call_lock:
            dropped = sum(self.pipeline.revoke(p) for p in mine)
        self.assigned.difference_update(revoked)
        for p in mine:
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(str(p))
        self.metrics.assigned.set(len(self.assigned))
        log.info("partitions %s revoked: checkpointed, %d stream(s) dropped", sorted(mine), dropped)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        mine = {tp for tp in assigned if tp.topic == self.cfg.input_topic}
        for tp in mine:
            self.pipeline.offsets.forget(tp.partition)
        consumer = self.clients.consumer
        if self.cfg.changelog and mine and consumer is not None:
            consumer.pause(*mine)  # nothing of a partition is processed before its state is back
            try:
                await self.restore(sorted(tp.partition for tp in mine))
            except ChangelogError as e:
                log.error("cannot restore state: %s", e)
                self.on_fatal(e.exit_code)
                return
        self.assigned.update(mine)
        if consumer is not None and not self.backpressure.paused:
            consumer.resume(*mine)
        self.readiness.joined = True
        self.metrics.assigned.set(len(self.assigned))
        log.info("partitions %s assigned", sorted(tp.partition for tp in mine))

    async def restore(self, partitions: list[int]) -> None:
        """Before newly assigned partitions are processed: their streams' state from the changelog."""
        restorer = self.clients.restorer
        assert restorer is not None
        last_log = [time.monotonic()]

        def progress(n: int) -> None:
            if time.monotonic() - last_log[0] > RESTORE_LOG_EVERY_S:
                last_log[0] = time.monotonic()
                log.info("restoring partitions %s: %d changelog records read", partitions, n)

        result = await changelog.restore_partitions(restorer, self.clients.changelog_topic, partitions, self.spec,
                                                    self.cfg.on_state_mismatch, progress)
        async with self.call_lock:
            for p, states in result.states.items():
                self.pipeline.restore(p, states)
        streams = sum(len(s) for s in result.states.values())
        self.metrics.restore_seconds.observe(result.seconds)
        self.metrics.restore_records.inc(result.records)
        self.metrics.restored_streams.inc(streams)
        if result.foreign:
            log.warning("%d changelog record(s) of another state layout ignored (on_state_mismatch=reset): those "
                        "streams restart from their initial state", result.foreign)
        log.info("restored %d stream(s) of partitions %s from %d changelog records in %.2fs", streams, partitions,
                 result.records, result.seconds)
