"""Naive PyTorch consumer: the naive ONNX consumer with the PyTorch model in eager mode.

The model is rebuilt from its checkpoint with the exporter's own loader (the factory and
arguments the checkpoint names), one thread (``torch.set_num_threads(1)``: on a shared 2-core
machine more threads only contend), ``inference_mode``. One forward call per message.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common


def load_model(checkpoint: Path) -> Any:
    """The checkpoint's module with its weights: the same path ``rnnd export`` takes."""
    from rnnd.export import loader

    ckpt = loader.load_checkpoint(checkpoint)
    meta = ckpt.meta
    model = loader.build_model(meta.get("factory", "rnnd.export.zoo:build"), dict(meta.get("kwargs", {})))
    loader.load_weights(model, ckpt, checkpoint)
    return model.eval()


def setup(args: argparse.Namespace) -> tuple[common.Handler, None]:
    import torch

    torch.set_num_threads(1)
    info = common.ModelInfo.load(args.model)
    model = load_model(Path(args.checkpoint))
    initial = [torch.from_numpy(s.initial()).unsqueeze(s.batch_axis).contiguous() for s in info.spec.states]
    states: dict[bytes, tuple] = {}
    steps: dict[bytes, int] = {}

    async def handle(ctx: common.Ctx, records: list[tuple[int, Any]]) -> None:
        topic = ctx.input_topic
        for partition, r in records:
            x = torch.from_numpy(info.model_input(common.decode(r.value, ctx.loads, info))).unsqueeze(0)
            with torch.inference_mode():
                y, *new = model(x, *states.get(r.key, initial))
            states[r.key] = tuple(new)
            first = steps.get(r.key, 0)
            steps[r.key] = first + x.shape[1]
            now = common.now_ms()
            for j, pred in enumerate(info.predictions(y[0].numpy())):
                doc = common.output_doc(topic, r.key, partition, r.offset, r.timestamp, j, first + j, pred, info,
                                        now)
                await ctx.emit(r.key, doc)

    return handle, None


def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="the PyTorch checkpoint (rnnd train / the bench's export)")


def main(argv: Sequence[str] | None = None) -> int:
    return common.main(argv, "naive-torch", __doc__ or "", setup, extra)


if __name__ == "__main__":
    sys.exit(main())
