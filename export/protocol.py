"""The protocol a PyTorch module follows to be exported for streaming.

Stateful mode::

    class MyModel(nn.Module):
        def forward(self, x, *state):          # x: [B, T, F] float32, or [B, T] int64 ids
            ...
            return y, *new_state               # y: [B, T, O]; new_state like state

        # Optional. Without it the state is derived from the model's nn.RNN / nn.LSTM /
        # nn.GRU layers, in the order model.modules() yields them: h (and c for LSTM) for
        # each, shape [num_layers * num_directions, B, H] (H = proj_size for an LSTM's h).
        def state_spec(self) -> list[StateDecl]: ...

        # Optional: a learned initial state, one tensor per state, per-stream shape.
        def initial_state(self) -> tuple[Tensor, ...]: ...

Window mode: ``forward(x) -> y`` with x the last W inputs ``[B, W, ...]`` and y either
``[B, O]`` or ``[B, W, O]`` (then the last step is the window's prediction).

Batch first, always: the batch axis of ``x`` is 0 and time is axis 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ExportError

# Layers that look at more than the current step: in stateful mode each call sees only the
# new step(s), so these would silently compute something else than in training.
_WINDOW_ONLY = (nn.Conv1d, nn.MultiheadAttention, nn.TransformerEncoderLayer,
                nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.Transformer)


@dataclass(frozen=True)
class StateDecl:
    """A state tensor as the model declares it (see ``rnnd.daemon.bundle.StateSpec``)."""

    name: str
    shape: tuple[int, ...]  # per stream, without the batch axis
    batch_axis: int


def rnn_layers(model: nn.Module) -> list[tuple[str, nn.RNNBase]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]


def check_streamable(model: nn.Module) -> None:
    """Refuse layers that cannot advance one step at a time, with the way out."""
    for name, layer in rnn_layers(model):
        if layer.bidirectional:
            raise ExportError(
                f"layer {name!r} ({type(layer).__name__}) is bidirectional: its backward direction "
                "reads future steps, so it cannot be streamed one step at a time. "
                "Export it with --mode window --window W (the daemon keeps the last W inputs "
                "per stream and runs the model over them at every step)")
    for name, layer in model.named_modules():
        if isinstance(layer, _WINDOW_ONLY):
            raise ExportError(
                f"layer {name!r} ({type(layer).__name__}) looks across time steps and keeps no "
                "recurrent state, so stateful mode would feed it one step at a time. "
                "Export it with --mode window --window W")


def derive_state(model: nn.Module) -> list[StateDecl]:
    """The model's own declaration, or one derived from its recurrent layers."""
    declared = getattr(model, "state_spec", None)
    if callable(declared):
        decls = list(declared())
        for d in decls:
            if not isinstance(d, StateDecl):
                raise ExportError(
                    f"{type(model).__name__}.state_spec() must return StateDecl objects "
                    f"(from rnnd.export import StateDecl), got {type(d).__name__}")
        if not decls:
            raise ExportError(f"{type(model).__name__}.state_spec() declared no state")
        return decls
    decls = []
    layers = rnn_layers(model)
    if not layers:
        raise ExportError(
            f"{type(model).__name__} has no nn.RNN/nn.LSTM/nn.GRU layer and no state_spec() "
            "method: declare its state (see `rnnd export --help`, 'protocol'), or export with "
            "--mode window")
    for i, (_name, layer) in enumerate(layers):
        layers_dirs = layer.num_layers * (2 if layer.bidirectional else 1)
        tag = "" if len(layers) == 1 else str(i)
        proj = getattr(layer, "proj_size", 0) or 0
        h_size = proj if proj > 0 else layer.hidden_size
        decls.append(StateDecl(f"h{tag}", (layers_dirs, h_size), 1))
        if isinstance(layer, nn.LSTM):
            decls.append(StateDecl(f"c{tag}", (layers_dirs, layer.hidden_size), 1))
    return decls


def learned_initial_state(model: nn.Module, decls: list[StateDecl]) -> list[torch.Tensor] | None:
    fn = getattr(model, "initial_state", None)
    if not callable(fn):
        return None
    values = [torch.as_tensor(v).detach().float() for v in fn()]
    if len(values) != len(decls):
        raise ExportError(
            f"{type(model).__name__}.initial_state() returned {len(values)} tensors for "
            f"{len(decls)} declared states")
    for v, d in zip(values, decls, strict=True):
        if tuple(v.shape) != d.shape:
            raise ExportError(
                f"initial_state() for {d.name!r} has shape {tuple(v.shape)}, expected the "
                f"per-stream shape {d.shape}")
    return values


def batched(decls: list[StateDecl], batch: int, init: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """State tensors for ``batch`` streams in graph layout."""
    out = []
    for i, d in enumerate(decls):
        one = init[i] if init is not None else torch.zeros(d.shape)
        out.append(one.unsqueeze(d.batch_axis).repeat_interleave(batch, dim=d.batch_axis).contiguous())
    return out


def call(model: nn.Module, x: torch.Tensor, state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run a stateful-protocol model and check what it returned."""
    out = model(x, *state)
    if not isinstance(out, (tuple, list)) or len(out) != len(state) + 1:
        got = f"a {type(out).__name__}" if not isinstance(out, (tuple, list)) else f"{len(out)} values"
        raise ExportError(
            f"{type(model).__name__}.forward(x, *state) must return (y, *new_state) with "
            f"{len(state) + 1} values for {len(state)} state tensors; it returned {got}")
    y, *new = out
    b, t = x.shape[:2]
    if not isinstance(y, torch.Tensor) or y.dim() != 3 or tuple(y.shape[:2]) != (b, t):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ExportError(
            f"{type(model).__name__}.forward must return y of shape [B, T, O] = [{b}, {t}, O]; "
            f"got {shape}")
    for s_old, s_new in zip(state, new, strict=True):
        if not isinstance(s_new, torch.Tensor) or s_new.shape != s_old.shape:
            raise ExportError(
                f"{type(model).__name__}.forward returned a new state of shape "
                f"{tuple(getattr(s_new, 'shape', ()))} for a state of shape {tuple(s_old.shape)}")
    return y, new


def call_window(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = model(x)
    if isinstance(y, (tuple, list)):
        y = y[0]
    if not isinstance(y, torch.Tensor) or y.dim() not in (2, 3) or y.shape[0] != x.shape[0]:
        raise ExportError(
            f"{type(model).__name__}.forward(x) in window mode must return [B, O] or [B, W, O]; "
            f"got {tuple(getattr(y, 'shape', ()))}")
    return y[:, -1] if y.dim() == 3 else y
