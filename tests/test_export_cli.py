"""`rnnd export` / `rnnd inspect` from the command line: happy path and every bad input.

A bad input exits non-zero with one line that says what to fix, and no traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_checks import one_line_error

import user_models as um
from rnnd.daemon.bundle import RandomInit, read_spec
from rnnd.daemon.runtime import BundleModel
from rnnd.export import zoo

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
    one_line_error(res, 2, "was modified after export")
    assert "MISMATCH" in res.out


def test_console_script_exit_code_and_single_line(tmp_path):
    exe = [sys.executable, "-m", "rnnd", "export", f"{USER}:mixed_stack", "--checkpoint", str(tmp_path / "x.pt"),
           "--out", str(tmp_path / "m.onnx")]
    proc = subprocess.run(exe, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"rnnd export: error: checkpoint {tmp_path / 'x.pt'}: no such file"]


# --- every option is used or refused -------------------------------------------------------------

# Each option of `rnnd export`, and the case below that shows it lands in the bundle (or is refused).
# An option added to the parser without a case here fails test_every_option_has_a_case.
OPTION_CASES = {
    "factory": "numeric", "checkpoint": "numeric", "out": "numeric", "arg": "numeric", "spec": "numeric",
    "name": "numeric", "version": "numeric", "warmup_steps": "numeric", "features": "numeric", "mean": "numeric",
    "std": "numeric", "valid_min": "numeric", "valid_max": "numeric", "output_names": "numeric",
    "output_mean": "numeric", "output_std": "numeric", "next_of": "numeric", "tolerance": "numeric",
    "parity_batches": "numeric", "quiet": "numeric", "random_init": "numeric", "random_init_seed": "numeric",
    "input_kind": "tokens", "tokenizer": "tokens", "vocab": "tokens", "unk": "tokens", "case_sensitive": "tokens",
    "labels": "tokens", "output_kind": "language_model", "context_size": "language_model",
    "mode": "window", "window": "window", "description": "window",
    "checkpoint_key": "checkpoint", "strip_prefix": "checkpoint",
    "target_vocab": "seq2seq", "max_output_len": "seq2seq", "max_source_len": "seq2seq",
    "debug": "test_debug_shows_the_traceback",
    "precision": "test_export_at_int8_through_the_cli",
}


def export_parser():
    import argparse

    from rnnd.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["export"]


def test_every_option_has_a_case():
    dests = {a.dest for a in export_parser()._actions if a.dest != "help"}
    assert dests == set(OPTION_CASES), (sorted(dests - set(OPTION_CASES)), sorted(set(OPTION_CASES) - dests))


def write_vocab(path: Path, n: int) -> Path:
    path.write_text("\n".join(["<PAD>", "<UNK>", *(f"T{i}" for i in range(n - 2))]) + "\n")
    return path


def test_options_numeric_regression(rnnd, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    torch.save(um.MixedStack(n_features=4).state_dict(), ckpt)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text('{"description": "from the spec", "version": "0"}')
    res = rnnd("export", f"{USER}:mixed_stack", "--checkpoint", ckpt, "--out", tmp_path / "n.onnx",
               "--arg", "n_features=4", "--spec", spec_file, "--name", "n1", "--version", "7", "--warmup", "4",
               "--features", "a,b,c,d", "--mean", "1,2,3,4", "--std", "1,2,4,8", "--valid-min", ",0,,-5",
               "--valid-max", "9,,,5", "--output-names", "p,q", "--output-mean", "5,6", "--output-std", "2,3",
               "--next-of", "a,b", "--tolerance", "0.001", "--parity-batches", "1,3", "--random-init", "normal:0.1,0.5",
               "--random-init-seed", "9", "--quiet")
    assert res.code == 0, res.err
    assert res.err == ""  # --quiet: only the result line, on stdout
    spec = read_spec(tmp_path / "n.onnx")
    assert (spec.model.name, spec.model.version, spec.model.description) == ("n1", "7", "from the spec")
    assert spec.warmup_steps == 4 and spec.mode == "stateful"
    i = spec.input
    assert (i.kind, i.features, i.mean, i.std) == ("numeric", ("a", "b", "c", "d"), (1, 2, 3, 4), (1, 2, 4, 8))
    assert i.valid_min == (None, 0.0, None, -5.0) and i.valid_max == (9.0, None, None, 5.0)
    o = spec.output
    assert (o.kind, o.names, o.mean, o.std, o.next_of) == ("regression", ("p", "q"), (5, 6), (2, 3), ("a", "b"))
    assert spec.parity.tolerance == 0.001 and {c.batch for c in spec.parity.cases} == {1, 3}
    assert {(st.init, st.init_random) for st in spec.states} == {("random", RandomInit("normal", (0.1, 0.5), 9))}


def test_options_tokens_classification(rnnd, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "t.pt"
    torch.save(um.TokenTagger().state_dict(), ckpt)
    vocab = write_vocab(tmp_path / "vocab.txt", 30)
    res = rnnd("export", f"{USER}:token_tagger", "--checkpoint", ckpt, "--out", tmp_path / "t.onnx",
               "--input-kind", "tokens", "--vocab", vocab, "--unk", "<UNK>", "--tokenizer", "char",
               "--case-sensitive", "--labels", "a,b,c,d", "--parity-batches", "1,3")
    assert res.code == 0, res.err
    spec = read_spec(tmp_path / "t.onnx")
    tok = spec.input.tokenizer
    assert spec.input.kind == "tokens" and tok.level == "char" and tok.lowercase is False
    assert tok.vocab[:3] == ("<PAD>", "<UNK>", "T0") and len(tok.vocab) == 30 and tok.unk_id == 1
    assert spec.output.kind == "classification" and spec.output.labels == ("a", "b", "c", "d")


def test_options_language_model(rnnd, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "lm.pt"
    torch.save(um.TokenTagger(n_tags=30).state_dict(), ckpt)
    vocab = write_vocab(tmp_path / "vocab.txt", 30)
    res = rnnd("export", f"{USER}:token_tagger", "--arg", "n_tags=30", "--checkpoint", ckpt,
               "--out", tmp_path / "lm.onnx", "--vocab", vocab, "--unk", "<UNK>", "--tokenizer", "word",
               "--output-kind", "language_model", "--parity-batches", "1,3")
    assert res.code == 0, res.err
    spec = read_spec(tmp_path / "lm.onnx")
    assert spec.output.kind == "language_model" and spec.output.vocab == spec.input.tokenizer.vocab


def test_options_context_size_for_a_model_with_init(rnnd, tmp_path, mixed_ckpt):
    """A captioning-shaped model: init(context) is exported as the bundle's second graph, with parity
    from it; --context-size is refused for a model without init() and needed for one with it."""
    torch.manual_seed(0)
    ckpt = tmp_path / "cap.pt"
    torch.save(um.Captioner(vocab_size=30, context_size=5).state_dict(), ckpt)
    vocab = write_vocab(tmp_path / "vocab.txt", 30)
    args = ("export", f"{USER}:captioner", "--arg", "vocab_size=30", "--arg", "context_size=5", "--checkpoint", ckpt,
            "--out", tmp_path / "cap.onnx", "--vocab", vocab, "--unk", "<UNK>", "--tokenizer", "word",
            "--output-kind", "language_model",
            "--parity-batches", "1,3")
    one_line_error(rnnd(*args, "--quiet"), 1,
                   "Captioner has init(context): say how many values one context has (--context-size C)")
    res = rnnd(*args, "--context-size", "5")
    assert res.code == 0, res.err
    assert "context start" in res.err and "init(context): a context of 5 values starts a stream" in res.err
    model = BundleModel(tmp_path / "cap.onnx")
    assert model.spec.start is not None and model.spec.start.size == 5
    assert {c.data for c in model.spec.parity.cases} >= {"context start"}
    assert [s.shape for s in model.start_state(np.zeros((4, 5), np.float32))] == [(1, 4, 16)]
    one_line_error(rnnd("export", f"{USER}:mixed_stack", "--checkpoint", mixed_ckpt, "--out", tmp_path / "m.onnx",
                        "--output-names", "p,q", "--context-size", "4", "--quiet"), 1,
                   "--context-size is for a model with init(context); MixedStack has none")


def test_options_seq2seq(rnnd, tmp_path, mixed_ckpt):
    """An encoder-decoder from the zoo's factory: its own output vocabulary and length limits land in the
    bundle; the limits are refused without --mode seq2seq."""
    torch.manual_seed(0)
    ckpt = tmp_path / "s2s.pt"
    torch.save(zoo.Translator(src_vocab=12, tgt_vocab=9, hidden=16, embed_dim=8).state_dict(), ckpt)
    vocab = write_vocab(tmp_path / "src.txt", 12)
    target = tmp_path / "tgt.txt"
    target.write_text("\n".join(["<s>", "</s>", *"abcdefg"]) + "\n")
    res = rnnd("export", "rnnd.export.zoo:build", "--arg", "arch=seq2seq", "--arg", "src_vocab=12", "--arg",
               "tgt_vocab=9", "--arg", "hidden=16", "--arg", "embed_dim=8", "--checkpoint", ckpt,
               "--out", tmp_path / "s.onnx", "--mode", "seq2seq", "--vocab", vocab, "--unk", "<UNK>",
               "--tokenizer", "char", "--target-vocab", target, "--max-output-len", "9", "--max-source-len", "30")
    assert res.code == 0, res.err
    assert "seq2seq" in res.out and "greedy answers equal PyTorch's" in res.err
    spec = read_spec(tmp_path / "s.onnx")
    assert spec.mode == "seq2seq" and spec.output.vocab == ("<s>", "</s>", *"abcdefg") and spec.states == ()
    s2s = spec.seq2seq
    assert (s2s.max_output_len, s2s.max_source_len, s2s.bos_id, s2s.eos_id, s2s.separator) == (9, 30, 0, 1, "")
    assert [(s.name, s.shape, s.batch_axis) for s in s2s.states] == [("h", (16,), 0), ("context", (16,), 0)]
    one_line_error(rnnd("export", f"{USER}:mixed_stack", "--checkpoint", mixed_ckpt, "--out", tmp_path / "m.onnx",
                        "--output-names", "p,q", "--max-output-len", "4", "--quiet"), 2,
                   "--max-output-len is for seq2seq models: pass --mode seq2seq, or remove it")
    one_line_error(rnnd("export", f"{USER}:mixed_stack", "--checkpoint", mixed_ckpt, "--out", tmp_path / "m.onnx",
                        "--output-names", "p,q", "--target-vocab", target, "--quiet"), 1,
                   "--target-vocab is the vocabulary of a language model's (or seq2seq model's) output; this output "
                   "is regression")


@pytest.mark.parametrize("mode_flag", [(), ("--mode", "window")])
def test_options_window(rnnd, tmp_path, mode_flag):
    torch.manual_seed(0)
    ckpt = tmp_path / "bi.pt"
    torch.save(um.BiTagger().state_dict(), ckpt)
    res = rnnd("export", f"{USER}:bi_tagger", "--checkpoint", ckpt, "--out", tmp_path / "bi.onnx",
               *mode_flag, "--window", "6", "--description", "bi tagger", "--features", "u,v",
               "--output-names", "y", "--parity-batches", "1,3")
    assert res.code == 0, res.err  # --window alone implies window mode
    spec = read_spec(tmp_path / "bi.onnx")
    assert spec.mode == "window" and spec.window == 6 and spec.model.description == "bi tagger"


def test_options_checkpoint_key_and_strip_prefix(rnnd, tmp_path):
    torch.manual_seed(0)
    model = um.MixedStack().eval()
    torch.save({"ema": {f"net.{k}": v for k, v in model.state_dict().items()},
                "other": um.MixedStack().state_dict()}, tmp_path / "c.pt")
    res = rnnd(*export_args(tmp_path / "c.pt", tmp_path / "c.onnx", "--checkpoint-key", "ema",
                            "--strip-prefix", "net.", "--parity-batches", "1,3"))
    assert res.code == 0, res.err
    x = torch.randn(2, 9, 3)
    with torch.no_grad():
        want = model(x, torch.zeros(1, 2, 32), torch.zeros(1, 2, 16), torch.zeros(1, 2, 16))[0].numpy()
    got = BundleModel(tmp_path / "c.onnx").run_sequence(x.numpy(), chunk=9)[0]
    assert abs(got - want).max() <= 1e-4


@pytest.mark.parametrize(("extra", "message"), [
    (("--input-kind", "tokens", "--features", "a,b,c"), "--input-kind tokens contradicts --features"),
    (("--features", "a,b,c", "--vocab", "v.txt"), "--features (numeric) and --vocab (tokens) describe different"),
    (("--case-sensitive", "--mean", "1,2,3"), "describe different kinds"),
    (("--output-kind", "classification", "--output-names", "p,q"), "--output-kind classification contradicts"),
    (("--labels", "a,b", "--output-names", "p,q"), "describe different kinds"),
    (("--mode", "stateful", "--window", "4"), "--window applies to window mode"),
    (("--unk", "X", "--labels", "a,b"), "token input needs its vocabulary"),
    (("--mean", "1,x,3"), "--mean takes comma-separated numbers"),
    (("--valid-min", "0,a,1"), "--valid-min takes comma-separated numbers"),
    (("--output-std", "1,?"), "--output-std takes comma-separated numbers"),
    (("--parity-batches", "1,0"), "--parity-batches takes comma-separated positive integers"),
    (("--tolerance", "0"), "--tolerance must be a positive number"),
    (("--arg", "novalue"), "--arg takes KEY=VALUE"),
    (("--random-init", "gauss:1"), "--random-init takes normal:STD, normal:MEAN,STD or uniform:LOW,HIGH"),
    (("--random-init", "uniform:1"), "--random-init takes normal:STD"),
    (("--random-init", "normal:x"), "--random-init takes normal:STD"),
    (("--random-init", "uniform:1,-1"), "--random-init: random initial state: uniform needs finite low < high"),
    (("--random-init", "normal:0"), "--random-init: random initial state: normal needs a finite mean and a std > 0"),
    (("--random-init-seed", "3"), "--random-init-seed is only used with --random-init"),
    (("--context-size", "0"), "--context-size must be a positive integer, not 0"),
])
def test_contradicting_or_malformed_options_are_refused(rnnd, tmp_path, mixed_ckpt, extra, message):
    (tmp_path / "v.txt").write_text("<unk>\na\n")
    out = tmp_path / "m.onnx"
    extra = tuple(str(tmp_path / e) if e == "v.txt" else e for e in extra)
    one_line_error(rnnd("export", f"{USER}:mixed_stack", "--checkpoint", mixed_ckpt, "--out", out, *extra), 2, message)
    assert not out.exists()


def test_spec_file_of_another_kind_is_refused_not_dropped(rnnd, tmp_path, mixed_ckpt):
    spec = tmp_path / "spec.json"
    spec.write_text('{"input": {"kind": "tokens", "tokenizer": {"level": "word", "vocab": ["<unk>", "a"], '
                    '"unk_id": 0}}, "colour": "red"}')
    one_line_error(rnnd(*export_args(mixed_ckpt, tmp_path / "m.onnx", "--spec", spec)), 1, "unknown key(s) colour")
    spec.write_text('{"input": {"kind": "tokens", "tokenizer": {"level": "word", "vocab": ["<unk>", "a"], '
                    '"unk_id": 0}}}')
    one_line_error(rnnd(*export_args(mixed_ckpt, tmp_path / "m.onnx", "--spec", spec)), 2,
                   "the command line describes a numeric input but --spec/the checkpoint describes a tokens one")


def test_an_exported_bundle_is_readable_like_any_file_written_with_the_umask(rnnd, tmp_path, mixed_ckpt):
    """Written atomically (temp file + rename) but not 0600: the container images read bundles as user 10001."""
    import os
    import stat

    out = tmp_path / "m.onnx"
    res = rnnd(*export_args(mixed_ckpt, out, "--parity-batches", "1,3"))
    assert res.code == 0, res.err
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_export_at_int8_through_the_cli(rnnd, tmp_path, mixed_ckpt):
    """--precision int8: proven at int8's tolerance (the report says which), written as an int8 bundle;
    --precision fp16: proven at fp16's tolerance, written as an fp16 bundle."""
    out = tmp_path / "q.onnx"
    res = rnnd(*export_args(mixed_ckpt, out, "--precision", "int8"))
    assert res.code == 0, res.err
    assert "int8: weights quantized (" in res.err and "(tolerance 0.1)" in res.err and "<= 0.1)" in res.out
    assert BundleModel(out).spec.precision == "int8"
    res = rnnd(*export_args(mixed_ckpt, tmp_path / "h.onnx", "--precision", "fp16"))
    assert res.code == 0, res.err
    assert "fp16: weights and ops in half precision" in res.err and "(tolerance 0.01)" in res.err
    assert BundleModel(tmp_path / "h.onnx").spec.precision == "fp16"
