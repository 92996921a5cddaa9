"""Settings are checked up front: every number has a range, topics are legal and distinct, nothing is ignored.

The command-line cases run `rnnd serve --check` in-process on a real bundle, so that the
only reason for a refusal is the setting under test (with a good one the same command
loads the model and exits 0). A refusal is exit code 2 and one line that names the setting,
the value and what is allowed, never a traceback.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from rnnd.daemon import config, security
from rnnd.daemon.config import ConfigError, ServeConfig

REPO = Path(__file__).resolve().parent.parent
REQUIRED = {"model": "m.onnx", "input_topic": "in", "output_topic": "out"}
INT32 = 2**31 - 1


@pytest.fixture
def check(rnnd, recipe_bundle: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch):
    """``rnnd serve --check`` on a real bundle with extra flags and RNND_* variables; the result."""
    bundle = recipe_bundle("product")

    def run(*flags: str, env: dict[str, str] | None = None, topics: tuple[str, ...] = ("--input-topic", "sensors",
                                                                                         "--output-topic", "preds"),
            command: tuple[str, ...] = ("serve", "--check")):
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        return rnnd(*command, "--model", bundle, *topics, *flags)

    return run


def refused(result, *words: str) -> str:
    """The single error line of a refused command, checked for the words it must contain."""
    assert result.code == 2, (result.code, result.out, result.err)
    assert "Traceback" not in result.err and "ok:" not in result.out
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# --- the reproductions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("serve", "--check"), ("serve",)], ids=["check", "serve"])
def test_port_beyond_65535_is_one_line_not_a_traceback(check, command: tuple[str, ...]) -> None:
    for port in ("0", "65535"):  # the same command with a good port loads the model ("0": pick a free one)
        result = check("--http-port", port)
        assert result.code == 0 and result.out.startswith("ok: product@"), result.err
    line = refused(check(env={"RNND_HTTP_PORT": "99999"}, command=command))
    assert line == "rnnd serve: error: http_port from RNND_HTTP_PORT must be between 0 and 65535, not 99999"


def test_output_topic_equal_to_input_topic_is_refused(check) -> None:
    line = refused(check(topics=("--input-topic", "sensors", "--output-topic", "sensors")))
    assert line == ("rnnd serve: error: output_topic from --output-topic must differ from input_topic, not 'sensors' "
                    "too: the daemon would read its own predictions")


def test_negative_linger_is_refused(check) -> None:
    line = refused(check("--linger-ms", "-1"))
    assert line == "rnnd serve: error: linger_ms from --linger-ms must be between 0 and 30000, not -1"


def test_unknown_rnnd_variable_is_refused_naming_the_setting_it_resembles(check) -> None:
    line = refused(check(env={"RNND_MAX_BACTH": "512"}))
    assert line == ("rnnd serve: error: unknown environment variable RNND_MAX_BACTH (did you mean RNND_MAX_BATCH?): "
                    "not a setting of rnnd (docs/configuration.md lists them); rename or unset it")


def test_illegal_topic_names_are_refused_not_retried_as_missing(check) -> None:
    legal = "Sensor.readings_v2-eu"
    result = check("--dead-letter-topic", "d" * 249, topics=("--input-topic", legal, "--output-topic", "out.put"))
    assert result.code == 0, result.err
    for topic in ("my topic", "sensors/eu", "sensors:1", ".", "..", "t" * 250, "Sensöre"):
        line = refused(check(topics=("--input-topic", topic, "--output-topic", "preds")),
                       "input_topic from --input-topic must be a legal Kafka topic name (1 to 249 characters of "
                       "a-z, A-Z, 0-9, '.', '_' and '-', and not '.' or '..'), not ")
        assert repr(topic[:60]) in line


@pytest.mark.parametrize(("flag", "words"), [
    ("--forecast-horizon", "forecast_horizon needs a stateful regression bundle whose outputs are the next values of "
                           "all its inputs (output.next_of); product@1 has next_of=[]"),
    ("--generate-tokens", "generate_tokens needs a stateful language-model bundle; product@1 is a stateful "
                          "regression bundle"),
])
def test_a_setting_the_bundle_cannot_honour_is_one_line(check, flag: str, words: str) -> None:
    refused(check(flag, "3"), "rnnd serve: error: " + words)


def test_a_100_kb_key_is_a_dead_letter_not_a_stream(bootstrap, topic_factory, recipe_bundle, tmp_path: Path) -> None:
    """On the real broker: the long key makes no prediction and no state; its dead letter shows only its start."""
    from daemon_harness import DaemonProcess, consume, produce

    long_key = b"device-" + b"0123456789abcdef" * 6400  # 102,407 bytes
    items = [(b"s", {"x": [0.5]}), (long_key, {"x": [0.5]}), (b"s", {"x": [0.8]})]
    topic_in, topic_out = topic_factory("longkey-in", 1), topic_factory("longkey-out", 1)
    produce(bootstrap, topic_in, items)
    with DaemonProcess(recipe_bundle("product"), bootstrap, topic_in, topic_out, log_dir=tmp_path) as d:
        d.start()
        outs = consume(bootstrap, topic_out, 2, timeout=60, settle=1.0)
        dead = consume(bootstrap, f"{topic_in}.dlq", 1, timeout=30, settle=0.5)
        assert d.metric("rnnd_dead_letters_total", reason="key_too_long") == 1
        assert d.metric("rnnd_active_streams") == 1
        assert d.stop() == 0
    assert [(o.key, o.value["step"]) for o in outs] == [(b"s", 0), (b"s", 1)]
    (letter,) = dead
    assert letter.key == long_key[:256] and len(letter.raw) < 1500
    assert letter.value["reason"] == "key_too_long" and letter.value["key_bytes"] == len(long_key)
    assert letter.value["message"].startswith(f"the key is {len(long_key)} bytes; the limit is 4096 (max_key_bytes)")


# --- every numeric setting has a range ------------------------------------------------------------------------

# (setting, lowest allowed, highest allowed or None, the words for what is allowed). Written out here rather than
# read from the settings: a changed range must be a decision, seen in this table and in docs/configuration.md.
RANGES: list[tuple[str, float, float | None, str]] = [
    ("intra_op_threads", 0, 1024, "between 0 and 1024"),
    ("max_batch", 1, 2**20, "between 1 and 1048576"),
    ("max_chunk", 1, 2**16, "between 1 and 65536"),
    ("max_wait_ms", 0.0, 60_000.0, "between 0 and 60000"),
    ("min_batch", 1, 2**20, "between 1 and 1048576"),
    ("max_streams", 1, 100_000_000, "between 1 and 100000000"),
    ("stream_ttl_s", 0.0, None, ">= 0"),
    ("max_text_tokens", 1, 2**20, "between 1 and 1048576"),
    ("max_steps_per_message", 1, 2**20, "between 1 and 1048576"),
    ("max_key_bytes", 1, 2**20, "between 1 and 1048576"),
    ("top_k", 0, INT32, f"between 0 and {INT32}"),
    ("forecast_horizon", 0, 2**16, "between 0 and 65536"),
    ("generate_tokens", 0, 2**16, "between 0 and 65536"),
    ("generate_seed", 0, 2**64 - 1, f"between 0 and {2**64 - 1}"),
    ("beam_size", 1, 256, "between 1 and 256"),
    ("max_output_len", 0, 2**16, "between 0 and 65536"),
    ("length_penalty", 0, 10, "between 0 and 10"),
    ("fetch_max_records", 1, INT32, f"between 1 and {INT32}"),
    ("fetch_max_wait_ms", 0, 30_000, "between 0 and 30000"),
    ("max_inflight_steps", 1, INT32, f"between 1 and {INT32}"),
    ("commit_interval_s", 0.001, 3600.0, "> 0 and <= 3600"),
    ("linger_ms", 0, 30_000, "between 0 and 30000"),
    ("session_timeout_ms", 2000, 1_800_000, "between 2000 and 1800000"),
    ("broker_unreachable_s", 0.001, None, "> 0"),
    ("workers", 1, 1024, "between 1 and 1024"),
    ("http_port", 0, 65535, "between 0 and 65535"),
    ("gc_threshold", 0, INT32, f"between 0 and {INT32}"),
]
# What a setting needs to take its extreme values at all (it only acts together with these).
COMPANIONS: dict[str, dict[str, Any]] = {
    "min_batch": {"max_batch": 2**20, "max_wait_ms": 1.0},
    "generate_seed": {"generate_tokens": 1, "generate_strategy": "topk"},
    "length_penalty": {"beam_size": 2},
}


def test_every_numeric_setting_is_in_the_range_table() -> None:
    numeric = {s.name for s in config.settings_of() if s.type in (int, float)}
    assert numeric == {name for name, *_ in RANGES}, "a numeric setting without a range decision (RANGES)"


def _load(setting: str, raw: str, **extra: Any) -> ServeConfig:
    return config.load(argv_values={**REQUIRED, **extra}, env={f"RNND_{setting.upper()}": raw})


@pytest.mark.parametrize(("setting", "lo", "hi", "allowed"), RANGES, ids=[r[0] for r in RANGES])
def test_numeric_range(setting: str, lo: float, hi: float | None, allowed: str) -> None:
    typ = get_type_hints(ServeConfig)[setting]
    companions = COMPANIONS.get(setting, {})
    exclusive = allowed.startswith(">") and not allowed.startswith(">=")
    for ok in (lo, hi) if hi is not None else (lo, lo * 1000 + 10**9):
        assert getattr(_load(setting, str(typ(ok)), **companions), setting) == typ(ok)
    below = 0 if exclusive else lo - 1
    outside = [below, -1] + ([hi + 1] if hi is not None else [])
    for bad in outside:
        if not exclusive and bad >= lo:
            continue
        with pytest.raises(ConfigError) as err:
            _load(setting, str(typ(bad)), **companions)
        assert str(err.value) == f"{setting} from RNND_{setting.upper()} must be {allowed}, not {typ(bad)!r}"
        assert err.value.exit_code == 2
    # the same range holds for the config file and for settings made in code
    with pytest.raises(ConfigError, match=rf"^{setting} must be {re.escape(allowed)}, not "):
        ServeConfig(**REQUIRED, **{setting: typ(outside[0])}).validate()


def test_ranges_are_in_the_docs_table() -> None:
    table = config.docs_table()
    for setting, _, _, allowed in RANGES:
        row = next(line for line in table.splitlines() if line.startswith(f"| `{setting}` |"))
        assert allowed.replace(">=", "≥").replace("<=", "≤") in row, row


def test_a_wrongly_typed_value_made_in_code_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^http_port must be int, not '9100'$"):
        ServeConfig(**REQUIRED, http_port="9100").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^max_batch must be int, not True$"):
        ServeConfig(**REQUIRED, max_batch=True).validate()
    assert ServeConfig(**REQUIRED, max_wait_ms=2).validate().max_wait_ms == 2  # an int is a fine float


# --- topics ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "message"), [
    ({"output_topic": "in"}, "output_topic from --output-topic must differ from input_topic, not 'in' too: the "
                             "daemon would read its own predictions"),
    ({"dead_letter_topic": "in"}, "dead_letter_topic from --dead-letter-topic must differ from input_topic, not 'in' "
                                  "too: the daemon would read its own dead letters"),
    ({"dead_letter_topic": "out"}, "dead_letter_topic from --dead-letter-topic must differ from output_topic, not "
                                   "'out' too: predictions and dead letters would be mixed in one topic"),
    ({"changelog_topic": "in"}, "changelog_topic from --changelog-topic must differ from input_topic, not 'in' too: "
                                "the daemon would read its own stream state"),
    ({"changelog_topic": "in.dlq"}, "changelog_topic from --changelog-topic must differ from dead_letter_topic, not "
                                    "'in.dlq' too: dead letters and stream state would be mixed in one topic"),
    ({"group_id": "g", "output_topic": "g.in.changelog"},
     "changelog_topic must differ from output_topic, not 'g.in.changelog' too: predictions and stream state would be "
     "mixed in one topic"),
    ({"group_id": "my group"}, "changelog_topic is <group_id>.<input_topic>.changelog = 'my group.in.changelog', not "
                               "a legal Kafka topic name (1 to 249 characters of a-z, A-Z, 0-9, '.', '_' and '-', and "
                               "not '.' or '..'): set changelog_topic"),
    ({"input_topic": "x" * 246}, f"dead_letter_topic is <input_topic>.dlq = {'x' * 60!r}... (250 characters), not a "
                                 "legal Kafka topic name (1 to 249 characters of a-z, A-Z, 0-9, '.', '_' and '-', and "
                                 "not '.' or '..'): set dead_letter_topic"),
    ({"dead_letter_topic": "dead letters"}, "dead_letter_topic from --dead-letter-topic must be a legal Kafka topic "
                                            "name (1 to 249 characters of a-z, A-Z, 0-9, '.', '_' and '-', and not "
                                            "'.' or '..'), not 'dead letters'"),
    ({"changelog_topic": "state#1"}, "changelog_topic from --changelog-topic must be a legal Kafka topic name (1 to "
                                     "249 characters of a-z, A-Z, 0-9, '.', '_' and '-', and not '.' or '..'), not "
                                     "'state#1'"),
])
def test_topic_rules(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(argv_values={**REQUIRED, **settings}, env={})
    assert str(err.value) == message


def test_changelog_named_after_the_model_is_checked_once_the_name_is_known() -> None:
    cfg = config.load(argv_values=REQUIRED, env={})
    assert cfg.check_changelog_topic("rnnd-weather.in.changelog") == "rnnd-weather.in.changelog"
    with pytest.raises(ConfigError, match=r"^changelog_topic is <group_id>.<input_topic>.changelog = "
                                          r"'rnnd-my model.in.changelog', not a legal Kafka topic name .*: set "
                                          r"changelog_topic$"):
        cfg.check_changelog_topic("rnnd-my model.in.changelog")
    with pytest.raises(ConfigError, match=r"^changelog_topic must differ from output_topic"):
        cfg.check_changelog_topic("out")
    no_changelog = config.load(argv_values={**REQUIRED, "changelog": False}, env={})
    assert no_changelog.check_changelog_topic("out") == "out"  # not used: nothing to clash with


@pytest.mark.parametrize("servers", ["kafka:99999", "kafka:0", "", "k1:9092,,k2:9092", "kafka broker:9092",
                                     "kafka:port"])
def test_bootstrap_servers(servers: str) -> None:
    for good in ("kafka:9092", "k1:9092,k2:9093", "k1:9092, k2", "[::1]:9092", "10.0.0.7:65535"):
        assert config.load(argv_values={**REQUIRED, "bootstrap_servers": good}, env={}).bootstrap_servers == good
    with pytest.raises(ConfigError) as err:
        config.load(argv_values={**REQUIRED, "bootstrap_servers": servers}, env={})
    assert str(err.value) == ("bootstrap_servers from --bootstrap-servers must be comma-separated host[:port] entries "
                              f"with ports 1 to 65535, not {servers!r}")


# --- settings that only act together ---------------------------------------------------------------------------


# (settings, the refusal, what makes the same settings work)
IGNORED: list[tuple[dict[str, str], str, dict[str, str]]] = [
    ({"min_batch": "8", "max_batch": "4", "max_wait_ms": "2"},
     "min_batch from --min-batch must be at most max_batch (4), not 8: a call never holds more than max_batch "
     "streams", {"max_batch": "8"}),
    ({"min_batch": "8"}, "min_batch from --min-batch must be 1 when max_wait_ms is 0, not 8: it only says when to "
                         "stop waiting; set max_wait_ms too", {"max_wait_ms": "2"}),
    ({"generate_strategy": "topk"}, "generate_strategy from --generate-strategy must be left at 'greedy' when "
                                    "generate_tokens is 0, not 'topk': nothing is generated; set generate_tokens too",
     {"generate_tokens": "3"}),
    ({"generate_seed": "7"}, "generate_seed from --generate-seed must be left at 0 when generate_tokens is 0, not 7: "
                             "nothing is generated; set generate_tokens too",
     {"generate_tokens": "3", "generate_strategy": "topk"}),
    ({"generate_at": "end"}, "generate_at from --generate-at must be left at 'every' when generate_tokens is 0, not "
                             "'end': nothing is generated; set generate_tokens too", {"generate_tokens": "3"}),
    ({"generate_seed": "7", "generate_tokens": "3"},
     "generate_seed from --generate-seed must be 0 with generate_strategy greedy, not 7: greedy generation draws "
     "nothing; set generate_strategy = \"topk\"", {"generate_strategy": "topk"}),
    ({"changelog": "false", "changelog_topic": "state"},
     "changelog_topic from --changelog-topic must be left at '' when changelog is false, not 'state': without a "
     "changelog there is no state to restore", {"changelog": "true"}),
    ({"changelog": "false", "on_state_mismatch": "reset", "watch_model": "false"},
     "on_state_mismatch from --on-state-mismatch must be left at 'refuse' when changelog is false, not 'reset': "
     "without a changelog there is no state to restore (only on_state_mismatch=reset acts without one, on a hot "
     "reload; watch_model is false and admin_address empty)", {"watch_model": "true"}),
    ({"changelog": "false", "on_state_mismatch": "previous", "previous_model": "v1.onnx"},
     "on_state_mismatch from --on-state-mismatch must be left at 'refuse' when changelog is false, not 'previous': "
     "without a changelog there is no state to restore", {"changelog": "true"}),
    ({"tensorrt_cache_dir": "/var/cache/trt"},
     "tensorrt_cache_dir from --tensorrt-cache-dir must be empty unless provider is tensorrt[:N] (it is cpu), not "
     "'/var/cache/trt': only TensorRT builds engines", {"provider": "tensorrt:0"}),
    ({"previous_model": "v1.onnx"}, "previous_model from --previous-model must be empty unless on_state_mismatch is "
                                    "previous (it is refuse), not 'v1.onnx'", {"on_state_mismatch": "previous"}),
    ({"on_state_mismatch": "previous"}, "on_state_mismatch=previous needs previous_model (the bundle whose state "
                                        "the changelog holds)", {"previous_model": "v1.onnx"}),
]


@pytest.mark.parametrize(("settings", "message", "fix"), IGNORED, ids=[m.split(" ")[0] + f"-{i}"
                                                                       for i, (_, m, _) in enumerate(IGNORED)])
def test_a_setting_that_would_be_ignored_is_refused(settings: dict[str, str], message: str,
                                                    fix: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(argv_values={**REQUIRED, **settings}, env={})
    assert str(err.value) == message
    cfg = config.load(argv_values={**REQUIRED, **settings, **fix}, env={})
    for name, raw in {**settings, **fix}.items():
        assert str(getattr(cfg, name)).lower() == raw.lower() or getattr(cfg, name) == float(raw), name


@pytest.mark.parametrize(("settings", "message"), [
    ({"ssl_check_hostname": "false"}, "ssl_check_hostname = false set but security_protocol is PLAINTEXT: TLS "
                                      "settings only apply to SSL or SASL_SSL; set security_protocol = \"SSL\""),
    ({"security_protocol": "SASL_SSL", "sasl_allow_plaintext": "true", "sasl_mechanism": "PLAIN",
      "sasl_username": "u", "sasl_password": "pw"},
     "sasl_allow_plaintext set but security_protocol is SASL_SSL: it only accepts SASL_PLAINTEXT; leave it unset"),
])
def test_security_settings_that_would_be_ignored_are_refused(settings: dict[str, str], message: str) -> None:
    env = {f"RNND_{k.upper()}": v for k, v in settings.items()}
    with pytest.raises(ConfigError) as err:
        config.load(argv_values=REQUIRED, env=env)
    assert str(err.value) == message
    with pytest.raises(security.SecurityError) as err2:  # and the tools (`rnnd produce`/`tail`) say the same
        security.from_args(argparse.Namespace(), env=env)
    assert str(err2.value) == message


# --- RNND_* variables -------------------------------------------------------------------------------------------


def test_unknown_variables_are_listed_with_their_nearest_setting_and_never_their_values() -> None:
    env = {"RNND_SASL_PASWORD": "hunter2", "RNND_MAX_BACTH": "1", "RNND_FROBNICATE": "1", "RNND_max_batch": "2"}
    with pytest.raises(ConfigError) as err:
        config.load(argv_values=REQUIRED, env=env)
    msg = str(err.value)
    assert msg == ("unknown environment variables RNND_FROBNICATE, RNND_MAX_BACTH (did you mean RNND_MAX_BATCH?), "
                   "RNND_SASL_PASWORD (did you mean RNND_SASL_PASSWORD?), RNND_max_batch (did you mean "
                   "RNND_MAX_BATCH?): not a setting of rnnd (docs/configuration.md lists them); rename or unset it")
    assert "hunter2" not in msg
    with pytest.raises(ConfigError, match=r"^unknown environment variable RNND_SSL_CAFIEL \(did you mean "
                                          r"RNND_SSL_CAFILE\?\)"):
        security.from_args(argparse.Namespace(), env={"RNND_SSL_CAFIEL": "/ca.pem"})  # the tools' settings


def test_rnnd_variables_that_are_not_settings_are_allowed(tmp_path: Path) -> None:
    conf = tmp_path / "rnnd.toml"
    conf.write_text("max_batch = 3\n")
    env = {"RNND_CONFIG": str(conf), "RNND_DEBUG": "1", "RNND_TEST_BOOTSTRAP": "localhost:1", "RNND_WORKER": "0",
           "OTHER_MAX_BACTH": "x"}
    assert config.load(argv_values=REQUIRED, env=env).max_batch == 3
    security.from_args(argparse.Namespace(), env=env)
    assert set(config.ENV_NOT_SETTINGS) == {"RNND_CONFIG", "RNND_DEBUG", "RNND_TEST_BOOTSTRAP", "RNND_KAFKA_LIBS",
                                            "RNND_WORKER"}


def test_every_rnnd_variable_the_repository_uses_is_a_setting_or_allowed() -> None:
    """A new RNND_* variable read by a tool, a test or a deployment must join the documented allow-list."""
    settings = {f"RNND_{s.name.upper()}" for s in config.settings_of()}
    allowed = settings | set(config.ENV_NOT_SETTINGS)
    here = Path(__file__).name
    used: dict[str, str] = {}
    for path in REPO.rglob("*"):
        if (not path.is_file() or path.name == here or any(p in path.parts for p in (".git", ".venv", "rnnd.egg-info"))
                or path.suffix not in (".py", ".yaml", ".yml", ".toml", ".sh", ".md", "") or path.stat().st_size > 2e6):
            continue
        for name in re.findall(r"\bRNND_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")):
            used.setdefault(name, str(path.relative_to(REPO)))
    examples = {"RNND_MAX_BACTH", "RNND_SASL_PASWORD"}  # the typos the docs show as examples
    stray = {name: where for name, where in used.items() if name not in allowed | examples}
    assert not stray, f"RNND_* names that are neither settings nor in config.ENV_NOT_SETTINGS: {stray}"
    docs = (REPO / "docs" / "configuration.md").read_text()
    for name in config.ENV_NOT_SETTINGS:
        assert f"`{name}`" in docs, f"{name} is allowed but not documented in docs/configuration.md"


@pytest.mark.parametrize("address", ["9465", "localhost", ":9465", "127.0.0.1:99999", "127.0.0.1:port"])
def test_admin_address(address: str) -> None:
    for good, endpoint in (("127.0.0.1:9465", ("127.0.0.1", 9465)), ("[::1]:0", ("::1", 0)),
                           ("0.0.0.0:8080", ("0.0.0.0", 8080)), ("", None)):
        assert config.load(argv_values={**REQUIRED, "admin_address": good}, env={}).admin_endpoint == endpoint
    with pytest.raises(ConfigError) as err:
        config.load(argv_values={**REQUIRED, "admin_address": address}, env={})
    assert str(err.value) == ("admin_address from --admin-address must be host:port (e.g. 127.0.0.1:9465; port 0 "
                              f"picks a free one), not {address!r}")
