"""I/O ceiling: consume, decode, build the daemon's output document, encode, produce — no model.

What the daemon could at best reach with this client and this codec: every byte the daemon
reads and writes is read and written here too, with the per-step output documents of the same
shape (the prediction echoes the inputs). Run with ``--codec json`` (stdlib) and
``--codec orjson`` (the fastest codec available; the daemon's).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from bench import common


def setup(args: argparse.Namespace) -> tuple[common.Handler, None]:
    steps: dict[bytes, int] = {}

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
    return common.main(argv, "passthrough", __doc__ or "", setup)


if __name__ == "__main__":
    sys.exit(main())
