"""A bundle cannot be changed silently: every reader checks its content hash and refuses a mismatch.

The tampering is done the way a person would do it: load the file with onnx, change a weight or
a metadata field, save it again. The readers are the real commands (`serve --check`, `serve`,
`verify`, `inspect`), run in-process through the same entry point as the console script.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cli_checks
import numpy as np
import onnx
import pytest

from rnnd.daemon.bundle import (
    METADATA_KEY,
    BundleIntegrityError,
    attach,
    content_hash,
    graph_hash,
    read_spec,
    spec_from_metadata,
)
from rnnd.daemon.runtime import BundleModel

MODIFIED = "was modified after export (its content hash does not match): re-export it with rnnd export"
# Nothing listens here: a reader that tried Kafka would fail with a connection error, not ours.
NO_BROKER = "127.0.0.1:9"
LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO) ")


def one_line_error(res: Any, code: int, pattern: str) -> str:
    """Exit ``code`` and one line of error (the daemon's own log records aside)."""
    return cli_checks.one_line_error(res, code, pattern, ignore=LOG_RECORD)


def document(model: onnx.ModelProto) -> dict[str, Any]:
    return json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))


def set_document(model: onnx.ModelProto, doc: dict[str, Any]) -> None:
    next(p for p in model.metadata_props if p.key == METADATA_KEY).value = json.dumps(doc)


def flip_weight(model: onnx.ModelProto) -> None:
    """One bit of the largest initializer: a weight that is slightly off, the graph otherwise unchanged."""
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = bytearray(weight.raw_data)
    raw[0] ^= 0x01
    weight.raw_data = bytes(raw)


def edit_mean(model: onnx.ModelProto) -> None:
    doc = document(model)
    doc["input"]["mean"][0] += 0.5
    set_document(model, doc)


TAMPER: dict[str, Callable[[onnx.ModelProto], None]] = {"flipped-weight": flip_weight, "edited-mean": edit_mean}


@pytest.fixture(scope="module")
def bundles(recipe_bundle, tmp_path_factory) -> dict[str, Path]:
    """The sensors recipe's bundle, untouched (copied) and with each tampering applied."""
    src = recipe_bundle("sensors")
    assert read_spec(src).input.mean, "the edit-mean case needs a normalised numeric input"
    folder = tmp_path_factory.mktemp("integrity")
    out = {"untouched": folder / "untouched.onnx"}
    shutil.copy(src, out["untouched"])
    for name, tamper in TAMPER.items():
        model = onnx.load(str(src))
        tamper(model)
        onnx.save(model, str(folder / f"{name}.onnx"))
        out[name] = folder / f"{name}.onnx"
    return out


@pytest.fixture
def kafka_args(topic_factory) -> Iterator[Callable[[str], list[str]]]:
    def args(bootstrap: str) -> list[str]:
        return ["--input-topic", topic_factory("integ-in", 1), "--output-topic", topic_factory("integ-out", 1),
                "--bootstrap-servers", bootstrap]

    yield args


def test_untouched_bundle_passes_every_reader(rnnd, bundles, bootstrap, kafka_args):
    path = bundles["untouched"]
    res = rnnd("inspect", path)
    assert res.code == 0, res.err
    assert "content hash : " in res.out and "… ok" in res.out
    res = rnnd("serve", "--model", path, "--input-topic", "i", "--output-topic", "o", "--check")
    assert res.code == 0 and res.out.startswith("ok: sensors@"), res.err
    # verify reads the (real, empty) topics and finds nothing missing.
    res = rnnd("verify", "--model", path, *kafka_args(bootstrap), "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["ok"] is True
    # Re-saving with onnx without changing anything is not a modification.
    resaved = path.with_name("resaved.onnx")
    onnx.save(onnx.load(str(path)), str(resaved))
    assert BundleModel(resaved).spec == BundleModel(path).spec


@pytest.mark.parametrize("tamper", list(TAMPER))
def test_serve_check_refuses_a_modified_bundle(rnnd, bundles, tamper):
    res = rnnd("serve", "--model", bundles[tamper], "--input-topic", "i", "--output-topic", "o", "--check")
    one_line_error(res, 2, f"{bundles[tamper]} {MODIFIED}")
    assert "ok:" not in res.out


@pytest.mark.parametrize("tamper", list(TAMPER))
def test_serve_refuses_to_start_on_a_modified_bundle(bundles, tamper):
    """The console script, in its own process: a daemon that did start would run until the timeout."""
    cmd = [sys.executable, "-m", "rnnd", "serve", "--model", str(bundles[tamper]), "--input-topic", "i",
           "--output-topic", "o", "--bootstrap-servers", NO_BROKER, "--http-port", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    one_line_error(SimpleNamespace(code=proc.returncode, out=proc.stdout, err=proc.stderr), 2, MODIFIED)


@pytest.mark.parametrize("tamper", list(TAMPER))
def test_verify_refuses_a_modified_bundle_before_touching_kafka(rnnd, bundles, tamper):
    res = rnnd("verify", "--model", bundles[tamper], "--input-topic", "i", "--output-topic", "o",
               "--bootstrap-servers", NO_BROKER)
    one_line_error(res, 2, MODIFIED)


@pytest.mark.parametrize("tamper", list(TAMPER))
def test_inspect_shows_what_it_can_and_exits_2(rnnd, bundles, tamper):
    res = rnnd("inspect", bundles[tamper])
    one_line_error(res, 2, MODIFIED)
    assert "bundle       : sensors@" in res.out
    assert "MISMATCH: the file was modified after export" in res.out
    res = rnnd("inspect", bundles[tamper], "--json")
    assert res.code == 2
    assert json.loads(res.out)["inspect"]["content_hash_ok"] is False


@pytest.mark.parametrize("tamper", list(TAMPER))
def test_the_library_readers_refuse_too(bundles, tamper):
    with pytest.raises(BundleIntegrityError, match="modified after export"):
        BundleModel(bundles[tamper])
    with pytest.raises(BundleIntegrityError, match="modified after export"):
        read_spec(bundles[tamper])


def test_an_edit_is_reported_as_such_even_when_it_also_broke_the_file(rnnd, bundles, tmp_path):
    """Not "std must be positive" or ONNX Runtime's load error: the cause is the edit."""

    def negative_std(m: onnx.ModelProto) -> None:
        doc = document(m)
        doc["input"]["std"][0] = -1.0
        set_document(m, doc)

    def unknown_op(m: onnx.ModelProto) -> None:
        m.graph.node[0].op_type = "NoSuchOp"

    for change in (negative_std, unknown_op):
        model = onnx.load(str(bundles["untouched"]))
        change(model)
        path = tmp_path / f"{change.__name__}.onnx"
        onnx.save(model, str(path))
        for argv in (("inspect", path), ("serve", "--model", path, "--input-topic", "i", "--output-topic", "o",
                                         "--check")):
            one_line_error(rnnd(*argv), 2, MODIFIED)


def test_format_1_bundles_are_refused_with_advice(rnnd, bundles, tmp_path):
    """What the previous rnnd wrote: format 1, a hash of the graph alone (so an edited mean passed)."""
    model = onnx.load(str(bundles["untouched"]))
    doc = document(model)
    doc["input"]["mean"][0] += 0.5
    doc["format_version"] = 1
    doc["content_hash"] = graph_hash(model)
    set_document(model, doc)
    old = tmp_path / "format1.onnx"
    onnx.save(model, str(old))
    for argv in (("inspect", old), ("serve", "--model", old, "--input-topic", "i", "--output-topic", "o", "--check"),
                 ("verify", "--model", old, "--input-topic", "i", "--output-topic", "o",
                  "--bootstrap-servers", NO_BROKER)):
        one_line_error(rnnd(*argv), 2, "older rnnd (bundle format 1)")
        assert "re-export it with rnnd export" in rnnd(*argv).err


def test_a_duplicated_metadata_key_is_refused(bundles, tmp_path):
    """ONNX Runtime keeps one of two values for a key; the checked document must be the served one."""
    model = onnx.load(str(bundles["untouched"]))
    doc = document(model)
    doc["input"]["mean"][0] += 0.5
    extra = model.metadata_props.add()
    extra.key, extra.value = METADATA_KEY, json.dumps(doc)
    path = tmp_path / "twice.onnx"
    onnx.save(model, str(path))
    with pytest.raises(BundleIntegrityError, match="twice"):
        BundleModel(path)


# --- what the hash covers ---------------------------------------------------------------------


def leaves(value: Any, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            yield from leaves(v, (*path, i))
    else:
        yield path


def changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return 0
    if isinstance(value, list):
        return [0]
    if isinstance(value, dict):
        return {"added": 1}
    raise AssertionError(type(value))


def with_change(model: onnx.ModelProto, path: tuple) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    doc = document(copy)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = changed(node[path[-1]])
    set_document(copy, doc)
    return copy


@pytest.fixture(scope="module")
def sealed(bundles) -> onnx.ModelProto:
    return onnx.load(str(bundles["untouched"]))


def test_every_top_level_field_of_the_document_is_covered(sealed):
    doc = document(sealed)
    expected = content_hash(sealed)
    assert doc["content_hash"] == expected
    top = sorted(set(doc) - {"content_hash"})
    # Every field the spec has (plus the derived state hash) is in the document.
    assert set(top) >= {"model", "mode", "input", "output", "states", "warmup_steps", "window", "x_name", "y_name",
                        "parity", "self_check", "provenance", "format_version", "extra", "state_hash"}
    for key in top:
        assert content_hash(with_change(sealed, (key,))) != expected, key


def test_every_leaf_of_the_document_is_covered(sealed):
    doc = document(sealed)
    expected = content_hash(sealed)
    paths = [p for p in leaves(doc) if p != ("content_hash",)]
    assert len(paths) > 50  # features, states, parity cases, provenance, ...
    for path in paths:
        assert content_hash(with_change(sealed, path)) != expected, path


def test_other_metadata_and_the_rest_of_the_model_are_covered(sealed):
    expected = content_hash(sealed)

    def hash_after(change: Callable[[onnx.ModelProto], None]) -> str:
        copy = onnx.ModelProto()
        copy.CopyFrom(sealed)
        change(copy)
        return content_hash(copy)

    def add_key(m: onnx.ModelProto) -> None:
        entry = m.metadata_props.add()
        entry.key, entry.value = "rnnd.note", "hello"

    def bump_opset(m: onnx.ModelProto) -> None:
        m.opset_import[0].version += 1

    def rename_node(m: onnx.ModelProto) -> None:
        m.graph.node[0].name += "x"

    for change in (add_key, bump_opset, rename_node, flip_weight, edit_mean):
        assert hash_after(change) != expected, change.__name__
    # The stored hash itself, and the JSON's formatting, are not content.
    doc = document(sealed)

    def restate(m: onnx.ModelProto) -> None:
        doc2 = dict(doc, content_hash="0" * 64)
        next(p for p in m.metadata_props if p.key == METADATA_KEY).value = json.dumps(doc2, indent=3)

    assert hash_after(restate) == expected


def test_attach_seals_what_it_writes(sealed):
    """Re-attaching a changed spec (what `rnnd export` does) yields a bundle that loads and runs."""
    import dataclasses

    copy = onnx.ModelProto()
    copy.CopyFrom(sealed)
    spec = spec_from_metadata({p.key: p.value for p in copy.metadata_props})
    new = attach(copy, dataclasses.replace(spec, warmup_steps=spec.warmup_steps + 1))
    assert new.content_hash == content_hash(copy) != spec.content_hash
    model = BundleModel(copy.SerializeToString())
    assert model.spec == new and model.spec.warmup_steps == spec.warmup_steps + 1
    assert np.isfinite(model.self_check())
