"""PyTorch module → ONNX graph with batch and time symbolic.

Two strategies, chosen per model:

* ``native``: trace the whole model with the TorchScript exporter. nn.RNN/LSTM/GRU become
  ONNX's fused RNN/LSTM/GRU ops, which loop over T inside one kernel (a T=64 chunk costs
  ~14x less than 64 single-step calls). Used when the traced graph is exact at other B
  and T than the example's.
* ``scan``: trace one step (T=1) and loop it over time with an ONNX ``Scan``. Needed for
  models whose forward loops over time in Python (hand-written cells, projected LSTMs):
  tracing unrolls such a loop to the example length, silently freezing T.

We use the TorchScript exporter (``dynamo=False``): the dynamo exporter silently fixes T
for nn.RNN and sometimes for a second LSTM/GRU export in one process, with no error or warning.
Whatever the strategy, ``symbolic_dims`` checks the result.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from rnnd.daemon.bundle import ContextStart, StateSpec

from .errors import ExportError

OPSET = 17
_ELEM = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}


@dataclass(frozen=True)
class GraphIO:
    x_name: str
    y_name: str
    x_dtype: str  # float32 | int64
    x_rank: int  # 3 for [B,T,F], 2 for [B,T] ids
    out_size: int
    states: tuple[StateSpec, ...]
    window: bool = False


class _Stateful(nn.Module):
    """Flattens the protocol's (y, *state) for the tracer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, *state):
        out = self.model(x, *state)
        return tuple(out)


class _Window(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        y = self.model(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        return y[:, -1] if y.dim() == 3 else y


def trace(
    model: nn.Module,
    io_: GraphIO,
    example_x: torch.Tensor,
    example_state: list[torch.Tensor],
    time_dynamic: bool = True,
) -> onnx.ModelProto:
    """TorchScript-export ``model`` with B (and T) marked dynamic."""
    names_in = [io_.x_name] + [s.input_name for s in io_.states]
    names_out = [io_.y_name] + [s.output_name for s in io_.states]
    x_axes = {0: "B", 1: "T"} if time_dynamic else {0: "B"}
    dyn: dict[str, dict[int, str]] = {io_.x_name: x_axes}
    dyn[io_.y_name] = {0: "B"} if io_.window else dict(x_axes)
    for s in io_.states:
        dyn[s.input_name] = {s.batch_axis: "B"}
        dyn[s.output_name] = {s.batch_axis: "B"}
    # In the model's own mode: the exporter puts back the mode of what it is handed, recursively,
    # and a fresh wrapper is in training mode (dropout on in the parity reference afterwards).
    wrapper = (_Window(model) if io_.window else _Stateful(model)).train(model.training)
    buf = io.BytesIO()
    with warnings.catch_warnings(), _stdout_silenced(), attention_fastpath(False):
        warnings.simplefilter("ignore")  # tracer warnings are expected for Python loops over T
        try:
            # torch's annotation of `f` omits the file objects its docstring documents and it accepts
            torch.onnx.export(
                wrapper, (example_x, *example_state), buf,  # type: ignore[arg-type]
                dynamo=False, opset_version=OPSET,
                input_names=names_in, output_names=names_out, dynamic_axes=dyn,
                do_constant_folding=True)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(
                f"PyTorch could not export the model to ONNX: {msg[:300]}. Replace or remove the "
                "layer it names (run with --debug for the full trace)") from e
    return onnx.load_from_string(buf.getvalue())


class Method(nn.Module):
    """One method of a model as a module, for the tracer: ``init`` (a context start), or a seq2seq
    model's ``encode`` and ``decode_step``. What it returns is flattened to a tuple of tensors."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model = model
        self.method = name

    def forward(self, *args):
        from .protocol import flatten

        return tuple(flatten(getattr(self.model, self.method)(*args)))


def trace_start(model: nn.Module, start: ContextStart, states: tuple[StateSpec, ...],
                example: torch.Tensor) -> onnx.ModelProto:
    """TorchScript-export the model's ``init(context)`` with B dynamic: the bundle's second graph."""
    names_out = [start.output_name(s) for s in states]
    dyn: dict[str, dict[int, str]] = {start.input_name: {0: "B"}}
    dyn.update({name: {s.batch_axis: "B"} for name, s in zip(names_out, states, strict=True)})
    return trace_function(Method(model, "init").train(model.training), (example,), [start.input_name], names_out,
                          dyn, "init(context)")


def trace_function(module: nn.Module, args: tuple, names_in: list[str], names_out: list[str],
                   dyn: dict[str, dict[int, str]], what: str) -> onnx.ModelProto:
    """TorchScript-export one function of a model (``init(context)``, a seq2seq encoder or decoder
    step) with the given axes dynamic; a failure is one line naming ``what``."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), _stdout_silenced(), attention_fastpath(False):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=OPSET,  # type: ignore[arg-type]
                              input_names=names_in, output_names=names_out, dynamic_axes=dyn,
                              do_constant_folding=True)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"PyTorch could not export {what} to ONNX: {msg[:300]} "
                              "(run with --debug for the full trace)") from e
    return onnx.load_from_string(buf.getvalue())


@contextlib.contextmanager
def attention_fastpath(enabled: bool) -> Iterator[None]:
    """Switch PyTorch's fused attention kernels off (or on) for a while, then restore the setting.

    In eval mode nn.TransformerEncoderLayer and nn.MultiheadAttention take a "fast path" into
    fused kernels (aten::_transformer_encoder_layer_fwd, _native_multi_head_attention) that
    have no ONNX mapping; the slow path computes the same function from exportable ops.
    """
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """The exporter prints its whole IR graph to stdout on failure; our error says what matters."""
    if os.environ.get("RNND_DEBUG"):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def wrap_in_scan(step: onnx.ModelProto, io_: GraphIO) -> onnx.ModelProto:
    """Turn a T=1 step graph into a graph over T steps: ONNX Scan over axis 1 of x and y."""
    g = step.graph
    outer_const = {i.name for i in g.initializer}
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(
                "the model's step graph has control flow (If/Loop) that cannot be placed inside "
                "the time loop; make forward free of data-dependent Python branches")

    def rn(name: str) -> str:
        return name if (not name or name in outer_const) else f"step/{name}"

    axes = "rnnd/axis1"
    body_nodes = [helper.make_node("Unsqueeze", ["step/x_t", axes], [rn(io_.x_name)], name="step/unsqueeze_x")]
    for node in g.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = f"step/{node.name}"
        new.input[:] = [rn(i) for i in node.input]
        new.output[:] = [rn(o) for o in node.output]
        body_nodes.append(new)
    body_nodes.append(helper.make_node("Squeeze", [rn(io_.y_name), axes], ["step/y_t"], name="step/squeeze_y"))

    def vi(name: str, dtype: str, rank: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, _ELEM[dtype], [f"{name}_d{i}" for i in range(rank)])

    state_rank = [len(s.shape) + 1 for s in io_.states]
    body = helper.make_graph(
        body_nodes, "rnnd_step",
        inputs=[vi(rn(s.input_name), s.dtype, r) for s, r in zip(io_.states, state_rank, strict=True)]
        + [vi("step/x_t", io_.x_dtype, io_.x_rank - 1)],
        outputs=[vi(rn(s.output_name), s.dtype, r) for s, r in zip(io_.states, state_rank, strict=True)]
        + [vi("step/y_t", "float32", 2)],
    )
    scan = helper.make_node(
        "Scan",
        inputs=[s.input_name for s in io_.states] + [io_.x_name],
        outputs=[s.output_name for s in io_.states] + [io_.y_name],
        name="rnnd/time_loop", body=body, num_scan_inputs=1,
        scan_input_axes=[1], scan_output_axes=[1])
    x_shape: list[int | str] = ["B", "T"] + ([] if io_.x_rank == 2 else [_last_dim(g, io_.x_name)])
    graph = helper.make_graph(
        [scan], "rnnd_stream",
        inputs=[helper.make_tensor_value_info(io_.x_name, _ELEM[io_.x_dtype], x_shape)]
        + [helper.make_tensor_value_info(s.input_name, _ELEM[s.dtype], list(s.graph_shape("B")))
           for s in io_.states],
        outputs=[helper.make_tensor_value_info(io_.y_name, TensorProto.FLOAT, ["B", "T", io_.out_size])]
        + [helper.make_tensor_value_info(s.output_name, _ELEM[s.dtype], list(s.graph_shape("B")))
           for s in io_.states],
        initializer=[*g.initializer, onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), axes)],
    )
    model = helper.make_model(graph, opset_imports=list(step.opset_import), producer_name="rnnd")
    model.ir_version = step.ir_version
    return model


def _last_dim(g: onnx.GraphProto, name: str) -> int:
    for v in g.input:
        if v.name == name:
            return v.type.tensor_type.shape.dim[-1].dim_value
    raise ExportError(f"step graph has no input {name!r}")


def symbolic_dims(model: onnx.ModelProto, io_: GraphIO) -> list[str]:
    """Every input/output dimension that should be symbolic but is fixed ('' if none)."""
    want: dict[str, tuple[int, ...]] = {io_.x_name: (0,) if io_.window else (0, 1),
                                        io_.y_name: (0,) if io_.window else (0, 1)}
    for s in io_.states:
        want[s.input_name] = want[s.output_name] = (s.batch_axis,)
    problems = []
    seen = set()
    for v in [*model.graph.input, *model.graph.output]:
        if v.name not in want:
            continue
        seen.add(v.name)
        dims = v.type.tensor_type.shape.dim
        for axis in want[v.name]:
            if axis >= len(dims) or not dims[axis].dim_param:
                fixed = dims[axis].dim_value if axis < len(dims) else "missing"
                problems.append(f"{v.name} axis {axis} is fixed to {fixed}")
    problems += [f"{name} is not a graph input/output" for name in want if name not in seen]
    return problems
