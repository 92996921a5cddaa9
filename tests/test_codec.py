"""Input record decoding: every dead-letter reason, every valid input form, the non-finite policy.

The decoder is the only thing between producers and stream state, so each rule it enforces
is checked from the outside: the bytes a producer would send in, the ``Record`` or
``DeadLetter`` out. Bundle specs are built in memory; no ONNX graph is needed for decoding.
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
from dataclasses import replace
from typing import Any

import orjson
import pytest

from rnnd.daemon import codec
from rnnd.daemon.bundle import BundleSpec, ContextStart, InputSpec, ModelInfo, OutputSpec, StateSpec, TokenizerSpec
from rnnd.daemon.codec import DeadLetter, Decoder, Record
from rnnd.daemon.config import ServeConfig

VOCAB = ("<pad>", "<unk>", "the", "cat", "sat", "on", "mat", ".")
STATE = (StateSpec("h", (1, 4), 1, "h_in", "h_out"),)
TOPIC = "in"


def numeric_spec(features: tuple[str, ...] = ("a", "b", "c"), **inp: Any) -> BundleSpec:
    """A numeric bundle spec; the mean is non-zero so that non_finite=zero visibly uses it."""
    n = len(features)
    inp.setdefault("mean", tuple(10.0 * (i + 1) for i in range(n)))
    inp.setdefault("std", (2.0,) * n)
    return BundleSpec(ModelInfo("num", "1"), "stateful", InputSpec("numeric", features=features, **inp),
                      OutputSpec("regression", names=("y",)), STATE)


def token_spec() -> BundleSpec:
    tok = TokenizerSpec("word", VOCAB, unk_id=1, pad_id=0)
    return BundleSpec(ModelInfo("tok", "1"), "stateful", InputSpec("tokens", tokenizer=tok),
                      OutputSpec("classification", labels=("neg", "pos")), STATE)


def config(**kw: Any) -> ServeConfig:
    return ServeConfig(model="x", input_topic=TOPIC, output_topic="out", **kw).validate()


def decode(spec: BundleSpec, value: bytes | None, key: bytes | None = b"k", **cfg: Any) -> Record | DeadLetter:
    return Decoder(spec, config(**cfg), TOPIC).decode(key, value, 3, 42, 1_700_000_000_000)


def record(spec: BundleSpec, value: bytes | str, **cfg: Any) -> Record:
    out = decode(spec, value.encode() if isinstance(value, str) else value, **cfg)
    assert isinstance(out, Record), f"dead-lettered: {out.reason}: {out.message}"
    return out


BOUNDED = numeric_spec(valid_min=(0.0, None, -1.0), valid_max=(100.0, None, 1.0))
START = replace(numeric_spec(), start=ContextStart(3))  # a model with init(context), contexts of 3 values

# (case id, spec, key, value, serve settings, reason, regex the message must match)
DEAD: list[tuple[str, BundleSpec, bytes | None, bytes | None, dict[str, Any], str, str]] = [
    ("garbage", numeric_spec(), b"k", b"{x: 1", {}, codec.NOT_JSON, r"not JSON"),
    ("tombstone", numeric_spec(), b"k", None, {}, codec.NOT_JSON, r"no value"),
    ("bad-utf8", numeric_spec(), b"k", b'{"x": "\xff\xfe"}', {}, codec.NOT_JSON, r"not JSON"),
    # Python's json recurses; a deeply nested value must be a dead letter, not a crash.
    ("deep-nesting", numeric_spec(), b"k", b"[" * 100_000 + b"]" * 100_000, {}, codec.NOT_JSON, r"not JSON"),
    ("array", numeric_spec(), b"k", b"[1, 2, 3]", {}, codec.NOT_OBJECT, r"JSON object, not list"),
    ("string", numeric_spec(), b"k", b'"hello"', {}, codec.NOT_OBJECT, r"JSON object, not str"),
    ("no-key", numeric_spec(), None, b'{"x": [1, 2, 3]}', {}, codec.NO_KEY, r"no key"),
    ("empty-key", numeric_spec(), b"", b'{"x": [1, 2, 3]}', {}, codec.NO_KEY, r"no key"),
    ("key-too-long", numeric_spec(), b"sensor-17", b'{"x": [1, 2, 3]}', {"max_key_bytes": 8}, codec.KEY_TOO_LONG,
     r"^the key is 9 bytes; the limit is 8 \(max_key_bytes\)"),
    # A key's length is checked before its bytes are read as text: an invalid UTF-8 key is too long all the same.
    ("key-too-long-not-utf8", numeric_spec(), b"\xff" * 9, b"not even json", {"max_key_bytes": 8},
     codec.KEY_TOO_LONG, r"the key is 9 bytes"),
    ("empty-object", numeric_spec(), b"k", b"{}", {}, codec.NO_INPUT, r"no x, text, tokens, context or control"),
    ("null-x", numeric_spec(), b"k", b'{"x": null}', {}, codec.NO_INPUT, r"no x, text, tokens, context or control"),
    ("empty-x", numeric_spec(), b"k", b'{"x": []}', {}, codec.NO_INPUT, r"x is empty"),
    ("blank-text", token_spec(), b"k", b'{"text": "   "}', {}, codec.NO_INPUT, r"text has no tokens"),
    ("empty-tokens", token_spec(), b"k", b'{"tokens": []}', {}, codec.NO_INPUT, r"non-empty list"),
    ("x-and-text", numeric_spec(), b"k", b'{"x": [1, 2, 3], "text": "a"}', {}, codec.WRONG_TYPE,
     r"one of x, text or tokens, not x and text"),
    ("x-string", numeric_spec(), b"k", b'{"x": "1,2,3"}', {}, codec.WRONG_TYPE, r"x must be a list of numbers"),
    ("x-scalar-3-features", numeric_spec(), b"k", b'{"x": 1.5}', {}, codec.WRONG_TYPE,
     r"x must be a list of numbers"),
    ("x-mixed-rows", numeric_spec(), b"k", b'{"x": [[1, 2, 3], {"a": 1}]}', {}, codec.WRONG_TYPE,
     r"x must be a list"),
    ("feature-string", numeric_spec(), b"k", b'{"x": [1, "2", 3]}', {}, codec.WRONG_TYPE,
     r"feature b is str '2', not a number"),
    ("feature-bool", numeric_spec(), b"k", b'{"x": [1, true, 3]}', {}, codec.WRONG_TYPE,
     r"feature b is bool True, not a number"),
    ("text-number", token_spec(), b"k", b'{"text": 5}', {}, codec.WRONG_TYPE, r"text must be a string, not int"),
    ("tokens-string", token_spec(), b"k", b'{"tokens": "2 3"}', {}, codec.WRONG_TYPE, r"tokens must be a .*list"),
    ("token-float", token_spec(), b"k", b'{"tokens": [2, 3.5]}', {}, codec.WRONG_TYPE,
     r"token id 3.5 is not an integer"),
    ("token-bool", token_spec(), b"k", b'{"tokens": [true]}', {}, codec.WRONG_TYPE, r"token id True is not an integer"),
    # An echo field orjson cannot write back out would otherwise crash the output encoder.
    ("echo-lone-surrogate", numeric_spec(), b"k", b'{"x": [1, 2, 3], "client_id": "\\ud800"}', {},
     codec.WRONG_TYPE, r"client_id"),
    ("echo-huge-int", numeric_spec(), b"k", b'{"x": [1, 2, 3], "event_time": 1' + b"0" * 30 + b", "
     b'"pad": 1e400}', {}, codec.WRONG_TYPE, r"event_time"),
    ("echo-too-deep", numeric_spec(), b"k", b'{"x": [1, 2, 3], "event_time": ' + b"[" * 300 + b"]" * 300 + b"}",
     {}, codec.WRONG_TYPE, r"event_time"),
    ("text-to-numeric", numeric_spec(), b"k", b'{"text": "the cat"}', {}, codec.WRONG_INPUT_KIND,
     r"numeric features \(a, b, c\): send `x`, not `text`"),
    ("tokens-to-numeric", numeric_spec(), b"k", b'{"tokens": [2]}', {}, codec.WRONG_INPUT_KIND,
     r"send `x`, not `tokens`"),
    ("x-to-text-model", token_spec(), b"k", b'{"x": [1.0]}', {}, codec.WRONG_INPUT_KIND,
     r"reads text: send `text` or `tokens`, not `x`"),
    ("two-values", numeric_spec(), b"k", b'{"x": [1, 2]}', {}, codec.FEATURE_COUNT,
     r"a step has 2 values; the model takes 3 \(a, b, c\)"),
    ("row-too-long", numeric_spec(), b"k", b'{"x": [[1, 2, 3], [1, 2, 3, 4]]}', {}, codec.FEATURE_COUNT,
     r"a step has 4 values; the model takes 3"),
    ("missing-name", numeric_spec(), b"k", b'{"x": {"a": 1, "b": 2}}', {}, codec.FEATURE_NAMES,
     r"missing c.*expected a, b, c"),
    ("unknown-name", numeric_spec(), b"k", b'{"x": [{"a": 1, "b": 2, "c": 3, "zz": 4}]}', {}, codec.FEATURE_NAMES,
     r"unknown zz"),
    ("nan-literal", numeric_spec(), b"k", b'{"x": [1, NaN, 3]}', {}, codec.NON_FINITE,
     r"feature b is nan.*non_finite=zero"),
    ("infinity-literal", numeric_spec(), b"k", b'{"x": [-Infinity, 2, 3]}', {}, codec.NON_FINITE,
     r"feature a is -inf"),
    ("overflowing-float", numeric_spec(), b"k", b'{"x": [1, 2, 1e400]}', {}, codec.NON_FINITE,
     r"feature c is inf"),
    # An integer literal too large for a float: Python's json returns an int that float() refuses.
    ("overflowing-int", numeric_spec(), b"k", b'{"x": [1, 2, 1' + b"0" * 400 + b"]}", {}, codec.NON_FINITE,
     r"feature c is inf"),
    ("above-max", BOUNDED, b"k", b'{"x": [101, 0, 0]}', {}, codec.OUT_OF_RANGE,
     r"feature a = 101.0 is outside the valid range \[0.0, 100.0\]"),
    ("below-min", BOUNDED, b"k", b'{"x": [[5, 0, 0], [5, 0, -1.5]]}', {}, codec.OUT_OF_RANGE,
     r"feature c = -1.5 is outside the valid range \[-1.0, 1.0\]"),
    ("token-too-big", token_spec(), b"k", b'{"tokens": [2, 8]}', {}, codec.TOKEN_OUT_OF_RANGE,
     r"token id 8 is outside the vocabulary \[0, 8\)"),
    ("token-negative", token_spec(), b"k", b'{"tokens": [-1]}', {}, codec.TOKEN_OUT_OF_RANGE,
     r"token id -1 is outside"),
    # Integer ids of any size: orjson reads those beyond 64 bits as floats, Python's json (the fallback, here for
    # a literal beyond float range) as exact ints. Neither is a wrong type, and nothing may overflow.
    ("token-2**70", token_spec(), b"k", b'{"tokens": [2, 1180591620717411303424]}', {}, codec.TOKEN_OUT_OF_RANGE,
     r"token id 1.18059e\+21 is outside the vocabulary \[0, 8\)"),
    ("token-10**30", token_spec(), b"k", b'{"tokens": [1' + b"0" * 30 + b"]}", {}, codec.TOKEN_OUT_OF_RANGE,
     r"token id 1e\+30 is outside"),
    ("token-below-int64", token_spec(), b"k", b'{"tokens": [-9223372036854775809]}', {}, codec.TOKEN_OUT_OF_RANGE,
     r"token id -9.22337e\+18 is outside"),
    ("token-400-digits", token_spec(), b"k", b'{"tokens": [-1' + b"0" * 400 + b"]}", {}, codec.TOKEN_OUT_OF_RANGE,
     r"token id -1000000000000000000\.\.\. \(401 digits\) is outside the vocabulary"),
    ("text-too-long", token_spec(), b"k", b'{"text": "the cat sat on the mat ."}', {"max_text_tokens": 6},
     codec.TEXT_TOO_LONG, r"text has 7 tokens; the limit is 6 \(max_text_tokens\)"),
    ("tokens-too-many", token_spec(), b"k", b'{"tokens": [2, 3, 4]}', {"max_text_tokens": 2},
     codec.TEXT_TOO_LONG, r"3 tokens; the limit is 2"),
    ("too-many-rows", numeric_spec(), b"k", orjson.dumps({"x": [[1, 2, 3]] * 5}), {"max_steps_per_message": 4},
     codec.TOO_MANY_STEPS, r"5 steps in one message; the limit is 4"),
    ("too-many-named", numeric_spec(), b"k", orjson.dumps({"x": [{"a": 1, "b": 2, "c": 3}] * 3}),
     {"max_steps_per_message": 2}, codec.TOO_MANY_STEPS, r"3 steps in one message; the limit is 2"),
    ("unknown-control", numeric_spec(), b"k", b'{"control": "pause"}', {}, codec.UNKNOWN_CONTROL,
     r"unknown control 'pause': use 'reset', 'end' or 'start'"),
    ("control-with-steps", numeric_spec(), b"k", b'{"control": "restart", "x": [1, 2, 3]}', {},
     codec.UNKNOWN_CONTROL, r"unknown control 'restart'"),
    ("context-without-init", numeric_spec(), b"k", b'{"context": [1, 2, 3], "x": [1, 2, 3]}', {}, codec.BAD_CONTEXT,
     r"^this model \(num@1\) has no init\(context\), so a stream cannot start from a context: drop `context`$"),
    ("context-size", START, b"k", b'{"context": [1, 2]}', {}, codec.BAD_CONTEXT,
     r"^context has 2 values; the model's init\(context\) takes 3$"),
    ("context-not-numbers", START, b"k", b'{"context": [1, "2", 3]}', {}, codec.BAD_CONTEXT,
     r"^context must be a list of 3 numbers$"),
    ("context-object", START, b"k", b'{"context": {"a": 1}}', {}, codec.BAD_CONTEXT, r"must be a list of 3 numbers"),
    ("context-bool", START, b"k", b'{"context": [1, true, 3]}', {}, codec.BAD_CONTEXT, r"must be a list of 3 numbers"),
    ("context-nan", START, b"k", b'{"context": [1, NaN, 3]}', {}, codec.BAD_CONTEXT, r"NaN or infinity"),
    ("context-huge", START, b"k", b'{"context": [1, 1e999, 3]}', {}, codec.BAD_CONTEXT, r"NaN or infinity"),
    ("start-without-context", START, b"k", b'{"control": "start", "x": [1, 2, 3]}', {}, codec.BAD_CONTEXT,
     r'^control start needs a context: \{"control": "start", "context": \[numbers\]\}$'),
]


@pytest.mark.parametrize(("spec", "key", "value", "cfg", "reason", "pattern"),
                         [pytest.param(*c[1:], id=c[0]) for c in DEAD])
def test_dead_letter_reason_and_message(spec: BundleSpec, key: bytes | None, value: bytes | None,
                                        cfg: dict[str, Any], reason: str, pattern: str) -> None:
    out = decode(spec, value, key=key, **cfg)
    assert isinstance(out, DeadLetter), out
    assert out.reason == reason, out.message
    assert re.search(pattern, out.message), out.message
    assert (out.topic, out.partition, out.offset, out.key, out.value) == (TOPIC, 3, 42, key, value)


def test_every_reason_code_has_a_case() -> None:
    """A new reason added to codec.REASONS without a test case fails here."""
    assert {c[5] for c in DEAD} == set(codec.REASONS)
    assert len(set(codec.REASONS)) == len(codec.REASONS)


def test_too_many_tokens_is_decided_before_each_id_is_checked() -> None:
    """A list of ids over max_text_tokens is refused for its length, whatever its ids are."""
    out = decode(token_spec(), orjson.dumps({"tokens": [True] * 1000}), max_text_tokens=999)
    assert isinstance(out, DeadLetter) and out.reason == codec.TEXT_TOO_LONG, out


def test_token_ids_of_any_size_and_at_the_edges_of_the_vocabulary() -> None:
    """An integer is an id, in the vocabulary or not, whatever its size; 2.0 or 1e3 is not an id."""
    assert record(token_spec(), '{"tokens": [0, 7]}').steps == [0, 7]
    out_of_range = (8, -1, 2**64 - 1, 2**64, -(2**63) - 1, 2**70, -(10**30))
    for bad, reason in [(t, codec.TOKEN_OUT_OF_RANGE) for t in out_of_range] + [
            (2.0, codec.WRONG_TYPE), (1e3, codec.WRONG_TYPE), (None, codec.WRONG_TYPE)]:
        for tokens in ([bad], [3, bad], [bad, 3]):
            out = decode(token_spec(), json.dumps({"tokens": tokens}).encode())
            assert isinstance(out, DeadLetter) and out.reason == reason, (tokens, out)


def test_key_at_the_limit_is_a_stream_one_byte_more_is_a_dead_letter() -> None:
    value = b'{"x": [1, 2, 3]}'
    key = b"k" * 4096  # the default max_key_bytes
    assert decode(numeric_spec(), value, key=key).key == key  # type: ignore[union-attr]
    out = decode(numeric_spec(), value, key=key + b"k")
    assert isinstance(out, DeadLetter) and out.reason == codec.KEY_TOO_LONG
    assert out.message == ("the key is 4097 bytes; the limit is 4096 (max_key_bytes): the key names a stream, and "
                           "every prediction carries it")


def test_a_100_kb_key_is_not_echoed_back_in_full() -> None:
    """The dead letter (its document and its Kafka key) keeps the key's first 256 bytes, cut on a character."""
    key = b"a" + "é".encode() * 51_200  # 102,401 bytes; byte 256 is the middle of an é
    value = b'{"x": [1, 2, 3]}'
    out = decode(numeric_spec(), value, key=key)
    assert isinstance(out, DeadLetter) and out.reason == codec.KEY_TOO_LONG
    assert out.key == key[:255]  # the Kafka key of the dead-letter record
    encoded = out.encode()
    assert len(encoded) < 1500
    doc = orjson.loads(encoded)
    assert doc["key"] == "a" + "é" * 127 and base64.b64decode(doc["key_b64"]) == key[:255]
    assert doc["key_bytes"] == len(key) == 102_401
    assert base64.b64decode(doc["payload_b64"]) == value  # the payload stays whole: it is what gets re-sent
    # not valid UTF-8 at all: the bytes are kept, the text is null
    binary = decode(numeric_spec(), value, key=b"\xff" * 5000)
    doc = orjson.loads(binary.encode())  # type: ignore[union-attr]
    assert doc["key"] is None and base64.b64decode(doc["key_b64"]) == b"\xff" * 256 and doc["key_bytes"] == 5000
    # a key that is too long but short enough to show is kept whole, without key_bytes
    short = orjson.loads(decode(numeric_spec(), value, key=b"k" * 200, max_key_bytes=100).encode())  # type: ignore
    assert base64.b64decode(short["key_b64"]) == b"k" * 200 and "key_bytes" not in short


def test_too_many_steps_is_decided_before_each_step_is_checked() -> None:
    """An oversized message is refused for its size; its thousands of rows are not validated one by one."""
    rows = [[1, 2, 3]] * 9 + [[1, 2]]
    out = decode(numeric_spec(), orjson.dumps({"x": rows}), max_steps_per_message=4)
    assert isinstance(out, DeadLetter) and out.reason == codec.TOO_MANY_STEPS


# --- valid input forms -----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "steps"), [
    pytest.param({"x": [1, 2.5, -3]}, [[1.0, 2.5, -3.0]], id="flat-list"),
    pytest.param({"x": [[1, 2, 3], [4, 5, 6]]}, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], id="list-of-lists"),
    pytest.param({"x": {"c": 3, "a": 1, "b": 2}}, [[1.0, 2.0, 3.0]], id="named-any-order"),
    pytest.param({"x": [{"a": 1, "b": 2, "c": 3}, {"b": 5, "c": 6, "a": 4}]}, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]],
                 id="list-of-named"),
    pytest.param({"x": [0, 1e300, -1e-300]}, [[0.0, 1e300, -1e-300]], id="extreme-but-finite"),
])
def test_numeric_forms(value: dict[str, Any], steps: list[list[float]]) -> None:
    r = record(numeric_spec(), orjson.dumps(value))
    assert r.steps == steps
    assert all(type(v) is float for row in r.steps for v in row)
    assert (r.reset, r.end, r.remaining, r.cursor, r.echo) == (False, False, len(steps), 0, None)
    assert (r.key, r.partition, r.offset, r.timestamp) == (b"k", 3, 42, 1_700_000_000_000)


@pytest.mark.parametrize(("x", "steps"), [(2.5, [[2.5]]), (7, [[7.0]]), ([2.5], [[2.5]]),
                                          ([[1], [2], [3]], [[1.0], [2.0], [3.0]]), ({"v": -1}, [[-1.0]])])
def test_single_feature_model_forms(x: Any, steps: list[list[float]]) -> None:
    assert record(numeric_spec(("v",)), orjson.dumps({"x": x})).steps == steps


def test_flat_list_is_one_step_even_for_a_single_feature_model() -> None:
    """[1, 2, 3] is one step of three values (the schema), never three steps of one value."""
    out = decode(numeric_spec(("v",)), b'{"x": [1, 2, 3]}')
    assert isinstance(out, DeadLetter) and out.reason == codec.FEATURE_COUNT


def test_text_is_tokenised_with_the_bundle_tokenizer() -> None:
    r = record(token_spec(), '{"text": "The cat sat on the DOG."}')
    assert r.steps == [2, 3, 4, 5, 2, 1, 7]  # lower-cased, unknown word -> unk id 1, "." its own token
    assert r.remaining == 7


def test_text_at_exactly_the_limit_is_accepted() -> None:
    assert len(record(token_spec(), '{"text": "the cat sat"}', max_text_tokens=3).steps) == 3


def test_tokens() -> None:
    r = record(token_spec(), '{"tokens": [0, 7, 3]}')
    assert r.steps == [0, 7, 3] and r.remaining == 3


@pytest.mark.parametrize(("value", "reset", "end", "steps"), [
    ({"control": "reset"}, True, False, []),
    ({"control": "end"}, False, True, []),
    ({"control": "reset", "x": [[1, 2, 3], [4, 5, 6]]}, True, False, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
    ({"x": {"a": 1, "b": 2, "c": 3}, "control": "end"}, False, True, [[1.0, 2.0, 3.0]]),
    ({"control": "end", "x": None}, False, True, []),
])
def test_controls(value: dict[str, Any], reset: bool, end: bool, steps: list) -> None:
    r = record(numeric_spec(), orjson.dumps(value))
    assert (r.reset, r.end, r.steps) == (reset, end, steps)
    assert r.remaining == len(steps) + reset + end  # the offset commits only once all are applied


def test_controls_on_a_token_model() -> None:
    r = record(token_spec(), '{"control": "reset", "text": "the cat"}')
    assert (r.reset, r.end, r.steps) == (True, False, [2, 3])


def test_event_time_and_client_id_are_echoed_unchanged() -> None:
    event_time = {"ts": "2024-01-01T00:00:00Z", "seq": [1, 2]}
    r = record(numeric_spec(), orjson.dumps({"x": [1, 2, 3], "event_time": event_time, "client_id": "p-7",
                                             "other": "ignored"}))
    assert r.echo == {"event_time": event_time, "client_id": "p-7"}
    only = record(numeric_spec(), orjson.dumps({"x": [1, 2, 3], "event_time": 17}))
    assert only.echo == {"event_time": 17}
    assert record(numeric_spec(), orjson.dumps({"x": [1, 2, 3], "other": 1})).echo is None


# --- non-finite values and valid ranges -------------------------------------------------------------


def python_json(doc: dict[str, Any]) -> bytes:
    """What a Python producer sends by default: json.dumps writes NaN/Infinity literals."""
    return json.dumps(doc).encode()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_python_json_non_finite_rejected_by_default(bad: float) -> None:
    value = python_json({"x": [[1.0, 2.0, 3.0], [4.0, bad, 6.0]]})
    out = decode(numeric_spec(), value)
    assert isinstance(out, DeadLetter) and out.reason == codec.NON_FINITE
    assert "feature b" in out.message
    assert base64.b64decode(orjson.loads(out.encode())["payload_b64"]) == value


@pytest.mark.parametrize("value", [
    python_json({"x": [[1.0, math.nan, 3.0], [math.inf, 5.0, -math.inf]]}),
    b'{"x": [[1, 2e400, 3], [-1e999, 5, 1' + b"9" * 400 + b"]]}",
], ids=["python-literals", "overflowing-numbers"])
def test_non_finite_zero_replaces_with_the_feature_mean_in_raw_units(value: bytes) -> None:
    """Raw mean, so that normalisation turns it into exactly 0 (the model's 'average' input)."""
    spec = numeric_spec(mean=(10.0, 20.0, 30.0))
    r = record(spec, value, non_finite="zero")
    assert r.steps == [[1.0, 20.0, 3.0], [10.0, 5.0, 30.0]]


def test_non_finite_zero_without_a_mean_uses_zero() -> None:
    spec = numeric_spec(mean=(), std=())
    assert record(spec, python_json({"x": [math.nan, 2.0, 3.0]}), non_finite="zero").steps == [[0.0, 2.0, 3.0]]


def test_valid_range_bounds_are_inclusive_and_none_is_unbounded() -> None:
    r = record(BOUNDED, '{"x": [[0, -1e30, -1], [100, 1e30, 1]]}')
    assert r.steps == [[0.0, -1e30, -1.0], [100.0, 1e30, 1.0]]


def test_replaced_non_finite_values_are_still_range_checked() -> None:
    spec = numeric_spec(mean=(500.0, 0.0, 0.0), valid_max=(100.0, None, None))
    out = decode(spec, python_json({"x": [math.nan, 0.0, 0.0]}), non_finite="zero")
    assert isinstance(out, DeadLetter) and out.reason == codec.OUT_OF_RANGE


# --- the dead-letter record ------------------------------------------------------------------------------


def test_dead_letter_encode_carries_the_original_payload_and_key() -> None:
    value = b'{"x": [1, NaN, 3], "note": "caf\xc3\xa9"}'
    out = decode(numeric_spec(), value, key="sensor-\u00e9".encode())
    assert isinstance(out, DeadLetter)
    doc = orjson.loads(out.encode())
    assert set(doc) == {"reason", "message", "topic", "partition", "offset", "timestamp", "key", "key_b64",
                        "payload_b64"}
    assert (doc["reason"], doc["topic"], doc["partition"], doc["offset"], doc["timestamp"]) == (
        codec.NON_FINITE, TOPIC, 3, 42, 1_700_000_000_000)
    assert doc["message"] == out.message
    assert base64.b64decode(doc["payload_b64"]) == value
    assert doc["key"] == "sensor-\u00e9"
    assert base64.b64decode(doc["key_b64"]) == "sensor-\u00e9".encode()


def test_dead_letter_encode_without_key_value_or_utf8_key() -> None:
    tomb = decode(numeric_spec(), None, key=b"\xff\x00")
    doc = orjson.loads(tomb.encode())  # type: ignore[union-attr]
    assert doc["payload_b64"] is None
    assert doc["key"] is None and base64.b64decode(doc["key_b64"]) == b"\xff\x00"
    keyless = orjson.loads(decode(numeric_spec(), b"{}", key=None).encode())  # type: ignore[union-attr]
    assert keyless["reason"] == codec.NO_KEY and keyless["key"] is None and keyless["key_b64"] is None
    assert base64.b64decode(keyless["payload_b64"]) == b"{}"


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value, weighted towards what the decoder looks at (numbers, lists, feature names)."""
    kinds = ["int", "float", "nan", "big", "str", "bool", "null"] + (["list", "dict"] * 2 if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-3, 10)
    if kind == "float":
        return rng.uniform(-1e3, 1e3)
    if kind == "nan":
        return rng.choice([math.nan, math.inf, -math.inf])
    if kind == "big":
        return rng.choice([10**30, -(10**400), 2**63])
    if kind == "str":
        return rng.choice(["a", "b", "the cat", "", "reset", "end", "\ud800", "w" * 50])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["a", "b", "c", "v", "zz"]): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def test_decoder_never_raises() -> None:
    """Whatever arrives, the decoder answers with a Record or a DeadLetter: a raise would stop the daemon.

    A Record it accepts must also be one the rest of the daemon can use: steps of the right
    shape and type, and echo fields that encode back to JSON.
    """
    rng = random.Random(7)
    decoders = [Decoder(numeric_spec(), config(), TOPIC), Decoder(numeric_spec(("v",)), config(non_finite="zero"),
                                                                  TOPIC),
                Decoder(token_spec(), config(), TOPIC)]
    fields = ["x", "x", "text", "tokens", "control", "event_time", "client_id", "other"]
    for _ in range(3000):
        doc = {rng.choice(fields): _random_json(rng) for _ in range(rng.randint(0, 3))}
        value = json.dumps(doc).encode()
        if rng.random() < 0.2:  # and some damaged bytes
            cut = rng.randrange(len(value) + 1)
            value = value[:cut] + bytes([rng.randrange(256)]) + value[cut + 1:]
        for d in decoders:
            out = d.decode(b"k", value, 0, 0, 0)
            assert isinstance(out, Record | DeadLetter)
            if isinstance(out, DeadLetter):
                assert out.reason in codec.REASONS
                orjson.loads(out.encode())
                continue
            assert out.remaining == len(out.steps) + out.reset + out.end > 0
            if d.kind == "tokens":
                assert all(type(t) is int and 0 <= t < len(VOCAB) for t in out.steps)
            else:
                assert all(len(row) == d.n_features and all(type(v) is float and math.isfinite(v) for v in row)
                           for row in out.steps)
            codec.encode({"echo": out.echo})


def test_spec_without_bounds_skips_range_checks() -> None:
    """Bounds given as all-None behave like no bounds at all."""
    spec = replace(numeric_spec(), input=InputSpec("numeric", features=("a",), valid_min=(None,),
                                                   valid_max=(None,)))
    assert record(spec, '{"x": -1e300}').steps == [[-1e300]]


# --- encoding --------------------------------------------------------------------------------------


def test_encoder_writes_topic_and_model_verbatim_even_with_format_characters() -> None:
    """Topic and model go into the document template once, as text: a % in them is not a field."""
    model = 'm%d%%b%s@"1"'
    enc = codec.Encoder("in.x_1", model, warmup_steps=2)
    r = Record(b"k\xff", 3, 42, 7, [[0.0], [0.0]], echo={"client_id": "c%d"})
    outs = enc.outputs([(r, 0), (r, 1)], [1, 2], [b'{"values":{"y":1.5}}'] * 2, 99, nonfinite=[1])
    assert [(o.key, o.input_timestamp) for o in outs] == [(b"k\xff", 7)] * 2
    docs = [orjson.loads(o.value) for o in outs]
    assert [list(d) for d in docs] == [
        ["key", "id", "topic", "partition", "offset", "index", "step", "prediction", "warmup", "model", "input_ts",
         "output_ts", "client_id"],
        ["key", "id", "topic", "partition", "offset", "index", "step", "prediction", "warmup", "model", "input_ts",
         "output_ts", "client_id", "nonfinite"]]
    assert [(d["id"], d["topic"], d["model"], d["step"], d["warmup"], d["output_ts"], d["client_id"]) for d in docs] \
        == [("in.x_1/3/42/0", "in.x_1", model, 1, True, 99, "c%d"), ("in.x_1/3/42/1", "in.x_1", model, 2, False, 99,
                                                                       "c%d")]
    assert docs[0]["key"] == codec.key_text_or_base64(b"k\xff") == base64.b64encode(b"k\xff").decode()
    assert enc.documents([(r, 0)], [1], [b"{}"], 99) == [outs[0].value.replace(b'{"values":{"y":1.5}}', b"{}")]


def test_token_outputs_say_which_token_each_step_was() -> None:
    """Words outside the vocabulary are all `<unk>` steps: their documents tell them apart by the word
    itself, and name the id the model read. Ids sent as `tokens` are named by the vocabulary."""
    spec = token_spec()
    assert spec.input.tokenizer is not None
    enc = codec.Encoder(TOPIC, "tok@1", warmup_steps=0, vocab=spec.input.tokenizer.vocab)
    text = record(spec, '{"text": "The zebra sat on a \\"quokka\\" mat.", "client_id": "c"}')
    ids = record(spec, '{"tokens": [2, 3, 1]}')
    known = record(spec, '{"text": "the cat"}')
    assert known.words is None and ids.words is None  # the words are kept only when one is unknown
    docs = [orjson.loads(o.value)
            for r in (text, ids, known)
            for o in enc.outputs([(r, i) for i in range(len(r.steps))], list(range(len(r.steps))),
                                 [b'{"label":"pos"}'] * len(r.steps), 5)]
    assert [(d["token"], d["token_id"]) for d in docs] == [
        ("the", 2), ("zebra", 1), ("sat", 4), ("on", 5), ("a", 1), ('"', 1), ("quokka", 1), ('"', 1), ("mat", 6),
        (".", 7),
        ("the", 2), ("cat", 3), ("<unk>", 1),
        ("the", 2), ("cat", 3)]
    assert list(docs[0])[6:10] == ["step", "token", "token_id", "prediction"] and docs[0]["client_id"] == "c"


def test_a_context_starts_the_stream_before_the_messages_steps() -> None:
    """`context` alone, with steps, or with control start: the record resets the stream to init(context)."""
    for value, steps in ((b'{"context": [1, 2.5, -3]}', []), (b'{"context": [1, 2.5, -3], "x": [[0, 0, 0]]}', 1),
                         (b'{"control": "start", "context": [1, 2.5, -3]}', [])):
        r = record(START, value)
        assert r.context == [1.0, 2.5, -3.0] and r.reset and not r.end
        assert r.remaining == (steps if isinstance(steps, int) else 0) + 1
    plain = record(START, b'{"x": [0, 0, 0]}')
    assert plain.context is None and not plain.reset


def test_the_one_step_record_of_the_fast_path_equals_the_constructors_in_every_slot() -> None:
    """``codec.one_step`` sets the slots itself (the common message's Record, built once per message):
    a slot added to Record and forgotten there would be unset or wrong."""
    fast = codec.one_step(b"dev-1", 3, 41, 1_700_000_000_000, [0.5, 1.0, 2.0])
    made = Record(b"dev-1", 3, 41, 1_700_000_000_000, [[0.5, 1.0, 2.0]])
    assert {s: getattr(fast, s) for s in Record.__slots__} == {s: getattr(made, s) for s in Record.__slots__}
    decoded = Decoder(numeric_spec(), config(), "in").decode(b"dev-1", b'{"x":[0.5,1,2]}', 3, 41,
                                                              1_700_000_000_000)
    assert {s: getattr(decoded, s) for s in Record.__slots__} == {s: getattr(made, s) for s in Record.__slots__}
