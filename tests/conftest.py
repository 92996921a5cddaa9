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
