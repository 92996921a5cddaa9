"""Encoder–decoder models with attention: the protocol, the two graphs, and the proof of parity.

The protocol (``rnnd export --mode seq2seq``)::

    class Translator(nn.Module):
        bos_id: int                             # fed as the first previous token
        eos_id: int                             # ends an answer

        def encode(self, source):               # [B, S] int64 ids, or [B, S, F] float32
            ...
            return memory, *state               # memory [B, S, H]; the decoder's first state

        def decode_step(self, token, memory, memory_mask, *state):
            # token [B] int64 (the previous output token), memory [B, S, H],
            # memory_mask [B, S] bool (False at padding: attention must leave those out)
            ...
            return logits, *state               # logits [B, V] over the output vocabulary

        # Optional: names for the state tensors (default h, or h and c for two).
        state_names = ("h",)

The daemon pads the sources of the messages it decodes together and masks the padding; the
proof below therefore runs the padded batch through the daemon's own decoding code and
compares each answer with PyTorch answering that source alone, unpadded. Each state
tensor's batch axis is found by calling ``encode`` at two batch sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
import onnx
import torch
from torch import nn

from rnnd.daemon.bundle import BundleSpec, ParityCase, ParityReport, SelfCheck, Seq2SeqSpec, StateSpec, encode_array
from rnnd.daemon.runtime import BundleModel
from rnnd.daemon.seq2seq import Cells

from . import graph
from .errors import ExportError, ParityError

#: Sources of these lengths go into the proof's padded batch (capped at max_source_len).
PROOF_LENGTHS = (1, 2, 3, 5, 8, 13)
#: Answers compared token by token; steps of the fixed-length teacher-forced comparison.
PROOF_SOURCES = 24
SELF_CHECK_STEPS = 8


def check_protocol(model: nn.Module) -> tuple[int, int]:
    name = type(model).__name__
    for method in ("encode", "decode_step"):
        if not callable(getattr(model, method, None)):
            raise ExportError(f"{name} has no {method}(): a seq2seq model has encode(source) -> (memory, *state) and "
                              "decode_step(token, memory, memory_mask, *state) -> (logits, *state) (see `rnnd export "
                              "--help`, 'seq2seq')")
    ids = []
    for attr in ("bos_id", "eos_id"):
        v = getattr(model, attr, None)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ExportError(f"{name}.{attr} must be an int token id of the output vocabulary (the one it was "
                              "trained with)")
        ids.append(v)
    return ids[0], ids[1]


def _encode(model: nn.Module, source: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = cast(Any, model).encode(source)
    if not isinstance(out, (tuple, list)) or len(out) < 2 or not all(isinstance(t, torch.Tensor) for t in out):
        raise ExportError(f"{type(model).__name__}.encode(source) must return (memory, *state): tensors, at least "
                          "one state")
    memory, *state = out
    b, s = source.shape[:2]
    if memory.dim() != 3 or tuple(memory.shape[:2]) != (b, s):
        raise ExportError(f"{type(model).__name__}.encode must return memory of shape [B, S, H] = [{b}, {s}, H]; "
                          f"got {list(memory.shape)}")
    return memory, list(state)


def _step(model: nn.Module, token: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor,
          state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = cast(Any, model).decode_step(token, memory, mask, *state)
    if not isinstance(out, (tuple, list)) or len(out) != len(state) + 1:
        raise ExportError(f"{type(model).__name__}.decode_step(token, memory, memory_mask, *state) must return "
                          f"(logits, *state) with {len(state) + 1} values")
    logits, *new = out
    if logits.dim() != 2 or logits.shape[0] != token.shape[0]:
        raise ExportError(f"{type(model).__name__}.decode_step must return logits [B, V]; got {list(logits.shape)}")
    return logits, list(new)


def state_specs(model: nn.Module, example: Callable[[int, int], torch.Tensor]) -> tuple[StateSpec, ...]:
    """The decoder state's per-message shapes and batch axes, from ``encode`` at B=2 and B=3."""
    _, a = _encode(model, example(2, 4))
    _, b = _encode(model, example(3, 4))
    n = len(a)
    names = tuple(getattr(model, "state_names", ()) or (("h",) if n == 1 else ("h", "c") if n == 2 else
                                                          tuple(f"s{i}" for i in range(n))))
    if len(names) != n:
        raise ExportError(f"{type(model).__name__}.state_names names {len(names)} states; encode returns {n}")
    out = []
    for name, s2, s3 in zip(names, a, b, strict=True):
        axes = [ax for ax in range(s2.dim()) if s2.shape[ax] != s3.shape[ax]]
        if len(axes) != 1:
            raise ExportError(f"state {name!r} returned by encode has no single batch axis (shapes {list(s2.shape)} at "
                              f"B=2, {list(s3.shape)} at B=3)")
        ax = axes[0]
        shape = tuple(int(d) for i, d in enumerate(s2.shape) if i != ax)
        out.append(StateSpec(name, shape, ax, f"{name}_in", f"{name}_out"))
    return tuple(out)


# --- the two graphs ---------------------------------------------------------------------------


def trace(model: nn.Module, spec: BundleSpec, example: Callable[[int, int], torch.Tensor]
          ) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(decoder step graph, encoder graph), with B and S symbolic."""
    s2s = spec.seq2seq
    assert s2s is not None
    wrapper_mode = model.training
    source = example(3, 5)
    memory, state = _encode(model, source)
    enc = graph.trace_function(graph.Method(model, "encode").train(wrapper_mode), (source,), [s2s.source_name],
                               [s2s.memory_name] + [s2s.init_name(s) for s in s2s.states],
                               {s2s.source_name: {0: "B", 1: "S"}, s2s.memory_name: {0: "B", 1: "S"},
                                **{s2s.init_name(s): {s.batch_axis: "B"} for s in s2s.states}}, "the encoder")
    token = torch.full((3,), s2s.bos_id, dtype=torch.int64)
    mask = torch.ones(memory.shape[:2], dtype=torch.bool)
    dyn: dict[str, dict[int, str]] = {spec.x_name: {0: "B"}, spec.y_name: {0: "B"},
                                      s2s.memory_name: {0: "B", 1: "S"}, s2s.mask_name: {0: "B", 1: "S"}}
    for s in s2s.states:
        dyn[s.input_name] = dyn[s.output_name] = {s.batch_axis: "B"}
    dec = graph.trace_function(graph.Method(model, "decode_step").train(wrapper_mode), (token, memory, mask, *state),
                               [spec.x_name, s2s.memory_name, s2s.mask_name] + [s.input_name for s in s2s.states],
                               [spec.y_name] + [s.output_name for s in s2s.states], dyn, "the decoder step")
    for proto, names in ((enc, [s2s.source_name, s2s.memory_name]), (dec, [s2s.memory_name, s2s.mask_name])):
        for v in [*proto.graph.input, *proto.graph.output]:
            if v.name in names and not all(d.dim_param for d in v.type.tensor_type.shape.dim[:2]):
                raise ExportError(f"the exported graph fixes the batch or source length of {v.name!r}: make "
                                  "encode/decode_step free of Python loops over the source and of fixed shapes")
    return dec, enc


# --- parity -----------------------------------------------------------------------------------


def reference_answer(model: nn.Module, source: torch.Tensor, bos: int, eos: int, max_len: int
                     ) -> tuple[list[int], list[np.ndarray]]:
    """PyTorch's greedy answer to one source alone (``[S]`` or ``[S, F]``), and the logits of each step."""
    memory, state = _encode(model, source[None])
    mask = torch.ones(memory.shape[:2], dtype=torch.bool)
    prev = torch.tensor([bos])
    ids: list[int] = []
    logits_seen = []
    for _ in range(max_len):
        logits, state = _step(model, prev, memory, mask, state)
        logits_seen.append(logits[0].numpy())
        tok = int(logits[0].argmax())
        if tok == eos:
            break
        ids.append(tok)
        prev = torch.tensor([tok])
    return ids, logits_seen


def check(bundle: BundleModel, model: nn.Module, sources: list[np.ndarray], tolerance: float,
          progress: Callable[[str], None]) -> ParityReport:
    """Greedy answers of the padded batch (the daemon's decoding) equal PyTorch's, source by source;
    teacher-forced logits along them agree within ``tolerance``."""
    spec = bundle.spec
    s2s = spec.seq2seq
    assert s2s is not None
    cells = Cells(bundle)
    cells.add(list(enumerate(sources)))
    got: dict[int, list[int]] = {}
    while len(cells):
        for tag, answer in cells.step():
            got[cast(int, tag)] = answer.ids
    references = []
    for i, src in enumerate(sources):
        want, logits = reference_answer(model, torch.from_numpy(src), s2s.bos_id, s2s.eos_id, s2s.max_output_len)
        references.append((want, logits))
        if got[i] != want:
            at = next((j for j, (a, b) in enumerate(zip(got[i], want, strict=False)) if a != b), min(len(got[i]),
                                                                                                      len(want)))
            top2 = np.sort(logits[at])[-2:] if at < len(logits) else None
            if top2 is None or top2[1] - top2[0] > tolerance:
                raise ParityError(
                    f"the answer to a source of length {len(src)}, decoded in a padded batch as the daemon does, "
                    f"differs from PyTorch answering it alone at token {at} (got {got[i][:at + 1]}, PyTorch "
                    f"{want[:at + 1]}): decode_step must leave out the memory where memory_mask is False")
    worst = _padded_logits_error(bundle, sources, references)
    progress(f"{len(sources)} greedy answers equal PyTorch's (sources of lengths "
             f"{min(map(len, sources))}-{max(map(len, sources))} in one padded batch); max logit err {worst:.2e}")
    if worst > tolerance:
        raise ParityError(f"decoder logits in a padded batch differ from PyTorch's for each source alone by "
                          f"{worst:.2e} (tolerance {tolerance:g}): decode_step must leave out the memory where "
                          "memory_mask is False")
    lengths = sorted({len(s) for s in sources})
    case = ParityCase(batch=len(sources), steps=max(lengths), chunk=1,
                      data=f"greedy answers, sources of lengths {lengths[0]}-{lengths[-1]} padded in one batch",
                      max_abs_err=worst)
    return ParityReport(tolerance=tolerance, max_abs_err=worst, cases=(case,),
                        reference="PyTorch, each source answered alone (greedy, unpadded)")


def _padded_logits_error(bundle: BundleModel, sources: list[np.ndarray],
                         references: list[tuple[list[int], list[np.ndarray]]]) -> float:
    """Every source's decoder logits along PyTorch's answer, all sources in one padded, masked batch
    (teacher-forced: each row is fed PyTorch's tokens), against PyTorch's unpadded logits."""
    s2s = bundle.spec.seq2seq
    assert s2s is not None
    axes = [s.batch_axis for s in s2s.states]
    width = max(len(s) for s in sources)
    memory = np.zeros((len(sources), width, s2s.memory_size), dtype=np.float32)
    mask = np.zeros((len(sources), width), dtype=bool)
    parts: list[list[np.ndarray]] = []
    for i, src in enumerate(sources):
        mem, st = bundle.encode(src[None])
        memory[i, : len(src)], mask[i, : len(src)] = mem[0], True
        parts.append(st)
    states = [np.concatenate([p[j] for p in parts], axis=ax) for j, ax in enumerate(axes)]
    steps = max(len(logits) for _, logits in references)
    targets = np.full((len(sources), steps), s2s.eos_id, dtype=np.int64)
    for i, (ids, _) in enumerate(references):
        targets[i, : len(ids)] = ids
    prev = np.full(len(sources), s2s.bos_id, dtype=np.int64)
    worst = 0.0
    for t in range(steps):
        logits, states = bundle.decode_step(prev, memory, mask, states)
        for i, (_, want) in enumerate(references):
            if t < len(want):
                worst = max(worst, float(np.max(np.abs(logits[i] - want[t]))))
        prev = np.ascontiguousarray(targets[:, t])
    return worst


def proof_sources(spec: BundleSpec, sample: np.ndarray | None, seed: int) -> list[np.ndarray]:
    """Sources of several lengths: random ids (or numbers), or slices of the sample source when given."""
    s2s = spec.seq2seq
    assert s2s is not None
    rng = np.random.default_rng(seed)
    out = []
    for i in range(PROOF_SOURCES):
        n = min(PROOF_LENGTHS[i % len(PROOF_LENGTHS)], s2s.max_source_len)
        if sample is not None and len(sample) >= n:
            start = int(rng.integers(0, len(sample) - n + 1))
            out.append(np.ascontiguousarray(sample[start:start + n]).astype(spec.input.dtype))
        elif spec.input.kind == "tokens":
            out.append(rng.integers(0, spec.input.vocab_size, size=n, dtype=np.int64))
        else:
            out.append(rng.standard_normal((n, spec.input.n_features)).astype(np.float32))
    return out


def self_check(model: nn.Module, spec: BundleSpec, sources: list[np.ndarray], tolerance: float) -> SelfCheck:
    """Two sources of one length and PyTorch's logits along its greedy tokens (``SELF_CHECK_STEPS`` of them)."""
    s2s = spec.seq2seq
    assert s2s is not None
    n = max(len(s) for s in sources)
    pair = [s for s in sources if len(s) == n][:2]
    x = np.stack(pair)
    memory, state = _encode(model, torch.from_numpy(x))
    mask = torch.ones(memory.shape[:2], dtype=torch.bool)
    prev = torch.full((len(x),), s2s.bos_id, dtype=torch.int64)
    ys = []
    for _ in range(SELF_CHECK_STEPS):
        logits, state = _step(model, prev, memory, mask, state)
        ys.append(logits.numpy())
        prev = logits.argmax(-1)
    y = np.stack(ys, axis=1).astype(np.float32)
    return SelfCheck(x=encode_array(x), x_shape=tuple(x.shape), y=encode_array(y), y_shape=tuple(y.shape),
                     tolerance=tolerance)


def seq2seq_spec(model: nn.Module, output_size: int, example: Callable[[int, int], torch.Tensor],
                 max_output_len: int, max_source_len: int, separator: str) -> Seq2SeqSpec:
    """The encoder–decoder part of the bundle spec, from the model's protocol and two probe calls."""
    bos, eos = check_protocol(model)
    memory, state = _encode(model, example(2, 3))
    token = torch.full((2,), bos, dtype=torch.int64)
    logits, _ = _step(model, token, memory, torch.ones(memory.shape[:2], dtype=torch.bool), state)
    if logits.shape[-1] != output_size:
        raise ExportError(f"decode_step returns {logits.shape[-1]} logits but the output vocabulary has "
                          f"{output_size} tokens; make them agree")
    try:
        return Seq2SeqSpec(states=state_specs(model, example), memory_size=int(memory.shape[-1]), bos_id=bos,
                           eos_id=eos, max_output_len=max_output_len, max_source_len=max_source_len,
                           separator=separator)
    except Exception as e:  # a BundleError: one line saying which field
        raise ExportError(str(e)) from None
