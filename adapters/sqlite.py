"""SQLite: hold the database's write lock across the snapshot.

flush    In WAL mode a PASSIVE checkpoint (it never blocks writers), then a TRUNCATE one
         that gives up at once if a reader is in the way: the main file is current and the
         WAL the snapshot must also capture is short.
quiesce  ``BEGIN IMMEDIATE`` in the holder's connection: the RESERVED lock (the WAL write
         lock in WAL mode). Readers go on; no other connection can commit until thaw,
         so the database file(s) are stable and complete on disk. Tried every
         millisecond rather than through SQLite's busy handler, whose sleeps grow to
         100 ms and so almost never meet the gap between a busy writer's transactions.
thaw     ``ROLLBACK`` only: it writes nothing. The connection is *not* closed, because
         closing the last connection of a WAL database checkpoints it and deletes the
         ``-wal`` file, which blocks forever on a filesystem the host still has frozen.
         It stays open until the process ends (the holder exits with ``os._exit``, so
         the kernel just drops the descriptor, which SQLite treats like a crash: always
         safe) or until the next flush, a phase in which writing is safe.

Settings: ``path`` (required), ``busy_timeout`` (seconds to wait for a writer to finish
before giving up; at most, and by default, the target's ``timeout``), read in one place,
:func:`settings`, called by validate and by every hook.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import urllib.parse
from dataclasses import dataclass

from quiesce import Hold, HoldBroken, Target, TargetError, hookimpl, translated


RETRY_INTERVAL = 0.001  # between lock attempts: a tight-loop writer leaves gaps this short
#: Released connections that must not be closed yet (closing may write; see thaw). A
#: reference here also keeps the garbage collector from closing them.
_parked: list[sqlite3.Connection] = []
_parked_lock = threading.Lock()


@dataclass(frozen=True)
class Settings:
    """A target's settings, read and checked."""

    path: str
    busy_timeout: float


def settings(target: Target) -> Settings:
    """Read (and check) every setting. Used by validate and again by each hook."""
    path = target.option("path", str)
    if not os.path.isabs(path):
        raise target.error("path", f"must be an absolute path, got {path!r}")
    busy_timeout = target.option("busy_timeout", float, default=target.timeout)
    if not 0 < busy_timeout <= target.timeout:
        # longer, the core would abandon quiesce while its lock wait could still succeed
        raise target.error("busy_timeout", f"must be above 0 and at most the target's "
                                           f"timeout ({target.timeout:g} s)")
    return Settings(path, busy_timeout)


@hookimpl
def validate(target: Target) -> None:
    settings(target)


def _connect(target: Target, s: Settings, *, read_only: bool = False,
             timeout: float | None = None) -> sqlite3.Connection:
    path = s.path
    if not os.path.exists(path):
        raise TargetError(f"{path} does not exist; fix targets.{target.name}.path")
    mode = "ro" if read_only else "rw"
    timeout = s.busy_timeout if timeout is None else timeout
    with translated(sqlite3.Error, f"cannot open {path}"):
        # isolation_level=None: we issue BEGIN/ROLLBACK ourselves, nothing implicit.
        # quoted: a '#' or '?' in the path would otherwise open (and lock) another file
        return sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode={mode}", uri=True,
                               timeout=timeout, isolation_level=None,
                               check_same_thread=False)


@hookimpl
def check(target: Target) -> dict:
    s = settings(target)
    conn = _connect(target, s, read_only=True)
    try:
        with translated(sqlite3.Error, f"{s.path} is not a usable SQLite database"):
            journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            conn.execute("PRAGMA schema_version").fetchone()  # fails on a non-database file
    finally:
        conn.close()
    if not os.access(s.path, os.W_OK):
        raise TargetError(f"{s.path} is not writable by this user; the "
                          f"write lock needs write access (run quiesce as the file's owner or root)")
    return {"sqlite_version": sqlite3.sqlite_version, "journal_mode": journal_mode}


def _close_parked() -> None:
    """Close connections released earlier: flush runs before any snapshot, when the
    filesystem is writable (flush itself checkpoints)."""
    with _parked_lock:
        parked = _parked[:]
        _parked.clear()
    for conn in parked:
        conn.close()


@hookimpl
def flush(target: Target) -> dict | None:
    s = settings(target)
    _close_parked()
    conn = _connect(target, s)
    try:
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            return None
        wal = s.path + "-wal"
        wal_bytes = os.path.getsize(wal) if os.path.exists(wal) else 0
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")  # the work, without blocking writers
        # TRUNCATE holds the write lock while it waits for readers: never wait here.
        conn.execute("PRAGMA busy_timeout = 0")
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        # busy=1: a reader kept it from finishing. Harmless: the WAL is captured with the
        # database, it only makes recovery read more.
        return {"wal_checkpoint": "partial" if busy else "complete",
                "wal_bytes_before": wal_bytes}
    except sqlite3.Error as e:
        raise TargetError(f"WAL checkpoint of {s.path} failed: {e}") from e
    finally:
        conn.close()


@hookimpl
def quiesce(target: Target) -> Hold:
    s = settings(target)
    conn = _connect(target, s, timeout=0)  # no busy handler: _begin_immediate retries itself
    first: list[float] = []  # when the gate's attempt took the lock

    def first_attempt() -> None:  # by the lock gate, back to back with the other targets'
        if _try_begin(conn):
            first.append(time.time())

    try:
        # A fresh connection's first statement reads the schema and maps the WAL index: do
        # it now, not in the gate, where 32 of them took 2 ms instead of 0.2. (Busy, with a
        # rollback journal's writer in the way: the gate's attempt reads it instead.)
        try:
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.OperationalError as e:
            if not _is_busy(e):
                raise
        target.lock_gate(first_attempt)
        attempts = None if first else _begin_immediate(conn, s.busy_timeout)
    except sqlite3.Error as e:
        conn.close()
        raise TargetError(f"cannot take the write lock on {s.path}: {e}") from e
    if attempts is not None:
        conn.close()
        raise TargetError(f"could not take the write lock on {s.path} within "
                          f"{s.busy_timeout:g} s: it was busy at each of {attempts + 1} "
                          f"attempts; {_who_holds(s.path)}. Raise "
                          f"busy_timeout, or retry")
    return Hold(session=conn, locked_at=first[0] if first else time.time(),
                release=_Rollback(conn))


def _try_begin(conn: sqlite3.Connection) -> bool:
    """One BEGIN IMMEDIATE: true if it took the lock, false if the lock was busy."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        return True
    except sqlite3.OperationalError as e:
        if not _is_busy(e):
            raise
        return False


def _is_busy(error: sqlite3.OperationalError) -> bool:
    return getattr(error, "sqlite_errorcode", sqlite3.SQLITE_BUSY) & 0xFF == sqlite3.SQLITE_BUSY


def _begin_immediate(conn: sqlite3.Connection, timeout: float) -> int | None:
    """BEGIN IMMEDIATE, tried every RETRY_INTERVAL until *timeout*; None once it is
    taken, else the number of attempts that found the lock busy."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        if _try_begin(conn):
            return None
        attempts += 1
        if time.monotonic() >= deadline:
            return attempts
        time.sleep(RETRY_INTERVAL)


class _Rollback:
    """The release (``Hold.release``): the core calls :meth:`send` for every target back to
    back when thaw comes, and thaw calls it again (a no-op once it worked)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.was_held: bool | None = None  # whether the lock was still held at the release

    def send(self) -> None:
        if self.was_held is None:
            self.was_held = self.conn.in_transaction
        if self.was_held and self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


@hookimpl
def thaw(target: Target, hold: Hold) -> None:
    conn: sqlite3.Connection | None = hold.session
    if conn is None:
        return  # the lock died with the holder's process; nothing is left to release
    hold.session = None  # released once: a second thaw is a no-op
    with _parked_lock:
        _parked.append(conn)  # never closed here: closing may write (see the module doc)
    release = hold.release if isinstance(hold.release, _Rollback) else _Rollback(conn)
    release.send()  # the core has done it already when the holder releases
    if not release.was_held:
        raise HoldBroken(f"the write lock on {settings(target).path} was not held at thaw")


def _who_holds(path: str) -> str:
    """What held the database, from /proc: the lock's owner now, and who has it open."""
    holders = _lock_owners(path)
    users = sorted(_processes_with_open(path) - {os.getpid()})
    said = [f"pid {', '.join(_name(p) for p in holders)} held the write lock at the end"
            if holders else "no process held the write lock at the end (it was contended, "
                            "taken and released between attempts)"]
    if users:
        said.append(f"open in {', '.join(_name(p) for p in users)}")
    return "; ".join(said)


def _lock_owners(path: str) -> set[int]:
    """Pids with a POSIX write lock on SQLite's write-lock byte (/proc/locks).

    The byte is fixed by SQLite's file format: byte 120 of the -shm file in WAL mode
    (WAL_WRITE_LOCK), else the RESERVED byte 0x40000001 of the database file.
    """
    try:
        with open("/proc/locks") as f:
            locks = [line.split() for line in f]
    except OSError:
        return set()
    owners = set()
    for file, byte in ((path + "-shm", 120), (path, 0x40000001)):
        try:
            st = os.stat(file)
        except OSError:
            continue
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        owners |= {int(f[4]) for f in locks
                   if f[1] != "->" and f[3] == "WRITE" and f[5] == key and f[4].isdigit()
                   and int(f[6]) <= byte <= _end(f[7])}
    return owners


def _end(field: str) -> float:
    return float("inf") if field == "EOF" else int(field)


def _processes_with_open(path: str) -> set[int]:
    files = {os.path.realpath(path + suffix) for suffix in ("", "-wal", "-shm", "-journal")}
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in files
                   for fd in os.listdir(f"/proc/{pid}/fd")):
                found.add(int(pid))
        except OSError:  # gone, or not ours to look at
            continue
    return found


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f"{pid} ({f.read().strip()})"
    except OSError:
        return str(pid)
