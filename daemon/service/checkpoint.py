"""Checkpoints: what makes a crash repeat outputs but never lose one, and the two locks they hold.

A checkpoint runs every ``commit_interval_s`` (``Checkpointer.run``), for the revoked
partitions on a revocation, and once more on shutdown (``final``). It holds the commit lock
throughout and the call lock for steps 1-4 (no model call runs then). Its steps, in order:

1. side outputs: the dead letters decoded since the last round go to the sink;
2. snapshot the commit points (per partition, the first input not yet fully applied);
3. flush the outputs: every prediction and dead letter handed to the sink so far is
   acknowledged (failures are resent) — stop here if not;
4. changelog records: every stream changed since the last checkpoint (tombstones first) goes
   to the sink; no step was applied since step 2, so this state is exactly that of the snapshot;
5. flush the changelog: those records are acknowledged — stop here if not;
6. commit the input offsets of step 2, for the partitions this daemon still owns.

A crash between 3 and 5 replays inputs onto the previous changelog state: the same outputs
again (same ids). Between 5 and 6: the restored state already holds the replayed steps, so
they are skipped, and their outputs were acknowledged at step 3. A checkpoint that stops
early commits nothing; the next one covers what it left (the sink keeps unacknowledged
records, the changelog's streams stay changed until taken).
"""

from __future__ import annotations

import asyncio
import logging
import time

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
      checkpoint holds it from its snapshot to its changelog records, so no step is applied
      in between and no partition's streams are dropped under a running model call.
    * ``commit``: one checkpoint at a time (the periodic one, a revocation's, the final one),
      so their commits never interleave and an older commit point never follows a newer one.
    """

    def __init__(self) -> None:
        self.commit = asyncio.Lock()
        self.call = asyncio.Lock()


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

    async def run(self) -> None:
        """Every ``commit_interval_s``; a checkpoint that fails is simply retried by the next."""
        while True:
            await asyncio.sleep(self.cfg.commit_interval_s)
            try:
                await self.checkpoint()
            except (KafkaError, OSError) as e:  # the broker went away mid-checkpoint: the next one retries
                self.readiness.failed("checkpoint")
                log.warning("checkpoint failed (%s: %s); will retry", type(e).__name__, e)

    async def checkpoint(self, partitions: set[int] | None = None, final: bool = False) -> None:
        """Steps 1-6 of the module docstring. ``partitions``: commit only these (a revocation's).

        ``final``: the shutdown's checkpoint, which gives an unacknowledging broker
        ``FINAL_CHECKPOINT_S`` and then gives up (the inputs are re-read by the next owner).
        """
        consumer, sink = self.clients.consumer, self.clients.sink
        if consumer is None or sink is None:
            return
        give_up = time.monotonic() + FINAL_CHECKPOINT_S

        def stopping() -> bool:
            return final and time.monotonic() > give_up

        pipeline = self.pipeline
        async with self.locks.commit:  # LOCK ORDER: commit, then call (see Locks)
            async with self.locks.call:  # no step is applied while the snapshot is taken
                await self.publisher.send_side_outputs()  # 1. side outputs
                points = pipeline.offsets.commit_points()  # 2. snapshot the commit points
                if not await sink.flush(stopping):  # 3. flush the outputs
                    return
                records = pipeline.changelog_records() if self.cfg.changelog else []  # 4. changelog records
                await sink.send_many(self.changelog_topic, [(k, v) for _, k, v in records],
                                     partitions=[p for p, _, _ in records])
            # Steps 5 and 6 need no snapshot: model calls may run meanwhile.
            if records:
                self.metrics.changelog_records.inc(len(records))
                if not await sink.flush(stopping):  # 5. flush the changelog
                    return
            if partitions is not None:
                points = {p: o for p, o in points.items() if p in partitions}
            owned = {tp.partition for tp in self.assigned}
            offsets = {TopicPartition(self.cfg.input_topic, p): OffsetAndMetadata(o, "")
                       for p, o in points.items() if p in owned}
            if not offsets:
                return
            try:  # 6. commit the input offsets
                await consumer.commit(offsets)
                pipeline.offsets.mark_committed(points)
                self.metrics.commits.inc()
                self.readiness.kafka_ok = True
            except KafkaError as e:
                self.readiness.failed("commit")
                log.warning("commit failed (%s: %s); will retry", type(e).__name__, e)
