"""`rnnd predict`: a CSV or JSONL file scored by the daemon's pipeline, predictions to a file, no Kafka.

For backfills and for checking a model on recorded data: the rows are read as ``rnnd
produce`` would send them (``tools.MessageSource``: the same columns, the same message
format), run through ``rnnd.daemon.local.Session`` (the pipeline ``rnnd serve`` runs, with
the same settings: ``--config`` takes serve's TOML file, and RNND_* variables apply), and
written as the output documents the daemon would produce, one JSON object per line.

With ``--partitions N`` and ``--topic NAME``, each row takes the partition Kafka's default
partitioner would give its key and the next offset there, so that every document, its id
included, equals the daemon's for a topic of N partitions filled from this file in order
(tests/test_local.py compares them). Rows are read and scored in chunks of ``CHUNK``
messages: a file of any size runs in bounded memory.

Exit codes as ``rnnd produce``'s: 2 for a file, a column or a setting to fix (one line on
stderr), 1 for a bundle that cannot be used; dead letters are not failures, they are counted
(and written with ``--dead-letters``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import orjson

from rnnd.daemon import config
from rnnd.daemon.errors import RnndError
from rnnd.daemon.kafka.sink import default_partition
from rnnd.daemon.local import DEFAULT_TOPIC, Session
from rnnd.tools import MessageSource, column_names, positive_int

#: Messages read before they are scored: large enough for full model calls (the daemon's rounds
#: take up to max_batch streams), small enough that memory does not grow with the file.
CHUNK = 20_000
#: Seconds between progress lines on stderr.
PROGRESS_EVERY_S = 2.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="score a CSV or JSONL file as the daemon would, predictions to a JSONL file",
        description="Run a bundle over a CSV or JSONL file with the daemon's own pipeline, and write the output "
        "documents it would produce (schemas/output.schema.json), one per line. Rows are read as `rnnd produce` "
        "reads them. Serving settings (emit, warmup, generate_tokens, beam_size, ...) come from --config (serve's "
        "TOML file) and RNND_* variables; the Kafka settings there do not apply.")
    p.add_argument("file", type=Path, help="the CSV or JSONL file")
    p.add_argument("--model", required=True, help="the bundle (.onnx)")
    p.add_argument("--key-column", required=True, help="column (CSV) or field (JSONL) holding the stream key")
    p.add_argument("--format", choices=("csv", "jsonl"), default=None,
                   help="file format (default: from the extension: .csv, .jsonl or .ndjson)")
    p.add_argument("--features", type=column_names, default=None, metavar="a,b,c",
                   help="CSV: the columns to send as features, in this order (default: every other column)")
    p.add_argument("--output", type=Path, default=None, help="where to write the predictions (default: stdout)")
    p.add_argument("--dead-letters", type=Path, default=None,
                   help="write the dead letters (schemas/dead-letter.schema.json) here; without it they are counted")
    p.add_argument("--topic", default=DEFAULT_TOPIC,
                   help=f"the input topic the documents name (default {DEFAULT_TOPIC})")
    p.add_argument("--partitions", type=positive_int, default=1,
                   help="place keys on N partitions as Kafka's default partitioner does (default 1): with the "
                        "input topic's count and --topic, every id equals the daemon's")
    p.add_argument("--config", default=None, help="TOML file of `rnnd serve` settings (its [serve] table)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        return predict(args)
    except RnndError as e:
        if args.debug:
            raise
        print(f"rnnd predict: error: {e}", file=sys.stderr)
        return e.exit_code


def predict(args: argparse.Namespace) -> int:
    cfg = config.load({"model": args.model, "input_topic": args.topic, "output_topic": f"{args.topic}-out"},
                      config_file=args.config)
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(MessageSource(args.file, args.key_column, args.format, args.features))
        session = Session(cfg.model, args.topic, config=cfg)
        out: BinaryIO = stack.enter_context(args.output.open("wb")) if args.output else sys.stdout.buffer
        dead: BinaryIO | None = stack.enter_context(args.dead_letters.open("wb")) if args.dead_letters else None
        progress = _Progress(args.quiet)
        messages = predictions = 0
        reasons: Counter[str] = Counter()
        for chunk in _chunks(source, CHUNK):
            for m in chunk:
                session.send(m.key, m.value, partition=default_partition(m.key, args.partitions))
            docs = session.run_bytes()
            out.write(b"".join(d + b"\n" for d in docs))
            for d in session.dead_letters:
                reasons[d["reason"]] += 1
                if dead is not None:
                    dead.write(orjson.dumps(d) + b"\n")
            session.dead_letters.clear()
            messages += len(chunk)
            predictions += len(docs)
            progress.show(messages, predictions)
        out.flush()
    where = f" -> {args.output}" if args.output else ""
    summary = f"rnnd predict: {messages:,} messages, {predictions:,} predictions{where}"
    if reasons:
        kept = f" -> {args.dead_letters}" if args.dead_letters else " (--dead-letters FILE keeps them)"
        summary += (f"; {sum(reasons.values()):,} dead letters ("
                    + ", ".join(f"{r}: {n:,}" for r, n in reasons.most_common()) + ")" + kept)
    print(summary, file=sys.stderr)
    return 0


def _chunks(source: MessageSource, size: int) -> Iterator[list]:
    chunk = []
    for m in source:
        chunk.append(m)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Progress:
    """A line on stderr every PROGRESS_EVERY_S seconds of a long run (none for a short one)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.start = self.last = time.monotonic()

    def show(self, messages: int, predictions: int) -> None:
        now = time.monotonic()
        if self.quiet or now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = messages / max(now - self.start, 1e-9)
        print(f"rnnd predict: {messages:,} messages, {predictions:,} predictions ({rate:,.0f} messages/s)",
              file=sys.stderr, flush=True)
