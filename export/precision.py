"""A bundle's graph at a lower precision: onnx and ONNX Runtime's tools only, no torch.

The exporter converts a graph here after tracing it, and ``bench.gpu`` converts a bundle built
without torch (its device check runs on machines that have none), so the conversion is written
once, where neither needs the other's imports.

Inputs and outputs, the state included, stay float32 at every precision: a bundle's state
layout (and its ``state_hash``) does not depend on how its weights are stored.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx


def at_precision(onnx_model: onnx.ModelProto, precision: str,
                 say: Callable[[str], None] = lambda _: None) -> onnx.ModelProto:
    """The graph at ``precision`` ("fp16" or "int8").

    int8: ONNX Runtime's dynamic quantization (weights to int8 once, activations quantized per call):
    its LSTM becomes DynamicQuantizeLSTM and its MatMuls MatMulInteger; a GRU's recurrence has no
    quantized kernel and stays fp32. fp16: ONNX Runtime's float16 tool, every weight and op in half
    precision, with casts at the graph's inputs and outputs (keep_io_types).
    """
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half: onnx.ModelProto = convert_float_to_float16(onnx_model, keep_io_types=True)
        _sort_topologically(half.graph)  # the tool appends its input casts after their consumers
        say("fp16: weights and ops in half precision, inputs, outputs and state float32")
        return half
    if precision != "int8":
        raise ValueError(f"no conversion to precision {precision!r} (fp16 or int8)")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(onnx_model, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        quantized = onnx.load(dst)
    ops = sorted({n.op_type for n in quantized.graph.node} - {n.op_type for n in onnx_model.graph.node})
    say(f"int8: weights quantized ({', '.join(ops) or 'no op had a quantized kernel'})")
    return quantized


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph``'s nodes so each comes after the producers of its inputs (ONNX requires it)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        runnable = [n for n in pending if all(i in ready for i in n.input)]
        if not runnable:  # an input from an outer scope: leave the rest in the order they came
            ordered += pending
            break
        for n in runnable:
            ordered.append(n)
            ready.update(n.output)
        pending = [n for n in pending if all(n is not r for r in runnable)]
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)
