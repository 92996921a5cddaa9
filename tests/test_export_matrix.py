"""Every cell type × input kind × head exports, and the written bundle matches PyTorch.

The reference is computed here, independently of the exporter's own parity check: PyTorch
over the full sequence in one call, against ONNX Runtime on the file that was written,
step by step (T=1 per call) and in chunks of 16, at B ∈ {1, 7, 512}.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rnnd.daemon.bundle import InputSpec, OutputSpec, TokenizerSpec, content_hash, read_spec
from rnnd.export import protocol, zoo
from rnnd.export.exporter import ExportOptions, export_bundle

VOCAB = tuple(["<pad>", "<unk>"] + [f"w{i}" for i in range(22)])
INPUTS = {
    "numeric": InputSpec("numeric", features=("a", "b", "c"), mean=(1.0, 2.0, 3.0), std=(2.0, 1.0, 0.5)),
    "tokens": InputSpec("tokens", tokenizer=TokenizerSpec("word", VOCAB, unk_id=1, pad_id=0)),
}
HEADS = {
    "regression": OutputSpec("regression", names=("y1", "y2"), mean=(0.5, -1.0), std=(2.0, 3.0)),
    "classification": OutputSpec("classification", labels=("neg", "neu", "pos")),
    "language_model": OutputSpec("language_model", vocab=VOCAB),
}
COMBOS = [(cell, inp, head) for cell in ("rnn", "lstm", "gru") for inp in INPUTS for head in HEADS
          if not (inp == "numeric" and head == "language_model")]
VARIANTS = [("lstm", "numeric", "regression", {"layers": 2}), ("gru", "tokens", "classification", {"layers": 3}),
            ("rnn", "numeric", "classification", {"layers": 2}),
            ("lstm", "numeric", "regression", {"proj_size": 5}),
            ("lstm", "tokens", "language_model", {"layers": 2, "proj_size": 6})]


def make_model(cell: str, inp: str, head: str, **extra) -> torch.nn.Module:
    torch.manual_seed(hash((cell, inp, head)) % 1000)
    kw = {"cell": cell, "hidden": 12, "out_size": HEADS[head].size, **extra}
    if inp == "tokens":
        kw.update(vocab_size=len(VOCAB), embed_dim=6)
    else:
        kw.update(n_features=3)
    return zoo.build(**kw).eval()


def inputs(inp: str, b: int, t: int, rng: np.random.Generator) -> np.ndarray:
    if inp == "tokens":
        return rng.integers(0, len(VOCAB), size=(b, t), dtype=np.int64)
    return rng.standard_normal((b, t, 3)).astype(np.float32)


def assert_bundle_matches_torch(path, model, inp: str) -> None:
    spec = read_spec(path)  # ORT alone
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    decls = protocol.derive_state(model)
    rng = np.random.default_rng(0)
    for b in (1, 7, 512):
        x = inputs(inp, b, 32, rng)
        with torch.no_grad():
            ref = model(torch.from_numpy(x), *[torch.zeros((*d.shape[:d.batch_axis], b, *d.shape[d.batch_axis:]))
                                                for d in decls])[0].numpy()
        for chunk in (1, 16):
            state = {s.input_name: np.zeros(s.graph_shape(b), np.float32) for s in spec.states}
            ys = []
            for t0 in range(0, 32, chunk):
                out = sess.run(None, {"x": x[:, t0:t0 + chunk], **state})
                named = dict(zip([o.name for o in sess.get_outputs()], out, strict=True))
                ys.append(named["y"])
                state = {s.input_name: named[s.output_name] for s in spec.states}
            err = np.max(np.abs(np.concatenate(ys, axis=1) - ref))
            assert err <= 1e-4, (b, chunk, err)


def assert_symbolic(path, n_states: int) -> None:
    m = onnx.load(str(path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*m.graph.input, *m.graph.output]}
    assert dims["x"][:2] == ["B", "T"] and dims["y"][:2] == ["B", "T"], dims
    states = [n for n in dims if n not in ("x", "y")]
    assert len(states) == 2 * n_states
    for n in states:
        assert dims[n][1] == "B", (n, dims[n])


@pytest.mark.parametrize(("cell", "inp", "head"), COMBOS)
def test_every_cell_input_and_head(tmp_path, cell, inp, head):
    model = make_model(cell, inp, head)
    result = export_bundle(model, ExportOptions(name=f"{cell}-{inp}-{head}", input=INPUTS[inp], output=HEADS[head]),
                           tmp_path / "m.onnx")
    assert_bundle_matches_torch(result.path, model, inp)
    assert_symbolic(result.path, len(result.spec.states))
    assert result.spec.provenance and result.spec.provenance.graph_strategy == "native"
    # The exporter's own report: measured, within tolerance, every B and chunk covered.
    report = result.spec.parity
    assert report is not None and 0 <= report.max_abs_err <= 1e-4
    assert {(c.batch, c.chunk) for c in report.cases} == {(b, t) for b in (1, 7, 512) for t in (1, 16)}


@pytest.mark.parametrize(("cell", "inp", "head", "extra"), VARIANTS)
def test_stacked_and_projected(tmp_path, cell, inp, head, extra):
    model = make_model(cell, inp, head, **extra)
    result = export_bundle(model, ExportOptions(name="v", input=INPUTS[inp], output=HEADS[head]), tmp_path / "m.onnx")
    assert_bundle_matches_torch(result.path, model, inp)
    assert_symbolic(result.path, len(result.spec.states))
    layers = extra.get("layers", 1)
    h = result.spec.states[0]
    assert h.shape == (layers, extra.get("proj_size") or 12) and h.batch_axis == 1
    if extra.get("proj_size"):
        # ONNX's LSTM op has no projection: the exporter loops a step graph in Scan.
        assert result.spec.provenance.graph_strategy == "scan"
        assert result.spec.states[1].shape == (layers, 12)


def test_metadata_round_trip_through_onnxruntime_alone(tmp_path):
    model = make_model("lstm", "tokens", "classification")
    result = export_bundle(model, ExportOptions(name="rt", version="7", description="round trip",
                                                input=INPUTS["tokens"], output=HEADS["classification"],
                                                warmup_steps=3), tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert "rnnd.bundle" in meta
    spec = read_spec(result.path)
    assert spec == result.spec
    assert spec.model.ref == "rt@7" and spec.warmup_steps == 3
    assert spec.input.tokenizer.vocab == VOCAB and spec.output.labels == ("neg", "neu", "pos")
    assert spec.state_hash == result.spec.state_hash and len(spec.state_hash) == 16
    assert spec.content_hash == content_hash(onnx.load(str(result.path)))
