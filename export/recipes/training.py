"""Truncated backpropagation through time, shared by every stream recipe; teacher forcing for seq2seq.

Sequences are cut into chunks of ``tbptt`` steps; the state carries from one chunk to the
next (detached, so gradients stop at the chunk boundary) and gradients are clipped — the
two standard remedies for exploding gradients over long sequences. An encoder–decoder is
trained with teacher forcing: the decoder is fed the true previous token, not its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import protocol


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 600
    batch: int = 64
    tbptt: int = 25
    lr: float = 1e-2
    clip: float = 1.0
    seed: int = 0


@dataclass
class Data:
    """Arrays in model space. y: float targets [N,T,O], or int class ids [N,T] (-1 = ignore)."""

    x: np.ndarray
    y: np.ndarray
    # Steps whose loss is masked (e.g. the delay line's first 10, which have no target).
    mask: np.ndarray | None = None


def _loss(kind: str, out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if kind == "regression":
        err = (out - y) ** 2
        if mask is not None:
            err = err[mask]
        return err.mean()
    logits = out.reshape(-1, out.shape[-1])
    target = y.reshape(-1)
    if mask is not None:
        target = torch.where(mask.reshape(-1), target, torch.full_like(target, -1))
    return nn.functional.cross_entropy(logits, target, ignore_index=-1)


def train(model: nn.Module, data: Data, output_kind: str, cfg: TrainConfig, progress: bool = True) -> list[float]:
    """Train in place; returns the loss curve (one value per iteration).

    One intra-op thread: these models are small, so a second thread buys little, and OpenMP
    threads that spin-wait collapse (orders of magnitude slower) when another busy process
    shares the two cores — as the daemons and brokers of the tests do.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(model, data, output_kind, cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _train(model: nn.Module, data: Data, output_kind: str, cfg: TrainConfig, progress: bool) -> list[float]:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    decls = protocol.derive_state(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations)
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y)
    m_all = torch.from_numpy(data.mask) if data.mask is not None else None
    n, t_total = data.x.shape[:2]
    chunks = math.ceil(t_total / cfg.tbptt)
    bar = _bar(cfg.iterations, progress)
    losses: list[float] = []
    model.train()
    it = 0
    started = time.monotonic()
    while it < cfg.iterations:
        idx = torch.from_numpy(rng.choice(n, size=min(cfg.batch, n), replace=False))
        state = protocol.batched(decls, len(idx), None)
        for c in range(chunks):
            if it >= cfg.iterations:
                break
            sl = slice(c * cfg.tbptt, (c + 1) * cfg.tbptt)
            out, *state = model(x_all[idx, sl], *state)
            state = [s.detach() for s in state]
            loss = _loss(output_kind, out, y_all[idx, sl], None if m_all is None else m_all[idx, sl])
            _update(model, opt, sched, loss, cfg.clip, losses, bar)
            it += 1
    if bar is not None:
        bar.close()
    model.eval()
    model.train_seconds = time.monotonic() - started  # type: ignore[assignment]  # read back by run_recipe
    return losses


def train_seq2seq(model: nn.Module, draw, lengths: tuple[int, int], bos: int, eos: int, cfg: TrainConfig,
                  progress: bool = True) -> list[float]:
    """Teacher forcing on fresh draws: each batch at one source length in ``lengths`` (inclusive)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as ``train``: small models, and cores shared with brokers and daemons
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations)
    bar = _bar(cfg.iterations, progress)
    losses: list[float] = []
    model.train()
    started = time.monotonic()
    try:
        for _ in range(cfg.iterations):
            x, y = draw(rng, cfg.batch, int(rng.integers(lengths[0], lengths[1] + 1)))
            target_in = np.concatenate([np.full((len(y), 1), bos), y], axis=1)
            target_out = np.concatenate([y, np.full((len(y), 1), eos)], axis=1)
            logits = model(torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(target_in)))
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               torch.from_numpy(np.ascontiguousarray(target_out)).reshape(-1))
            _update(model, opt, sched, loss, cfg.clip, losses, bar)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    model.eval()
    model.train_seconds = time.monotonic() - started  # type: ignore[assignment]  # read back by run_recipe
    return losses


def _update(model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
            loss: torch.Tensor, clip: float, losses: list[float], bar) -> None:
    """One optimiser step with the gradient clipped; the loss recorded, the bar moved (its postfix the
    mean loss of the last 20 steps)."""
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    losses.append(loss.item())
    if bar is not None:
        bar.update(1)
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Full-sequence forward from the initial state (how the metric is measured)."""
    decls = protocol.derive_state(model)
    with torch.no_grad():
        out, *_ = model(torch.from_numpy(x), *protocol.batched(decls, x.shape[0], None))
    return out.numpy()


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="training", unit="it", leave=False, dynamic_ncols=True)
