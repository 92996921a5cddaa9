"""Reference training recipes: small sequence tasks of known difficulty, on data generated in code.

Each recipe states the held-out level it must reach; ``rnnd train`` prints the measured
value next to it and exits non-zero on a miss. The bundles they export are the demo's and
the daemon tests' models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from . import tasks
from .training import TrainConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    task: Callable[[int], tasks.Task]
    model: dict[str, Any]
    train: TrainConfig
    metric: str
    higher_is_better: bool
    level: float
    warmup_steps: int = 0
    mode: str = "stateful"  # seq2seq: ``task`` makes a tasks.Seq2SeqTask, the metric is exact match

    @property
    def target_text(self) -> str:
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {self.level:g}"

    def passes(self, value: float) -> bool:
        return value >= self.level if self.higher_is_better else value <= self.level


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("delay", "LSTM remembers its input 10 steps back: y_t = x_{t-10}",
           tasks.delay, {"cell": "lstm", "n_features": 1, "hidden": 32, "out_size": 1},
           TrainConfig(iterations=900, batch=64, tbptt=40, lr=1e-2), "R2", True, 0.95, warmup_steps=10),
    Recipe("product", "GRU multiplies consecutive inputs: y_t = x_{t-1} * x_t",
           tasks.product, {"cell": "gru", "n_features": 1, "hidden": 32, "out_size": 1},
           TrainConfig(iterations=600, batch=64, tbptt=25, lr=1e-2), "R2", True, 0.95, warmup_steps=1),
    Recipe("moving_average", "GRU keeps a stateful moving average: y_t = mean of the last 5 inputs",
           tasks.moving_average, {"cell": "gru", "n_features": 1, "hidden": 24, "out_size": 1},
           TrainConfig(iterations=800, batch=64, tbptt=30, lr=1e-2), "R2", True, 0.995, warmup_steps=4),
    Recipe("sensors", "2-layer LSTM (H=64) forecasts the next reading of 8 noisy multi-sine sensors",
           tasks.sensors, {"cell": "lstm", "n_features": 8, "hidden": 64, "layers": 2, "out_size": 8},
           TrainConfig(iterations=700, batch=32, tbptt=50, lr=5e-3), "R2", True, 0.95, warmup_steps=20),
    Recipe("charlm", "character-level LSTM language model over generated sentences",
           tasks.charlm, {"cell": "lstm", "vocab_size": 0, "embed_dim": 16, "hidden": 96, "out_size": 0},
           TrainConfig(iterations=500, batch=32, tbptt=64, lr=1e-2), "bits_per_char", False, 0.8,
           warmup_steps=0),
    Recipe("sentiment", "word-level GRU that re-decides the sentiment as each word arrives",
           tasks.sentiment, {"cell": "gru", "vocab_size": 0, "embed_dim": 16, "hidden": 48, "out_size": 3},
           TrainConfig(iterations=500, batch=64, tbptt=40, lr=1e-2), "step_accuracy", True, 0.98),
    Recipe("reverse", "GRU encoder-decoder with attention answers a word of 3-10 letters with it reversed",
           tasks.reverse, {"arch": "seq2seq", "src_vocab": 0, "tgt_vocab": 0, "embed_dim": 32, "hidden": 64},  # type: ignore[arg-type]
           TrainConfig(iterations=1200, batch=64, lr=3e-3), "exact_match", True, 0.97, mode="seq2seq"),
]}


@dataclass
class RecipeResult:
    recipe: Recipe
    value: float
    checkpoint: Path
    bundle: Path | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.recipe.passes(self.value) and self.bundle is not None

    def summary(self) -> str:
        verdict = "ok" if self.recipe.passes(self.value) else "MISSED"
        where = f"bundle {self.bundle}" if self.bundle else "no bundle"
        return (f"{self.recipe.name}: held-out {self.recipe.metric} = {self.value:.4f} "
                f"(target {self.recipe.target_text}: {verdict}), trained in {self.seconds:.1f}s; "
                f"checkpoint {self.checkpoint}, {where}")


def run_recipe(name: str, out_dir: Path, seed: int = 0, progress: bool = True,
               export: bool = True) -> RecipeResult:
    """Generate data, train, measure, save the checkpoint and export the bundle."""
    import dataclasses

    import torch

    from .. import zoo
    from . import training

    recipe = RECIPES[name]
    if recipe.mode == "seq2seq":
        return _run_seq2seq(recipe, out_dir, seed, progress, export)
    task = recipe.task(seed)
    kwargs = dict(recipe.model)
    if "vocab_size" in kwargs:
        kwargs["vocab_size"] = task.input.vocab_size
    if kwargs.get("out_size") == 0:
        kwargs["out_size"] = task.output.size
    torch.manual_seed(seed)
    model = zoo.build(**kwargs)
    cfg = dataclasses.replace(recipe.train, seed=seed)
    training.train(model, task.train, task.output.kind, cfg, progress=progress)
    value = task.score(training.predict(model, task.test.x), task.test, recipe.warmup_steps)
    seconds = float(model.train_seconds)  # type: ignore[arg-type]  # set by training.train

    return _save_and_export(recipe, out_dir, seed, model, kwargs, task.input, task.output, task.sample, value,
                            seconds, progress, export, mode="stateful", warmup_steps=recipe.warmup_steps)


def _run_seq2seq(recipe: Recipe, out_dir: Path, seed: int, progress: bool, export: bool) -> RecipeResult:
    """``run_recipe`` for an encoder–decoder: teacher forcing, then greedy exact match on held-out sources."""
    import dataclasses

    import torch

    from .. import zoo
    from ..seq2seq import reference_answer
    from . import training

    task = cast(tasks.Seq2SeqTask, recipe.task(seed))
    kwargs = {**recipe.model, "src_vocab": task.input.vocab_size, "tgt_vocab": task.output.size,
              "bos_id": task.bos_id, "eos_id": task.eos_id}
    torch.manual_seed(seed)
    model = zoo.build(**kwargs)
    training.train_seq2seq(model, task.draw, tasks.REVERSE_LENGTHS, task.bos_id, task.eos_id,
                           dataclasses.replace(recipe.train, seed=seed), progress=progress)
    max_len = 2 * tasks.REVERSE_LENGTHS[1] + 4
    with torch.no_grad():
        hits = sum(reference_answer(model, torch.from_numpy(x), task.bos_id, task.eos_id, max_len)[0] == y
                   for x, y in task.test)
    value = hits / len(task.test)
    seconds = float(model.train_seconds)  # type: ignore[arg-type]  # set by training.train_seq2seq

    return _save_and_export(recipe, out_dir, seed, model, kwargs, task.input, task.output, task.sample, value,
                            seconds, progress, export, mode="seq2seq", max_output_len=max_len)


def _save_and_export(recipe: Recipe, out_dir: Path, seed: int, model: Any, kwargs: dict[str, Any], inp: Any,
                     out: Any, sample: Any, value: float, seconds: float, progress: bool, export: bool,
                     **mode: Any) -> RecipeResult:
    """The checkpoint (the weights, and all `rnnd export` needs to re-export them) and, if the recipe
    reached its level, the bundle. ``mode``: the mode and its settings, as ExportOptions names them."""
    import dataclasses
    import sys

    import torch

    from ..exporter import ExportOptions, export_bundle

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / f"{recipe.name}.pt"
    embedded = {
        "factory": "rnnd.export.zoo:build", "kwargs": kwargs, "name": recipe.name, "version": "1",
        "description": recipe.summary, **mode, "input": dataclasses.asdict(inp), "output": dataclasses.asdict(out),
        "sample": torch.from_numpy(sample),
        "metric": {"name": recipe.metric, "value": value, "level": recipe.level},
    }
    torch.save({"state_dict": model.state_dict(), "rnnd": embedded}, ckpt)
    bundle = None
    if export and recipe.passes(value):
        opts = ExportOptions(name=recipe.name, input=inp, output=out, version="1", description=recipe.summary,
                             sample=sample, source=f"rnnd train {recipe.name} (seed {seed})", **mode)
        log = (lambda m: print(m, file=sys.stderr)) if progress else None
        bundle = export_bundle(model, opts, out_dir / f"{recipe.name}.onnx", log=log).path
    return RecipeResult(recipe, value, ckpt, bundle, seconds)
