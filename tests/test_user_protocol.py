"""The documented protocol, exercised with models written only in the tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import user_models as um
from rnnd.daemon.bundle import InputSpec, OutputSpec, TokenizerSpec
from rnnd.daemon.runtime import BundleModel
from rnnd.export import protocol
from rnnd.export.errors import ExportError, ParityError
from rnnd.export.exporter import ExportOptions, export_bundle


def num(n: int) -> InputSpec:
    return InputSpec("numeric", features=tuple(f"f{i}" for i in range(n)))


def reg(n: int) -> OutputSpec:
    return OutputSpec("regression", names=tuple(f"y{i}" for i in range(n)))


def torch_reference(model, x: np.ndarray) -> np.ndarray:
    decls = protocol.derive_state(model)
    init = protocol.learned_initial_state(model, decls)
    with torch.no_grad():
        return protocol.call(model, torch.from_numpy(x), protocol.batched(decls, x.shape[0], init))[0].numpy()


def check_against_torch(path, model, x: np.ndarray) -> None:
    bundle = BundleModel(path)
    ref = torch_reference(model, x)
    for chunk in (1, 16, x.shape[1]):
        y, _ = bundle.run_sequence(x, chunk=chunk)
        assert np.max(np.abs(y - ref)) <= 1e-4, chunk


def test_layers_of_different_sizes_with_layernorm_and_residual(tmp_path):
    torch.manual_seed(0)
    model = um.MixedStack().eval()
    result = export_bundle(model, ExportOptions(name="mixed", input=num(3), output=reg(2)), tmp_path / "m.onnx")
    # State derived from the layers in module order: GRU h, then LSTM h and c.
    assert [(s.name, s.shape) for s in result.spec.states] == [("h0", (1, 32)), ("h1", (1, 16)), ("c1", (1, 16))]
    x = np.random.default_rng(1).standard_normal((7, 40, 3)).astype(np.float32)
    check_against_torch(result.path, model, x)


def test_hand_written_cell_loops_in_onnx_and_keeps_learned_initial_state(tmp_path):
    torch.manual_seed(0)
    model = um.HandCell().eval()
    result = export_bundle(model, ExportOptions(name="hand", input=num(2), output=reg(1)), tmp_path / "m.onnx")
    assert result.spec.provenance.graph_strategy == "scan"  # a traced Python loop would freeze T
    (h,) = result.spec.states
    assert h.batch_axis == 0 and h.init == "learned"
    np.testing.assert_array_equal(h.initial(), model.h0.detach().numpy())
    x = np.random.default_rng(2).standard_normal((5, 37, 2)).astype(np.float32)
    check_against_torch(result.path, model, x)


def test_token_model_with_mixed_stack_and_projection(tmp_path):
    torch.manual_seed(0)
    model = um.TokenTagger().eval()
    vocab = tuple(f"t{i}" for i in range(30))
    inp = InputSpec("tokens", tokenizer=TokenizerSpec("char", vocab, unk_id=0))
    result = export_bundle(model, ExportOptions(name="tag", input=inp,
                                                output=OutputSpec("classification", labels=tuple("abcd"))),
                           tmp_path / "m.onnx")
    x = np.random.default_rng(3).integers(0, 30, size=(7, 33), dtype=np.int64)
    check_against_torch(result.path, model, x)


def test_bidirectional_is_refused_in_stateful_mode_with_the_way_out(tmp_path):
    with pytest.raises(ExportError, match=r"bidirectional.*--mode window"):
        export_bundle(um.BiTagger().eval(), ExportOptions(name="bi", input=num(2), output=reg(1)), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_bidirectional_in_window_mode(tmp_path):
    torch.manual_seed(0)
    model = um.BiTagger().eval()
    result = export_bundle(model, ExportOptions(name="bi", input=num(2), output=reg(1), mode="window", window=8),
                           tmp_path / "m.onnx")
    assert result.spec.mode == "window" and result.spec.window == 8 and result.spec.states == ()
    bundle = BundleModel(result.path)
    x = np.random.default_rng(4).standard_normal((7, 8, 2)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x))[:, -1].numpy()
    assert np.max(np.abs(bundle.run(x, [])[0] - ref)) <= 1e-4


def test_conv_in_stateful_mode_is_refused(tmp_path):
    with pytest.raises(ExportError, match=r"Conv1d.*--mode window"):
        export_bundle(um.ConvStateful().eval(), ExportOptions(name="c", input=num(2), output=reg(4)),
                      tmp_path / "m.onnx")


def test_forward_that_breaks_the_protocol(tmp_path):
    with pytest.raises(ExportError, match=r"must return \(y, \*new_state\)"):
        export_bundle(um.NoState().eval(), ExportOptions(name="n", input=num(2), output=reg(4)), tmp_path / "m.onnx")


def test_output_size_must_match_the_spec(tmp_path):
    with pytest.raises(ExportError, match="outputs 2 values per step but the regression output spec has 3"):
        export_bundle(um.MixedStack().eval(), ExportOptions(name="m", input=num(3), output=reg(3)),
                      tmp_path / "m.onnx")


def test_nan_in_pytorch_output_during_parity_is_the_model_not_a_parity_miss(tmp_path):
    torch.manual_seed(0)
    model = um.NaNLater().eval()
    with pytest.raises(ExportError, match=r"the PyTorch model itself outputs NaN on random input \(B=1, T=40\): "
                                          "check the checkpoint/weights") as err:
        export_bundle(model, ExportOptions(name="nan", input=num(2), output=reg(1)), tmp_path / "m.onnx")
    assert err.value.exit_code == 1 and not isinstance(err.value, ParityError)
    assert not (tmp_path / "m.onnx").exists()
