"""The suite's own rules: every test is sorted for `make test-fast`, and the code points at no tracker.

Markers come from tests/conftest.py's rules (what a test uses), so a new test cannot fall
through: it is `unit`, or it carries the costs it has (`broker`, `torch`, `slow`), never both
and never neither. The sources' comments and docstrings state facts rather than pointing at
issue numbers or at notes outside the repository, which a reader of the code cannot open.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: tests/conftest.py's: what a test costs beyond its own process; a test with none of them is `unit`.
COST_MARKERS = ("broker", "torch", "slow")


def test_every_test_is_unit_or_carries_its_costs(request: pytest.FixtureRequest) -> None:
    wrong = []
    for item in request.session.items:
        names = {m.name for m in item.iter_markers()}
        costs = names & set(COST_MARKERS)
        if ("unit" in names) == bool(costs):
            wrong.append(f"{item.nodeid}: {sorted(names & {'unit', *COST_MARKERS}) or 'no marker'}")
    assert request.session.items and not wrong, "\n".join(wrong)


def test_the_markers_are_registered_where_strict_markers_reads_them() -> None:
    pytest_ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {line.split(":")[0] for line in pytest_ini["markers"]}
    assert registered == {"unit", *COST_MARKERS}
    assert "--strict-markers" in pytest_ini["addopts"].split()
    assert pytest_ini["filterwarnings"][0] == "error"


def test_the_rules_see_through_fixtures_and_helpers(request: pytest.FixtureRequest) -> None:
    """Known cases: broker via a fixture chain, torch via a session fixture, a daemon via a helper."""
    by_id = {item.nodeid: {m.name for m in item.iter_markers()} for item in request.session.items}
    expect = {
        # kafka_topics -> topic_factory -> bootstrap -> broker; the bundle is trained by recipe_bundle
        "tests/test_sink.py::": {"broker"},
        "tests/test_daemon_e2e.py::": {"broker", "torch", "slow"},
        "tests/test_codec.py::": {"unit"},
        "tests/test_export_matrix.py::": {"torch"},
        # the contenders are processes that a bench.harness function starts; the report test only builds results
        "tests/test_bench.py::test_numeric_contender": {"broker", "torch", "slow"},
        "tests/test_bench.py::test_bench_quick_plan_and_report": {"unit"},
    }
    for prefix, want in expect.items():
        got = [names & {"unit", *COST_MARKERS} for nodeid, names in by_id.items() if nodeid.startswith(prefix)]
        if got:  # a -k or -m selection may leave a file out
            assert all(want <= g for g in got), (prefix, got)


#: An issue number ("issue 6", "issues 4", "#12" not inside a word or URL) or a file outside the repository.
POINTER = re.compile(r"\bissues?\s*#?\d+|(?<![\w/&#])#\d+\b|\.\./shared|\bshared/notes\b|\bnotes/\w", re.IGNORECASE)


@pytest.mark.parametrize("folder", ["daemon", "cli", "export", "bench", "tests"])
def test_sources_point_at_no_issue_or_outside_file(folder: str) -> None:
    hits = []
    for path in sorted((REPO / folder).rglob("*.py")):
        if path.resolve() == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if POINTER.search(line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not hits, "write the fact instead of the pointer:\n" + "\n".join(hits)
