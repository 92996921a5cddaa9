"""The benchmark's models and data: what every contender is given, identically.

Models are made once and cached (``.cache/bench/`` at the repository root, ignored by git):

* ``sensors`` — the recipe's 2-layer LSTM H=64 over 8 features, trained by
  ``rnnd.export.recipes.run_recipe`` (its checkpoint feeds the PyTorch contender);
* ``charlm`` — the recipe's character LSTM H=96 (text, token ids in, next-token out);
* ``large`` — ``zoo.build(cell="lstm", n_features=8, hidden=256, layers=2, out_size=8)`` with
  random weights, exported with ``export_bundle`` (a bigger model: compute matters more).

Data is generated here from a seed, without torch (the live producer is a separate process
and should start fast): numeric messages ``{"x": [8 floats]}`` shaped like the sensor
recipe's readings, text messages ``{"tokens": [32 ids]}`` from sentences tokenised by the
bundle's own tokenizer. Messages go round-robin over the keys, so streams interleave the
way independent devices do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache" / "bench"

LARGE_KWARGS: dict[str, Any] = {"cell": "lstm", "n_features": 8, "hidden": 256, "layers": 2, "out_size": 8}


@dataclass(frozen=True)
class Model:
    name: str
    bundle: Path
    checkpoint: Path


def prepare_models(cache: Path = DEFAULT_CACHE, names: tuple[str, ...] = ("sensors", "charlm", "large", "reverse"),
                   log: Any = print) -> dict[str, Model]:
    """Train/export what is missing from ``cache``; return the models by name."""
    out = {}
    for name in names:
        folder = cache / name
        bundle, ckpt = folder / f"{name}.onnx", folder / f"{name}.pt"
        if not (bundle.is_file() and ckpt.is_file()):
            log(f"preparing model {name} (cached in {folder}) ...")
            if name == "large":
                _export_large(folder)
            else:
                from rnnd.export.recipes import run_recipe

                result = run_recipe(name, folder, seed=0, progress=False)
                if result.bundle is None:
                    raise RuntimeError(f"recipe {name} did not reach its level: {result.summary()}")
        out[name] = Model(name, bundle, ckpt)
    return out


def _export_large(folder: Path) -> None:
    """H=256 LSTM with random weights: the checkpoint is written in ``rnnd train``'s format so the
    PyTorch contender loads it through the same loader as the recipe models."""
    import torch

    from rnnd.daemon.bundle import InputSpec, OutputSpec
    from rnnd.export import zoo
    from rnnd.export.exporter import ExportOptions, export_bundle

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = zoo.build(**LARGE_KWARGS)
    feats = tuple(f"f{i}" for i in range(8))
    opts = ExportOptions(name="large", input=InputSpec("numeric", features=feats),
                         output=OutputSpec("regression", names=tuple(f"o{i}" for i in range(8))),
                         description="2-layer LSTM H=256, random weights (benchmark)")
    export_bundle(model, opts, folder / "large.onnx")
    torch.save({"state_dict": model.state_dict(),
                "rnnd": {"factory": "rnnd.export.zoo:build", "kwargs": LARGE_KWARGS, "name": "large"}},
               folder / "large.pt")


# --- data ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Data:
    """``messages`` messages over ``keys`` keys, ``steps_per_message`` steps each, from ``seed``."""

    kind: str  # numeric | tokens | letters (a seq2seq source: one word of 3-10 letters per message)
    keys: int
    messages: int
    steps_per_message: int = 1
    seed: int = 0
    key_prefix: str = "k"

    @property
    def steps(self) -> int:
        return self.messages * self.steps_per_message

    def key(self, k: int) -> bytes:
        return f"{self.key_prefix}{k:07d}".encode()

    def items(self, spec: Any) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs in send order: round-robin over the keys."""
        per_key = -(-self.messages // self.keys)
        rng = np.random.default_rng(self.seed)
        if self.kind == "letters":
            yield from _letters(rng, spec, self.messages, self.keys, self.key)
            return
        if self.kind == "numeric":
            values = _numeric(rng, spec, self.keys, per_key * self.steps_per_message)
        else:
            values = _tokens(rng, spec, self.keys, per_key * self.steps_per_message)
        n = 0
        spm = self.steps_per_message
        for s in range(per_key):
            for k in range(self.keys):
                if n == self.messages:
                    return
                chunk = values[k][s * spm:(s + 1) * spm]
                doc = {"x": chunk[0] if spm == 1 else chunk} if self.kind == "numeric" else {"tokens": chunk}
                yield self.key(k), orjson.dumps(doc)
                n += 1


def _numeric(rng: np.random.Generator, spec: Any, keys: int, steps: int) -> list[list]:
    """Readings like the sensor recipe's: two slow oscillations per device plus noise, in the
    bundle's raw units (mean ± a few std), rounded to 3 decimals as a device would send them."""
    n = spec.input.n_features
    mean, std, _ = spec.input.scaling
    t = np.arange(steps)[None, :, None]
    f1 = rng.uniform(0.02, 0.06, size=(keys, 1, 1))
    f2 = rng.uniform(0.08, 0.15, size=(keys, 1, 1))
    ph = rng.uniform(0, 2 * np.pi, size=(keys, 1, n))
    wave = np.sin(2 * np.pi * f1 * t + ph) + 0.5 * np.sin(2 * np.pi * f2 * t + 2 * ph)
    x = mean + std * (wave + 0.05 * rng.standard_normal((keys, steps, n)))
    return np.round(x, 3).tolist()


_WORDS = ("the", "a", "my", "one", "that", "red", "small", "old", "quick", "lazy", "happy", "bright", "quiet",
          "cat", "dog", "fox", "bird", "horse", "robot", "sensor", "river", "sees", "likes", "chases", "finds",
          "hears", "follows", "meets")


def _letters(rng: np.random.Generator, spec: Any, messages: int, keys: int, key: Any) -> Iterator[tuple[bytes, bytes]]:
    """Words of 3-10 letters (the reverse recipe's sources) as token ids, round-robin over the keys."""
    from rnnd.daemon.tokenizer import Tokenizer

    tok = Tokenizer(spec.input.tokenizer)
    letters = list("abcdefghijkl")
    for n in range(messages):
        word = "".join(rng.choice(letters, size=int(rng.integers(3, 11))))
        yield key(n % keys), orjson.dumps({"tokens": tok.encode(word).tolist()})


def _tokens(rng: np.random.Generator, spec: Any, keys: int, steps: int) -> list[list[int]]:
    """Token ids of generated sentences, tokenised by the bundle's own tokenizer."""
    from rnnd.daemon.tokenizer import Tokenizer

    tok = Tokenizer(spec.input.tokenizer)
    out = []
    for _ in range(keys):
        ids: list[int] = []
        while len(ids) < steps:
            words = rng.choice(_WORDS, size=6)
            ids.extend(tok.encode(" ".join(words) + ". ").tolist())
        out.append(ids[:steps])
    return out


@dataclass(frozen=True)
class Workload:
    """A model and the data all contenders process."""

    name: str
    model: str  # key of prepare_models()
    data: Data
    description: str


def workloads(quick: bool) -> dict[str, Workload]:
    """The benchmark's workloads (wide, deep, large); ``quick`` shrinks them to fit the 60-second budget."""
    wide_msgs = 20_000 if quick else 100_000
    return {
        "wide": Workload("wide", "sensors", Data("numeric", 10_000, wide_msgs, 1, seed=1, key_prefix="dev-"),
                         f"10,000 keys, {wide_msgs:,} messages of one step, sensors (2-layer LSTM H=64)"),
        "deep": Workload("deep", "charlm", Data("tokens", 50, 200 if quick else 6_000, 32, seed=2, key_prefix="doc-"),
                         f"50 keys, {200 if quick else 6_000:,} messages of 32 tokens, charlm (LSTM H=96)"),
        "large": Workload("large", "large", Data("numeric", 5_000 if quick else 10_000, 5_000 if quick else 20_000,
                                                 1, seed=3, key_prefix="dev-"),
                          f"{5_000 if quick else 10_000:,} keys, {5_000 if quick else 20_000:,} messages of one step, "
                          "2-layer LSTM H=256 (random weights)"),
        "seq2seq": Workload("seq2seq", "reverse", Data("letters", 1_000, 4_000 if quick else 20_000, 1, seed=5,
                                                       key_prefix="req-"),
                            f"1,000 keys, {4_000 if quick else 20_000:,} messages of one word (3-10 letters), "
                            "reverse (GRU encoder-decoder with attention, greedy)"),
    }
