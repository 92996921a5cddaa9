"""`rnnd export` and `rnnd train`. Argument definitions import nothing heavy; torch loads on run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PROTOCOL_HELP = """\
protocol (stateful mode): the factory returns an nn.Module with
    forward(x, *state) -> (y, *new_state)
x is [B, T, F] float32 (numeric) or [B, T] int64 (token ids), batch first; y is [B, T, O].
The state is derived from the model's nn.RNN/nn.LSTM/nn.GRU layers in module order (h, and
c for an LSTM; shape [layers*directions, B, H]) unless the module defines state_spec()
returning rnnd.export.StateDecl objects. An optional initial_state() gives a learned initial
state. Window mode: forward(x) -> y with x the last W steps. See README, "Export".

exit codes: 0 written; 1 bad input (the message says what to fix); 2 bad arguments;
3 parity check failed (nothing written)."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a trained PyTorch model to a streaming ONNX bundle",
        description="Export a trained PyTorch model to a self-describing streaming ONNX bundle, "
        "after proving parity with PyTorch in ONNX Runtime.",
        epilog=PROTOCOL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("factory", nargs="?",
                   help="FILE.py:function or package.module:function returning the nn.Module "
                   "(optional when the checkpoint names one, as `rnnd train` checkpoints do)")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="state_dict saved with torch.save (or a dict holding one under 'state_dict')")
    p.add_argument("--out", required=True, type=Path, help="bundle to write (.onnx)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the factory (VALUE parsed as JSON, else a string)")
    p.add_argument("--spec", type=Path, help="JSON file with any of the options below (keys as in "
                   "the bundle metadata: name, version, mode, window, warmup_steps, input, output)")
    g = p.add_argument_group("model")
    g.add_argument("--name")
    g.add_argument("--version")
    g.add_argument("--description")
    g.add_argument("--mode", choices=["stateful", "window"])
    g.add_argument("--window", type=int, help="window mode: steps the model sees")
    g.add_argument("--warmup", type=int, dest="warmup_steps",
                   help="predictions of a stream's first N steps are marked as warm-up")
    g = p.add_argument_group("input")
    g.add_argument("--input-kind", choices=["numeric", "tokens"])
    g.add_argument("--features", help="comma-separated feature names (numeric)")
    g.add_argument("--mean", help="comma-separated per-feature means used in training")
    g.add_argument("--std", help="comma-separated per-feature standard deviations")
    g.add_argument("--valid-min", help="comma-separated lower bounds (raw units; empty = none)")
    g.add_argument("--valid-max", help="comma-separated upper bounds")
    g.add_argument("--tokenizer", choices=["word", "char"], help="tokens: tokenisation level")
    g.add_argument("--vocab", type=Path, help="tokens: vocabulary file, one token per line, in id order")
    g.add_argument("--unk", default="<unk>", help="tokens: the unknown token (default <unk>)")
    g.add_argument("--case-sensitive", action="store_true", help="tokens: do not lower-case text")
    g = p.add_argument_group("output")
    g.add_argument("--output-kind", choices=["regression", "classification", "language_model"])
    g.add_argument("--output-names", help="regression: comma-separated output names")
    g.add_argument("--output-mean", help="regression: de-normalisation means")
    g.add_argument("--output-std", help="regression: de-normalisation standard deviations")
    g.add_argument("--labels", help="classification: comma-separated label names, in logit order")
    g.add_argument("--next-of", help="regression: the input feature each output predicts at the next step "
                   "(enables multi-step forecasts in the daemon)")
    g = p.add_argument_group("parity")
    g.add_argument("--tolerance", type=float, default=None, help="max abs error allowed (default 1e-4)")
    g.add_argument("--parity-batches", default=None, help="batch sizes to check (default 1,7,512)")
    p.add_argument("--quiet", action="store_true", help="print only the result line")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(run=run_export)

    t = sub.add_parser(
        "train", help="train a reference model (recipe) and export its bundle",
        description="Train one of rnnd's reference recipes on data generated in code, check its "
        "held-out metric against the recipe's level, and export the bundle.")
    t.add_argument("recipe", nargs="?", help="recipe name (see --list)")
    t.add_argument("--list", action="store_true", help="list the recipes and exit")
    t.add_argument("--out", type=Path, default=Path("models"),
                   help="folder for RECIPE.pt and RECIPE.onnx (default ./models)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--debug", action="store_true", help="show tracebacks")
    t.set_defaults(run=run_train)


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"rnnd export: error: expected comma-separated numbers, got {text!r}") from None


def _bounds(text: str | None) -> tuple[float | None, ...] | None:
    if text is None:
        return None
    return tuple(None if v.strip() == "" else float(v) for v in text.split(","))


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(v.strip() for v in text.split(","))


def _parse_kwargs(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"rnnd export: error: --arg takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def resolve_settings(args: argparse.Namespace, embedded: dict[str, Any]) -> dict[str, Any]:
    """Bundle settings: checkpoint's embedded section < --spec file < command-line flags."""
    from .errors import ExportError

    settings: dict[str, Any] = {k: v for k, v in embedded.items() if k not in ("factory", "kwargs", "sample")}
    if args.spec:
        try:
            settings.update(json.loads(args.spec.read_text()))
        except FileNotFoundError:
            raise ExportError(f"--spec {args.spec}: no such file") from None
        except json.JSONDecodeError as e:
            raise ExportError(f"--spec {args.spec} is not valid JSON: {e}") from None
    for key in ("name", "version", "description", "mode", "window", "warmup_steps"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    inp = dict(settings.get("input") or {})
    flag_map = {"input_kind": "kind", "features": "features", "mean": "mean", "std": "std",
                "valid_min": "valid_min", "valid_max": "valid_max"}
    parsed = {"input_kind": args.input_kind, "features": _names(args.features), "mean": _floats(args.mean),
              "std": _floats(args.std), "valid_min": _bounds(args.valid_min), "valid_max": _bounds(args.valid_max)}
    for flag, key in flag_map.items():
        if parsed[flag] is not None:
            inp[key] = parsed[flag]
    if args.vocab or args.tokenizer:
        tok = dict(inp.get("tokenizer") or {})
        if args.vocab:
            try:
                vocab = [line.rstrip("\n") for line in args.vocab.read_text().splitlines()]
            except FileNotFoundError:
                raise ExportError(f"--vocab {args.vocab}: no such file") from None
            if args.unk not in vocab:
                raise ExportError(f"--vocab {args.vocab} has no unknown token {args.unk!r}; add it or pass --unk")
            tok.update(vocab=vocab, unk_id=vocab.index(args.unk))
        if args.tokenizer:
            tok["level"] = args.tokenizer
        tok["lowercase"] = not args.case_sensitive
        inp["tokenizer"] = tok
        inp.setdefault("kind", "tokens")
    settings["input"] = inp
    out = dict(settings.get("output") or {})
    for flag, key, conv in (("output_kind", "kind", None), ("output_names", "names", _names),
                            ("output_mean", "mean", _floats), ("output_std", "std", _floats),
                            ("labels", "labels", _names), ("next_of", "next_of", _names)):
        value = getattr(args, flag)
        if value is not None:
            out[key] = conv(value) if conv else value
    settings["output"] = out
    return settings


def run_export(args: argparse.Namespace) -> int:
    import numpy as np

    from rnnd.daemon.bundle import BundleError, InputSpec, OutputSpec, from_plain

    from . import loader
    from .errors import ExportError
    from .exporter import ExportOptions, export_bundle
    from .parity import ParityPlan

    say = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    checkpoint = loader.load_checkpoint(args.checkpoint)
    embedded = checkpoint.meta
    factory = args.factory or embedded.get("factory")
    if not factory:
        raise ExportError("name the model factory (FILE.py:function): the checkpoint does not name one")
    kwargs = {**embedded.get("kwargs", {}), **_parse_kwargs(args.arg)}
    model = loader.build_model(factory, kwargs)
    loader.load_weights(model, checkpoint, args.checkpoint)
    settings = resolve_settings(args, embedded)
    inp_doc = settings["input"]
    if not inp_doc.get("kind"):
        inp_doc = _default_input(model)
    out_doc = settings["output"]
    if not out_doc.get("kind"):
        raise ExportError("say what the model outputs: --output-kind regression --output-names NAMES, "
                          "classification --labels A,B,..., or language_model")
    if out_doc["kind"] == "language_model" and not out_doc.get("vocab"):
        out_doc["vocab"] = list((inp_doc.get("tokenizer") or {}).get("vocab") or [])
    try:
        inp = from_plain(InputSpec, inp_doc)
        out = from_plain(OutputSpec, out_doc)
    except (BundleError, TypeError) as e:
        raise ExportError(f"input/output spec: {e}") from None
    plan = ParityPlan()
    if args.tolerance is not None:
        plan = ParityPlan(tolerance=args.tolerance)
    if args.parity_batches:
        plan = ParityPlan(tolerance=plan.tolerance,
                          batches=tuple(int(b) for b in args.parity_batches.split(",")))
    sample = embedded.get("sample")
    opts = ExportOptions(
        name=settings.get("name") or args.out.stem, version=str(settings.get("version") or "1"),
        description=settings.get("description") or "", mode=settings.get("mode") or "stateful",
        window=settings.get("window"), warmup_steps=int(settings.get("warmup_steps") or 0),
        input=inp, output=out, parity=plan,
        sample=None if sample is None else np.asarray(sample.numpy() if hasattr(sample, "numpy") else sample),
        source=f"{factory} {args.checkpoint.name}")
    result = export_bundle(model, opts, args.out, log=say)
    say(result.report)
    spec = result.spec
    print(f"wrote {result.path} ({spec.model.ref}, {spec.mode}, state {spec.state_bytes_per_stream} B/stream, "
          f"parity max|err| {spec.parity.max_abs_err:.1e} <= {spec.parity.tolerance:g})" if spec.parity else "")
    return 0


def _default_input(model) -> dict[str, Any]:
    from torch import nn

    from .errors import ExportError

    if any(isinstance(m, nn.Embedding) for m in model.modules()):
        raise ExportError("the model embeds token ids: give the vocabulary (--vocab FILE --tokenizer word|char)")
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            return {"kind": "numeric", "features": [f"x{i}" for i in range(m.input_size)]}
    raise ExportError("say what one input step is: --input-kind numeric --features NAMES")


def run_train(args: argparse.Namespace) -> int:
    from .recipes import RECIPES, run_recipe

    if args.list or not args.recipe:
        for name, r in RECIPES.items():
            print(f"{name:<10} {r.summary}  [target: {r.target_text}]")
        return 0 if args.list else 2
    if args.recipe not in RECIPES:
        from .errors import ExportError

        raise ExportError(f"no recipe {args.recipe!r}; choose one of {', '.join(RECIPES)}")
    result = run_recipe(args.recipe, args.out, seed=args.seed, progress=not args.quiet)
    print(result.summary())
    return 0 if result.passed else 4
