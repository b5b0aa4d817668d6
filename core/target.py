"""What adapters receive (Target) and what they hand back for holding (Hold)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError

_REQUIRED = object()

#: Defaults of the ``timeout`` and ``max_hold`` settings (the config file's top level and
#: each target); the config loader reads them from here.
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_HOLD = 120.0
#: A hook call may take this many ``timeout``-bounded steps (connect, lock, statement, …)
#: before the core abandons it, plus a grace for the thread and the interpreter.
CALL_STEPS = 4
CALL_GRACE = 5.0


def check_private_file(path: str, *, what: str = "file", config_file: str | None = None,
                       key: str | None = None) -> None:
    """Refuse a file that other users could read or change: it may hold credentials.

    The owner must be root or the user running quiesce; group and other get no access.
    This is the rule the Azure host applies to its own config, for the same reason.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist", file=config_file, key=key) from None
    except PermissionError:
        raise ConfigError(f"cannot read {what} {path}: permission denied "
                          f"(run quiesce as root or as the file's owner)",
                          file=config_file, key=key) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path} is not a regular file", file=config_file, key=key)
    euid = os.geteuid()
    if st.st_uid not in {0, euid}:
        owner = "root" if euid == 0 else "root or the user running quiesce"
        raise ConfigError(f"refusing {what} {path}: it is owned by uid {st.st_uid}, not "
                          f"{owner}; run: chown {euid} {path}", file=config_file, key=key)
    if st.st_mode & 0o077:
        raise ConfigError(f"refusing {what} {path}: mode {stat.S_IMODE(st.st_mode):04o} lets "
                          f"group or other users access it, and it may hold credentials; "
                          f"run: chmod 600 {path}", file=config_file, key=key)


@dataclass
class Target:
    """One entry of ``[targets.NAME]`` in the config file.

    Adapters read their settings through :meth:`option`, :meth:`secret` and
    :meth:`private_file`, which raise :class:`ConfigError` naming the file, the target and
    the key. Keys that no adapter read during ``validate`` are reported as unknown, so a
    typo never passes silently.
    """

    name: str
    kind: str
    settings: dict[str, Any] = field(default_factory=dict)
    #: Longest any single step (connect, lock wait, statement) may take, in seconds.
    timeout: float = DEFAULT_TIMEOUT
    #: Longest the target may stay quiesced; the holder's watchdog releases it then.
    max_hold: float = DEFAULT_MAX_HOLD
    #: The config file this target came from (for messages).
    config_file: str | None = None
    _read: set[str] = field(default_factory=set, repr=False, compare=False)
    #: The quiesce phase's lock gate (:mod:`quiesce.lockgate`), set by the core meanwhile.
    _gate: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def call_budget(self) -> float:
        """The time one hook call's own waits may add up to (``CALL_STEPS × timeout``).

        An adapter whose single step may need longer than ``timeout`` (PostgreSQL's
        ``pg_backup_stop`` waiting for archiving) may allow up to this much, and no more:
        the core abandons the call soon after (:attr:`call_limit`)."""
        return CALL_STEPS * self.timeout

    @property
    def call_limit(self) -> float:
        """How long the core waits for one hook call on this target before abandoning it."""
        return self.call_budget + CALL_GRACE

    @staticmethod
    def longest_call(targets: "list[Target]") -> float:
        """The largest :attr:`call_limit` of *targets* (0 for none): how long a phase that
        calls them all concurrently may take."""
        return max((t.call_limit for t in targets), default=0.0)

    def lock_gate(self, send: Callable[[], None] | None = None,
                  receive: Callable[[], Any] | None = None) -> Any:
        """Call in ``quiesce`` right before the lock statement, once the session is
        prepared (connected, checked, session variables set): it returns when every
        target of the phase is prepared too (at most ``timeout`` later), so all locks are
        taken at the same moment and no writer waits for another target's preparation.

        *send*, if given, only writes the lock statement: the gate calls every target's
        *send* back to back from one thread, the tightest "together" there is. *receive*,
        if given, reads its reply (bounded by the driver's timeout): the same thread calls
        every target's *receive* in turn, and ``lock_gate`` returns what it returned.
        Without *receive* the adapter reads its reply after ``lock_gate`` returns. What
        *send* or *receive* raised, ``lock_gate`` raises. Outside a quiesce phase it
        returns at once (after calling *send* and *receive*)."""
        gate = self._gate
        if gate is not None:
            return gate.wait(self, send, receive)[1]
        if send is not None:
            send()
        return receive() if receive is not None else None

    def key(self, key: str) -> str:
        return f"targets.{self.name}.{key}"

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError for *key* of this target, for adapters' own checks."""
        return ConfigError(message, file=self.config_file, key=self.key(key))

    def option(self, key: str, type: type | tuple[type, ...] = str, default: Any = _REQUIRED,
               *, choices: tuple | None = None) -> Any:
        """The value of setting *key*, checked against *type* and *choices*."""
        self._read.add(key)
        if key not in self.settings:
            if default is _REQUIRED:
                raise self.error(key, f"missing required key {key!r} for kind {self.kind!r}")
            return default
        value = self.settings[key]
        types = type if isinstance(type, tuple) else (type,)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join(t.__name__ for t in types)
            raise self.error(key, f"expected {expected}, got {value!r}")
        if choices is not None and value not in choices:
            raise self.error(key, f"expected one of {', '.join(map(repr, choices))}, "
                                  f"got {value!r}")
        return value

    def private_file(self, key: str, default: Any = _REQUIRED) -> str | None:
        """A path setting naming a credentials file, checked like the config file."""
        path = self.option(key, str, default)
        if path is not None:
            if not os.path.isabs(path):  # never echo it: it may be the secret itself
                raise self.error(key, "must be the absolute path of a file that holds the "
                                      "secret, not the secret itself")
            what = key if key.endswith("_file") else f"{key} file"  # not "password_file file"
            check_private_file(path, what=what, config_file=self.config_file,
                               key=self.key(key))
        return path

    def secret(self, key: str, default: Any = _REQUIRED) -> str | None:
        """The contents of the protected file named by *key*, without the final newline."""
        path = self.private_file(key, default)
        if path is None:
            return None
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")

    def is_set(self, key: str) -> bool:
        """Whether the config sets *key*, without reading its value (for keys that must
        not be set, or whose absence means something else than any value)."""
        return key in self.settings

    def unknown_keys(self) -> list[str]:
        return sorted(set(self.settings) - self._read)

    def known_keys(self) -> set[str]:
        """The keys the adapter asked for (present or not), for "did you mean" hints."""
        return set(self._read)


@dataclass
class Hold:
    """What ``quiesce`` returns: what must stay alive until ``thaw``.

    ``session`` is the live object (a connection in a transaction, a lock) that keeps the
    target quiesced; the holder process keeps it open. Leave it ``None`` when the server
    keeps the state by itself (a Redis pause, a MongoDB fsync lock).

    ``facts`` is JSON-serialisable information that ``thaw`` needs even if the holder has
    died (a pause deadline, a lock count) and that the operator wants reported (binlog
    coordinates, an LSN). It is kept on tmpfs and printed: never put a secret in it.

    ``locked_at`` is the wall-clock time (``time.time()``) the target became quiesced,
    taken right after the lock statement returned. ``max_hold`` and the reported
    ``held_since`` start at the first target's; leave it ``None`` to use the moment
    ``quiesce`` returned (late by whatever the hook did after locking).
    """

    session: Any = None
    facts: dict[str, Any] = field(default_factory=dict)
    locked_at: float | None = None
    #: Optional, for a release that waits for nobody: an adapter's object, kept open since
    #: ``quiesce``, whose ``send()`` writes the releasing statement without waiting for
    #: the reply. When thaw comes the core calls every held target's ``release.send()`` back
    #: to back from one thread, then runs the ``thaw`` hooks, which finish the release
    #: through the same object (read the reply, check). It holds no lock itself, so it
    #: does not make the hold session-bound. Gone if the holder died: ``thaw`` then works
    #: from ``facts`` alone.
    release: Any = None

    @property
    def session_bound(self) -> bool:
        return self.session is not None
