"""`rnnd inspect`: what is inside a bundle, and does it still compute what PyTorch computed."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .bundle import BundleError, BundleIntegrityError, BundleSpec


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="show a bundle's metadata and re-run its self-check (no torch)",
        description="Print what a bundle holds and re-run its self-check in ONNX Runtime alone. "
        "Exit 0 if the bundle is intact and the self-check passes, 2 if the file was modified after "
        "export (its content hash does not match), 1 otherwise.")
    p.add_argument("bundle", type=Path)
    p.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .runtime import BundleModel

    if not args.bundle.is_file():
        raise BundleError(f"{args.bundle}: no such file")
    # The same check serve and verify make; on a mismatch, still show what the file claims
    # (an operator wants to know which model it is), then refuse with the same message.
    problem: BundleIntegrityError | None = None
    try:
        model = BundleModel(args.bundle)
    except BundleIntegrityError as e:
        problem = e
        try:
            model = BundleModel(args.bundle, check_content=False)
        except BundleError:
            raise problem from None
    spec = model.spec
    intact = problem is None
    try:
        err = model.self_check()
    except BundleError:
        if problem is not None:
            raise problem from None
        raise
    ok_check = spec.self_check is not None and err <= spec.self_check.tolerance
    if args.json:
        doc = asdict(spec)
        doc["state_hash"] = spec.state_hash
        doc.pop("self_check", None)
        doc["inspect"] = {"content_hash_ok": intact, "self_check_max_abs_err": err, "self_check_ok": ok_check}
        print(json.dumps(doc, indent=2))
    else:
        print(describe(spec))
        print(f"content hash : {spec.content_hash[:16]}… "
              f"{'ok' if intact else 'MISMATCH: the file was modified after export'}")
        print(f"self-check   : max|err| {err:.2e} vs PyTorch (tolerance {spec.self_check.tolerance:g}) "
              f"{'ok' if ok_check else 'FAILED'}" if spec.self_check else "self-check   : none stored")
    if problem is not None:
        raise problem
    if not ok_check:
        print(f"rnnd inspect: error: {args.bundle} failed its self-check", file=sys.stderr)
        return 1
    return 0


def describe(spec: BundleSpec) -> str:
    inp, out = spec.input, spec.output
    lines = [f"bundle       : {spec.model.ref}  (format {spec.format_version})"]
    if spec.model.description:
        lines.append(f"description  : {spec.model.description}")
    lines.append(f"mode         : {spec.mode}" + (f", window {spec.window}" if spec.window else "")
                 + (f", precision {spec.precision}" if spec.precision != "fp32" else ""))
    if inp.kind == "numeric":
        feats = ", ".join(inp.features[:8]) + (" …" if len(inp.features) > 8 else "")
        norm = " normalised (mean/std)" if inp.mean else ""
        lines.append(f"input        : numeric, {inp.n_features} feature(s): {feats}{norm}")
    else:
        tok = inp.tokenizer
        assert tok is not None
        lines.append(f"input        : tokens, {tok.level}-level, vocabulary {len(tok.vocab)}, "
                     f"unk={tok.vocab[tok.unk_id]!r}, lowercase={tok.lowercase}")
    detail = {"regression": lambda: ", ".join(out.names),
              "classification": lambda: ", ".join(out.labels),
              "language_model": lambda: f"{len(out.vocab)} tokens"}[out.kind]()
    lines.append(f"output       : {out.kind}: {detail}")
    for s in spec.states:
        r = s.init_random
        init = f"random {r.distribution}({r.params[0]:g}, {r.params[1]:g}), seed {r.seed}" if r else s.init
        lines.append(f"state        : {s.name} per-stream {list(s.shape)} {s.dtype}, graph "
                     f"{list(s.graph_shape('B'))}, init {init}")
    if spec.states:
        lines.append(f"state bytes  : {spec.state_bytes_per_stream} per stream, hash {spec.state_hash}")
    s2s = spec.seq2seq
    if s2s is not None:
        vocab = spec.output.vocab
        lines.append(f"seq2seq      : encoder ({s2s.encoder_graph}) -> memory [S, {s2s.memory_size}]; decoder state "
                     f"{', '.join(f'{s.name}{list(s.shape)}' for s in s2s.states)}, per message")
        lines.append(f"answers      : from {vocab[s2s.bos_id]!r} until {vocab[s2s.eos_id]!r}, at most "
                     f"{s2s.max_output_len} tokens, joined by {s2s.separator!r}; sources of at most "
                     f"{s2s.max_source_len} steps")
    if spec.start is not None:
        lines.append(f"start        : init(context), a context of {spec.start.size} values (its own graph, "
                     f"{spec.start.graph})")
    lines.append(f"warm-up      : {spec.warmup_steps} step(s)")
    if spec.parity:
        lines.append(f"parity       : max|err| {spec.parity.max_abs_err:.2e} over {len(spec.parity.cases)} "
                     f"cases (tolerance {spec.parity.tolerance:g})")
    if spec.provenance:
        p = spec.provenance
        lines.append(f"exported     : {p.created_at} by rnnd {p.rnnd_version}, torch {p.torch_version}, "
                     f"opset {p.onnx_opset}, {p.graph_strategy} graph")
    return "\n".join(lines)
