"""The runtime's shared ground: the runtime-dir layout, the state schema, and state I/O.

Everything that freeze, the holder, thaw, status and the hosts' scripts agree on lives
here: the file names in ``runtime_dir``, the holder's abstract socket name, the safety
check of the directory, the typed record the holder keeps in ``state.json``, and the
control request the clients send. Standard library only: the lean thaw client
(``thaw.py``) runs it without the rest of the package.

Nothing here writes to a disk filesystem: ``runtime_dir`` is on tmpfs, because the host
may freeze every disk filesystem while targets are held.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import time
from typing import Any, Iterable, TypedDict

DEFAULT_CONFIG = "/etc/quiesce/quiesce.toml"
DEFAULT_RUNTIME_DIR = "/run/quiesce"
ENV_CONFIG = "QUIESCE_CONFIG"

# -- the runtime directory's layout ------------------------------------------------------

#: The post-script writes a line here with the shell's printf before Python starts, so
#: the holder starts releasing a few milliseconds into the post-script.
FIFO_NAME = "thaw.fifo"
STATE_NAME = "state.json"
#: A thaw that found a freeze still starting leaves this note; the freeze then releases.
THAW_REQUEST_NAME = "thaw-requested"
#: How long a client waits for the holder to accept a request. A holder that is stopped
#: or stuck never does; the release itself then gets the budget the holder announces.
ANSWER_GRACE = 5.0

# -- the state schema --------------------------------------------------------------------

STATE_VERSION = 1

# What a target's entry in the state says about it.
PENDING = "pending"        # not quiesced (yet)
QUIESCING = "quiescing"    # its quiesce started: it may hold a lock, so a release must run
HELD = "held"              # quiesced and kept so
FAILED = "failed"          # a phase failed before it was held
RELEASED = "released"      # held to the end and released
BROKEN = "broken"          # released, but the hold did not cover the whole window
#: Statuses that mean something may still be quiesced: a thaw or recovery must release it.
STILL_HELD = frozenset({HELD, QUIESCING})

# What the cycle as a whole is doing (the state's "phase").
STARTING, HOLDING, CYCLE_RELEASED = "starting", "held", "released"


class TargetState(TypedDict):
    name: str
    kind: str
    status: str              # one of the target statuses above
    session_bound: bool      # the hold ends with the holder's session (a SQLite lock)
    facts: dict[str, Any]    # what the adapter's quiesce reported (LSN, binlog position)


class State(TypedDict, total=False):
    """The holder's record in ``state.json``; every time is wall time (``time.time()``)."""

    version: int
    config: str
    holder_pid: int | None
    started_at: float        # the freeze began
    held_since: float | None  # the first lock was taken: max_hold runs from here
    deadline: float | None   # the watchdog releases at this time
    frozen_at: float         # "ready" was sent to freeze
    max_hold: float
    phase: str               # STARTING, check/flush/quiesce, HOLDING, CYCLE_RELEASED
    released_by: str | None  # thaw, watchdog, signal, freeze-failed, recovery, ...
    released_at: float | None
    acknowledged: bool       # a thaw has told the operator how this cycle ended
    message: str
    outcomes: list[dict[str, Any]]  # the release's outcomes (phases.Outcome.as_dict())
    not_held: list[dict[str, Any]]  # targets that failed and were never held
    targets: list[TargetState]
    corrupt: bool            # set by read_state() when the file is unreadable
    alive: bool              # set by the holder in a status answer


def new_state(config_file: str, holder_pid: int, started_at: float, max_hold: float,
              targets: Iterable[tuple[str, str]]) -> State:
    """The holder's first record: every (name, kind) target pending."""
    return State(version=STATE_VERSION, config=config_file, holder_pid=holder_pid,
                 started_at=started_at, held_since=None, deadline=None, max_hold=max_hold,
                 phase=STARTING, released_by=None, released_at=None, acknowledged=False,
                 outcomes=[], not_held=[],
                 targets=[target_state(name, kind) for name, kind in targets])


def starting_state(started_at: float) -> State:
    """freeze's record before any holder exists: a cycle started and holds nothing yet."""
    return State(version=STATE_VERSION, phase=STARTING, holder_pid=None,
                 started_at=started_at, targets=[])


def target_state(name: str, kind: str, status: str = PENDING,
                 session_bound: bool = False) -> TargetState:
    return TargetState(name=name, kind=kind, status=status, session_bound=session_bound,
                       facts={})


def still_held(state: State | None) -> list[TargetState]:
    """The targets the record says may still be quiesced, in config order."""
    return [t for t in (state or {}).get("targets", ()) if t["status"] in STILL_HELD]


# -- paths and the holder's address -------------------------------------------------------


def config_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG


def runtime_dir_of(config_file: str) -> str | None:
    """The runtime directory named by *config_file*, or None when it cannot be read.

    No other validation (freeze did it); never a guess: a wrong directory would make
    thaw say "nothing held" while targets are held elsewhere.
    """
    try:
        import tomllib
        with open(config_file, "rb") as f:
            value = tomllib.load(f).get("runtime_dir", DEFAULT_RUNTIME_DIR)
    except (OSError, ValueError, RecursionError):  # RecursionError: absurdly nested TOML
        return None
    usable = isinstance(value, str) and os.path.isabs(value) and "\0" not in value
    return value if usable else None


def holder_address(runtime_dir: str) -> bytes:
    """The holder's abstract unix socket: one per runtime_dir path, bound for its life.

    An abstract name lives exactly as long as the socket, whatever happens to files:
    deleting the runtime dir can neither let a second holder start nor hide a live one.
    """
    digest = hashlib.sha256(os.path.abspath(runtime_dir).encode()).hexdigest()[:32]
    return b"\0quiesce-holder-" + digest.encode()


def unsafe_runtime_dir(path: str) -> str | None:
    """Why another user could replace *path* or a directory above it; None if none could.

    Walks from / with lstat (a symlink is never followed): every existing component must
    be a real directory owned by root or by us, and not writable by group or others
    unless the sticky bit stops them from renaming what is ours (/tmp, /dev/shm).
    """
    me, current = os.geteuid(), "/"
    for part in os.path.abspath(path).split("/"):
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return None  # created by us, 0700, under a directory checked above
        except OSError as e:
            return f"{current} cannot be checked: {e.strerror}"
        if stat.S_ISLNK(st.st_mode):
            return f"{current} is a symlink; name the real directory"
        if not stat.S_ISDIR(st.st_mode):
            return f"{current} is not a directory"
        if st.st_uid not in {0, me}:
            return f"{current} belongs to uid {st.st_uid}, who could replace what is below it"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return (f"{current} is writable by group or others without the sticky bit, so "
                    f"they could replace what is below it")
    return None


# -- state I/O ----------------------------------------------------------------------------


def read_state(runtime_dir: str) -> State | None:
    try:
        with open(os.path.join(runtime_dir, STATE_NAME), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        return State(corrupt=True)


def write_file(path: str, text: str) -> None:
    """Atomically replace a file in the runtime dir (tmpfs: safe while disks are frozen)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_state(runtime_dir: str, state: State) -> None:
    # default=str: an adapter's odd fact (a datetime, a Decimal) must never stop a save
    write_file(os.path.join(runtime_dir, STATE_NAME), json.dumps(state, default=str))


def acknowledge(runtime_dir: str, state: State) -> None:
    """Record that a thaw has told the operator how the cycle ended."""
    state["acknowledged"] = True
    write_state(runtime_dir, state)


def note_thaw_request(runtime_dir: str) -> None:
    """Leave word for a freeze that is still starting: a thaw came, so release at once."""
    try:
        os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
        write_file(os.path.join(runtime_dir, THAW_REQUEST_NAME), str(time.time()))
    except OSError:
        pass


def thaw_requested_since(runtime_dir: str, since: float) -> bool:
    try:
        with open(os.path.join(runtime_dir, THAW_REQUEST_NAME)) as f:
            return float(f.read()) >= since
    except (OSError, ValueError):
        return False


# -- talking to the holder ----------------------------------------------------------------


class UntrustedPeer(OSError):
    """Something other than our holder answered, or the runtime dir could be replaced."""


class Unresponsive(Exception):
    """The holder accepted no request, or did not finish it, within its bound."""

    def __init__(self, pid: int | None, waited: float):
        super().__init__(pid, waited)
        self.pid, self.waited = pid, waited


def peer_of(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected unix socket."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      struct.calcsize("3i")))
    return pid, uid


def freeze_in_progress(runtime_dir: str) -> bool:
    """Is the holder's name bound by a freeze still starting (not listening yet)?"""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with probe:
        try:
            probe.bind(holder_address(runtime_dir))
        except OSError:
            return True
    return False


def request(runtime_dir: str, op: str) -> dict | None:
    """Send *op* ("thaw", "status", "yield") to the holder; None when none is listening.

    The holder accepts at once with its pid and how long the answer may take (its
    release budget); Unresponsive when it does not accept within ANSWER_GRACE or does
    not answer within that budget, UntrustedPeer when the peer is not root or us.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with sock:
        sock.settimeout(ANSWER_GRACE)
        try:
            sock.connect(holder_address(runtime_dir))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except (socket.timeout, TimeoutError):  # its backlog is full: it accepts nothing
            raise Unresponsive(None, ANSWER_GRACE) from None
        pid, uid = peer_of(sock)
        if uid not in {0, os.geteuid()}:
            raise UntrustedPeer(f"the process answering for {runtime_dir} (pid {pid}) runs as "
                                f"uid {uid}, not root or us; refusing to trust it")
        waited = ANSWER_GRACE
        try:
            sock.sendall(json.dumps({"op": op}).encode() + b"\n")
            reader = sock.makefile("rb")
            accepted = json.loads(reader.readline() or b"null")
            if accepted is None:
                return None  # it exited while we asked: the state file tells
            waited = float(accepted.get("budget", 0)) + ANSWER_GRACE
            sock.settimeout(waited)
            answer = reader.read()
        except (socket.timeout, TimeoutError):
            raise Unresponsive(pid, waited) from None
        except ConnectionError:
            return None
    return json.loads(answer) if answer else None
