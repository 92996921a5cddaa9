"""`rnnd serve` settings: precedence, typing, error messages, and the generated docs table.

Each test passes its own ``env`` mapping, so the machine's RNND_* variables never leak in.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from rnnd.daemon import config
from rnnd.daemon.config import ConfigError, ServeConfig

REPO = Path(__file__).resolve().parent.parent
REQUIRED = {"model": "m.onnx", "input_topic": "in", "output_topic": "out"}


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rnnd.toml"
    path.write_text(text)
    return path


def parse(argv: list[str], env: dict[str, str]) -> ServeConfig:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_args(parser.parse_args(argv), env=env)


def test_defaults_apply_when_nothing_else_is_given() -> None:
    cfg = config.load(argv_values=REQUIRED, env={})
    for f in config.settings_of():
        if f.name not in REQUIRED:
            assert getattr(cfg, f.name) == f.default, f.name
    assert cfg.dlq_topic == "in.dlq" and cfg.emit_every == 1


def test_precedence_default_file_env_flag(tmp_path: Path) -> None:
    path = toml(tmp_path, 'model = "file.onnx"\ninput_topic = "file-in"\noutput_topic = "file-out"\n'
                          "max_batch = 10\nmax_chunk = 16\nlinger_ms = 7\nlog_level = \"debug\"\n")
    env = {"RNND_MAX_BATCH": "20", "RNND_MAX_CHUNK": "32", "RNND_INPUT_TOPIC": "env-in"}
    cfg = config.load(argv_values={"max_batch": "30", "output_topic": None}, env=env, config_file=path)
    assert cfg.max_batch == 30  # flag over env over file
    assert cfg.max_chunk == 32  # env over file
    assert cfg.input_topic == "env-in"
    assert (cfg.linger_ms, cfg.log_level, cfg.model) == (7, "debug", "file.onnx")  # file over default
    assert cfg.output_topic == "file-out"  # a flag left unset (None) does not override
    assert cfg.compression == "none"  # default


def test_precedence_through_argparse(tmp_path: Path) -> None:
    path = toml(tmp_path, '[serve]\nmodel = "file.onnx"\ninput_topic = "in"\noutput_topic = "out"\n'
                          "max_batch = 10\ncreate_topics = false\nstream_ttl_s = 5\nmax_wait_ms = 3\n")
    env = {"RNND_MAX_BATCH": "20", "RNND_STREAM_TTL_S": "60.5", "RNND_CREATE_TOPICS": "false"}
    cfg = parse(["--config", str(path), "--max-batch", "30", "--create-topics"], env)
    assert cfg.max_batch == 30 and cfg.create_topics is True  # flags win, including --flag for a bool
    assert cfg.stream_ttl_s == 60.5  # env over file
    assert cfg.max_wait_ms == 3.0 and isinstance(cfg.max_wait_ms, float)  # file, coerced to the field's type
    # no flags: env, then file
    cfg = parse(["--config", str(path)], env)
    assert (cfg.max_batch, cfg.create_topics) == (20, False)
    cfg = parse(["--config", str(path), "--no-create-topics"], {"RNND_CREATE_TOPICS": "1"})
    assert cfg.create_topics is False and cfg.max_batch == 10


def test_config_file_from_rnnd_config(tmp_path: Path) -> None:
    path = toml(tmp_path, 'model = "a.onnx"\ninput_topic = "in"\noutput_topic = "out"\nmax-batch = 3\n')
    assert config.load(env={"RNND_CONFIG": str(path)}).max_batch == 3  # dashes allowed in file keys
    assert parse([], {"RNND_CONFIG": str(path)}).model == "a.onnx"


@pytest.mark.parametrize(("source", "setting", "raw", "where"), [
    ("env", "max_batch", "lots", "RNND_MAX_BATCH"),
    ("env", "max_batch", "1.5", "RNND_MAX_BATCH"),
    ("env", "max_wait_ms", "fast", "RNND_MAX_WAIT_MS"),
    ("env", "commit_interval_s", "nan", "RNND_COMMIT_INTERVAL_S"),
    ("env", "create_topics", "maybe", "RNND_CREATE_TOPICS"),
    ("flag", "linger_ms", "5ms", "--linger-ms"),
    ("flag", "stream_ttl_s", "inf", "--stream-ttl-s"),
    ("file", "max_batch", '"lots"', "config file"),
    ("file", "max_batch", "2.5", "config file"),
    ("file", "max_batch", "true", "config file"),
    ("file", "max_wait_ms", "false", "config file"),
    ("file", "input_topic", "5", "config file"),
    ("file", "client_id", '["a", "b"]', "config file"),
    ("file", "create_topics", '"perhaps"', "config file"),
])
def test_type_errors_name_the_setting_and_its_source(tmp_path: Path, source: str, setting: str, raw: str,
                                                     where: str) -> None:
    env: dict[str, str] = {}
    argv: dict[str, Any] = dict(REQUIRED)
    path = None
    if source == "env":
        env[f"RNND_{setting.upper()}"] = raw
    elif source == "flag":
        argv[setting] = raw
    else:
        path = toml(tmp_path, f"{setting} = {raw}\n")
    with pytest.raises(ConfigError) as err:
        config.load(argv_values=argv, env=env, config_file=path)
    msg = str(err.value)
    assert msg.startswith(f"{setting} from {where}"), msg
    assert re.search(r"must be (int|float|bool|str), got ", msg), msg
    if path is not None:
        assert str(path) in msg


def test_integral_float_in_file_is_an_int(tmp_path: Path) -> None:
    path = toml(tmp_path, "max_batch = 64.0\nmax_chunk = \"16\"\n")
    cfg = config.load(argv_values=REQUIRED, env={}, config_file=path)
    assert cfg.max_batch == 64 and cfg.max_chunk == 16


def test_unknown_file_key_is_refused(tmp_path: Path) -> None:
    path = toml(tmp_path, "max_bacth = 3\n")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(path))}: unknown setting 'max_bacth'"):
        config.load(argv_values=REQUIRED, env={}, config_file=path)
    path = toml(tmp_path, "[serve]\nmax_batch = 3\n[kafka]\nlinger_ms = 1\n")
    with pytest.raises(ConfigError, match=r"top level \(kafka\) and in \[serve\]"):
        config.load(argv_values=REQUIRED, env={}, config_file=path)


@pytest.mark.parametrize(("text", "pattern"), [
    ("serve = 1\n", r"`serve` must be a table"),
    ("max_batch = 3\n[serve]\nmax_chunk = 4\n", r"settings both at top level \(max_batch\) and in \[serve\]"),
    ("max_batch = = 3\n", r"is not valid TOML"),
])
def test_malformed_config_files(tmp_path: Path, text: str, pattern: str) -> None:
    path = toml(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern):
        config.load(argv_values=REQUIRED, env={}, config_file=path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope.toml: no such file"):
        config.load(argv_values=REQUIRED, env={}, config_file=tmp_path / "nope.toml")


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_required_setting_missing_gives_all_three_spellings(missing: str) -> None:
    given = {k: v for k, v in REQUIRED.items() if k != missing}
    with pytest.raises(ConfigError) as err:
        config.load(argv_values=given, env={})
    flag, env = "--" + missing.replace("_", "-"), "RNND_" + missing.upper()
    assert str(err.value) == f"{missing} is required: {flag}, {env} or `{missing}` in the config file"
    assert err.value.exit_code == 2


def test_empty_env_value_does_not_satisfy_a_required_setting() -> None:
    with pytest.raises(ConfigError, match=r"model is required"):
        config.load(argv_values={"input_topic": "in", "output_topic": "out"}, env={"RNND_MODEL": ""})


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("TRUE", True), ("1", True), ("yes", True),
                                            ("on", True), ("false", False), ("0", False), ("No", False),
                                            (" off ", False)])
def test_booleans_from_env(raw: str, value: bool) -> None:
    cfg = config.load(argv_values=REQUIRED, env={"RNND_PROVIDER_FALLBACK": raw, "RNND_CREATE_TOPICS": raw})
    assert cfg.provider_fallback is value and cfg.create_topics is value


@pytest.mark.parametrize(("setting", "raw"), [("warmup", "later"), ("non_finite", "nan"), ("compression", "brotli"),
                                              ("log_level", "verbose"), ("log_format", "xml"),
                                              ("generate_strategy", "beam"), ("generate_at", "start")])
def test_choices_are_enforced(setting: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{setting} from RNND_{setting.upper()} must be one of .*not '{raw}'$"):
        config.load(argv_values=REQUIRED, env={f"RNND_{setting.upper()}": raw})
    choices = next(f.metadata["choices"] for f in config.settings_of() if f.name == setting)
    companions = {"generate_strategy": {"generate_tokens": 1},  # they only act with this
                  "generate_at": {"generate_tokens": 1}}.get(setting, {})
    for ok in choices:
        assert getattr(config.load(argv_values={**REQUIRED, **companions, setting: ok}, env={}), setting) == ok


@pytest.mark.parametrize(("emit", "every"), [("every", 1), ("every:1", 1), ("every:3", 3), ("every:250", 250),
                                             ("end", 0)])
def test_emit_parsing(emit: str, every: int) -> None:
    assert config.load(argv_values={**REQUIRED, "emit": emit}, env={}).emit_every == every


@pytest.mark.parametrize("emit", ["every:0", "every:", "every:x", "every:-2", "sometimes", "EVERY", "end:3"])
def test_bad_emit_values(emit: str) -> None:
    with pytest.raises(ConfigError, match=r"emit must be every, every:N \(N >= 1\) or end"):
        config.load(argv_values=REQUIRED, env={"RNND_EMIT": emit})


@pytest.mark.parametrize(("value", "names"), [("traceparent,tracestate", {"traceparent", "tracestate"}),
                                              ("", set()), (" b3 , x-request-id ", {"b3", "x-request-id"})])
def test_copy_headers_values(value: str, names: set[str]) -> None:
    assert config.load(argv_values={**REQUIRED, "copy_headers": value}, env={}).copied_headers == names


@pytest.mark.parametrize("value", ["traceparent,,tracestate", "a b", ",", "trace\tparent"])
def test_bad_copy_headers_values(value: str) -> None:
    with pytest.raises(ConfigError, match=r"copy_headers .*must be header names separated by commas"):
        config.load(argv_values={**REQUIRED, "copy_headers": value}, env={})


@pytest.mark.parametrize(("provider", "ok"), [("cpu", True), ("cuda", True), ("cuda:1", True), ("tensorrt:0", True),
                                              ("gpu", False), ("cuda:", False), ("cpu:0", False)])
def test_provider_values(provider: str, ok: bool) -> None:
    if ok:
        assert config.load(argv_values={**REQUIRED, "provider": provider}, env={}).provider == provider
    else:
        with pytest.raises(ConfigError, match=r"provider must be cpu, cuda\[:N\] or tensorrt\[:N\]"):
            config.load(argv_values={**REQUIRED, "provider": provider}, env={})


@pytest.mark.parametrize(("setting", "raw", "message"), [
    ("max_batch", "0", "max_batch from --max-batch must be between 1 and 1048576, not 0"),
    ("max_chunk", "-1", "max_chunk from --max-chunk must be between 1 and 65536, not -1"),
    ("stream_ttl_s", "-1", "stream_ttl_s from --stream-ttl-s must be >= 0, not -1.0"),
    ("commit_interval_s", "0", "commit_interval_s from --commit-interval-s must be > 0 and <= 3600, not 0.0"),
])
def test_range_checks(setting: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(argv_values={**REQUIRED, setting: raw}, env={})
    assert str(err.value) == message


def test_replace_validates() -> None:
    cfg = config.load(argv_values=REQUIRED, env={})
    assert config.replace(cfg, max_batch=7).max_batch == 7
    with pytest.raises(ConfigError, match=r"^max_batch must be between 1 and 1048576, not 0$"):
        config.replace(cfg, max_batch=0)


def test_every_setting_has_a_flag_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    parser.print_help()
    text = capsys.readouterr().out
    for f in config.settings_of():
        assert "--" + f.name.replace("_", "-") in text
        assert f"RNND_{f.name.upper()}" in text


def test_docs_configuration_md_holds_exactly_the_generated_table() -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    begin, end = "<!-- settings:begin -->\n", "\n<!-- settings:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, "markers missing or repeated"
    table = text.split(begin, 1)[1].split(end, 1)[0]
    assert table == config.docs_table(), "docs/configuration.md is stale: paste `rnnd serve --print-config-docs`"
    # and the table covers every setting, once
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [f.name for f in config.settings_of()]


def test_print_config_docs_needs_no_other_settings(rnnd) -> None:
    result = rnnd("serve", "--print-config-docs")
    assert result.code == 0 and result.out.strip() == config.docs_table()


def test_event_loop_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard loop by default; uvloop when asked; a clear refusal (exit 2) when it is asked for but absent."""
    import sys

    from rnnd.daemon.service.run import _loop_factory

    assert _loop_factory(ServeConfig().event_loop) is None
    uvloop = pytest.importorskip("uvloop")
    assert _loop_factory("uvloop") is uvloop.new_event_loop
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` fail, as when it is not installed
    with pytest.raises(ConfigError, match=r"pip install 'rnnd\[uvloop\]'") as e:
        _loop_factory("uvloop")
    assert e.value.exit_code == 2
