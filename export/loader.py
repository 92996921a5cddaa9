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


def load_checkpoint(path: Path, key: str | None = None) -> Checkpoint:
    """The state_dict in ``path``: the file itself, ``obj[key]``, or the one entry that holds tensors."""
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
    if key is not None:
        if not isinstance(obj.get(key), dict):
            keys = ", ".join(repr(k) for k in obj if isinstance(k, str)) or "none"
            raise ExportError(f"--checkpoint-key {key!r}: checkpoint {path} has no dict under that key "
                              f"(its keys: {keys[:200]})")
        obj = obj[key]
    elif not any(isinstance(v, torch.Tensor) for v in obj.values()):
        holders = [k for k, v in obj.items() if _tensor_dict(v)]
        if len(holders) > 1:
            raise ExportError(f"checkpoint {path} holds several state_dicts ({', '.join(map(repr, holders))}); "
                              "choose one with --checkpoint-key KEY")
        if holders:
            obj = obj[holders[0]]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ExportError(f"checkpoint {path} has no tensors; save it with torch.save(model.state_dict(), path)"
                          + ("" if key else ", or name the entry that holds them with --checkpoint-key KEY"))
    return Checkpoint(state_dict=tensors, meta=dict(meta or {}))


def _tensor_dict(v: object) -> bool:
    return isinstance(v, dict) and bool(v) and all(isinstance(t, torch.Tensor) for t in v.values())


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


def load_weights(model: nn.Module, checkpoint: Checkpoint, path: Path, strip_prefix: str | None = None) -> str:
    """Load the checkpoint into ``model``; returns a note when a key prefix was stripped."""
    own = model.state_dict()
    sd = checkpoint.state_dict
    note = ""
    if strip_prefix is not None:
        kept = {k[len(strip_prefix):]: v for k, v in sd.items() if k.startswith(strip_prefix)}
        if not kept:
            raise ExportError(f"--strip-prefix {strip_prefix!r}: no checkpoint key starts with it "
                              f"(keys: {_few(sorted(sd))})")
        sd = kept
    elif set(sd) != set(own):
        prefixes = _fitting_prefixes(sd, set(own))
        if len(prefixes) == 1:
            prefix = prefixes[0]
            others = sorted(k for k in sd if not k.startswith(prefix))
            if others:
                # Leaving tensors out is the user's call, not a guess.
                raise ExportError(f"checkpoint {path} matches the model under the prefix {prefix!r} but also holds "
                                  f"{_few(others)}; pass --strip-prefix {prefix} to use the former alone")
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            note = f"checkpoint: stripped the key prefix {prefix!r} (a wrapper's, e.g. Lightning's)"
        elif len(prefixes) > 1:
            raise ExportError(f"checkpoint {path} holds the model under several prefixes "
                              f"({', '.join(map(repr, prefixes))}); choose one with --strip-prefix PREFIX")
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        hint = ("the factory arguments (--arg) or the factory itself differ from the ones used in training")
        if unexpected and missing and strip_prefix is None and _looks_prefixed(sd, set(own)):
            hint = ("its keys look prefixed (a wrapper module's): pass --strip-prefix PREFIX, e.g. "
                    f"--strip-prefix {_guess_prefix(sd, set(own))!r}")
        raise ExportError(f"checkpoint {path} does not match the model ({'; '.join(parts)}); {hint}")
    wrong = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
             for k, v in own.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise ExportError(f"checkpoint {path} has tensors of other shapes than the model: {_few(wrong)}; "
                          "check the factory arguments (--arg), e.g. hidden size or layers")
    model.load_state_dict(sd)
    return note


def _fitting_prefixes(sd: dict[str, torch.Tensor], own: set[str]) -> list[str]:
    """Prefixes P such that the keys starting with P, without it, are exactly the model's keys."""
    if not own:
        return []
    probe = next(iter(sorted(own)))
    candidates = {k[: len(k) - len(probe)] for k in sd if k.endswith(probe) and len(k) > len(probe)}
    found = []
    for prefix in sorted(candidates):
        if not prefix.endswith("."):
            continue
        if {k[len(prefix):] for k in sd if k.startswith(prefix)} == own:
            found.append(prefix)
    return found


def _looks_prefixed(sd: dict[str, torch.Tensor], own: set[str]) -> bool:
    return any(k.endswith("." + o) for k in sd for o in own)


def _guess_prefix(sd: dict[str, torch.Tensor], own: set[str]) -> str:
    for k in sorted(sd):
        for o in own:
            if k.endswith("." + o):
                return k[: len(k) - len(o)]
    return ""


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
