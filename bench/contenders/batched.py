"""The simple batched consumer: the bar the daemon's design must clear.

Rounds: every key with a pending message contributes its next message, the round's messages
(grouped by length T) run as one ``session.run``, each key's state gathered from and scattered
back to its slot of one preallocated array per state tensor. Fetching and model calls take
turns on one thread. About 50 lines of logic, with no validation, backpressure, eviction,
metrics or delivery guarantees: what a competent user would write in an afternoon.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict, deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from bench import common


def setup(args: argparse.Namespace) -> tuple[common.Handler, common.Idle]:
    info = common.ModelInfo.load(args.model)
    spec = info.spec
    session = ort.InferenceSession(str(args.model), sess_options=common.session_options(),
                                   providers=["CPUExecutionProvider"])
    names_in = [s.input_name for s in spec.states]
    outputs = [spec.y_name] + [s.output_name for s in spec.states]
    axes = [s.batch_axis for s in spec.states]
    # np.zeros maps pages lazily: memory follows the slots in use.
    arena = [np.zeros(s.graph_shape(args.max_keys), dtype=s.dtype) for s in spec.states]
    slots: dict[bytes, int] = {}
    steps = np.zeros(args.max_keys, dtype=np.int64)
    queues: dict[int, deque[tuple[int, Any, np.ndarray]]] = {}

    async def handle(ctx: common.Ctx, records: list[tuple[int, Any]]) -> None:
        for partition, r in records:
            x = info.model_input(common.decode(r.value, ctx.loads, info))
            slot = slots.get(r.key)
            if slot is None:
                slot = slots[r.key] = len(slots)
                for a, ax, s in zip(arena, axes, spec.states, strict=True):
                    a[(slice(None),) * ax + (slot,)] = s.initial()
            queues.setdefault(slot, deque()).append((partition, r, x))

    async def round_(ctx: common.Ctx) -> bool:
        by_t: dict[int, list[tuple[int, tuple[int, Any, np.ndarray]]]] = defaultdict(list)
        for slot in list(queues):
            item = queues[slot].popleft()
            if not queues[slot]:
                del queues[slot]
            by_t[item[2].shape[0]].append((slot, item))
        for t, group in by_t.items():
            sl = np.fromiter((s for s, _ in group), dtype=np.int64, count=len(group))
            feed = {spec.x_name: np.stack([it[2] for _, it in group])}
            feed.update((n, np.take(a, sl, axis=ax)) for n, a, ax in zip(names_in, arena, axes, strict=True))
            y, *new = session.run(outputs, feed)
            for a, ax, v in zip(arena, axes, new, strict=True):
                a[(slice(None),) * ax + (sl,)] = v
            preds = info.predictions(y)
            now = common.now_ms()
            for i, (slot, (partition, r, _)) in enumerate(group):
                first = int(steps[slot])
                for j in range(t):
                    doc = common.output_doc(ctx.input_topic, r.key, partition, r.offset, r.timestamp, j, first + j,
                                            preds[i * t + j], info, now)
                    await ctx.emit(r.key, doc)
            steps[sl] += t
        return bool(queues)

    return handle, round_


def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-keys", type=int, default=1_000_000, help="state slots (allocated lazily)")


def main(argv: Sequence[str] | None = None) -> int:
    return common.main(argv, "batched", __doc__ or "", setup, extra)


if __name__ == "__main__":
    sys.exit(main())
