"""`rnnd predict`: recorded input scored by the daemon's pipeline, predictions to a file, no serving.

For backfills and for checking a model on recorded data. The input is a CSV or JSONL file,
its rows read as ``rnnd produce`` would send them (``tools.MessageSource``: the same columns,
the same message format), or a range of offsets of an input topic (``--input-topic``, read
without joining a group). Either goes through ``rnnd.daemon.local.Session`` (the pipeline
``rnnd serve`` runs, with the same settings: ``--config`` takes serve's TOML file, and RNND_*
variables apply), and comes out as the output documents the daemon would produce, one JSON
object per line.

Ids equal the daemon's: a topic's records keep their own partitions and offsets; a file's
rows take, with ``--partitions N`` and ``--topic NAME``, the partition Kafka's default
partitioner would give their key and the next offset there, as if a topic of N partitions
had been filled from the file in order (tests/test_daemon_e2e.py compares both with a
daemon's output topic). Input is scored in chunks of ``CHUNK`` messages (a file) or one
fetch at a time (a topic): memory does not grow with the input.

Exit codes as ``rnnd produce``'s: 2 for a file, a column or a setting to fix (one line on
stderr), 1 for a bundle that cannot be used; dead letters are not failures, they are counted
(and written with ``--dead-letters``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from rnnd.daemon import config, security
from rnnd.daemon.errors import RnndError
from rnnd.daemon.kafka.sink import default_partitions
from rnnd.daemon.local import DEFAULT_TOPIC, Session
from rnnd.tools import (
    MessageSource,
    ToolError,
    add_reading_arguments,
    connection,
    existing_partitions,
    kafka_security,
    non_negative_int,
    positive_int,
    unreachable,
)

#: Messages read before they are scored: large enough for full model calls (the daemon's rounds
#: take up to max_batch streams), small enough that memory does not grow with the file.
CHUNK = 20_000
#: Seconds between progress lines on stderr.
PROGRESS_EVERY_S = 2.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="score a CSV/JSONL file or a topic's offsets as the daemon would, predictions to a file",
        description="Run a bundle over a CSV or JSONL file, or a range of an input topic's offsets, with the daemon's "
        "own pipeline, and write the output documents it would produce (schemas/output.schema.json), one per line. "
        "A file's rows are read as `rnnd produce` reads them. Serving settings (emit, warmup, generate_tokens, "
        "beam_size, ...) come from --config (serve's TOML file) and RNND_* variables; the Kafka settings there do "
        "not apply.")
    p.add_argument("file", type=Path, nargs="?", help="the CSV or JSONL file (or give --input-topic)")
    p.add_argument("--model", default=None, help="the bundle (.onnx); or --route")
    p.add_argument("--route", default=None, metavar="NAME",
                   help="with --config of [routes.NAME] tables: that route's bundle and serving settings")
    p.add_argument("--key-column", default=None, help="a file's column (CSV) or field (JSONL) holding the stream key")
    add_reading_arguments(p)
    p.add_argument("--output", type=Path, default=None, help="where to write the predictions (default: stdout)")
    p.add_argument("--dead-letters", type=Path, default=None,
                   help="write the dead letters (schemas/dead-letter.schema.json) here; without it they are counted")
    p.add_argument("--topic", default=DEFAULT_TOPIC,
                   help=f"the input topic the documents name (default {DEFAULT_TOPIC})")
    p.add_argument("--partitions", type=positive_int, default=1,
                   help="place keys on N partitions as Kafka's default partitioner does (default 1): with the "
                        "input topic's count and --topic, every id equals the daemon's")
    p.add_argument("--input-topic", default=None, help="read this topic instead of a file (every partition)")
    p.add_argument("--bootstrap-servers", default=None, help="with --input-topic: Kafka bootstrap servers")
    p.add_argument("--start-offset", type=non_negative_int, default=0,
                   help="with --input-topic: first offset read in every partition (default: its beginning)")
    p.add_argument("--end-offset", type=non_negative_int, default=None,
                   help="with --input-topic: read up to this offset, not included (default: each partition's end "
                        "when the read starts)")
    p.add_argument("--config", default=None, help="TOML file of `rnnd serve` settings (its [serve] table)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    security.add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        return predict(args)
    except RnndError as e:
        if args.debug:
            raise
        print(f"rnnd predict: error: {e}", file=sys.stderr)
        return e.exit_code


#: One input message: key, value, partition, offset (None: the partition's next), timestamp (None: now).
Row = tuple[bytes, bytes | None, int, int | None, int | None]


def predict(args: argparse.Namespace) -> int:
    _check_arguments(args)
    topic = args.input_topic or args.topic
    given = {"model": args.model, "route": args.route, "input_topic": topic, "output_topic": f"{topic}-out"}
    if args.bootstrap_servers:
        given["bootstrap_servers"] = args.bootstrap_servers
    cfg = config.load(given, config_file=args.config)
    with contextlib.ExitStack() as stack:
        source = (None if args.input_topic else
                  stack.enter_context(MessageSource(args.file, args.key_column, args.format, args.features)))
        session = Session(cfg.model, topic, config=cfg)
        out: BinaryIO = stack.enter_context(args.output.open("wb")) if args.output else sys.stdout.buffer
        dead: BinaryIO | None = stack.enter_context(args.dead_letters.open("wb")) if args.dead_letters else None
        scorer = _Scorer(session, out, dead, _Progress(args.quiet))
        if source is None:
            asyncio.run(_score_topic(args, cfg.bootstrap_servers, kafka_security(args), scorer))
        else:
            for chunk in _chunks(source, CHUNK):
                placed = default_partitions([m.key for m in chunk], args.partitions)
                scorer.score([(m.key, m.value, p, None, None) for m, p in zip(chunk, placed, strict=True)])
        out.flush()
    where = f" -> {args.output}" if args.output else ""
    summary = f"rnnd predict: {scorer.messages:,} messages, {scorer.predictions:,} predictions{where}"
    if scorer.reasons:
        kept = f" -> {args.dead_letters}" if args.dead_letters else " (--dead-letters FILE keeps them)"
        summary += (f"; {sum(scorer.reasons.values()):,} dead letters ("
                    + ", ".join(f"{r}: {n:,}" for r, n in scorer.reasons.most_common()) + ")" + kept)
    print(summary, file=sys.stderr)
    return 0


class _Scorer:
    """Rows in, documents and dead letters out, counted: one ``Session`` round trip per chunk."""

    def __init__(self, session: Session, out: BinaryIO, dead: BinaryIO | None, progress: _Progress) -> None:
        self.session, self.out, self.dead, self.progress = session, out, dead, progress
        self.messages = self.predictions = 0
        self.reasons: Counter[str] = Counter()

    def score(self, rows: list[Row]) -> None:
        session = self.session
        for key, value, partition, offset, ts in rows:
            session.send(key, value, partition=partition, offset=offset, timestamp=ts)
        docs = session.run_bytes()
        self.out.write(b"".join(d + b"\n" for d in docs))
        for d in session.dead_letters:
            self.reasons[d["reason"]] += 1
            if self.dead is not None:
                self.dead.write(orjson.dumps(d) + b"\n")
        session.dead_letters.clear()
        self.messages += len(rows)
        self.predictions += len(docs)
        self.progress.show(self.messages, self.predictions)


def _check_arguments(args: argparse.Namespace) -> None:
    """One input, and only the options that apply to it: none is silently ignored."""
    if (args.model is None) == (args.route is None):
        raise ToolError("give --model, or --route NAME with --config (the route names its bundle): one of them")
    if args.route is not None and args.config is None:
        raise ToolError("--route NAME picks a route of the --config file's [routes.NAME] tables: give --config")
    if (args.file is None) == (args.input_topic is None):
        raise ToolError("give a file or --input-topic (one of them)")
    if args.file is not None:
        if args.key_column is None:
            raise ToolError("a file needs --key-column: the column (CSV) or field (JSONL) holding the stream key")
        for flag, value, default in (("--bootstrap-servers", args.bootstrap_servers, None),
                                     ("--start-offset", args.start_offset, 0), ("--end-offset", args.end_offset, None)):
            if value != default:
                raise ToolError(f"{flag} applies to --input-topic, not to a file")
    else:
        for flag, value, default in (("--key-column", args.key_column, None), ("--format", args.format, None),
                                     ("--features", args.features, None), ("--partitions", args.partitions, 1),
                                     ("--topic", args.topic, DEFAULT_TOPIC)):
            if value != default:
                raise ToolError(f"{flag} applies to a file, not to --input-topic (a topic's records keep their own "
                                "keys, partitions and offsets)")
        if args.end_offset is not None and args.end_offset <= args.start_offset:
            raise ToolError(f"--end-offset ({args.end_offset}) must be past --start-offset ({args.start_offset})")


async def _score_topic(args: argparse.Namespace, bootstrap: str, kafka: dict[str, Any], scorer: _Scorer) -> None:
    """Every partition's records in [start, end), each fetch scored as it arrives, read without a group
    (``read_to_end`` stops at ``end``, or at the end as the fetches report it: right on Tansu as on
    Apache Kafka)."""
    from aiokafka import TopicPartition
    from aiokafka.errors import KafkaError

    from rnnd.daemon.kafka import read_to_end, reader

    partitions = await existing_partitions(bootstrap, args.input_topic, kafka)
    consumer = reader(connection(bootstrap, kafka), "rnnd-predict")
    try:
        await consumer.start()
    except (KafkaError, OSError) as e:
        raise unreachable(bootstrap, e) from None

    def take(tp: Any, recs: list) -> None:
        rows: list[Row] = [(r.key or b"", r.value, tp.partition, r.offset, r.timestamp) for r in recs]
        if rows:
            scorer.score(rows)

    try:
        await read_to_end(consumer, [TopicPartition(args.input_topic, p) for p in partitions], take,
                          start=args.start_offset, end=args.end_offset)
    finally:
        await consumer.stop()


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
