"""Every error quiesce raises on purpose.

    QuiesceError                 base: a one-line message for the operator
    ├── ConfigError              the config file or a secret file is wrong (exit 2)
    ├── AdapterLoadError         a bundled adapter cannot be used (exit 2)
    ├── AdapterConflictError     two adapters claim one kind (exit 2)
    ├── BusyError                another quiesce already holds the targets (exit 3)
    ├── TargetError              an adapter failed on one target; raised by adapters
    │   └── HoldBroken           released, but the hold did not cover the whole window
    └── MissingDriverError       a database driver is not installed (names the extra)

Adapters raise TargetError (or any exception) from their hooks; the core records it as
a failed outcome for that target and never lets it reach another target.
"""

from __future__ import annotations

import os
import sys


class QuiesceError(Exception):
    """Base class: ``str(error)`` is a complete message for the operator."""

    exit_code = 1


class ConfigError(QuiesceError):
    """The config (or a file it names) is wrong. Says which file, target and key."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.reason = file, key, message
        where = ": ".join(_printable(part) for part in (file, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


def _printable(text: str) -> str:
    """A name from a file, on one line: a TOML key may spell a newline or a NUL."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class AdapterLoadError(QuiesceError):
    exit_code = 2


class AdapterConflictError(QuiesceError):
    exit_code = 2


class BusyError(QuiesceError):
    exit_code = 3


class TargetError(QuiesceError):
    """An adapter could not do its job on a target; the message says what to do."""


class HoldBroken(TargetError):
    """Released, but the target was not held for the whole window.

    Raised by ``thaw`` when the lock was lost, the session dropped or a server-side
    deadline passed before thaw came. The snapshot is then only crash-consistent.
    """


class MissingDriverError(TargetError):
    """A driver is missing; the message names the extra, and the pip of the environment
    quiesce runs in (a bare `pip` is usually another Python's)."""

    def __init__(self, module: str, extra: str):
        pip = os.path.join(os.path.dirname(sys.executable), "pip")
        super().__init__(
            f"the Python module {module!r} is not installed; "
            f"install it with: {pip} install 'quiesce[{extra}]'"
        )
