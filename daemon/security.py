"""Kafka connection security: TLS and SASL settings, checked, and turned into aiokafka arguments.

Why one module: the daemon (``rnnd serve``) and every tool that talks to Kafka (``rnnd produce``,
``rnnd tail``) must connect the same way, refuse the same mistakes with the same messages, and
treat secrets the same way. Everything about security lives here, the settings' declarations
included: the daemon's settings compose :class:`KafkaSecurity` as one block, and the tools
load the same block on its own (:func:`from_args`).

Rules this module enforces, and why:

* A setting that would be silently ignored is refused (SASL credentials with a non-SASL protocol,
  TLS files or ``ssl_check_hostname = false`` with a plaintext protocol, ``sasl_allow_plaintext``
  with any protocol but SASL_PLAINTEXT): a half-configured client otherwise connects without the
  protection its operator believes it has, or fails later with an unhelpful broker error.
* SASL over an unencrypted connection needs ``sasl_allow_plaintext = true`` and is logged as a
  warning every time a process connects that way: PLAIN then sends the password in clear text,
  and even SCRAM leaves every record readable on the wire.
* Secrets (``sasl_password``, ``ssl_password``) come from the environment, a file (a mounted
  Kubernetes or Docker secret) or the config file; never a log line, an error message, a
  ``repr`` or a metric. Files are read each time a client is made, so a rotated secret or
  certificate is picked up on the next reconnect.
* A key that turns out to be encrypted when no password was given is an error, never OpenSSL's
  interactive prompt, which would hang a daemon without a terminal.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from . import settings
from .errors import ConfigError, SecurityError
from .settings import opt

__all__ = ["MECHANISMS", "PROTOCOLS", "KafkaSecurity", "SecurityError", "add_arguments", "check", "client_kwargs",
           "from_args"]

log = logging.getLogger("rnnd.security")

#: Values of ``security_protocol`` (Kafka's own names).
PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
#: SASL mechanisms rnnd supports (aiokafka also knows GSSAPI and OAUTHBEARER, which need a
#: Kerberos set-up or a token provider that a settings file cannot express).
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_TLS = ("SSL", "SASL_SSL")
_SASL = ("SASL_PLAINTEXT", "SASL_SSL")

# Protocol/mechanism pairs already warned about in this process: a daemon makes several clients
# per connection attempt, and one loud warning per process is loud enough.
_warned: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class KafkaSecurity:
    """The security settings of one Kafka client: a block of ``rnnd serve``'s settings, and all of the tools'.

    Secret fields are left out of ``repr`` so that logging the object (or an exception that
    shows it) cannot leak them.
    """

    security_protocol: str = opt("PLAINTEXT", "How to connect to Kafka: PLAINTEXT, SSL (TLS), SASL_SSL (TLS and a "
                                              "SASL login) or SASL_PLAINTEXT (a SASL login without encryption; "
                                              "needs sasl_allow_plaintext).", choices=PROTOCOLS)
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

    @classmethod
    def from_settings(cls, source: Any) -> KafkaSecurity:
        """The fields of any object that carries them by name (an argparse namespace, ``ServeConfig``).

        Attributes that are missing or None keep their defaults, so a namespace from a parser
        without the security flags means "no security", as before these settings existed.
        """
        values = {f.name: getattr(source, f.name) for f in fields(cls) if getattr(source, f.name, None) is not None}
        return cls(**values)

    @property
    def mechanism(self) -> str:
        """``sasl_mechanism`` as Kafka spells it (the setting is accepted in any case)."""
        return self.sasl_mechanism.strip().upper()

    @property
    def tls(self) -> bool:
        return self.security_protocol in _TLS

    @property
    def sasl(self) -> bool:
        return self.security_protocol in _SASL

    def validate(self) -> KafkaSecurity:
        """Refuse combinations that cannot work or would silently drop a setting; check files are readable.

        Does not parse certificates or keys (:func:`check` does, by building the TLS context).
        """
        protocol = self.security_protocol
        if protocol not in PROTOCOLS:
            raise SecurityError(f"security_protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
        if self.sasl_allow_plaintext and protocol != "SASL_PLAINTEXT":
            raise SecurityError(f"sasl_allow_plaintext set but security_protocol is {protocol}: it only accepts "
                                "SASL_PLAINTEXT; leave it unset")
        if self.sasl:
            self._validate_sasl()
        else:
            given = [n for n in ("sasl_mechanism", "sasl_username", "sasl_password", "sasl_password_file")
                     if getattr(self, n)]
            if given:
                raise SecurityError(f"{', '.join(given)} set but security_protocol is {protocol}: SASL settings only "
                                    "apply to SASL_SSL (or SASL_PLAINTEXT); set security_protocol = \"SASL_SSL\"")
        tls_given = [n for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_password_file")
                     if getattr(self, n)]
        if not self.ssl_check_hostname:  # off is the non-default: without TLS it would be silently ignored
            tls_given.append("ssl_check_hostname = false")
        if not self.tls and tls_given:
            wanted = "SASL_SSL" if self.sasl else "SSL"
            raise SecurityError(f"{', '.join(tls_given)} set but security_protocol is {protocol}: TLS settings only "
                                f"apply to SSL or SASL_SSL; set security_protocol = \"{wanted}\"")
        if self.ssl_certfile and not self.ssl_keyfile:
            raise SecurityError("ssl_certfile needs ssl_keyfile (the client certificate's private key; when both "
                                "are in one PEM file, give that file as both)")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise SecurityError("ssl_keyfile needs ssl_certfile (the client certificate the key belongs to)")
        if (self.ssl_password or self.ssl_password_file) and not self.ssl_keyfile:
            raise SecurityError("ssl_password/ssl_password_file set without ssl_keyfile: the password decrypts "
                                "the client key, so give ssl_certfile and ssl_keyfile too")
        if self.ssl_password and self.ssl_password_file:
            raise SecurityError("give ssl_password or ssl_password_file, not both")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password_file", "sasl_password_file"):
            path = getattr(self, name)
            if path:
                _readable(name, path)
        return self

    def _validate_sasl(self) -> None:
        protocol, mechanism = self.security_protocol, self.mechanism
        if not mechanism:
            raise SecurityError(f"security_protocol {protocol} needs sasl_mechanism: {', '.join(MECHANISMS)}")
        if mechanism not in MECHANISMS:
            hint = (" (rnnd does not support it: it needs a Kerberos or token set-up)"
                    if mechanism in ("GSSAPI", "OAUTHBEARER") else "")
            raise SecurityError(f"sasl_mechanism must be one of {', '.join(MECHANISMS)}, not "
                                f"{self.sasl_mechanism!r}{hint}")
        if not self.sasl_username:
            raise SecurityError(f"sasl_mechanism {mechanism} needs sasl_username")
        if self.sasl_password and self.sasl_password_file:
            raise SecurityError("give sasl_password or sasl_password_file, not both")
        if not (self.sasl_password or self.sasl_password_file):
            raise SecurityError(f"sasl_mechanism {mechanism} needs a password: sasl_password_file (a mounted "
                                "secret) or sasl_password (e.g. RNND_SASL_PASSWORD from a secret)")
        if protocol == "SASL_PLAINTEXT" and not self.sasl_allow_plaintext:
            what = ("sends the password in clear text" if mechanism == "PLAIN"
                    else "leaves every record readable on the network")
            raise SecurityError(f"security_protocol SASL_PLAINTEXT with {mechanism} {what}: use SASL_SSL, or set "
                                "sasl_allow_plaintext = true to accept that (e.g. inside a trusted network)")


def check(sec: KafkaSecurity) -> KafkaSecurity:
    """Validate the settings and load what they name (secrets, CA, certificate, key) once.

    Called by ``ServeConfig.validate()`` so that a bad certificate or a wrong key password
    stops ``rnnd serve`` with exit code 2 before the model is loaded, rather than at the
    first connection attempt.
    """
    sec.validate()
    if sec.sasl:
        _sasl_password(sec)
    if sec.tls:
        _ssl_context(sec)
    return sec


def client_kwargs(sec: KafkaSecurity) -> dict[str, Any]:
    """Keyword arguments for ``AIOKafkaProducer``/``AIOKafkaConsumer``/``AIOKafkaAdminClient``.

    Secrets and certificates are read now, not when the settings were loaded: a client made
    after a secret was rotated uses the new one.
    """
    sec.validate()
    kwargs: dict[str, Any] = {"security_protocol": sec.security_protocol}
    if sec.tls:
        kwargs["ssl_context"] = _ssl_context(sec)
    if sec.sasl:
        kwargs["sasl_mechanism"] = sec.mechanism
        kwargs["sasl_plain_username"] = sec.sasl_username
        kwargs["sasl_plain_password"] = _sasl_password(sec)
    if sec.security_protocol == "SASL_PLAINTEXT" and (sec.security_protocol, sec.mechanism) not in _warned:
        _warned.add((sec.security_protocol, sec.mechanism))
        what = ("sends the PASSWORD IN CLEAR TEXT" if sec.mechanism == "PLAIN"
                else "leaves every record readable on the network")
        log.warning("INSECURE: security_protocol SASL_PLAINTEXT with %s (sasl_allow_plaintext = true): Kafka "
                    "traffic is not encrypted and %s; use SASL_SSL outside a trusted network", sec.mechanism, what)
    return kwargs


# --- secrets and TLS ----------------------------------------------------------------------------


def _readable(name: str, path: str) -> None:
    p = Path(path)
    try:
        with p.open("rb"):
            pass
    except FileNotFoundError:
        raise SecurityError(f"{name} {path}: no such file") from None
    except IsADirectoryError:
        raise SecurityError(f"{name} {path}: a directory, not a file") from None
    except PermissionError:
        raise SecurityError(f"{name} {path}: not readable by this user (uid {os.getuid()})") from None
    except OSError as e:
        raise SecurityError(f"{name} {path}: cannot be read ({e.strerror})") from None


def _secret(value: str, file_setting: str, path: str) -> str:
    """A secret given directly, or the content of its file without the trailing newline.

    Only line endings are stripped: ``echo pw > file`` and Kubernetes secrets made from such
    files end in a newline that is not part of the password, but spaces may be.
    """
    if not path:
        return value
    _readable(file_setting, path)
    text = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    if not text:
        raise SecurityError(f"{file_setting} {path}: the file is empty")
    return text


def _sasl_password(sec: KafkaSecurity) -> str:
    return _secret(sec.sasl_password, "sasl_password_file", sec.sasl_password_file)


def _ssl_context(sec: KafkaSecurity) -> ssl.SSLContext:
    """The TLS context: CA (or the system's), optional client certificate, hostname check as set."""
    # Imported here: every `rnnd` command parses the tools' flags, and aiokafka takes ~90 ms to import.
    from aiokafka.helpers import create_ssl_context

    password = _secret(sec.ssl_password, "ssl_password_file", sec.ssl_password_file) if sec.ssl_keyfile else ""

    def key_password() -> str:
        # Called by OpenSSL only for an encrypted key. Raising here (not returning None) is what
        # keeps OpenSSL from prompting on a terminal that a daemon does not have.
        if not password:
            raise SecurityError(f"ssl_keyfile {sec.ssl_keyfile} is encrypted: give ssl_password_file "
                                "(or ssl_password)")
        return password

    if sec.ssl_cafile:
        try:
            ssl.create_default_context(cafile=sec.ssl_cafile)
        except ssl.SSLError as e:
            raise SecurityError(f"ssl_cafile {sec.ssl_cafile}: no CA certificate in PEM format found "
                                f"({_why(e)})") from None
    try:
        ctx = create_ssl_context(cafile=sec.ssl_cafile or None, certfile=sec.ssl_certfile or None,
                                 keyfile=sec.ssl_keyfile or None,
                                 password=key_password if sec.ssl_keyfile else None)
    except ssl.SSLError as e:
        reason = _why(e)
        if password and ("PEM lib" in reason or "BAD_DECRYPT" in reason):
            raise SecurityError(f"ssl_keyfile {sec.ssl_keyfile}: cannot decrypt it with the password given "
                                "(ssl_password/ssl_password_file), or it is not a PEM private key") from None
        raise SecurityError(f"ssl_certfile {sec.ssl_certfile} / ssl_keyfile {sec.ssl_keyfile}: cannot load the "
                            f"client certificate and key ({reason}); both must be PEM, and the key must belong "
                            "to the certificate") from None
    # aiokafka's helper always checks host names; some brokers' certificates lack their advertised
    # names (IP addresses, internal aliases), and turning the check off is then the operator's call.
    # Certificates are still verified against the CA either way.
    ctx.check_hostname = sec.ssl_check_hostname
    return ctx


def _why(e: ssl.SSLError) -> str:
    """OpenSSL's reason without the C source location (``[SSL] PEM lib (_ssl.c:3926)`` → ``[SSL] PEM lib``)."""
    return e.reason or str(e).split(" (_ssl.c:")[0]


# --- command-line flags for the tools ------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--security-protocol``, ``--ssl-*`` and ``--sasl-*`` to a tool's parser (``rnnd produce``/``tail``).

    Same names, help and environment variables as ``rnnd serve``'s settings, so one set of
    ``RNND_*`` variables (for example from a Kubernetes secret) serves the daemon and the tools.
    """
    group = parser.add_argument_group("Kafka security", "as for `rnnd serve` (docs/configuration.md); each flag "
                                      "also reads its RNND_* environment variable")
    settings.add_arguments(group, settings.of(KafkaSecurity), show_default=False, choices=True)


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None,
              within: Iterable[type] = ()) -> KafkaSecurity:
    """Flags over ``RNND_*`` environment variables over defaults (the daemon's precedence, minus the file).

    ``within``: the settings classes this block is also part of (``rnnd serve``'s), whose other
    ``RNND_*`` variables may share the environment; any other ``RNND_*`` variable is refused as a
    typo here too, not left to a silent default.
    """
    env = os.environ if env is None else env
    given = {f.name: getattr(args, f.name) for f in fields(KafkaSecurity) if getattr(args, f.name, None) is not None}
    settings.check_environment(env, [KafkaSecurity, *within])
    try:
        values, _ = settings.layer(KafkaSecurity, env=env)
    except ConfigError as e:
        raise SecurityError(str(e)) from None
    return check(KafkaSecurity(**{**values, **given}))
