"""SQLite: hold the database's write lock across the snapshot.

flush    In WAL mode a PASSIVE checkpoint (it never blocks writers), then a TRUNCATE one
         that gives up at once if a reader is in the way: the main file is current and the
         WAL the snapshot must also capture is short.
quiesce  ``BEGIN IMMEDIATE`` in the holder's connection: the RESERVED lock (the WAL write
         lock in WAL mode). Readers go on; no other connection can commit until thaw,
         so the database file(s) are stable and complete on disk.
thaw     ``ROLLBACK`` and close. The lock is session-bound: if the holder dies, the
         kernel drops it with the file descriptor and writers go on.

Settings: ``path`` (required), ``busy_timeout`` (seconds to wait for a writer to finish
before giving up; at most, and by default, the target's ``timeout``).
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse

from quiesce import Hold, HoldBroken, Target, TargetError, hookimpl


def _busy_timeout(target: Target) -> float:
    return target.option("busy_timeout", float, default=target.timeout)


@hookimpl
def validate(target: Target) -> None:
    path = target.option("path", str)
    if not os.path.isabs(path):
        raise target.error("path", f"must be an absolute path, got {path!r}")
    if not 0 < _busy_timeout(target) <= target.timeout:
        # longer, the core would abandon quiesce while its lock wait could still succeed
        raise target.error("busy_timeout", f"must be above 0 and at most the target's "
                                           f"timeout ({target.timeout:g} s)")


def _connect(target: Target, *, read_only: bool = False) -> sqlite3.Connection:
    path = target.settings["path"]
    if not os.path.exists(path):
        raise TargetError(f"{path} does not exist; fix targets.{target.name}.path")
    mode = "ro" if read_only else "rw"
    try:
        # isolation_level=None: we issue BEGIN/ROLLBACK ourselves, nothing implicit.
        # quoted: a '#' or '?' in the path would otherwise open (and lock) another file
        return sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode={mode}", uri=True,
                               timeout=_busy_timeout(target), isolation_level=None,
                               check_same_thread=False)
    except sqlite3.Error as e:
        raise TargetError(f"cannot open {path}: {e}") from e


@hookimpl
def check(target: Target) -> dict:
    conn = _connect(target, read_only=True)
    try:
        journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        conn.execute("PRAGMA schema_version").fetchone()  # fails on a non-database file
    except sqlite3.Error as e:
        raise TargetError(f"{target.settings['path']} is not a usable SQLite database: {e}") from e
    finally:
        conn.close()
    if not os.access(target.settings["path"], os.W_OK):
        raise TargetError(f"{target.settings['path']} is not writable by this user; the "
                          f"write lock needs write access (run quiesce as the file's owner or root)")
    return {"sqlite_version": sqlite3.sqlite_version, "journal_mode": journal_mode}


@hookimpl
def flush(target: Target) -> dict | None:
    conn = _connect(target)
    try:
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            return None
        wal = target.settings["path"] + "-wal"
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
        raise TargetError(f"WAL checkpoint of {target.settings['path']} failed: {e}") from e
    finally:
        conn.close()


@hookimpl
def quiesce(target: Target) -> Hold:
    conn = _connect(target)
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        conn.close()
        raise TargetError(f"could not take the write lock on {target.settings['path']} within "
                          f"{_busy_timeout(target):g} s ({e}); a writer held it that long. "
                          f"Raise busy_timeout or retry") from e
    return Hold(session=conn)


@hookimpl
def thaw(target: Target, hold: Hold) -> None:
    conn: sqlite3.Connection | None = hold.session
    if conn is None:
        return  # the lock died with the holder's process; nothing is left to release
    hold.session = None  # released once: a second thaw is a no-op
    try:
        if not conn.in_transaction:
            raise HoldBroken(f"the write lock on {target.settings['path']} was not held at thaw")
        conn.execute("ROLLBACK")
    finally:
        conn.close()
