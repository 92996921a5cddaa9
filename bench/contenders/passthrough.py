"""I/O ceiling: consume, decode, build the daemon's output document, encode, produce — no model.

What the daemon could at best reach with this client and this codec: every byte the daemon
reads and writes is read and written here too, with the per-step output documents of the same
shape (the prediction echoes the inputs). Run with ``--codec json`` (stdlib) and
``--codec orjson`` (the fastest codec available; the daemon's).

``--output minimal`` writes what a user's own no-model consumer would: ``{"key", "partition",
"offset", "y"}`` per step instead of the daemon's full document — the stricter yardstick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from bench import common


def setup(args: argparse.Namespace) -> tuple[common.Handler, None]:
    steps: dict[bytes, int] = {}

    if args.output == "minimal":
        async def minimal(ctx: common.Ctx, records: list[tuple[int, Any]]) -> None:
            info = ctx.info
            for partition, r in records:
                rows = common.decode(r.value, ctx.loads, info)
                key = r.key.decode(errors="replace")
                for j, pred in enumerate(info.echo_prediction(rows)):
                    await ctx.emit(r.key, {"key": key, "partition": partition, "offset": r.offset, "j": j, "y": pred})

        return minimal, None

    async def handle(ctx: common.Ctx, records: list[tuple[int, Any]]) -> None:
        info, topic = ctx.info, ctx.input_topic
        for partition, r in records:
            rows = common.decode(r.value, ctx.loads, info)
            first = steps.get(r.key, 0)
            steps[r.key] = first + len(rows)
            now = common.now_ms()
            for j, pred in enumerate(info.echo_prediction(rows)):
                doc = common.output_doc(topic, r.key, partition, r.offset, r.timestamp, j, first + j, pred, info,
                                        now)
                await ctx.emit(r.key, doc)

    return handle, None


def main(argv: Sequence[str] | None = None) -> int:
    return common.main(argv, "passthrough", __doc__ or "", setup,
                       lambda p: p.add_argument("--output", choices=("full", "minimal"), default="full"))


if __name__ == "__main__":
    sys.exit(main())
