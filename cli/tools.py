"""`rnnd produce` and `rnnd tail`: put a data file on a topic, and watch predictions come out.

These exist so that trying a model needs no Kafka tooling beyond rnnd itself: ``produce``
replays a CSV or JSONL file into the input topic in the message format of
schemas/input.schema.json, and ``tail`` prints the output topic (schemas/output.schema.json)
one readable line per prediction. Both are torch-free and use only aiokafka, and connect
with the same TLS/SASL settings as ``rnnd serve`` (the same flags and RNND_* variables;
daemon/security.py).

Errors a user can fix (missing file, missing column, a bad row) end the command with exit
status 2 and one line on stderr, printed here rather than by ``rnnd.cli.main`` so that the
commands behave the same when called directly (tests, notebooks). Broker trouble exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson

from rnnd.daemon import security
from rnnd.daemon.config import ServeConfig
from rnnd.daemon.errors import RnndError

__all__ = [
    "MessageSource",
    "TokenBucket",
    "ToolError",
    "add_parsers",
    "add_reading_arguments",
    "column_names",
    "connection",
    "existing_partitions",
    "format_prediction",
    "format_value",
    "kafka_security",
    "non_negative_int",
    "produce",
    "tail",
    "unreachable",
]

#: Message fields a CSV column may carry as-is instead of as a feature (see input.schema.json).
PASS_THROUGH = ("event_time", "client_id", "control")
#: How far behind the token bucket the sender may run before it sleeps: sleeping once per
#: few milliseconds of messages, not once per message, keeps high rates reachable.
MIN_SLEEP_S = 0.005


class ToolError(RnndError):
    """A problem the user can fix with a tool's input; exit 2 unless given (1: a broker that cannot be reached)."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message, exit_code=exit_code)


# --- argument parsing -------------------------------------------------------------------------

def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``produce`` and ``tail`` on the ``rnnd`` command's subparsers."""
    p = sub.add_parser(
        "produce", help="replay a CSV or JSONL file into a topic, one message per row",
        description="Replay a CSV or JSONL file into a Kafka topic, one message per row, keyed by the key column. "
        "CSV: the other columns (or --features, in that order) become named features {\"x\": {name: value}}; a "
        "column named text makes text messages {\"text\": ...}; columns event_time, client_id and control are "
        "copied into the message as they are. JSONL: each line is an object; the key field is removed and the "
        "rest is sent unchanged (so it can carry x, text, tokens, control, event_time...).")
    p.add_argument("file", type=Path, help="the CSV or JSONL file")
    p.add_argument("--topic", required=True, help="topic to write to (the daemon's input topic)")
    p.add_argument("--bootstrap-servers", required=True, help="Kafka bootstrap servers, comma-separated")
    p.add_argument("--key-column", required=True, help="column (CSV) or field (JSONL) holding the stream key")
    p.add_argument("--rate", type=positive_float, default=None, metavar="MSGS_PER_S",
                   help="send at most this many messages per second (default: as fast as possible)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="send at most N messages")
    add_reading_arguments(p)
    security.add_arguments(p)
    p.set_defaults(run=produce)

    t = sub.add_parser(
        "tail", help="print the predictions arriving on a topic, one line each",
        description="Print predictions from an output topic, one readable line each: "
        "`key step N [warmup] -> summary`. Reads every partition without joining a consumer group, "
        "so it never disturbs the daemon or other consumers.")
    t.add_argument("--topic", required=True, help="topic to read (the daemon's output topic)")
    t.add_argument("--bootstrap-servers", required=True, help="Kafka bootstrap servers, comma-separated")
    t.add_argument("--key", action="append", default=None, metavar="K",
                   help="only predictions of this stream key (repeat for several)")
    t.add_argument("--from-beginning", action="store_true",
                   help="start at the oldest prediction kept (default: only predictions that arrive from now on)")
    t.add_argument("--limit", type=positive_int, default=None, metavar="N", help="exit after N predictions")
    t.add_argument("--json", action="store_true", help="print each record's value as it is (one JSON per line)")
    security.add_arguments(t)
    t.set_defaults(run=tail)


def add_reading_arguments(p: argparse.ArgumentParser) -> None:
    """``--format`` and ``--features``: how a data file's rows are read (``MessageSource``), for
    ``rnnd produce`` and ``rnnd predict`` alike."""
    p.add_argument("--format", choices=("csv", "jsonl"), default=None,
                   help="file format (default: from the extension: .csv, .jsonl or .ndjson)")
    p.add_argument("--features", type=column_names, default=None, metavar="a,b,c",
                   help="CSV: the columns to send as features, in this order (default: every other column)")


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return v


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, least: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, not {text}")
    return v


def column_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one column name")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a column is named twice in {text!r}")
    return names


def _quiet_client_logs() -> None:
    """Keep aiokafka's own log lines off the terminal when nothing else configured logging.

    Without any handler, Python prints WARNING and above to stderr, so a refused connection
    would show aiokafka's retries before this command's one-line explanation of the failure.
    """
    if not logging.getLogger().handlers:
        logging.getLogger("aiokafka").addHandler(logging.NullHandler())
    from rnnd.daemon.kafka import watch_login_refusals

    watch_login_refusals()


def unreachable(bootstrap: str, e: BaseException) -> ToolError:
    """A broker that refused the login (exit 2: fix the settings) or that could not be reached (exit 1)."""
    from rnnd.daemon.kafka import login_refused

    refused = login_refused()
    if refused:
        return ToolError(f"Kafka at {bootstrap} refused the login ({refused}): check --sasl-mechanism, "
                         "--sasl-username and the password")
    return ToolError(f"cannot reach Kafka at {bootstrap}: {e}", exit_code=1)


def _fail(command: str, e: ToolError) -> int:
    print(f"rnnd {command}: error: {e}", file=sys.stderr)
    return e.exit_code


def kafka_security(args: argparse.Namespace) -> dict[str, Any]:
    """aiokafka arguments for TLS/SASL from the security flags and RNND_* variables (as `rnnd serve`).

    A namespace without the flags (a caller that built its own) means no security, as before.
    Settings that cannot work together are a user error (exit 2), reported before connecting.
    The environment may hold `rnnd serve`'s other settings too (one set of RNND_* variables).
    """
    try:
        return security.client_kwargs(security.from_args(args, within=[ServeConfig]))
    except security.SecurityError as e:
        raise ToolError(str(e)) from None


# --- produce: reading the file ----------------------------------------------------------------

@dataclass(frozen=True)
class Message:
    line: int  # where the row ends in the file, 1-based: what error messages cite
    key: bytes
    value: bytes


class MessageSource:
    """Rows of a CSV or JSONL file as keyed input messages, read lazily.

    The header (CSV) and the file's existence are checked when the source is made, before any
    connection is opened, so that a typo fails fast and sends nothing. Rows are converted as
    they are read, so a file of any size replays in constant memory; a bad row therefore
    stops the replay at that row, and the error names its line.
    """

    def __init__(self, path: Path, key_column: str, fmt: str | None = None,
                 features: Sequence[str] | None = None) -> None:
        self.path = path
        self.key_column = key_column
        self.format = fmt or _format_of(path)
        self.features = list(features) if features else None
        if not path.exists():
            raise ToolError(f"{path}: no such file")
        if not path.is_file():
            raise ToolError(f"{path}: not a file")
        if self.format == "jsonl" and self.features:
            raise ToolError("--features applies to CSV files; JSONL lines are sent as they are")
        self._file: TextIO = path.open(newline="" if self.format == "csv" else None, encoding="utf-8")
        try:
            self._rows = self._csv() if self.format == "csv" else self._jsonl()
        except BaseException:
            self._file.close()
            raise

    def __iter__(self) -> Iterator[Message]:
        return self._rows

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MessageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # CSV ------------------------------------------------------------------------------------
    def _csv(self) -> Iterator[Message]:
        reader = csv.reader(self._file)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as e:
            raise ToolError(f"{self.path}: line 1: not readable as CSV ({e})") from None
        if not header:
            raise ToolError(f"{self.path}: empty file (a CSV needs a header row)")
        header = [h.strip() for h in header]
        if self.key_column not in header:
            raise ToolError(f"{self.path}: no key column {self.key_column!r} (columns: {', '.join(header)})")
        if len(set(header)) != len(header):
            raise ToolError(f"{self.path}: the header names a column twice ({', '.join(header)})")
        index = {name: i for i, name in enumerate(header)}
        if self.features is not None:
            missing = [f for f in self.features if f not in index]
            if missing:
                raise ToolError(f"{self.path}: --features names columns not in the header: {', '.join(missing)} "
                                f"(columns: {', '.join(header)})")
            features = self.features
        else:
            features = [h for h in header if h != self.key_column and h not in PASS_THROUGH]
        extras = [h for h in PASS_THROUGH if h in index and h not in features]
        text = "text" in features
        if text and len(features) > 1:
            others = ", ".join(f for f in features if f != "text")
            raise ToolError(f"{self.path}: a message carries text or numeric features, not both: the file has a "
                            f"text column and {others}; choose with --features text (or --features {others})")
        if not features:
            raise ToolError(f"{self.path}: no feature columns besides the key column {self.key_column!r}")
        return self._csv_rows(reader, len(header), index[self.key_column], [(f, index[f]) for f in features],
                              [(e, index[e]) for e in extras], text)

    def _csv_rows(self, reader: Any, width: int, key_at: int, features: list[tuple[str, int]],
                  extras: list[tuple[str, int]], text: bool) -> Iterator[Message]:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                raise ToolError(f"{self.path}: line {reader.line_num + 1}: not readable as CSV ({e})") from None
            line = reader.line_num
            if not row:
                continue  # a blank line
            if len(row) != width:
                raise ToolError(f"{self.path}: line {line}: {len(row)} fields, but the header has {width}")
            key = row[key_at].strip()
            if not key:
                raise ToolError(f"{self.path}: line {line}: the key column {self.key_column!r} is empty")
            doc: dict[str, Any]
            if text:
                doc = {"text": row[features[0][1]]}
            else:
                x: dict[str, float] = {}
                for name, i in features:
                    try:
                        x[name] = float(row[i])
                    except ValueError:
                        hint = " (write nan for a missing value)" if not row[i].strip() else ""
                        raise ToolError(f"{self.path}: line {line}: column {name!r} is {row[i]!r}, "
                                        f"not a number{hint}") from None
                doc = {"x": x}
            for name, i in extras:
                if row[i] != "":
                    doc[name] = _scalar(row[i]) if name == "event_time" else row[i]
            yield Message(line, key.encode(), _dumps(doc))

    # JSONL ----------------------------------------------------------------------------------
    def _jsonl(self) -> Iterator[Message]:
        line = 0
        while True:
            try:
                raw = self._file.readline()
            except UnicodeDecodeError as e:
                raise ToolError(f"{self.path}: line {line + 1}: not UTF-8 ({e})") from None
            if not raw:
                return
            line += 1
            if not raw.strip():
                continue
            doc = _loads(raw)
            if doc is None:
                raise ToolError(f"{self.path}: line {line}: not JSON")
            if not isinstance(doc, dict):
                raise ToolError(f"{self.path}: line {line}: a JSON {type(doc).__name__}, not an object")
            if self.key_column not in doc:
                raise ToolError(f"{self.path}: line {line}: no key field {self.key_column!r} "
                                f"(fields: {', '.join(map(str, doc)) or 'none'})")
            key = doc.pop(self.key_column)
            if isinstance(key, bool) or not isinstance(key, (str, int)) or key == "":
                raise ToolError(f"{self.path}: line {line}: the key {self.key_column!r} must be a non-empty "
                                f"string or an integer, not {json.dumps(key)}")
            yield Message(line, str(key).encode(), _dumps(doc))


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise ToolError(f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}: "
                    "use --format csv or --format jsonl")


def _loads(text: str) -> Any:
    """Parse one JSON line; None if it is not JSON.

    Falls back to the stdlib parser for NaN/Infinity, which the daemon also accepts so that
    its non_finite setting, not a parse error, decides what happens to them.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text)
    except ValueError:
        return None


def _dumps(doc: dict[str, Any]) -> bytes:
    """Encode a message; NaN/inf survive as JSON's NaN/Infinity literals (orjson would write null)."""
    if _has_non_finite(doc):
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    return orjson.dumps(doc)


def _has_non_finite(v: Any) -> bool:
    if isinstance(v, float):
        return not math.isfinite(v)
    if isinstance(v, dict):
        return any(_has_non_finite(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_non_finite(x) for x in v)
    return False


def _scalar(text: str) -> int | float | str:
    """A CSV cell as the JSON value it most likely is: event times are often epoch numbers."""
    for cast in (int, float):
        try:
            v = cast(text)
        except ValueError:
            continue
        if isinstance(v, int) or math.isfinite(v):
            return v
    return text


# --- produce: pacing and sending --------------------------------------------------------------

class TokenBucket:
    """Paces a sender to ``rate`` messages per second, with a burst of ``burst`` messages.

    ``take()`` never sleeps: it returns the seconds the caller is ahead of the rate, and the
    caller sleeps only once that debt passes a few milliseconds. A sleep per message would
    cost a timer and an event-loop round trip each, and oversleep by the timer's granularity,
    so high rates would be unreachable; one sleep per few milliseconds of messages is not.
    """

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate * 0.02)
        self.tokens = self.capacity
        self.clock = clock
        self.last = clock()

    def take(self, n: float = 1.0) -> float:
        """Spend ``n`` tokens; return how long to wait before the spent messages are due (>= 0)."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class _Progress:
    """One line on stderr per second: long replays should show they are alive and how fast."""

    def __init__(self, out: TextIO, interval_s: float = 1.0) -> None:
        self.out = out
        self.interval = interval_s
        self.start = self.last = time.monotonic()
        self.last_count = 0

    def tick(self, count: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            rate = (count - self.last_count) / (now - self.last)
            print(f"rnnd produce: {count} sent ({rate:,.0f} msg/s)", file=self.out, flush=True)
            self.last, self.last_count = now, count

    def elapsed(self) -> float:
        return time.monotonic() - self.start


@dataclass
class _Tally:
    """What a replay achieved, kept outside the coroutine so that an interrupted run can still say it."""

    acked: int = 0
    seconds: float = 0.0


def produce(args: argparse.Namespace) -> int:
    """Run ``rnnd produce``; returns the exit status."""
    _quiet_client_logs()
    tally = _Tally()
    try:
        kafka = kafka_security(args)
        with MessageSource(args.file, args.key_column, args.format, args.features) as source:
            rows = iter(source)
            first = next(rows, None)  # a bad first row fails before a connection is made
            asyncio.run(_produce(args, first, rows, tally, kafka))
    except ToolError as e:
        return _fail("produce", e)
    except KeyboardInterrupt:
        print(f"rnnd produce: interrupted; {tally.acked} messages were written to {args.topic}", file=sys.stderr)
        return 130
    count, seconds = tally.acked, tally.seconds
    rate = count / seconds if seconds > 0 else 0.0
    print(f"rnnd produce: sent {count} messages to {args.topic} in {seconds:.2f} s ({rate:,.0f} msg/s)",
          file=sys.stderr)
    return 0


async def _produce(args: argparse.Namespace, first: Message | None, rows: Iterator[Message], tally: _Tally,
                   kafka: dict[str, Any] | None = None) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    # acks=all: a replay is input data; losing some silently would make results misleading.
    # No idempotence: Tansu refuses it (rnnd.daemon.kafka.quirks).
    producer = AIOKafkaProducer(**connection(args.bootstrap_servers, kafka), acks="all", linger_ms=5,
                                client_id="rnnd-produce")
    try:
        await producer.start()
    except KafkaError as e:
        with contextlib.suppress(Exception):
            await producer.stop()
        raise unreachable(args.bootstrap_servers, e) from None

    errors: list[BaseException] = []

    def done(fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        if fut.exception() is not None:
            errors.append(fut.exception())  # type: ignore[arg-type]
        else:
            tally.acked += 1

    bucket = TokenBucket(args.rate) if args.rate else None
    progress = _Progress(sys.stderr)
    limit = args.limit
    sent = 0
    try:
        messages = rows if first is None else _chain(first, rows)
        for m in messages:
            if errors:
                break
            if bucket is not None:
                wait = bucket.take()
                if wait >= MIN_SLEEP_S:
                    await asyncio.sleep(wait)
            fut = await producer.send(args.topic, m.value, key=m.key)
            fut.add_done_callback(done)
            sent += 1
            progress.tick(sent)
            if limit is not None and sent >= limit:
                break  # before reading another row: rows past the limit are not even parsed
        await producer.flush()
    except KafkaError as e:
        errors.append(e)
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
        tally.seconds = progress.elapsed()
    if errors:
        raise ToolError(f"Kafka refused a message after {tally.acked} were written to {args.topic}: {errors[0]!r}",
                        exit_code=1)


def _chain(first: Message, rest: Iterator[Message]) -> Iterator[Message]:
    yield first
    yield from rest


# --- tail ---------------------------------------------------------------------------------------

def format_value(v: Any) -> str:
    """A regression value with 4 significant digits, in fixed notation where that stays short.

    Fixed notation keeps columns of a live tail comparable (21.30 next to 21.35); very large
    or very small magnitudes fall back to exponent notation.
    """
    if v is None:
        return "nan"  # JSON has no NaN: the daemon's encoder writes non-finite values as null
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return json.dumps(v)
    v = float(v)
    if v == 0:
        return "0"
    if not math.isfinite(v) or not 1e-3 <= abs(v) < 1e6:
        return f"{v:.4g}"
    decimals = max(0, 3 - math.floor(math.log10(abs(v))))
    return f"{v:.{decimals}f}"


def _values(values: dict[str, Any]) -> str:
    return " ".join(f"{name}={format_value(v)}" for name, v in values.items())


def _token(tok: Any) -> str:
    """Tokens as printed: quoted when they would be invisible or ambiguous (spaces, commas)."""
    s = str(tok)
    if not s or any(c.isspace() or c == "," or not c.isprintable() for c in s):
        return json.dumps(s, ensure_ascii=False)
    return s


def format_prediction(doc: dict[str, Any]) -> str:
    """One output record as a line: ``key step N [warmup] -> summary``."""
    head = f"{doc.get('key', '?')} step {doc.get('step', '?')}"
    if doc.get("warmup"):
        head += " [warmup]"
    if doc.get("ended"):
        head += " [ended]"
    pred = doc.get("prediction")
    if not isinstance(pred, dict):
        return f"{head} -> {json.dumps(pred)}"
    if isinstance(pred.get("values"), dict):
        summary = _values(pred["values"])
        forecast = pred.get("forecast")
        if isinstance(forecast, list) and forecast:
            parts = [f"h1 {_values(forecast[0])}"]
            if len(forecast) > 1:
                parts.append(f"h{len(forecast)} {_values(forecast[-1])}")
            summary += " | forecast: " + ", ".join(parts)
    elif "label" in pred:
        p = (pred.get("probs") or {}).get(pred["label"])
        summary = str(pred["label"]) + (f" (p={p:.2f})" if isinstance(p, (int, float)) else "")
    elif isinstance(pred.get("next"), list):
        summary = "next: " + ", ".join(f"{_token(n.get('token'))} {n.get('p', 0):.2f}" for n in pred["next"])
        if "generated" in pred:
            summary += f" | generated: {json.dumps(pred['generated'], ensure_ascii=False)}"
    else:
        summary = json.dumps(pred, ensure_ascii=False)
    return f"{head} -> {summary}"


def tail(args: argparse.Namespace) -> int:
    """Run ``rnnd tail``; returns the exit status (130 after Ctrl-C, like other Unix tools)."""
    _quiet_client_logs()
    try:
        asyncio.run(_tail(args, sys.stdout, kafka_security(args)))
    except ToolError as e:
        return _fail("tail", e)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `rnnd tail ... | head`: the reader left, which is a normal way to stop.
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return 0
    return 0


def connection(bootstrap: str, kafka: dict[str, Any] | None) -> dict[str, Any]:
    """Where Kafka is, plus the TLS/SASL arguments of :func:`kafka_security`: what every client here starts from."""
    return {"bootstrap_servers": bootstrap, **(kafka or {})}


async def existing_partitions(bootstrap: str, topic: str, kafka: dict[str, Any] | None = None) -> list[int]:
    """The topic's partitions, without creating it: a typo in --topic is an error, not a new empty topic."""
    from aiokafka.errors import KafkaError

    from rnnd.daemon.kafka import admin, topic_partitions

    client = admin(connection(bootstrap, kafka), "rnnd-tail")
    try:
        await client.start()
        existing = await topic_partitions(client)
    except KafkaError as e:
        raise unreachable(bootstrap, e) from None
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    if topic not in existing:
        raise ToolError(f"topic {topic!r} does not exist on {bootstrap}")
    return existing[topic]


async def _tail(args: argparse.Namespace, out: TextIO, kafka: dict[str, Any] | None = None) -> int:
    """Print predictions until ``--limit`` is reached (or forever); returns how many were printed."""
    from aiokafka import TopicPartition
    from aiokafka.errors import KafkaError

    from rnnd.daemon.kafka import position_at_end, reader

    partitions = await existing_partitions(args.bootstrap_servers, args.topic, kafka)
    tps = [TopicPartition(args.topic, p) for p in partitions]
    keys = {k.encode() for k in args.key} if args.key else None
    # No group: tail only reads, never commits, and must not join (and so rebalance) anyone's group.
    consumer = reader(connection(args.bootstrap_servers, kafka), "rnnd-tail")
    printed = 0
    try:
        try:
            await consumer.start()
        except KafkaError as e:
            raise unreachable(args.bootstrap_servers, e) from None
        consumer.assign(tps)
        if args.from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            try:
                await position_at_end(consumer, tps)
            except TimeoutError as e:
                raise ToolError(str(e), exit_code=1) from None
        while args.limit is None or printed < args.limit:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for r in records:
                    if keys is not None and r.key not in keys:
                        continue
                    out.write(_line(r.value, args.json) + "\n")
                    printed += 1
                    if args.limit is not None and printed >= args.limit:
                        break
                if args.limit is not None and printed >= args.limit:
                    break
            out.flush()
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
    return printed


def _line(value: bytes | None, raw: bool) -> str:
    if value is None:
        return "null" if raw else "(no value)"
    if raw:
        return value.decode("utf-8", errors="replace")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return f"(not JSON: {value[:80]!r})"
    if not isinstance(doc, dict):
        return f"(not a prediction: {value[:80]!r})"
    return format_prediction(doc)
