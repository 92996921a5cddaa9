"""`rnnd serve` settings: one typed object, loaded from a TOML file, RNND_* env vars and flags.

Precedence, highest first: command-line flag > environment variable > config file > default.
Every setting below is all three: ``--max-batch 512``, ``RNND_MAX_BATCH=512``, ``max_batch = 512``.
The Kafka security settings are declared once, by the security module, and composed here as
one block (``cfg.security``); they are spelled flat like every other setting. The loading
machinery (layering, coercion, the checks every declaration carries) is the settings module's;
this one holds what is particular to serving: the settings, and the rules between them.
The table in docs/configuration.md is generated from these declarations
(``rnnd serve --print-config-docs``), and a test keeps it in sync.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import names, settings
from .errors import ConfigError, SecurityError
from .security import KafkaSecurity
from .security import check as check_security
from .settings import ENV_NOT_SETTINGS, ENV_PREFIX, WORKER_ENV, opt, spellings

__all__ = ["ENV_NOT_SETTINGS", "ENV_PREFIX", "WORKER_ENV", "ConfigError", "ServeConfig", "add_arguments",
           "check_environment", "check_topic_name", "docs_table", "from_args", "load", "load_routes", "opt", "replace",
           "routes_from_args", "settings_of", "spellings"]

#: Kafka's rule for topic names (kafka.common.internals.Topic): at most 249 of these characters.
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_TOPIC_RULE = "1 to 249 characters of a-z, A-Z, 0-9, '.', '_' and '-', and not '.' or '..'"
_INT32 = 2**31 - 1  # Kafka's int32 protocol fields, and C ints (gc thresholds, ONNX Runtime threads)


@settings.flat_access
@dataclass(frozen=True)
class ServeConfig:
    # --- what to serve, and where ---
    model: str = opt("", "Path of the bundle (.onnx) written by `rnnd export`.", required=True)
    bootstrap_servers: str = opt("localhost:9092", "Kafka bootstrap servers, comma-separated.")
    input_topic: str = opt("", "Topic of input steps, keyed by stream key.", required=True)
    output_topic: str = opt("", "Topic predictions are written to, keyed by stream key.", required=True)
    dead_letter_topic: str = opt("", f"Topic for unusable messages (default: {names.DEAD_LETTER_RULE}).")
    group_id: str = opt("", "Consumer group; replicas of one deployment share it (default: rnnd-<model name>).")
    client_id: str = opt("rnnd", "Kafka client id prefix (shows in broker logs and quotas).")
    create_topics: bool = opt(True, "Create missing output/dead-letter topics (same partition count as input).")
    copy_headers: str = opt("traceparent,tracestate", "Input record headers copied to every output (and dead "
                            "letter) made from the record, comma-separated ('' for none): W3C trace context by "
                            "default, so that a trace continues through the model.")
    # --- model execution ---
    provider: str = opt("cpu", "Execution provider: cpu, cuda[:N] or tensorrt[:N].")
    provider_fallback: bool = opt(False, "If the provider is unavailable, run on CPU (logged, and labelled in "
                                         "rnnd_model_info) instead of refusing to start.")
    intra_op_threads: int = opt(0, "ONNX Runtime intra-op threads (0: ONNX Runtime's default).", ge=0, le=1024)
    ort_spinning: bool = opt(False, "Let ONNX Runtime's threads busy-wait between calls (slightly lower latency; "
                                    "an idle daemon then keeps its cores busy).")
    tensorrt_cache_dir: str = opt("", "provider tensorrt: a directory where TensorRT keeps the engines it builds "
                                      "for the bundle, so that a restart loads them instead of building them again "
                                      "(minutes for a large model). Empty: no cache.")
    device_state: bool = opt(False, "Keep every stream's state on the model's device (the GPU's memory), moved by "
                                    "small ONNX graphs run by the same provider, the model called with IO "
                                    "binding: per call only the input and the predictions cross to the host. "
                                    "Stateful bundles; not with forecasts or generation. On the CPU the same "
                                    "code runs, with identical results.")
    batch_buckets: bool = opt(False, "Pad each model call's batch to the next power of two (the padding rows are a "
                                     "spare slot's, their results dropped), so that the model sees few distinct "
                                     "shapes: what TensorRT's engines and CUDA's kernel choices are built for. "
                                     "Stateful bundles; not with forecasts or generation.")
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
    generate_at: str = opt("every", "Generation: after every step, or only at the end of each message (its last "
                                    "step: the continuation of a prompt read whole).", choices=("every", "end"))
    generate_strategy: str = opt("greedy", "Generation: greedy or topk (sampled from the top_k tokens).",
                                 choices=("greedy", "topk"))
    generate_seed: int = opt(0, "Seed for topk generation (with the prediction id: reproducible).", ge=0,
                             le=2**64 - 1)
    beam_size: int = opt(1, "Seq2seq bundles: hypotheses kept per message (1: greedy decoding; k > 1: beam search).",
                         ge=1, le=256)
    max_output_len: int = opt(0, "Seq2seq bundles: longest answer in tokens (0: the bundle's max_output_len, which "
                                 "is also the most this may ask for).", ge=0, le=1 << 16)
    length_penalty: float = opt(1.0, "Seq2seq beam search: an ended hypothesis scores log-probability / length ** "
                                     "this (0: raw log-probability, which favours short answers).", ge=0, le=10)
    # --- durable state ---
    changelog: bool = opt(True, "Keep every stream's state in a compacted changelog topic, restored on "
                                "assignment: crashes, restarts and rebalances lose no state.")
    changelog_topic: str = opt("", f"State changelog topic (default: {names.CHANGELOG_RULE}).")
    on_state_mismatch: str = opt("refuse", "When the changelog holds state of another state layout (a model whose "
                                           "state-spec hash differs): refuse to start, reset the streams, or serve "
                                           "them with previous_model. A hot reload of such a bundle is refused, "
                                           "except with reset (every stream starts over on it).",
                                 choices=("refuse", "reset", "previous"))
    previous_model: str = opt("", "With on_state_mismatch=previous: the bundle whose state the changelog holds.")
    processing_guarantee: str = opt("at_least_once", "at_least_once: a crash repeats some predictions (same ids; "
                                                     "state is applied exactly once either way). exactly_once: each "
                                                     "checkpoint's predictions, dead letters, state records and input "
                                                     "offsets commit in one Kafka transaction per input partition; "
                                                     "read_committed readers see every prediction once. Needs "
                                                     "changelog and a broker with transactions (Apache Kafka, not "
                                                     "Tansu).", choices=("at_least_once", "exactly_once"))
    # --- Kafka client behaviour ---
    fetch_max_records: int = opt(2_000, "Most records taken from Kafka in one fetch. aiokafka parses them on the "
                                        "event loop in one go: 2,000 keep that under ~10 ms (rnnd_event_loop_lag_"
                                        "seconds); more saves little per fetch.", ge=1, le=_INT32)
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
    # --- Kafka security (declared by the security module, shared with `rnnd produce`/`tail`) ---
    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    # --- operations ---
    route: str = opt("", "With a config file of [routes.NAME] tables: the one route this command uses (rnnd verify, "
                         "rnnd serve of that route alone). Empty: rnnd serve serves every route.")
    shadow: bool = opt(False, "Routes only: this route runs its model on another route's input topic, writing to "
                              "its own output topic, in its own consumer group; it never holds that route up: its "
                              "failure is logged and the other routes go on, and /readyz does not wait for it.")
    workers: int = opt(1, "Processes of `rnnd serve` on this machine, in one consumer group (partitions are split "
                          "among them), stopped together, behind one /metrics with a worker label; each loads "
                          "the model. 1: this process serves, as without the setting.", ge=1, le=1024)
    watch_model: bool = opt(True, "Load a new bundle written at `model` while serving (replace the file by a rename): "
                                  "checked in the background (content hash, self-check, input, state layout) and "
                                  "swapped in at a checkpoint, with no restart and no rebalance; a bundle that fails "
                                  "a check is refused and the serving one stays.")
    admin_address: str = opt("", "host:port of the admin endpoint, POST /admin/reload (load the bundle at `model` "
                                 "now; the answer says how it went). Empty: none. Apart from http_host/http_port, "
                                 "which face the cluster: keep it on loopback (e.g. 127.0.0.1:9465).")
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
        return self.dead_letter_topic or names.dead_letter_topic(self.input_topic)

    @property
    def exactly_once(self) -> bool:
        return self.processing_guarantee == "exactly_once"

    @property
    def copied_headers(self) -> frozenset[str]:
        """The header names ``copy_headers`` lists."""
        return frozenset(n.strip() for n in self.copy_headers.split(",") if n.strip())

    @property
    def reloads(self) -> bool:
        """A bundle can be swapped in while serving (``watch_model`` or the admin endpoint)."""
        return self.watch_model or bool(self.admin_address)

    @property
    def admin_endpoint(self) -> tuple[str, int] | None:
        """``admin_address`` as (host, port); None when there is no admin endpoint."""
        if not self.admin_address:
            return None
        host, _, port = self.admin_address.rpartition(":")
        return host.strip("[]"), int(port)

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
        settings.check_declared(self)
        if not re.fullmatch(r"(cpu|cuda(:\d+)?|tensorrt(:\d+)?)", self.provider):
            raise ConfigError(f"provider must be cpu, cuda[:N] or tensorrt[:N], not {self.provider!r}", "provider")
        _parse_emit(self.emit)
        bad = [n for n in self.copy_headers.split(",") if not re.fullmatch(r"\s*[\x21-\x7e]+\s*", n)]
        if self.copy_headers.strip() and bad:
            raise ConfigError(f"copy_headers must be header names separated by commas, not {self.copy_headers!r} "
                              f"(an empty or unprintable name: {bad[0]!r})", "copy_headers")
        _check_bootstrap(self.bootstrap_servers)
        host, _, port = self.admin_address.rpartition(":")
        if self.admin_address and not (host and port.isdigit() and int(port) <= 65535):
            raise ConfigError(f"admin_address must be host:port (e.g. 127.0.0.1:9465; port 0 picks a free one), "
                              f"not {self.admin_address!r}", "admin_address")
        if self.shadow and not self.route:
            raise ConfigError("shadow is for a route of a config file ([routes.NAME] with shadow = true): a daemon "
                              "of one bundle has no other route to shadow", "shadow")
        self._validate_combinations()
        self._validate_topics()
        try:
            check_security(self.security)
        except SecurityError as e:
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
            for name, default in (("generate_strategy", "greedy"), ("generate_seed", 0), ("generate_at", "every")):
                if getattr(self, name) != default:
                    raise ConfigError(f"{name} must be left at {default!r} when generate_tokens is 0, not "
                                      f"{getattr(self, name)!r}: nothing is generated; set generate_tokens too", name)
        elif self.generate_seed and self.generate_strategy == "greedy":
            raise ConfigError(f"generate_seed must be 0 with generate_strategy greedy, not {self.generate_seed}: "
                              "greedy generation draws nothing; set generate_strategy = \"topk\"", "generate_seed")
        if self.tensorrt_cache_dir and not self.provider.startswith("tensorrt"):
            raise ConfigError(f"tensorrt_cache_dir must be empty unless provider is tensorrt[:N] (it is "
                              f"{self.provider}), not {self.tensorrt_cache_dir!r}: only TensorRT builds engines",
                              "tensorrt_cache_dir")
        for setting in ("device_state", "batch_buckets"):
            if getattr(self, setting) and (self.forecast_horizon or self.generate_tokens):
                name = "forecast_horizon" if self.forecast_horizon else "generate_tokens"
                raise ConfigError(f"{name} must be 0 with {setting}, not {getattr(self, name)}: roll-outs run on "
                                  f"host copies of each call's state; set {setting} = false for them", name)
        if self.beam_size == 1 and self.length_penalty != 1.0:
            raise ConfigError(f"length_penalty must be left at 1.0 when beam_size is 1, not {self.length_penalty}: "
                              "greedy decoding ranks no hypotheses; set beam_size too", "length_penalty")
        if not self.changelog:
            # Without a changelog a state layout meets another only in a hot reload, where reset applies.
            reload_reset = self.on_state_mismatch == "reset" and self.reloads
            for name, default in (("changelog_topic", ""), ("on_state_mismatch", "refuse")):
                if getattr(self, name) != default and not (name == "on_state_mismatch" and reload_reset):
                    why = "without a changelog there is no state to restore"
                    if name == "on_state_mismatch":
                        why += (" (only on_state_mismatch=reset acts without one, on a hot reload; watch_model is "
                                "false and admin_address empty)" if self.on_state_mismatch == "reset" else "")
                    raise ConfigError(f"{name} must be left at {default!r} when changelog is false, not "
                                      f"{getattr(self, name)!r}: {why}", name)
        if self.exactly_once and not self.changelog:
            raise ConfigError("processing_guarantee=exactly_once needs changelog=true: the state of a stream is part "
                              "of what each transaction commits", "processing_guarantee")
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
            check_topic_name("dead_letter_topic", self.dlq_topic, derived=names.DEAD_LETTER_RULE)
        _check_distinct([("input_topic", self.input_topic), ("output_topic", self.output_topic),
                         ("dead_letter_topic", self.dlq_topic)])
        if self.changelog and (self.changelog_topic or self.group_id):
            self.check_changelog_topic(self.changelog_topic or names.changelog_topic(self.group_id, self.input_topic))

    def check_changelog_topic(self, topic: str) -> str:
        """The changelog topic, once its name is known (by default it is derived from the model's name).

        ``validate()`` checks it when ``changelog_topic`` or ``group_id`` is set; otherwise the
        daemon calls this after loading the bundle.
        """
        if self.changelog:
            check_topic_name("changelog_topic", topic,
                             derived="" if self.changelog_topic else names.CHANGELOG_RULE)
            _check_distinct([("input_topic", self.input_topic), ("output_topic", self.output_topic),
                             ("dead_letter_topic", self.dlq_topic), ("changelog_topic", topic)])
        return topic

    def redacted(self) -> dict[str, Any]:
        """The settings by name (security's flat, as spelled) for logs, secrets replaced."""
        return settings.redacted(self)


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


def _parse_emit(value: str) -> int:
    if value == "every":
        return 1
    if value == "end":
        return 0
    m = re.fullmatch(r"every:(\d+)", value)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    raise ConfigError(f"emit must be every, every:N (N >= 1) or end, not {value!r}")


# --- loading ---------------------------------------------------------------------------------


def settings_of() -> tuple[settings.Setting, ...]:
    """Every setting of `rnnd serve`, the security block's included, in the docs table's order."""
    return settings.of(ServeConfig)


def load(
    argv_values: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> ServeConfig:
    """Defaults < file < env < flags; a route's own table over all of them. ``argv_values``: only flags given."""
    env = os.environ if env is None else env
    check_environment(env)
    path = config_file or env.get(f"{ENV_PREFIX}CONFIG")
    doc = dict(settings.read_file(path, table="serve")) if path else {}
    where = f"config file {path}"
    routes = _route_tables(doc, where)
    values, sources = settings.layer(ServeConfig, file=(doc, where) if path else None, env=env, flags=argv_values)
    name = values.get("route", "")
    if routes and not name:
        raise ConfigError(f"{where} has routes ({', '.join(routes)}): this command takes one, --route NAME "
                          "(rnnd serve without it serves them all)")
    if name:
        if name not in routes:
            raise ConfigError(f"route {name!r} is not one of {where}'s routes ({', '.join(routes) or 'none'})",
                              "route")
        own, own_sources = settings.layer(ServeConfig, file=(routes[name], f"{where} [routes.{name}]"))
        if "route" in own or not set(own).isdisjoint(PROCESS_SETTINGS):
            bad = sorted(set(own) & (PROCESS_SETTINGS | {"route"}))
            raise ConfigError(f"{where} [routes.{name}] sets {', '.join(bad)}: a setting of the whole process; set it "
                              "at the top level of the file")
        values.update(own)
        sources.update(own_sources)
        values.setdefault("group_id", f"rnnd-{name}")  # each route its own consumer group (and changelog)
        if values.get("shadow") and "dead_letter_topic" not in values and values.get("input_topic"):
            # its dead letters are the served route's again: kept apart from them
            values["dead_letter_topic"] = f"{values['input_topic']}.{name}.dlq"
    try:
        cfg: ServeConfig = settings.build(ServeConfig, values)
        return cfg.validate()
    except ConfigError as e:
        raise settings.with_source(e, sources) from None


#: Settings of the whole process, not of one route: a route's table may not set them.
PROCESS_SETTINGS = frozenset({"workers", "http_host", "http_port", "admin_address", "log_format", "log_level",
                              "event_loop", "gc_threshold"})


def _route_tables(doc: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The file's ``[routes.NAME]`` tables (taken out of ``doc``), their names checked."""
    routes = doc.pop("routes", {})
    if not isinstance(routes, dict) or not all(isinstance(t, dict) for t in routes.values()):
        raise ConfigError(f"{where}: `routes` must hold tables, one per route ([routes.NAME])")
    for name in routes:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", name):
            raise ConfigError(f"{where}: route name {name!r} must be 1-100 letters, digits, '.', '_' or '-' (it "
                              "names the route's consumer group and its metrics label)")
    return routes


def load_routes(
    argv_values: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> dict[str, ServeConfig]:
    """Every route of the config file, each loaded as ``load`` loads one and checked against the others;
    {} when the file has no routes, or when ``route`` picks one (``load`` then serves it alone)."""
    env = os.environ if env is None else env
    path = config_file or env.get(f"{ENV_PREFIX}CONFIG")
    if not path or (argv_values or {}).get("route") or env.get(f"{ENV_PREFIX}ROUTE"):
        return {}
    where = f"config file {path}"
    names_ = list(_route_tables(dict(settings.read_file(path, table="serve")), where))
    if not names_:
        return {}
    routes = {n: load({**(argv_values or {}), "route": n}, env, path) for n in names_}
    _check_routes(routes, where)
    return routes


def _check_routes(routes: Mapping[str, ServeConfig], where: str) -> None:
    """What one route cannot see: two routes doing one job, a shadow of nothing, a setting no route can honour."""
    first = next(iter(routes.values()))
    if first.workers > 1:
        raise ConfigError(f"workers must be 1 with routes ({where}), not {first.workers}: run one rnnd serve per "
                          "route instead, each with its workers", "workers")
    claimed: dict[tuple[str, str], str] = {}
    for name, cfg in routes.items():
        _, changelog_topic = names.group_and_topic(cfg.group_id, cfg.changelog_topic, cfg.input_topic, "")
        for what, value in (("group_id", cfg.group_id), ("output_topic", cfg.output_topic),
                            ("dead_letter_topic", cfg.dlq_topic), ("changelog_topic", changelog_topic)):
            other = claimed.setdefault((what, value), name)
            if other != name:
                raise ConfigError(f"{where}: routes {other} and {name} have the same {what} {value!r}: give each "
                                  "route its own (two routes in one group, or writing one topic, would take each "
                                  "other's partitions or outputs)", what)
    served = {cfg.input_topic for cfg in routes.values() if not cfg.shadow}
    if not served:
        raise ConfigError(f"{where}: every route is a shadow: at least one must serve its input for real", "shadow")
    for name, cfg in routes.items():
        if cfg.shadow and cfg.input_topic not in served:
            raise ConfigError(f"{where}: shadow route {name} reads {cfg.input_topic!r}, which no other route serves: "
                              "a shadow runs beside a route on the same input (or set shadow = false)", "shadow")


def check_environment(env: Mapping[str, str]) -> None:
    """Refuse ``RNND_*`` variables that are not settings of `rnnd serve` (nor allowed), naming the closest one."""
    settings.check_environment(env, [ServeConfig])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; defaults are None so that unset flags do not override env/file."""
    parser.add_argument("--config", help="TOML config file (or RNND_CONFIG); keys as the flags, with underscores; "
                        "[routes.NAME] tables for several routes")
    settings.add_arguments(parser, settings_of())


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServeConfig:
    given = {s.name: getattr(args, s.name, None) for s in settings_of()}
    return load(given, env=env, config_file=getattr(args, "config", None))


def routes_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> dict[str, ServeConfig]:
    given = {s.name: getattr(args, s.name, None) for s in settings_of()}
    return load_routes(given, env=env, config_file=getattr(args, "config", None))


def docs_table() -> str:
    """The Markdown table in docs/configuration.md."""
    return settings.docs_table(ServeConfig)


def replace(cfg: ServeConfig, **changes: Any) -> ServeConfig:
    """A copy with settings changed by name (security's too), checked as loading checks them."""
    changed: ServeConfig = settings.replace(cfg, **changes)
    return changed.validate()
