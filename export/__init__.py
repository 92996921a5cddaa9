"""The export side of rnnd (needs torch): PyTorch model → streaming ONNX bundle.

Importing this package does not import torch; its modules do.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StateDecl", "export_bundle"]


def __getattr__(name: str) -> Any:
    if name == "StateDecl":
        from .protocol import StateDecl

        return StateDecl
    if name == "export_bundle":
        from .exporter import export_bundle

        return export_bundle
    raise AttributeError(name)
