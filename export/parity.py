"""Proof, before a bundle is written, that ONNX Runtime computes what PyTorch computes.

The reference is PyTorch over the full sequence in one forward call of the user's original
module, called the way the user calls it (time-first, nested state: see
``protocol.Adapter.reference``). The candidate is the
exported graph run through ``BundleModel`` — the daemon's own runtime code — step by step
(T=1 per call, state carried between calls) and in chunks, at several batch sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rnnd.daemon.bundle import BundleSpec, ParityCase, ParityReport
from rnnd.daemon.runtime import BundleModel

from . import protocol
from .errors import ParityError


@dataclass(frozen=True)
class ParityPlan:
    batches: tuple[int, ...] = (1, 7, 512)
    chunks: tuple[int, ...] = (1, 16)
    steps: int = 40  # not a multiple of 16: the last chunk is a short one
    tolerance: float = 1e-4
    seed: int = 0


def random_inputs(spec: BundleSpec, batch: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    if spec.input.kind == "tokens":
        return rng.integers(0, spec.input.vocab_size, size=(batch, steps), dtype=np.int64)
    return rng.standard_normal((batch, steps, spec.input.n_features)).astype(np.float32)


def realistic_inputs(
    spec: BundleSpec, batch: int, steps: int, rng: np.random.Generator, sample: np.ndarray | None
) -> np.ndarray:
    """Slices of a real sequence if the caller has one; else smooth (numeric) or Zipf (tokens) data."""
    if sample is not None and len(sample) >= steps:
        starts = rng.integers(0, len(sample) - steps + 1, size=batch)
        return np.stack([sample[s:s + steps] for s in starts]).astype(spec.input.dtype)
    if spec.input.kind == "tokens":
        v = spec.input.vocab_size
        ids = np.minimum(rng.zipf(1.3, size=(batch, steps)) - 1, v - 1)
        return ids.astype(np.int64)
    f = spec.input.n_features
    walk = np.cumsum(rng.standard_normal((batch, steps, f)) * 0.3, axis=1)
    phase = rng.uniform(0, 2 * np.pi, size=(batch, 1, f))
    t = np.arange(steps)[None, :, None]
    return (np.sin(0.2 * t + phase) + 0.3 * walk).astype(np.float32)


def check(
    bundle: BundleModel,
    adapter: protocol.Adapter,
    plan: ParityPlan,
    sample: np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
) -> ParityReport:
    """Compare and raise ParityError on a miss; otherwise return the measured errors."""
    spec = bundle.spec
    rng = np.random.default_rng(plan.seed)
    cases: list[ParityCase] = []
    window = spec.mode == "window"
    steps = spec.window if window else plan.steps
    assert steps is not None
    chunks: Sequence[int] = (steps,) if window else plan.chunks
    for data in ("random", "realistic"):
        for b in plan.batches:
            x = (random_inputs(spec, b, steps, rng) if data == "random"
                 else realistic_inputs(spec, b, steps, rng, sample))
            with torch.no_grad():
                y = adapter.reference(torch.from_numpy(x))
            # A non-finite reference is the model's own problem: not a parity miss to report as one.
            protocol.check_finite(y, adapter.model, where=f"{data} input (B={b}, T={steps})")
            ref = y.numpy()
            for chunk in chunks:
                got = bundle.run(x, [])[0] if window else bundle.run_sequence(x, chunk=chunk)[0]
                # A shape mismatch or a NaN anywhere is a miss, never a pass.
                err = float(np.max(np.abs(got - ref))) if got.shape == ref.shape else float("inf")
                if np.isnan(err):
                    err = float("inf")
                cases.append(ParityCase(batch=b, steps=steps, chunk=chunk, data=data, max_abs_err=err))
                if progress:
                    progress(f"B={b} T={steps} chunk={chunk} {data}: {err:.2e}")
    if spec.start is not None:
        cases += _context_start_cases(bundle, adapter, plan, rng, progress)
    worst = max(cases, key=lambda c: c.max_abs_err)
    report = ParityReport(tolerance=plan.tolerance, max_abs_err=worst.max_abs_err, cases=tuple(cases))
    if not worst.max_abs_err <= plan.tolerance:
        how = "one step per call" if worst.chunk == 1 else f"chunks of {worst.chunk} steps"
        raise ParityError(
            f"parity check failed: max abs error {worst.max_abs_err:.3g} > tolerance "
            f"{plan.tolerance:g} (B={worst.batch}, {how}, {worst.data} input); the ONNX graph "
            "computes something other than the PyTorch model — check that forward() depends "
            "only on x and the state it is given (no hidden Python-side state, no randomness "
            "in eval mode), or raise --tolerance if the difference is expected")
    return report


def _context_start_cases(bundle: BundleModel, adapter: protocol.Adapter, plan: ParityPlan, rng: np.random.Generator,
                         progress: Callable[[str], None] | None) -> list[ParityCase]:
    """Streams started from a context: the init(context) graph's state and the steps run from it,
    against PyTorch's init(context) and the module run over the sequence from that state."""
    spec = bundle.spec
    assert spec.start is not None
    cases = []
    for b in plan.batches:
        context = rng.standard_normal((b, spec.start.size)).astype(np.float32)
        x = random_inputs(spec, b, plan.steps, rng)
        with torch.no_grad():
            start = adapter.start(torch.from_numpy(context))
            ref = adapter.reference(torch.from_numpy(x), [t.contiguous() for t in start]).numpy()
        got_start = bundle.start_state(context)
        got = bundle.run_sequence(x, chunk=1, states=got_start)[0]
        pairs = [(g, r.numpy()) for g, r in zip(got_start, start, strict=True)] + [(got, ref)]
        errs = [float(np.max(np.abs(g - r))) if g.shape == r.shape else float("inf") for g, r in pairs]
        err = float("inf") if any(np.isnan(errs)) else max(errs)
        cases.append(ParityCase(batch=b, steps=plan.steps, chunk=1, data="context start", max_abs_err=err))
        if progress:
            progress(f"B={b} T={plan.steps} chunk=1 from init(context): {err:.2e}")
    return cases


def format_report(report: ParityReport) -> str:
    w = max(9, *(len(c.data) for c in report.cases))
    lines = [f"parity vs {report.reference} (tolerance {report.tolerance:g}):",
             f"  {'data':<{w}} {'B':>4} {'T':>5} {'chunk':>6}  max|err|"]
    for c in report.cases:
        lines.append(f"  {c.data:<{w}} {c.batch:>4} {c.steps:>5} {c.chunk:>6}  {c.max_abs_err:.2e}")
    lines.append(f"  worst: {report.max_abs_err:.2e}")
    return "\n".join(lines)
