"""Device-resident state (``device_state``): every stream's state kept where the model runs.

With the host arena (``state.StateArena``) each model call gathers its streams' state on the
host, hands it to ONNX Runtime, which copies it to the device, and copies the new state back to
be scattered on the host: on a GPU two transfers of every state per call, of which only the
predictions were wanted on the host. Here the arena lives on the model's device as ONNX Runtime
values (``OrtValue``), and two small ONNX graphs run by the same provider move state there:

* ``gather``: ``Gather`` of the calls' slots, then ``Transpose`` into the graph's layout (the
  arena is kept batch-first, ``[capacity, *per-stream shape]``, so a slot is one row);
* ``scatter``: ``Transpose`` back to batch-first, then ``ScatterND`` into the arena, its output
  bound to the arena itself: ONNX Runtime's ``ScatterND`` skips its copy of the data when
  output and input are one buffer, so a scatter costs the rows written, not the arena
  (measured on the CPU: 0.35 ms for 1,000 rows of a 200,000-stream arena, against 18 ms when
  the output is a new buffer).

The model is called with IO binding (``BundleModel.run_bound``): the input goes in from the
host, the gathered state stays on the device, the prediction comes back to the host, the new
state stays on the device for the scatter. State crosses to the host only to be read (the
changelog's records at a checkpoint, ``Session.state``) and from it only to be written
(initial states, restores), both batched: writes wait in ``_pending`` and go in one scatter
before the next read of the arena.

On the CPU provider the same code runs, the arena's values wrapping numpy arrays, so the
tests check this path against the host arena there: the results are identical (the same
kernels on the same numbers; ``Gather``/``ScatterND`` only move them).

Not for window or seq2seq bundles (no per-stream state tensors here), nor with forecasts or
generation, which roll out on host copies of the state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .bundle import BundleSpec, StateSpec
from .state import initial_values

#: ONNX opset of the gather and scatter graphs (ScatterND with reduction needs 16; we use none).
OPSET = 17


class Placement(NamedTuple):
    """Where a session runs: its providers (with their options, to run the arena's graphs on the same
    ones) and its device as ``OrtValue`` and IO binding name it (``"cpu"`` or ``"cuda"``, and an id)."""

    providers: list[tuple[str, dict[str, Any]]]
    device: str
    device_id: int


#: The providers that place a session's tensors on a GPU (TensorRT runs on CUDA's memory).
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def placement_of(session: ort.InferenceSession) -> Placement:
    names = session.get_providers()
    options = session.get_provider_options()
    providers = [(p, dict(options.get(p, {}))) for p in names]
    if names[0] in GPU_PROVIDERS:
        return Placement(providers, "cuda", int(options.get(names[0], {}).get("device_id", 0)))
    return Placement(providers, "cpu", 0)


def _to_graph(rank: int, axis: int) -> list[int]:
    """The permutation that moves axis 0 (batch-first) to ``axis`` (the graph's batch axis)."""
    return [*range(1, axis + 1), 0, *range(axis + 1, rank)]


def _to_batch_first(rank: int, axis: int) -> list[int]:
    return [axis, *(i for i in range(rank) if i != axis)]


def _graphs(states: Sequence[StateSpec]) -> tuple[bytes, bytes]:
    """The gather and the scatter graph for these states (module docstring)."""
    idx = helper.make_tensor_value_info("slots", onnx.TensorProto.INT64, ["B"])
    idx2 = helper.make_tensor_value_info("slots2", onnx.TensorProto.INT64, ["B", 1])
    g_nodes, g_in, g_out, s_nodes, s_in, s_out = [], [idx], [], [], [idx2], []
    for i, s in enumerate(states):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(s.dtype))
        rank = len(s.shape) + 1
        arena: list[str | int] = [f"C{i}", *s.shape]
        graph_layout: list[str | int] = list(s.graph_shape(f"B{i}"))
        g_in.append(helper.make_tensor_value_info(f"arena{i}", elem, arena))
        g_out.append(helper.make_tensor_value_info(f"state{i}", elem, graph_layout))
        s_in += [helper.make_tensor_value_info(f"arena{i}", elem, arena),
                 helper.make_tensor_value_info(f"new{i}", elem, graph_layout)]
        s_out.append(helper.make_tensor_value_info(f"out{i}", elem, arena))
        if s.batch_axis == 0:
            g_nodes.append(helper.make_node("Gather", [f"arena{i}", "slots"], [f"state{i}"], axis=0))
            s_nodes.append(helper.make_node("ScatterND", [f"arena{i}", "slots2", f"new{i}"], [f"out{i}"]))
        else:
            g_nodes += [helper.make_node("Gather", [f"arena{i}", "slots"], [f"rows{i}"], axis=0),
                        helper.make_node("Transpose", [f"rows{i}"], [f"state{i}"],
                                         perm=_to_graph(rank, s.batch_axis))]
            s_nodes += [helper.make_node("Transpose", [f"new{i}"], [f"rows{i}"],
                                         perm=_to_batch_first(rank, s.batch_axis)),
                        helper.make_node("ScatterND", [f"arena{i}", "slots2", f"rows{i}"], [f"out{i}"])]
    opset = [helper.make_opsetid("", OPSET)]
    gather = helper.make_model(helper.make_graph(g_nodes, "rnnd_gather", g_in, g_out), opset_imports=opset)
    scatter = helper.make_model(helper.make_graph(s_nodes, "rnnd_scatter", s_in, s_out), opset_imports=opset)
    gather.ir_version = scatter.ir_version = 8
    return gather.SerializeToString(), scatter.SerializeToString()


class DeviceArena:
    """``state.StateArena``'s interface, the state on the model's device (module docstring)."""

    def __init__(self, spec: BundleSpec, capacity: int, placement: Placement) -> None:
        self.device, self.device_id = placement.device, placement.device_id
        gather, scatter = _graphs(spec.states)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self._gather = ort.InferenceSession(gather, sess_options=opts, providers=placement.providers)
        self._scatter = ort.InferenceSession(scatter, sess_options=opts, providers=placement.providers)
        self.capacity = capacity
        # np.zeros maps its pages lazily: on the CPU the values wrap these arrays (no copy), so memory
        # follows the slots in use, as in the host arena; on a GPU they are copied there once.
        self._host = [np.zeros((capacity, *s.shape), dtype=s.dtype) for s in spec.states]
        self.values = [ort.OrtValue.ortvalue_from_numpy(h, self.device, self.device_id) for h in self._host]
        self._pending: dict[int, list[np.ndarray]] = {}  # slot -> its state to write (per-stream shapes)
        self.adopt(spec)

    def adopt(self, spec: BundleSpec) -> None:
        self.specs = spec.states
        self.initial = initial_values(spec)

    # --- the model's calls ------------------------------------------------------------------
    def gather(self, slots: np.ndarray) -> list[ort.OrtValue]:
        """The streams' state in the graph's layout, on the device."""
        return list(self._read(slots, self.device, self.device_id).get_outputs())

    def _read(self, slots: np.ndarray, device: str, device_id: int = 0) -> ort.IOBinding:
        """The gather graph's run, its outputs left on ``device``."""
        self._flush()
        binding = self._gather.io_binding()
        binding.bind_cpu_input("slots", np.ascontiguousarray(slots, dtype=np.int64))
        for i, v in enumerate(self.values):
            binding.bind_ortvalue_input(f"arena{i}", v)
            binding.bind_output(f"state{i}", device, device_id)
        self._gather.run_with_iobinding(binding)
        return binding

    def scatter(self, slots: np.ndarray, states: Sequence[Any]) -> None:
        """The streams' new state (device values from ``run_bound``, or host arrays) into their slots."""
        self._flush()
        self._write(np.ascontiguousarray(slots, dtype=np.int64), list(states))

    def _write(self, slots: np.ndarray, states: list[Any]) -> None:
        binding = self._scatter.io_binding()
        binding.bind_cpu_input("slots2", slots[:, None])
        for i, (v, new) in enumerate(zip(self.values, states, strict=True)):
            binding.bind_ortvalue_input(f"arena{i}", v)
            if isinstance(new, ort.OrtValue):
                binding.bind_ortvalue_input(f"new{i}", new)
            else:
                binding.bind_cpu_input(f"new{i}", np.ascontiguousarray(new, dtype=self.specs[i].dtype))
            binding.bind_ortvalue_output(f"out{i}", v)  # the arena itself: written in place
        self._scatter.run_with_iobinding(binding)

    # --- single streams, batched ------------------------------------------------------------
    def init(self, slot: int, key: bytes, fresh: bool = False) -> None:
        if fresh and all(v is None for v in self.initial):
            self._pending.pop(slot, None)
            return  # a fresh slot holds zeros since allocation
        values = []
        for s, value in zip(self.specs, self.initial, strict=True):
            if isinstance(value, StateSpec):
                value = value.initial_for(key)
            values.append(np.zeros(s.shape, dtype=s.dtype) if value is None else np.asarray(value, dtype=s.dtype))
        self._pending[slot] = values

    def put(self, slot: int, values: list[np.ndarray]) -> None:
        self._pending[slot] = [np.asarray(v, dtype=s.dtype) for v, s in zip(values, self.specs, strict=True)]

    def get(self, slot: int) -> list[np.ndarray]:
        return [t[0] for t in self.get_many(np.array([slot], dtype=np.int64))]

    def get_many(self, slots: np.ndarray) -> list[np.ndarray]:
        """The streams' state on the host, batch-first (``[n, *per-stream shape]``), in one copy per tensor."""
        on_host = self._read(slots, "cpu").copy_outputs_to_cpu()
        return [np.moveaxis(t, s.batch_axis, 0) for t, s in zip(on_host, self.specs, strict=True)]

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        slots = np.fromiter(pending, dtype=np.int64, count=len(pending))
        rows = list(pending.values())
        self._write(slots, [np.stack([r[i] for r in rows], axis=s.batch_axis) for i, s in enumerate(self.specs)])

    @property
    def bytes_per_stream(self) -> int:
        return sum(s.nbytes for s in self.specs)
