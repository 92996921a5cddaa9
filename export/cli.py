"""`rnnd export` and `rnnd train`. Argument definitions import nothing heavy; torch loads on run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import UsageError

PROTOCOL_HELP = """\
protocol (stateful mode): the factory returns an nn.Module with
    forward(x, *state) -> (y, *new_state)
x is [B, T, F] float32 (numeric) or [B, T] int64 (token ids), batch first; y is [B, T, O].
The state is derived from the model's nn.RNN/nn.LSTM/nn.GRU layers in module order (h, and
c for an LSTM; shape [layers*directions, B, H]) unless the module defines state_spec()
returning rnnd.export.StateDecl objects. An optional initial_state() gives a learned initial
state; an optional init(context) -> state lets a stream start from a context vector (give
its size with --context-size). Also accepted, and mapped onto the protocol: forward(x,
state=None) -> (y, state) with the state as one (nested) argument such as (h, c), and
time-first models (batch_first=False layers: x [T, B, F]). Window mode: forward(x) -> y
with x the last W steps. See README, "Export".

seq2seq (--mode seq2seq): an encoder-decoder with attention, with int attributes bos_id and
eos_id (output vocabulary ids) and
    encode(source) -> (memory, *state)          source [B, S] ids or [B, S, F]; memory [B, S, H]
    decode_step(token, memory, memory_mask, *state) -> (logits, *state)
token [B] int64 (the previous output token), memory_mask [B, S] bool (False at padding, which
attention must leave out), logits [B, V] over the output vocabulary (--target-vocab, default
the input vocabulary). The daemon answers each message's source with a generated sequence.

Options imply what they describe: --features/--mean/--std/--valid-min/--valid-max a numeric
input, --vocab/--tokenizer/--unk/--case-sensitive a token input, --output-names/--output-mean/
--output-std/--next-of a regression output, --labels a classification output, --window window
mode. Contradicting options are refused.

exit codes: 0 written; 1 bad input (the message says what to fix); 2 bad arguments;
3 parity check failed (nothing written)."""

# Which options describe which kind of input/output: giving one implies the kind.
NUMERIC_OPTS = {"features": "--features", "mean": "--mean", "std": "--std", "valid_min": "--valid-min",
                "valid_max": "--valid-max"}
TOKEN_OPTS = {"tokenizer": "--tokenizer", "vocab": "--vocab", "unk": "--unk", "case_sensitive": "--case-sensitive"}
REGRESSION_OPTS = {"output_names": "--output-names", "output_mean": "--output-mean", "output_std": "--output-std",
                   "next_of": "--next-of"}
CLASSIFICATION_OPTS = {"labels": "--labels"}
# Keys a --spec file may hold (as in the bundle metadata).
SPEC_KEYS = ("name", "version", "description", "mode", "window", "warmup_steps", "input", "output", "max_output_len",
             "max_source_len")


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
                   help="state_dict saved with torch.save (or a dict holding one, e.g. under 'state_dict')")
    p.add_argument("--checkpoint-key", metavar="KEY",
                   help="the checkpoint is a dict holding the state_dict under KEY (e.g. state_dict, "
                   "model_state_dict, ema); found by itself when only one entry holds tensors")
    p.add_argument("--strip-prefix", metavar="PREFIX",
                   help="drop PREFIX from the checkpoint's keys (e.g. 'model.' for a Lightning module's "
                   "state_dict); found by itself when exactly one prefix makes the keys match the model")
    p.add_argument("--out", required=True, type=Path, help="bundle to write (.onnx)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the factory (VALUE parsed as JSON, else a string)")
    p.add_argument("--spec", type=Path, help="JSON file with any of the options below (keys as in "
                   "the bundle metadata: " + ", ".join(SPEC_KEYS) + ")")
    g = p.add_argument_group("model")
    g.add_argument("--name")
    g.add_argument("--version")
    g.add_argument("--description")
    g.add_argument("--mode", choices=["stateful", "window", "seq2seq"],
                   help="stateful (default), window, or seq2seq: an encoder-decoder with attention (encode and "
                   "decode_step, see 'seq2seq' above)")
    g.add_argument("--max-output-len", type=int, metavar="N", help="seq2seq: longest answer, in tokens (default 64)")
    g.add_argument("--max-source-len", type=int, metavar="N",
                   help="seq2seq: longest source, in steps (default 256; longer messages are dead letters)")
    g.add_argument("--window", type=int, help="window mode (implied): steps the model sees")
    g.add_argument("--random-init", metavar="DIST",
                   help="stateful: start every stream from a random state drawn per stream key: normal:STD, "
                        "normal:MEAN,STD or uniform:LOW,HIGH (same key and seed, same start: restarts, replicas "
                        "and verify reproduce it)")
    g.add_argument("--random-init-seed", type=int, metavar="N", help="with --random-init: the seed (default 0)")
    g.add_argument("--context-size", type=int, metavar="C",
                   help="a model with init(context) -> state: how many values one context has (a stream then "
                        "starts from {\"context\": [C numbers]})")
    g.add_argument("--warmup", type=int, dest="warmup_steps",
                   help="predictions of a stream's first N steps are marked as warm-up")
    g = p.add_argument_group("input (each option implies its kind)")
    g.add_argument("--input-kind", choices=["numeric", "tokens"])
    g.add_argument("--features", help="numeric: comma-separated feature names")
    g.add_argument("--mean", help="numeric: comma-separated per-feature means used in training")
    g.add_argument("--std", help="numeric: comma-separated per-feature standard deviations")
    g.add_argument("--valid-min", help="numeric: comma-separated lower bounds (raw units; empty = none)")
    g.add_argument("--valid-max", help="numeric: comma-separated upper bounds")
    g.add_argument("--tokenizer", choices=["word", "char"], help="tokens: tokenisation level")
    g.add_argument("--vocab", type=Path, help="tokens: vocabulary file, one token per line, in id order")
    g.add_argument("--unk", help="tokens: the unknown token (default <unk>)")
    g.add_argument("--case-sensitive", action="store_true", default=None, help="tokens: do not lower-case text")
    g = p.add_argument_group("output (each option implies its kind)")
    g.add_argument("--output-kind", choices=["regression", "classification", "language_model"])
    g.add_argument("--target-vocab", type=Path, metavar="FILE",
                   help="language model / seq2seq: the output vocabulary, one token per line in id order "
                   "(default: the input vocabulary)")
    g.add_argument("--output-names", help="regression: comma-separated output names")
    g.add_argument("--output-mean", help="regression: de-normalisation means")
    g.add_argument("--output-std", help="regression: de-normalisation standard deviations")
    g.add_argument("--labels", help="classification: comma-separated label names, in logit order")
    g.add_argument("--next-of", help="regression: the input feature each output predicts at the next step "
                   "(enables multi-step forecasts in the daemon)")
    g = p.add_argument_group("parity")
    g.add_argument("--precision", choices=["fp32", "int8", "fp16"], default="fp32",
                   help="the graph's arithmetic: fp32; int8 (weights quantized by ONNX Runtime's dynamic "
                   "quantization: faster on the CPU); fp16 (for GPUs). Inputs, outputs and state stay float32")
    g.add_argument("--tolerance", type=float, default=None,
                   help="max abs error allowed (default by precision: fp32 1e-4, fp16 1e-2, int8 0.1)")
    g.add_argument("--parity-batches", default=None, help="batch sizes to check (default 1,7,512)")
    p.add_argument("--quiet", action="store_true", help="print only the result line")
    p.add_argument("--debug", action="store_true", help="show tracebacks and PyTorch's warnings")
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


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def _bounds(text: str | None, flag: str) -> tuple[float | None, ...] | None:
    if text is None:
        return None
    try:
        return tuple(None if v.strip() == "" else float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers (empty for no bound), got {text!r}") from None


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(v.strip() for v in text.split(","))


def _parse_kwargs(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--arg takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _given(args: argparse.Namespace, opts: dict[str, str]) -> list[str]:
    return [flag for dest, flag in opts.items() if getattr(args, dest) is not None]


def _present(doc: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [k for k in keys if doc.get(k) not in (None, (), [], "")]


def _implied(args: argparse.Namespace, explicit: str | None, explicit_flag: str,
             kinds: dict[str, list[str]]) -> str | None:
    """The kind the options describe; refuse options of two kinds, or against the explicit flag."""
    described = {kind: flags for kind, flags in kinds.items() if flags}
    if len(described) > 1:
        (k1, f1), (k2, f2) = list(described.items())[:2]
        raise UsageError(f"{f1[0]} ({k1}) and {f2[0]} ({k2}) describe different kinds; give the options of one")
    if not described:
        return explicit
    kind, flags = next(iter(described.items()))
    if explicit is not None and explicit != kind:
        raise UsageError(f"{explicit_flag} {explicit} contradicts {flags[0]}, which describes a {kind} "
                         f"{'input' if 'input' in explicit_flag else 'output'}")
    return kind


def resolve_settings(args: argparse.Namespace, embedded: dict[str, Any]) -> dict[str, Any]:
    """Bundle settings: checkpoint's embedded section < --spec file < command-line flags.

    Every option given is used or refused: options imply the kind they describe, and what a
    lower source says about another kind is refused rather than silently left out.
    """
    from .errors import ExportError

    settings: dict[str, Any] = {k: v for k, v in embedded.items() if k in SPEC_KEYS}
    if args.spec:
        try:
            doc = json.loads(args.spec.read_text())
        except FileNotFoundError:
            raise ExportError(f"--spec {args.spec}: no such file") from None
        except json.JSONDecodeError as e:
            raise ExportError(f"--spec {args.spec} is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ExportError(f"--spec {args.spec} must hold a JSON object")
        unknown = sorted(set(doc) - set(SPEC_KEYS))
        if unknown:
            raise ExportError(f"--spec {args.spec} has unknown key(s) {', '.join(unknown)}; "
                              f"known: {', '.join(SPEC_KEYS)}")
        settings.update(doc)

    if args.window is not None and args.mode == "stateful":
        raise UsageError("--window applies to window mode; drop --mode stateful (--window implies --mode window)")
    for key in ("name", "version", "description", "mode", "window", "warmup_steps", "max_output_len",
                "max_source_len"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.window is not None:
        settings["mode"] = "window"
    if settings.get("mode") == "stateful" and settings.get("window") is not None:
        raise UsageError(f"window {settings['window']} (from --spec or the checkpoint) applies to window mode "
                         "only; pass --mode window, or remove it")

    for key in ("max_output_len", "max_source_len"):
        if settings.get(key) is not None and settings.get("mode") != "seq2seq":
            raise UsageError(f"--{key.replace('_', '-')} is for seq2seq models: pass --mode seq2seq, or remove it")
        if settings.get(key) is not None and not (isinstance(settings[key], int) and settings[key] >= 1):
            raise UsageError(f"--{key.replace('_', '-')} must be a positive integer, not {settings[key]!r}")
    settings["input"] = _resolve_input(args, dict(settings.get("input") or {}))
    settings["output"] = _resolve_output(args, dict(settings.get("output") or {}))
    return settings


def _resolve_input(args: argparse.Namespace, inp: dict[str, Any]) -> dict[str, Any]:
    from .errors import ExportError

    kind = _implied(args, args.input_kind, "--input-kind",
                    {"numeric": _given(args, NUMERIC_OPTS), "tokens": _given(args, TOKEN_OPTS)})
    if kind is not None:
        if inp.get("kind") and inp["kind"] != kind:
            # Flags take precedence, but not by dropping what the lower source says about the other kind.
            leftover = _present(inp, ("features", "mean", "std", "valid_min", "valid_max")) if kind == "tokens" \
                else _present(inp, ("tokenizer",))
            if leftover:
                raise UsageError(f"the command line describes a {kind} input but --spec/the checkpoint describes "
                                 f"a {inp['kind']} one ({', '.join(leftover)}); remove one of them")
        inp["kind"] = kind
    parsed = {"features": _names(args.features), "mean": _floats(args.mean, "--mean"),
              "std": _floats(args.std, "--std"), "valid_min": _bounds(args.valid_min, "--valid-min"),
              "valid_max": _bounds(args.valid_max, "--valid-max")}
    for key, value in parsed.items():
        if value is not None:
            inp[key] = value
    if _given(args, TOKEN_OPTS):
        tok = dict(inp.get("tokenizer") or {})
        if args.vocab:
            try:
                vocab = [line.rstrip("\n") for line in args.vocab.read_text().splitlines()]
            except FileNotFoundError:
                raise ExportError(f"--vocab {args.vocab}: no such file") from None
            tok["vocab"] = vocab
            tok.pop("unk_id", None)
        if not tok.get("vocab"):
            raise UsageError("token input needs its vocabulary: --vocab FILE (one token per line, in id order)")
        if args.unk is not None or "unk_id" not in tok:
            unk = args.unk if args.unk is not None else "<unk>"
            if unk not in tok["vocab"]:
                raise ExportError(f"the vocabulary{f' {args.vocab}' if args.vocab else ''} has no unknown token "
                                  f"{unk!r}; add it or pass --unk")
            tok["unk_id"] = list(tok["vocab"]).index(unk)
        if args.tokenizer:
            tok["level"] = args.tokenizer
        if not tok.get("level"):
            raise UsageError("token input needs its tokenisation level: --tokenizer word|char")
        if args.case_sensitive:
            tok["lowercase"] = False
        inp["tokenizer"] = tok
    if inp.get("kind") == "numeric" and _present(inp, ("tokenizer",)):
        raise UsageError("a numeric input has no tokenizer; remove it from --spec or pass the token options")
    if inp.get("kind") == "tokens" and _present(inp, ("features", "mean", "std", "valid_min", "valid_max")):
        raise UsageError("a token input has no features/normalisation/ranges; remove them")
    return inp


def _resolve_output(args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    kind = _implied(args, args.output_kind, "--output-kind",
                    {"regression": _given(args, REGRESSION_OPTS),
                     "classification": _given(args, CLASSIFICATION_OPTS)})
    if kind is not None:
        if out.get("kind") and out["kind"] != kind:
            leftover = _present(out, {"regression": ("labels", "vocab"), "classification": (
                "names", "mean", "std", "next_of", "vocab"), "language_model": ("names", "mean", "std", "next_of",
                                                                               "labels")}[kind])
            if leftover:
                raise UsageError(f"the command line describes a {kind} output but --spec/the checkpoint "
                                 f"describes a {out['kind']} one ({', '.join(leftover)}); remove one of them")
        out["kind"] = kind
    for flag, key, conv in (("output_names", "names", _names),
                            ("output_mean", "mean", lambda v: _floats(v, "--output-mean")),
                            ("output_std", "std", lambda v: _floats(v, "--output-std")),
                            ("labels", "labels", _names), ("next_of", "next_of", _names)):
        value = getattr(args, flag)
        if value is not None:
            out[key] = conv(value)
    return out


def _default_input(model, inp_doc: dict[str, Any]) -> dict[str, Any]:
    """Fill what the model itself says about its input: the kind, and the feature count."""
    from torch import nn

    from .errors import ExportError

    doc = dict(inp_doc)
    if not doc.get("kind"):
        if any(isinstance(m, nn.Embedding) for m in model.modules()):
            raise ExportError("the model embeds token ids: give the vocabulary (--vocab FILE --tokenizer word|char)")
        doc["kind"] = "numeric"
    if doc["kind"] == "numeric" and not doc.get("features"):
        sized = [len(doc[k]) for k in ("mean", "std", "valid_min", "valid_max") if doc.get(k)]
        rnn = next((m for m in model.modules() if isinstance(m, nn.RNNBase)), None)
        n = rnn.input_size if rnn is not None else (sized[0] if sized else None)
        if n is None:
            raise ExportError("say what one input step is: --features NAMES (comma-separated)")
        doc["features"] = [f"x{i}" for i in range(n)]
    return doc


def run_export(args: argparse.Namespace) -> int:
    import warnings

    if args.debug:
        return _run_export(args)
    # PyTorch's warnings (tracer, exporter deprecation, layer construction) are for --debug;
    # what matters reaches the user as one line or the report.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _run_export(args)


def _run_export(args: argparse.Namespace) -> int:
    import numpy as np

    from rnnd.daemon.bundle import BundleError, InputSpec, OutputSpec, from_plain

    from . import loader
    from .errors import ExportError
    from .exporter import ExportOptions, export_bundle

    say = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    kwargs_cli = _parse_kwargs(args.arg)
    plan = _parity_plan(args)
    random_init = _random_init(args)
    if args.context_size is not None and args.context_size < 1:
        raise UsageError(f"--context-size must be a positive integer, not {args.context_size}")
    checkpoint = loader.load_checkpoint(args.checkpoint, key=args.checkpoint_key)
    embedded = checkpoint.meta
    settings = resolve_settings(args, embedded)
    factory = args.factory or embedded.get("factory")
    if not factory:
        raise ExportError("name the model factory (FILE.py:function): the checkpoint does not name one")
    kwargs = {**embedded.get("kwargs", {}), **kwargs_cli}
    model = loader.build_model(factory, kwargs)
    note = loader.load_weights(model, checkpoint, args.checkpoint, strip_prefix=args.strip_prefix)
    if note:
        say(note)
    inp_doc = _default_input(model, settings["input"])
    out_doc = settings["output"]
    if not out_doc.get("kind") and (args.target_vocab is not None or settings.get("mode") == "seq2seq"):
        out_doc["kind"] = "language_model"  # a seq2seq model's output is its decoder's next-token logits
    if not out_doc.get("kind"):
        raise ExportError("say what the model outputs: --output-names NAMES (regression), --labels A,B,... "
                          "(classification), or --output-kind language_model")
    if args.target_vocab is not None:
        if out_doc["kind"] != "language_model":
            raise ExportError(f"--target-vocab is the vocabulary of a language model's (or seq2seq model's) output; "
                              f"this output is {out_doc['kind']}")
        try:
            out_doc["vocab"] = [line.rstrip("\n") for line in args.target_vocab.read_text().splitlines()
                                if line.rstrip("\n")]
        except OSError as e:
            raise ExportError(f"--target-vocab {args.target_vocab}: {e.strerror or e}") from None
    if out_doc["kind"] == "language_model" and not out_doc.get("vocab"):
        out_doc["vocab"] = list((inp_doc.get("tokenizer") or {}).get("vocab") or [])
    try:
        inp = from_plain(InputSpec, inp_doc)
        out = from_plain(OutputSpec, out_doc)
    except (BundleError, TypeError) as e:
        raise ExportError(f"input/output spec: {e}") from None
    sample = embedded.get("sample")
    opts = ExportOptions(
        name=settings.get("name") or args.out.stem, version=str(settings.get("version") or "1"),
        description=settings.get("description") or "", mode=settings.get("mode") or "stateful",
        window=settings.get("window"), warmup_steps=int(settings.get("warmup_steps") or 0),
        input=inp, output=out, parity=plan,
        sample=None if sample is None else np.asarray(sample.numpy() if hasattr(sample, "numpy") else sample),
        source=f"{factory} {args.checkpoint.name}", random_init=random_init, context_size=args.context_size,
        max_output_len=int(settings.get("max_output_len") or 64),
        max_source_len=int(settings.get("max_source_len") or 256), precision=args.precision)
    result = export_bundle(model, opts, args.out, log=say)
    say(result.report)
    spec = result.spec
    print(f"wrote {result.path} ({spec.model.ref}, {spec.mode}, state {spec.state_bytes_per_stream} B/stream, "
          f"parity max|err| {spec.parity.max_abs_err:.1e} <= {spec.parity.tolerance:g})" if spec.parity else "")
    return 0


def _random_init(args: argparse.Namespace):
    """``--random-init normal:STD | normal:MEAN,STD | uniform:LOW,HIGH`` and its seed, or None."""
    from rnnd.daemon.bundle import BundleError, RandomInit

    if args.random_init is None:
        if args.random_init_seed is not None:
            raise UsageError("--random-init-seed is only used with --random-init (the distribution to draw from)")
        return None
    how = "--random-init takes normal:STD, normal:MEAN,STD or uniform:LOW,HIGH"
    dist, _, params = args.random_init.partition(":")
    try:
        values = [float(v) for v in params.split(",")]
    except ValueError:
        raise UsageError(f"{how}, not {args.random_init!r}") from None
    if dist == "normal" and len(values) == 1:
        values = [0.0, values[0]]
    if dist not in ("normal", "uniform") or len(values) != 2:
        raise UsageError(f"{how}, not {args.random_init!r}")
    try:
        return RandomInit(dist, (values[0], values[1]), args.random_init_seed or 0)
    except BundleError as e:
        raise UsageError(f"--random-init: {e}") from None


def _parity_plan(args: argparse.Namespace):
    from rnnd.daemon.bundle import PRECISIONS

    from .parity import ParityPlan

    plan = ParityPlan(tolerance=PRECISIONS[getattr(args, "precision", "fp32")])
    if args.tolerance is not None:
        if not args.tolerance > 0:
            raise UsageError(f"--tolerance must be a positive number, not {args.tolerance:g}")
        plan = ParityPlan(tolerance=args.tolerance)
    if args.parity_batches:
        try:
            batches = tuple(int(b) for b in args.parity_batches.split(","))
        except ValueError:
            batches = ()
        if not batches or min(batches) < 1:
            raise UsageError(f"--parity-batches takes comma-separated positive integers, got {args.parity_batches!r}")
        plan = ParityPlan(tolerance=plan.tolerance, batches=batches)
    return plan


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
