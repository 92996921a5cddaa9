"""Checkpoints: what makes a crash repeat outputs but never lose one, and the two locks they hold.

A checkpoint runs every ``commit_interval_s`` (``Checkpointer.run``), for the revoked
partitions on a revocation, and once more on shutdown (``final``). It holds the commit lock
throughout and the call lock for the snapshot (no model call runs then).

At-least-once (``processing_guarantee=at_least_once``), in order:

1. snapshot the commit points (per partition, the first input not yet fully applied);
2. side outputs: the dead letters decoded up to the snapshot go to the sink (taken right
   after it, with no wait between, so none of a record below a commit point is left behind);
3. changelog records: every stream changed since the last checkpoint (tombstones first), taken
   and encoded now, so they hold exactly the state of the snapshot. The periodic checkpoint
   releases the call lock here: model calls go on during the flushes below (a flush is a
   produce round trip or more; holding the model for it stalled every output, once a
   second), and what they apply belongs to the next checkpoint. A revocation's and the
   final checkpoint keep the lock through step 4, so no step of a partition about to move
   is applied after its snapshot (a graceful rebalance repeats nothing);
4. flush the outputs: every prediction and dead letter handed to the sink so far (those of
   the snapshot's steps among them) is acknowledged, failures resent — stop here if not,
   keeping step 3's records for the next checkpoint, which sends them ahead of its own;
5. send the changelog records and flush them: acknowledged — stop here if not;
6. commit the input offsets of step 1, for the partitions this daemon still owns.

The changelog records go out only after the outputs of every step they include are
acknowledged (4 before 5): a crash between 4 and 5 replays inputs onto the previous changelog
state, giving the same outputs again (same ids). Between 5 and 6: the restored state already
holds the replayed steps, so they are skipped, and their outputs were acknowledged at step 4.
A checkpoint that stops early commits nothing; the next one covers what it left (the sink
keeps unacknowledged records; step 3's records wait, older first, ahead of the next ones).

Exactly-once (``exactly_once``): steps 1, 2 and 3 as above, every record going to the open
transaction of the input partition it came from (there is no separate flush: a transaction's
commit acknowledges all of it); then, still under the call lock,

5. commit each owned partition's transaction with its offset of step 1
   (``TransactionalSink.commit``: acknowledged, offset added, committed, next one begun);
6. a partition whose commit failed is aborted and recovered (``Rebalancer.recover``): its
   streams are dropped and restored from the committed changelog, its input re-read from the
   committed offset — the state and outputs of the aborted transaction never happened.

Model calls wait for step 5 (the outputs they would hand over belong to the next transaction).

A hot reload's checkpoint (``boundary``, either guarantee) holds the call lock to its end and
then takes one more step:

7. swap the model, still under the call lock, and only if every owned partition committed:
   each step the old bundle applied is then committed (its outputs acknowledged, its state in
   the changelog, its input offset past), and the new bundle applies every later one. A crash
   never replays an old step on the new bundle (same ids, other values), and a transaction
   never holds two bundles' outputs. A checkpoint that stops early swaps nothing; the reload
   tries again with the next.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from ..config import ServeConfig
from ..metrics import Metrics
from ..pipeline import Pipeline
from .budgets import FINAL_CHECKPOINT_S
from .clients import Clients
from .housekeeping import Readiness
from .publish import Publisher

log = logging.getLogger("rnnd.daemon")


class Locks:
    """The daemon's two locks.

    LOCK ORDER: ``commit`` before ``call``, never the reverse. A checkpoint takes ``commit``
    and then ``call``; the infer loop and the rebalancer's revoke/restore take ``call`` alone
    and never ask for ``commit`` while they hold it. Taking ``commit`` while holding ``call``
    would deadlock against a checkpoint that holds ``commit`` and waits for ``call``.

    * ``call``: held from ``plan()`` to the outputs' hand-over to the sink (the infer loop),
      and around anything that changes streams besides a model call (revoke, restore). A
      checkpoint holds it from its snapshot to its changelog records (a revocation's and the
      final one through the outputs' flush; with exactly-once, to its commit), so no step is
      applied in between and no partition's streams are dropped under a running model call.
    * ``commit``: one checkpoint at a time (the periodic one, a revocation's, the final one),
      so their commits never interleave and an older commit point never follows a newer one.
    """

    def __init__(self) -> None:
        self.commit = asyncio.Lock()
        self.call = asyncio.Lock()


class Recovery(Protocol):
    """What the checkpointer hands the partitions whose transaction failed: the ``Rebalancer``."""

    def drop(self, partitions: set[int]) -> None:
        """Under the call lock: the partitions' streams, queued steps and transactions go at once."""

    async def recover(self, failed: dict[int, BaseException]) -> None:
        """Outside the locks: each partition back from its last commit (or left to its new owner)."""


class Checkpointer:
    def __init__(self, cfg: ServeConfig, pipeline: Pipeline, metrics: Metrics, clients: Clients, locks: Locks,
                 publisher: Publisher, readiness: Readiness, assigned: set[TopicPartition],
                 changelog_topic: str) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.metrics = metrics
        self.clients = clients
        self.locks = locks
        self.publisher = publisher
        self.readiness = readiness
        self.assigned = assigned  # shared with the rebalancer, which keeps it current
        self.changelog_topic = changelog_topic
        self.recovery: Recovery | None = None  # exactly-once: the rebalancer, handed over by the daemon
        # At-least-once: changelog records taken at a snapshot whose outputs' flush failed (step 4)
        self._unsent: list[tuple[int, bytes, bytes | None]] = []

    async def run(self) -> None:
        """Every ``commit_interval_s``; a checkpoint that fails is simply retried by the next."""
        while True:
            await asyncio.sleep(self.cfg.commit_interval_s)
            try:
                await self.checkpoint()
            except (KafkaError, OSError) as e:  # the broker went away mid-checkpoint: the next one retries
                self.readiness.failed("checkpoint")
                log.warning("checkpoint failed (%s: %s); will retry", type(e).__name__, e)

    async def checkpoint(self, partitions: set[int] | None = None, final: bool = False,
                         boundary: Callable[[], object] | None = None) -> bool:
        """The steps of the module docstring; True when every owned partition's offsets were committed.

        ``partitions``: commit only these (a revocation's). ``final``: the shutdown's checkpoint,
        which gives an unacknowledging broker ``FINAL_CHECKPOINT_S`` and then gives up (the
        inputs are re-read by the next owner). ``boundary``: step 7, run once the commit worked.
        """
        consumer, sink = self.clients.consumer, self.clients.sink
        if consumer is None or sink is None:
            return False
        if self.cfg.exactly_once:
            if not final:
                return await self._transactional(partitions, final, boundary)
            try:  # the same patience as below: a commit the broker does not answer must not hold the exit
                return await asyncio.wait_for(self._transactional(partitions, final, None), FINAL_CHECKPOINT_S)
            except TimeoutError:
                log.warning("the final transactions were not committed within %.0fs: left open, the broker "
                            "aborts them; their inputs are read again by the partitions' next owner",
                            FINAL_CHECKPOINT_S)
            return False
        give_up = time.monotonic() + FINAL_CHECKPOINT_S

        def stopping() -> bool:
            return final and time.monotonic() > give_up

        pipeline = self.pipeline
        # The call lock: through step 4 for a revocation's and the final checkpoint, through step 7
        # for a boundary (module docstring).
        hold = partitions is not None or final or boundary is not None
        async with self.locks.commit:  # LOCK ORDER: commit, then call (see Locks)
            call = self.locks.call
            await call.acquire()  # no step is applied while the snapshot is taken
            held = True
            try:
                records: list[tuple[int, bytes, bytes | None]] = []
                try:
                    points = pipeline.offsets.commit_points()  # 1. snapshot the commit points
                    await self.publisher.send_side_outputs()  # 2. side outputs
                    taken = pipeline.changelog_records() if self.cfg.changelog else []  # 3. changelog records
                    records, self._unsent = self._unsent + taken, []
                    if not hold:
                        call.release()  # model calls go on: what they apply belongs to the next checkpoint
                        held = False
                    flushed = await sink.flush(stopping)  # 4. flush the outputs
                except BaseException:
                    self._unsent = records + self._unsent  # not lost: sent ahead of the next checkpoint's own
                    raise
                if held and boundary is None:
                    call.release()
                    held = False
                if not flushed:
                    self._unsent = records + self._unsent
                    return False
                await sink.send_many(self.changelog_topic, [(k, v) for _, k, v in records],  # 5. the changelog
                                     partitions=[p for p, _, _ in records])
                if records:
                    self.metrics.changelog_records.inc(len(records))
                    if not await sink.flush(stopping):  # 5. ... flushed
                        return False
                if partitions is not None:
                    points = {p: o for p, o in points.items() if p in partitions}
                owned = {tp.partition for tp in self.assigned}
                offsets = {TopicPartition(self.cfg.input_topic, p): OffsetAndMetadata(o, "")
                           for p, o in points.items() if p in owned}
                if offsets:
                    try:  # 6. commit the input offsets
                        await consumer.commit(offsets)
                    except KafkaError as e:
                        self.readiness.failed("commit")
                        log.warning("commit failed (%s: %s); will retry", type(e).__name__, e)
                        return False
                    pipeline.offsets.mark_committed(points)
                    self.metrics.commits.inc()
                    self.readiness.kafka_ok = True
                if boundary is not None:
                    boundary()  # 7. every step applied so far is committed, and none is applied until we release
                return True
            finally:
                if held:
                    call.release()

    async def _transactional(self, partitions: set[int] | None, final: bool,
                             boundary: Callable[[], object] | None) -> bool:
        """The exactly-once checkpoint (module docstring): one transaction per owned partition."""
        sink = self.clients.sink
        pipeline = self.pipeline
        # LOCK ORDER: commit, then call (see Locks); call is held to the commit: the next outputs
        # belong to the next transaction.
        async with self.locks.commit, self.locks.call:
            started = time.perf_counter()
            points = pipeline.offsets.commit_points()  # 1. snapshot the commit points
            await self.publisher.send_side_outputs()  # 2. side outputs, into their partitions' transactions
            records = pipeline.changelog_records()  # 3. changelog records
            await sink.send_many(self.changelog_topic, [(k, v) for _, k, v in records],
                                 partitions=[p for p, _, _ in records], sources=[p for p, _, _ in records])
            owned = {tp.partition for tp in self.assigned}
            if partitions is not None:
                owned &= partitions
            offsets = {p: o for p, o in points.items() if p in owned}
            done, failed = await sink.commit(offsets, only=owned)  # 5. commit, per partition
            pipeline.offsets.mark_committed({p: o for p, o in offsets.items() if p in done})
            if failed and self.recovery is not None and not final:
                self.recovery.drop(set(failed))  # 6. (a) nothing of the aborted transaction stays
            self.metrics.transaction_seconds.observe(time.perf_counter() - started)
            self.metrics.transactions.labels("committed").inc(len(done))
            if records:
                self.metrics.changelog_records.inc(len(records))
            if done:
                self.metrics.commits.inc()
                self.readiness.kafka_ok = True
            if boundary is not None and not failed:
                boundary()  # 7. every step applied so far is committed, and none is applied until we release
        if failed:  # 6. (b) abort and recover, outside the locks (recovery takes the call lock itself)
            self.metrics.transactions.labels("aborted").inc(len(failed))
            self.readiness.failed("commit")
            for p, e in sorted(failed.items()):
                log.warning("transaction of input partition %d failed (%s: %s): aborted; its state and input "
                            "resume from the last commit", p, type(e).__name__, e)
            if final or self.recovery is None:
                for p in failed:
                    await sink.close(p)
            else:
                await self.recovery.recover(failed)
        return not failed
