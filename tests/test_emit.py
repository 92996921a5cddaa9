"""The emit rules (every, every:N, end, warm-up hold), and the daemon and its oracle agreeing on them.

The rules are checked against a table written down by hand. Then the daemon's pipeline runs
real traffic (resets, ends with and without steps, streams that end inside their warm-up)
through a real bundle under each setting, and ``rnnd verify``'s comparison, fed the
pipeline's outputs, must find nothing missing, unexpected or wrong: the oracle expects
exactly what the daemon emits.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import torch
from torch import nn

from rnnd.daemon import verify
from rnnd.daemon.bundle import InputSpec, OutputSpec
from rnnd.daemon.config import ServeConfig
from rnnd.daemon.emit import Emitter
from rnnd.daemon.pipeline import Pipeline
from rnnd.daemon.runtime import BundleModel
from rnnd.export import StateDecl, zoo
from rnnd.export.exporter import ExportOptions, export_bundle
from rnnd.export.parity import ParityPlan

WARMUP = 3

# (emit, warmup, steps in the stream, closed by an end control) → the steps emitted as they are
# made, and the step emitted when the stream ends (None: nothing).
RULES = [
    ("every", "mark", 7, True, [0, 1, 2, 3, 4, 5, 6], None),
    ("every", "hold", 7, True, [3, 4, 5, 6], None),
    ("every:3", "mark", 7, False, [2, 5], None),
    ("every:3", "hold", 7, False, [5], None),  # step 2 is the 3rd, but still in the warm-up
    ("every:2", "hold", 7, False, [3, 5], None),
    ("every:1", "hold", 2, True, [], None),
    ("end", "mark", 7, True, [], 6),
    ("end", "mark", 7, False, [], None),  # never ended (or cut by a reset): nothing
    ("end", "hold", 7, True, [], 6),
    ("end", "hold", 3, True, [], None),  # ended inside its warm-up: held like any warm-up prediction
    ("end", "mark", 1, True, [], 0),
]


def emitter_for(emit: str, warmup: str) -> Emitter[tuple[int, int]]:
    cfg = ServeConfig(model="m", input_topic="in", output_topic="out", emit=emit, warmup=warmup)
    return Emitter.from_config(cfg, WARMUP)


@pytest.mark.parametrize("chunks", [(1,) * 7, (4, 2, 1), (2, 2, 2, 1), (7,)])
@pytest.mark.parametrize(("emit", "warmup", "n", "ended", "made", "at_end"), RULES)
def test_emit_rules(emit: str, warmup: str, n: int, ended: bool, made: list[int], at_end: int | None,
                    chunks: tuple[int, ...]) -> None:
    """Two streams side by side in each call, in chunks of T steps (a model call's layout)."""
    emitter = emitter_for(emit, warmup)
    slots = [4, 9]
    out: list[tuple[int, int]] = []
    step = 0
    for t in chunks:
        t = min(t, n - step)
        if t <= 0:
            break
        layout = [(slot, step + j) for slot in slots for j in range(t)]  # row-major (stream, step)
        wanted = emitter.wanted([s for _, s in layout], slots, t)
        chosen = [layout[i] for i in (range(len(layout)) if wanted is None else wanted)]
        if emitter.at_end:
            emitter.keep(chosen, wanted or [], slots, t)
        else:
            out += chosen
        step += t
    assert step == n
    for slot in slots:
        assert [s for sl, s in out if sl == slot] == made
        if ended:
            last = emitter.ended(slot)
            assert last == (None if at_end is None else (slot, at_end))
        else:
            emitter.forget(slot)
        assert emitter.ended(slot) is None  # what went out (or was forgotten) never goes out again


def test_a_reset_or_an_eviction_discards_the_last_prediction() -> None:
    emitter = emitter_for("end", "mark")
    assert emitter.wanted([0, 1, 0, 1], [1, 2], 2) == [1, 3]  # each stream's latest step
    emitter.keep([(1, 1), (2, 1)], [1, 3], [1, 2], 2)
    emitter.forget(1)  # reset: the stream starts over
    assert emitter.ended(1) is None and emitter.ended(2) == (2, 1)


# --- the pipeline and verify agree ---------------------------------------------------------------

NUM_IN = InputSpec("numeric", features=("a", "b"), mean=(1.0, -3.0), std=(2.0, 0.5))
NUM_OUT = OutputSpec("regression", names=("y",), mean=(10.0,), std=(4.0,))


@pytest.fixture(scope="module")
def gru(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(21)
    path = tmp_path_factory.mktemp("emit") / "gru.onnx"
    export_bundle(zoo.build(cell="gru", n_features=2, hidden=8, out_size=1),
                  ExportOptions(name="gru", input=NUM_IN, output=NUM_OUT, warmup_steps=WARMUP,
                                parity=ParityPlan(batches=(1, 3), chunks=(1, 4), steps=12)), path)
    return path


def traffic(seed: int) -> dict[int, list[tuple[bytes, bytes, int, int]]]:
    """Records of 12 keys over 2 partitions: 1–4 steps each, resets and ends with steps, control-only
    resets and ends, and short streams that end inside their warm-up."""
    rng = random.Random(seed)
    out: dict[int, list[tuple[bytes, bytes, int, int]]] = defaultdict(list)
    for _ in range(260):
        k = rng.randrange(12)
        doc: dict[str, Any] = {}
        r = rng.random()
        if r < 0.06:
            doc["control"] = "end"  # control only
        elif r < 0.1:
            doc["control"] = "reset"
        else:
            doc["x"] = [[rng.gauss(1, 2), rng.gauss(-3, 0.5)] for _ in range(rng.randint(1, 4))]
            if r < 0.2:
                doc["control"] = "end"
            elif r < 0.25:
                doc["control"] = "reset"
        part = out[k % 2]
        part.append((f"k{k}".encode(), orjson.dumps(doc), len(part), 1_000 + len(part)))
    return out


def run_pipeline(model: BundleModel, cfg: ServeConfig,
                 inputs: dict[int, list[tuple[bytes, bytes, int, int]]]) -> dict[str, list[bytes]]:
    """Every record through the pipeline, a few per partition per round (backlogs, then chunks):
    output id → the documents written under it."""
    pipeline = Pipeline(model, cfg, cfg.input_topic)
    outputs: dict[str, list[bytes]] = defaultdict(list)
    pending = {p: [SimpleNamespace(key=k, value=v, offset=o, timestamp=ts) for k, v, o, ts in recs]
               for p, recs in inputs.items()}
    for _ in range(1_000):
        for p, recs in pending.items():
            del recs[:pipeline.accept_many(p, recs[:7])]
        for o in pipeline.finish(pipeline.execute(pipeline.plan())):
            outputs[orjson.loads(o.value)["id"]].append(o.value)
        if not any(pending.values()) and not pipeline.busy():
            break
    for o in pipeline.finish([]):  # nothing left by now: a no-op
        outputs[orjson.loads(o.value)["id"]].append(o.value)
    return outputs


def serve_config(bundle: Path, emit: str, warmup: str) -> ServeConfig:
    return ServeConfig(model=str(bundle), input_topic="in", output_topic="out", max_batch=5, max_chunk=4,
                       stream_ttl_s=0.0, emit=emit, warmup=warmup).validate()


@pytest.mark.parametrize(("emit", "warmup"), [("every", "mark"), ("every", "hold"), ("every:2", "mark"),
                                              ("every:3", "hold"), ("end", "mark"), ("end", "hold")])
def test_verify_expects_exactly_what_the_pipeline_emits(gru: Path, emit: str, warmup: str) -> None:
    model = BundleModel(gru)
    cfg = serve_config(gru, emit, warmup)
    inputs = traffic(seed=len(emit) + len(warmup))
    outputs = run_pipeline(model, cfg, inputs)
    assert outputs and all(len(v) == 1 for v in outputs.values())
    report = verify.compare(model, cfg, inputs, outputs, tolerance=1e-4)
    assert report.ok, report.text()
    assert report.expected == len(outputs) and report.duplicated == 0 and report.max_error < 1e-4
    docs = [orjson.loads(v[0]) for v in outputs.values()]
    assert all(d.get("ended") is True for d in docs) == (emit == "end")
    assert any(d["warmup"] for d in docs) == (warmup == "mark")


class Overflowing(nn.Module):
    """A linear recurrence (nothing saturates): an infinite input makes the state infinite for
    good, and every output after it NaN or infinite."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(2, 3)
        self.head = nn.Linear(3, 1)

    def state_spec(self) -> list[StateDecl]:
        return [StateDecl("h", (3,), 0)]

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ys = []
        for t in range(x.shape[1]):
            h = 0.5 * h + self.inp(x[:, t])
            ys.append(self.head(h))
        return torch.stack(ys, dim=1), h


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # normalising 3e38: what it is for
@pytest.mark.parametrize("emit", ["every:2", "end"])
def test_nonfinite_marks_stay_on_their_predictions_when_only_some_go_out(tmp_path: Path, emit: str) -> None:
    """One stream overflows in shared calls: of what goes out, exactly its non-finite predictions are
    marked (verify calls an unmarked NaN, or a marked finite prediction, wrong)."""
    torch.manual_seed(22)
    bundle = tmp_path / "overflow.onnx"
    export_bundle(Overflowing(), ExportOptions(name="overflow", input=NUM_IN, output=NUM_OUT, warmup_steps=0,
                                               parity=ParityPlan(batches=(1, 3), chunks=(1, 4), steps=12)), bundle)
    model = BundleModel(bundle)
    rng = random.Random(3)
    recs = []
    for t in range(9):
        for k in range(6):
            row = [1e0, 3e38] if (k == 0 and t == 4) else [rng.gauss(1, 2), rng.gauss(-3, 0.5)]  # (3e38 + 3) / 0.5: inf
            doc: dict[str, Any] = {"x": [row]}
            if t == 8:
                doc["control"] = "end"
            recs.append((f"k{k}".encode(), orjson.dumps(doc), len(recs), 1_000 + len(recs)))
    inputs = {0: recs}
    outputs = run_pipeline(model, serve_config(bundle, emit, "mark"), inputs)
    marked = [i for i, v in outputs.items() if orjson.loads(v[0]).get("nonfinite")]
    assert marked and len(marked) < len(outputs)
    report = verify.compare(model, serve_config(bundle, emit, "mark"), inputs, outputs, tolerance=1e-4)
    assert report.ok, report.text()
    assert report.nonfinite == len(marked)
