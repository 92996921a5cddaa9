"""Find the user's model factory and load a checkpoint into it, with errors that say what to fix."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ExportError


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    # The `rnnd` section `rnnd train` writes: factory, kwargs, input/output spec, sample.
    meta: dict[str, Any]


def load_checkpoint(path: Path) -> Checkpoint:
    if not path.is_file():
        raise ExportError(f"checkpoint {path}: no such file")
    try:
        # weights_only: a checkpoint is data, never code to run.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
            raise ExportError(
                f"checkpoint {path} holds Python objects, not just tensors, and is not loaded "
                "(no arbitrary pickle); save the weights with torch.save(model.state_dict(), path)"
            ) from None
        raise ExportError(f"checkpoint {path} is not a PyTorch checkpoint torch.load can read: "
                          f"{text.splitlines()[0][:200] if text else type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise ExportError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict; "
                          "save it with torch.save(model.state_dict(), path)")
    meta = obj.get("rnnd") if isinstance(obj.get("rnnd"), dict) else {}
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ExportError(f"checkpoint {path} has no tensors; save it with torch.save(model.state_dict(), path)")
    return Checkpoint(state_dict=tensors, meta=dict(meta))


def build_model(factory: str, kwargs: dict[str, Any]) -> nn.Module:
    target, sep, func_name = factory.rpartition(":")
    if not sep or not target or not func_name:
        raise ExportError(f"factory {factory!r} must be FILE.py:function or package.module:function")
    module = _import(target)
    func = getattr(module, func_name, None)
    if func is None:
        public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise ExportError(f"{target} has no {func_name!r} (callables there: {', '.join(public[:12]) or 'none'})")
    if not callable(func):
        raise ExportError(f"{target}:{func_name} is not callable")
    try:
        model = func(**kwargs)
    except TypeError as e:
        raise ExportError(f"{factory}({_fmt(kwargs)}) failed: {e}; check the --arg values") from None
    except Exception as e:
        raise ExportError(f"{factory}({_fmt(kwargs)}) raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ExportError(f"{factory} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, checkpoint: Checkpoint, path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(checkpoint.state_dict))
    unexpected = sorted(set(checkpoint.state_dict) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise ExportError(
            f"checkpoint {path} does not match the model ({'; '.join(parts)}); the factory "
            "arguments (--arg) or the factory itself differ from the ones used in training")
    wrong = [f"{k} {tuple(checkpoint.state_dict[k].shape)} vs model {tuple(v.shape)}"
             for k, v in own.items() if tuple(checkpoint.state_dict[k].shape) != tuple(v.shape)]
    if wrong:
        raise ExportError(f"checkpoint {path} has tensors of other shapes than the model: {_few(wrong)}; "
                          "check the factory arguments (--arg), e.g. hidden size or layers")
    model.load_state_dict(checkpoint.state_dict)


def _import(target: str):
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise ExportError(f"factory file {target}: no such file")
        name = f"rnnd_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ExportError(f"cannot import {target} as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise ExportError(f"importing {target} failed: {type(e).__name__}: {e}") from None
        finally:
            sys.path.pop(0)
        return module
    try:
        return importlib.import_module(target)
    except Exception as e:
        raise ExportError(f"cannot import module {target!r}: {type(e).__name__}: {e}") from None


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _fmt(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
