"""Every error rnnd reports to a person, with the exit code the `rnnd` command ends with.

An :class:`RnndError` is a problem the user can fix: its message is the whole explanation, one
line that says what is wrong and what to do. The command prints it without a traceback (unless
``--debug``) and exits with the error's ``exit_code``. Anything else that escapes is a bug and
keeps its traceback.

    RnndError                    (exit_code set per class or per instance)
    ├── ConfigError              2  a setting is missing, out of range or contradicts another
    │   └── SecurityError        2  Kafka security settings that cannot work together
    ├── BundleError              1  a file is not a usable bundle
    │   └── BundleIntegrityError 2  a bundle changed after export (or of an older format)
    ├── ProviderError            2  the requested device (CUDA, TensorRT) is not really there
    ├── TopicLayoutError         2  topics exist but cannot work together (partition counts)
    ├── MissingTopicError        2  a topic the daemon reads is not on the brokers (the daemon waits for it)
    ├── ChangelogError           2  a changelog record that cannot be used
    ├── BrokerSetupError         2  a broker rnnd starts itself cannot start here (no Java, jars not fetched)
    ├── ToolError (rnnd.tools)   2 by default, 1 for an unreachable broker: produce, tail, topics, broker, demo
    └── ExportError (rnnd.export.errors)  1
        ├── UsageError           2  contradicting or malformed export options
        └── ParityError          3  the graph does not compute what PyTorch computes

Exit codes: 0 success · 1 bad input or an unreachable service · 2 a refused configuration or
deployment (the fix is an operator's, not a retry) · 3 a failed parity proof · 130 interrupted.

Each class keeps the builtin base its callers catch it by (``ValueError`` for bad values,
``RuntimeError`` for a state of the world), so that ``except ValueError`` around a parse still works.
"""

from __future__ import annotations


class RnndError(Exception):
    """A problem the user can fix. ``exit_code``: the class's, unless one is given."""

    exit_code: int = 1

    def __init__(self, message: str = "", *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(RnndError, ValueError):
    """A setting is missing or wrong; the message names it and what is allowed.

    ``setting`` names the setting the message is about, so that the loader can say where its
    value came from (a flag, a variable or the file).
    """

    exit_code = 2

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class SecurityError(ConfigError):
    """Security settings that cannot work together; the message says which and what to do."""


class BundleError(RnndError, ValueError):
    """A file is not a usable bundle. The message says what is wrong and what to do."""

    exit_code = 1


class BundleIntegrityError(BundleError):
    """The file is not what `rnnd export` wrote (or cannot be shown to be): never serve it.

    Exit code 2, like the daemon's other refusals to start on a bad deployment: the fix is an
    operator's (re-export, or restore the file), not a retry.
    """

    exit_code = 2


class ProviderError(RnndError, RuntimeError):
    """The requested device is not there: a configuration problem, not a crash."""

    exit_code = 2


class TopicLayoutError(RnndError, RuntimeError):
    """Topics exist but cannot work together; retrying will not help."""

    exit_code = 2


class MissingTopicError(RnndError, RuntimeError):
    """A topic the daemon reads is not on the brokers.

    The daemon waits for it rather than exit (a deployment job may be about to create it);
    a command that cannot wait ends with exit code 2: creating the topic is an operator's fix.
    """

    exit_code = 2


class ChangelogError(RnndError, ValueError):
    """A changelog record that cannot be used (corrupt, or from an incompatible model)."""

    exit_code = 2


class BrokerSetupError(RnndError, RuntimeError):
    """A broker that rnnd starts itself (Apache Kafka from its jars) cannot start on this machine.

    The message names the missing piece and the one command that provides it; retrying will not help.
    """

    exit_code = 2
