"""Errors of the export side: the branch of rnnd's error tree (rnnd.daemon.errors) that needs torch's callers."""

from __future__ import annotations

from rnnd.daemon.errors import RnndError


class ExportError(RnndError):
    """Bad input to the exporter: the message says what to fix. Exit code 1."""

    exit_code = 1


class ParityError(ExportError):
    """The exported graph does not compute what PyTorch computes. Exit code 3."""

    exit_code = 3


class UsageError(ExportError):
    """Contradicting or malformed command-line options. Exit code 2, as argparse's own errors."""

    exit_code = 2
