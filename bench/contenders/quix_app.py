"""A Quix Streams application doing the daemon's job, one message at a time.

``--state store``: each key's hidden state lives in Quix's state store (RocksDB, backed by a
changelog topic: Quix's durable keyed state, the feature one would pick Quix for); the numpy
arrays are serialised as base64 of their raw bytes, because the store's serialiser is JSON.
``--state dict``: the same application with the state in a plain Python dict (no durability),
which separates the cost of the state store from the cost of the framework.

One ``session.run`` per message, like the naive ONNX consumer: Quix calls user code per
message, so there is nothing to batch across keys. Outputs go through Quix's own JSON
serialiser (orjson) to the output topic, keyed like the input.

The input topic must have been created with an explicit ``retention.ms``: Quix derives its
changelog topic's settings from it, and Tansu reports only configs that were set explicitly.
"""

from __future__ import annotations

import argparse
import base64
import logging
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench import common


def run(args: argparse.Namespace) -> common.Report:
    import onnxruntime as ort
    from quixstreams import Application, message_context

    report = common.Report(f"quix-{args.state}")
    info = common.ModelInfo.load(args.model)
    spec = info.spec
    session = ort.InferenceSession(str(args.model), sess_options=common.session_options(),
                                   providers=["CPUExecutionProvider"])
    state_in = [s.input_name for s in spec.states]
    outputs = [spec.y_name] + [s.output_name for s in spec.states]
    initial = [np.expand_dims(s.initial(), s.batch_axis).astype(s.dtype) for s in spec.states]
    shapes = [a.shape for a in initial]
    dtypes = [a.dtype for a in initial]
    sizes = [a.nbytes for a in initial]
    plain: dict[bytes, tuple[list[np.ndarray], int]] = {}

    class App(Application):
        """Records when the partitions arrive: the measurement starts there, as for the others."""

        def _on_assign(self, consumer: Any, topic_partitions: list) -> None:  # type: ignore[override]
            super()._on_assign(consumer, topic_partitions)
            if topic_partitions and not report.assigned_ms:
                report.mark_assigned(args.report)

    app = App(broker_address=args.bootstrap, consumer_group=args.group or f"bench-quix-{args.state}",
              auto_offset_reset="earliest", state_dir=args.state_dir or tempfile.mkdtemp(prefix="bench-quix-"),
              commit_interval=1.0, loglevel=args.loglevel, use_changelog_topics=args.state == "store",
              # The daemon's session timeout. With librdkafka's default (45 s) a group join on
              # Tansu takes ~23 s instead of ~5 s; outside the measurement, but 36 s of every run.
              consumer_extra_config={"session.timeout.ms": args.session_timeout_ms,
                                     "heartbeat.interval.ms": max(1000, args.session_timeout_ms // 3)})
    source = app.topic(args.input_topic, value_deserializer="json", key_deserializer="bytes")
    sink = app.topic(args.output_topic, value_serializer="json", key_serializer="bytes")
    sdf = app.dataframe(source)

    def step(value: dict, key: bytes, timestamp: int, state: list[np.ndarray],
             first: int) -> tuple[list[dict], list[np.ndarray]]:
        ctx = message_context()
        rows = value["x"] if info.numeric else value["tokens"]
        rows = rows if (not info.numeric or isinstance(rows[0], list)) else [rows]
        x = info.model_input(rows)[None]
        feed = {spec.x_name: x}
        feed.update(zip(state_in, state, strict=True))
        y, *new = session.run(outputs, feed)
        now = common.now_ms()
        docs = [common.output_doc(args.input_topic, key, ctx.partition, ctx.offset, timestamp, j,
                                  first + j, pred, info, now) for j, pred in enumerate(info.predictions(y[0]))]
        report.messages += 1
        report.outputs += len(docs)
        if report.outputs >= args.expect:
            report.last_send_ms = now
            app.stop()
        return docs, new

    def with_store(value: dict, key: bytes, timestamp: int, headers: Any, state: Any) -> list[dict]:
        saved = state.get("s")
        if saved is None:
            arrays, first = initial, 0
        else:
            raw = base64.b64decode(saved["b"])
            arrays, offset = [], 0
            for shape, dtype, size in zip(shapes, dtypes, sizes, strict=True):
                arrays.append(np.frombuffer(raw, dtype=dtype, count=size // dtype.itemsize,
                                            offset=offset).reshape(shape))
                offset += size
            first = saved["n"]
        docs, new = step(value, key, timestamp, arrays, first)
        state.set("s", {"b": base64.b64encode(b"".join(a.tobytes() for a in new)).decode(), "n": first + len(docs)})
        return docs

    def with_dict(value: dict, key: bytes, timestamp: int, headers: Any) -> list[dict]:
        arrays, first = plain.get(key, (initial, 0))
        docs, new = step(value, key, timestamp, arrays, first)
        plain[key] = (new, first + len(docs))
        return docs

    if args.state == "store":
        sdf = sdf.apply(with_store, stateful=True, metadata=True, expand=True)
    else:
        sdf = sdf.apply(with_dict, metadata=True, expand=True)
    # Quix stamps outputs with the input's timestamp; stamp them with the time they are made, as
    # every other contender's producer does, so that one rule measures all of them.
    sdf = sdf.set_timestamp(lambda value, key, timestamp, headers: common.now_ms())
    sdf.to_topic(sink)
    app.run()
    report.done_ms = common.now_ms()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = common.base_parser(__doc__ or "")
    p.add_argument("--state", choices=("store", "dict"), default="store")
    p.add_argument("--state-dir", default="")
    p.add_argument("--session-timeout-ms", type=int, default=10_000, help="consumer group session timeout "
                   "(the daemon's default; Tansu's join pause is about half of it)")
    p.add_argument("--loglevel", default="WARNING", help="Quix's log level (DEBUG shows its start-up steps)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = run(args)
    report.write(args.report)
    return 0 if report.outputs >= args.expect else 1


if __name__ == "__main__":
    sys.exit(main())
