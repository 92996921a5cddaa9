"""Export a PyTorch model to a bundle: graph, metadata, parity proof, then (only then) the file."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

import rnnd
from rnnd.daemon.bundle import (
    PRECISIONS,
    BundleError,
    BundleSpec,
    ContextStart,
    InputSpec,
    ModelInfo,
    OutputSpec,
    Provenance,
    RandomInit,
    SelfCheck,
    Seq2SeqSpec,
    StateSpec,
    attach,
    embed_graph,
    encode_array,
)
from rnnd.daemon.runtime import BundleModel

from . import compat, graph, parity, precision, protocol
from . import seq2seq as s2s
from .errors import ExportError


@dataclass(frozen=True)
class ExportOptions:
    """What the exporter cannot learn from the module itself."""

    name: str
    input: InputSpec
    output: OutputSpec
    version: str = "1"
    description: str = ""
    mode: str = "stateful"
    window: int | None = None
    warmup_steps: int = 0
    parity: parity.ParityPlan = field(default_factory=parity.ParityPlan)
    # A realistic input sequence ([T, F] floats or [T] ids, model space) for the parity check.
    sample: np.ndarray | None = None
    source: str = ""
    # Streams start from a random state drawn per key (instead of zeros or a learned constant).
    random_init: RandomInit | None = None
    # With a model that has init(context): how many values a context has.
    context_size: int | None = None
    # mode seq2seq: the longest answer and source, and what joins output tokens into text
    # (None: "" for a char-level source vocabulary, else " ").
    max_output_len: int = 64
    max_source_len: int = 256
    separator: str | None = None
    # The graph's arithmetic (BundleSpec.precision); the parity plan's tolerance is the caller's
    # (the CLI takes PRECISIONS' default for it).
    precision: str = "fp32"


@dataclass(frozen=True)
class ExportResult:
    spec: BundleSpec
    path: Path
    report: str


def export_bundle(
    model: nn.Module,
    opts: ExportOptions,
    out: str | Path,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export ``model``; write ``out`` only if parity holds. Raises ExportError/ParityError."""
    say = log or (lambda _m: None)
    model = model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        if opts.precision not in PRECISIONS:
            raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, not {opts.precision!r}")
        if opts.mode == "seq2seq":
            if opts.precision != "fp32":
                raise ExportError(f"--precision {opts.precision} is for stateful and window bundles; a seq2seq "
                                  "bundle is exported in fp32")
            spec, onnx_model, report, check = _seq2seq_bundle(model, opts, say)
            strategy = "seq2seq"
        else:
            if opts.mode == "stateful":
                spec, onnx_model, strategy, adapter = _stateful_graph(model, opts)
            elif opts.mode == "window":
                spec, onnx_model, strategy, adapter = _window_graph(model, opts)
            else:
                raise ExportError(f"--mode must be 'stateful', 'window' or 'seq2seq', not {opts.mode!r}")
            say(f"model: {adapter.describe()}")
            say(f"graph: {strategy} strategy, opset {graph.OPSET}, {len(spec.states)} state tensor(s)")
            spec = _context_start(model, adapter, spec, opts, onnx_model, say)
            if opts.precision != "fp32":
                onnx_model = precision.at_precision(onnx_model, opts.precision, say)
                spec = dataclasses.replace(spec, precision=opts.precision)

            attach(onnx_model, spec)
            bundle = BundleModel(onnx_model.SerializeToString())
            chunks = f"window {opts.window}" if opts.mode == "window" else f"chunks {list(opts.parity.chunks)}"
            say(f"parity check: B in {list(opts.parity.batches)}, {chunks}")
            report = parity.check(bundle, adapter, opts.parity, sample=opts.sample,
                                  progress=lambda m: say("  " + m))
            check = _self_check(bundle, adapter, opts)
        spec = dataclasses.replace(
            spec, parity=report, self_check=check,
            provenance=Provenance(
                rnnd_version=rnnd.__version__, torch_version=torch.__version__,
                onnx_opset=graph.OPSET, graph_strategy=strategy,
                created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                source=opts.source))
    spec = attach(onnx_model, spec)  # seals the file: its content hash is set here
    try:
        onnx.checker.check_model(onnx_model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported graph is not valid ONNX: {str(e).splitlines()[0]}") from e
    path = Path(out)
    _write_atomically(path, onnx_model.SerializeToString())
    return ExportResult(spec=spec, path=path, report=parity.format_report(report))


# --- stateful ---------------------------------------------------------------------------------


def _stateful_graph(model: nn.Module, opts: ExportOptions):
    protocol.check_streamable(model)
    # Fails early, with one line, if forward fits none of the accepted styles or the input spec.
    adapter = _adapt(model, opts, window=None)
    decls, init = adapter.decls, adapter.init
    if init is not None and opts.random_init is not None:
        raise ExportError(f"{type(model).__name__} has a learned initial_state() and a random initial state was "
                          "asked for (--random-init): choose one")
    states = tuple(
        StateSpec(
            name=d.name, shape=tuple(int(s) for s in d.shape), batch_axis=d.batch_axis,
            input_name=f"{d.name}_in", output_name=f"{d.name}_out",
            init="learned" if init is not None else "random" if opts.random_init is not None else "zeros",
            init_value=encode_array(init[i].numpy().astype(np.float32)) if init is not None else None,
            init_random=opts.random_init)
        for i, d in enumerate(decls))
    spec = _spec(opts, states)

    x = _example(spec, batch=3, steps=2)
    _check_out_size(adapter.reference(x).shape[-1], spec.output)

    io_ = graph.GraphIO(spec.x_name, spec.y_name, spec.input.dtype, 3 if spec.input.kind == "numeric" else 2,
                        spec.output.size, states)
    view = adapter.module()
    if not compat.needs_step_graph(model):
        native = graph.trace(view, io_, x, adapter.state(3))
        if not graph.symbolic_dims(native, io_) and _exact_elsewhere(native, adapter, spec):
            return spec, native, "native", adapter
    step_model = compat.exportable_copy(view)
    step = graph.trace(step_model, io_, _example(spec, batch=3, steps=1), adapter.state(3), time_dynamic=False)
    scanned = graph.wrap_in_scan(step, io_)
    problems = graph.symbolic_dims(scanned, io_)
    if problems:
        raise ExportError("exported graph has fixed dimensions: " + "; ".join(problems))
    return spec, scanned, "scan", adapter


def _context_start(model: nn.Module, adapter: protocol.Adapter, spec: BundleSpec, opts: ExportOptions,
                   onnx_model: onnx.ModelProto, say: Callable[[str], None]) -> BundleSpec:
    """A model with ``init(context)``: its second graph, embedded in ``onnx_model``; the spec names it."""
    name = type(model).__name__
    if not adapter.starts_from_context:
        if opts.context_size is not None:
            raise ExportError(f"--context-size is for a model with init(context); {name} has none")
        return spec
    if spec.mode != "stateful":
        raise ExportError(f"{name}.init(context) gives a starting state, and a window-mode model keeps none: "
                          "drop init() or export in stateful mode")
    if not opts.context_size or opts.context_size < 1:
        raise ExportError(f"{name} has init(context): say how many values one context has (--context-size C)")
    start = ContextStart(opts.context_size)
    example = torch.randn(3, start.size, generator=torch.Generator().manual_seed(5))
    adapter.start(example)  # the declared count and shapes, or one line saying which is off
    proto = graph.trace_start(model, start, spec.states, example)
    embed_graph(onnx_model, start.graph, proto.SerializeToString())
    say(f"init(context): a context of {start.size} values starts a stream (its own graph, {start.graph})")
    return dataclasses.replace(spec, start=start)


def _adapt(model: nn.Module, opts: ExportOptions, window: int | None) -> protocol.Adapter:
    inp = opts.input

    def example(batch: int, steps: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if inp.kind == "tokens":
            return torch.randint(0, max(inp.vocab_size, 1), (batch, steps), generator=g)
        return torch.randn(batch, steps, inp.n_features, generator=g)

    return protocol.adapt(model, example, window, n_features=inp.n_features if inp.kind == "numeric" else None,
                          vocab_size=inp.vocab_size if inp.kind == "tokens" else None)


def _exact_elsewhere(native: onnx.ModelProto, adapter: protocol.Adapter, spec: BundleSpec) -> bool:
    """Does a graph traced at (B=3, T=2) still compute the model at (B=2, T=5)?

    Tracing unrolls Python loops over time to the example length; such a graph keeps its
    symbolic input shapes but computes the wrong thing (or fails) at any other T.
    """
    attach(native, spec)
    try:
        candidate = BundleModel(native.SerializeToString())
        x = _example(spec, batch=2, steps=5)
        got, _ = candidate.run_sequence(x.numpy(), chunk=5)
    except Exception:
        return False
    want = adapter.reference(x).numpy()
    return got.shape == want.shape and float(np.max(np.abs(got - want))) <= 1e-4


# --- seq2seq ----------------------------------------------------------------------------------


def _seq2seq_bundle(model: nn.Module, opts: ExportOptions, say: Callable[[str], None]):
    """Both graphs in one file (the encoder embedded, like a context start), its parity proven."""
    name = type(model).__name__
    for given, what in ((opts.random_init, "--random-init"), (opts.context_size, "--context-size"),
                        (opts.window, "--window"), (opts.warmup_steps or None, "--warmup")):
        if given is not None:
            raise ExportError(f"{what} is not for --mode seq2seq: a seq2seq model answers each message on its own, "
                              "from its encoder")
    if opts.output.kind != "language_model":
        raise ExportError("a seq2seq model's output is its decoder's next-token logits: give the output vocabulary "
                          "(--target-vocab FILE)")
    inp = opts.input

    def example(batch: int, steps: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(batch * 100 + steps)
        if inp.kind == "tokens":
            return torch.randint(0, max(inp.vocab_size, 1), (batch, steps), generator=g)
        return torch.randn(batch, steps, inp.n_features, generator=g)

    separator = opts.separator
    if separator is None:
        separator = "" if inp.tokenizer is not None and inp.tokenizer.level == "char" else " "
    s2s_spec = s2s.seq2seq_spec(model, opts.output.size, example, opts.max_output_len, opts.max_source_len,
                                separator)
    spec = _spec(opts, (), seq2seq=s2s_spec)
    decoder, encoder = s2s.trace(model, spec, example)
    embed_graph(decoder, s2s_spec.encoder_graph, encoder.SerializeToString())
    say(f"model: {name}, encoder-decoder, memory H={s2s_spec.memory_size}, decoder state "
        f"{', '.join(f'{s.name}{list(s.shape)}' for s in s2s_spec.states)}")
    say(f"graphs: the decoder step (the bundle's graph) and the encoder ({s2s_spec.encoder_graph}), "
        f"opset {graph.OPSET}")
    attach(decoder, spec)
    bundle = BundleModel(decoder.SerializeToString())
    sources = s2s.proof_sources(spec, opts.sample, opts.parity.seed)
    say("parity check: greedy answers, the daemon's padded batch against PyTorch source by source")
    report = s2s.check(bundle, model, sources, opts.parity.tolerance, progress=lambda m: say("  " + m))
    return spec, decoder, report, s2s.self_check(model, spec, sources, opts.parity.tolerance)


# --- window -----------------------------------------------------------------------------------


def _window_graph(model: nn.Module, opts: ExportOptions):
    if opts.random_init is not None:
        raise ExportError("a random initial state is for stateful mode: a window model keeps no state "
                          "(drop --random-init)")
    if not opts.window or opts.window < 1:
        raise ExportError("window mode needs --window W (the number of past steps the model sees)")
    spec = _spec(opts, ())
    adapter = _adapt(model, opts, window=opts.window)
    x = _example(spec, batch=3, steps=opts.window)
    _check_out_size(adapter.reference(x).shape[-1], spec.output)
    io_ = graph.GraphIO(spec.x_name, spec.y_name, spec.input.dtype, 3 if spec.input.kind == "numeric" else 2,
                        spec.output.size, (), window=True)
    g = graph.trace(adapter.module(), io_, x, [])
    problems = graph.symbolic_dims(g, io_)
    if problems:
        raise ExportError("exported graph has fixed dimensions: " + "; ".join(problems))
    return spec, g, "window", adapter


# --- helpers ----------------------------------------------------------------------------------


def _spec(opts: ExportOptions, states: tuple[StateSpec, ...], seq2seq: Seq2SeqSpec | None = None) -> BundleSpec:
    try:
        return BundleSpec(
            model=ModelInfo(opts.name, opts.version, opts.description), mode=opts.mode,
            input=opts.input, output=opts.output, states=states,
            warmup_steps=opts.warmup_steps, window=opts.window if opts.mode == "window" else None, seq2seq=seq2seq)
    except BundleError as e:
        raise ExportError(str(e)) from None


def _example(spec: BundleSpec, batch: int, steps: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if spec.input.kind == "tokens":
        return torch.randint(0, spec.input.vocab_size, (batch, steps), generator=g)
    return torch.randn(batch, steps, spec.input.n_features, generator=g)


def _check_out_size(got: int, out: OutputSpec) -> None:
    if got != out.size:
        what = {"regression": "output names", "classification": "labels",
                "language_model": "vocabulary entries"}[out.kind]
        raise ExportError(
            f"the model outputs {got} values per step but the {out.kind} output spec has "
            f"{out.size} {what}; make them agree")


def _self_check(bundle: BundleModel, adapter: protocol.Adapter, opts: ExportOptions) -> SelfCheck:
    spec = bundle.spec
    rng = np.random.default_rng(opts.parity.seed + 1)
    steps = spec.window if spec.mode == "window" else 6
    assert steps is not None
    x = parity.random_inputs(spec, 2, steps, rng)
    with torch.no_grad():
        y = adapter.reference(torch.from_numpy(x)).numpy().astype(np.float32)
    return SelfCheck(x=encode_array(x), x_shape=tuple(x.shape), y=encode_array(y), y_shape=tuple(y.shape),
                     tolerance=opts.parity.tolerance)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename, so a reader never sees half a bundle.

    mkstemp creates the file 0600; the bundle gets the mode a plain ``open`` would give it
    (0666 less the umask), so that a daemon running as another user — the images run as
    10001 — can read a bundle mounted into its container.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

