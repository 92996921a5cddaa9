"""A bundle loaded into ONNX Runtime: run B streams by T steps, carrying state.

This is the only place that calls ``session.run``. The exporter's parity check and
``rnnd inspect`` use the same code as the daemon, so what they prove is what is served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from .bundle import (
    BundleError,
    BundleIntegrityError,
    BundleSpec,
    declared_precision,
    embedded_graph,
    load_proto,
    metadata_entries,
    read_bytes,
    spec_from_metadata,
    verified_spec,
)
from .device import GPU_PROVIDERS
from .errors import ProviderError

if TYPE_CHECKING:
    from .config import ServeConfig


def _refuse_if_modified(data: bytes, source: str) -> None:
    """Raise BundleIntegrityError if ``data`` is a bundle whose content hash does not match; else nothing."""
    try:
        verified_spec(load_proto(data, source), source)
    except BundleIntegrityError:
        raise
    except Exception:  # not readable as a bundle either: the caller reports ONNX Runtime's reason
        return


def _refuse_unrunnable_precision(precision: str, providers: Sequence[object], source: str) -> None:
    """Raise ProviderError, before a session exists, for a bundle its first provider cannot run.

    An int8 bundle's quantized ops (DynamicQuantizeLSTM, MatMulInteger: ONNX Runtime's contrib ops)
    have CPU kernels only: on a GPU provider ONNX Runtime would quietly place them on the CPU, and
    every call would copy to and from the device for arithmetic the GPU never does.
    """
    first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    if precision == "int8" and first in GPU_PROVIDERS:
        raise ProviderError(f"{source} is an int8 bundle, whose quantized ops ONNX Runtime runs on the CPU only: "
                            "serve it with --provider cpu, or export the model with --precision fp32 or fp16 "
                            "for the GPU")


class BundleModel:
    """An ONNX Runtime session plus the spec read from its own metadata.

    Every way of loading a bundle comes through here, so this is where its content hash is
    checked (``bundle.verified_spec``). The file is read once and the bytes that were hashed are
    the bytes ONNX Runtime runs: no window in which the file could change between check and use.
    ``check_content=False`` is for ``rnnd inspect`` alone, to show what a refused file claims.
    """

    def __init__(
        self,
        model: str | Path | bytes,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int = 0,
        spinning: bool = False,
        check_content: bool = True,
    ) -> None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        # ONNX Runtime's worker threads busy-wait between calls by default: a little less latency,
        # but an idle daemon then burns its cores (and starves anything sharing them).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
        source = "model" if isinstance(model, bytes) else str(model)
        data = model if isinstance(model, bytes) else read_bytes(model)
        precision = declared_precision(data)
        _refuse_unrunnable_precision(precision, providers, source)
        if precision == "fp16":
            # onnxruntime 1.31.1 segfaults creating a CPU session for an fp16 recurrent graph at
            # ORT_ENABLE_ALL; DISABLE_ALL, BASIC and EXTENDED create it and run: the highest of those.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=list(providers))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if check_content:
                _refuse_if_modified(data, source)  # an edit that broke the graph is still an edit
            raise BundleError(f"{source} is not an ONNX model ONNX Runtime can load: {first}") from None
        proto = load_proto(data, source)
        self.spec: BundleSpec = (verified_spec(proto, source) if check_content
                                 else spec_from_metadata(metadata_entries(proto, source), source))
        # A bundle's second graph, run by its own session: init(context) -> state, when the model has
        # one; a seq2seq bundle's encoder, run once per message (see Seq2SeqSpec).
        metadata = metadata_entries(proto, source)

        def second(key: str, what: str) -> ort.InferenceSession:
            try:
                return ort.InferenceSession(embedded_graph(metadata, key, source), sess_options=opts,
                                            providers=list(providers))
            except BundleError:
                raise
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BundleError(f"{source}: its {what} graph is not one ONNX Runtime can load: {first}") from None

        start, s2s = self.spec.start, self.spec.seq2seq
        self.start_session = second(start.graph, "init(context)") if start is not None else None
        self.encoder_session = second(s2s.encoder_graph, "encoder") if s2s is not None else None
        del proto, data
        self._check_graph_matches_spec()
        states = self.spec.seq2seq.states if self.spec.seq2seq is not None else self.spec.states
        self._state_in = [s.input_name for s in states]
        self._outputs = [self.spec.y_name] + [s.output_name for s in states]

    def _check_graph_matches_spec(self) -> None:
        spec = self.spec
        graphs = [(self.session, {spec.x_name, *(s.input_name for s in spec.states)},
                   {spec.y_name, *(s.output_name for s in spec.states)}, "bundle graph")]
        if self.start_session is not None and spec.start is not None:
            graphs.append((self.start_session, {spec.start.input_name},
                           {spec.start.output_name(s) for s in spec.states}, "init(context) graph"))
        s2s = spec.seq2seq
        if self.encoder_session is not None and s2s is not None:
            graphs[0] = (self.session, {spec.x_name, s2s.memory_name, s2s.mask_name,
                                        *(s.input_name for s in s2s.states)},
                         {spec.y_name, *(s.output_name for s in s2s.states)}, "decoder step graph")
            graphs.append((self.encoder_session, {s2s.source_name},
                           {s2s.memory_name, *(s2s.init_name(s) for s in s2s.states)}, "encoder graph"))
        for session, want_in, want_out, what in graphs:
            inputs = {i.name for i in session.get_inputs()}
            outputs = {o.name for o in session.get_outputs()}
            if inputs != want_in or not want_out <= outputs:
                raise BundleError(
                    f"{what} does not match its metadata: graph inputs {sorted(inputs)}, "
                    f"outputs {sorted(outputs)}; metadata expects {sorted(want_in)} -> {sorted(want_out)}")

    # --- state ------------------------------------------------------------------------------
    def initial_state(self, batch: int, keys: Sequence[bytes] | None = None) -> list[np.ndarray]:
        """Fresh state for ``batch`` streams, in graph layout (batch on each spec's axis).

        With ``keys`` (one per stream), each stream's own initial state, as the daemon starts it
        (a random initial state is drawn per key); without, the reference one that PyTorch's
        module starts from, which parity and the self-check use.
        """
        if keys is not None and len(keys) != batch:
            raise ValueError(f"{len(keys)} keys for {batch} streams")
        out = []
        for s in self.spec.states:
            if keys is not None and s.init == "random":
                out.append(np.ascontiguousarray(np.stack([s.initial_for(k) for k in keys], axis=s.batch_axis)))
                continue
            one = np.expand_dims(s.initial(), s.batch_axis)
            out.append(np.ascontiguousarray(np.repeat(one, batch, axis=s.batch_axis)))
        return out

    def start_state(self, context: np.ndarray) -> list[np.ndarray]:
        """``init(context[B, size])``: the initial state of B streams started from a context, graph layout."""
        spec = self.spec
        if self.start_session is None or spec.start is None:
            raise BundleError(f"{spec.model.ref} has no init(context): its streams cannot start from a context")
        names = [spec.start.output_name(s) for s in spec.states]
        return list(self.start_session.run(names, {spec.start.input_name: np.ascontiguousarray(context,
                                                                                               dtype=np.float32)}))

    # --- seq2seq ----------------------------------------------------------------------------
    def encode(self, source: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The encoder over ``source[B, S]`` ids (or ``[B, S, F]`` numbers, model space), all of one
        length S: ``memory[B, S, H]`` and the decoder's first state, graph layout."""
        s2s = self.spec.seq2seq
        if self.encoder_session is None or s2s is None:
            raise BundleError(f"{self.spec.model.ref} is not a seq2seq bundle: it has no encoder")
        names = [s2s.memory_name] + [s2s.init_name(s) for s in s2s.states]
        memory, *states = self.encoder_session.run(names, {s2s.source_name: np.ascontiguousarray(source)})
        return memory, states

    def decode_step(self, tokens: np.ndarray, memory: np.ndarray, mask: np.ndarray,
                    states: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder step for B hypotheses: previous ``tokens[B]``, their source's ``memory[B, S, H]``
        and ``mask[B, S]`` (false at padding) → next-token ``logits[B, V]`` and the new state."""
        s2s = self.spec.seq2seq
        assert s2s is not None
        feed = {self.spec.x_name: tokens, s2s.memory_name: memory, s2s.mask_name: mask}
        feed.update(zip(self._state_in, states, strict=True))
        y, *new = self.session.run(self._outputs, feed)
        return y, new

    # --- running ----------------------------------------------------------------------------
    def run(self, x: np.ndarray, states: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call: stateful ``x[B,T,...]`` → ``y[B,T,O]`` and new states; window ``x[B,W,...]`` → ``y[B,O]``."""
        feed = {self.spec.x_name: x}
        feed.update(zip(self._state_in, states, strict=True))
        y, *new = self.session.run(self._outputs, feed)
        return y, new

    def run_bound(self, x: np.ndarray, states: Sequence[ort.OrtValue], device: str,
                  device_id: int = 0) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """``run`` with IO binding, for state kept on the device (``device.DeviceArena``): ``x`` from the
        host, ``states`` and the new states on ``device``, only ``y`` back to the host."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.spec.x_name, x)
        for name, v in zip(self._state_in, states, strict=True):
            binding.bind_ortvalue_input(name, v)
        binding.bind_output(self.spec.y_name, "cpu")
        for name in self._outputs[1:]:
            binding.bind_output(name, device, device_id)
        self.session.run_with_iobinding(binding)
        y, *new = binding.get_outputs()
        return y.numpy(), new

    def run_sequence(
        self, x: np.ndarray, chunk: int = 1, states: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Stateful: run ``x[B,T,...]`` in calls of ``chunk`` steps, carrying state between calls."""
        if self.spec.mode != "stateful":
            raise BundleError("run_sequence is for stateful bundles; use run_windows")
        state = list(states) if states is not None else self.initial_state(x.shape[0])
        ys = []
        for t0 in range(0, x.shape[1], chunk):
            y, state = self.run(np.ascontiguousarray(x[:, t0:t0 + chunk]), state)
            ys.append(y)
        return np.concatenate(ys, axis=1), state

    def run_windows(self, x: np.ndarray) -> np.ndarray:
        """Window mode: the prediction at every step of ``x[B,T,...]`` from the last W inputs.

        Steps before the window is full see zero-padding in model space (what the daemon
        does for a young stream; its predictions are marked as warm-up).
        """
        w = self.spec.window
        assert w is not None
        b, t = x.shape[:2]
        pad = np.zeros((b, w - 1, *x.shape[2:]), dtype=x.dtype)
        if x.dtype == np.int64 and self.spec.input.tokenizer and self.spec.input.tokenizer.pad_id is not None:
            pad[:] = self.spec.input.tokenizer.pad_id
        padded = np.concatenate([pad, x], axis=1)
        ys = [self.run(np.ascontiguousarray(padded[:, i:i + w]), [])[0] for i in range(t)]
        return np.stack(ys, axis=1)

    def self_check(self) -> float:
        """Re-run the probe stored at export; return the max abs error against PyTorch's outputs."""
        check = self.spec.self_check
        if check is None:
            raise BundleError("bundle has no self-check data")
        x, y_ref = check.arrays(self.spec.input.dtype)
        errs = []
        if self.spec.mode == "seq2seq":  # y_ref: PyTorch's logits along its greedy answer, teacher-forced here
            from .seq2seq import teacher_forced

            errs.append(float(np.max(np.abs(teacher_forced(self, x, y_ref.argmax(-1)) - y_ref))))
        elif self.spec.mode == "stateful":
            for chunk in (1, x.shape[1]):
                y, _ = self.run_sequence(x, chunk=chunk)
                errs.append(float(np.max(np.abs(y - y_ref))))
        else:
            errs.append(float(np.max(np.abs(self.run(x, [])[0] - y_ref))))
        return max(errs)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()


# --- execution providers ------------------------------------------------------------------------

_PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                   "tensorrt": "TensorrtExecutionProvider"}


@dataclass(frozen=True)
class ProviderChoice:
    requested: str  # as configured: cpu, cuda:0, tensorrt:1
    actual: str  # the provider the session really runs on (ONNX Runtime's name)
    fallback: bool  # True when we run on CPU although something else was requested

    @property
    def label(self) -> str:
        return {v: k for k, v in _PROVIDER_NAMES.items()}.get(self.actual, self.actual)


def provider_list(requested: str, tensorrt_cache_dir: str = "") -> list:
    """ONNX Runtime's provider list for ``cpu``, ``cuda[:N]`` or ``tensorrt[:N]`` (CPU last, as ORT wants).

    ``tensorrt_cache_dir``: where TensorRT keeps the engines it builds (ONNX Runtime's engine
    cache, keyed by the graph and the shapes), so that a restart loads them instead of building
    them again, which takes minutes for a large model."""
    kind, _, dev = requested.partition(":")
    if kind not in _PROVIDER_NAMES:
        raise ProviderError(f"unknown provider {requested!r}: use cpu, cuda[:N] or tensorrt[:N]")
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    opts = {"device_id": int(dev or 0)}
    chain: list = [(_PROVIDER_NAMES[kind], opts)]
    if kind == "tensorrt":
        if tensorrt_cache_dir:
            chain[0] = (_PROVIDER_NAMES[kind], {**opts, "trt_engine_cache_enable": "True",
                                                "trt_engine_cache_path": tensorrt_cache_dir})
        chain.append(("CUDAExecutionProvider", opts))
    return [*chain, "CPUExecutionProvider"]


def open_served(path: str | Path, cfg: ServeConfig) -> tuple[BundleModel, ProviderChoice]:
    """``open_bundle`` with the serve settings that say how (provider, fallback, threads, TensorRT's cache)."""
    return open_bundle(path, cfg.provider, cfg.provider_fallback, cfg.intra_op_threads, cfg.ort_spinning,
                       cfg.tensorrt_cache_dir)


def open_bundle(path: str | Path, requested: str = "cpu", fallback: bool = False,
                intra_op_threads: int = 0, spinning: bool = False,
                tensorrt_cache_dir: str = "") -> tuple[BundleModel, ProviderChoice]:
    """Load a bundle on the requested device and verify that it really runs there.

    ONNX Runtime only warns when a provider is missing and silently runs on CPU; a daemon
    sized for a GPU would then fall over under load. So: refuse, or fall back only when
    ``fallback`` is set, and report it either way.
    """
    want = _PROVIDER_NAMES.get(requested.partition(":")[0], requested)
    providers = provider_list(requested, tensorrt_cache_dir)
    available = ort.get_available_providers()
    if want not in available:
        if not fallback:
            raise ProviderError(
                f"provider {requested} requested, but this onnxruntime offers only {', '.join(available)}: "
                "install onnxruntime-gpu with CUDA/cuDNN (the GPU image does), run with --provider cpu, "
                "or allow --provider-fallback")
        providers = ["CPUExecutionProvider"]
    model = BundleModel(path, providers=providers, intra_op_threads=intra_op_threads, spinning=spinning)
    actual = model.providers[0]
    if actual != want and not fallback:
        raise ProviderError(
            f"provider {requested} requested, but ONNX Runtime created the session on {actual} "
            "(a CUDA/cuDNN library is probably missing; see the ONNX Runtime log above), "
            "or allow --provider-fallback")
    return model, ProviderChoice(requested, actual, fallback=actual != want)
