"""The distributions: a complete sdist, a typed wheel with its licence, and a serving install that says what it lacks.

Both are built from a copy of the checkout's files (what git tracks or would track), with the
locked setuptools, exactly as `pip install .` and `python -m build` would build them.
"""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Tracked files the sdist leaves out on purpose: CI wiring and git's own configuration.
NOT_IN_SDIST = (".ci/", ".gitignore")


def checkout_files() -> list[str]:
    """The files of a clean clone: tracked, plus new files git would track (so a working tree counts too)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return sorted({f for f in out.splitlines() if (REPO / f).is_file()})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for f in checkout_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    code = ("import sys; from setuptools import build_meta as b; "
            "d = sys.argv[1]; sys.stderr.write(b.build_sdist(d) + ' ' + b.build_wheel(d) + '\\n')")
    done = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sdist_name, wheel_name = done.stderr.split()[-2:]
    return {"sdist": dist / sdist_name, "wheel": dist / wheel_name}


def test_the_sdist_holds_every_file_of_the_checkout(built: dict[str, Path]) -> None:
    with tarfile.open(built["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {f for f in checkout_files() if not f.startswith(NOT_IN_SDIST)}
    missing = sorted(wanted - names)
    assert not missing, f"the sdist lacks {missing[:20]} (add them to MANIFEST.in)"
    assert "LICENSE" in names and "tests/test_lock.py" in names and "requirements/dev.txt" in names


def test_the_wheel_is_typed_licensed_and_holds_the_serving_code(built: dict[str, Path]) -> None:
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = set(whl.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(whl.read(metadata_name))
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = whl.read(entry_points).decode()
    assert "rnnd/py.typed" in names and "rnnd/demo_bundle/sensors.onnx" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # every module of the three folders, subpackages included (a package missing from pyproject's list
    # would be left out of the wheel while the editable install still finds it)
    folders = {"cli": "rnnd", "daemon": "rnnd/daemon", "export": "rnnd/export"}
    modules = {f"{prefix}/{py.relative_to(REPO / folder)}" for folder, prefix in folders.items()
               for py in (REPO / folder).rglob("*.py")}
    assert modules - names == set(), f"modules left out of the wheel: {sorted(modules - names)}"
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Requires-Python"] == ">=3.11"
    assert "rnnd = rnnd.cli:main" in scripts
    assert "Apache License" in (REPO / "LICENSE").read_text()[:200]
