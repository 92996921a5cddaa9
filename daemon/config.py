"""`rnnd serve` settings: one typed object, loaded from a TOML file, RNND_* env vars and flags.

Precedence, highest first: command-line flag > environment variable > config file > default.
Every field below is all three: ``--max-batch 512``, ``RNND_MAX_BATCH=512``, ``max_batch = 512``.
The table in docs/configuration.md is generated from these fields (``rnnd serve --print-config-docs``),
and a test keeps it in sync.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from . import security

ENV_PREFIX = "RNND_"


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names it and its three spellings."""

    exit_code = 2


def opt(default: Any, help: str, *, choices: Sequence[str] | None = None, secret: bool = False,
        required: bool = False) -> Any:
    """A setting. ``secret=True``: shown as ``***`` by ``redacted()``, and left out of ``repr``
    so that logging the config object, or a traceback that shows it, cannot leak it."""
    return field(default=default, repr=not secret,
                 metadata={"help": help, "choices": choices, "secret": secret, "required": required})


@dataclass(frozen=True)
class ServeConfig:
    # --- what to serve, and where ---
    model: str = opt("", "Path of the bundle (.onnx) written by `rnnd export`.", required=True)
    bootstrap_servers: str = opt("localhost:9092", "Kafka bootstrap servers, comma-separated.")
    input_topic: str = opt("", "Topic of input steps, keyed by stream key.", required=True)
    output_topic: str = opt("", "Topic predictions are written to, keyed by stream key.", required=True)
    dead_letter_topic: str = opt("", "Topic for unusable messages (default: <input_topic>.dlq).")
    group_id: str = opt("", "Consumer group; replicas of one deployment share it (default: rnnd-<model name>).")
    client_id: str = opt("rnnd", "Kafka client id prefix (shows in broker logs and quotas).")
    create_topics: bool = opt(True, "Create missing output/dead-letter topics (same partition count as input).")
    # --- model execution ---
    provider: str = opt("cpu", "Execution provider: cpu, cuda[:N] or tensorrt[:N].")
    provider_fallback: bool = opt(False, "If the provider is unavailable, run on CPU (logged, and labelled in "
                                         "rnnd_model_info) instead of refusing to start.")
    intra_op_threads: int = opt(0, "ONNX Runtime intra-op threads (0: ONNX Runtime's default).")
    ort_spinning: bool = opt(False, "Let ONNX Runtime's threads busy-wait between calls (slightly lower latency; "
                                    "an idle daemon then keeps its cores busy).")
    # --- batching ---
    max_batch: int = opt(1024, "Most streams advanced in one model call.")
    max_chunk: int = opt(64, "Most steps of one stream run in one call (T); a backlog runs as chunks.")
    max_wait_ms: float = opt(0.0, "How long a step may wait for company when the model is idle "
                                  "(0: never; the batch grows while the model is busy).")
    min_batch: int = opt(1, "With max_wait_ms > 0: run as soon as this many streams are ready.")
    # --- streams ---
    max_streams: int = opt(100_000, "Streams kept in memory; beyond it the least recently used is evicted.")
    stream_ttl_s: float = opt(3600.0, "A stream idle this long is evicted (0: never).")
    warmup: str = opt("mark", "Predictions in a stream's warm-up steps: mark (warmup=true) or hold (not emitted).",
                      choices=("mark", "hold"))
    emit: str = opt("every", "Which steps emit a prediction: every, every:N (every Nth step of a stream), "
                             "or end (only on an end control).")
    # --- input validation ---
    non_finite: str = opt("reject", "NaN/inf in numeric input: reject (dead letter) or zero (replace by the "
                                    "feature mean).", choices=("reject", "zero"))
    max_text_tokens: int = opt(512, "Longest text (in tokens) one message may carry.")
    max_steps_per_message: int = opt(4096, "Most steps one message may carry.")
    # --- outputs ---
    top_k: int = opt(5, "Classification: labels with probabilities in each output; language models: next tokens.")
    forecast_horizon: int = opt(0, "Regression models that predict their next input: also forecast this many "
                                   "steps ahead at every step (0: off).")
    generate_tokens: int = opt(0, "Language models: also generate this many next tokens at every step (0: off).")
    generate_strategy: str = opt("greedy", "Generation: greedy or topk (sampled from the top_k tokens).",
                                 choices=("greedy", "topk"))
    generate_seed: int = opt(0, "Seed for topk generation (with the prediction id: reproducible).")
    # --- durable state ---
    changelog: bool = opt(True, "Keep every stream's state in a compacted changelog topic, restored on "
                                "assignment: crashes, restarts and rebalances lose no state.")
    changelog_topic: str = opt("", "State changelog topic (default: <group_id>.<input_topic>.changelog).")
    on_state_mismatch: str = opt("refuse", "When the changelog holds state of another state layout (a model whose "
                                           "state-spec hash differs): refuse to start, reset the streams, or serve "
                                           "them with previous_model.", choices=("refuse", "reset", "previous"))
    previous_model: str = opt("", "With on_state_mismatch=previous: the bundle whose state the changelog holds.")
    # --- Kafka client behaviour ---
    fetch_max_records: int = opt(10_000, "Most records taken from Kafka in one fetch.")
    fetch_max_wait_ms: int = opt(20, "How long the broker may hold a fetch waiting for data. Low keeps live "
                                     "latency low (aiokafka's 500 ms default dominated p99 in docs/benchmarks.md).")
    max_inflight_steps: int = opt(200_000, "Decoded steps waiting for the model before fetching pauses.")
    commit_interval_s: float = opt(1.0, "How often outputs are flushed and input offsets committed.")
    linger_ms: int = opt(5, "Producer linger: time to fill a batch of outputs.")
    compression: str = opt("none", "Output compression: none, gzip, snappy, lz4, zstd.",
                           choices=("none", "gzip", "snappy", "lz4", "zstd"))
    session_timeout_ms: int = opt(10_000, "Consumer group session timeout.")
    # --- Kafka security ---
    security_protocol: str = opt("PLAINTEXT", "How to connect to Kafka: PLAINTEXT, SSL (TLS), SASL_SSL (TLS and a "
                                              "SASL login) or SASL_PLAINTEXT (a SASL login without encryption; "
                                              "needs sasl_allow_plaintext).", choices=security.PROTOCOLS)
    ssl_cafile: str = opt("", "TLS: CA certificates (PEM) that signed the brokers' certificates (default: the "
                              "system's CAs).")
    ssl_certfile: str = opt("", "TLS client authentication: this client's certificate (PEM); needs ssl_keyfile.")
    ssl_keyfile: str = opt("", "TLS client authentication: the private key (PEM) of ssl_certfile.")
    ssl_password: str = opt("", "Password of an encrypted ssl_keyfile (or ssl_password_file).", secret=True)
    ssl_password_file: str = opt("", "File holding the password of ssl_keyfile, e.g. a mounted secret (a trailing "
                                     "newline is ignored).")
    ssl_check_hostname: bool = opt(True, "TLS: check that a broker's certificate names the host connected to "
                                         "(the certificate is verified against the CA either way).")
    sasl_mechanism: str = opt("", "SASL: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with security_protocol SASL_SSL "
                                  "or SASL_PLAINTEXT).")
    sasl_username: str = opt("", "SASL user name.")
    sasl_password: str = opt("", "SASL password; prefer RNND_SASL_PASSWORD from a secret or sasl_password_file "
                                 "(a flag shows in `ps`).", secret=True)
    sasl_password_file: str = opt("", "File holding the SASL password, e.g. a mounted secret (a trailing newline "
                                      "is ignored).")
    sasl_allow_plaintext: bool = opt(False, "Accept security_protocol SASL_PLAINTEXT: a SASL login on an "
                                            "unencrypted connection (PLAIN then sends the password in clear text). "
                                            "Logged as a warning.")
    # --- operations ---
    http_host: str = opt("0.0.0.0", "Bind address of /metrics, /healthz and /readyz.")
    http_port: int = opt(9100, "Port of /metrics, /healthz and /readyz (0: pick a free port).")
    log_format: str = opt("text", "Log lines as text or json.", choices=("text", "json"))
    log_level: str = opt("info", "debug, info, warning or error.", choices=("debug", "info", "warning", "error"))
    event_loop: str = opt("asyncio", "asyncio's event loop: asyncio (the standard one) or uvloop (libuv; pip install "
                                     "'rnnd[uvloop]'). No difference beyond noise on docs/benchmarks.md.",
                          choices=("asyncio", "uvloop"))
    gc_threshold: int = opt(10_000, "Allocations between Python's young-generation garbage collections. Python's "
                                    "default, 700, costs ~4 µs per message; 50,000 is a little faster but pauses "
                                    "10-25 ms per collection (rnnd_gc_pause_seconds; docs/benchmarks.md). 0 keeps "
                                    "Python's setting.")

    # --- derived ---------------------------------------------------------------------------
    @property
    def dlq_topic(self) -> str:
        return self.dead_letter_topic or f"{self.input_topic}.dlq"

    @property
    def emit_every(self) -> int:
        """1 for every step, N for every:N, 0 for end only."""
        return _parse_emit(self.emit)

    def validate(self) -> ServeConfig:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("required") and value in ("", None):
                raise ConfigError(f"{f.name} is required: {spellings(f.name)}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, not {value!r}")
        if not re.fullmatch(r"(cpu|cuda(:\d+)?|tensorrt(:\d+)?)", self.provider):
            raise ConfigError(f"provider must be cpu, cuda[:N] or tensorrt[:N], not {self.provider!r}")
        _parse_emit(self.emit)
        for name in ("max_batch", "max_chunk", "max_streams", "fetch_max_records", "max_inflight_steps",
                     "min_batch", "max_text_tokens", "max_steps_per_message"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        for name in ("fetch_max_wait_ms", "max_wait_ms", "stream_ttl_s", "forecast_horizon", "generate_tokens", "top_k",
                     "intra_op_threads", "http_port", "gc_threshold"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if self.commit_interval_s <= 0:
            raise ConfigError("commit_interval_s must be > 0")
        try:
            security.check(security.KafkaSecurity.from_settings(self))
        except security.SecurityError as e:
            raise ConfigError(str(e)) from None
        return self

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict for logs, secrets replaced."""
        return {f.name: ("***" if f.metadata.get("secret") and getattr(self, f.name) else getattr(self, f.name))
                for f in fields(self)}


def _parse_emit(value: str) -> int:
    if value == "every":
        return 1
    if value == "end":
        return 0
    m = re.fullmatch(r"every:(\d+)", value)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    raise ConfigError(f"emit must be every, every:N (N >= 1) or end, not {value!r}")


def spellings(name: str) -> str:
    return f"--{name.replace('_', '-')}, {ENV_PREFIX}{name.upper()} or `{name}` in the config file"


# --- loading ---------------------------------------------------------------------------------


def _types() -> dict[str, type]:
    return get_type_hints(ServeConfig)


def _coerce(name: str, raw: Any, typ: type, source: str) -> Any:
    if get_origin(typ) is not None:
        typ = next(t for t in get_args(typ) if t is not type(None))
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        # TOML values are typed: `max_batch = true` is not 1, and `input_topic = 5` is not a topic name.
        if isinstance(raw, bool) or (typ is str and isinstance(raw, (int, float, list, dict))):
            raise ValueError(raw)
        if typ is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError(raw)
        value = typ(raw)
        if typ is float and not math.isfinite(value):
            raise ValueError(raw)  # nan passes every `< 0` check in validate()
        return value
    except (TypeError, ValueError):
        shown = "a value not shown here (a secret)" if _is_secret(name) else repr(raw)
        raise ConfigError(f"{name} from {source} must be {typ.__name__}, got {shown}") from None


def _is_secret(name: str) -> bool:
    """Secrets never appear in an error message, not even a mistyped one (it may be the real one)."""
    return any(f.name == name and f.metadata.get("secret") for f in fields(ServeConfig))


def load(
    argv_values: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> ServeConfig:
    """Defaults < file < env < flags. ``argv_values`` holds only flags the user actually gave."""
    env = os.environ if env is None else env
    types = _types()
    values: dict[str, Any] = {}
    path = config_file or env.get(f"{ENV_PREFIX}CONFIG")
    if path:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        if "serve" in doc:  # a [serve] table or top-level keys, not both (nothing is silently ignored)
            others = sorted(k for k in doc if k != "serve")
            if not isinstance(doc["serve"], dict):
                raise ConfigError(f"config file {path}: `serve` must be a table ([serve]) of settings")
            if others:
                raise ConfigError(f"config file {path}: settings both at top level ({', '.join(others)}) and in "
                                  "[serve]; put them all in one place")
            doc = doc["serve"]
        for key, raw in doc.items():
            name = key.replace("-", "_")
            if name not in types:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[name] = _coerce(name, raw, types[name], f"config file {path}")
    for name, typ in types.items():
        raw = env.get(f"{ENV_PREFIX}{name.upper()}")
        if raw is not None:
            values[name] = _coerce(name, raw, typ, f"{ENV_PREFIX}{name.upper()}")
    for name, raw in (argv_values or {}).items():
        if raw is not None:
            values[name] = _coerce(name, raw, types[name], f"--{name.replace('_', '-')}")
    return ServeConfig(**values).validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are None so that unset flags do not override env/file."""
    parser.add_argument("--config", help="TOML config file (or RNND_CONFIG); keys as the flags, with underscores")
    types = _types()
    for f in fields(ServeConfig):
        flag = f"--{f.name.replace('_', '-')}"
        help_text = f"{f.metadata['help']} [env {ENV_PREFIX}{f.name.upper()}; default {f.default!r}]"
        if types[f.name] is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServeConfig:
    given = {f.name: getattr(args, f.name, None) for f in fields(ServeConfig)}
    return load(given, env=env, config_file=getattr(args, "config", None))


def docs_table() -> str:
    """The Markdown table in docs/configuration.md."""
    types = _types()
    rows = ["| setting (file) | flag | environment | type | default | meaning |", "|---|---|---|---|---|---|"]
    for f in fields(ServeConfig):
        default = "*(required)*" if f.metadata.get("required") else f"`{f.default!r}`"
        typ = types[f.name].__name__
        choices = f.metadata.get("choices")
        if choices:
            typ = " \\| ".join(choices)
        rows.append(f"| `{f.name}` | `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` | {typ} | "
                    f"{default} | {f.metadata['help']} |")
    return "\n".join(rows)


def replace(cfg: ServeConfig, **changes: Any) -> ServeConfig:
    return dataclasses.replace(cfg, **changes).validate()
