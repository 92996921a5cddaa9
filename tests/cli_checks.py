"""Assertions about how a command fails: the exit code and one line that says what to fix.

Loaded like kafka_fixtures (tests/ is on sys.path, see conftest.py).
"""

from __future__ import annotations

import re
from typing import Any


def one_line_error(res: Any, code: int, pattern: str, ignore: re.Pattern[str] | None = None) -> str:
    """Assert exit ``code``, a single non-blank stderr line containing ``pattern``, no traceback; return the line.

    ``res`` has ``code`` and ``err`` (conftest's CliResult, or a completed subprocess wrapped
    alike). ``ignore`` drops lines that are not the error, such as the daemon's own log records.
    """
    assert res.code == code, (res.code, getattr(res, "out", ""), res.err)
    lines = [ln for ln in res.err.splitlines() if ln.strip() and not (ignore and ignore.match(ln))]
    assert len(lines) == 1, res.err
    assert "Traceback" not in res.err
    assert pattern in lines[0], lines[0]
    return lines[0]
