"""Shared fixtures. Tests run against the installed package (`rnnd`), never the folders."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
MODELS = TESTS / "models"
sys.path.insert(0, str(MODELS))  # the test-only user models: `import user_models`
sys.path.insert(0, str(TESTS))  # kafka_fixtures, daemon_harness

from kafka_fixtures import *  # noqa: E402, F403 - broker, bootstrap, topic_factory


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def rnnd(capsys) -> Callable[..., CliResult]:
    """Run the `rnnd` command in-process (same entry point as the console script)."""
    from rnnd.cli import main

    def run(*argv: str) -> CliResult:
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def recipe_bundle(tmp_path_factory) -> Callable[[str], Path]:
    """A recipe's trained bundle (trained once per session: real models, trained by our recipes)."""
    from rnnd.export.recipes import run_recipe

    cache: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("recipes")

    def get(name: str) -> Path:
        if name not in cache:
            result = run_recipe(name, folder, seed=0, progress=False)
            assert result.bundle is not None, result.summary()
            cache[name] = result.bundle
        return cache[name]

    return get


@pytest.fixture(scope="session")
def window_bundle(tmp_path_factory) -> Path:
    """A window-mode bundle: a bidirectional LSTM over the last 6 steps of 3 features."""
    import torch

    from rnnd.daemon.bundle import InputSpec, OutputSpec
    from rnnd.export import zoo
    from rnnd.export.exporter import ExportOptions, export_bundle

    torch.manual_seed(3)
    model = zoo.build(arch="window", kind="bilstm", n_features=3, hidden=8, out_size=2)
    out = tmp_path_factory.mktemp("window") / "window.onnx"
    export_bundle(model, ExportOptions(
        name="bi-window", mode="window", window=6, warmup_steps=5,
        input=InputSpec("numeric", features=("a", "b", "c"), mean=(1.0, 0.0, -1.0), std=(2.0, 1.0, 0.5)),
        output=OutputSpec("regression", names=("p", "q"), mean=(10.0, 0.0), std=(3.0, 1.0))), out)
    return out
