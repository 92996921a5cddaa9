"""The suite's own rules: every test is sorted for `make test-fast`, and the code points at no tracker.

Markers come from tests/conftest.py's rules (what a test uses), so a new test cannot fall
through: it is `unit`, or it carries the costs it has (`broker`, `torch`, `slow`), never both
and never neither; it carries `kafka` exactly when it runs on Apache Kafka, so that
`-m "not kafka"` is the Tansu-only run; and a machine without Java fails those tests, never
skips them. The sources' comments and docstrings state facts rather than pointing at
issue numbers or at notes outside the repository, which a reader of the code cannot open.
"""

from __future__ import annotations

import re
import tomllib
import types
from pathlib import Path
from typing import Any

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
    registered = {line.split(":")[0].split("(")[0] for line in pytest_ini["markers"]}  # "brokers(*kinds): ..."
    assert registered == {"unit", *COST_MARKERS, "kafka", "brokers"}
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


def test_kafka_marks_exactly_the_tests_on_apache_kafka(request: pytest.FixtureRequest) -> None:
    """[kafka] instances and users of the session's node are `kafka`, [tansu] ones are not; `kafka` is never `unit`."""
    wrong = []
    for item in request.session.items:
        names = {m.name for m in item.iter_markers()}
        kind = getattr(item, "callspec", None) and item.callspec.params.get("broker_kind")  # type: ignore[attr-defined]
        uses_node = bool({"apache_kafka", "kafka_security"} & set(getattr(item, "fixturenames", ())))
        if kind == "kafka" or uses_node:
            if "kafka" not in names or "broker" not in names:
                wrong.append(f"{item.nodeid}: runs on Apache Kafka, markers {sorted(names)}")
        elif kind is not None and "kafka" in names:
            wrong.append(f"{item.nodeid}: runs on {kind}, marked kafka")
        if "kafka" in names and not names & set(COST_MARKERS):
            wrong.append(f"{item.nodeid}: kafka without a cost marker")
    assert not wrong, "\n".join(wrong)


class _Metafunc:
    """What tests/conftest.py's pytest_generate_tests reads of a test, and the parametrize calls it makes."""

    def __init__(self, module: object, marker: pytest.Mark | None = None,
                 fixturenames: tuple[str, ...] = ("bootstrap", "broker_kind")) -> None:
        self.fixturenames = list(fixturenames)
        self.module = module
        self.definition = types.SimpleNamespace(nodeid="tests/test_x.py::test_y",
                                                get_closest_marker=lambda name: marker if name == "brokers" else None)
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def parametrize(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((args, kwargs))


def test_brokers_opt_in_runs_a_test_once_per_broker(request: pytest.FixtureRequest,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A module's BROKERS or a test's brokers marker parametrises broker_kind (session scope); nothing else does."""
    conftest = next(p for p in request.config.pluginmanager.get_plugins()
                    if Path(getattr(p, "__file__", "") or "").resolve() == REPO / "tests" / "conftest.py")
    monkeypatch.delenv("RNND_TEST_BOOTSTRAP", raising=False)
    both = types.SimpleNamespace(BROKERS=("tansu", "kafka"))
    m = _Metafunc(both)
    conftest.pytest_generate_tests(m)
    assert m.calls == [(("broker_kind", ("tansu", "kafka")), {"indirect": True, "scope": "session"})]
    m = _Metafunc(both, pytest.mark.brokers("kafka").mark)  # the test's marker wins over its module
    conftest.pytest_generate_tests(m)
    assert m.calls[0][0] == ("broker_kind", ("kafka",))
    for not_opted in (_Metafunc(types.SimpleNamespace()), _Metafunc(both, fixturenames=("tmp_path",))):
        conftest.pytest_generate_tests(not_opted)
        assert not_opted.calls == []  # Tansu by broker_kind's default; a test without the broker is not doubled
    for bad in (("tansu", "redpanda"), "kafka", (), ("kafka", "kafka")):
        with pytest.raises(pytest.UsageError, match=r"tests/test_x.py::test_y: BROKERS = .*distinct brokers"):
            conftest.pytest_generate_tests(_Metafunc(types.SimpleNamespace(BROKERS=bad)))
    monkeypatch.setenv("RNND_TEST_BOOTSTRAP", "kafka.example:9092")  # an external cluster: once, not per broker
    m = _Metafunc(both)
    conftest.pytest_generate_tests(m)
    assert m.calls[0][0] == ("broker_kind", ("external",))


def test_missing_java_or_jars_fails_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Kafka fixtures turn a machine that cannot run the broker into a failure naming the fix, never a skip."""
    from kafka_fixtures import start_or_fail

    import rnnd.apache_kafka as apache_kafka

    monkeypatch.setattr(apache_kafka.shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception) as no_java:
        start_or_fail(apache_kafka.ApacheKafka(tmp_path / "a"))
    assert "`java` is not on PATH" in str(no_java.value) and "apt-get install" in str(no_java.value)
    monkeypatch.setattr(apache_kafka, "java", lambda: "/usr/bin/java")  # a JDK, but no jars
    monkeypatch.setenv(apache_kafka.LIBS_ENV, str(tmp_path / "no-jars"))
    with pytest.raises(pytest.fail.Exception) as no_jars:
        start_or_fail(apache_kafka.ApacheKafka(tmp_path / "b"))
    assert "make kafka" in str(no_jars.value)
    for failed in (no_java.value, no_jars.value):
        assert failed.pytrace is False and "\n" not in str(failed)


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
