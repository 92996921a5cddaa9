"""`rnnd serve` settings: one typed object, loaded from a TOML file, RNND_* env vars and flags.

Precedence, highest first: command-line flag > environment variable > config file > default.
Every field below is all three: ``--max-batch 512``, ``RNND_MAX_BATCH=512``, ``max_batch = 512``.
The table in docs/configuration.md is generated from these fields (``rnnd serve --print-config-docs``),
and a test keeps it in sync.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from . import security
from .errors import ConfigError

ENV_PREFIX = "RNND_"

#: ``RNND_*`` environment variables that are not settings but are still rnnd's. Any other
#: ``RNND_*`` variable is refused as a typo (``RNND_MAX_BACTH``), as an unknown key of the
#: config file is: otherwise the setting it meant would silently keep its default.
ENV_NOT_SETTINGS = {
    f"{ENV_PREFIX}CONFIG": "the config file, as --config",
    f"{ENV_PREFIX}DEBUG": "set by --debug: tracebacks, and `rnnd export` shows the exporter's own output",
    f"{ENV_PREFIX}TEST_BOOTSTRAP": "the test suite's Kafka (tests/kafka_fixtures.py)",
}

#: Kafka's rule for topic names (kafka.common.internals.Topic): at most 249 of these characters.
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_TOPIC_RULE = "1 to 249 characters of a-z, A-Z, 0-9, '.', '_' and '-', and not '.' or '..'"
_INT32 = 2**31 - 1  # Kafka's int32 protocol fields, and C ints (gc thresholds, ONNX Runtime threads)


def opt(default: Any, help: str, *, choices: Sequence[str] | None = None, secret: bool = False,
        required: bool = False, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A setting. ``secret=True``: shown as ``***`` by ``redacted()``, and left out of ``repr``
    so that logging the config object, or a traceback that shows it, cannot leak it.

    Numbers carry their range (``ge``/``gt`` and ``le``): ``validate()`` refuses a value outside
    it, and the docs table shows it, so that a value the daemon cannot use stops it at start
    rather than failing deep inside Kafka's client or ONNX Runtime later.
    """
    return field(default=default, repr=not secret,
                 metadata={"help": help, "choices": choices, "secret": secret, "required": required,
                           "ge": ge, "gt": gt, "le": le})


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
    intra_op_threads: int = opt(0, "ONNX Runtime intra-op threads (0: ONNX Runtime's default).", ge=0, le=1024)
    ort_spinning: bool = opt(False, "Let ONNX Runtime's threads busy-wait between calls (slightly lower latency; "
                                    "an idle daemon then keeps its cores busy).")
    # --- batching ---
    max_batch: int = opt(1024, "Most streams advanced in one model call.", ge=1, le=1 << 20)
    max_chunk: int = opt(64, "Most steps of one stream run in one call (T); a backlog runs as chunks.", ge=1,
                          le=1 << 16)
    max_wait_ms: float = opt(0.0, "How long a step may wait for company when the model is idle "
                                  "(0: never; the batch grows while the model is busy).", ge=0, le=60_000)
    min_batch: int = opt(1, "With max_wait_ms > 0: run as soon as this many streams are ready (at most max_batch).",
                         ge=1, le=1 << 20)
    # --- streams ---
    max_streams: int = opt(100_000, "Streams kept in memory; beyond it the least recently used is evicted.", ge=1,
                           le=100_000_000)
    stream_ttl_s: float = opt(3600.0, "A stream idle this long is evicted (0: never).", ge=0)
    warmup: str = opt("mark", "Predictions in a stream's warm-up steps: mark (warmup=true) or hold (not emitted).",
                      choices=("mark", "hold"))
    emit: str = opt("every", "Which steps emit a prediction: every, every:N (every Nth step of a stream), "
                             "or end (only on an end control).")
    # --- input validation ---
    non_finite: str = opt("reject", "NaN/inf in numeric input: reject (dead letter) or zero (replace by the "
                                    "feature mean).", choices=("reject", "zero"))
    max_text_tokens: int = opt(512, "Longest text (in tokens) one message may carry.", ge=1, le=1 << 20)
    max_steps_per_message: int = opt(4096, "Most steps one message may carry.", ge=1, le=1 << 20)
    max_key_bytes: int = opt(4096, "Longest record key (the stream key) in bytes; a longer one is a dead letter "
                                   "(key_too_long): state is indexed by the key and every prediction carries it.",
                             ge=1, le=1 << 20)
    # --- outputs ---
    top_k: int = opt(5, "Classification: labels with probabilities in each output; language models: next tokens.",
                     ge=0, le=_INT32)
    forecast_horizon: int = opt(0, "Regression models that predict their next input: also forecast this many "
                                   "steps ahead at every step (0: off).", ge=0, le=1 << 16)
    generate_tokens: int = opt(0, "Language models: also generate this many next tokens at every step (0: off).",
                               ge=0, le=1 << 16)
    generate_strategy: str = opt("greedy", "Generation: greedy or topk (sampled from the top_k tokens).",
                                 choices=("greedy", "topk"))
    generate_seed: int = opt(0, "Seed for topk generation (with the prediction id: reproducible).", ge=0,
                             le=2**64 - 1)
    # --- durable state ---
    changelog: bool = opt(True, "Keep every stream's state in a compacted changelog topic, restored on "
                                "assignment: crashes, restarts and rebalances lose no state.")
    changelog_topic: str = opt("", "State changelog topic (default: <group_id>.<input_topic>.changelog).")
    on_state_mismatch: str = opt("refuse", "When the changelog holds state of another state layout (a model whose "
                                           "state-spec hash differs): refuse to start, reset the streams, or serve "
                                           "them with previous_model.", choices=("refuse", "reset", "previous"))
    previous_model: str = opt("", "With on_state_mismatch=previous: the bundle whose state the changelog holds.")
    # --- Kafka client behaviour ---
    fetch_max_records: int = opt(10_000, "Most records taken from Kafka in one fetch.", ge=1, le=_INT32)
    fetch_max_wait_ms: int = opt(20, "How long the broker may hold a fetch waiting for data. Low keeps live "
                                     "latency low (aiokafka's 500 ms default dominated p99 in docs/benchmarks.md); "
                                     "below the consumer's 40 s request timeout.", ge=0, le=30_000)
    max_inflight_steps: int = opt(200_000, "Decoded steps waiting for the model before fetching pauses.", ge=1,
                                  le=_INT32)
    commit_interval_s: float = opt(1.0, "How often outputs are flushed and input offsets committed.", gt=0,
                                   le=3600)
    linger_ms: int = opt(5, "Producer linger: time to fill a batch of outputs (below the producer's 30 s request "
                            "timeout).", ge=0, le=30_000)
    compression: str = opt("none", "Output compression: none, gzip, snappy, lz4, zstd.",
                           choices=("none", "gzip", "snappy", "lz4", "zstd"))
    session_timeout_ms: int = opt(10_000, "Consumer group session timeout (heartbeats every third of it, at least "
                                          "every second; Kafka's brokers accept 6000 to 1800000 by default).",
                                  ge=2000, le=1_800_000)
    broker_unreachable_s: float = opt(10.0, "/readyz answers 503 once no broker has answered for this long: longer "
                                            "than a leader election or one broker's restart, short enough for a "
                                            "load balancer or autoscaler to notice an outage.", gt=0)
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
    http_port: int = opt(9100, "Port of /metrics, /healthz and /readyz (0: pick a free port).", ge=0, le=65535)
    log_format: str = opt("text", "Log lines as text or json.", choices=("text", "json"))
    log_level: str = opt("info", "debug, info, warning or error.", choices=("debug", "info", "warning", "error"))
    event_loop: str = opt("asyncio", "asyncio's event loop: asyncio (the standard one) or uvloop (libuv; pip install "
                                     "'rnnd[uvloop]'). No difference beyond noise on docs/benchmarks.md.",
                          choices=("asyncio", "uvloop"))
    gc_threshold: int = opt(10_000, "Allocations between Python's young-generation garbage collections. Python's "
                                    "default, 700, costs ~4 µs per message; 50,000 is a little faster but pauses "
                                    "10-25 ms per collection (rnnd_gc_pause_seconds; docs/benchmarks.md). 0 keeps "
                                    "Python's setting.", ge=0, le=_INT32)

    # --- derived ---------------------------------------------------------------------------
    @property
    def dlq_topic(self) -> str:
        return self.dead_letter_topic or f"{self.input_topic}.dlq"

    @property
    def emit_every(self) -> int:
        """1 for every step, N for every:N, 0 for end only."""
        return _parse_emit(self.emit)

    def validate(self) -> ServeConfig:
        """Refuse, up front, every value and combination the daemon could not use or would ignore.

        Each refusal names the setting, the value and what is allowed: a setting that is
        silently ignored (a combination with no effect) or fails later (a port beyond 65535, a
        topic name Kafka refuses, which a broker reports as a missing topic) costs an operator
        far more than an error at start.
        """
        types = _types()
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("required") and value in ("", None):
                raise ConfigError(f"{f.name} is required: {spellings(f.name)}")
            typ = types[f.name]
            if type(value) is not typ and not (typ is float and type(value) is int):
                raise ConfigError(f"{f.name} must be {typ.__name__}, not {_shown(f.name, value)}", f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, not {value!r}", f.name)
            if not _in_range(f.metadata, value):
                raise ConfigError(f"{f.name} must be {_range_text(f.metadata)}, not {value!r}", f.name)
        if not re.fullmatch(r"(cpu|cuda(:\d+)?|tensorrt(:\d+)?)", self.provider):
            raise ConfigError(f"provider must be cpu, cuda[:N] or tensorrt[:N], not {self.provider!r}", "provider")
        _parse_emit(self.emit)
        _check_bootstrap(self.bootstrap_servers)
        self._validate_combinations()
        self._validate_topics()
        try:
            security.check(security.KafkaSecurity.from_settings(self))
        except security.SecurityError as e:
            raise ConfigError(str(e)) from None
        return self

    def _validate_combinations(self) -> None:
        """Settings that only act together with another: alone they would be silently ignored."""
        if self.min_batch > self.max_batch:
            raise ConfigError(f"min_batch must be at most max_batch ({self.max_batch}), not {self.min_batch}: a "
                              "call never holds more than max_batch streams", "min_batch")
        if self.min_batch != 1 and not self.max_wait_ms:
            raise ConfigError(f"min_batch must be 1 when max_wait_ms is 0, not {self.min_batch}: it only says when "
                              "to stop waiting; set max_wait_ms too", "min_batch")
        if not self.generate_tokens:
            for name, default in (("generate_strategy", "greedy"), ("generate_seed", 0)):
                if getattr(self, name) != default:
                    raise ConfigError(f"{name} must be left at {default!r} when generate_tokens is 0, not "
                                      f"{getattr(self, name)!r}: nothing is generated; set generate_tokens too", name)
        elif self.generate_seed and self.generate_strategy == "greedy":
            raise ConfigError(f"generate_seed must be 0 with generate_strategy greedy, not {self.generate_seed}: "
                              "greedy generation draws nothing; set generate_strategy = \"topk\"", "generate_seed")
        if not self.changelog:
            for name, default in (("changelog_topic", ""), ("on_state_mismatch", "refuse")):
                if getattr(self, name) != default:
                    raise ConfigError(f"{name} must be left at {default!r} when changelog is false, not "
                                      f"{getattr(self, name)!r}: without a changelog there is no state to restore",
                                      name)
        if self.previous_model and self.on_state_mismatch != "previous":
            raise ConfigError(f"previous_model must be empty unless on_state_mismatch is previous (it is "
                              f"{self.on_state_mismatch}), not {self.previous_model!r}", "previous_model")
        if self.on_state_mismatch == "previous" and not self.previous_model:
            raise ConfigError("on_state_mismatch=previous needs previous_model (the bundle whose state the "
                              "changelog holds)", "on_state_mismatch")

    def _validate_topics(self) -> None:
        """Legal Kafka names, and no topic doing two jobs (the daemon would read what it writes)."""
        for name in ("input_topic", "output_topic", "dead_letter_topic", "changelog_topic"):
            value = getattr(self, name)
            if value or name in ("input_topic", "output_topic"):
                check_topic_name(name, value)
        if not self.dead_letter_topic:
            check_topic_name("dead_letter_topic", self.dlq_topic, derived="<input_topic>.dlq")
        _check_distinct([("input_topic", self.input_topic), ("output_topic", self.output_topic),
                         ("dead_letter_topic", self.dlq_topic)])
        if self.changelog and (self.changelog_topic or self.group_id):
            from .changelog import topic_name  # here: changelog needs numpy, which loading settings does not

            self.check_changelog_topic(self.changelog_topic or topic_name(self.group_id, self.input_topic))

    def check_changelog_topic(self, topic: str) -> str:
        """The changelog topic, once its name is known (by default it is derived from the model's name).

        ``validate()`` checks it when ``changelog_topic`` or ``group_id`` is set; otherwise the
        daemon calls this after loading the bundle.
        """
        if self.changelog:
            check_topic_name("changelog_topic", topic,
                             derived="" if self.changelog_topic else "<group_id>.<input_topic>.changelog")
            _check_distinct([("input_topic", self.input_topic), ("output_topic", self.output_topic),
                             ("dead_letter_topic", self.dlq_topic), ("changelog_topic", topic)])
        return topic

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict for logs, secrets replaced."""
        return {f.name: ("***" if f.metadata.get("secret") and getattr(self, f.name) else getattr(self, f.name))
                for f in fields(self)}


_ROLES = {"input_topic": "it reads", "output_topic": "predictions", "dead_letter_topic": "dead letters",
          "changelog_topic": "stream state"}


def check_topic_name(setting: str, topic: str, derived: str = "") -> None:
    """Kafka's rule, checked here: a broker answers an illegal name as if the topic did not exist."""
    if _TOPIC_NAME.fullmatch(topic) and topic not in (".", ".."):
        return
    shown = repr(topic) if len(topic) <= 80 else f"{topic[:60]!r}... ({len(topic)} characters)"
    if derived:
        raise ConfigError(f"{setting} is {derived} = {shown}, not a legal Kafka topic name ({_TOPIC_RULE}): set "
                          f"{setting}", setting)
    raise ConfigError(f"{setting} must be a legal Kafka topic name ({_TOPIC_RULE}), not {shown}", setting)


def _check_distinct(roles: list[tuple[str, str]]) -> None:
    for i, (name, topic) in enumerate(roles):
        for other, other_topic in roles[:i]:
            if topic == other_topic:
                what = ("the daemon would read its own " + _ROLES[name]) if other == "input_topic" else \
                    f"{_ROLES[other]} and {_ROLES[name]} would be mixed in one topic"
                raise ConfigError(f"{name} must differ from {other}, not {topic!r} too: {what}", name)


def _check_bootstrap(servers: str) -> None:
    """host[:port] entries: a port beyond 65535 would otherwise be retried forever as "unreachable"."""
    entries = [e.strip() for e in servers.split(",")]
    for entry in entries:
        m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\s:\[\]/]+)(?::(\d+))?", entry)
        if not m or (m.group(2) is not None and not 1 <= int(m.group(2)) <= 65535):
            raise ConfigError(f"bootstrap_servers must be comma-separated host[:port] entries with ports 1 to 65535, "
                              f"not {servers!r}", "bootstrap_servers")


def _in_range(meta: Mapping[str, Any], value: Any) -> bool:
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    return not ((ge is not None and value < ge) or (gt is not None and value <= gt)
                or (le is not None and value > le))


def _range_text(meta: Mapping[str, Any]) -> str:
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if le is None:
        return f">= {ge}" if gt is None else f"> {gt}"
    if gt is not None:
        return f"> {gt} and <= {le}"
    return f"between {ge} and {le}"


def _shown(name: str, value: Any) -> str:
    return "a value not shown here (a secret)" if _is_secret(name) else repr(value)


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
    check_environment(env)
    types = _types()
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # where each value came from, for the error message
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
            sources[name] = f"config file {path}"
            values[name] = _coerce(name, raw, types[name], sources[name])
    for name, typ in types.items():
        raw = env.get(f"{ENV_PREFIX}{name.upper()}")
        if raw is not None:
            sources[name] = f"{ENV_PREFIX}{name.upper()}"
            values[name] = _coerce(name, raw, typ, sources[name])
    for name, raw in (argv_values or {}).items():
        if raw is not None:
            sources[name] = f"--{name.replace('_', '-')}"
            values[name] = _coerce(name, raw, types[name], sources[name])
    try:
        return ServeConfig(**values).validate()
    except ConfigError as e:
        msg, name = str(e), e.setting
        if name in sources and msg.startswith(f"{name} "):  # "http_port from RNND_HTTP_PORT must be ..."
            raise ConfigError(f"{name} from {sources[name]}{msg[len(name):]}", name) from None
        raise


def check_environment(env: Mapping[str, str]) -> None:
    """Refuse ``RNND_*`` variables that are not settings, naming the closest one.

    A mistyped variable would otherwise leave its setting at the default without a word,
    where a mistyped key of the config file is already an error. Values are never shown:
    a mistyped ``RNND_SASL_PASWORD`` holds a password.
    """
    names = {f.name for f in fields(ServeConfig)}
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in ENV_NOT_SETTINGS
                     and k.removeprefix(ENV_PREFIX) not in {n.upper() for n in names})
    if not unknown:
        return
    known = sorted(n.upper() for n in names) + [k.removeprefix(ENV_PREFIX) for k in ENV_NOT_SETTINGS]
    parts = []
    for var in unknown:
        close = difflib.get_close_matches(var.removeprefix(ENV_PREFIX).upper(), known, n=1, cutoff=0.6)
        parts.append(f"{var} (did you mean {ENV_PREFIX}{close[0]}?)" if close else var)
    raise ConfigError(f"unknown environment variable{'s' if len(unknown) > 1 else ''} {', '.join(parts)}: not a "
                      f"setting of rnnd (docs/configuration.md lists them); rename or unset it")


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
        elif f.metadata.get("ge") is not None or f.metadata.get("gt") is not None:
            typ = f"{typ}, {_range_text(f.metadata).replace('>=', '≥').replace('<=', '≤')}"
        rows.append(f"| `{f.name}` | `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` | {typ} | "
                    f"{default} | {f.metadata['help']} |")
    return "\n".join(rows)


def replace(cfg: ServeConfig, **changes: Any) -> ServeConfig:
    return dataclasses.replace(cfg, **changes).validate()
