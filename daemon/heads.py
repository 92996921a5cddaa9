"""Raw model outputs → the prediction the bundle's output kind calls for.

Vectorised over a whole call's rows. Numbers are written as the float32 values the model
produced, in the shortest form that reads back as the same float32 (``0.12573022``, not
``0.1257302165031433``): the digits beyond are noise from widening to float64.
Also the roll-outs that look ahead from a stream's state without changing it: multi-step
forecasts (regression models whose outputs are their next inputs) and token generation
(language models).

A model can overflow (a stream fed values far outside what it was trained on): a row whose
raw output holds NaN or infinity is a *non-finite* prediction. Its numbers are written as
null (JSON has no NaN), its document is marked ``"nonfinite": true`` (``Encoder``), it is
counted (``rnnd_nonfinite_predictions_total``) and logged, at most once per
``NONFINITE_LOG_INTERVAL_S``. Rows are independent in every model call, so other streams in
the same batch are unaffected; the stream itself usually stays non-finite until a reset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from .bundle import BundleSpec
from .codec import encode, key_text_or_base64
from .config import ConfigError
from .runtime import BundleModel

if TYPE_CHECKING:
    from .codec import Record
    from .metrics import Metrics
    from .tokenizer import Tokenizer

log = logging.getLogger("rnnd.heads")

#: At most one log line per this many seconds about non-finite predictions. A stream whose
#: state has become NaN produces NaN at every later step until it is reset, so one line per
#: prediction would flood the log; each line says how many were not logged since the last one,
#: and rnnd_nonfinite_predictions_total counts every one of them.
NONFINITE_LOG_INTERVAL_S = 10.0


def shortest(a: np.ndarray) -> list:
    """float32 values as Python floats that print as the float32's shortest form (see above)."""
    return orjson.loads(orjson.dumps(a.astype(np.float32, copy=False), option=orjson.OPT_SERIALIZE_NUMPY))


def _json_rows(a: np.ndarray) -> list[list[bytes]]:
    """A 2-D float array as JSON numbers, row by row: one orjson call for the whole array, cut
    apart (numbers hold no brackets or commas). Same numbers as ``shortest``."""
    body = orjson.dumps(a.astype(np.float32, copy=False), option=orjson.OPT_SERIALIZE_NUMPY)  # [[v,...],[...]]
    return [row.split(b",") for row in body[2:-2].split(b"],[")]


def _bad_rows(y: np.ndarray) -> list[int]:
    """Rows of ``y[N, O]`` that hold NaN or infinity (usually none: one vectorised check)."""
    if np.isfinite(y).all():
        return []
    return np.flatnonzero(~np.isfinite(y).all(axis=-1)).tolist()


def softmax(logits: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # inf - inf: a non-finite row, marked as such (no warning)
        z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Heads:
    def __init__(self, spec: BundleSpec, top_k: int, metrics: Metrics | None = None) -> None:
        out = spec.output
        self.metrics = metrics
        self._next_log = 0.0  # monotonic time from which the next non-finite line may be logged
        self._unlogged = 0  # non-finite predictions since the last line
        self.kind = out.kind
        self.names = list(out.names)
        self.labels = list(out.labels)
        self.vocab = list(out.vocab)
        self.top_k = max(1, min(top_k or out.size, out.size))
        self._denormalise = out.denormalise

        # Each kind's prediction with its numbers (and, for the top k, their names) left open.
        self._values_json = b'{"values":{' + b",".join(orjson.dumps(n) + b":%b" for n in self.names) + b"}}"
        self._label_json = [orjson.dumps(x) for x in self.labels]
        self._vocab_json = [orjson.dumps(x) for x in self.vocab]
        self._probs_json = b'{"label":%b,"probs":{' + b",".join([b"%b:%b"] * self.top_k) + b"}}"
        self._next_json = b'{"next":[' + b",".join([b'{"token":%b,"p":%b}'] * self.top_k) + b"]}"
        # A non-finite row has no distribution to rank: no label, no probabilities, no next tokens.
        self._null: dict[str, Any] = {"label": None, "probs": None} if self.kind == "classification" else {"next": None}
        self._null_json = orjson.dumps(self._null)

    def values(self, y: np.ndarray) -> np.ndarray:
        """Regression outputs in the units the model was trained on (de-normalised)."""
        return self._denormalise(y).astype(np.float32, copy=False)

    def encoded(self, y: np.ndarray) -> list[bytes]:
        """``y[N, O]`` → one prediction per row as JSON: what ``predictions`` gives, already encoded.

        Regression rows (the common case, one output per step of every stream) are encoded in
        one orjson call over the whole array and cut apart: numbers hold no brackets or commas.
        """
        if not len(y):
            return []
        if self.kind == "regression":  # a non-finite value is written as null by orjson
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
        for i in _bad_rows(y):
            out[i] = self._null_json
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
            out = [{"label": labels[idx[0]], "probs": {labels[i]: q for i, q in zip(idx, ps, strict=True)}}
                   for idx, ps in zip(top.tolist(), top_p, strict=True)]
        else:
            vocab = self.vocab
            out = [{"next": [{"token": vocab[i], "p": q} for i, q in zip(idx, ps, strict=True)]}
                   for idx, ps in zip(top.tolist(), top_p, strict=True)]
        for i in _bad_rows(y):
            out[i] = dict(self._null)
        return out

    def with_rollouts(self, y: np.ndarray, forecast: np.ndarray | None, generated: np.ndarray | None,
                      tokenizer: Tokenizer | None, generated_rows: Sequence[int] | None = None) -> list[bytes]:
        """``predictions`` with each row's forecast ``[H, O]`` and/or generated token ids, encoded.

        ``generated_rows``: the rows ``generated`` belongs to, in order (None: every row).

        Built as dicts and encoded one by one: roll-outs cost a model call per step ahead, so
        the bulk encoding of ``encoded`` would save nothing that shows.
        """
        docs = self.predictions(y)
        if forecast is not None:
            names = self.names
            for pred, rows in zip(docs, shortest(self.values(forecast)), strict=True):
                pred["forecast"] = [dict(zip(names, r, strict=True)) for r in rows]
        if generated is not None:
            vocab = self.vocab
            targets = docs if generated_rows is None else [docs[j] for j in generated_rows]
            for pred, row in zip(targets, generated.tolist(), strict=True):
                tokens = [vocab[i] for i in row]
                pred["generated"] = tokenizer.join(tokens) if tokenizer else tokens
                pred["generated_ids"] = row
        return [encode(d) for d in docs]

    def nonfinite(self, y: np.ndarray, refs: Sequence[tuple[Record, int]],
                  forecast: np.ndarray | None = None) -> list[int] | None:
        """Rows of ``y[N, O]`` (or of their ``forecast[N, H, O]``) holding NaN or infinity; None if none.

        Counts and logs them (rate-limited). One vectorised check per model call: nothing per row
        unless something overflowed.
        """
        if np.isfinite(y).all() and (forecast is None or np.isfinite(forecast).all()):
            return None
        bad = ~np.isfinite(y).all(axis=-1)
        if forecast is not None:
            bad |= ~np.isfinite(forecast.reshape(len(forecast), -1)).all(axis=-1)
        rows = np.flatnonzero(bad).tolist()
        if self.metrics is not None:
            self.metrics.nonfinite.inc(len(rows))
        now = time.monotonic()
        if now < self._next_log:
            self._unlogged += len(rows)
            return rows
        record, index = refs[rows[0]]
        log.warning("model output is NaN or infinite for %d prediction(s), e.g. stream %r at partition %d offset %d "
                    "index %d: written as null with \"nonfinite\": true (rnnd_nonfinite_predictions_total). The "
                    "stream's state is likely non-finite too until a reset control; check its inputs against "
                    "the training data. %d more since the last such line (one per %.0f s at most)",
                    len(rows), key_text_or_base64(record.key), record.partition, record.offset, index, self._unlogged,
                    NONFINITE_LOG_INTERVAL_S)
        self._next_log = now + NONFINITE_LOG_INTERVAL_S
        self._unlogged = 0
        return rows


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
            raise ConfigError(  # a setting this bundle cannot honour: exit 2 with this line, not a traceback
                "forecast_horizon needs a stateful regression bundle whose outputs are the next values of all "
                f"its inputs (output.next_of); {spec.model.ref} has next_of={list(out.next_of)} for inputs "
                f"{list(inp.features)}")
        order = [list(out.next_of).index(f) for f in inp.features]
        self.order = np.asarray(order)
        self._denormalise = out.denormalise
        self._normalise = inp.normalise

    def roll(self, y: np.ndarray, states: list[np.ndarray]) -> np.ndarray:
        """``y[B, O]`` (the step's own prediction) and the states after it → ``[B, H, O]`` model-space."""
        out = [y]
        state = [s.copy() for s in states]
        for _ in range(self.horizon - 1):
            raw = self._denormalise(out[-1])
            x = self._normalise(raw[:, self.order]).astype(np.float32)[:, None, :]
            y_next, state = self.model.run(x, state)
            out.append(y_next[:, 0])
        return np.stack(out, axis=1)


class Generator:
    """Generate N tokens from each row's state: greedy, or sampled from the top k (seeded per row)."""

    def __init__(self, model: BundleModel, n: int, strategy: str, top_k: int, seed: int) -> None:
        spec = model.spec
        if spec.mode != "stateful" or spec.output.kind != "language_model":
            raise ConfigError(f"generate_tokens needs a stateful language-model bundle; {spec.model.ref} is a "
                              f"{spec.mode} {spec.output.kind} bundle")
        self.model = model
        self.n = n
        self.greedy = strategy == "greedy"
        self.k = max(1, min(top_k, spec.output.size))
        self.seed = seed

    def generate(self, logits: np.ndarray, states: list[np.ndarray], seeds: Sequence[tuple[int, ...]]) -> np.ndarray:
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
                # NaN logits (a non-finite stream, marked as such): any token, rather than a
                # ValueError from rng.choice that would stop the daemon.
                tp[~np.isfinite(tp).all(axis=-1)] = 1.0 / self.k
                assert rngs is not None
                ids = np.array([t[rng.choice(self.k, p=q)] for t, q, rng in zip(top, tp, rngs, strict=True)])
            picked.append(ids)
            if i + 1 < self.n:
                y, state = self.model.run(ids.astype(np.int64)[:, None], state)
                cur = y[:, 0]
        return np.stack(picked, axis=1)
