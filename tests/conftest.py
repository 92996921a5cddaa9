"""Shared fixtures. Tests run against the installed package (`rnnd`), never the folders."""

from __future__ import annotations

import ast
import inspect
import os
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

from kafka_fixtures import *  # noqa: E402, F403 - broker, bootstrap, topic_factory, apache_kafka, ...
from kafka_fixtures import BOOTSTRAP_ENV, BROKER_KINDS, EXTERNAL  # noqa: E402


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
def recipe_training(tmp_path_factory) -> Callable[[str], tuple[CliResult, Path]]:
    """``rnnd train NAME --quiet`` run once per session per recipe, in-process: what it printed, and
    its folder (NAME.pt, NAME.onnx). test_recipes checks the command; everything else uses its models."""
    import contextlib
    import io

    from rnnd.cli import main
    from rnnd.export.recipes import RECIPES  # (torch: the markers see it here)

    cache: dict[str, tuple[CliResult, Path]] = {}
    folder = tmp_path_factory.mktemp("recipes")

    def get(name: str) -> tuple[CliResult, Path]:
        assert name in RECIPES, f"no recipe {name!r}"
        if name not in cache:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["train", name, "--out", str(folder), "--quiet"])
            cache[name] = (CliResult(code, out.getvalue(), err.getvalue()), folder)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def recipe_bundle(recipe_training) -> Callable[[str], Path]:
    """A recipe's trained bundle (trained once per session: real models, trained by our recipes)."""

    def get(name: str) -> Path:
        result, folder = recipe_training(name)
        assert result.code == 0 and (folder / f"{name}.onnx").is_file(), result.out + result.err
        return folder / f"{name}.onnx"

    return get


@pytest.fixture(scope="session")
def upgrade_bundles(tmp_path_factory, recipe_bundle) -> tuple[Path, Path, Path]:
    """Three versions of one model: v1 (the product recipe), v2 (its architecture with other weights: the
    same state layout, another version), v3 (a GRU of another width: another state layout)."""
    import torch

    from rnnd.daemon.runtime import BundleModel
    from rnnd.export import zoo
    from rnnd.export.exporter import ExportOptions, export_bundle

    folder = tmp_path_factory.mktemp("upgrade")
    v1 = recipe_bundle("product")
    spec = BundleModel(v1).spec
    out = []
    for version, hidden, seed in (("2", 32, 1), ("3", 16, 0)):
        torch.manual_seed(seed)
        path = folder / f"v{version}.onnx"
        export_bundle(zoo.build(cell="gru", n_features=1, hidden=hidden, out_size=1),
                      ExportOptions(name=spec.model.name, version=version, input=spec.input, output=spec.output,
                                    warmup_steps=spec.warmup_steps), path)
        out.append(path)
    return v1, out[0], out[1]


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


# --- brokers -----------------------------------------------------------------------------------
# A module opts into running its broker tests on several brokers with a module-level
# ``BROKERS = ("tansu", "kafka")``; one test with ``@pytest.mark.brokers("tansu", "kafka")``.
# Each test that uses the broker (`broker_kind`, through `bootstrap` or `topic_factory`) then
# runs once per broker: ids [tansu] and [kafka]. The parameter is session-scoped, so pytest
# runs all [tansu] instances of the session together and all [kafka] ones together, and each
# broker is set up once.


def _opted_brokers(metafunc: pytest.Metafunc) -> tuple[str, ...] | None:
    marker = metafunc.definition.get_closest_marker("brokers")
    kinds = tuple(marker.args) if marker is not None else getattr(metafunc.module, "BROKERS", None)
    if kinds is None:
        return None
    where = f"{metafunc.definition.nodeid}: " + ("@pytest.mark.brokers" if marker is not None else "BROKERS")
    if not kinds or isinstance(kinds, str) or not set(kinds) <= set(BROKER_KINDS) or len(set(kinds)) != len(kinds):
        raise pytest.UsageError(f"{where} = {kinds!r}: give a tuple of distinct brokers out of {BROKER_KINDS}")
    return tuple(kinds)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run an opted-in test once per broker; against an external cluster once, as [external]."""
    if "broker_kind" not in metafunc.fixturenames:
        return
    kinds = _opted_brokers(metafunc)
    if kinds is None:
        return  # broker_kind's default: Tansu, or the external cluster
    if os.environ.get(BOOTSTRAP_ENV):
        kinds = (EXTERNAL,)
    metafunc.parametrize("broker_kind", kinds, indirect=True, scope="session")


# --- markers ------------------------------------------------------------------------------------
# Every test gets its markers from what it uses, so that nobody has to remember to add them and
# `make test-fast` (`-m unit`) stays fast as tests are added. tests/test_markers.py holds every
# collected test to exactly one of `unit` / (one or more of broker, torch, slow). `kafka` is not a
# cost but a place: every test instance that runs on Apache Kafka has it (`-m "not kafka"` is the
# Tansu-only run), and it always comes with a cost marker.

#: The fixtures that reach the Apache Kafka node of the session (tests/kafka_fixtures.py).
KAFKA_FIXTURES = frozenset({"apache_kafka", "kafka_security"})
#: The fixtures that reach a Kafka broker (tests/kafka_fixtures.py); others reach it through these.
BROKER_FIXTURES = frozenset({"broker", "bootstrap", "topic_factory", "kafka_topics", *KAFKA_FIXTURES})
#: A name whose use starts an Apache Kafka node of the test's own.
KAFKA_NAMES = frozenset({"ApacheKafka"})
#: Names whose use starts another process: a daemon, a venv build, a child interpreter, make.
PROCESS_NAMES = frozenset({"subprocess", "DaemonProcess", "Popen", "EmbeddedBroker", *KAFKA_NAMES})
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


def _runs_on_kafka(item: pytest.Function) -> bool:
    """The [kafka] instance of an opted-in test, or a test that uses the session's node directly."""
    callspec = getattr(item, "callspec", None)
    return (callspec is not None and callspec.params.get("broker_kind") == "kafka") or bool(
        KAFKA_FIXTURES & set(item.fixturenames))


def _cost_markers(item: pytest.Function) -> set[str]:
    """The cost markers, and ``kafka`` (see :func:`_runs_on_kafka`, or a test starting its own node)."""
    found: set[str] = set()
    if BROKER_FIXTURES & set(item.fixturenames):
        found.add("broker")
    if _runs_on_kafka(item):
        found.add("kafka")
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
    if KAFKA_NAMES & names:
        found.add("kafka")
    return found


_NO_CODE = compile("", "<none>", "exec")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Explicit marks (``pytestmark``) add to what the rules find; they never take a marker away."""
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        explicit = {m.name for m in item.iter_markers() if m.name in (*COST_MARKERS, "unit", "kafka")}
        found = _cost_markers(item)
        for name in sorted(found - explicit):
            item.add_marker(name)
        if not (explicit | found) & {*COST_MARKERS, "unit"}:
            item.add_marker("unit")
