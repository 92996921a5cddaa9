"""Kafka record bytes ⇄ steps and predictions. Pure functions of their input: no I/O, no state.

Decoding turns one input record into a ``Record`` (its steps, in raw units, plus controls
and coordinates) or a ``DeadLetter`` (a reason code, a message that says what is wrong, and
the original bytes). A dead letter never touches stream state: the decision is made here,
before the record reaches the scheduler. The message formats are documented as JSON Schema
in schemas/ (input.schema.json, output.schema.json, dead-letter.schema.json).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
import orjson

from .bundle import BundleSpec
from .config import ServeConfig
from .tokenizer import Tokenizer

# Reason codes of dead letters (a metric label, and `reason` in the dead-letter record).
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
NO_KEY = "no_key"
KEY_TOO_LONG = "key_too_long"
NO_INPUT = "no_input"
WRONG_TYPE = "wrong_type"
WRONG_INPUT_KIND = "wrong_input_kind"
FEATURE_COUNT = "feature_count"
FEATURE_NAMES = "feature_names"
NON_FINITE = "non_finite"
OUT_OF_RANGE = "out_of_range"
TOKEN_OUT_OF_RANGE = "token_out_of_range"
TEXT_TOO_LONG = "text_too_long"
TOO_MANY_STEPS = "too_many_steps"
UNKNOWN_CONTROL = "unknown_control"
BAD_CONTEXT = "bad_context"
REASONS = (NOT_JSON, NOT_OBJECT, NO_KEY, KEY_TOO_LONG, NO_INPUT, WRONG_TYPE, WRONG_INPUT_KIND, FEATURE_COUNT,
           FEATURE_NAMES, NON_FINITE, OUT_OF_RANGE, TOKEN_OUT_OF_RANGE, TEXT_TOO_LONG, TOO_MANY_STEPS, UNKNOWN_CONTROL,
           BAD_CONTEXT)

#: A key longer than max_key_bytes is dead-lettered with only its first bytes (up to this many):
#: echoing a 100 KB key back as text and base64 (and as the record key) helps nobody fix it.
KEY_SHOWN_BYTES = 256


class Record:
    """One usable input record: ``steps`` raw inputs (feature lists, or token ids) and controls.

    ``reset`` applies before the record's steps, ``end`` after them. ``remaining`` counts the
    steps and controls not yet applied; the record's offset may be committed once it is 0.
    """

    __slots__ = ("context", "cursor", "echo", "end", "headers", "key", "offset", "partition", "remaining", "reset",
                 "steps", "timestamp", "words")

    def __init__(self, key: bytes, partition: int, offset: int, timestamp: int, steps: list,
                 reset: bool = False, end: bool = False, echo: dict[str, Any] | None = None,
                 words: list[str] | None = None, context: list[float] | None = None) -> None:
        self.key = key
        self.partition = partition
        self.offset = offset
        self.timestamp = timestamp
        self.steps = steps
        self.reset = reset
        self.end = end
        self.echo = echo
        self.remaining = len(steps) + int(reset) + int(end)
        self.cursor = 0  # next step to apply
        # Text input with a word outside the vocabulary: the words as tokenised, so that each
        # prediction can say which word its step was (the id alone is the same <unk> for all).
        self.words = words
        # The stream (re)starts from init(context) before this record's steps (``reset`` is set too).
        self.context = context
        # The record's headers that every output made from it carries (``copy_headers``), if any.
        self.headers: list[tuple[str, bytes]] | None = None


_new_object = object.__new__


def one_step(key: bytes, partition: int, offset: int, timestamp: int, x: list[float]) -> Record:
    """``Record(key, partition, offset, timestamp, [x])``, the common message, in 0.10 µs against
    0.24: each slot set once, nothing computed (one step, no controls). A test holds every slot
    equal to the constructor's."""
    r = _new_object(Record)
    r.key, r.partition, r.offset, r.timestamp, r.steps = key, partition, offset, timestamp, [x]
    r.reset = r.end = False
    r.echo = r.words = r.context = r.headers = None
    r.remaining, r.cursor = 1, 0
    return r


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    message: str
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None  # the record's key, or its first KEY_SHOWN_BYTES when key_bytes is set
    value: bytes | None
    key_bytes: int | None = None  # the full key's length, when ``key`` holds only its start
    headers: list[tuple[str, bytes]] | None = None  # the record's copied headers (``copy_headers``), if any

    def encode(self) -> bytes:
        doc = {
            "reason": self.reason, "message": self.message, "topic": self.topic, "partition": self.partition,
            "offset": self.offset, "timestamp": self.timestamp, "key": key_text_or_none(self.key),
            "key_b64": None if self.key is None else base64.b64encode(self.key).decode(),
            "payload_b64": None if self.value is None else base64.b64encode(self.value).decode(),
        }
        if self.key_bytes is not None:
            doc["key_bytes"] = self.key_bytes
        return orjson.dumps(doc)


class Reject(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def key_text_or_none(key: bytes | None) -> str | None:
    """The key as text where it is UTF-8, else None: a dead letter carries the exact bytes beside it
    (``key_b64``), so the text field never has to stand in for them."""
    if key is None:
        return None
    try:
        return key.decode()
    except UnicodeDecodeError:
        return None


class _Step(msgspec.Struct, forbid_unknown_fields=True):
    """``{"x": [numbers]}``: the fast path's whole message (ints become floats, bools and strings are refused)."""

    x: list[float]


class Decoder:
    """Validates input records against one bundle's input spec and the serve settings."""

    def __init__(self, spec: BundleSpec, cfg: ServeConfig, topic: str) -> None:
        self.spec = spec
        self.topic = topic
        self.kind = spec.input.kind
        self.features = spec.input.features
        self.n_features = spec.input.n_features
        self._index = {name: i for i, name in enumerate(self.features)}
        self.mean = spec.input.scaling.mean.tolist()  # non_finite=zero: the value that normalises to 0
        self.lo = list(spec.input.valid_min) or [None] * self.n_features
        self.hi = list(spec.input.valid_max) or [None] * self.n_features
        self.has_bounds = any(v is not None for v in (*self.lo, *self.hi))
        self.replace_non_finite = cfg.non_finite == "zero"
        self.max_steps = cfg.max_steps_per_message
        self.max_text = cfg.max_text_tokens
        self.max_key = cfg.max_key_bytes
        self.tokenizer = Tokenizer(spec.input.tokenizer) if spec.input.tokenizer else None
        self.context_size = spec.start.size if spec.start is not None else 0
        self.vocab_size = spec.input.vocab_size
        self._fast = self.kind == "numeric" and not self.has_bounds
        # The common message, one step of plain numbers, typed and checked by msgspec in C: 0.7-1.4 µs
        # against 2.1 µs for orjson's dict and the checks in Python (docs/benchmarks.md). Anything
        # it does not take (other fields, a wrong type, bad JSON) goes the general way, which
        # says what is wrong; what it takes, orjson would have decoded to the same numbers.
        self._step = msgspec.json.Decoder(_Step) if self._fast else None

    def decode(self, key: bytes | None, value: bytes | None, partition: int, offset: int,
               timestamp: int) -> Record | DeadLetter:
        try:
            if not key:
                raise Reject(NO_KEY, "message has no key: the key names the stream (device id, user id, ...)")
            if len(key) > self.max_key:  # before anything reads it: the key indexes state and is in every output
                return self._key_too_long(key, value, partition, offset, timestamp)
            step = self._step
            if step is not None and value is not None:
                try:
                    x = step.decode(value).x
                except (msgspec.ValidationError, msgspec.DecodeError):
                    pass
                else:
                    if len(x) == self.n_features:
                        return one_step(key, partition, offset, timestamp, x)
            try:
                doc = _orjson_loads(value)  # type: ignore[arg-type]
            except (orjson.JSONDecodeError, TypeError):
                doc = _loads(value)
            if not isinstance(doc, dict):
                raise Reject(NOT_OBJECT, f"message must be a JSON object, not {type(doc).__name__}")
            return self._record(doc, key, partition, offset, timestamp)
        except Reject as r:
            return DeadLetter(r.reason, r.message, self.topic, partition, offset, timestamp, key, value)

    def _key_too_long(self, key: bytes, value: bytes | None, partition: int, offset: int,
                      timestamp: int) -> DeadLetter:
        message = (f"the key is {len(key)} bytes; the limit is {self.max_key} (max_key_bytes): the key names a "
                   "stream, and every prediction carries it")
        if len(key) <= KEY_SHOWN_BYTES:
            return DeadLetter(KEY_TOO_LONG, message, self.topic, partition, offset, timestamp, key, value)
        cut = KEY_SHOWN_BYTES
        while cut > KEY_SHOWN_BYTES - 3 and key[cut] & 0xC0 == 0x80:  # end on a whole UTF-8 character
            cut -= 1
        return DeadLetter(KEY_TOO_LONG, message, self.topic, partition, offset, timestamp, key[:cut], value,
                          key_bytes=len(key))

    # --- the parts of a message ------------------------------------------------------------
    def _record(self, doc: dict, key: bytes, partition: int, offset: int, timestamp: int) -> Record:
        control = doc.get("control")
        reset = end = False
        words = None
        if control is not None:
            if control == "reset":
                reset = True
            elif control == "end":
                end = True
            elif control == "start":
                if doc.get("context") is None:
                    raise Reject(BAD_CONTEXT, "control start needs a context: {\"control\": \"start\", \"context\": "
                                              "[numbers]}")
            else:
                raise Reject(UNKNOWN_CONTROL, f"unknown control {control!r}: use 'reset', 'end' or 'start'")
        context = None
        if doc.get("context") is not None:
            context = self._context(doc["context"])
            reset = True  # the stream starts over, from init(context)
        has = [k for k in ("x", "text", "tokens") if doc.get(k) is not None]
        if len(has) > 1:
            raise Reject(WRONG_TYPE, f"give one of x, text or tokens, not {' and '.join(has)}")
        if not has:
            if control is None and doc.get("context") is None:
                raise Reject(NO_INPUT, "message has no x, text, tokens, context or control")
            steps: list = []
        elif has[0] == "x":
            if self.kind != "numeric":
                raise Reject(WRONG_INPUT_KIND, "this model reads text: send `text` or `tokens`, not `x`")
            steps = self._numeric(doc["x"])
        else:
            if self.kind != "tokens":
                raise Reject(WRONG_INPUT_KIND, f"this model reads numeric features ({', '.join(self.features)}): "
                                               f"send `x`, not `{has[0]}`")
            if has[0] == "text":
                steps, words = self._text(doc["text"])
            else:
                steps = self._tokens(doc["tokens"])
        echo = None
        if "event_time" in doc or "client_id" in doc:
            echo = {k: doc[k] for k in ("event_time", "client_id") if k in doc}
            # The fallback parser admits what orjson cannot write back (lone surrogates, integers
            # beyond 64 bits, deep nesting): refuse it here rather than fail later on every output.
            try:
                orjson.dumps(echo)
            except orjson.JSONEncodeError as e:
                raise Reject(WRONG_TYPE, f"event_time/client_id cannot be copied into outputs: {e}") from None
        return Record(key, partition, offset, timestamp, steps, reset, end, echo, words, context)

    def _context(self, context: Any) -> list[float]:
        size = self.context_size
        if not size:
            raise Reject(BAD_CONTEXT, f"this model ({self.spec.model.ref}) has no init(context), so a stream cannot "
                                      "start from a context: drop `context`")
        if not (isinstance(context, list) and all(_is_number(v) for v in context)):
            raise Reject(BAD_CONTEXT, f"context must be a list of {size} numbers")
        if len(context) != size:
            raise Reject(BAD_CONTEXT, f"context has {len(context)} values; the model's init(context) takes {size}")
        try:
            out = [float(v) for v in context]
        except OverflowError:
            out = [math.inf]
        if not all(math.isfinite(v) for v in out):
            raise Reject(BAD_CONTEXT, "context holds NaN or infinity; the model needs finite values")
        return out

    def _numeric(self, x: Any) -> list[list[float]]:
        # Count first: an oversized message is refused without validating its rows one by one.
        if isinstance(x, list) and len(x) > self.max_steps and all(isinstance(r, (list, dict)) for r in x):
            raise Reject(TOO_MANY_STEPS, f"{len(x)} steps in one message; the limit is {self.max_steps}")
        if isinstance(x, dict):
            rows = [self._named(x)]
        elif isinstance(x, list) and x and all(isinstance(r, dict) for r in x):
            rows = [self._named(r) for r in x]
        elif isinstance(x, list) and x and all(isinstance(r, list) for r in x):
            rows = [self._row(r) for r in x]
        elif isinstance(x, list) and x and not any(isinstance(r, (list, dict)) for r in x):
            rows = [self._row(x)]
        elif _is_number(x) and self.n_features == 1:
            rows = [self._row([x])]
        elif isinstance(x, list) and not x:
            raise Reject(NO_INPUT, "x is empty")
        else:
            raise Reject(WRONG_TYPE, "x must be a list of numbers (one step), a list of lists (several steps), "
                                     "or an object of named features")
        if len(rows) > self.max_steps:
            raise Reject(TOO_MANY_STEPS, f"{len(rows)} steps in one message; the limit is {self.max_steps}")
        return rows

    def _named(self, obj: dict) -> list[float]:
        missing = [n for n in self.features if n not in obj]
        unknown = [n for n in obj if n not in self._index]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown {', '.join(map(str, unknown))}")
            raise Reject(FEATURE_NAMES, f"feature names do not match the model ({'; '.join(parts)}); "
                                        f"expected {', '.join(self.features)}")
        return self._row([obj[n] for n in self.features])

    def _row(self, row: list) -> list[float]:
        if len(row) != self.n_features:
            raise Reject(FEATURE_COUNT, f"a step has {len(row)} values; the model takes {self.n_features} "
                                        f"({', '.join(self.features)})")
        out = []
        for i, v in enumerate(row):
            if not _is_number(v):
                raise Reject(WRONG_TYPE, f"feature {self.features[i]} is {type(v).__name__} {v!r}, not a number")
            try:
                v = float(v)
            except OverflowError:  # an integer literal beyond float range (Python's json keeps it exact)
                v = math.inf if v > 0 else -math.inf
            if not math.isfinite(v):
                if not self.replace_non_finite:
                    raise Reject(NON_FINITE, f"feature {self.features[i]} is {v}; the model needs finite values "
                                             "(or run with non_finite=zero)")
                v = self.mean[i]
            if self.has_bounds:
                lo, hi = self.lo[i], self.hi[i]
                if (lo is not None and v < lo) or (hi is not None and v > hi):
                    raise Reject(OUT_OF_RANGE, f"feature {self.features[i]} = {v} is outside the valid range "
                                               f"[{lo}, {hi}]")
            out.append(v)
        return out

    def _text(self, text: Any) -> tuple[list[int], list[str] | None]:
        """The ids, and the words themselves when one is outside the vocabulary (else None)."""
        if not isinstance(text, str):
            raise Reject(WRONG_TYPE, f"text must be a string, not {type(text).__name__}")
        tokenizer = self.tokenizer
        assert tokenizer is not None
        words = tokenizer.split(text)
        if not words:
            raise Reject(NO_INPUT, "text has no tokens")
        if len(words) > self.max_text:
            raise Reject(TEXT_TOO_LONG, f"text has {len(words)} tokens; the limit is {self.max_text} (max_text_tokens)")
        ids = tokenizer.ids(words)
        return ids, (words if tokenizer.unk_id in ids else None)

    def _tokens(self, tokens: Any) -> list[int]:
        if not isinstance(tokens, list) or not tokens:
            raise Reject(WRONG_TYPE if not isinstance(tokens, list) else NO_INPUT,
                         "tokens must be a non-empty list of token ids")
        # Count first: an oversized list is refused without looking at its ids one by one.
        if len(tokens) > self.max_text:
            raise Reject(TEXT_TOO_LONG, f"{len(tokens)} tokens; the limit is {self.max_text} (max_text_tokens)")
        # The common list, ids in the vocabulary, checked in three C-level passes.
        if set(map(type, tokens)) == _INT and min(tokens) >= 0 and max(tokens) < self.vocab_size:
            return tokens
        for t in tokens:
            if type(t) is int:  # any size: Python compares exactly, nothing overflows
                if not 0 <= t < self.vocab_size:
                    raise Reject(TOKEN_OUT_OF_RANGE, f"token id {_int_text(t)} is outside the vocabulary "
                                                     f"[0, {self.vocab_size})")
            elif type(t) is float and t.is_integer() and abs(t) >= 2**63:
                # orjson reads an integer literal beyond 64 bits as a float: an id, far out of range.
                raise Reject(TOKEN_OUT_OF_RANGE, f"token id {t:g} is outside the vocabulary [0, {self.vocab_size})")
            else:
                raise Reject(WRONG_TYPE, f"token id {t!r} is not an integer")
        return tokens


_INT = frozenset((int,))
_orjson_loads = orjson.loads


def _int_text(v: int) -> str:
    """An integer for a message: a 4000-digit id is shown by its size, not digit by digit."""
    text = str(v)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text.lstrip('-'))} digits)"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _loads(value: bytes | None) -> Any:
    if value is None:
        raise Reject(NOT_JSON, "message has no value (a tombstone?); send a JSON object")
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses NaN/Infinity, which Python's json module writes by default: accept them
    # here so that the non-finite policy, not a parse error, decides.
    try:
        return json.loads(value)
    except (UnicodeDecodeError, ValueError) as e:
        raise Reject(NOT_JSON, f"message is not JSON: {str(e)[:120]}") from None
    except RecursionError:  # json recurses per nesting level; orjson stops at 1024
        raise Reject(NOT_JSON, "message is not JSON this daemon reads: nested too deeply") from None


class Output(NamedTuple):
    """One record for the output topic."""

    key: bytes
    value: bytes  # the output document
    input_timestamp: int  # ms, the input record's timestamp (latency runs from it)
    source: int  # the input partition it came from: with exactly-once, its transaction carries it
    headers: list[tuple[str, bytes]] | None = None  # the input record's copied headers (``copy_headers``)


# Output(...) runs a Python-level __new__; this C-level constructor builds the same object in
# half the time, which matters once per step.
_new_tuple = tuple.__new__


class Encoder:
    """Predictions → output records (documents: schemas/output.schema.json), one per step.

    Runs once per step of every stream, so each document is filled into a bytes template
    rather than built as a dict and serialised: half the time (docs/benchmarks.md). What is
    the same for every document (topic, model) is in the template from the start, and what is
    the same for a whole call (the output time, the warm-up flag's two values) is put in once
    per call: each field left open costs every document a conversion.
    """

    def __init__(self, topic: str, model_ref: str, warmup_steps: int, vocab: Sequence[str] | None = None) -> None:
        topic_json = orjson.dumps(topic)
        topic_in_id = topic_json[1:-1]  # escaped, inside the id string

        def fixed(b: bytes) -> bytes:
            return b.replace(b"%", b"%%")

        # The documented field order; %d/%b are the per-step fields, output_ts comes per call. A
        # model that reads tokens says which token each step was: its text (the word itself
        # when it was outside the vocabulary) and its id.
        token = b',"token":%b,"token_id":%d' if vocab is not None else b""
        head = (b'{"key":%b,"id":"' + fixed(topic_in_id) + b'/%d/%d/%d","topic":' + fixed(topic_json)
                + b',"partition":%d,"offset":%d,"index":%d,"step":%d' + token + b',"prediction":%b,"warmup":')
        tail = b',"model":' + fixed(orjson.dumps(model_ref)) + b',"input_ts":%d,"output_ts":'
        self._warm, self._trusted = head + b"true" + tail, head + b"false" + tail
        self.warmup = warmup_steps
        self._key_json: dict[bytes, bytes] = {}  # stream key → its text as a JSON string
        self._vocab_json = [orjson.dumps(t) for t in vocab] if vocab is not None else None

    def outputs(self, refs: list[tuple[Record, int]], steps: list[int], predictions: list[bytes],
                now_ms: int, nonfinite: list[int] | None = None) -> list[Output]:
        """One output record per (record, index in record) with its stream step and prediction (JSON).

        ``nonfinite``: positions whose model output was NaN or infinite; their documents get
        ``"nonfinite": true`` (rare: the common call pays nothing for it).
        """
        now = b"%d}" % now_ms  # digits: nothing in them for the % operator to read
        warm, trusted = self._warm + now, self._trusted + now
        warmup, key_json, new = self.warmup, self._key_json, _new_tuple
        if self._vocab_json is not None:
            return self._token_outputs(refs, steps, predictions, warm, trusted, nonfinite)
        out = []
        for (record, index), step, pred in zip(refs, steps, predictions, strict=True):
            rkey = record.key
            kj = key_json.get(rkey)
            if kj is None:
                kj = orjson.dumps(key_text_or_base64(rkey))
                if len(key_json) < 1_000_000:
                    key_json[rkey] = kj
            p, offset, ts = record.partition, record.offset, record.timestamp
            doc = (warm if step < warmup else trusted) % (kj, p, offset, index, p, offset, index, step, pred, ts)
            out.append(new(Output, (rkey, with_fields(doc, record.echo) if record.echo else doc, ts, p,
                                     record.headers)))
        return _mark_nonfinite(out, nonfinite)

    def _token_outputs(self, refs: list[tuple[Record, int]], steps: list[int], predictions: list[bytes],
                       warm: bytes, trusted: bytes, nonfinite: list[int] | None) -> list[Output]:
        """``outputs`` for a model that reads tokens: each document also names its step's token."""
        vocab = self._vocab_json
        assert vocab is not None
        warmup, new = self.warmup, _new_tuple
        out = []
        for (record, index), step, pred in zip(refs, steps, predictions, strict=True):
            rkey, kj = record.key, self._key_text(record.key)
            token_id = record.steps[index]
            words = record.words
            tj = orjson.dumps(words[index]) if words is not None else vocab[token_id]
            p, offset, ts = record.partition, record.offset, record.timestamp
            doc = (warm if step < warmup else trusted) % (kj, p, offset, index, p, offset, index, step, tj, token_id,
                                                          pred, ts)
            out.append(new(Output, (rkey, with_fields(doc, record.echo) if record.echo else doc, ts, p,
                                     record.headers)))
        return _mark_nonfinite(out, nonfinite)

    def _key_text(self, rkey: bytes) -> bytes:
        kj = self._key_json.get(rkey)
        if kj is None:
            kj = orjson.dumps(key_text_or_base64(rkey))
            if len(self._key_json) < 1_000_000:
                self._key_json[rkey] = kj
        return kj

    def documents(self, refs: list[tuple[Record, int]], steps: list[int], predictions: list[bytes],
                  now_ms: int, nonfinite: list[int] | None = None) -> list[bytes]:
        """The documents of ``outputs`` alone."""
        return [o.value for o in self.outputs(refs, steps, predictions, now_ms, nonfinite)]


_NONFINITE = {"nonfinite": True}


def _mark_nonfinite(out: list[Output], nonfinite: list[int] | None) -> list[Output]:
    for i in nonfinite or ():
        o = out[i]
        out[i] = Output(o.key, with_fields(o.value, _NONFINITE), o.input_timestamp, o.source, o.headers)
    return out


def with_fields(doc: bytes, fields: dict[str, Any]) -> bytes:
    """An encoded JSON object with more fields (copied inputs, ``ended``) added at its end."""
    return doc[:-1] + b"," + orjson.dumps(fields)[1:-1] + b"}"


def encode(doc: dict[str, Any]) -> bytes:
    # The copy is deliberate. orjson writes into an oversized buffer and shrinks it in place;
    # kept by the thousand (a model call's outputs, until the producer takes them) such buffers
    # cost about 2 µs each in the allocator, where a right-sized copy, with the original freed
    # at once, costs 0.1 µs (docs/benchmarks.md, "Reading the numbers").
    return bytes(memoryview(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)))


def key_text_or_base64(key: bytes) -> str:
    """The key as text where it is UTF-8, else its base64: an output document and a log line need
    some text that names the stream, and they carry no second field for the bytes."""
    try:
        return key.decode()
    except UnicodeDecodeError:
        return base64.b64encode(key).decode()
