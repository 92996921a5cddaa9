"""Kafka security (daemon/security.py): TLS and SASL settings → aiokafka, refusals, and secrets.

The TLS tests use real PEM files (tests/tls_certs.py) loaded into real SSL contexts, real
handshakes against a local TLS server, and end-to-end runs in which the daemon, ``rnnd
produce`` and ``rnnd tail`` talk to a broker only through an endpoint that makes them
authenticate: a TLS proxy in front of Tansu that demands their client certificate, and Apache
Kafka's own listeners (mutual TLS; SASL_SSL with SCRAM-SHA-256 and -512), which must also
refuse a client without a certificate or with a wrong password. The secrets tests run the
real daemon process with debug logging and look for the password in everything it prints and
exports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import orjson
import pytest
from daemon_harness import DaemonProcess, free_port
from kafka_fixtures import KafkaListeners
from tls_certs import CA, make_ca

from rnnd import tools
from rnnd.daemon import config, kafka, security
from rnnd.daemon.config import ConfigError
from rnnd.daemon.security import KafkaSecurity, SecurityError, client_kwargs
from rnnd.embedded_broker import create_topics

REQUIRED = {"model": "m.onnx", "input_topic": "in", "output_topic": "out"}
SECRET = "hunter2-" + uuid.uuid4().hex  # unique: if it shows up anywhere, it leaked


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return make_ca(tmp_path / "pki")


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SASL_PLAINTEXT warning is once per process; each test starts from 'not yet warned'."""
    monkeypatch.setattr(security, "_warned", set())


def secret_file(tmp_path: Path, text: str, name: str = "password") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- mapping to aiokafka ------------------------------------------------------------------------


def test_default_is_plaintext_and_client_settings_carry_it() -> None:
    assert client_kwargs(KafkaSecurity()) == {"security_protocol": "PLAINTEXT"}
    cfg = config.load(argv_values={**REQUIRED, "bootstrap_servers": "k1:9092,k2:9092"}, env={})
    assert kafka.client_settings(cfg) == {"bootstrap_servers": "k1:9092,k2:9092", "security_protocol": "PLAINTEXT"}
    # the consumer/producer settings are built on client_settings, so they carry security too
    assert kafka.producer_settings(cfg)["security_protocol"] == "PLAINTEXT"
    assert kafka.consumer_settings(cfg, "g")["security_protocol"] == "PLAINTEXT"


def test_ssl_with_ca_maps_to_a_verifying_context(ca: CA) -> None:
    kw = client_kwargs(KafkaSecurity(security_protocol="SSL", ssl_cafile=str(ca.cert)))
    assert set(kw) == {"security_protocol", "ssl_context"} and kw["security_protocol"] == "SSL"
    ctx = kw["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname is True
    subjects = [dict(x[0] for x in c["subject"]) for c in ctx.get_ca_certs()]
    assert {"commonName": "rnnd-test-ca"} in subjects  # our CA, and only because we named it
    # hostname check off: the certificate is still verified against the CA
    ctx = client_kwargs(KafkaSecurity(security_protocol="SSL", ssl_cafile=str(ca.cert),
                                      ssl_check_hostname=False))["ssl_context"]
    assert ctx.check_hostname is False and ctx.verify_mode == ssl.CERT_REQUIRED


def test_ssl_without_ca_uses_the_system_trust_store() -> None:
    ctx = client_kwargs(KafkaSecurity(security_protocol="SSL"))["ssl_context"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname is True


@pytest.mark.parametrize("how", ["value", "file", "unencrypted"])
def test_client_certificate_and_key(ca: CA, tmp_path: Path, how: str) -> None:
    password = None if how == "unencrypted" else SECRET
    issued = ca.issue("rnnd-client", client=True, password=password)
    extra: dict[str, Any] = {}
    if how == "value":
        extra["ssl_password"] = SECRET
    elif how == "file":
        extra["ssl_password_file"] = str(secret_file(tmp_path, SECRET + "\n"))  # newline as `echo` writes it
    sec = KafkaSecurity(security_protocol="SSL", ssl_cafile=str(ca.cert), ssl_certfile=str(issued.cert),
                        ssl_keyfile=str(issued.key), **extra)
    assert isinstance(client_kwargs(sec)["ssl_context"], ssl.SSLContext)  # the key really loaded
    assert SECRET not in repr(sec)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "scram-sha-512"])
def test_sasl_ssl_mechanisms(ca: CA, mechanism: str) -> None:
    kw = client_kwargs(KafkaSecurity(security_protocol="SASL_SSL", ssl_cafile=str(ca.cert), sasl_mechanism=mechanism,
                                     sasl_username="alice", sasl_password=SECRET))
    assert isinstance(kw.pop("ssl_context"), ssl.SSLContext)
    assert kw == {"security_protocol": "SASL_SSL", "sasl_mechanism": mechanism.upper(),
                  "sasl_plain_username": "alice", "sasl_plain_password": SECRET}


def test_password_file_is_read_for_every_client(tmp_path: Path) -> None:
    """Trailing line ends are not part of the password, spaces are; a rotated file is picked up."""
    path = secret_file(tmp_path, "  pass word  \r\n")
    sec = KafkaSecurity(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256", sasl_username="u",
                        sasl_password_file=str(path))
    assert client_kwargs(sec)["sasl_plain_password"] == "  pass word  "
    path.write_text("rotated\n")
    assert client_kwargs(sec)["sasl_plain_password"] == "rotated"


def test_sasl_plaintext_needs_explicit_consent_and_is_a_loud_warning(caplog: pytest.LogCaptureFixture) -> None:
    base = {"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u", "sasl_password": SECRET}
    for mechanism, words in (("PLAIN", "sends the password in clear text"),
                             ("SCRAM-SHA-512", "leaves every record readable on the network")):
        with pytest.raises(SecurityError, match=rf"SASL_PLAINTEXT with {mechanism} {words}: use SASL_SSL, or set "
                                                r"sasl_allow_plaintext = true"):
            client_kwargs(KafkaSecurity(sasl_mechanism=mechanism, **base))
    caplog.set_level(logging.WARNING, logger="rnnd.security")
    sec = KafkaSecurity(sasl_mechanism="PLAIN", sasl_allow_plaintext=True, **base)
    for _ in range(3):  # a daemon makes several clients per connection attempt
        kw = client_kwargs(sec)
    assert kw == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_plain_username": "u",
                  "sasl_plain_password": SECRET}
    warnings = [r for r in caplog.records if r.name == "rnnd.security"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "INSECURE" in warnings[0].getMessage() and "PASSWORD IN CLEAR TEXT" in warnings[0].getMessage()
    assert SECRET not in caplog.text


# --- refusals -----------------------------------------------------------------------------------

SASL = {"sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u", "sasl_password": SECRET}


@pytest.mark.parametrize(("settings", "message"), [
    ({"security_protocol": "TLS"}, r"security_protocol must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
    ({"sasl_mechanism": "PLAIN"}, r"sasl_mechanism set but security_protocol is PLAINTEXT: SASL settings only "
                                  r"apply to SASL_SSL"),
    ({"security_protocol": "SSL", **SASL}, r"sasl_mechanism, sasl_username, sasl_password set but "
                                           r"security_protocol is SSL"),
    ({"security_protocol": "SASL_SSL"}, r"security_protocol SASL_SSL needs sasl_mechanism: PLAIN, SCRAM-SHA-256, "
                                        r"SCRAM-SHA-512"),
    ({"security_protocol": "SASL_SSL", **SASL, "sasl_mechanism": "GSSAPI"},
     r"sasl_mechanism must be one of .* not 'GSSAPI' \(rnnd does not support it"),
    ({"security_protocol": "SASL_SSL", **SASL, "sasl_mechanism": "SCRAM-SHA-1"}, r"not 'SCRAM-SHA-1'$"),
    ({"security_protocol": "SASL_SSL", **SASL, "sasl_username": ""}, r"SCRAM-SHA-512 needs sasl_username"),
    ({"security_protocol": "SASL_SSL", **SASL, "sasl_password": ""},
     r"SCRAM-SHA-512 needs a password: sasl_password_file .* or sasl_password"),
    ({"security_protocol": "SASL_SSL", **SASL, "sasl_password_file": "/run/secrets/pw"},
     r"give sasl_password or sasl_password_file, not both"),
    ({"ssl_cafile": "/etc/ca.pem"}, r"ssl_cafile set but security_protocol is PLAINTEXT: TLS settings only apply "
                                    r"to SSL or SASL_SSL; set security_protocol = \"SSL\""),
    ({"security_protocol": "SASL_PLAINTEXT", **SASL, "sasl_allow_plaintext": True, "ssl_password": SECRET},
     r"ssl_password set but security_protocol is SASL_PLAINTEXT: .* set security_protocol = \"SASL_SSL\""),
    ({"security_protocol": "SSL", "ssl_certfile": "/c.pem"}, r"ssl_certfile needs ssl_keyfile"),
    ({"security_protocol": "SSL", "ssl_keyfile": "/k.pem"}, r"ssl_keyfile needs ssl_certfile"),
    ({"security_protocol": "SSL", "ssl_password": SECRET}, r"ssl_password/ssl_password_file set without ssl_keyfile"),
    ({"security_protocol": "SSL", "ssl_certfile": "/c", "ssl_keyfile": "/k", "ssl_password": SECRET,
      "ssl_password_file": "/p"}, r"give ssl_password or ssl_password_file, not both"),
])
def test_bad_combinations_are_refused_with_a_clear_message(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(SecurityError, match=message) as err:
        client_kwargs(KafkaSecurity(**settings))
    assert SECRET not in str(err.value)
    assert err.value.exit_code == 2
    # the same refusal, word for word, from the daemon's configuration (flags/env/file)
    env = {f"RNND_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()}
    if settings.get("security_protocol", "PLAINTEXT") in security.PROTOCOLS:
        with pytest.raises(ConfigError, match=message) as err2:
            config.load(argv_values=REQUIRED, env=env)
        assert str(err2.value) == str(err.value)


def test_files_must_exist_and_be_readable(tmp_path: Path, ca: CA) -> None:
    with pytest.raises(SecurityError, match=rf"^ssl_cafile {tmp_path}/nope.pem: no such file$"):
        client_kwargs(KafkaSecurity(security_protocol="SSL", ssl_cafile=str(tmp_path / "nope.pem")))
    with pytest.raises(SecurityError, match=r"sasl_password_file .*: a directory, not a file"):
        client_kwargs(KafkaSecurity(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u",
                                    sasl_password_file=str(tmp_path)))
    empty = secret_file(tmp_path, "\n", "empty")
    with pytest.raises(SecurityError, match=r"sasl_password_file .*empty: the file is empty"):
        client_kwargs(KafkaSecurity(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u",
                                    sasl_password_file=str(empty)))
    not_pem = secret_file(tmp_path, "not a certificate", "ca.pem")
    with pytest.raises(SecurityError, match=r"ssl_cafile .*ca.pem: no CA certificate in PEM format found"):
        client_kwargs(KafkaSecurity(security_protocol="SSL", ssl_cafile=str(not_pem)))


def test_unreadable_file_names_the_user() -> None:
    """A secret the daemon's user cannot read: the error names the file and the uid.

    Root reads files whatever their mode, so as root the check runs in a forked child that has
    switched to an unprivileged user (as the container's non-root user would be).
    """

    def check(path: Path) -> str:
        try:
            client_kwargs(KafkaSecurity(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u",
                                        sasl_password_file=str(path)))
        except SecurityError as e:
            return str(e)
        return "no error"

    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        os.chmod(folder, 0o755)  # reachable by the unprivileged user; the file itself is not readable
        path = secret_file(Path(folder), SECRET)
        path.chmod(0)
        if os.geteuid() != 0:
            got, uid = check(path), os.getuid()
        else:
            uid = 65534  # nobody
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: drop privileges, check, report, exit without pytest's clean-up
                try:
                    os.setgid(uid)
                    os.setuid(uid)
                    os.write(write_end, check(path).encode())
                finally:
                    os._exit(0)
            os.close(write_end)
            with os.fdopen(read_end, "rb") as r:
                got = r.read().decode()
            os.waitpid(pid, 0)
    assert got == f"sasl_password_file {path}: not readable by this user (uid {uid})"


def test_key_problems_are_explained_not_prompted_for(ca: CA, tmp_path: Path) -> None:
    encrypted = ca.issue("enc-client", client=True, password=SECRET)
    other = ca.issue("other-client", client=True)
    base = {"security_protocol": "SSL", "ssl_cafile": str(ca.cert)}
    # An encrypted key and no password: an error, not OpenSSL's prompt (which would hang a daemon).
    # stdin is a pipe here, so a prompt would block the test instead of failing it quietly.
    with pytest.raises(SecurityError, match=rf"ssl_keyfile {encrypted.key} is encrypted: give ssl_password_file"):
        client_kwargs(KafkaSecurity(**base, ssl_certfile=str(encrypted.cert), ssl_keyfile=str(encrypted.key)))
    with pytest.raises(SecurityError, match=r"cannot decrypt it with the password given") as err:
        client_kwargs(KafkaSecurity(**base, ssl_certfile=str(encrypted.cert), ssl_keyfile=str(encrypted.key),
                                    ssl_password="wrong-" + SECRET))
    assert SECRET not in str(err.value)
    with pytest.raises(SecurityError, match=r"cannot load the client certificate and key \(KEY_VALUES_MISMATCH\)"):
        client_kwargs(KafkaSecurity(**base, ssl_certfile=str(encrypted.cert), ssl_keyfile=str(other.key)))


# --- configuration: env, file, redaction ---------------------------------------------------------


def test_settings_from_env_and_file_reach_the_client(tmp_path: Path, ca: CA) -> None:
    pw = secret_file(tmp_path, SECRET + "\n")
    conf = tmp_path / "rnnd.toml"
    conf.write_text(f'security_protocol = "SASL_SSL"\nsasl_mechanism = "SCRAM-SHA-256"\nssl_cafile = "{ca.cert}"\n'
                    f'sasl_password_file = "{pw}"\n')
    cfg = config.load(argv_values=REQUIRED, env={"RNND_SASL_USERNAME": "svc-rnnd"}, config_file=conf)
    kw = kafka.client_settings(cfg)
    assert (kw["security_protocol"], kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"]) == \
        ("SASL_SSL", "SCRAM-SHA-256", "svc-rnnd", SECRET)
    # a problem in a file stops the configuration, before any model is loaded or client made
    pw.unlink()
    with pytest.raises(ConfigError, match=rf"sasl_password_file {pw}: no such file"):
        config.load(argv_values=REQUIRED, env={"RNND_SASL_USERNAME": "svc-rnnd"}, config_file=conf)


def test_redacted_and_repr_never_show_secrets() -> None:
    cfg = config.load(argv_values=REQUIRED, env={
        "RNND_SECURITY_PROTOCOL": "SASL_SSL", "RNND_SASL_MECHANISM": "PLAIN", "RNND_SASL_USERNAME": "alice",
        "RNND_SASL_PASSWORD": SECRET})
    red = cfg.redacted()
    assert red["sasl_password"] == "***" and red["sasl_username"] == "alice"
    assert red["ssl_password"] == ""  # unset stays visibly unset
    assert SECRET not in str(red) and SECRET not in repr(cfg)
    assert SECRET not in repr(KafkaSecurity.from_settings(cfg))
    secrets = {s.name for s in config.settings_of() if s.metadata.get("secret")}
    assert secrets == {"ssl_password", "sasl_password"}


def test_a_mistyped_secret_is_not_echoed_in_the_error(tmp_path: Path) -> None:
    conf = tmp_path / "rnnd.toml"
    conf.write_text("sasl_password = 8675309123\n")
    with pytest.raises(ConfigError, match=r"sasl_password from config file .* must be str, got a value not shown") \
            as err:
        config.load(argv_values=REQUIRED, env={}, config_file=conf)
    assert "8675309123" not in str(err.value)


def test_security_settings_match_the_daemon_schema() -> None:
    """ServeConfig composes KafkaSecurity: its settings are serve's, with the same names, defaults and types."""
    serve = {s.name: s for s in config.settings_of()}
    for f in fields(KafkaSecurity):
        assert f.name in serve, f.name
        assert serve[f.name].default == f.default and type(serve[f.name].default) is type(f.default), f.name
        assert serve[f.name].metadata.get("secret", False) == (f.repr is False), f.name


# --- real TLS handshakes -------------------------------------------------------------------------


class TlsServer:
    """A one-connection-at-a-time TLS server in a thread: handshakes, records the client's certificate CN."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.clients: list[str | None] = []
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    cert = tls.getpeercert()
                    self.clients.append(dict(x[0] for x in cert["subject"])["commonName"] if cert else None)
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as e:
                self.errors.append(type(e).__name__)

    def close(self) -> None:
        self.sock.close()


def server_context(ca: CA, name: str, hosts: tuple[str, ...], require_client_cert: bool = True) -> ssl.SSLContext:
    issued = ca.issue(name, hosts=hosts)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(issued.cert, issued.key)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(ca.cert)
    return ctx


def handshake(ctx: ssl.SSLContext, port: int, host: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        return tls.recv(2)


def test_tls_contexts_complete_real_handshakes(ca: CA, tmp_path: Path) -> None:
    client = ca.issue("rnnd-client", client=True, password=SECRET)
    pw = secret_file(tmp_path, SECRET)
    sec = KafkaSecurity(security_protocol="SSL", ssl_cafile=str(ca.cert), ssl_certfile=str(client.cert),
                        ssl_keyfile=str(client.key), ssl_password_file=str(pw))
    server = TlsServer(server_context(ca, "broker", ("broker.kafka.svc",)))
    try:
        # mutual TLS: the server verified our client certificate and saw its name
        assert handshake(client_kwargs(sec)["ssl_context"], server.port, "broker.kafka.svc") == b"ok"
        assert server.clients == ["rnnd-client"]
        # a name the certificate does not carry: refused with the check, accepted without it
        with pytest.raises(ssl.SSLCertVerificationError, match=r"Hostname mismatch|doesn.t match"):
            handshake(client_kwargs(sec)["ssl_context"], server.port, "kafka.example.com")
        off = KafkaSecurity(**{**sec.__dict__, "ssl_check_hostname": False})
        assert handshake(client_kwargs(off)["ssl_context"], server.port, "kafka.example.com") == b"ok"
    finally:
        server.close()
    # a broker certificate from another CA is refused even with the hostname check off
    rogue = TlsServer(server_context(make_ca(tmp_path / "rogue", "rogue-ca"), "broker", ("broker.kafka.svc",),
                                     require_client_cert=False))
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            handshake(client_kwargs(off)["ssl_context"], rogue.port, "broker.kafka.svc")
    finally:
        rogue.close()


# --- the tools ------------------------------------------------------------------------------------


class _Refused(Exception):
    pass


def _recording_client(seen: list[dict[str, Any]]) -> type:
    from aiokafka.errors import KafkaConnectionError

    class Client:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            seen.append(kwargs)

        async def start(self) -> None:
            raise KafkaConnectionError("refused by the test")

        async def stop(self) -> None:
            pass

        async def close(self) -> None:
            pass

    return Client


def tool_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    tools.add_parsers(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


def test_produce_and_tail_hand_the_security_settings_to_their_clients(
        ca: CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import aiokafka
    import aiokafka.admin

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", _recording_client(seen))
    monkeypatch.setattr(aiokafka.admin, "AIOKafkaAdminClient", _recording_client(seen))
    monkeypatch.setenv("RNND_SASL_PASSWORD", SECRET)  # the secret from the environment, as in a pod
    data = tmp_path / "in.csv"
    data.write_text("key,x\na,1\n")
    flags = ["--bootstrap-servers", "kafka:9093", "--security-protocol", "SASL_SSL", "--ssl-cafile", str(ca.cert),
             "--sasl-mechanism", "SCRAM-SHA-512", "--sasl-username", "tool"]
    args = tool_args("produce", str(data), "--topic", "t", "--key-column", "key", *flags)
    assert tools.produce(args) == 1  # our fake broker refuses: exit 1, "cannot reach Kafka"
    args = tool_args("tail", "--topic", "t", *flags)
    assert tools.tail(args) == 1
    assert len(seen) == 2
    for kw in seen:
        assert (kw["security_protocol"], kw["sasl_mechanism"], kw["sasl_plain_username"],
                kw["sasl_plain_password"]) == ("SASL_SSL", "SCRAM-SHA-512", "tool", SECRET)
        assert isinstance(kw["ssl_context"], ssl.SSLContext)
    err = capsys.readouterr().err
    assert "cannot reach Kafka" in err and SECRET not in err


def test_tools_refuse_bad_security_settings_before_connecting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import aiokafka

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", _recording_client(seen))
    data = tmp_path / "in.csv"
    data.write_text("key,x\na,1\n")
    monkeypatch.setenv("RNND_SECURITY_PROTOCOL", "SASL_SSL")  # env alone, as the daemon's would be
    args = tool_args("produce", str(data), "--topic", "t", "--key-column", "key", "--bootstrap-servers", "k:1")
    assert tools.produce(args) == 2
    assert "rnnd produce: error: security_protocol SASL_SSL needs sasl_mechanism" in capsys.readouterr().err
    assert seen == []


# --- the daemon: secrets never in logs or metrics ---------------------------------------------------


@pytest.mark.parametrize("target", ["closed port", "broker without SASL"])
def test_daemon_never_logs_or_exports_the_password(recipe_bundle: Callable[[str], Path], bootstrap: str,
                                                   tmp_path: Path, target: str) -> None:
    """Debug logging (aiokafka's too), connection failures and retries: the password appears nowhere.

    Against the test broker the client gets as far as the SASL handshake, which the broker
    refuses; against a closed port it retries the TCP connection. Either way the daemon keeps
    retrying, serves /healthz and /metrics, warns once that SASL_PLAINTEXT is insecure, and
    stops cleanly on SIGTERM.
    """
    servers = f"127.0.0.1:{free_port()}" if target == "closed port" else bootstrap
    env = {"RNND_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "RNND_SASL_MECHANISM": "SCRAM-SHA-512",
           "RNND_SASL_USERNAME": "alice", "RNND_SASL_PASSWORD": SECRET, "RNND_SASL_ALLOW_PLAINTEXT": "true"}
    d = DaemonProcess(recipe_bundle("product"), servers, "secret-in", "secret-out", "--log-level", "debug",
                      log_dir=tmp_path, env=env)
    with d:
        d.start(wait_ready=False)
        deadline = time.monotonic() + 60
        while d.log().count("not reachable") < 2 and time.monotonic() < deadline:
            assert d.proc is not None and d.proc.poll() is None, d.log()
            time.sleep(0.2)
        assert d.log().count("not reachable") >= 2, d.log()[-3000:]
        assert d.http("/healthz")[0] == 200 and d.http("/readyz")[0] == 503
        status, metrics = d.http("/metrics")
        assert status == 200 and "rnnd_kafka_errors_total" in metrics
        assert d.stop() == 0
    log = d.log()
    assert SECRET not in log and SECRET not in metrics
    assert "alice" not in metrics
    assert log.count("INSECURE: security_protocol SASL_PLAINTEXT with SCRAM-SHA-512") == 1, log[-3000:]


# --- end to end over TLS: daemon, produce and tail through a TLS-only broker endpoint ------------------


class TlsProxy:
    """TLS termination in front of a plaintext broker port, demanding a client certificate.

    The broker advertises the proxy's address, so every connection a client makes after
    bootstrapping goes through TLS too; the proxy records the client certificate of each.
    """

    def __init__(self, ctx: ssl.SSLContext, port: int, target: int) -> None:
        self.ctx, self.port, self.target = ctx, port, target
        self.clients: list[str] = []
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TlsProxy:
        self._thread.start()
        assert self._ready.wait(10), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                                   ssl=self.ctx))
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:  # close the listening socket and the connections still piped, or the GC reports them later
            server.close()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*asyncio.all_tasks(self.loop), return_exceptions=True))
            self.loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cert = writer.get_extra_info("peercert")
        self.clients.append(dict(x[0] for x in cert["subject"])["commonName"])
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            with contextlib.suppress(Exception):
                w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
def tls_broker(tmp_path: Path, ca: CA) -> Iterator[tuple[str, TlsProxy]]:
    """A private Tansu broker reachable only through TLS (it advertises the TLS proxy's address)."""
    from rnnd.embedded_broker import broker_binary

    inner, outer = free_port(), free_port()
    log = (tmp_path / "tansu.log").open("wb")
    proc = subprocess.Popen([str(broker_binary()), "broker", "--listener-url", f"tcp://127.0.0.1:{inner}",
                             "--advertised-listener-url", f"tcp://127.0.0.1:{outer}",
                             "--storage-engine", "memory://tansu/"], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while b"ready in" not in (tmp_path / "tansu.log").read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "tansu.log").read_text()
            time.sleep(0.05)
        with TlsProxy(server_context(ca, "broker", ("127.0.0.1",)), outer, inner) as proxy:
            yield f"127.0.0.1:{outer}", proxy
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def create_topics_over(servers: str, sec: KafkaSecurity, *names: str) -> None:
    """Create two-partition topics through the secured endpoint itself (the admin client's TLS/SASL too)."""

    async def make() -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=servers, **client_kwargs(sec))
        await admin.start()
        try:
            await admin.create_topics([NewTopic(n, 2, 1) for n in names])
        finally:
            await admin.close()

    asyncio.run(make())


def rnnd_command(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m rnnd ...`` as its own process, as an operator runs the tools."""
    return subprocess.run([sys.executable, "-m", "rnnd", *map(str, argv)], capture_output=True, text=True, timeout=90)


def serve_produce_and_tail(bundle: Path, servers: str, flags: list[str], topic_in: str, topic_out: str,
                           tmp_path: Path) -> tuple[list[dict[str, Any]], str]:
    """``rnnd produce`` 5 steps of 2 streams, the daemon predicts, ``rnnd tail`` reads them: all with ``flags``.

    Returns the tailed predictions and everything the three commands printed or logged.
    """
    data = tmp_path / "steps.csv"
    data.write_text("key,x\n" + "".join(f"s{i % 2},{0.1 * i:.1f}\n" for i in range(5)))
    produced = rnnd_command("produce", data, "--topic", topic_in, "--bootstrap-servers", servers, "--key-column", "key",
                            *flags)
    assert produced.returncode == 0, produced.stderr
    assert "sent 5 messages" in produced.stderr
    with DaemonProcess(bundle, servers, topic_in, topic_out, *flags, log_dir=tmp_path, group=f"g-{topic_in}") as d:
        d.start(timeout=90)
        tailed = rnnd_command("tail", "--topic", topic_out, "--bootstrap-servers", servers, "--from-beginning",
                              "--limit", "5", "--json", *flags)
        assert tailed.returncode == 0, tailed.stderr
        predictions = [orjson.loads(line) for line in tailed.stdout.splitlines()]
        assert d.stop() == 0, d.log()[-3000:]
    assert sorted((p["key"], p["step"]) for p in predictions) == [("s0", 0), ("s0", 1), ("s0", 2), ("s1", 0),
                                                                   ("s1", 1)]
    return predictions, produced.stdout + produced.stderr + tailed.stderr + d.log()


def test_serve_produce_and_tail_over_mutual_tls(recipe_bundle: Callable[[str], Path], tls_broker: tuple[str, TlsProxy],
                                                ca: CA, tmp_path: Path) -> None:
    servers, proxy = tls_broker
    client = ca.issue("rnnd-client", client=True, password=SECRET)
    pw = secret_file(tmp_path, SECRET + "\n")
    tls = ["--security-protocol", "SSL", "--ssl-cafile", str(ca.cert), "--ssl-certfile", str(client.cert),
           "--ssl-keyfile", str(client.key), "--ssl-password-file", str(pw)]
    sec = KafkaSecurity(security_protocol="SSL", ssl_cafile=str(ca.cert), ssl_certfile=str(client.cert),
                        ssl_keyfile=str(client.key), ssl_password_file=str(pw))
    create_topics_over(servers, sec, "tls-in", "tls-out")
    _, printed = serve_produce_and_tail(recipe_bundle("product"), servers, tls, "tls-in", "tls-out", tmp_path)
    # every connection — admin, producer, daemon (admin, producer, consumers), tail — presented our certificate
    assert len(proxy.clients) >= 5 and set(proxy.clients) == {"rnnd-client"}
    assert SECRET not in printed


# --- end to end on Apache Kafka's own listeners: mutual TLS, SASL_SSL with SCRAM -----------------------


def _kafka_client(kafka_security: KafkaListeners, how: str, tmp_path: Path) -> tuple[str, list[str], KafkaSecurity,
                                                                                     str]:
    """(bootstrap servers, flags, the same settings for an admin client, the secret) for one way in.

    Mutual TLS uses a client key encrypted with a password from a file, as the proxy test does.
    """
    k = kafka_security
    if how == "mutual TLS":
        client = k.pki.issue(f"rnnd-client-{uuid.uuid4().hex[:6]}", client=True, password=SECRET)
        pw = secret_file(tmp_path, SECRET + "\n")
        sec = KafkaSecurity(security_protocol="SSL", ssl_cafile=str(k.ca), ssl_certfile=str(client.cert),
                            ssl_keyfile=str(client.key), ssl_password_file=str(pw))
        flags = ["--security-protocol", "SSL", "--ssl-cafile", str(k.ca), "--ssl-certfile", str(client.cert),
                 "--ssl-keyfile", str(client.key), "--ssl-password-file", str(pw)]
        return k.ssl_bootstrap_servers, flags, sec, SECRET
    sec = KafkaSecurity(security_protocol="SASL_SSL", ssl_cafile=str(k.ca), sasl_mechanism=how,
                        sasl_username=k.username, sasl_password_file=str(k.password_file))
    return k.sasl_bootstrap_servers, k.sasl_flags(how), sec, k.password


@pytest.mark.parametrize("how", ["mutual TLS", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_serve_produce_and_tail_on_apache_kafka(recipe_bundle: Callable[[str], Path], kafka_security: KafkaListeners,
                                                tmp_path: Path, how: str) -> None:
    """Kafka's own TLS and SASL/SCRAM, not a proxy: the listener only admits a client that authenticates."""
    servers, flags, sec, secret = _kafka_client(kafka_security, how, tmp_path)
    topic_in, topic_out = f"sec-in-{uuid.uuid4().hex[:8]}", f"sec-out-{uuid.uuid4().hex[:8]}"
    create_topics_over(servers, sec, topic_in, topic_out)
    _, printed = serve_produce_and_tail(recipe_bundle("product"), servers, flags, topic_in, topic_out, tmp_path)
    assert secret not in printed
    assert "Traceback" not in printed


def _one_line_refusal(result: subprocess.CompletedProcess[str], command: str, servers: str, login: bool) -> str:
    """``login``: a refused SASL login, said as such (exit 2: a setting to fix); else an unreachable broker (1)."""
    lines = result.stderr.strip().splitlines()
    if login:
        assert result.returncode == 2, (result.returncode, result.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"rnnd {command}: error: Kafka at {servers} refused the "
                                                       "login (SaslAuthenticationFailed:"), lines
        assert "--sasl-username and the password" in lines[0]
    else:
        assert result.returncode == 1, (result.returncode, result.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"rnnd {command}: error: cannot reach Kafka at {servers}"), lines
    return result.stdout + result.stderr


@pytest.mark.parametrize("how", ["no client certificate", "wrong SCRAM-SHA-256 password",
                                 "wrong SCRAM-SHA-512 password"])
def test_apache_kafka_refuses_a_client_that_does_not_authenticate(
        recipe_bundle: Callable[[str], Path], kafka_security: KafkaListeners, tmp_path: Path, how: str) -> None:
    """The same listener, the same settings but for the certificate or the password: refused.

    The right credentials work first (so the refusal is the broker's verdict, not a wrong
    address); then ``rnnd produce`` and ``rnnd tail`` fail with one line — a refused login said as
    such (exit 2), a refused handshake as an unreachable broker (exit 1) — and the daemon retries,
    one line per try, not ready, until it is stopped. No traceback, and neither the
    wrong password nor the right one appears in anything they print.
    """
    k = kafka_security
    wrong = "wrong-" + SECRET
    if how == "no client certificate":
        servers, good = k.ssl_bootstrap_servers, k.ssl_flags()
        bad = ["--security-protocol", "SSL", "--ssl-cafile", str(k.ca)]
    else:
        mechanism = how.split()[1]
        servers, good = k.sasl_bootstrap_servers, k.sasl_flags(mechanism)
        bad = [*good[:-1], str(secret_file(tmp_path, wrong + "\n", "wrong-password"))]
        assert good[-2] == bad[-2] == "--sasl-password-file"
    topic = f"refused-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(k.bootstrap_servers, {topic: 2, f"{topic}-out": 2}))
    data = tmp_path / "steps.csv"
    data.write_text("key,x\ns0,0.1\n")
    ok = rnnd_command("produce", data, "--topic", topic, "--bootstrap-servers", servers, "--key-column", "key", *good)
    assert ok.returncode == 0, ok.stderr
    login = how != "no client certificate"
    printed = _one_line_refusal(rnnd_command("produce", data, "--topic", topic, "--bootstrap-servers", servers,
                                             "--key-column", "key", *bad), "produce", servers, login)
    printed += _one_line_refusal(rnnd_command("tail", "--topic", topic, "--bootstrap-servers", servers,
                                              "--from-beginning", "--limit", "1", *bad), "tail", servers, login)
    said = "refused the login (SaslAuthenticationFailed" if login else "not reachable"
    with DaemonProcess(recipe_bundle("product"), servers, topic, f"{topic}-out", *bad, log_dir=tmp_path) as d:
        d.start(wait_ready=False)
        deadline = time.monotonic() + 60
        while d.log().count(said) < 2 and time.monotonic() < deadline:
            assert d.proc is not None and d.proc.poll() is None, d.log()
            time.sleep(0.2)
        tries = [line for line in d.log().splitlines() if said in line]
        assert len(tries) >= 2, d.log()[-3000:]
        assert d.http("/healthz")[0] == 200 and d.http("/readyz")[0] == 503
        assert d.stop() == 0
    printed += d.log()
    assert all(line.startswith("20") for line in d.log().splitlines()), d.log()[-3000:]  # one line per record
    assert "Traceback" not in printed
    assert wrong not in printed and k.password not in printed


