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

The protocol is batch first: the batch axis of ``x`` is 0 and time is axis 1. ``adapt``
maps two other common styles onto it (``ProtocolView``): time-first models (layers left at
``batch_first=False``, x ``[T, B, F]``) and a state passed as one nested argument,
``forward(x, state=None) -> (y, (h, c))``. Parity is always checked against the user's
original module called in its own style (``Adapter.reference``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

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


def call(model: nn.Module, x: torch.Tensor, state: list[torch.Tensor],
         name: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run a stateful-protocol model and check what it returned."""
    name = name or type(model).__name__
    out = model(x, *state)
    if not isinstance(out, (tuple, list)) or len(out) != len(state) + 1:
        got = f"a {type(out).__name__}" if not isinstance(out, (tuple, list)) else f"{len(out)} values"
        raise ExportError(
            f"{name}.forward(x, *state) must return (y, *new_state) with "
            f"{len(state) + 1} values for {len(state)} state tensors; it returned {got}")
    y, *new = out
    b, t = x.shape[:2]
    if not isinstance(y, torch.Tensor) or y.dim() != 3 or tuple(y.shape[:2]) != (b, t):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ExportError(
            f"{name}.forward must return y of shape [B, T, O] = [{b}, {t}, O]; "
            f"got {shape}")
    for s_old, s_new in zip(state, new, strict=True):
        if not isinstance(s_new, torch.Tensor) or s_new.shape != s_old.shape:
            raise ExportError(
                f"{name}.forward returned a new state of shape "
                f"{tuple(getattr(s_new, 'shape', ()))} for a state of shape {tuple(s_old.shape)}")
    return y, new


def call_window(model: nn.Module, x: torch.Tensor, time_first: bool = False) -> torch.Tensor:
    y = model(x)
    if isinstance(y, (tuple, list)):
        y = y[0]
    b = x.shape[1] if time_first else x.shape[0]
    ok = isinstance(y, torch.Tensor) and (
        (y.dim() == 2 and y.shape[0] == b) or (y.dim() == 3 and y.shape[1 if time_first else 0] == b))
    if not ok:
        raise ExportError(
            f"{type(model).__name__}.forward(x) in window mode must return [B, O] or [B, W, O]; "
            f"got {tuple(getattr(y, 'shape', ()))}")
    if y.dim() == 3:
        return y[-1] if time_first else y[:, -1]
    return y


# --- the styles users write, mapped onto the protocol ------------------------------------------


class InputMismatch(ExportError):
    """The input spec and the model disagree about what one step is: no other style can help."""


class ModelOutputsNaN(ExportError):
    """PyTorch's own output is not finite, so a parity miss would blame the wrong side."""


_LAYOUT_LAYERS = (nn.RNNBase, nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                  nn.Transformer)


def time_first_hint(model: nn.Module) -> bool:
    """True when every layer that has a batch_first flag leaves it at PyTorch's default (False).

    Only a hint: a model may transpose internally. ``adapt`` checks it by probing.
    """
    flags = [bool(m.batch_first) for m in model.modules() if isinstance(m, _LAYOUT_LAYERS)
             and hasattr(m, "batch_first")]
    return bool(flags) and not any(flags)


def flatten(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [leaf for part in tree for leaf in flatten(part)]
    raise TypeError(type(tree).__name__)


def rebuild(template, leaves: list[torch.Tensor]):
    """``template``'s nesting of tuples/lists, filled from ``leaves`` in order."""
    it = iter(leaves)

    def fill(node):
        if isinstance(node, torch.Tensor):
            return next(it)
        return type(node)(fill(part) for part in node)

    return fill(template)


def _layout_of(template, names: list[str]) -> str:
    """The nesting of a state argument, written with the state names: ``(h, c)``, ``[h0, (h1, c1)]``."""
    it = iter(names)

    def show(node) -> str:
        if isinstance(node, torch.Tensor):
            return next(it, "?")
        inner = ", ".join(show(part) for part in node)
        return f"[{inner}]" if isinstance(node, list) else f"({inner}{',' if len(node) == 1 else ''})"

    return show(template)


class ProtocolView(nn.Module):
    """The user's module seen through the protocol: batch-first x, positional flat state.

    Transposes x and y for a time-first model and packs/unpacks a nested state argument such
    as ``(h, c)``, so the tracer sees ``forward(x, *state) -> (y, *new_state)``. It holds the
    user's module as a child, so parameters are the user's own.
    """

    def __init__(self, model: nn.Module, time_first: bool, template, window: bool) -> None:
        super().__init__()
        self.model = model
        self.time_first = time_first
        self.template = template
        self.window = window

    def forward(self, x: torch.Tensor, *state: torch.Tensor):
        if self.time_first:
            x = x.transpose(0, 1)
        if self.window:
            y = self.model(x)
            if isinstance(y, (tuple, list)):
                y = y[0]
            if isinstance(y, torch.Tensor) and y.dim() == 3:
                y = y[-1] if self.time_first else y[:, -1]
            return y
        if self.template is not None:
            out = self.model(x, rebuild(self.template, list(state)))
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise ExportError(f"{type(self.model).__name__}.forward(x, state) must return (y, new_state)")
            y, new = out[0], flatten(out[1])
        else:
            out = self.model(x, *state)
            if not isinstance(out, (tuple, list)):
                return out
            y, new = out[0], list(out[1:])
        if self.time_first and isinstance(y, torch.Tensor) and y.dim() == 3:
            y = y.transpose(0, 1)
        return (y, *new)


@dataclass
class Adapter:
    """How the user's module is called: its layout, its state style, and where it starts from."""

    model: nn.Module
    decls: list[StateDecl]
    init: list[torch.Tensor] | None
    time_first: bool = False
    template: object = None  # nesting of the state argument; None: positional (x, *state)
    omit_state: bool = False  # the reference calls forward(x) with no state, as the user does
    window: bool = False

    def state(self, batch: int) -> list[torch.Tensor]:
        return batched(self.decls, batch, self.init) if self.decls else []

    def module(self) -> ProtocolView:
        # In the user's module's mode (eval): the ONNX exporter restores the mode of what it is
        # given afterwards, recursively, and a new module would be in training mode.
        view = ProtocolView(self.model, self.time_first, self.template, self.window)
        return view.train(self.model.training)

    def reference(self, x: torch.Tensor, states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The ORIGINAL module over the whole sequence, from the initial state (or ``states``,
        flat, in protocol layout): y batch-first."""
        xin = x.transpose(0, 1) if self.time_first else x
        if self.window:
            return call_window(self.model, xin, time_first=self.time_first)
        state = states if states is not None else self.state(x.shape[0])
        if self.omit_state:
            out = self.model(xin)
        elif self.template is not None:
            out = self.model(xin, rebuild(self.template, state))
        else:
            out = self.model(xin, *state)
        y = out[0]
        return y.transpose(0, 1) if self.time_first else y

    @property
    def starts_from_context(self) -> bool:
        return callable(getattr(self.model, "init", None))

    def start(self, context: torch.Tensor) -> list[torch.Tensor]:
        """``init(context)``, the state it returns flattened like forward's and checked against the declaration."""
        name = type(self.model).__name__
        if self.window or self.omit_state:
            raise ExportError(f"{name}.init(context) gives a starting state, but its forward takes none: "
                              "drop init() or pass the state to forward")
        out = flatten(cast(Any, self.model).init(context))
        if len(out) != len(self.decls):
            raise ExportError(f"{name}.init(context) returned {len(out)} tensors for {len(self.decls)} states "
                              f"({', '.join(d.name for d in self.decls)})")
        b = context.shape[0]
        for t, d in zip(out, self.decls, strict=True):
            want = list(d.shape)
            want.insert(d.batch_axis, b)
            if list(t.shape) != want:
                raise ExportError(f"{name}.init(context) returned {list(t.shape)} for state {d.name!r}; for {b} "
                                  f"contexts it must be {want} (the batch on axis {d.batch_axis}, as forward takes it)")
        return out

    def describe(self) -> str:
        parts = ["time-first (batch_first=False) input, transposed" if self.time_first else "batch-first input"]
        if self.window:
            parts.append("forward(x)")
        elif self.template is not None:
            parts.append(f"state passed as one argument {_layout_of(self.template, [d.name for d in self.decls])}")
        else:
            parts.append("positional state")
        return ", ".join(parts)


def check_finite(y: torch.Tensor, model: nn.Module, where: str = "the probe input") -> None:
    if bool(torch.isfinite(y).all()):
        return
    what = "NaN" if bool(torch.isnan(y).any()) else "inf"
    bad = [n for n, p in model.state_dict().items()
           if torch.is_floating_point(p) and not bool(torch.isfinite(p).all())]
    hint = f" (non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})" if bad else ""
    raise ModelOutputsNaN(f"the PyTorch model itself outputs {what} on {where}{hint}: check the checkpoint/weights")


def _in_size(m: nn.Module) -> tuple[int, int] | None:
    """(axis, size) a layer expects of the tensor it is first handed."""
    if isinstance(m, nn.RNNBase):
        return -1, m.input_size
    if isinstance(m, nn.Linear):
        return -1, m.in_features
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return -1, m.normalized_shape[0]
    if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return -1, m.self_attn.embed_dim
    if isinstance(m, nn.MultiheadAttention):
        return -1, m.embed_dim
    if isinstance(m, nn.Conv1d):
        return 1, m.in_channels
    return None


@contextlib.contextmanager
def input_checks(model: nn.Module, n_features: int | None, vocab_size: int | None):
    """Check, at the first layer the input reaches, that the input spec fits it.

    A feature count other than the first layer's input size, or a vocabulary larger than
    the embedding, would otherwise end in a shape error (or an index error) deep inside
    PyTorch. The check fires from a forward pre-hook, i.e. before the layer runs.
    """
    seen = {"done": False}
    names = {m: n for n, m in model.named_modules()}

    def hook(m: nn.Module, args) -> None:
        if seen["done"] or not args or not isinstance(args[0], torch.Tensor):
            return
        seen["done"] = True
        t = args[0]
        label = f"{names.get(m) or 'model'!r} ({type(m).__name__})"
        if isinstance(m, nn.Embedding):
            if vocab_size is None:
                raise InputMismatch(
                    f"the model's first layer {label} embeds token ids but the input is numeric: give the "
                    "vocabulary (--vocab FILE --tokenizer word|char)")
            if vocab_size > m.num_embeddings:
                raise InputMismatch(
                    f"the vocabulary has {vocab_size} tokens but the model's embedding {label} has "
                    f"num_embeddings={m.num_embeddings}: ids >= {m.num_embeddings} would index past it; "
                    "give the vocabulary the model was trained with (or the factory's --arg for its size)")
            return
        if n_features is None:
            if not torch.is_floating_point(t) and isinstance(m, (nn.RNNBase, nn.Linear)):
                raise InputMismatch(f"the input is token ids but the model's first layer {label} takes "
                                    "numbers: export it with --input-kind numeric --features NAMES")
            return
        want = _in_size(m)
        if want is None or t.dim() < 2:
            return
        axis, size = want
        if t.shape[axis] != size and t.shape[axis] == n_features:
            what = "input_size" if isinstance(m, nn.RNNBase) else "input size"
            raise InputMismatch(
                f"the input has {n_features} features but the model's first layer {label} has {what}={size}: "
                f"give {size} feature names (--features), or the factory arguments (--arg) used in training")

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, nn.Embedding) or _in_size(m) is not None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _independent(adapter: Adapter, x: torch.Tensor, other: torch.Tensor) -> bool:
    """Does batch item 0's input leave the other items' outputs alone (in the assumed layout)?"""
    y = adapter.reference(x)
    x2 = x.clone()
    x2[0] = other[0]
    y2 = adapter.reference(x2)
    if y.shape != y2.shape or y.shape[0] != x.shape[0]:
        return False
    return bool(torch.allclose(y[1:], y2[1:], rtol=1e-4, atol=1e-5))


def adapt(model: nn.Module, example: Callable[[int, int, int], torch.Tensor], window: int | None,
          n_features: int | None, vocab_size: int | None) -> Adapter:
    """Find how the user's module is called, by trying the styles PyTorch users write.

    ``example(batch, steps, seed)`` makes batch-first model input; ``window`` is W in window
    mode. Layout (batch-first or time-first) is hinted by the layers' batch_first flags and
    confirmed by probing batch independence:
    in the right layout, changing batch item 0 leaves the other items' outputs unchanged; in
    the wrong one, the model mixes batch items (or fails on the state's shape).
    """
    hint = time_first_hint(model)
    batch, steps = 3, 4
    if window:
        steps, batch = window, (3 if window != 3 else 2)
    x = example(batch, steps, 1)
    other = example(batch, steps, 2)
    errors: list[Exception] = []
    decls: list[StateDecl] = []
    init = None
    if not window:
        decls = derive_state(model)
        init = learned_initial_state(model, decls)
    with input_checks(model, n_features, vocab_size):
        for time_first in (hint, not hint):
            for adapter in _candidates(model, decls, init, time_first, bool(window), x):
                try:
                    y = _probe(adapter, x)
                except (InputMismatch, ModelOutputsNaN):
                    raise
                except Exception as e:  # a style that does not fit; the next may
                    errors.append(e)
                    continue
                check_finite(y, model)
                if _independent(adapter, x, other):
                    return adapter
                errors.append(ExportError(
                    f"{type(model).__name__}'s output for one batch item depends on another item's input "
                    f"(x read as {'[T, B, ...], time first' if time_first else '[B, T, ...], batch first'}): "
                    "a streamed model must compute each stream on its own; look in forward for operations "
                    "across the batch axis"))
    raise _explain(model, errors, window is not None, hint)


def _candidates(model, decls, init, time_first: bool, window: bool, x: torch.Tensor):
    if window:
        yield Adapter(model, [], None, time_first=time_first, window=True)
        return
    yield Adapter(model, decls, init, time_first=time_first)
    # forward(x, state=None) -> (y, state): the state as one (nested) argument.
    xin = x.transpose(0, 1) if time_first else x
    b = x.shape[0]
    try:
        out = model(xin)
    except (InputMismatch, ModelOutputsNaN):
        raise
    except Exception:  # it needs its state argument
        out = None
    if isinstance(out, (tuple, list)) and len(out) == 2 and not isinstance(out[1], torch.Tensor):
        try:
            template = out[1]
            leaves = flatten(template)
        except TypeError:
            return
        sub = _nested_decls(model, template, leaves, decls, xin, b, time_first)
        if sub is None:
            return
        sub_decls, sub_init = sub
        yield Adapter(model, sub_decls, sub_init, time_first=time_first, template=template,
                      omit_state=sub_init is None and _starts_from_zeros(model, xin, template, sub_decls))
        return
    if out is None and len(decls) > 1:
        # forward(x, state) with the state required: try (h, c)-style grouping of the derived state.
        yield Adapter(model, decls, init, time_first=time_first, template=tuple(batched(decls, b, None)))


def _nested_decls(model, template, leaves, decls, xin, b, time_first):
    """Per-stream state declarations for a nested state, from the leaves' shapes at two batch sizes."""
    try:
        bigger = torch.cat([xin, xin[:, :1] if time_first else xin[:1]], dim=1 if time_first else 0)
        out2 = model(bigger)
        leaves2 = flatten(out2[1])
    except (InputMismatch, ModelOutputsNaN):
        raise
    except Exception:
        return None
    if len(leaves2) != len(leaves):
        return None
    found = []
    for i, (a, c) in enumerate(zip(leaves, leaves2, strict=True)):
        diff = [ax for ax in range(a.dim()) if a.shape[ax] != c.shape[ax]]
        if len(diff) != 1 or a.shape[diff[0]] != b:
            return None
        axis = diff[0]
        shape = tuple(int(s) for ax, s in enumerate(a.shape) if ax != axis)
        name = decls[i].name if i < len(decls) and len(decls) == len(leaves) and decls[i].shape == shape else f"s{i}"
        found.append(StateDecl(name, shape, axis))
    init = None
    if callable(getattr(model, "initial_state", None)):
        init = learned_initial_state(model, found)
    return found, init


def _starts_from_zeros(model, xin, template, decls) -> bool:
    """forward(x) without state must equal forward(x, zeros): else the bundle would start elsewhere."""
    zeros = batched(decls, _batch_of(template, decls), None)
    y_none = model(xin)[0]
    y_zero = model(xin, rebuild(template, zeros))[0]
    if not torch.allclose(y_none, y_zero, rtol=1e-5, atol=1e-6):
        raise ExportError(
            f"{type(model).__name__}.forward(x) without a state does not start from zeros; define "
            "initial_state() returning the tensors it starts from (one per state, per-stream shape)")
    return True


def _batch_of(template, decls: list[StateDecl]) -> int:
    leaf = flatten(template)[0]
    return int(leaf.shape[decls[0].batch_axis])


def _probe(adapter: Adapter, x: torch.Tensor) -> torch.Tensor:
    """One protocol-form call through the view, checked as protocol.call checks it."""
    view = adapter.module()
    if adapter.window:
        y = view(x)
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != x.shape[0]:
            raise ExportError(
                f"{type(adapter.model).__name__}.forward(x) in window mode must return [B, O] or [B, W, O]; "
                f"got {tuple(getattr(y, 'shape', ()))}")
        return y
    call(view, x, adapter.state(x.shape[0]), name=type(adapter.model).__name__)
    return adapter.reference(x)


def _explain(model: nn.Module, errors: list[Exception], window: bool, hint: bool) -> ExportError:
    """One line for the first (most likely) style's failure, with the styles that are accepted."""
    first = errors[0] if errors else ExportError("no call style fits")
    if isinstance(first, ExportError):
        return first
    msg = str(first).strip().splitlines()[0][:300] if str(first).strip() else ""
    how = "forward(x)" if window else "forward(x, *state) or forward(x, state=None)"
    return ExportError(
        f"{type(model).__name__}.{how} raised {type(first).__name__}: {msg}; see `rnnd export --help`, "
        "'protocol', for the forms the exporter accepts")
