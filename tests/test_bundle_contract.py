"""The bundle contract as the daemon sees it: torch-free, versioned, validated."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from rnnd.daemon.bundle import (
    BundleError,
    BundleSpec,
    InputSpec,
    ModelInfo,
    OutputSpec,
    StateSpec,
    TokenizerSpec,
    decode_array,
    encode_array,
)
from rnnd.daemon.tokenizer import Tokenizer, build_vocab


def spec(**over) -> BundleSpec:
    base = dict(
        model=ModelInfo("m", "1"), mode="stateful",
        input=InputSpec("numeric", features=("a", "b"), mean=(0.0, 1.0), std=(1.0, 2.0)),
        output=OutputSpec("regression", names=("y",)),
        states=(StateSpec("h", (2, 8), 1, "h_in", "h_out"),))
    base.update(over)
    return BundleSpec(**base)


def test_json_round_trip_and_state_hash():
    s = spec(states=(StateSpec("h", (2, 8), 1, "h_in", "h_out", init="learned",
                               init_value=encode_array(np.arange(16, dtype=np.float32))),))
    back = BundleSpec.from_json(s.to_json())
    assert back == s
    np.testing.assert_array_equal(back.states[0].initial(), np.arange(16, dtype=np.float32).reshape(2, 8))
    assert back.state_bytes_per_stream == 64
    # The state hash follows the layout, not the initial value.
    same_layout = spec()
    other = spec(states=(StateSpec("h", (2, 16), 1, "h_in", "h_out"),))
    assert s.state_hash == same_layout.state_hash != other.state_hash


def test_unknown_format_version_is_refused_with_advice():
    doc = json.loads(spec().to_json())
    doc["format_version"] = 99
    with pytest.raises(BundleError, match="re-export"):
        BundleSpec.from_json(json.dumps(doc))


def test_tampered_state_hash_is_detected():
    doc = json.loads(spec().to_json())
    doc["state_hash"] = "0" * 16
    with pytest.raises(BundleError, match="state hash"):
        BundleSpec.from_json(json.dumps(doc))


@pytest.mark.parametrize(("change", "message"), [
    ({"mode": "window"}, "carries no state"),
    ({"mode": "stateful", "states": ()}, "at least one state"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"output": OutputSpec("language_model", vocab=("a", "b"))}, "needs token input"),
    ({"states": (StateSpec("x", (1,), 0, "x", "x_out"),)}, "distinct"),
])
def test_inconsistent_specs_are_refused(change, message):
    with pytest.raises(BundleError, match=message):
        spec(**change)


def test_field_validation():
    with pytest.raises(BundleError, match="std must be positive"):
        InputSpec("numeric", features=("a",), std=(0.0,))
    with pytest.raises(BundleError, match="unk_id"):
        TokenizerSpec("word", ("a",), unk_id=3)
    with pytest.raises(BundleError, match="two labels"):
        OutputSpec("classification", labels=("only",))


def test_array_codec_is_exact():
    a = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(decode_array(encode_array(a), "float32", (3, 4)), a)
    ids = np.array([[0, 5, 2**40]], dtype=np.int64)
    np.testing.assert_array_equal(decode_array(encode_array(ids), "int64", (1, 3)), ids)


def test_tokenizer_word_and_char():
    vocab = build_vocab(["The cat sat.", "the dog sat!"], level="word")
    tok = Tokenizer(vocab)
    assert vocab.vocab[:2] == ("<pad>", "<unk>")
    ids = tok.encode("THE cat flew.")
    assert tok.decode(ids) == ["the", "cat", "<unk>", "."]
    chars = Tokenizer(build_vocab(["hello"], level="char"))
    assert chars.decode(chars.encode("hex")) == ["h", "e", "<unk>"]
    assert chars.join(["h", "e"]) == "he" and tok.join(["a", "b"]) == "a b"


def test_serving_side_imports_no_torch(tmp_path):
    """Load a real bundle, run it and inspect it, in a process where importing torch fails."""
    import torch

    from rnnd.export import zoo
    from rnnd.export.exporter import ExportOptions, export_bundle

    torch.manual_seed(0)
    out = tmp_path / "m.onnx"
    export_bundle(zoo.build(cell="gru", n_features=2, hidden=8, out_size=1),
                  ExportOptions(name="m", input=InputSpec("numeric", features=("a", "b")),
                                output=OutputSpec("regression", names=("y",))), out)
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from rnnd.daemon.bundle import read_spec
from rnnd.daemon.runtime import BundleModel
from rnnd.cli import main
spec = read_spec({str(out)!r})
model = BundleModel({str(out)!r})
y, state = model.run_sequence(np.zeros((3, 5, 2), np.float32), chunk=2)
assert y.shape == (3, 5, 1) and model.self_check() < 1e-4
assert main(["inspect", {str(out)!r}]) == 0
assert "torch" not in [m.split(".")[0] for m, v in sys.modules.items() if v is not None]
print("no torch")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("no torch")


def test_spec_is_plain_data():
    # Frozen dataclasses all the way down: the contract cannot be mutated by a reader.
    s = spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.mode = "window"  # type: ignore[misc]
