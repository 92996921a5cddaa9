"""The bundle contract: what `rnnd export` writes into an ONNX file and `rnnd serve` reads.

A bundle is one ONNX file. Its graph advances B streams by T steps; everything else the
daemon needs to serve it without torch and without side files (how to turn a message into
model input, how to turn model output into a prediction, what state to keep per stream and
how to initialise it) travels as one JSON document under the model metadata key
``rnnd.bundle``. These frozen dataclasses are that document; nothing else defines it, and
the exporter writes exactly these objects.

Graph conventions:

* ``x``: ``[B, T, F]`` float32 (numeric input) or ``[B, T]`` int64 (token ids).
* stateful mode: one input and one output per state tensor; ``y`` is ``[B, T, O]``.
* window mode: no state; ``x`` holds the last W inputs, ``y`` is ``[B, O]``, the prediction
  for the last step of the window.
* seq2seq mode (``Seq2SeqSpec``): a message is a whole source sequence and its answer a
  generated one. The bundle's graph is one decoder step, ``x [B]`` int64 (the previous
  output token) with the source's ``memory [B, S, H]``, its ``memory_mask [B, S]`` (bool,
  false at padding) and the decoder state in, ``y [B, V]`` (next-token logits) and the new
  state out; the encoder, ``source`` in, ``memory`` and the decoder's first state out, is the
  second graph. Nothing is kept per stream between messages (``states`` is empty).

Integrity: the document's ``content_hash`` seals the whole file (see ``content_hash``), and
every reader (``serve``, ``serve --check``, ``verify``, ``inspect``) goes through
``verified_spec``, which refuses a file changed after export.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple, overload

import numpy as np

from .errors import BundleError, BundleIntegrityError

# 2: the content hash covers the metadata as well as the graph (format 1 hashed the graph alone).
FORMAT_VERSION = 2
METADATA_KEY = "rnnd.bundle"

Mode = Literal["stateful", "window", "seq2seq"]
InputKind = Literal["numeric", "tokens"]
OutputKind = Literal["regression", "classification", "language_model"]
InitKind = Literal["zeros", "learned", "random"]


def encode_array(a: np.ndarray) -> str:
    """float32/int64 arrays as base64 of their little-endian bytes: exact, and compact."""
    return base64.b64encode(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()).decode()


def decode_array(data: str, dtype: str, shape: Sequence[int]) -> np.ndarray:
    raw = base64.b64decode(data.encode())
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)


class Scaling(NamedTuple):
    """A normalisation as float32 arrays, one value per feature (or output)."""

    mean: np.ndarray
    std: np.ndarray
    inv_std: np.ndarray  # 1 / std: model calls multiply by it (cheaper than dividing, same for every caller)


def _scaling(mean: Sequence[float], std: Sequence[float], n: int) -> Scaling:
    """The one place where a missing normalisation gets its meaning: no mean is 0, no std is 1.

    A bundle leaves both out when its model was trained on raw values; every reader (the
    daemon, forecasts, ``verify``, the benchmarks) goes through here, so none can disagree.
    """
    m = np.asarray(mean or (0.0,) * n, dtype=np.float32)
    s = np.asarray(std or (1.0,) * n, dtype=np.float32)
    return Scaling(m, s, 1.0 / s)


@dataclass(frozen=True)
class TokenizerSpec:
    """How text becomes token ids; `rnnd.daemon.tokenizer` implements it."""

    level: Literal["word", "char"]
    vocab: tuple[str, ...]
    unk_id: int
    lowercase: bool = True
    pad_id: int | None = None
    # Word level only: what counts as one token (matched with re.findall).
    pattern: str = r"[\w']+|[^\w\s]"

    def __post_init__(self) -> None:
        if self.level not in ("word", "char"):
            raise BundleError(f"tokenizer level must be 'word' or 'char', not {self.level!r}")
        if not 0 <= self.unk_id < len(self.vocab):
            raise BundleError(f"tokenizer unk_id {self.unk_id} is outside the vocabulary")
        if len(set(self.vocab)) != len(self.vocab):
            raise BundleError("tokenizer vocabulary has duplicate entries")


@dataclass(frozen=True)
class InputSpec:
    """What one step of input is, in the units producers send."""

    kind: InputKind
    # numeric: feature names, and the normalisation the model was trained with
    # (model input = (raw - mean) / std).
    features: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # numeric: raw values outside [valid_min, valid_max] are rejected (None: unbounded).
    valid_min: tuple[float | None, ...] = ()
    valid_max: tuple[float | None, ...] = ()
    # tokens: the tokenizer and vocabulary; ids must lie in [0, len(vocab)).
    tokenizer: TokenizerSpec | None = None

    def __post_init__(self) -> None:
        if self.kind == "numeric":
            n = len(self.features)
            if n == 0:
                raise BundleError("numeric input needs at least one feature name")
            for name in ("mean", "std", "valid_min", "valid_max"):
                if len(getattr(self, name)) not in (0, n):
                    raise BundleError(f"input {name} has {len(getattr(self, name))} values for {n} features")
            if any(s <= 0 for s in self.std):
                raise BundleError("input std must be positive")
        elif self.kind == "tokens":
            if self.tokenizer is None:
                raise BundleError("token input needs a tokenizer")
        else:
            raise BundleError(f"input kind must be 'numeric' or 'tokens', not {self.kind!r}")

    @property
    def n_features(self) -> int:
        return len(self.features) if self.kind == "numeric" else 1

    @property
    def dtype(self) -> str:
        return "float32" if self.kind == "numeric" else "int64"

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer.vocab) if self.tokenizer else 0

    @property
    def normalised(self) -> bool:
        """Whether the model was trained on normalised inputs (else ``normalise`` is the identity)."""
        return bool(self.mean or self.std)

    @cached_property
    def scaling(self) -> Scaling:
        return _scaling(self.mean, self.std, self.n_features)

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        """Raw inputs ``[..., F]`` → model inputs: ``(raw - mean) / std``, as ``* (1 / std)`` in float32.

        The daemon runs this once per model call; forecasts feed their predictions back through
        it, so a forecast step sees exactly what the same value sent as input would give.
        """
        m, _, inv = self.scaling
        return (raw - m) * inv


@dataclass(frozen=True)
class OutputSpec:
    """What ``y`` means, so the daemon can emit values, labels or next tokens from it alone."""

    kind: OutputKind
    # regression: output names and de-normalisation (value = y * std + mean).
    names: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # classification: one label per logit.
    labels: tuple[str, ...] = ()
    # language_model: one token per logit (usually the input vocabulary).
    vocab: tuple[str, ...] = ()
    # regression: the input feature each output predicts at the next step, when the model
    # forecasts its own inputs. Lets the daemon roll forecasts several steps ahead.
    next_of: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "regression":
            if not self.names:
                raise BundleError("regression output needs at least one output name")
            for name in ("mean", "std", "next_of"):
                if len(getattr(self, name)) not in (0, len(self.names)):
                    raise BundleError(f"output {name} must have one value per output name")
        elif self.kind == "classification":
            if len(self.labels) < 2:
                raise BundleError("classification output needs at least two labels")
        elif self.kind == "language_model":
            if len(self.vocab) < 2:
                raise BundleError("language_model output needs its vocabulary")
        else:
            raise BundleError(
                f"output kind must be regression, classification or language_model, not {self.kind!r}"
            )

    @property
    def size(self) -> int:
        """O, the last dimension of ``y``."""
        return len({"regression": self.names, "classification": self.labels,
                    "language_model": self.vocab}[self.kind])

    @cached_property
    def scaling(self) -> Scaling:
        return _scaling(self.mean, self.std, self.size)

    def denormalise(self, y: np.ndarray) -> np.ndarray:
        """Model outputs ``[..., O]`` → regression values in the units the model was trained on."""
        m, s, _ = self.scaling
        return y * s + m

    def normalise(self, values: np.ndarray) -> np.ndarray:
        """Regression values → model space (``verify`` compares there): the inverse of ``denormalise``."""
        m, _, inv = self.scaling
        return (values - m) * inv


@dataclass(frozen=True)
class RandomInit:
    """``init == "random"``: each stream starts from a draw of this distribution.

    The course's third answer to the initial-state problem ("set it at random": the model
    learns not to depend on it). The draw is a function of the stream key, the state's name
    and ``seed`` alone (a PCG64 stream seeded with a BLAKE2b digest of them), so a restart,
    another replica, a reset of the stream and ``rnnd verify`` all start it from the same
    values, and its predictions are reproducible.
    """

    distribution: Literal["normal", "uniform"]
    params: tuple[float, float]  # normal: (mean, std); uniform: (low, high)
    seed: int = 0

    def __post_init__(self) -> None:
        a, b = self.params
        if self.distribution not in ("normal", "uniform"):
            raise BundleError(f"random initial state: the distribution is normal or uniform, not {self.distribution!r}")
        if self.distribution == "normal" and not (math.isfinite(a) and math.isfinite(b) and b > 0):
            raise BundleError(f"random initial state: normal needs a finite mean and a std > 0, not {a:g}, {b:g}")
        if self.distribution == "uniform" and not (math.isfinite(a) and math.isfinite(b) and a < b):
            raise BundleError(f"random initial state: uniform needs finite low < high, not {a:g}, {b:g}")
        if not 0 <= self.seed < 2**63:
            raise BundleError(f"random initial state: seed must be in [0, 2**63), not {self.seed}")

    def draw(self, key: bytes, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        digest = hashlib.blake2b(name.encode() + b"\0" + key, digest_size=16, person=b"rnnd.init").digest()
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [self.seed, *np.frombuffer(digest, dtype="<u4").tolist()])))
        a, b = self.params
        value = rng.normal(a, b, shape) if self.distribution == "normal" else rng.uniform(a, b, shape)
        return value.astype(dtype)


@dataclass(frozen=True)
class StateSpec:
    """One state tensor carried between steps of a stream.

    ``shape`` is the per-stream shape; the graph tensor has the batch axis inserted at
    ``batch_axis`` (PyTorch RNN state ``[L*D, B, H]`` is ``shape=(L*D, H), batch_axis=1``).
    """

    name: str
    shape: tuple[int, ...]
    batch_axis: int
    input_name: str
    output_name: str
    dtype: str = "float32"
    init: InitKind = "zeros"
    # init == "learned": the per-stream initial value, base64 (see encode_array).
    init_value: str | None = None
    # init == "random": the distribution each stream's initial value is drawn from.
    init_random: RandomInit | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.batch_axis <= len(self.shape):
            raise BundleError(f"state {self.name!r}: batch_axis {self.batch_axis} out of range")
        if self.init == "learned" and self.init_value is None:
            raise BundleError(f"state {self.name!r}: learned initial state has no value")
        if (self.init == "random") != (self.init_random is not None):
            raise BundleError(f"state {self.name!r}: a distribution goes with a random initial state, and only there")
        if self.init not in ("zeros", "learned", "random"):
            raise BundleError(f"state {self.name!r}: init must be zeros, learned or random")

    @overload
    def graph_shape(self, batch: int) -> tuple[int, ...]: ...
    @overload
    def graph_shape(self, batch: str) -> tuple[int | str, ...]: ...
    def graph_shape(self, batch: int | str) -> tuple[int | str, ...]:
        """The graph's shape of this tensor: a number of streams (an arena) or a symbolic name (the export)."""
        s: list[int | str] = list(self.shape)
        s.insert(self.batch_axis, batch)
        return tuple(s)

    def initial(self) -> np.ndarray:
        """The reference initial value, shape ``self.shape``: the learned one, else zeros.

        What the PyTorch module starts from, so parity and the self-check are proven from it;
        with ``init == "random"`` a stream starts from ``initial_for(key)`` instead.
        """
        if self.init == "learned":
            assert self.init_value is not None
            return decode_array(self.init_value, self.dtype, self.shape).copy()
        return np.zeros(self.shape, dtype=self.dtype)

    def initial_for(self, key: bytes) -> np.ndarray:
        """The initial value of the stream ``key``."""
        if self.init_random is not None:
            return self.init_random.draw(key, self.name, self.shape, self.dtype)
        return self.initial()

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class ContextStart:
    """The model's ``init(context) -> state``: a stream may start from a context vector.

    The course's image captioning: a representation of the image (a CNN's features) becomes
    the RNN's initial state, and the RNN then writes the caption step by step. The function
    is its own ONNX graph — ``context [B, size]`` in, one ``<state>_init`` per state out, in
    graph layout — stored (base64) under the metadata key ``graph`` of the same file, so the
    content hash seals it with everything else. ONNX Runtime runs a whole graph per call,
    whatever outputs are asked for, so the two functions are two graphs, not one.
    """

    size: int
    graph: str = "rnnd.graph.init"
    input_name: str = "context"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise BundleError(f"a context start needs a context of at least one value, not {self.size}")

    @staticmethod
    def output_name(state: StateSpec) -> str:
        return f"{state.name}_init"


@dataclass(frozen=True)
class Seq2SeqSpec:
    """An encoder–decoder with attention: the source read whole, the answer generated token by token.

    The course's translation models "read the whole sequence before generating". The encoder
    (its own ONNX graph, stored under the metadata key ``encoder_graph`` like a context start)
    runs once per message; the decoder step is the bundle's graph and runs once per output
    token, for the tokens of many messages in one call. ``states`` is the decoder's state: it
    lives for one message's decoding, not from one message to the next, so it is not the
    bundle's (per-stream) ``states``. Token ids are of the output vocabulary
    (``OutputSpec.vocab``); ``bos_id`` is fed as the first previous token, ``eos_id`` ends an
    answer, and ``separator`` joins output tokens into text ("" for characters, " " for words).
    """

    states: tuple[StateSpec, ...]
    memory_size: int
    bos_id: int
    eos_id: int
    max_output_len: int
    max_source_len: int
    separator: str = ""
    encoder_graph: str = "rnnd.graph.encoder"
    source_name: str = "source"
    memory_name: str = "memory"
    mask_name: str = "memory_mask"

    def __post_init__(self) -> None:
        if not self.states:
            raise BundleError("a seq2seq decoder needs at least one state tensor")
        if self.memory_size < 1 or self.max_output_len < 1 or self.max_source_len < 1:
            raise BundleError("seq2seq memory_size, max_output_len and max_source_len must be >= 1")
        if self.bos_id == self.eos_id:
            raise BundleError("seq2seq bos_id and eos_id must differ: the first input would end every answer")

    @staticmethod
    def init_name(state: StateSpec) -> str:
        """The encoder's output that starts the decoder state ``state``."""
        return f"{state.name}_init"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    description: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ParityCase:
    """One comparison of the ONNX graph (run as the daemon runs it) with PyTorch."""

    batch: int
    steps: int
    # Steps per ONNX call: 1 = step by step with state carried, >1 = chunks.
    # Window mode: the window length.
    chunk: int
    data: str
    max_abs_err: float


@dataclass(frozen=True)
class ParityReport:
    tolerance: float
    max_abs_err: float
    cases: tuple[ParityCase, ...]
    reference: str = "PyTorch, one forward call over the full sequence"


@dataclass(frozen=True)
class SelfCheck:
    """A small input with PyTorch's outputs for it, so a bundle can be checked without torch."""

    x: str
    x_shape: tuple[int, ...]
    y: str
    y_shape: tuple[int, ...]
    tolerance: float

    def arrays(self, x_dtype: str) -> tuple[np.ndarray, np.ndarray]:
        return decode_array(self.x, x_dtype, self.x_shape), decode_array(self.y, "float32", self.y_shape)


@dataclass(frozen=True)
class Provenance:
    rnnd_version: str
    torch_version: str
    onnx_opset: int
    graph_strategy: str  # "native" (fused RNN ops) or "scan" (a traced step inside ONNX Scan)
    created_at: str
    source: str = ""


#: A bundle's arithmetic (``BundleSpec.precision``), and the parity tolerance each is proven to by default
#: (max abs error in model space, against PyTorch's float32): fp32 is exact up to kernel order; int8
#: quantizes every weight matrix to 256 levels; fp16 keeps ~3 significant digits per operation.
PRECISIONS = {"fp32": 1e-4, "fp16": 1e-2, "int8": 0.1}


@dataclass(frozen=True)
class BundleSpec:
    """Everything in a bundle except its graph."""

    model: ModelInfo
    mode: Mode
    input: InputSpec
    output: OutputSpec
    states: tuple[StateSpec, ...]
    warmup_steps: int = 0
    window: int | None = None
    x_name: str = "x"
    y_name: str = "y"
    content_hash: str = ""
    parity: ParityReport | None = None
    self_check: SelfCheck | None = None
    provenance: Provenance | None = None
    format_version: int = FORMAT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)
    start: ContextStart | None = None  # streams may start from init(context) (stateful only)
    seq2seq: Seq2SeqSpec | None = None  # mode seq2seq: the encoder and the decoder step
    # The graph's arithmetic: fp32, or int8 (weights quantized, ONNX Runtime's dynamic quantization),
    # or fp16. Inputs, outputs and the state tensors stay float32 whatever it is, so the state
    # layout (state_hash) is the same across precisions: an int8 bundle continues fp32 streams.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BundleError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if (self.mode == "seq2seq") != (self.seq2seq is not None):
            raise BundleError("a seq2seq bundle, and only one, carries its encoder-decoder spec (seq2seq)")
        if self.mode == "seq2seq":
            if self.states or self.window is not None or self.start is not None or self.warmup_steps:
                raise BundleError("a seq2seq bundle keeps nothing per stream: no states, window, start or warm-up")
            if self.output.kind != "language_model":
                raise BundleError("a seq2seq bundle's output is the decoder's next-token logits (language_model)")
            assert self.seq2seq is not None
            for name in ("bos_id", "eos_id"):
                if not 0 <= getattr(self.seq2seq, name) < self.output.size:
                    raise BundleError(f"seq2seq {name} {getattr(self.seq2seq, name)} is not an id of the output "
                                      f"vocabulary ({self.output.size} tokens)")
        elif self.mode == "stateful":
            if not self.states:
                raise BundleError("a stateful bundle needs at least one state tensor")
            if self.window is not None:
                raise BundleError("window length is only for window-mode bundles")
        elif self.mode == "window":
            if self.states:
                raise BundleError("a window-mode bundle carries no state tensors")
            if not self.window or self.window < 1:
                raise BundleError("a window-mode bundle needs a window length >= 1")
        else:
            raise BundleError(f"mode must be 'stateful', 'window' or 'seq2seq', not {self.mode!r}")
        if self.warmup_steps < 0:
            raise BundleError("warmup_steps must be >= 0")
        if self.start is not None and self.mode != "stateful":
            raise BundleError("a context start is for stateful bundles: a window-mode bundle keeps no state")
        if self.output.kind == "language_model" and self.input.kind != "tokens" and self.mode != "seq2seq":
            raise BundleError("a language_model output needs token input")
        unknown = set(self.output.next_of) - set(self.input.features)
        if unknown:
            raise BundleError(f"output next_of names unknown input features: {sorted(unknown)}")
        names = [self.x_name, self.y_name]
        for s in self.states + (self.seq2seq.states if self.seq2seq else ()):
            names += [s.input_name, s.output_name]
        if self.seq2seq is not None:
            names += [self.seq2seq.memory_name, self.seq2seq.mask_name]
        if len(set(names)) != len(names):
            raise BundleError(f"graph tensor names must be distinct: {names}")

    @property
    def state_hash(self) -> str:
        """Identifies the state layout: equal hashes mean state can move between models."""
        return state_hash(self.states, self.input.kind)

    @property
    def state_bytes_per_stream(self) -> int:
        return sum(s.nbytes for s in self.states)

    # --- JSON -----------------------------------------------------------------------------
    def to_json(self) -> str:
        doc = asdict(self)
        # Written only where used: other bundles' metadata stays as it was.
        for state in doc["states"]:
            if state["init_random"] is None:
                del state["init_random"]
        for name in ("start", "seq2seq"):
            if doc[name] is None:
                del doc[name]
        if doc["precision"] == "fp32":
            del doc["precision"]  # written only where it is not the default: fp32 bundles' metadata stays as it was
        for state in doc["seq2seq"]["states"] if "seq2seq" in doc else ():
            if state["init_random"] is None:
                del state["init_random"]
        doc["state_hash"] = self.state_hash
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> BundleSpec:
        doc = _parse_document(text, "bundle")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version!r} is not supported by this rnnd "
                f"(it reads version {FORMAT_VERSION}); re-export the model with this rnnd's `rnnd export`"
            )
        stored_hash = doc.pop("state_hash", None)
        try:
            spec = from_plain(cls, doc)
        except (TypeError, KeyError) as e:
            raise BundleError(f"bundle metadata does not match format {FORMAT_VERSION}: {e}") from None
        if stored_hash is not None and stored_hash != spec.state_hash:
            raise BundleError("bundle metadata is inconsistent: its state hash does not match its state spec")
        return spec


def state_hash(states: Sequence[StateSpec], input_kind: str = "") -> str:
    """Names, per-stream shapes, batch axes and dtypes: what must agree for state to carry over.

    Initial values are left out on purpose: they only matter for new streams.
    """
    layout = [[s.name, list(s.shape), s.batch_axis, s.dtype] for s in states]
    blob = json.dumps({"states": layout, "input": input_kind}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --- reading and writing ONNX files -------------------------------------------------------------


def graph_hash(model_proto: Any) -> str:
    """sha256 of the serialised graph (weights included), independent of the metadata.

    Identifies the computation: two exports of the same weights have equal graph hashes even
    though their provenance differs. Not an integrity check; that is ``content_hash``.
    """
    return hashlib.sha256(model_proto.graph.SerializeToString(deterministic=True)).hexdigest()


_CONTENT_HASH_DOMAIN = b"rnnd bundle content v2\n"


def content_hash(model_proto: Any) -> str:
    """sha256 over everything in the file except the stored hash itself.

    Two length-prefixed parts: (1) the ModelProto without its metadata, serialised
    deterministically, so the graph, every initializer (the weights), the opset imports and any
    model-local functions are covered: each changes what the graph computes; (2) the canonical
    JSON (sorted keys, no whitespace) of every metadata entry, with the ``rnnd.bundle`` document
    parsed and its ``content_hash`` field left out. Metadata is hashed as parsed JSON rather than
    as stored text because the hash lives inside the document it covers: leaving out one field of
    a parsed object is exact, cutting it out of text is not. It also means that re-saving a file
    with another JSON formatter is not a change, while any change in meaning (an input mean, a
    label, a learned initial state, an added field) is. Other metadata keys are covered too:
    nothing in a bundle may change unnoticed.

    This detects change, not forgery: anyone with rnnd can re-seal an edited file. Sign or
    checksum bundles in the registry that ships them when that matters.
    """
    from onnx import ModelProto

    body = ModelProto()
    body.CopyFrom(model_proto)
    body.ClearField("metadata_props")
    meta: dict[str, Any] = {}
    for key, value in metadata_entries(model_proto).items():
        if key == METADATA_KEY:
            doc = _parse_document(value, "bundle")
            doc.pop("content_hash", None)
            meta[key] = doc
        else:
            meta[key] = value
    parts = (body.SerializeToString(deterministic=True),
             json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())
    h = hashlib.sha256(_CONTENT_HASH_DOMAIN)
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def metadata_entries(model_proto: Any, source: str = "model") -> dict[str, str]:
    """The model's metadata as a dict; a key stored twice is refused.

    ONNX Runtime keeps one of the two values and nothing says which: the daemon could then serve
    a document other than the one that was checked.
    """
    out: dict[str, str] = {}
    for p in model_proto.metadata_props:
        if p.key in out:
            raise BundleIntegrityError(
                f"{source} holds the metadata key {p.key!r} twice, so it was modified after export: "
                "re-export it with rnnd export")
        out[p.key] = p.value
    return out


def _parse_document(text: str, source: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{source} metadata is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{source} metadata must be a JSON object")
    return doc


def attach(model_proto: Any, spec: BundleSpec) -> BundleSpec:
    """Write ``spec`` into an ``onnx.ModelProto`` (replacing an older one) and seal the result.

    Returns ``spec`` with the content hash of the model as it now is. Anything changed in the
    model afterwards breaks the seal, so this is the last step before the file is written.
    """
    model_proto.doc_string = f"rnnd bundle {spec.model.ref}: {spec.model.description}".strip()
    model_proto.producer_name = "rnnd"
    props = [p for p in model_proto.metadata_props if p.key != METADATA_KEY]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(props)
    entry = model_proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = dataclasses.replace(spec, content_hash="").to_json()
    sealed = dataclasses.replace(spec, content_hash=content_hash(model_proto))
    entry.value = sealed.to_json()
    return sealed


def embed_graph(model_proto: Any, key: str, graph: bytes) -> None:
    """Store a second ONNX model (serialised) in the bundle's metadata under ``key``; before ``attach``."""
    entry = model_proto.metadata_props.add()
    entry.key = key
    entry.value = base64.b64encode(graph).decode()


def embedded_graph(metadata: Mapping[str, str], key: str, source: str = "model") -> bytes:
    """The ONNX model stored under ``key`` (see ``embed_graph``)."""
    if key not in metadata:
        raise BundleError(f"{source} names the graph {key!r} in its metadata but does not hold it: re-export it")
    try:
        return base64.b64decode(metadata[key], validate=True)
    except ValueError:
        raise BundleError(f"{source}: the graph {key!r} is not base64: re-export it") from None


def declared_precision(data: bytes) -> str:
    """The precision a bundle's metadata declares, read before ONNX Runtime sees the graph (an fp16
    recurrent op crashes its CPU provider's session creation); "fp32" if it cannot be read, and then
    the checks that follow say what is wrong with the file."""
    try:
        doc = json.loads(metadata_entries(load_proto(data))[METADATA_KEY])
        precision = doc.get("precision", "fp32")
    except Exception:  # any unreadable file: the loader's own checks name the problem
        return "fp32"
    return precision if isinstance(precision, str) else "fp32"


def spec_from_metadata(metadata: Mapping[str, str], source: str = "model") -> BundleSpec:
    """The spec, without the integrity check: for tools that only show what a file claims."""
    if METADATA_KEY not in metadata:
        raise BundleError(
            f"{source} is an ONNX model but not an rnnd bundle (no {METADATA_KEY!r} metadata); "
            "create bundles with `rnnd export`"
        )
    return BundleSpec.from_json(metadata[METADATA_KEY])


def verified_spec(model_proto: Any, source: str = "model") -> BundleSpec:
    """The spec of a bundle whose content hash matches: the one gate every reader goes through.

    The hash is checked before the document is validated, so an edited file is reported as
    edited rather than by whichever field the edit happened to break.

    Format 1 bundles are refused, not accepted with a warning: their hash covers only the graph,
    so an edited input mean would pass, and accepting them would let anyone bypass the check by
    writing ``"format_version": 1`` into an edited document. Re-exporting costs one command; serving
    a silently changed model costs wrong predictions that look right.
    """
    metadata = metadata_entries(model_proto, source)
    if METADATA_KEY not in metadata:
        return spec_from_metadata(metadata, source)  # raises: not an rnnd bundle
    doc = _parse_document(metadata[METADATA_KEY], source)
    version = doc.get("format_version")
    if version == 1:
        raise BundleIntegrityError(
            f"{source} was exported by an older rnnd (bundle format 1), whose content hash does not cover "
            "the metadata, so changes to it cannot be detected: re-export it with rnnd export")
    if version == FORMAT_VERSION and doc.get("content_hash") != content_hash(model_proto):
        raise BundleIntegrityError(
            f"{source} was modified after export (its content hash does not match): re-export it with rnnd export")
    return BundleSpec.from_json(metadata[METADATA_KEY])  # other versions: refused there, with advice


def load_proto(data: bytes, source: str = "model") -> Any:
    """Parse a bundle's bytes with onnx (for hashing; ONNX Runtime runs the same bytes)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{source} is not an ONNX model: {first}") from None


def read_bytes(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: no such file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise BundleError(f"{path}: cannot read it: {e.strerror or e}") from None


def read_spec(path: str | Path) -> BundleSpec:
    """Read a bundle's verified spec without running it (and without torch)."""
    return verified_spec(load_proto(read_bytes(path), str(path)), str(path))


# --- dataclass construction from plain JSON ------------------------------------------------------

_NESTED: dict[str, type] = {}


def from_plain(cls: type, doc: Mapping[str, Any]) -> Any:
    """Construct a (nested) frozen dataclass from json.loads output, tuples for lists."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(doc) - set(known)
    if unknown:
        raise TypeError(f"unknown field(s) {sorted(unknown)} in {cls.__name__}")
    kwargs: dict[str, Any] = {}
    for name, value in doc.items():
        sub = _NESTED.get(f"{cls.__name__}.{name}")
        if value is None:
            kwargs[name] = None
        elif sub is not None and isinstance(value, list):
            kwargs[name] = tuple(from_plain(sub, v) for v in value)
        elif sub is not None:
            kwargs[name] = from_plain(sub, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


_NESTED.update({
    "BundleSpec.model": ModelInfo,
    "BundleSpec.input": InputSpec,
    "BundleSpec.output": OutputSpec,
    "BundleSpec.states": StateSpec,
    "StateSpec.init_random": RandomInit,
    "BundleSpec.start": ContextStart,
    "BundleSpec.seq2seq": Seq2SeqSpec,
    "Seq2SeqSpec.states": StateSpec,
    "BundleSpec.parity": ParityReport,
    "BundleSpec.self_check": SelfCheck,
    "BundleSpec.provenance": Provenance,
    "InputSpec.tokenizer": TokenizerSpec,
    "ParityReport.cases": ParityCase,
})
