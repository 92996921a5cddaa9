"""Partitions coming and going: checkpoint before a partition leaves, restore its state before it is served.

A revocation is graceful: the partition's queued steps are finished (for at most
``REVOCATION_WAIT_S``), checkpointed, and only then are its streams dropped, under the call
lock, so never under a running model call. An assignment pauses the new partitions, restores
their streams from the changelog (durable state), and only then lets them be fetched.

With exactly-once, an assignment first starts each new partition's transactional producer
(which fences the previous owner and aborts what it left open, so the restore reads
committed state only), and a revocation stops it after the last commit. A partition whose
transaction failed goes through the same steps again on its own (:meth:`Rebalancer.recover`):
dropped, producer restarted, state restored, input re-read from the committed offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from .. import changelog
from ..config import ServeConfig
from ..errors import ChangelogError
from ..metrics import Metrics
from ..pipeline import Pipeline
from .budgets import (
    FENCED_WAIT_SESSIONS,
    RECOVER_BACKOFF_MAX_S,
    RECOVER_BACKOFF_S,
    RESTORE_LOG_EVERY_S,
    REVOCATION_POLL_S,
    REVOCATION_WAIT_S,
)
from .checkpoint import Checkpointer
from .clients import Clients
from .housekeeping import Readiness
from .loops import Assignment, Backpressure

log = logging.getLogger("rnnd.daemon")


class Rebalancer(ConsumerRebalanceListener):
    """The consumer's rebalance listener. aiokafka awaits these callbacks before it rejoins the group."""

    def __init__(self, cfg: ServeConfig, pipeline: Pipeline, metrics: Metrics, clients: Clients,
                 checkpointer: Checkpointer, call_lock: asyncio.Lock, backpressure: Backpressure,
                 readiness: Readiness, assigned: Assignment, work: asyncio.Event,
                 on_fatal: Callable[[int], None]) -> None:
        self.cfg = cfg
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
        self._recovering: dict[int, asyncio.Task] = {}  # exactly-once: partitions coming back from an abort
        self._restore_lock = asyncio.Lock()

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
        self._stop_recovering(mine)
        await self.checkpointer.checkpoint(partitions=mine)
        async with self.call_lock:
            dropped = sum(self.pipeline.revoke(p) for p in mine)
        if self.cfg.exactly_once and self.clients.sink is not None:
            for p in mine:
                await self.clients.sink.close(p)
        self.assigned.take_away(revoked)
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
        self._stop_recovering({tp.partition for tp in mine})
        if self.cfg.changelog and mine and consumer is not None:
            consumer.pause(*mine)  # nothing of a partition is processed before its state is back
            try:
                if self.cfg.exactly_once:
                    await self._open_transactions({tp.partition for tp in mine})
                await self.restore(sorted(tp.partition for tp in mine))
            except ChangelogError as e:
                log.error("cannot restore state: %s", e)
                self.on_fatal(e.exit_code)
                return
            except (KafkaError, OSError) as e:
                if not self.cfg.exactly_once:
                    raise
                # The broker failed us mid-assignment: those partitions stay paused and come back on their own.
                log.warning("partitions %s: starting their transactions failed (%s: %s); retrying",
                            sorted(tp.partition for tp in mine), type(e).__name__, e)
                await self.recover({tp.partition: e for tp in mine})
                self.readiness.joined = True
                return
        self.assigned.update(mine)
        if consumer is not None and not self.backpressure.paused:
            consumer.resume(*mine)
        self.readiness.joined = True
        self.metrics.assigned.set(len(self.assigned))
        log.info("partitions %s assigned", sorted(tp.partition for tp in mine))

    # --- exactly-once: transactions that fail ----------------------------------------------
    async def _open_transactions(self, partitions: set[int]) -> None:
        sink = self.clients.sink
        results = await asyncio.gather(*(sink.open(p) for p in sorted(partitions)), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def drop(self, partitions: set[int]) -> None:
        """Under the call lock (the checkpoint holds it): the partitions' streams and queued steps go, and
        so does their transaction's routing, so nothing of the failed transaction is applied or sent again."""
        tps = [TopicPartition(self.cfg.input_topic, p) for p in partitions]
        if self.clients.consumer is not None:
            self.clients.consumer.pause(*tps)
        for p in partitions:
            self.pipeline.revoke(p)
            if self.clients.sink is not None:
                self.clients.sink.detach(p)
        self.assigned.take_away(tps)

    async def recover(self, failed: dict[int, BaseException]) -> None:
        """Abort the failed transactions; bring each partition back from its last commit, in the background.

        A partition whose producer was fenced most likely has a newer owner (a rebalance this
        replica has not seen yet; its consumer learns at the next heartbeat, and the revocation
        cancels the recovery). The same error also means the broker aborted the transaction for
        running past its timeout, with no new owner: so a fenced partition is taken back only
        after ``FENCED_WAIT_SESSIONS`` session timeouts without that revocation.
        """
        sink = self.clients.sink
        for p in failed:
            await sink.close(p)
        fenced = {p for p, e in failed.items() if sink.fenced(e)}
        wait = FENCED_WAIT_SESSIONS * self.cfg.session_timeout_ms / 1000
        if fenced:
            log.warning("input partitions %s: another producer took their transactional ids (a rebalance moved "
                        "them) or their transactions timed out: left to the new owner, or taken back in %.0fs "
                        "if no rebalance comes", sorted(fenced), wait)
        for p in sorted(failed):
            if p not in self._recovering:
                self._recovering[p] = asyncio.create_task(self._come_back(p, wait if p in fenced else 0.0),
                                                          name=f"recover-{p}")

    async def _come_back(self, p: int, delay: float) -> None:
        tp = TopicPartition(self.cfg.input_topic, p)
        backoff = RECOVER_BACKOFF_S
        try:
            await asyncio.sleep(delay)
            while True:
                consumer = self.clients.consumer
                if consumer is None or tp not in consumer.assignment():
                    return  # revoked meanwhile: the next assignment restores it
                try:
                    await self.clients.sink.open(p)
                    await self.restore([p])
                    committed = await consumer.committed(tp)
                    break
                except (KafkaError, OSError) as e:
                    await self.clients.sink.close(p)
                    async with self.call_lock:
                        self.pipeline.revoke(p)  # a restore cut short leaves nothing half-restored
                    log.warning("input partition %d: recovery failed (%s: %s); again in %.1fs", p,
                                type(e).__name__, e, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RECOVER_BACKOFF_MAX_S)
            # No wait from here on: the position, the assignment and fetching change together.
            if committed is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)
            self.assigned.add(tp)
            if not self.backpressure.paused:
                consumer.resume(tp)
            log.info("input partition %d recovered: state restored, reading again from offset %s", p, committed)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: the partition would stay paused for good, so stop (the orchestrator restarts)
            log.exception("input partition %d: recovery failed unexpectedly", p)
            self.on_fatal(1)
        finally:
            self._recovering.pop(p, None)

    def _stop_recovering(self, partitions: set[int]) -> None:
        for p in partitions:
            task = self._recovering.pop(p, None)
            if task is not None:
                task.cancel()

    def close(self) -> None:
        self._stop_recovering(set(self._recovering))

    async def restore(self, partitions: list[int]) -> None:
        """Before newly assigned partitions are processed: their streams' state from the changelog."""
        async with self._restore_lock:  # one reader: a second restore would take its assignment away
            await self._restore(partitions)

    async def _restore(self, partitions: list[int]) -> None:
        restorer = self.clients.restorer
        assert restorer is not None
        log.info("restoring partitions %s from %s", partitions, self.clients.changelog_topic)
        last_log = [time.monotonic()]

        def progress(n: int) -> None:
            if time.monotonic() - last_log[0] > RESTORE_LOG_EVERY_S:
                last_log[0] = time.monotonic()
                log.info("restoring partitions %s: %d changelog records read", partitions, n)

        while True:
            spec = self.pipeline.spec
            result = await changelog.restore_partitions(restorer, self.clients.changelog_topic, partitions, spec,
                                                        self.cfg.on_state_mismatch, progress)
            async with self.call_lock:
                if self.pipeline.spec.state_hash == spec.state_hash:
                    for p, states in result.states.items():
                        self.pipeline.restore(p, states)
                    break
            # A hot reload of another state layout (on_state_mismatch=reset) swapped in meanwhile:
            # what was read is of the old layout, so read it again for the new one.
            log.info("restoring partitions %s again: the state layout changed (hot reload) while reading", partitions)
        streams = sum(len(s) for s in result.states.values())
        self.metrics.restore_seconds.observe(result.seconds)
        self.metrics.restore_records.inc(result.records)
        self.metrics.restored_streams.inc(streams)
        if result.foreign:
            log.warning("%d changelog record(s) of another state layout ignored (on_state_mismatch=reset): those "
                        "streams restart from their initial state", result.foreign)
        log.info("restored %d stream(s) of partitions %s from %d changelog records in %.2fs", streams, partitions,
                 result.records, result.seconds)
