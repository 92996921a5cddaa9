"""The recipes' data, generated in code (nothing is downloaded), and their held-out metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rnnd.daemon.bundle import InputSpec, OutputSpec, TokenizerSpec
from rnnd.daemon.tokenizer import PAD, UNK, Tokenizer, build_vocab
from rnnd.synthetic import SENSORS, sensor_readings

from .training import Data


@dataclass
class Task:
    input: InputSpec
    output: OutputSpec
    train: Data
    test: Data
    # A realistic sequence in model space, for the exporter's parity check.
    sample: np.ndarray
    score: Callable[[np.ndarray, Data, int], float]


def r2(pred: np.ndarray, data: Data, warmup: int) -> float:
    p, y = pred[:, warmup:], data.y[:, warmup:]
    return float(1.0 - np.mean((p - y) ** 2) / np.var(y))


def step_accuracy(pred: np.ndarray, data: Data, warmup: int) -> float:
    return float(np.mean(pred[:, warmup:].argmax(-1) == data.y[:, warmup:]))


def bits_per_char(pred: np.ndarray, data: Data, warmup: int) -> float:
    logits = pred[:, warmup:].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, data.y[:, warmup:, None], axis=-1)
    return float(-picked.mean() / np.log(2))


def _split(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None, test: float = 0.2) -> tuple[Data, Data]:
    n = int(len(x) * (1 - test))
    m_tr = None if mask is None else mask[:n]
    m_te = None if mask is None else mask[n:]
    return Data(x[:n], y[:n], m_tr), Data(x[n:], y[n:], m_te)


# --- numeric -------------------------------------------------------------------------------------


def delay(seed: int, n: int = 2000, steps: int = 80, lag: int = 10) -> Task:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, steps, 1)).astype(np.float32)
    y = np.zeros_like(x)
    y[:, lag:] = x[:, :-lag]
    mask = np.ones((n, steps), dtype=bool)
    mask[:, :lag] = False
    train, test = _split(x, y, mask)
    return Task(InputSpec("numeric", features=("x",), valid_min=(-1.0,), valid_max=(1.0,)),
                OutputSpec("regression", names=(f"x_lag{lag}",)), train, test, x[0], r2)


def product(seed: int, n: int = 2000, steps: int = 60) -> Task:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, steps, 1)).astype(np.float32)
    y = np.zeros_like(x)
    y[:, 1:] = x[:, 1:] * x[:, :-1]
    mask = np.ones((n, steps), dtype=bool)
    mask[:, 0] = False
    train, test = _split(x, y, mask)
    return Task(InputSpec("numeric", features=("x",)), OutputSpec("regression", names=("x_prev_times_x",)),
                train, test, x[0], r2)


def moving_average(seed: int, n: int = 2000, steps: int = 60, k: int = 5) -> Task:
    """The course's stateful moving average: y_t = the mean of the last k inputs. A window model
    would see the k inputs; this one must carry what it needs of them in its state."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, steps, 1)).astype(np.float32)
    c = np.cumsum(np.concatenate([np.zeros((n, 1, 1), np.float32), x], axis=1), axis=1)
    y = np.zeros_like(x)
    y[:, k - 1:] = (c[:, k:] - c[:, :-k]) / k
    mask = np.ones((n, steps), dtype=bool)
    mask[:, :k - 1] = False  # fewer than k inputs so far: no target
    train, test = _split(x, y, mask)
    return Task(InputSpec("numeric", features=("x",)), OutputSpec("regression", names=(f"mean_last_{k}",)),
                train, test, x[0], r2)


def sensors(seed: int, n: int = 600, steps: int = 201) -> Task:
    rng = np.random.default_rng(seed)
    raw = sensor_readings(rng, n, steps)
    mean, std = raw.reshape(-1, 8).mean(0), raw.reshape(-1, 8).std(0)
    x = ((raw[:, :-1] - mean) / std).astype(np.float32)
    y = x[:, 1:]
    x = x[:, :-1]
    train, test = _split(np.ascontiguousarray(x), np.ascontiguousarray(y))
    inp = InputSpec("numeric", features=SENSORS, mean=tuple(map(float, mean)), std=tuple(map(float, std)))
    # Forecasts every sensor's next reading, so the daemon can roll it further ahead.
    out = OutputSpec("regression", names=SENSORS, mean=inp.mean, std=inp.std, next_of=SENSORS)
    return Task(inp, out, train, test, x[0], r2)


# --- text ----------------------------------------------------------------------------------------

_DET = ["the", "a", "my", "one", "that"]
_ADJ = ["red", "small", "old", "quick", "lazy", "happy", "bright", "quiet"]
_NOUN = ["cat", "dog", "fox", "bird", "horse", "robot", "sensor", "river"]
_VERB = ["sees", "likes", "chases", "finds", "hears", "follows", "meets"]


def sentences(rng: np.random.Generator, count: int) -> list[str]:
    out = []
    for _ in range(count):
        words = [rng.choice(_DET), rng.choice(_ADJ), rng.choice(_NOUN), rng.choice(_VERB),
                 rng.choice(_DET), rng.choice(_NOUN)]
        out.append(" ".join(words) + ".")
    return out


def charlm(seed: int, n: int = 800, steps: int = 129) -> Task:
    rng = np.random.default_rng(seed)
    texts = [" ".join(sentences(rng, 6))[:steps] for _ in range(n)]
    spec = build_vocab(texts, level="char", lowercase=True)
    tok = Tokenizer(spec)
    ids = np.stack([tok.encode(t) for t in texts])
    x, y = np.ascontiguousarray(ids[:, :-1]), np.ascontiguousarray(ids[:, 1:])
    train, test = _split(x, y)
    inp = InputSpec("tokens", tokenizer=spec)
    out = OutputSpec("language_model", vocab=spec.vocab)
    return Task(inp, out, train, test, x[0], bits_per_char)


_POS = ["good", "great", "love", "excellent", "nice", "happy"]
_NEG = ["bad", "awful", "hate", "terrible", "poor", "sad"]
_FILLER = ["the", "movie", "was", "plot", "and", "actors", "i", "think", "it", "really",
           "story", "but", "then", "ending", "music", "quite", "very", "so"]
LABELS = ("neutral", "positive", "negative")


def review(rng: np.random.Generator, words: int) -> tuple[list[str], list[int]]:
    """Words and the per-step label: the latest sentiment word decides; 'not' flips it."""
    out: list[str] = []
    labels: list[int] = []
    current = 0
    while len(out) < words:
        r = rng.random()
        if r < 0.15:
            negate = rng.random() < 0.3
            positive = rng.random() < 0.5
            word = rng.choice(_POS if positive else _NEG)
            if negate:
                out.append("not")
                labels.append(current)
            out.append(str(word))
            current = 1 if positive != negate else 2
            labels.append(current)
        else:
            out.append(str(rng.choice(_FILLER)))
            labels.append(current)
    return out[:words], labels[:words]


def sentiment(seed: int, n: int = 2000, steps: int = 40) -> Task:
    rng = np.random.default_rng(seed)
    docs = [review(rng, steps) for _ in range(n)]
    spec = build_vocab([" ".join(w) for w, _ in docs], level="word")
    tok = Tokenizer(spec)
    x = np.stack([tok.encode(" ".join(w)) for w, _ in docs])
    y = np.array([lab for _, lab in docs], dtype=np.int64)
    train, test = _split(x, y)
    return Task(InputSpec("tokens", tokenizer=spec), OutputSpec("classification", labels=LABELS),
                train, test, x[0], step_accuracy)


# --- seq2seq ------------------------------------------------------------------------------------

REVERSE_LETTERS = "abcdefghijkl"
REVERSE_LENGTHS = (3, 10)  # source lengths, inclusive: trained and measured on the same range


@dataclass
class Seq2SeqTask:
    """Sources and their answers as id sequences (no padding: each batch is drawn at one length)."""

    input: InputSpec
    output: OutputSpec
    bos_id: int
    eos_id: int
    draw: Callable[[np.random.Generator, int, int], tuple[np.ndarray, np.ndarray]]  # (rng, batch, length)
    test: list[tuple[np.ndarray, list[int]]]  # held-out (source ids, answer ids)
    sample: np.ndarray  # a long source, for the exporter's parity sources


def reverse(seed: int, n_test: int = 400) -> Seq2SeqTask:
    """Answer a word of letters with the word reversed ("abc" → "cba"): attention must find the
    source position that each output position mirrors."""
    src = TokenizerSpec(level="char", vocab=(PAD, UNK, *REVERSE_LETTERS), unk_id=1, pad_id=0)
    tgt = ("<bos>", "<eos>", *REVERSE_LETTERS)

    def draw(rng: np.random.Generator, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(2, 2 + len(REVERSE_LETTERS), size=(batch, length), dtype=np.int64)
        return x, np.ascontiguousarray(x[:, ::-1])  # a letter has one id in both vocabularies: 2 + its place

    rng = np.random.default_rng(seed + 10_000)  # held out: another stream of draws than training's
    lo, hi = REVERSE_LENGTHS
    test = []
    for _ in range(n_test):
        x, y = draw(rng, 1, int(rng.integers(lo, hi + 1)))
        test.append((x[0], y[0].tolist()))
    sample = draw(rng, 1, 64)[0][0]
    return Seq2SeqTask(InputSpec("tokens", tokenizer=src), OutputSpec("language_model", vocab=tgt), 0, 1, draw, test,
                       sample)
