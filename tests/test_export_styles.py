"""`rnnd export` on the models users actually bring, and on every option it takes.

The README's own example runs verbatim and its bundle serves the right numbers through the
daemon's pipeline; PyTorch's other styles (time-first layers, a tuple state, attention in
window mode, Lightning-style checkpoints) export with parity against the user's ORIGINAL
module, or are refused with one line; every option is either used or refused.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from cli_checks import one_line_error

import user_models as um
from rnnd.daemon.bundle import read_spec
from rnnd.daemon.config import ServeConfig
from rnnd.daemon.pipeline import Pipeline
from rnnd.daemon.runtime import BundleModel

USER = Path(um.__file__)
README = Path(__file__).parents[1] / "README.md"
QUICK = ("--parity-batches", "1,3")  # the exporter's own check at fewer batch sizes; what we check is ours


def save(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def run_bundle(path: Path, x: np.ndarray, chunk: int) -> np.ndarray:
    return BundleModel(path).run_sequence(x, chunk=chunk)[0]


# --- the README's example, verbatim -------------------------------------------------------------

MY_MODELS = '''
import torch
from torch import nn


class Forecaster(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(2, 16, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x, h, c):
        y, (h, c) = self.lstm(x, (h, c))
        return self.head(y), h, c


def build_model():
    return Forecaster()
'''


def readme_export_command() -> list[str]:
    """The first `rnnd export` command in README's export section, continuation lines joined."""
    text = README.read_text()
    section = text[text.index("## Export: PyTorch model → bundle"):]
    block = re.search(r"\n((?: {4}.*\S.*\n)+)", section)
    assert block, "no indented command block in README's export section"
    command = block.group(1).replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:2] == ["rnnd", "export"], argv
    return argv[1:]


def serve(path: Path, records: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
    """Records through the daemon's own pipeline (decode, normalise, batch, run, de-normalise, encode)."""
    cfg = ServeConfig(model=str(path), input_topic="in", output_topic="out", max_batch=16, max_chunk=8,
                      top_k=10, stream_ttl_s=0.0).validate()
    pipeline = Pipeline(BundleModel(path), cfg, "in")
    docs: list[dict[str, Any]] = []
    for offset, (key, value) in enumerate(records):
        assert pipeline.accept_many(0, [SimpleNamespace(key=key, value=value, offset=offset,
                                                        timestamp=1_000 + offset)]) == 1
        docs += [orjson.loads(o.value) for o in pipeline.finish(pipeline.execute(pipeline.plan()))]
    while pipeline.busy():
        docs += [orjson.loads(o.value) for o in pipeline.finish(pipeline.execute(pipeline.plan()))]
    return docs


def test_readme_export_example_verbatim_serves_correct_predictions(rnnd, tmp_path, monkeypatch):
    argv = readme_export_command()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_models.py").write_text(MY_MODELS)
    sys.path.insert(0, str(tmp_path))
    try:
        import my_models  # the user's file, as the test wrote it
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_models", None)
    torch.manual_seed(7)
    model = my_models.build_model().eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")

    res = rnnd(*argv)
    assert res.code == 0, res.err
    spec = read_spec(tmp_path / "model.onnx")
    assert spec.input.features == ("temp", "humidity")
    assert spec.input.mean == (20.0, 55.0) and spec.input.std == (3.0, 8.0)
    assert spec.output.names == ("temp_next",) and spec.warmup_steps == 10
    out_mean, out_std = (spec.output.mean or (0.0,))[0], (spec.output.std or (1.0,))[0]

    # Raw readings (the units producers send) for three sensors, one step per message.
    rng = np.random.default_rng(0)
    raw = {f"s{i}".encode(): np.stack([20 + 3 * rng.standard_normal(15), 55 + 8 * rng.standard_normal(15)], axis=1)
           for i in range(3)}
    records = [(key, orjson.dumps({"x": {"temp": float(seq[t, 0]), "humidity": float(seq[t, 1])}}))
               for t in range(15) for key, seq in raw.items()]
    docs = serve(tmp_path / "model.onnx", records)
    assert len(docs) == 45
    for key, seq in raw.items():
        x = torch.from_numpy(((seq - [20.0, 55.0]) / [3.0, 8.0]).astype(np.float32))[None]
        with torch.no_grad():
            y = model(x, torch.zeros(1, 1, 16), torch.zeros(1, 1, 16))[0][0, :, 0].numpy()
        want = y.astype(np.float64) * out_std + out_mean
        mine = sorted((d for d in docs if d["key"] == key.decode()), key=lambda d: d["step"])
        got = [d["prediction"]["values"]["temp_next"] for d in mine]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        assert [d["warmup"] for d in mine] == [t < 10 for t in range(15)]


# --- styles: time-first layers, the state as a tuple ----------------------------------------------


def original_reference(model: torch.nn.Module, x: np.ndarray, time_first: bool) -> np.ndarray:
    """The user's module as the user runs it: forward(x) with no state, over the whole sequence."""
    xt = torch.from_numpy(x)
    with torch.no_grad():
        if time_first:
            return model(xt.transpose(0, 1))[0].transpose(0, 1).numpy()
        return model(xt)[0].numpy()


@pytest.mark.parametrize(("factory", "cls", "features", "outs", "time_first", "states"), [
    ("time_first_lstm", um.TimeFirstLSTM, "a,b", "y", True, [("h", (1, 8), 1), ("c", (1, 8), 1)]),
    ("tuple_state_lstm", um.TupleStateLSTM, "a,b", "y", False, [("h", (2, 8), 1), ("c", (2, 8), 1)]),
    ("time_first_tuple_gru", um.TimeFirstTupleGRU, "a,b,c", "p,q", True,
     [("h0", (1, 10), 1), ("h1", (1, 5), 1), ("c1", (1, 5), 1)]),
    ("time_first_projected", um.TimeFirstProjected, "a,b", "y", True, [("h", (1, 4), 1), ("c", (1, 8), 1)]),
])
def test_pytorch_styles_export_with_parity_against_the_original(rnnd, tmp_path, factory, cls, features, outs,
                                                                time_first, states):
    torch.manual_seed(1)
    model = cls().eval()
    ckpt = save(model, tmp_path / "m.pt")
    res = rnnd("export", f"{USER}:{factory}", "--checkpoint", ckpt, "--out", tmp_path / "m.onnx",
               "--features", features, "--output-names", outs)
    assert res.code == 0, res.err
    spec = read_spec(tmp_path / "m.onnx")
    assert [(s.name, s.shape, s.batch_axis) for s in spec.states] == states
    if time_first:
        assert "time-first" in res.err
    x = np.random.default_rng(2).standard_normal((5, 23, len(features.split(",")))).astype(np.float32)
    if factory == "time_first_lstm":  # positional state: forward(x, h, c) from zeros
        with torch.no_grad():
            xt = torch.from_numpy(x).transpose(0, 1)
            want = model(xt, torch.zeros(1, 5, 8), torch.zeros(1, 5, 8))[0].transpose(0, 1).numpy()
    else:
        want = original_reference(model, x, time_first)
    for chunk in (1, 7, 23):
        assert np.max(np.abs(run_bundle(tmp_path / "m.onnx", x, chunk) - want)) <= 1e-4, chunk


def test_forward_without_state_that_does_not_start_from_zeros_is_refused(rnnd, tmp_path):
    ckpt = save(um.HiddenStart(), tmp_path / "m.pt")
    res = rnnd("export", f"{USER}:hidden_start", "--checkpoint", ckpt, "--out", tmp_path / "m.onnx",
               "--features", "a,b", "--output-names", "y")
    one_line_error(res, 1, "define initial_state()")
    assert not (tmp_path / "m.onnx").exists()


# --- input spec vs the model, before tracing -------------------------------------------------------


@pytest.mark.parametrize(("factory", "cls", "features", "pattern"), [
    ("mixed_stack", um.MixedStack, "a,b", "the input has 2 features but the model's first layer 'gru' (GRU) "
     "has input_size=3"),
    ("tuple_state_lstm", um.TupleStateLSTM, "a,b,c,d", "has input_size=2"),
    ("time_first_tuple_gru", um.TimeFirstTupleGRU, "a,b", "'inp' (Linear) has input size=3"),
])
def test_feature_count_other_than_the_first_layer_is_one_line(rnnd, tmp_path, factory, cls, features, pattern):
    ckpt = save(cls(), tmp_path / "m.pt")
    res = rnnd("export", f"{USER}:{factory}", "--checkpoint", ckpt, "--out", tmp_path / "m.onnx",
               "--features", features, "--output-names", ",".join(f"y{i}" for i in range(2)))
    one_line_error(res, 1, pattern)


def test_vocabulary_larger_than_the_embedding_is_one_line(rnnd, tmp_path):
    ckpt = save(um.TokenTagger(vocab_size=30), tmp_path / "m.pt")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["<unk>", *(f"w{i}" for i in range(39))]) + "\n")
    res = rnnd("export", f"{USER}:token_tagger", "--checkpoint", ckpt, "--out", tmp_path / "m.onnx",
               "--vocab", vocab, "--tokenizer", "word", "--labels", "a,b,c,d")
    one_line_error(res, 1, "the vocabulary has 40 tokens but the model's embedding 'emb' (Embedding) has "
                   "num_embeddings=30")


# --- NaN from PyTorch itself is not a parity failure ------------------------------------------------


def test_model_that_outputs_nan_is_named_as_such_not_as_a_parity_miss(rnnd, tmp_path):
    torch.manual_seed(0)
    sd = um.MixedStack().state_dict()
    sd["head.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    res = rnnd("export", f"{USER}:mixed_stack", "--checkpoint", tmp_path / "nan.pt", "--out", tmp_path / "m.onnx",
               "--features", "a,b,c", "--output-names", "p,q")
    one_line_error(res, 1, "the PyTorch model itself outputs NaN on the probe input (non-finite values in "
                   "head.weight): check the checkpoint/weights")
    assert "parity" not in res.err and not (tmp_path / "m.onnx").exists()


# --- attention in window mode ---------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_exports_in_window_mode(rnnd, tmp_path, batch_first):
    torch.manual_seed(4)
    model = um.WindowTransformer(batch_first=batch_first).eval()
    ckpt = save(model, tmp_path / "t.pt")
    res = rnnd("export", f"{USER}:window_transformer", "--arg", f"batch_first={json.dumps(batch_first)}",
               "--checkpoint", ckpt, "--out", tmp_path / "t.onnx", "--features", "a,b", "--output-names", "y",
               "--window", "6")
    assert res.code == 0, res.err
    assert torch.backends.mha.get_fastpath_enabled()  # the exporter put PyTorch's setting back
    x = np.random.default_rng(5).standard_normal((9, 6, 2)).astype(np.float32)
    with torch.no_grad():  # as the user runs it: eval mode, fast path on
        xt = torch.from_numpy(x)
        want = model(xt if batch_first else xt.transpose(0, 1)).numpy()
    got = BundleModel(tmp_path / "t.onnx").run(x, [])[0]
    assert np.max(np.abs(got - want)) <= 1e-4


# --- checkpoints written by training frameworks ---------------------------------------------------


def lightning_checkpoint(path: Path, state: dict[str, torch.Tensor], **extra: Any) -> Path:
    torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.01}]}],
                "hyper_parameters": {"hidden": 32}, **extra}, path)
    return path


def assert_bundle_is(path: Path, model: torch.nn.Module) -> None:
    x = np.random.default_rng(6).standard_normal((4, 11, 3)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x), torch.zeros(1, 4, 32), torch.zeros(1, 4, 16),
                     torch.zeros(1, 4, 16))[0].numpy()
    assert np.max(np.abs(run_bundle(path, x, 4) - want)) <= 1e-4


def test_lightning_checkpoint_prefix_is_detected(rnnd, tmp_path):
    torch.manual_seed(8)
    model = um.MixedStack().eval()
    ckpt = lightning_checkpoint(tmp_path / "lit.ckpt", um.LitWrapper(model).state_dict())
    res = rnnd("export", f"{USER}:mixed_stack", "--checkpoint", ckpt, "--out", tmp_path / "m.onnx",
               "--features", "a,b,c", "--output-names", "p,q", *QUICK)
    assert res.code == 0, res.err
    assert "stripped the key prefix 'model.'" in res.err
    assert_bundle_is(tmp_path / "m.onnx", model)


def test_ambiguous_prefix_names_strip_prefix_and_the_option_picks_one(rnnd, tmp_path):
    torch.manual_seed(9)
    model, ema = um.MixedStack().eval(), um.MixedStack().eval()
    state = {**um.LitWrapper(model).state_dict(), **{f"ema_model.{k}": v for k, v in ema.state_dict().items()}}
    ckpt = lightning_checkpoint(tmp_path / "lit.ckpt", state)
    base = ("export", f"{USER}:mixed_stack", "--checkpoint", ckpt, "--out", tmp_path / "m.onnx",
            "--features", "a,b,c", "--output-names", "p,q", *QUICK)
    one_line_error(rnnd(*base), 1, "choose one with --strip-prefix PREFIX")
    assert rnnd(*base, "--strip-prefix", "ema_model.").code == 0
    assert_bundle_is(tmp_path / "m.onnx", ema)


def test_several_state_dicts_name_checkpoint_key_and_the_option_picks_one(rnnd, tmp_path):
    torch.manual_seed(10)
    model, ema = um.MixedStack().eval(), um.MixedStack().eval()
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "step": 5}, tmp_path / "two.pt")
    base = ("export", f"{USER}:mixed_stack", "--checkpoint", tmp_path / "two.pt", "--out", tmp_path / "m.onnx",
            "--features", "a,b,c", "--output-names", "p,q", *QUICK)
    one_line_error(rnnd(*base), 1, "choose one with --checkpoint-key KEY")
    assert rnnd(*base, "--checkpoint-key", "ema").code == 0
    assert_bundle_is(tmp_path / "m.onnx", ema)
    one_line_error(rnnd(*base, "--checkpoint-key", "nope"), 1, "--checkpoint-key 'nope'")


# --- warnings, and what the parser imports ----------------------------------------------------------


@pytest.mark.parametrize("case", ["factory", "transformer"])
def test_torch_warnings_stay_out_of_the_output_unless_debug(tmp_path, case):
    torch.manual_seed(0)
    if case == "factory":  # warns while the model is built; the rest is an export the old code could do too
        ckpt = save(um.MixedStack(), tmp_path / "m.pt")
        model_args = [f"{USER}:noisy_stack", "--input-kind", "numeric", "--features", "a,b,c",
                      "--output-kind", "regression", "--output-names", "p,q"]
    else:  # nn.TransformerEncoder(batch_first=False) warns when constructed; traced in window mode
        ckpt = save(um.WindowTransformer(batch_first=False), tmp_path / "m.pt")
        model_args = [f"{USER}:window_transformer", "--arg", "batch_first=false", "--features", "a,b",
                      "--output-names", "y", "--window", "5"]
    argv = [sys.executable, "-m", "rnnd", "export", *model_args, "--checkpoint", str(ckpt),
            "--out", str(tmp_path / "m.onnx"), "--parity-batches", "1,3"]
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # every warning Python would show, DeprecationWarning too
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr
    if case == "factory":
        proc = subprocess.run([*argv, "--debug"], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0 and "UserWarning" in proc.stderr and "DeprecationWarning" in proc.stderr


def test_building_the_export_parser_imports_no_torch():
    code = ("import argparse, sys; from rnnd.export import cli; p = argparse.ArgumentParser(); "
            "cli.add_parsers(p.add_subparsers()); p.parse_args(['export', '--checkpoint', 'c', '--out', 'o']); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "ok", proc.stderr
