"""Declared settings, layered from a TOML file, ``RNND_*`` variables and flags, and checked.

The machinery only: which settings exist is declared elsewhere, as frozen dataclasses whose
fields are :func:`opt` declarations. A field whose type is such a dataclass composes that
block of settings (``security: KafkaSecurity = field(default_factory=KafkaSecurity)``: the
daemon's settings hold the Kafka security block, which the tools load on their own);
a composed block's settings keep their own names everywhere a user spells them (file key,
``RNND_*`` variable, flag, docs table), so composing changes nothing a user sees, and one
name means one setting across the whole program.

Precedence, highest first: flag > environment variable > config file > default. Each value
remembers where it came from, so that an error names the source to fix ("max_batch from
RNND_MAX_BATCH must be ..."), not only the setting.

Secrets (``opt(secret=True)``) never appear in a ``repr``, an error message (not even a
mistyped value: it may be the real one) or :func:`redacted`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .errors import ConfigError

__all__ = ["ENV_NOT_SETTINGS", "ENV_PREFIX", "WORKER_ENV", "Setting", "add_arguments", "build", "check_declared",
           "check_environment", "coerce", "docs_table", "flat_access", "layer", "of", "opt", "read_file",
           "redacted", "replace", "spellings", "value", "with_source"]

ENV_PREFIX = "RNND_"
#: The number of a worker of ``rnnd serve --workers N`` (rnnd.daemon.service.workers), for its log lines.
WORKER_ENV = f"{ENV_PREFIX}WORKER"

#: ``RNND_*`` environment variables that are not settings but are still rnnd's. Any other
#: ``RNND_*`` variable is refused as a typo (``RNND_MAX_BACTH``), as an unknown key of the
#: config file is: otherwise the setting it meant would silently keep its default.
ENV_NOT_SETTINGS = {
    f"{ENV_PREFIX}CONFIG": "the config file, as --config",
    WORKER_ENV: "set by `rnnd serve --workers N` on each worker: its number, shown in its log lines",
    f"{ENV_PREFIX}DEBUG": "set by --debug: tracebacks, and `rnnd export` shows the exporter's own output",
    f"{ENV_PREFIX}TEST_BOOTSTRAP": "the test suite's Kafka (tests/kafka_fixtures.py)",
    f"{ENV_PREFIX}KAFKA_LIBS": "where Apache Kafka's jars are cached (rnnd.apache_kafka, requirements/kafka/fetch.py)",
}


def opt(default: Any, help: str, *, choices: Sequence[str] | None = None, secret: bool = False,
        required: bool = False, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A setting. ``secret=True``: shown as ``***`` by :func:`redacted`, and left out of ``repr``
    so that logging the settings object, or a traceback that shows it, cannot leak it.

    Numbers carry their range (``ge``/``gt`` and ``le``): :func:`check_declared` refuses a value
    outside it, and the docs table shows it, so that a value the program cannot use stops it at
    start rather than failing deep inside a library later.
    """
    return field(default=default, repr=not secret,
                 metadata={"help": help, "choices": choices, "secret": secret, "required": required,
                           "ge": ge, "gt": gt, "le": le})


@dataclass(frozen=True)
class Setting:
    """One setting as users spell it: a flat name, wherever in the composition it is declared."""

    name: str
    type: type
    default: Any
    metadata: Mapping[str, Any]
    group: str = ""  # the attribute holding the composed block, "" for the class's own settings

    @property
    def help(self) -> str:
        return str(self.metadata["help"])

    @property
    def secret(self) -> bool:
        return bool(self.metadata.get("secret"))

    @property
    def choices(self) -> Sequence[str] | None:
        return self.metadata.get("choices")

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}{self.name.upper()}"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@functools.cache
def of(cls: type) -> tuple[Setting, ...]:
    """Every setting of ``cls``, composed blocks flattened in place, in declaration order.

    A name declared twice (in the class and in a block it composes) is refused when the
    class is first used: it would be one file key, one variable and one flag for two settings.
    """
    types = get_type_hints(cls)
    out: list[Setting] = []
    for f in fields(cls):
        if dataclasses.is_dataclass(types[f.name]):
            out.extend(dataclasses.replace(s, group=f.name) for s in of(types[f.name]))
        else:
            out.append(Setting(f.name, _plain(types[f.name]), f.default, f.metadata))
    names = [s.name for s in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TypeError(f"{cls.__name__} declares {', '.join(twice)} more than once")
    return tuple(out)


def _by_name(cls: type) -> dict[str, Setting]:
    return {s.name: s for s in of(cls)}


def _plain(typ: Any) -> type:
    if get_origin(typ) is not None:  # Optional[X]: X
        typ = next(t for t in get_args(typ) if t is not type(None))
    return typ


def value(obj: Any, s: Setting) -> Any:
    return getattr(getattr(obj, s.group), s.name) if s.group else getattr(obj, s.name)


def flat_access(cls: type) -> type:
    """Class decorator: read-only attributes for the settings of composed blocks (``cfg.sasl_username``).

    So every setting reads as ``cfg.<name>``, as it is spelled everywhere else; the block itself
    (``cfg.security``) is what to hand to code that needs only that block.
    """
    def reader(s: Setting) -> property:
        return property(lambda self: value(self, s), doc=s.help)

    for s in of(cls):
        if s.group:
            setattr(cls, s.name, reader(s))
    return cls


def spellings(name: str) -> str:
    return f"--{name.replace('_', '-')}, {ENV_PREFIX}{name.upper()} or `{name}` in the config file"


# --- coercion and layering ----------------------------------------------------------------------


def coerce(s: Setting, raw: Any, source: str) -> Any:
    """A value from a file, a variable or a flag as the setting's type; an error names the source."""
    typ = s.type
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
        result = typ(raw)
        if typ is float and not math.isfinite(result):
            raise ValueError(raw)  # nan passes every `< 0` range check
        return result
    except (TypeError, ValueError):
        shown = "a value not shown here (a secret)" if s.secret else repr(raw)
        raise ConfigError(f"{s.name} from {source} must be {typ.__name__}, got {shown}") from None


def read_file(path: str | Path, table: str) -> dict[str, Any]:
    """The settings of a TOML file: top-level keys or all in one ``[table]``, never both (nothing silently ignored)."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    if table in doc:
        others = sorted(k for k in doc if k != table)
        if not isinstance(doc[table], dict):
            raise ConfigError(f"config file {path}: `{table}` must be a table ([{table}]) of settings")
        if others:
            raise ConfigError(f"config file {path}: settings both at top level ({', '.join(others)}) and in "
                              f"[{table}]; put them all in one place")
        doc = doc[table]
    return doc


def layer(cls: type, *, file: tuple[Mapping[str, Any], str] | None = None, env: Mapping[str, str] | None = None,
          flags: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """File < environment < flags, coerced: (values by flat name, where each came from).

    ``file`` is (its settings, how to name it in errors); file keys may spell ``_`` as ``-``.
    ``flags`` holds only flags the user gave (None: not given).
    """
    settings = _by_name(cls)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def put(name: str, raw: Any, source: str) -> None:
        sources[name] = source
        values[name] = coerce(settings[name], raw, source)

    if file is not None:
        doc, where = file
        for key, raw in doc.items():
            name = key.replace("-", "_")
            if name not in settings:
                raise ConfigError(f"{where}: unknown setting {key!r}")
            put(name, raw, where)
    for s in settings.values():
        raw = (env or {}).get(s.env)
        if raw is not None:
            put(s.name, raw, s.env)
    for name, raw in (flags or {}).items():
        if raw is not None:
            put(name, raw, settings[name].flag)
    return values, sources


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance from values by flat name, each composed block built from its own settings."""
    top: dict[str, Any] = {}
    blocks: dict[str, dict[str, Any]] = {}
    for name, v in values.items():
        s = _by_name(cls)[name]
        if s.group:
            blocks.setdefault(s.group, {})[name] = v
        else:
            top[name] = v
    types = get_type_hints(cls)
    for attr, block_values in blocks.items():
        top[attr] = build(types[attr], block_values)
    return cls(**top)


def replace(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` by flat name: a change to a composed block's setting replaces in the block."""
    settings = _by_name(type(obj))
    top: dict[str, Any] = {}
    blocks: dict[str, dict[str, Any]] = {}
    for name, v in changes.items():
        s = settings.get(name)
        if s is not None and s.group:
            blocks.setdefault(s.group, {})[name] = v
        else:
            top[name] = v
    for attr, block_changes in blocks.items():
        top[attr] = replace(getattr(obj, attr), **block_changes)
    return dataclasses.replace(obj, **top)


def with_source(e: ConfigError, sources: Mapping[str, str]) -> ConfigError:
    """The error with the source of the setting it names: "http_port from RNND_HTTP_PORT must be ..."."""
    msg, name = str(e), e.setting
    if name is not None and name in sources and msg.startswith(f"{name} "):
        return ConfigError(f"{name} from {sources[name]}{msg[len(name):]}", name)
    return e


# --- checks ---------------------------------------------------------------------------------------


def check_declared(obj: Any) -> None:
    """What each declaration says: given when required, of its type, among its choices, inside its range."""
    for s in of(obj.__class__):
        v = value(obj, s)
        if s.metadata.get("required") and v in ("", None):
            raise ConfigError(f"{s.name} is required: {spellings(s.name)}")
        if type(v) is not s.type and not (s.type is float and type(v) is int):
            shown = "a value not shown here (a secret)" if s.secret else repr(v)
            raise ConfigError(f"{s.name} must be {s.type.__name__}, not {shown}", s.name)
        if s.choices and v not in s.choices:
            raise ConfigError(f"{s.name} must be one of {', '.join(s.choices)}, not {v!r}", s.name)
        if not _in_range(s.metadata, v):
            raise ConfigError(f"{s.name} must be {_range_text(s.metadata)}, not {v!r}", s.name)


def _in_range(meta: Mapping[str, Any], v: Any) -> bool:
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    return not ((ge is not None and v < ge) or (gt is not None and v <= gt) or (le is not None and v > le))


def _range_text(meta: Mapping[str, Any]) -> str:
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if le is None:
        return f">= {ge}" if gt is None else f"> {gt}"
    if gt is not None:
        return f"> {gt} and <= {le}"
    return f"between {ge} and {le}"


def check_environment(env: Mapping[str, str], classes: Iterable[type]) -> None:
    """Refuse ``RNND_*`` variables that are not settings of ``classes`` (nor allowed), naming the closest one.

    A mistyped variable would otherwise leave its setting at the default without a word,
    where a mistyped key of the config file is already an error. Values are never shown:
    a mistyped ``RNND_SASL_PASWORD`` holds a password.
    """
    names = {s.name.upper() for cls in classes for s in of(cls)}
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in ENV_NOT_SETTINGS
                     and k.removeprefix(ENV_PREFIX) not in names)
    if not unknown:
        return
    known = sorted(names) + [k.removeprefix(ENV_PREFIX) for k in ENV_NOT_SETTINGS]
    parts = []
    for var in unknown:
        close = difflib.get_close_matches(var.removeprefix(ENV_PREFIX).upper(), known, n=1, cutoff=0.6)
        parts.append(f"{var} (did you mean {ENV_PREFIX}{close[0]}?)" if close else var)
    raise ConfigError(f"unknown environment variable{'s' if len(unknown) > 1 else ''} {', '.join(parts)}: not a "
                      f"setting of rnnd (docs/configuration.md lists them); rename or unset it")


# --- flags, docs, logs ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, settings: Iterable[Setting], *,
                  show_default: bool = True, choices: bool = False) -> None:
    """One flag per setting, default None so that a flag not given does not override the variable or the file.

    ``choices``: let argparse refuse a value outside the declared choices, and list them in the
    help (otherwise the settings' own check refuses it, naming the source).
    """
    for s in settings:
        text = f"{s.help} [env {s.env}; default {s.default!r}]" if show_default else f"{s.help} [env {s.env}]"
        if s.type is bool:
            parser.add_argument(s.flag, dest=s.name, default=None, action=argparse.BooleanOptionalAction, help=text)
        else:
            shown = {"choices": s.choices} if choices and s.choices else {"metavar": s.name.upper()}
            parser.add_argument(s.flag, dest=s.name, default=None, help=text, **shown)


def docs_table(cls: type) -> str:
    """The settings as a Markdown table: file key, flag, variable, type (with choices or range), default, help."""
    rows = ["| setting (file) | flag | environment | type | default | meaning |", "|---|---|---|---|---|---|"]
    for s in of(cls):
        default = "*(required)*" if s.metadata.get("required") else f"`{s.default!r}`"
        typ = s.type.__name__
        if s.choices:
            typ = " \\| ".join(s.choices)
        elif s.metadata.get("ge") is not None or s.metadata.get("gt") is not None:
            typ = f"{typ}, {_range_text(s.metadata).replace('>=', '≥').replace('<=', '≤')}"
        rows.append(f"| `{s.name}` | `{s.flag}` | `{s.env}` | {typ} | {default} | {s.help} |")
    return "\n".join(rows)


def redacted(obj: Any) -> dict[str, Any]:
    """The settings by flat name for logs, secrets that are set replaced by ``***``."""
    return {s.name: ("***" if s.secret and value(obj, s) else value(obj, s)) for s in of(obj.__class__)}
