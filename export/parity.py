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


def format_report(report: ParityReport) -> str:
    lines = [f"parity vs {report.reference} (tolerance {report.tolerance:g}):",
             "  data       B     T  chunk  max|err|"]
    for c in report.cases:
        lines.append(f"  {c.data:<9} {c.batch:>4} {c.steps:>5} {c.chunk:>6}  {c.max_abs_err:.2e}")
    lines.append(f"  worst: {report.max_abs_err:.2e}")
    return "\n".join(lines)
