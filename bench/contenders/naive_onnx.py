"""Naive ONNX consumer: what users write today.

A dict of per-key numpy states and one ``session.run`` per message (a message's steps run as
one ``T``-step call, so a 32-token text message is one call, not 32). Same session options,
normalisation and output documents as the daemon; what it lacks is batching across streams.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from bench import common


def setup(args: argparse.Namespace) -> tuple[common.Handler, None]:
    info = common.ModelInfo.load(args.model)
    spec = info.spec
    session = ort.InferenceSession(str(args.model), sess_options=common.session_options(),
                                   providers=["CPUExecutionProvider"])
    state_in = [s.input_name for s in spec.states]
    outputs = [spec.y_name] + [s.output_name for s in spec.states]
    initial = [np.expand_dims(s.initial(), s.batch_axis).astype(s.dtype) for s in spec.states]
    states: dict[bytes, list[np.ndarray]] = {}
    steps: dict[bytes, int] = {}

    async def handle(ctx: common.Ctx, records: list[tuple[int, Any]]) -> None:
        topic = ctx.input_topic
        for partition, r in records:
            x = info.model_input(common.decode(r.value, ctx.loads, info))[None]  # [1, T, ...]
            feed = {spec.x_name: x}
            feed.update(zip(state_in, states.get(r.key, initial), strict=True))
            y, *new = session.run(outputs, feed)
            states[r.key] = new
            first = steps.get(r.key, 0)
            steps[r.key] = first + x.shape[1]
            now = common.now_ms()
            for j, pred in enumerate(info.predictions(y[0])):
                doc = common.output_doc(topic, r.key, partition, r.offset, r.timestamp, j, first + j, pred, info,
                                        now)
                await ctx.emit(r.key, doc)

    return handle, None


def main(argv: Sequence[str] | None = None) -> int:
    return common.main(argv, "naive-onnx", __doc__ or "", setup)


if __name__ == "__main__":
    sys.exit(main())
