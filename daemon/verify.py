"""`rnnd verify`: recompute every stream offline and compare with what the daemon produced.

Operators run it after incidents; the durability tests use it as their oracle. It reads the
input and output topics to their ends, splits each stream into segments at its `reset`
and `end` controls, runs the bundle over each segment in ONE call from the initial state —
an independent reference: no batching, no chunking, no state carried between processes —
and checks every expected prediction id against the output topic (a seq2seq bundle's
reference is each message's answer decoded alone, with the daemon's search settings: the
same tokens, and the log-probability within the tolerance per token):

* missing    an expected id that is not in the output topic (exit 1)
* wrong      an output whose prediction differs from the reference by more than the tolerance (exit 1)
* duplicated an id seen more than once — allowed under at_least_once, reported with whether
             the copies are identical; a failure (exit 1) when the daemon's configuration says
             processing_guarantee = exactly_once. The output topic is read read_committed, as a
             downstream consumer of exactly-once outputs reads it
* unexpected an id the reference does not produce (exit 1)
* nonfinite  a prediction the reference also finds NaN or infinite, written by the daemon as
             nulls with "nonfinite": true — consistent, so not wrong; counted on its own (a
             non-finite reference the daemon wrote as numbers, or the reverse, is wrong)

It assumes what the reference cannot know did not happen: no TTL/LRU evictions (a stream
evicted mid-way restarts from its initial state in the daemon) and the same emit/warm-up
settings as the daemon (pass the daemon's configuration: flags, RNND_* or --config).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from . import config
from .codec import Decoder, Record
from .emit import Emitter
from .heads import softmax
from .pipeline import SourceDecoder
from .runtime import BundleModel
from .seq2seq import Answer, answer_one


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify", help="recompute every stream offline and report missing, duplicated and wrong predictions",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(p)
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference in model space (default 1e-4)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(run=run)


@dataclass
class Report:
    inputs: int = 0
    expected: int = 0
    received: int = 0
    missing: list[str] = field(default_factory=list)
    wrong: list[tuple[str, float]] = field(default_factory=list)
    duplicated: int = 0
    duplicated_identical: int = 0
    unexpected: list[str] = field(default_factory=list)
    nonfinite: int = 0
    max_error: float = 0.0
    exactly_once: bool = False  # the daemon's processing_guarantee: then a duplicate fails the check

    @property
    def ok(self) -> bool:
        return not (self.missing or self.wrong or self.unexpected or (self.exactly_once and self.duplicated))

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "inputs": self.inputs, "expected": self.expected, "received": self.received,
                "missing": len(self.missing), "wrong": len(self.wrong), "duplicated": self.duplicated,
                "duplicated_identical": self.duplicated_identical, "unexpected": len(self.unexpected),
                "nonfinite": self.nonfinite, "max_error": self.max_error,
                "examples": {"missing": self.missing[:5], "wrong": self.wrong[:5], "unexpected": self.unexpected[:5]}}

    def text(self) -> str:
        lines = [
            f"inputs {self.inputs}, expected predictions {self.expected}, received {self.received}",
            f"missing     {len(self.missing)}" + (f"  e.g. {', '.join(self.missing[:3])}" if self.missing else ""),
            f"wrong       {len(self.wrong)}" + (f"  e.g. {self.wrong[0][0]} off by {self.wrong[0][1]:.3g}"
                                                 if self.wrong else "") + f"  (max error {self.max_error:.2e})",
            f"duplicated  {self.duplicated} ({self.duplicated_identical} identical)"
            + ("  (exactly_once: none allowed)" if self.exactly_once else ""),
            f"unexpected  {len(self.unexpected)}" + (f"  e.g. {', '.join(self.unexpected[:3])}"
                                                     if self.unexpected else ""),
            f"nonfinite   {self.nonfinite}  (NaN/inf in the reference too: marked \"nonfinite\", not wrong)",
            "OK" if self.ok else "FAILED",
        ]
        return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = config.from_args(args)
    report = asyncio.run(verify(cfg, args.tolerance, progress=not args.json))
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.text())
    return 0 if report.ok else 1


async def verify(cfg: config.ServeConfig, tolerance: float = 1e-4, progress: bool = False) -> Report:
    from aiokafka import TopicPartition

    from .kafka import client_settings, partitions_of, read_to_end, reader

    model = BundleModel(cfg.model)
    inputs: dict[int, list] = defaultdict(list)
    outputs: dict[str, list[bytes]] = defaultdict(list)
    seen = [0]

    def note(n: int) -> None:
        seen[0] += n
        if progress and seen[0] % 20_000 < n:
            print(f"  read {seen[0]} records", file=sys.stderr)

    consumer = reader(client_settings(cfg), "rnnd-verify")
    await consumer.start()
    try:
        for topic, into in ((cfg.input_topic, "in"), (cfg.output_topic, "out")):
            parts = await partitions_of(consumer, topic)
            if not parts:
                raise SystemExit(f"rnnd verify: error: topic {topic!r} does not exist")
            tps = [TopicPartition(topic, p) for p in parts]

            def take(tp, recs: list, into: str = into) -> None:
                note(len(recs))
                if into == "in":
                    inputs[tp.partition].extend((r.key, r.value, r.offset, r.timestamp) for r in recs)
                else:
                    for r in recs:
                        outputs[orjson.loads(r.value)["id"]].append(r.value)

            if tps:
                await read_to_end(consumer, tps, take)
    finally:
        await consumer.stop()
    return compare(model, cfg, inputs, outputs, tolerance)


def expected_predictions(model: BundleModel, cfg: config.ServeConfig,
                         inputs: dict[int, list]) -> tuple[dict[str, Any], int]:
    """id → reference model output row (model space), from each stream's segments in one call each."""
    spec = model.spec
    if spec.mode == "seq2seq":
        return expected_answers(model, cfg, inputs)
    decoder = Decoder(spec, cfg, cfg.input_topic)
    segments: dict[tuple[int, bytes], list[list[tuple[Record, int]]]] = defaultdict(lambda: [[]])
    ended: set[int] = set()  # id() of each segment an end control closed
    count = 0
    contexts: dict[int, list[float]] = {}  # id(segment) → the context it started from
    for partition, recs in inputs.items():
        for key, value, offset, ts in sorted(recs, key=lambda r: r[2]):
            count += 1
            item = decoder.decode(key, value, partition, offset, ts)
            if not isinstance(item, Record):
                continue
            segs = segments[(partition, item.key)]
            if item.reset and segs[-1]:
                segs.append([])
            if item.context is not None:
                contexts[id(segs[-1])] = item.context
            segs[-1].extend((item, i) for i in range(len(item.steps)))
            if item.end:
                ended.add(id(segs[-1]))
                segs.append([])
    numeric = spec.input.kind == "numeric"
    expected: dict[str, np.ndarray] = {}
    # The daemon's own rules decide which of the reference's predictions it must have emitted.
    emitter: Emitter[int] = Emitter.from_config(cfg, spec.warmup_steps)
    for (_, stream_key), segs in segments.items():
        for seg in segs:
            if not seg:
                continue
            rows = [r.steps[i] for r, i in seg]
            if numeric:
                x = spec.input.normalise(np.asarray(rows, dtype=np.float32))[None]
            else:
                x = np.asarray(rows, dtype=np.int64)[None]
            if spec.mode == "stateful":  # from the stream's own start: init(context), or its key's initial state
                context = contexts.get(id(seg))
                start = (model.start_state(np.asarray([context], dtype=np.float32)) if context is not None
                         else model.initial_state(1, [stream_key]))
                y = model.run_sequence(x, chunk=x.shape[1], states=start)[0][0]
            else:
                y = model.run_windows(x)[0]
            # One stream, all its steps: a model call's layout. What the emitter keeps is the position.
            positions = list(range(len(seg)))
            wanted = emitter.wanted(positions, [0], len(seg))
            chosen = positions if wanted is None else wanted
            if emitter.at_end:
                emitter.keep(chosen, chosen, [0], len(seg))
                chosen = []
            if id(seg) in ended:
                last = emitter.ended(0)
                if last is not None:
                    chosen.append(last)
            else:
                emitter.forget(0)  # still open, or cut by a reset: its last prediction never goes out
            for step in chosen:
                r, i = seg[step]
                expected[f"{cfg.input_topic}/{r.partition}/{r.offset}/{i}"] = y[step]
    return expected, count


def expected_answers(model: BundleModel, cfg: config.ServeConfig,
                     inputs: dict[int, list]) -> tuple[dict[str, Any], int]:
    """Seq2seq: id → the answer to each message's source, decoded alone (the daemon decodes it in a
    padded batch beside other messages), with the daemon's search settings."""
    spec = model.spec
    assert spec.seq2seq is not None
    decoder = SourceDecoder(Decoder(spec, cfg, cfg.input_topic), spec.seq2seq.max_source_len)
    numeric = spec.input.kind == "numeric"
    expected: dict[str, Any] = {}
    count = 0
    for partition, recs in inputs.items():
        for key, value, offset, ts in recs:
            count += 1
            item = decoder.decode(key, value, partition, offset, ts)
            if not isinstance(item, Record) or not item.steps:
                continue  # a dead letter, or a control alone
            source = (spec.input.normalise(np.asarray(item.steps[0], dtype=np.float32)) if numeric
                      else np.asarray(item.steps[0], dtype=np.int64))
            expected[f"{cfg.input_topic}/{partition}/{offset}/0"] = answer_one(
                model, source, cfg.beam_size, cfg.max_output_len or None, cfg.length_penalty)
    return expected, count


def _answer_error(doc: dict[str, Any], ref: Answer) -> float:
    """0 for the same tokens with a log-probability within float32 rounding of the reference's
    (the difference, per token), inf for other tokens or a non-finite answer on one side only."""
    pred = doc.get("prediction") or {}
    if ref.nonfinite or doc.get("nonfinite") is True:
        return 0.0 if ref.nonfinite and doc.get("nonfinite") is True else float("inf")
    if pred.get("output_ids") != ref.ids or pred.get("stop") != ref.stop:
        return float("inf")
    return abs(float(pred["logp"]) - ref.logp) / max(1, len(ref.ids))


def _model_space(model: BundleModel, pred: dict[str, Any], ref: np.ndarray) -> np.ndarray:
    """The output's prediction as numbers comparable with the reference row ``ref``."""
    out = model.spec.output
    if out.kind == "regression":
        vals = np.array([pred["values"][n] if pred["values"][n] is not None else np.nan for n in out.names])
        return out.normalise(vals)
    p = softmax(ref.astype(np.float64)[None])[0]
    if out.kind == "classification":
        idx = {lab: i for i, lab in enumerate(out.labels)}
        got = p.copy()
        for lab, q in pred["probs"].items():
            got[idx[lab]] = q
        return got
    idx = {tok: i for i, tok in enumerate(out.vocab)}
    got = p.copy()
    for item in pred["next"]:
        got[idx[item["token"]]] = item["p"]
    return got


def compare(model: BundleModel, cfg: config.ServeConfig, inputs: dict[int, list], outputs: dict[str, list[bytes]],
            tolerance: float) -> Report:
    expected, count = expected_predictions(model, cfg, inputs)
    report = Report(inputs=count, expected=len(expected), received=sum(len(v) for v in outputs.values()),
                    exactly_once=cfg.exactly_once)
    kind = model.spec.output.kind
    for pid, ref in expected.items():
        copies = outputs.get(pid)
        if not copies:
            report.missing.append(pid)
            continue
        if len(copies) > 1:
            report.duplicated += len(copies) - 1
            report.duplicated_identical += sum(1 for c in copies[1:] if _same(c, copies[0]))
        if isinstance(ref, Answer):  # seq2seq: the same answer, token for token
            errs = [_answer_error(orjson.loads(c), ref) for c in copies]
            report.nonfinite += int(ref.nonfinite)
            report.max_error = max(report.max_error, *errs)
            if not max(errs) <= tolerance:
                report.wrong.append((pid, max(errs)))
            continue
        if not np.all(np.isfinite(ref)):  # the model overflows on this input, here as in the daemon
            if all(orjson.loads(c).get("nonfinite") is True for c in copies):
                report.nonfinite += 1
            else:
                report.max_error = float("inf")
                report.wrong.append((pid, float("inf")))
            continue
        ref_cmp = ref if kind == "regression" else softmax(ref.astype(np.float64)[None])[0]
        for c in copies:
            doc = orjson.loads(c)
            # Non-finite where the reference is finite: wrong, unless only a regression forecast
            # overflowed (then the step's own values are there to compare).
            if doc.get("nonfinite") is True and kind != "regression":
                got = np.full_like(ref_cmp, np.nan)
            else:
                got = _model_space(model, doc["prediction"], ref)
            err = float(np.max(np.abs(got - ref_cmp))) if np.all(np.isfinite(got)) else float("inf")
            report.max_error = max(report.max_error, err)
            if not err <= tolerance:
                report.wrong.append((pid, err))
                break
    report.unexpected = [pid for pid in outputs if pid not in expected]
    return report


def _same(a: bytes, b: bytes) -> bool:
    """Identical predictions (the timestamps of two deliveries differ, the prediction must not)."""
    da, db = orjson.loads(a), orjson.loads(b)
    return da["prediction"] == db["prediction"] and da["step"] == db["step"]
