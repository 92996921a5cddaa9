"""Shared fixtures. Tests run against the installed package (`rnnd`), never the folders."""

from __future__ import annotations

import ast
import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

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


# --- markers ------------------------------------------------------------------------------------
# Every test gets its markers from what it uses, so that nobody has to remember to add them and
# `make test-fast` (`-m unit`) stays fast as tests are added. tests/test_markers.py holds every
# collected test to exactly one of `unit` / (one or more of broker, torch, slow).

#: The fixtures that reach the Kafka broker (tests/kafka_fixtures.py); others reach it through these.
BROKER_FIXTURES = frozenset({"broker", "bootstrap", "topic_factory", "kafka_topics"})
#: Names whose use starts another process: a daemon, a venv build, a child interpreter, make.
PROCESS_NAMES = frozenset({"subprocess", "DaemonProcess", "Popen", "EmbeddedBroker"})
#: Modules whose functions start processes: bench.harness runs every contender as its own process.
PROCESS_MODULES = frozenset({"subprocess", "bench.harness"})
#: The cost markers; a test without any of them is `unit`.
COST_MARKERS = ("broker", "torch", "slow")


def _is_torch(module_name: str) -> bool:
    """torch itself, or rnnd.export (every module of it imports torch)."""
    return module_name.split(".")[0] == "torch" or (module_name + ".").startswith("rnnd.export.")


def _module_imports_torch(module: ModuleType) -> bool:
    """A top-level ``import torch`` / ``from rnnd.export... import`` in the test module."""
    cached = _MODULE_TORCH.get(module.__name__)
    if cached is None:
        try:
            tree = ast.parse(Path(module.__file__ or "").read_text())
        except (OSError, SyntaxError):
            tree = ast.Module(body=[], type_ignores=[])
        names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module]
        cached = _MODULE_TORCH[module.__name__] = any(_is_torch(n) for n in names)
    return cached


_MODULE_TORCH: dict[str, bool] = {}


def _reached_names(fn: Any, seen: set[int]) -> set[str]:
    """The names a function's code uses (nested functions, lambdas and comprehensions included),
    following the helper functions of tests/ it calls, so a test that starts a daemon through a
    helper counts as starting one. Imports in a body show up as their dotted module names."""
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None or id(code) in seen:
        return set()
    seen.add(id(code))
    names: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    scope = getattr(fn, "__globals__", {})
    for name in list(names):
        target = scope.get(name)
        if isinstance(target, types.FunctionType) and str(TESTS) in (target.__code__.co_filename or ""):
            names |= _reached_names(target, seen)
        elif isinstance(target, ModuleType | type | types.FunctionType):
            origin = target.__name__ if isinstance(target, ModuleType) else getattr(target, "__module__", "") or ""
            if _is_torch(origin):
                names.add("torch")
            if origin in PROCESS_MODULES and (not isinstance(target, ModuleType) or any(
                    isinstance(getattr(target, n, None), types.FunctionType) for n in names)):
                names.add("subprocess")  # calls a function of it (its data classes start nothing)
    return names


def _cost_markers(item: pytest.Function) -> set[str]:
    found: set[str] = set()
    if BROKER_FIXTURES & set(item.fixturenames):
        found.add("broker")
    functions = [item.function]
    for defs in item._fixtureinfo.name2fixturedefs.values():  # every fixture the test uses, transitively
        functions += [d.func for d in defs if str(TESTS) in (getattr(d.func, "__code__", None) or _NO_CODE).co_filename
                      and d.argname not in BROKER_FIXTURES]
    names: set[str] = set()
    seen: set[int] = set()
    for fn in functions:
        names |= _reached_names(fn, seen)
    if "torch" in names or any(_is_torch(n) for n in names) or _module_imports_torch(item.module):
        found.add("torch")
    if PROCESS_NAMES & names:
        found.add("slow")
    return found


_NO_CODE = compile("", "<none>", "exec")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Explicit marks (``pytestmark``) add to what the rules find; they never take a marker away."""
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        explicit = {m.name for m in item.iter_markers() if m.name in (*COST_MARKERS, "unit")}
        found = _cost_markers(item)
        for name in sorted(found - explicit):
            item.add_marker(name)
        if not explicit and not found:
            item.add_marker("unit")
