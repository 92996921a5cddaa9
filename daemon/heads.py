"""Raw model outputs → the prediction the bundle's output kind calls for.

Vectorised over a whole call's rows. Numbers are written as the float32 values the model
produced, in the shortest form that reads back as the same float32 (``0.12573022``, not
``0.1257302165031433``): the digits beyond are noise from widening to float64.
Also the roll-outs that look ahead from a stream's state without changing it: multi-step
forecasts (regression models whose outputs are their next inputs) and token generation
(language models).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from .bundle import BundleSpec
from .runtime import BundleModel


def shortest(a: np.ndarray) -> list:
    """float32 values as Python floats that print as the float32's shortest form (see above)."""
    return orjson.loads(orjson.dumps(a.astype(np.float32, copy=False), option=orjson.OPT_SERIALIZE_NUMPY))


def _json_rows(a: np.ndarray) -> list[list[bytes]]:
    """A 2-D float array as JSON numbers, row by row: one orjson call for the whole array, cut
    apart (numbers hold no brackets or commas). Same numbers as ``shortest``."""
    body = orjson.dumps(a.astype(np.float32, copy=False), option=orjson.OPT_SERIALIZE_NUMPY)  # [[v,...],[...]]
    return [row.split(b",") for row in body[2:-2].split(b"],[")]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Heads:
    def __init__(self, spec: BundleSpec, top_k: int) -> None:
        out = spec.output
        self.kind = out.kind
        self.names = list(out.names)
        self.labels = list(out.labels)
        self.vocab = list(out.vocab)
        self.top_k = max(1, min(top_k or out.size, out.size))
        self.mean = np.asarray(out.mean or [0.0] * out.size, dtype=np.float32)
        self.std = np.asarray(out.std or [1.0] * out.size, dtype=np.float32)

        # Each kind's prediction with its numbers (and, for the top k, their names) left open.
        self._values_json = b'{"values":{' + b",".join(orjson.dumps(n) + b":%b" for n in self.names) + b"}}"
        self._label_json = [orjson.dumps(x) for x in self.labels]
        self._vocab_json = [orjson.dumps(x) for x in self.vocab]
        self._probs_json = b'{"label":%b,"probs":{' + b",".join([b"%b:%b"] * self.top_k) + b"}}"
        self._next_json = b'{"next":[' + b",".join([b'{"token":%b,"p":%b}'] * self.top_k) + b"]}"

    def values(self, y: np.ndarray) -> np.ndarray:
        """Regression outputs in the units the model was trained on (de-normalised)."""
        return (y * self.std + self.mean).astype(np.float32, copy=False)

    def encoded(self, y: np.ndarray) -> list[bytes]:
        """``y[N, O]`` → one prediction per row as JSON: what ``predictions`` gives, already encoded.

        Regression rows (the common case, one output per step of every stream) are encoded in
        one orjson call over the whole array and cut apart: numbers hold no brackets or commas.
        """
        if not len(y):
            return []
        if self.kind == "regression":
            tmpl = self._values_json
            return [tmpl % tuple(row) for row in _json_rows(self.values(y))]
        top, top_p = self._top(y)
        classify = self.kind == "classification"
        names = self._label_json if classify else self._vocab_json
        tmpl = self._probs_json if classify else self._next_json
        k = self.top_k
        args: list[bytes] = [b""] * (2 * k + classify)  # (the label,) then name, p, name, p, ...
        out = []
        for idx, ps in zip(top.tolist(), _json_rows(top_p), strict=True):
            if classify:
                args[0] = names[idx[0]]
            args[classify::2] = [names[i] for i in idx]
            args[classify + 1::2] = ps
            out.append(tmpl % tuple(args))
        return out

    def _top(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The k likeliest classes of each row, likeliest first (ties: lower index first), and their p."""
        p = softmax(y.astype(np.float32))
        top = np.argsort(-p, axis=-1, kind="stable")[:, : self.top_k]
        return top, np.take_along_axis(p, top, axis=-1)

    def predictions(self, y: np.ndarray) -> list[dict[str, Any]]:
        """``y[N, O]`` → one prediction dict per row."""
        if self.kind == "regression":
            names = self.names
            return [{"values": dict(zip(names, row, strict=True))} for row in shortest(self.values(y))]
        top, p = self._top(y)
        top_p = shortest(p)
        if self.kind == "classification":
            labels = self.labels
            return [{"label": labels[idx[0]], "probs": {labels[i]: q for i, q in zip(idx, ps, strict=True)}}
                    for idx, ps in zip(top.tolist(), top_p, strict=True)]
        vocab = self.vocab
        return [{"next": [{"token": vocab[i], "p": q} for i, q in zip(idx, ps, strict=True)]}
                for idx, ps in zip(top.tolist(), top_p, strict=True)]


class Forecaster:
    """Roll a regression model H steps ahead on copies of the state, feeding predictions back.

    Needs a model whose outputs are the next values of all its inputs (``output.next_of``).
    """

    def __init__(self, model: BundleModel, horizon: int) -> None:
        spec = model.spec
        self.model = model
        self.horizon = horizon
        inp, out = spec.input, spec.output
        if spec.mode != "stateful" or out.kind != "regression" or sorted(out.next_of) != sorted(inp.features):
            raise ValueError(
                "forecast_horizon needs a stateful regression bundle whose outputs are the next values of all "
                f"its inputs (output.next_of); {spec.model.ref} has next_of={list(out.next_of)} for inputs "
                f"{list(inp.features)}")
        order = [list(out.next_of).index(f) for f in inp.features]
        self.order = np.asarray(order)
        self.o_mean = np.asarray(out.mean or [0.0] * out.size, dtype=np.float32)
        self.o_std = np.asarray(out.std or [1.0] * out.size, dtype=np.float32)
        self.i_mean = np.asarray(inp.mean or [0.0] * inp.n_features, dtype=np.float32)
        self.i_std = np.asarray(inp.std or [1.0] * inp.n_features, dtype=np.float32)

    def roll(self, y: np.ndarray, states: list[np.ndarray]) -> np.ndarray:
        """``y[B, O]`` (the step's own prediction) and the states after it → ``[B, H, O]`` model-space."""
        out = [y]
        state = [s.copy() for s in states]
        for _ in range(self.horizon - 1):
            raw = out[-1] * self.o_std + self.o_mean
            x = ((raw[:, self.order] - self.i_mean) / self.i_std).astype(np.float32)[:, None, :]
            y_next, state = self.model.run(x, state)
            out.append(y_next[:, 0])
        return np.stack(out, axis=1)


class Generator:
    """Generate N tokens from each row's state: greedy, or sampled from the top k (seeded per row)."""

    def __init__(self, model: BundleModel, n: int, strategy: str, top_k: int, seed: int) -> None:
        spec = model.spec
        if spec.mode != "stateful" or spec.output.kind != "language_model":
            raise ValueError("generate_tokens needs a stateful language-model bundle")
        self.model = model
        self.n = n
        self.greedy = strategy == "greedy"
        self.k = max(1, min(top_k, spec.output.size))
        self.seed = seed

    def generate(self, logits: np.ndarray, states: list[np.ndarray], seeds: list[tuple[int, ...]]) -> np.ndarray:
        """``logits[B, V]`` after the step → token ids ``[B, n]``."""
        rngs = None if self.greedy else [np.random.default_rng((self.seed, *s)) for s in seeds]
        state = [s.copy() for s in states]
        picked = []
        cur = logits
        for i in range(self.n):
            if self.greedy:
                ids = cur.argmax(axis=-1)
            else:
                p = softmax(cur)
                top = np.argsort(-p, axis=-1, kind="stable")[:, : self.k]
                tp = np.take_along_axis(p, top, axis=-1)
                tp /= tp.sum(axis=-1, keepdims=True)
                assert rngs is not None
                ids = np.array([t[rng.choice(self.k, p=q)] for t, q, rng in zip(top, tp, rngs, strict=True)])
            picked.append(ids)
            if i + 1 < self.n:
                y, state = self.model.run(ids.astype(np.int64)[:, None], state)
                cur = y[:, 0]
        return np.stack(picked, axis=1)
