"""rnnd's error tree: the drawing in rnnd.daemon.errors is the code, and the CLI relies on the base class alone."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from rnnd.daemon import errors

REPO = Path(__file__).resolve().parents[1]
#: Where the classes of the drawing live (the export branch is defined beside the exporter).
HOMES = ("rnnd.daemon.errors", "rnnd.tools", "rnnd.export.errors")


def drawn_tree() -> list[tuple[int, str, int | None]]:
    """(depth, class name, exit code or None) for each line of the drawing in the module docstring."""
    rows = []
    for line in (errors.__doc__ or "").splitlines():
        m = re.match(r"^    ([│ ]*)(?:[├└]── )?([A-Z]\w+)(?: \([\w.]+\))?\s+(\d)?", line)
        if m and m.group(2).endswith("Error"):
            depth = len(m.group(1)) // 4 + 1 if "──" in line else 0  # each level indents by 4
            rows.append((depth, m.group(2), int(m.group(3)) if m.group(3) else None))
    return rows


def find(name: str) -> type:
    for home in HOMES:
        cls = getattr(importlib.import_module(home), name, None)
        if cls is not None:
            return cls
    raise AssertionError(f"{name} is drawn in rnnd.daemon.errors but defined in none of {HOMES}")


def test_the_drawing_matches_the_classes_and_their_exit_codes() -> None:
    rows = drawn_tree()
    assert rows[0][1] == "RnndError" and len(rows) >= 10
    parents: list[type] = []
    for depth, name, code in rows:
        cls = find(name)
        del parents[depth:]
        if parents:
            assert issubclass(cls, parents[-1]), f"{name} is drawn under {parents[-1].__name__}"
        if code is not None:
            assert cls.exit_code == code, f"{name}: drawn with exit code {code}, has {cls.exit_code}"
        parents.append(cls)


def test_every_class_with_an_exit_code_is_an_rnnd_error() -> None:
    """The CLI catches RnndError only: an exit_code on anything else would be a traceback again."""
    found = []
    for folder in ("daemon", "cli", "export"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and any(
                        isinstance(s, ast.AnnAssign | ast.Assign) and "exit_code" in ast.unparse(s) for s in node.body):
                    found.append(node.name)
    assert found
    for name in found:
        assert issubclass(find(name), errors.RnndError), name


@pytest.mark.parametrize("cls", [errors.ConfigError, errors.BundleError, errors.ChangelogError])
def test_value_errors_stay_value_errors(cls: type) -> None:
    """Callers that parse catch ValueError; the tree keeps the builtin bases."""
    assert issubclass(cls, ValueError)


def test_the_cli_prints_one_line_and_the_class_exit_code(rnnd, tmp_path: Path) -> None:
    res = rnnd("inspect", tmp_path / "missing.onnx")
    assert res.code == errors.BundleError.exit_code
    assert res.err.strip().count("\n") == 0 and "Traceback" not in res.err
