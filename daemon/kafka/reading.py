"""Reading partitions from their beginning to their end, for the changelog restore and ``rnnd verify``.

Both need "everything there is now", then to stop: a restore that stops early loses state,
one that never stops never serves. The end is where the brokers say it is as a fetch
reports it (:func:`~rnnd.daemon.kafka.quirks.fetched_end`), so this is right on Tansu as on
Apache Kafka.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from .quirks import fetched_end


async def read_to_end(consumer: Any, tps: Sequence[Any], on_batch: Callable[[Any, list], None], idle_s: float = 2.0,
                      max_records: int = 20_000, start: int | None = None, end: int | None = None) -> None:
    """Assign ``tps`` to ``consumer`` and read them from their beginning (or offset ``start``, the
    beginning where that is later) to their current end, or to offset ``end`` (exclusive) where that
    comes first: a partition is left as soon as its position passes it, not read on to its end.

    ``on_batch(tp, records)`` is called for each non-empty fetch of a partition, in offset
    order. A partition that reports no watermark for ``idle_s`` is taken as empty.
    """
    consumer.assign(list(tps))
    await consumer.seek_to_beginning(*tps)
    if start:
        for tp, first in (await consumer.beginning_offsets(list(tps))).items():
            consumer.seek(tp, max(first, start))
    started = time.monotonic()
    pending = set(tps)
    while pending:
        batch = await consumer.getmany(*pending, timeout_ms=200, max_records=max_records)
        for tp, recs in batch.items():
            if end is not None and recs and recs[-1].offset >= end:
                recs = [r for r in recs if r.offset < end]
            if recs:
                on_batch(tp, recs)
        for tp in list(pending):
            if end is not None and await consumer.position(tp) >= end:
                pending.discard(tp)
                continue
            high = fetched_end(consumer, tp)
            at_end = high is not None and await consumer.position(tp) >= high
            silent = high is None and time.monotonic() - started > idle_s
            if at_end or silent:
                pending.discard(tp)
