"""The settings machinery on its own (daemon/settings.py): layering, sources in errors, coercion, composition, secrets.

A small declaration of its own is used, so that these hold for any settings class, not only
for `rnnd serve`'s (tests/test_config.py checks those through ``ServeConfig``).
"""

from __future__ import annotations

import argparse
import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rnnd import tools
from rnnd.daemon import config, security, settings
from rnnd.daemon.errors import ConfigError
from rnnd.daemon.settings import opt

REPO = Path(__file__).resolve().parent.parent
P = settings.ENV_PREFIX  # the toy settings' variables, not spelled out: they are not rnnd's


@dataclass(frozen=True)
class Login:
    user: str = opt("", "User name.")
    token: str = opt("", "The token.", secret=True)
    strict: bool = opt(True, "Refuse what is unclear.")


@settings.flat_access
@dataclass(frozen=True)
class App:
    name: str = opt("", "Name.", required=True)
    size: int = opt(4, "Size.", ge=1, le=64)
    rate: float = opt(1.0, "Rate.", gt=0)
    colour: str = opt("red", "Colour.", choices=("red", "blue"))
    login: Login = field(default_factory=Login)


def load(file: dict | None = None, env: dict | None = None, flags: dict | None = None) -> App:
    values, sources = settings.layer(App, file=(file, "config file x.toml") if file is not None else None,
                                     env=env, flags=flags)
    try:
        app: App = settings.build(App, values)
        settings.check_declared(app)
    except ConfigError as e:
        raise settings.with_source(e, sources) from None
    return app


def test_flag_over_environment_over_file_over_default_for_own_and_composed_settings() -> None:
    app = load(file={"name": "file", "size": 2, "user": "file-user", "strict": False},
               env={f"{P}SIZE": "3", f"{P}USER": "env-user"}, flags={"size": "5", "user": None, "name": None})
    assert (app.name, app.size, app.rate) == ("file", 5, 1.0)  # file; flag over env over file; default
    assert app.login == Login(user="env-user", token="", strict=False)  # the block, built from flat names
    assert (app.user, app.strict) == ("env-user", False)  # read flat, as spelled everywhere else


def test_errors_name_the_source_of_the_value() -> None:
    with pytest.raises(ConfigError, match=rf"^size from {P}SIZE must be between 1 and 64, not 0$"):
        load(file={"name": "n", "size": 3}, env={f"{P}SIZE": "0"})
    with pytest.raises(ConfigError, match=r"^size from config file x.toml must be between 1 and 64, not 65$"):
        load(file={"name": "n", "size": 65})
    with pytest.raises(ConfigError, match=r"^colour from --colour must be one of red, blue, not 'green'$"):
        load(file={"name": "n"}, flags={"colour": "green"})
    with pytest.raises(ConfigError, match=rf"^name is required: --name, {P}NAME or `name` in the config file$"):
        load()
    with pytest.raises(ConfigError, match=r"^config file x.toml: unknown setting 'sise'$"):
        load(file={"name": "n", "sise": 3})
    assert load(file={"name": "n", "size": 2}, env={f"{P}SIZE": "7"}).size == 7  # a valid value from the env


@pytest.mark.parametrize(("raw", "typ", "expected"), [
    ("on", bool, True), ("NO", bool, False), (" 1 ", bool, True), (True, bool, True),
    ("7", int, 7), (7.0, int, 7), ("2.5", float, 2.5), (3, float, 3.0), ("x", str, "x"),
])
def test_coercion_accepts(raw: object, typ: type, expected: object) -> None:
    s = settings.Setting("s", typ, None, {"help": ""})
    got = settings.coerce(s, raw, "VAR")
    assert got == expected and type(got) is typ


@pytest.mark.parametrize(("raw", "typ"), [
    ("maybe", bool), ("", bool), (True, int), (7.5, int), ("nan", float), ("inf", float), (5, str), ([1], str),
])
def test_coercion_refuses_naming_source_and_type(raw: object, typ: type) -> None:
    s = settings.Setting("s", typ, None, {"help": ""})
    with pytest.raises(ConfigError, match=f"^{re.escape(f's from VAR must be {typ.__name__}, got {raw!r}')}$"):
        settings.coerce(s, raw, "VAR")


def test_secrets_stay_out_of_repr_logs_and_errors() -> None:
    app = load(file={"name": "n"}, env={f"{P}TOKEN": "hunter2", f"{P}USER": "u"})
    assert "hunter2" not in repr(app)
    assert settings.redacted(app) == {"name": "n", "size": 4, "rate": 1.0, "colour": "red", "user": "u",
                                      "token": "***", "strict": True}
    assert settings.redacted(load(file={"name": "n"}))["token"] == ""  # unset stays visibly unset
    with pytest.raises(ConfigError) as err:
        load(file={"name": "n", "token": 8675309})
    assert str(err.value) == "token from config file x.toml must be str, got a value not shown here (a secret)"
    with pytest.raises(ConfigError) as err:
        settings.check_declared(App(name="n", login=Login(token=8675309)))  # type: ignore[arg-type]
    assert str(err.value) == "token must be str, not a value not shown here (a secret)"


def test_replace_by_flat_name_reaches_into_the_block() -> None:
    app = load(file={"name": "n"})
    changed = settings.replace(app, user="v", size=9)
    assert (changed.login.user, changed.size, changed.login.strict) == ("v", 9, True) and app.login.user == ""


def test_a_name_declared_in_a_class_and_in_its_block_is_refused() -> None:
    @dataclass(frozen=True)
    class Clash:
        user: str = opt("", "Also a user.")
        login: Login = field(default_factory=Login)

    with pytest.raises(TypeError, match=r"^Clash declares user more than once$"):
        settings.of(Clash)


def test_docs_table_lists_composed_settings_in_place() -> None:
    rows = settings.docs_table(App).splitlines()[2:]
    assert [r.split("`")[1] for r in rows] == ["name", "size", "rate", "colour", "user", "token", "strict"]
    assert rows[1] == f"| `size` | `--size` | `{P}SIZE` | int, between 1 and 64 | `4` | Size. |"
    assert rows[2] == f"| `rate` | `--rate` | `{P}RATE` | float, > 0 | `1.0` | Rate. |"


def test_environment_check_knows_every_class_the_variables_are_shared_with() -> None:
    settings.check_environment({f"{P}SIZE": "1", f"{P}TOKEN": "t", "RNND_CONFIG": "c"}, [App])
    with pytest.raises(ConfigError, match=rf"^unknown environment variable {P}SIZE: "):
        settings.check_environment({f"{P}SIZE": "1"}, [Login])
    # `rnnd produce` reads only the security block, in an environment that may hold all of serve's settings
    env = {"RNND_MAX_BATCH": "8", "RNND_SASL_USERNAME": "u"}
    with pytest.raises(ConfigError, match=r"^unknown environment variable RNND_MAX_BATCH"):
        security.from_args(argparse.Namespace(), env=env)
    with pytest.raises(security.SecurityError, match=r"^sasl_username set but security_protocol is PLAINTEXT"):
        security.from_args(argparse.Namespace(), env=env, within=[config.ServeConfig])


def test_the_tools_accept_serve_settings_in_their_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RNND_MAX_BATCH", "8")
    monkeypatch.setenv("RNND_SECURITY_PROTOCOL", "PLAINTEXT")
    assert tools.kafka_security(argparse.Namespace()) == {"security_protocol": "PLAINTEXT"}


def _imports(path: Path, package: str) -> set[str]:
    """The daemon modules a module imports, deferred imports (inside functions) included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
            found.add(node.module.removeprefix(package + ".").split(".")[0])
    return found


def test_settings_modules_do_not_import_each_other_in_a_cycle() -> None:
    modules = ("settings", "config", "security", "names", "changelog")
    graph = {m: _imports(REPO / "daemon" / f"{m}.py", "rnnd.daemon") & set(modules) for m in modules}

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    cyclic = [m for m in modules if reaches(m, m)]
    assert not cyclic, f"import cycle through {cyclic}: {graph}"
    assert graph["settings"] == set() and graph["names"] == set(), "the generic parts import nothing of rnnd's"
