"""`rnnd export` / `rnnd inspect` from the command line: happy path and every bad input.

A bad input exits non-zero with one line that says what to fix, and no traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

import user_models as um

USER = Path(um.__file__)


@pytest.fixture
def mixed_ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mixed.pt"
    torch.save(um.MixedStack().state_dict(), path)
    return path


def export_args(ckpt, out, *extra):
    return ("export", f"{USER}:mixed_stack", "--checkpoint", ckpt, "--out", out, "--features", "a,b,c",
            "--output-kind", "regression", "--output-names", "p,q", *extra)


def one_line_error(res, code: int, pattern: str) -> None:
    assert res.code == code, (res.code, res.err)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1, res.err
    assert "Traceback" not in res.err
    assert pattern in lines[0], lines[0]


def test_export_then_inspect(rnnd, tmp_path, mixed_ckpt):
    out = tmp_path / "m.onnx"
    res = rnnd(*export_args(mixed_ckpt, out, "--name", "mixed", "--version", "3", "--warmup", "5",
                            "--mean", "1,2,3", "--std", "1,1,2"))
    assert res.code == 0, res.err
    assert "wrote" in res.out and "mixed@3" in res.out
    assert "parity vs PyTorch" in res.err  # the report
    res = rnnd("inspect", out)
    assert res.code == 0, res.err
    assert "mixed@3" in res.out and "self-check   : max|err|" in res.out and "ok" in res.out
    assert "warm-up      : 5" in res.out


def test_help_for_every_command(rnnd):
    for cmd in ("export", "train", "inspect"):
        res = rnnd(cmd, "--help")
        assert res.code == 0 and "usage: rnnd " + cmd in res.out


def test_missing_checkpoint(rnnd, tmp_path):
    one_line_error(rnnd(*export_args(tmp_path / "nope.pt", tmp_path / "m.onnx")), 1, "no such file")


def test_checkpoint_that_is_not_torch(rnnd, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    one_line_error(rnnd(*export_args(bad, tmp_path / "m.onnx")), 1, "not a PyTorch checkpoint")


class Opaque:
    def __init__(self):
        self.w = torch.zeros(2)


def test_checkpoint_with_pickled_objects_is_not_unpickled(rnnd, tmp_path):
    bad = tmp_path / "pickle.pt"
    torch.save({"state_dict": Opaque()}, bad)
    one_line_error(rnnd(*export_args(bad, tmp_path / "m.onnx")), 1, "no arbitrary pickle")


def test_checkpoint_keys_do_not_match(rnnd, tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save(um.HandCell().state_dict(), ckpt)
    one_line_error(rnnd(*export_args(ckpt, tmp_path / "m.onnx")), 1, "does not match the model")


def test_checkpoint_shapes_do_not_match(rnnd, tmp_path):
    ckpt = tmp_path / "wide.pt"
    torch.save(um.MixedStack(n_features=5).state_dict(), ckpt)
    one_line_error(rnnd(*export_args(ckpt, tmp_path / "m.onnx")), 1, "other shapes than the model")


@pytest.mark.parametrize(("factory", "message"), [
    ("missing_file.py:build", "no such file"),
    (f"{USER}:no_such_function", "has no 'no_such_function'"),
    ("rnnd_no_such_module:build", "cannot import module"),
    ("nocolon", "must be FILE.py:function"),
    (f"{USER}:not_a_module", "not a torch.nn.Module"),
])
def test_factory_problems(rnnd, tmp_path, mixed_ckpt, factory, message):
    res = rnnd("export", factory, "--checkpoint", mixed_ckpt, "--out", tmp_path / "m.onnx",
               "--output-kind", "regression", "--output-names", "p,q")
    one_line_error(res, 1, message)


def test_factory_that_fails_to_import(rnnd, tmp_path, mixed_ckpt):
    broken = tmp_path / "broken.py"
    broken.write_text("import rnnd_definitely_missing\n")
    res = rnnd("export", f"{broken}:build", "--checkpoint", mixed_ckpt, "--out", tmp_path / "m.onnx")
    one_line_error(res, 1, "importing")


def test_unsupported_layer(rnnd, tmp_path):
    ckpt = tmp_path / "u.pt"
    torch.save(um.Unexportable().state_dict(), ckpt)
    res = rnnd("export", f"{USER}:unexportable", "--checkpoint", ckpt, "--out", tmp_path / "m.onnx",
               "--output-kind", "regression", "--output-names", "a,b,c,d")
    one_line_error(res, 1, "special_zeta")


def test_bidirectional_stateful_refused_then_window_works(rnnd, tmp_path):
    ckpt = tmp_path / "bi.pt"
    torch.save(um.BiTagger().state_dict(), ckpt)
    base = ("export", f"{USER}:bi_tagger", "--checkpoint", ckpt, "--out", tmp_path / "bi.onnx",
            "--output-kind", "regression", "--output-names", "y")
    one_line_error(rnnd(*base), 1, "--mode window")
    res = rnnd(*base, "--mode", "window", "--window", "12")
    assert res.code == 0, res.err
    assert rnnd("inspect", tmp_path / "bi.onnx").code == 0


def test_forward_breaking_protocol(rnnd, tmp_path):
    ckpt = tmp_path / "n.pt"
    torch.save(um.NoState().state_dict(), ckpt)
    res = rnnd("export", f"{USER}:no_state", "--checkpoint", ckpt, "--out", tmp_path / "m.onnx",
               "--output-kind", "regression", "--output-names", "a,b,c,d")
    one_line_error(res, 1, "must return (y, *new_state)")


def test_tolerance_miss_writes_nothing(rnnd, tmp_path, mixed_ckpt):
    out = tmp_path / "m.onnx"
    res = rnnd(*export_args(mixed_ckpt, out, "--tolerance", "1e-12", "--quiet"))
    one_line_error(res, 3, "parity check failed")
    assert not out.exists()


def test_debug_shows_the_traceback(rnnd, tmp_path):
    with pytest.raises(Exception, match="no such file"):
        rnnd(*export_args(tmp_path / "nope.pt", tmp_path / "m.onnx", "--debug"))


def test_inspect_refuses_what_is_not_a_bundle(rnnd, tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("hello")
    one_line_error(rnnd("inspect", text), 1, "not an ONNX model")
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(2, 1), (torch.zeros(1, 2),), str(plain), dynamo=False)
    one_line_error(rnnd("inspect", plain), 1, "not an rnnd bundle")
    one_line_error(rnnd("inspect", tmp_path / "missing.onnx"), 1, "no such file")


def test_inspect_detects_a_modified_graph(rnnd, tmp_path, mixed_ckpt):
    out = tmp_path / "m.onnx"
    assert rnnd(*export_args(mixed_ckpt, out, "--quiet")).code == 0
    model = onnx.load(str(out))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = bytearray(weight.raw_data)
    raw[:4] = b"\x00\x00\x80\x7f"  # +inf in the first weight
    weight.raw_data = bytes(raw)
    onnx.save(model, str(out))
    res = rnnd("inspect", out)
    assert res.code == 1
    assert "MISMATCH" in res.out and "failed its integrity check" in res.err


def test_console_script_exit_code_and_single_line(tmp_path):
    exe = [sys.executable, "-m", "rnnd", "export", f"{USER}:mixed_stack", "--checkpoint", str(tmp_path / "x.pt"),
           "--out", str(tmp_path / "m.onnx")]
    proc = subprocess.run(exe, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"rnnd export: error: checkpoint {tmp_path / 'x.pt'}: no such file"]
