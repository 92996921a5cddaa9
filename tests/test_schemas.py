"""schemas/ is a published contract: it must agree with what the daemon accepts and writes.

The schemas are hand-written documentation, so nothing else keeps them honest: these tests
tie every example to its schema, the schemas to the decoder (what validates must decode,
and the malformed messages listed here must fail both), and the output schema to documents
built by the pipeline's own code rather than to hand-written examples alone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from jsonschema import Draft202012Validator

from rnnd.daemon import codec
from rnnd.daemon.bundle import BundleSpec, ContextStart, InputSpec, ModelInfo, OutputSpec, StateSpec, TokenizerSpec
from rnnd.daemon.codec import DeadLetter, Decoder, Record
from rnnd.daemon.config import ServeConfig
from rnnd.daemon.heads import Heads
from rnnd.daemon.tokenizer import Tokenizer

SCHEMAS = Path(__file__).parent.parent / "schemas"
EXAMPLES = SCHEMAS / "examples"
KINDS = ("input", "output", "dead-letter")
FEATURES = ("temp", "humidity", "pressure")  # the names the named-feature examples use
VOCAB = ("<pad>", "<unk>", "the", "cat", "sat", "on", "mat", ".", "and", "a", "dog")


def schema(kind: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{kind}.schema.json").read_text())


def validator(kind: str) -> Draft202012Validator:
    # No format checker: formats are annotations in 2020-12, and the examples must not depend
    # on which optional format libraries happen to be installed.
    return Draft202012Validator(schema(kind))


def examples(kind: str) -> list[Path]:
    return sorted(EXAMPLES.glob(f"{kind}-*.json"))


def errors(kind: str, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator(kind).iter_errors(doc)]


# --- specs built by hand: what the examples are written for -------------------------------

def _spec(input: InputSpec, output: OutputSpec, name: str = "m") -> BundleSpec:
    return BundleSpec(model=ModelInfo(name, "1"), mode="stateful", input=input, output=output,
                      states=(StateSpec("h", (1, 8), 0, "h_in", "h_out"),))


def numeric_spec() -> BundleSpec:
    return _spec(InputSpec("numeric", features=FEATURES, mean=(20.0, 50.0, 1013.0), std=(5.0, 10.0, 5.0)),
                 OutputSpec("regression", names=FEATURES, next_of=FEATURES), "weather")


def single_feature_spec() -> BundleSpec:
    return _spec(InputSpec("numeric", features=("level",)), OutputSpec("regression", names=("level",)))


def classifier_spec() -> BundleSpec:
    return _spec(InputSpec("numeric", features=FEATURES),
                 OutputSpec("classification", labels=("normal", "bearing_wear", "imbalance")))


def tokens_spec() -> BundleSpec:
    tok = TokenizerSpec("word", VOCAB, unk_id=1, pad_id=0)
    return _spec(InputSpec("tokens", tokenizer=tok), OutputSpec("language_model", vocab=VOCAB), "tiny-lm")


def spec_for(doc: dict[str, Any]) -> BundleSpec:
    """The bundle an input example is meant for, read off its content."""
    if "context" in doc:  # a model with init(context), contexts of as many values as the example's
        return dataclasses.replace(tokens_spec() if "text" in doc or "tokens" in doc else numeric_spec(),
                                   start=ContextStart(len(doc["context"])))
    if "text" in doc or "tokens" in doc:
        return tokens_spec()
    if isinstance(doc.get("x"), (int, float)):
        return single_feature_spec()
    return numeric_spec()


def decode(doc: Any, spec: BundleSpec | None = None, key: bytes | None = b"k") -> Record | DeadLetter:
    spec = spec or spec_for(doc if isinstance(doc, dict) else {})
    return Decoder(spec, ServeConfig(), "in").decode(key, orjson.dumps(doc), 0, 7, 1_700_000_000_000)


# --- the schemas and their examples ---------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_valid_draft_2020_12(kind: str) -> None:
    doc = schema(kind)
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(doc)


@pytest.mark.parametrize("kind", KINDS)
def test_every_top_level_field_is_documented(kind: str) -> None:
    props = schema(kind)["properties"]
    assert props
    undocumented = [name for name, sub in props.items() if not sub.get("description")]
    assert not undocumented, f"{kind}: fields without a description: {undocumented}"


@pytest.mark.parametrize(("kind", "at_least"), [("input", 7), ("output", 5), ("dead-letter", 2)])
def test_examples_exist(kind: str, at_least: int) -> None:
    assert len(examples(kind)) >= at_least
    unknown = [p.name for p in EXAMPLES.glob("*.json") if not p.name.startswith(tuple(f"{k}-" for k in KINDS))]
    assert not unknown, f"examples whose name says no schema: {unknown}"


@pytest.mark.parametrize("path", [p for k in KINDS for p in examples(k)], ids=lambda p: p.name)
def test_example_validates(path: Path) -> None:
    kind = next(k for k in sorted(KINDS, key=len, reverse=True) if path.name.startswith(f"{k}-"))
    assert errors(kind, json.loads(path.read_text())) == []


def test_output_examples_cover_every_prediction_kind() -> None:
    preds = [json.loads(p.read_text())["prediction"] for p in examples("output")]
    assert any("values" in p and "forecast" not in p for p in preds)
    assert any("forecast" in p for p in preds)
    assert any("label" in p for p in preds)
    assert any("next" in p and "generated" not in p for p in preds)
    assert any("generated" in p for p in preds)
    assert any("output_ids" in p for p in preds)


def test_dead_letter_reasons_are_the_codecs() -> None:
    enum = schema("dead-letter")["properties"]["reason"]["enum"]
    assert len(enum) == len(set(enum))
    assert set(enum) == set(codec.REASONS)


# --- input: the schema and the decoder agree -------------------------------------------------

@pytest.mark.parametrize("path", examples("input"), ids=lambda p: p.name)
def test_input_example_decodes(path: Path) -> None:
    doc = json.loads(path.read_text())
    item = decode(doc)
    assert isinstance(item, Record), item
    steps = item.steps
    if "x" in doc or "text" in doc or "tokens" in doc:
        assert steps, "a message with input must yield at least one step"
    else:
        assert steps == [] and (item.reset or item.end)
    assert item.reset == (doc.get("control") in ("reset", "start") or "context" in doc)
    assert item.context == doc.get("context")
    assert item.end == (doc.get("control") == "end")
    x = doc.get("x")
    if isinstance(x, list) and x and isinstance(x[0], (list, dict)):
        assert len(steps) == len(x)
    if isinstance(x, dict):
        assert steps == [[float(x[f]) for f in FEATURES]]
    if "tokens" in doc:
        assert steps == doc["tokens"]
    echoed = {k: doc[k] for k in ("event_time", "client_id") if k in doc}
    assert (item.echo or {}) == echoed


BAD_INPUTS: list[tuple[str, Any, str]] = [
    ("nothing", {}, codec.NO_INPUT),
    ("only-ignored-fields", {"event_time": 1}, codec.NO_INPUT),
    ("x-and-text", {"x": [1.0, 2.0, 3.0], "text": "the cat"}, codec.WRONG_TYPE),
    ("text-and-tokens", {"text": "the cat", "tokens": [2]}, codec.WRONG_TYPE),
    ("unknown-control", {"control": "stop"}, codec.UNKNOWN_CONTROL),
    ("x-empty", {"x": []}, codec.NO_INPUT),
    ("x-string", {"x": "21.3"}, codec.WRONG_TYPE),
    ("x-bool-value", {"x": [True, 1.0, 2.0]}, codec.WRONG_TYPE),
    ("x-named-string", {"x": {"temp": "hot", "humidity": 1.0, "pressure": 2.0}}, codec.WRONG_TYPE),
    ("x-mixed-steps", {"x": [[1.0, 2.0, 3.0], {"temp": 1.0, "humidity": 2.0, "pressure": 3.0}]}, codec.WRONG_TYPE),
    ("tokens-empty", {"tokens": []}, codec.NO_INPUT),
    ("tokens-negative", {"tokens": [2, -1]}, codec.TOKEN_OUT_OF_RANGE),
    ("tokens-not-int", {"tokens": [2, 3.5]}, codec.WRONG_TYPE),
    ("text-empty", {"text": ""}, codec.NO_INPUT),
    ("text-not-string", {"text": ["the", "cat"]}, codec.WRONG_TYPE),
]


@pytest.mark.parametrize(("doc", "reason"), [(d, r) for _, d, r in BAD_INPUTS], ids=[n for n, _, _ in BAD_INPUTS])
def test_malformed_input_fails_schema_and_decoder(doc: dict[str, Any], reason: str) -> None:
    assert errors("input", doc), "the schema accepts a message the daemon dead-letters"
    item = decode(doc)
    assert isinstance(item, DeadLetter)
    assert item.reason == reason


# --- dead letters: what the decoder writes validates ---------------------------------------

@pytest.mark.parametrize(("key", "value", "reason"), [
    (b"sensor-1", b"not json", codec.NOT_JSON),
    (b"sensor-1", None, codec.NOT_JSON),
    (b"sensor-1", b"[1, 2]", codec.NOT_OBJECT),
    (None, b'{"x": [1, 2, 3]}', codec.NO_KEY),
    (b"k" * 5000, b'{"x": [1, 2, 3]}', codec.KEY_TOO_LONG),  # cut to its first bytes, with key_bytes
    (b"\xff\xfe", b'{"x": [1, 2]}', codec.FEATURE_COUNT),
    (b"sensor-1", b'{"x": [NaN, 2, 3]}', codec.NON_FINITE),
    (b"sensor-1", b'{"text": "the cat"}', codec.WRONG_INPUT_KIND),
])
def test_decoder_dead_letters_validate(key: bytes | None, value: bytes | None, reason: str) -> None:
    item = Decoder(numeric_spec(), ServeConfig(), "readings").decode(key, value, 3, 12, 1_700_000_000_000)
    assert isinstance(item, DeadLetter)
    assert item.reason == reason
    assert errors("dead-letter", orjson.loads(item.encode())) == []


# --- output: documents built by the pipeline's own code validate ----------------------------

def _documents(spec: BundleSpec, y: np.ndarray, *, forecast: np.ndarray | None = None,
               generated: np.ndarray | None = None, echo: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Predictions as ``Pipeline.finish`` builds them, without an ONNX model.

    Runs the pipeline's own code — heads, the forecast/generation attachments, the output
    encoder — so a change to the output format shows up here as a schema failure.
    """
    heads = Heads(spec, top_k=3)
    tok = Tokenizer(spec.input.tokenizer) if spec.input.tokenizer else None
    if forecast is None and generated is None:
        preds = heads.encoded(y)
    else:
        preds = heads.with_rollouts(y, forecast, generated, tok)
    vocab = spec.input.tokenizer.vocab if spec.input.kind == "tokens" and spec.input.tokenizer else None
    # token models' documents name each step's token: a known one, and a word outside the vocabulary
    ids, words = ([3, 1] * len(preds))[:len(preds)], (["cat", "zyzzyva"] * len(preds))[:len(preds)]
    record = Record(b"\xff-binary-key", 1, 40, 1_700_000_000_000, ids if vocab else [], echo=echo,
                    words=words if vocab else None)
    # one stream, len(preds) steps from step 5; warm-up ends after step 5
    encoder = codec.Encoder("in", spec.model.ref, warmup_steps=6, vocab=vocab)
    docs = encoder.documents([(record, i) for i in range(len(preds))], [5 + i for i in range(len(preds))], preds,
                             1_700_000_000_009)
    return [orjson.loads(d) for d in docs]


def test_pipeline_documents_validate() -> None:
    rng = np.random.default_rng(0)
    y3 = rng.standard_normal((2, 3)).astype(np.float32)
    docs = _documents(numeric_spec(), y3, echo={"event_time": "t0", "client_id": "c"})
    docs += _documents(numeric_spec(), y3, forecast=rng.standard_normal((2, 4, 3)).astype(np.float32))
    docs += _documents(classifier_spec(), y3)
    lm_y = rng.standard_normal((2, len(VOCAB))).astype(np.float32)
    docs += _documents(tokens_spec(), lm_y)
    docs += _documents(tokens_spec(), lm_y, generated=rng.integers(0, len(VOCAB), (2, 4)))
    ended = orjson.loads(codec.with_fields(orjson.dumps(docs[0]), {"ended": True}))  # what Pipeline._on_end adds
    assert ended == {**docs[0], "ended": True}
    for doc in [*docs, ended]:
        assert errors("output", doc) == [], doc
    assert docs[0]["id"] == "in/1/40/0" and docs[1]["id"] == "in/1/40/1"


def test_non_finite_regression_output_validates_as_null() -> None:
    """JSON has no NaN: orjson writes it as null, and the schema says so rather than lying."""
    docs = _documents(numeric_spec(), np.array([[np.nan, np.inf, 1.0]], dtype=np.float32))
    assert docs[0]["prediction"]["values"]["temp"] is None
    assert errors("output", docs[0]) == []


@pytest.mark.parametrize(("change", "where"), [
    (lambda d: d.pop("id"), "<root>"),
    (lambda d: d.update(extra=1), "<root>"),
    (lambda d: d.update(prediction={"values": {"a": 1.0}, "label": "x"}), "prediction"),
    (lambda d: d.update(prediction={"label": "x"}), "prediction"),
    (lambda d: d.update(ended=False), "ended"),
])
def test_output_schema_rejects_drift(change: Any, where: str) -> None:
    doc = json.loads((EXAMPLES / "output-regression.json").read_text())
    change(doc)
    found = errors("output", doc)
    assert found and any(e.startswith(f"{where}:") for e in found), found


def test_encoded_documents_escape_keys_and_copy_inputs() -> None:
    """The output encoder fills a bytes template: keys that need JSON escaping, binary keys and
    copied input fields must still give exactly the document a JSON serialiser would."""
    enc = codec.Encoder("in.readings", "m@2", warmup_steps=1)
    keys = ['quote"back\\slash', "ünïcode ✓", "tab\tnewline\n"]
    records = [Record(k.encode(), 2, 7 + i, 1_700_000_000_000 + i, [[0.0]]) for i, k in enumerate(keys)]
    records.append(Record(b"\xff\xfe", 0, 1, 5, [[0.0]], echo={"event_time": "2026-01-01T00:00:00Z", "client_id": 3}))
    preds = [b'{"values":{"y":1.5}}'] * len(records)
    docs = [orjson.loads(d) for d in enc.documents([(r, 0) for r in records], [0, 1, 2, 3], preds, 99)]
    for doc, r, step in zip(docs, records, [0, 1, 2, 3], strict=True):
        expect = {"key": codec.key_text_or_base64(r.key), "id": f"in.readings/{r.partition}/{r.offset}/0",
                  "topic": "in.readings", "partition": r.partition, "offset": r.offset, "index": 0, "step": step,
                  "prediction": {"values": {"y": 1.5}}, "warmup": step < 1, "model": "m@2",
                  "input_ts": r.timestamp, "output_ts": 99, **(r.echo or {})}
        assert doc == expect
        assert errors("output", doc) == []
    assert docs[3]["key"] == "//4="  # not UTF-8: base64, as documented


@pytest.mark.parametrize("top_k", [1, 3, 5])
@pytest.mark.parametrize("make", [numeric_spec, classifier_spec, tokens_spec], ids=["regression", "classes", "lm"])
def test_encoded_predictions_are_the_dict_predictions(make: Any, top_k: int) -> None:
    """The hot path encodes predictions in bulk (``Heads.encoded``); forecasts and generation
    start from the dict form (``Heads.predictions``). Both must say the same, number for number."""
    spec = make()
    heads = Heads(spec, top_k=top_k)
    y = np.random.default_rng(top_k).standard_normal((9, spec.output.size)).astype(np.float32) * 4
    y[2, 0] = np.nan if spec.output.kind == "regression" else y[2, 0]
    encoded = [orjson.loads(b) for b in heads.encoded(y)]
    assert encoded == heads.predictions(y)
    assert len(encoded) == 9 and heads.encoded(y[:0]) == []
