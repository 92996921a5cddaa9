"""Errors the export CLI turns into one line and an exit code (no traceback unless --debug)."""

from __future__ import annotations


class ExportError(Exception):
    """Bad input to the exporter: the message says what to fix. Exit code 1."""

    exit_code = 1


class ParityError(ExportError):
    """The exported graph does not compute what PyTorch computes. Exit code 3."""

    exit_code = 3


class UsageError(ExportError):
    """Contradicting or malformed command-line options. Exit code 2, as argparse's own errors."""

    exit_code = 2
