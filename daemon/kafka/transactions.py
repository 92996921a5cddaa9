"""Exactly-once outputs: one Kafka transaction per input partition per checkpoint.

With ``processing_guarantee=exactly_once`` everything a checkpoint makes durable for input
partition p — its predictions, its dead letters, its streams' changelog records and its
input offset — is written by p's own transactional producer and committed at once
(``send_offsets_to_transaction`` + ``commit_transaction``). A ``read_committed`` reader then
sees each prediction exactly once; a crash or a failed commit aborts the open transaction,
and the partition resumes from its last committed state and offset (``Rebalancer.recover``).

Why a producer per input partition (``transactional.id = <group>.<input topic>.<p>``,
:func:`transactional_id`) and not one per replica: fencing a zombie — a replica that lost a
partition in a rebalance, or was thought dead, and still tries to commit it — needs the
broker to see that two producers do the same job. Kafka offers two ways. (a) The same
transactional id: the new producer's InitProducerId bumps the id's epoch, aborts whatever
the old one left open and fences it (Kafka Streams' original ``exactly_once``). (b) One
producer per process that passes the consumer group's generation and member id with each
offset commit (KIP-447, ``exactly_once_v2``). aiokafka 0.14 sends TxnOffsetCommit with the
group id only, no generation, so (b) would let a zombie commit offsets of a partition it no
longer owns. rnnd uses (a): the new owner starts the partition's producer *before* it
restores the partition's state, which fences the previous owner and aborts its open
transaction, so the restore reads only committed state. The price is one producer (its own
connections) per assigned input partition, and one commit per partition per checkpoint —
run concurrently, so a checkpoint costs about one commit's round trips.

Inside a transaction a failed send cannot be sent again (the transaction is then doomed),
so :meth:`TransactionalSink.commit` flushes without resending and reports the partition as
failed instead; at-least-once's ``Sink`` resends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import InvalidProducerEpoch, KafkaError, ProducerFenced

from .quirks import forget_failure, in_transaction
from .sink import Headers, Sink

__all__ = ["TransactionalSink", "transactional_id"]

log = logging.getLogger("rnnd.kafka")

#: A transaction left open by a replica that died stays open this long unless the partition's
#: next owner aborts it first (it does, at once, when it starts the partition's producer).
#: Until then read_committed readers of the outputs wait at it. Long enough for a checkpoint
#: on a slow broker (the checkpoint flushes for up to 30 s), short enough that a whole
#: deployment's crash holds readers up for well under a minute.
TRANSACTION_TIMEOUT_MS = 45_000

#: An abort or a producer stop that the broker does not answer: given up after this long
#: (the partition's next producer aborts the transaction anyway when it starts).
ABORT_S = 10.0


def transactional_id(group_id: str, input_topic: str, partition: int) -> str:
    """The transactional id of one input partition's producer: the same on every replica, so each fences the last."""
    return f"{group_id}.{input_topic}.{partition}"


class _Partition:
    """One input partition's transactional producer, the sink over it, and whether its transaction holds anything."""

    __slots__ = ("dirty", "partition", "producer", "sink")

    def __init__(self, partition: int, producer: Any, sink: Sink) -> None:
        self.partition = partition
        self.producer = producer
        self.sink = sink
        self.dirty = False


class TransactionalSink:
    """The exactly-once counterpart of :class:`Sink`: records go to the transaction of the partition they came from.

    ``make_producer(partition)`` returns a transactional producer (not started) for that
    input partition; ``make_sink(producer)`` the batching :class:`Sink` over it.
    """

    def __init__(self, make_producer: Callable[[int], Any], make_sink: Callable[[Any], Sink], group_id: str,
                 input_topic: str) -> None:
        self.make_producer = make_producer
        self.make_sink = make_sink
        self.group_id = group_id
        self.input_topic = input_topic
        self._open: dict[int, _Partition] = {}
        self._detached: list[_Partition] = []  # failed transactions, still to abort and stop (:meth:`close`)
        self.dropped = 0  # records of a partition with no open transaction (being recovered): re-made by the replay

    @property
    def partitions(self) -> set[int]:
        return set(self._open)

    async def open(self, partition: int) -> None:
        """Start the partition's producer and its first transaction.

        Starting it fences every earlier producer of the partition (another replica's, or this
        one's before a crash) and aborts the transaction that producer left open.
        """
        if partition in self._open:
            return
        producer = self.make_producer(partition)
        try:
            await producer.start()
            await producer.begin_transaction()
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), ABORT_S)
            raise
        self._open[partition] = _Partition(partition, producer, self.make_sink(producer))

    async def close(self, partition: int) -> None:
        """Abort the partition's open transaction (if the broker answers) and stop its producer."""
        parts = [part for part in self._detached if part.partition == partition]
        self._detached = [part for part in self._detached if part.partition != partition]
        if partition in self._open:
            parts.append(self._open.pop(partition))
        for part in parts:
            with contextlib.suppress(Exception, TimeoutError):
                if in_transaction(part.producer):
                    await asyncio.wait_for(part.producer.abort_transaction(), ABORT_S)
            with contextlib.suppress(Exception, TimeoutError):
                await asyncio.wait_for(part.producer.stop(), ABORT_S)
            forget_failure(part.producer)

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(p) for p in {*self._open, *(d.partition for d in self._detached)}))

    async def send_many(self, topic: str, items: Sequence[tuple], partitions: Sequence[int] | None = None,
                        headers: Sequence[Headers] | None = None, sources: Sequence[int] | None = None) -> None:
        """Hand ``items`` to the transactions of their input partitions (``sources``, one per item).

        Without ``sources`` the items are the pipeline's ``Output`` tuples, whose fourth field is
        the input partition. ``partitions``/``headers`` as for :meth:`Sink.send_many`.
        """
        if not items:
            return
        src = sources if sources is not None else [item[3] for item in items]
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(src):
            groups.setdefault(s, []).append(i)
        for s, idx in groups.items():
            part = self._open.get(s)
            if part is None:
                self.dropped += len(idx)
                continue
            part.dirty = True
            whole = len(idx) == len(items)
            await part.sink.send_many(
                topic, items if whole else [items[i] for i in idx],
                None if partitions is None else (partitions if whole else [partitions[i] for i in idx]),
                None if headers is None else (headers if whole else [headers[i] for i in idx]))

    async def commit(self, offsets: dict[int, int],
                     only: set[int] | None = None) -> tuple[set[int], dict[int, BaseException]]:
        """Commit the open transactions (``only`` these partitions, if given) with their input ``offsets``.

        Each partition: (1) every record handed over is acknowledged — no resend, a failed one
        dooms the transaction; (2) its offset joins the transaction; (3) commit; (4) the next
        transaction begins. Partitions run concurrently; one with nothing to commit is skipped.
        Returns the partitions committed, and those that failed with why; a failed one's
        transaction is left for the caller to abort (:meth:`close`).
        """
        todo = [part for p, part in self._open.items()
                if (only is None or p in only) and (part.dirty or p in offsets)]
        results = await asyncio.gather(*(self._commit_one(part, offsets.get(part.partition)) for part in todo),
                                       return_exceptions=True)
        failed = {part.partition: r for part, r in zip(todo, results, strict=True) if isinstance(r, BaseException)}
        return {part.partition for part in todo} - set(failed), failed

    def detach(self, partition: int) -> None:
        """Stop routing records to the partition's transaction (it failed): they are dropped until it reopens."""
        part = self._open.pop(partition, None)
        if part is not None:
            self._detached.append(part)

    async def _commit_one(self, part: _Partition, offset: int | None) -> None:
        if not await part.sink.flush(stopping=lambda: True):  # 1. acknowledged, or the transaction is lost
            # The broker's reason, not a summary: ProducerFenced here means a newer owner (see fenced()).
            raise part.sink.last_error or KafkaError(f"records of input partition {part.partition} not acknowledged")
        producer = part.producer
        if offset is not None:  # 2. the input offset, in the same transaction
            await producer.send_offsets_to_transaction({TopicPartition(self.input_topic, part.partition): offset},
                                                       self.group_id)
        await producer.commit_transaction()  # 3.
        part.dirty = False
        await producer.begin_transaction()  # 4.

    @staticmethod
    def fenced(error: BaseException) -> bool:
        """Whether ``error`` says another producer took the partition's transactional id (a newer owner)."""
        return isinstance(error, ProducerFenced | InvalidProducerEpoch)

    @property
    def unacknowledged(self) -> int:
        return sum(part.sink.unacknowledged for part in self._open.values())
