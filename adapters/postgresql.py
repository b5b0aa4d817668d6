"""PostgreSQL 12–18: a CHECKPOINT before an atomic snapshot, or the low-level backup API.

Two modes, chosen per target with ``mode``:

``checkpoint`` (default)
    flush    ``CHECKPOINT``, so crash recovery after a restore replays little WAL.
    quiesce  nothing: PostgreSQL's WAL makes an *atomic* snapshot of the data directory,
             ``pg_wal`` and every tablespace restorable as after a power cut. The host's
             freeze-then-snapshot gives that atomicity.
    thaw     nothing.

``backup``
    flush    ``CHECKPOINT`` when the role may run it, so the backup's own checkpoint is quick.
    quiesce  ``pg_backup_start(label, fast => true)`` (``pg_start_backup(label, true, false)``,
             the non-exclusive form, on 12–14) in a session the holder keeps open.
    thaw     ``pg_backup_stop(wait_for_archive => …)`` in the SAME session, bounded by
             ``statement_timeout``; the returned backup label and tablespace map are written to
             ``label_dir`` with a restore note. The backup dies with its session: a lost
             session is reported as a broken hold. Stopping writes WAL, so thaw must run after
             the host thawed the filesystems, which is when the post-script runs.

Settings: ``mode``; the connection as ``dsn`` (a libpq conninfo string without a password)
or as ``service``/``host``/``port``/``user``/``dbname``; ``passfile`` (a .pgpass file, mode
0600); backup mode only: ``label_dir`` (required), ``wait_for_archive`` (default true),
``stop_timeout`` (seconds; default three times the target's timeout, at most four times,
``Target.call_budget``: the core abandons a thaw soon after). All of them are read in one
place, :func:`settings`, called by validate and by every hook.

The label files a backup leaves, and ``quiesce restore-prepare postgresql`` which installs
one into a restored data directory, live in :mod:`quiesce.adapters.postgresql_restore`
(docs/adapters/postgresql.md); :func:`register_commands` adds that command.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from quiesce import (Hold, HoldBroken, Target, TargetError, hookimpl, import_driver, one_line,
                     translated)
from quiesce.adapters.postgresql_restore import (add_restore_prepare, safe_name,
                                                 write_label_files)

MODES = ("checkpoint", "backup")
#: Connection keys offered besides ``dsn`` (anything fancier belongs in a libpq service file).
CONN_KEYS = ("service", "host", "port", "user", "dbname")
#: DSN keys refused in ``dsn``: secrets never live in the config file.
SECRET_DSN_KEYS = {"password": "put the password in a .pgpass file named by the passfile setting",
                   "passfile": "use the passfile setting, which checks the file's owner and mode",
                   "sslpassword": "use a key without a passphrase, protected by mode 0600"}
#: Dead-peer detection for the held session: about 25 s after the network goes away.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
              "keepalives_count": 3}
APPLICATION_NAME = "quiesce"
MIN_VERSION = 120000


# ---------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Settings:
    """A target's settings, read and checked."""

    mode: str
    dsn: str | None
    params: dict[str, Any]
    where: str  # the endpoint, for messages; never a secret
    label_dir: str | None
    wait_for_archive: bool
    stop_timeout: float


def settings(target: Target) -> Settings:
    """Read (and check) every setting. Used by validate and again by each hook."""
    mode = target.option("mode", str, default="checkpoint", choices=MODES)
    dsn = target.option("dsn", str, default=None)
    keys = {key: target.option(key, int if key == "port" else str, default=None)
            for key in CONN_KEYS}
    keys = {key: value for key, value in keys.items() if value is not None}
    passfile = target.private_file("passfile", default=None)
    label_dir = target.option("label_dir", str, default=None)
    wait_for_archive = target.option("wait_for_archive", bool, default=None)
    stop_timeout = target.option("stop_timeout", float, default=None)

    if dsn is not None:
        if keys:
            raise target.error(next(iter(keys)), "set either dsn or service/host/port/user/"
                                                  "dbname, not both")
        try:
            parsed = parse_conninfo(dsn)
        except ValueError as e:
            raise target.error("dsn", f"not a valid libpq connection string: {e}") from None
        for key, advice in SECRET_DSN_KEYS.items():
            if key in parsed:
                raise target.error("dsn", f"contains a {key}; secrets never go in the config "
                                          f"file: remove it and {advice}")
        where = _describe(parsed)
    else:
        where = _describe({k: str(v) for k, v in keys.items()})
    if "port" in keys and not 0 < keys["port"] < 65536:
        raise target.error("port", f"must be a TCP port number, got {keys['port']}")
    params: dict[str, Any] = dict(keys)
    if passfile is not None:
        params["passfile"] = passfile

    if mode == "backup":
        if label_dir is None:
            raise target.error("label_dir", "missing: backup mode writes each backup's label "
                                            "there; name a directory on a disk that is kept")
        if not os.path.isabs(label_dir):
            raise target.error("label_dir", f"must be an absolute path, got {label_dir!r}")
    else:
        for key, value in (("label_dir", label_dir), ("wait_for_archive", wait_for_archive),
                           ("stop_timeout", stop_timeout)):
            if value is not None:
                raise target.error(key, "only used with mode = \"backup\"; set the mode or "
                                        "remove the key")
    if stop_timeout is None:
        stop_timeout = 3 * target.timeout
    elif not 0 < stop_timeout <= target.call_budget:
        # longer, the core would abandon thaw before pg_backup_stop could say why it failed
        raise target.error("stop_timeout", f"must be above 0 and at most 4 × timeout "
                                           f"({target.call_budget:g} s); raise timeout for more")
    return Settings(mode, dsn, params, where, label_dir,
                   True if wait_for_archive is None else wait_for_archive, stop_timeout)


def parse_conninfo(dsn: str) -> dict[str, str]:
    """The keys of a libpq connection string (``key=value …`` or a ``postgresql://`` URI).

    Enough of libpq's grammar to find which keys are present without importing the driver;
    libpq itself checks the rest at connect time. Messages never echo the string.
    """
    if re.match(r"postgres(ql)?://", dsn):
        parts = urllib.parse.urlsplit(dsn)
        params: dict[str, str] = {}
        userinfo, at, hosts = parts.netloc.rpartition("@")
        if at:
            user, colon, _password = userinfo.partition(":")
            if colon:
                params["password"] = "?"
            if user:
                params["user"] = urllib.parse.unquote(user)
        if hosts:
            params["host"] = urllib.parse.unquote(hosts)
        if parts.path.strip("/"):
            params["dbname"] = urllib.parse.unquote(parts.path.lstrip("/"))
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            params[key] = value
        return params
    params = {}
    i, n = 0, len(dsn)
    while True:
        while i < n and dsn[i].isspace():
            i += 1
        if i >= n:
            return params
        start = i
        while i < n and dsn[i] != "=" and not dsn[i].isspace():
            i += 1
        key = dsn[start:i]
        while i < n and dsn[i].isspace():
            i += 1
        if not key or i >= n or dsn[i] != "=":
            raise ValueError(f"expected key=value at character {start + 1}")
        i += 1
        while i < n and dsn[i].isspace():
            i += 1
        value = []
        if i < n and dsn[i] == "'":
            i += 1
            while i < n and dsn[i] != "'":
                if dsn[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(dsn[i])
                i += 1
            if i >= n:
                raise ValueError(f"unterminated quoted value for key {key!r}")
            i += 1
        else:
            while i < n and not dsn[i].isspace():
                if dsn[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(dsn[i])
                i += 1
        params[key] = "".join(value)


def _describe(params: dict[str, str]) -> str:
    shown = [f"{k}={params[k]}" for k in ("service", "host", "hostaddr", "port", "dbname", "user")
             if params.get(k)]
    return " ".join(shown) or "libpq defaults"


@hookimpl
def validate(target: Target) -> None:
    settings(target)


@hookimpl
def register_commands(cli) -> None:
    add_restore_prepare(cli)


# ---------------------------------------------------------------------------- sessions

def _psycopg():
    return import_driver("psycopg", "postgresql")


def _connect(target: Target, s: Settings):
    """A direct autocommit session; nothing in it reconnects by itself."""
    psycopg = _psycopg()
    params = dict(s.params, application_name=APPLICATION_NAME,
                  connect_timeout=max(2, math.ceil(target.timeout)), **KEEPALIVES)
    try:
        conn = psycopg.connect(s.dsn or "", autocommit=True, **params)
    except psycopg.Error as e:
        raise TargetError(f"cannot connect to PostgreSQL ({s.where}): {one_line(e)}; check "
                          f"targets.{target.name}'s connection settings") from e
    try:
        if conn.info.server_version < MIN_VERSION:
            raise TargetError(f"PostgreSQL {_version_text(conn.info.server_version)} at "
                              f"{s.where} is not supported; quiesce supports 12 and later")
        # Per-session: the held session must outlive any server-wide idle timeout, and no
        # statement may wait longer than the target's timeout.
        setup = ["SET idle_in_transaction_session_timeout = 0",
                 f"SET statement_timeout = {_ms(target.timeout)}",
                 f"SET lock_timeout = {_ms(target.timeout)}"]
        if conn.info.server_version >= 140000:
            setup.insert(0, "SET idle_session_timeout = 0")
        conn.execute("; ".join(setup))
    except BaseException as e:
        conn.close()
        if isinstance(e, psycopg.Error):
            raise TargetError(f"cannot set up the session on {s.where}: {one_line(e)}") from e
        raise
    return conn


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _version_text(num: int) -> str:
    return f"{num // 10000}.{num % 10000}"


@dataclass
class _Server:
    version_num: int
    version: str
    role: str
    role_ident: str
    superuser: bool
    standby: bool
    wal_level: str
    archive_mode: str
    can_checkpoint: bool
    can_backup: bool


def _inspect(conn) -> _Server:
    num = conn.info.server_version
    if num >= 150000:
        checkpoint_priv = "pg_has_role('pg_checkpoint', 'USAGE')"
        start_fn, stop_fn = "pg_backup_start(text, boolean)", "pg_backup_stop(boolean)"
    else:
        checkpoint_priv = "false"
        start_fn, stop_fn = "pg_start_backup(text, boolean, boolean)", "pg_stop_backup(boolean, boolean)"
    row = conn.execute(
        f"""SELECT current_setting('server_version'), current_user, quote_ident(current_user),
                   current_setting('is_superuser') = 'on', pg_is_in_recovery(),
                   current_setting('wal_level'), current_setting('archive_mode'),
                   {checkpoint_priv},
                   has_function_privilege('{start_fn}', 'EXECUTE')
                   AND has_function_privilege('{stop_fn}', 'EXECUTE')""").fetchone()
    version, role, ident, superuser, standby, wal_level, archive_mode, checkpoint, backup = row
    return _Server(num, version, role, ident, superuser, standby, wal_level, archive_mode,
                   superuser or checkpoint, superuser or backup)


def _checkpoint_grant(server: _Server) -> str:
    if server.version_num >= 150000:
        return (f"role {server.role} may not run CHECKPOINT; as a superuser run: "
                f"GRANT pg_checkpoint TO {server.role_ident};")
    return (f"role {server.role} may not run CHECKPOINT: on PostgreSQL {server.version} only "
            f"superusers may; run: ALTER ROLE {server.role_ident} SUPERUSER; or connect as a "
            f"superuser (PostgreSQL 15 added the pg_checkpoint role)")


def _backup_grant(server: _Server) -> str:
    functions = ("pg_backup_start(text, boolean), pg_backup_stop(boolean)"
                 if server.version_num >= 150000 else
                 "pg_start_backup(text, boolean, boolean), pg_stop_backup(boolean, boolean)")
    return (f"role {server.role} may not run the backup functions; as a superuser run: "
            f"GRANT EXECUTE ON FUNCTION {functions} TO {server.role_ident};")


# ---------------------------------------------------------------------------- hooks

@hookimpl
def check(target: Target) -> dict:
    s = settings(target)
    conn = _connect(target, s)
    try:
        with translated(_psycopg().Error, f"cannot read the server's settings on {s.where}"):
            server = _inspect(conn)
    finally:
        conn.close()
    facts: dict[str, Any] = {
        "mode": s.mode, "version": server.version, "role": server.role,
        "superuser": server.superuser, "standby": server.standby, "wal_level": server.wal_level,
        "archive_mode": server.archive_mode, "can_checkpoint": server.can_checkpoint,
    }
    if s.mode == "checkpoint":
        if not server.can_checkpoint:
            raise TargetError(_checkpoint_grant(server))
        return facts
    if server.wal_level not in ("replica", "logical"):
        raise TargetError(f"wal_level is {server.wal_level!r} on {s.where}; backup mode needs "
                          f"'replica' or 'logical': run ALTER SYSTEM SET wal_level = 'replica'; "
                          f"and restart PostgreSQL")
    if not server.can_backup:
        raise TargetError(_backup_grant(server))
    if not os.path.isdir(s.label_dir):
        raise TargetError(f"label_dir {s.label_dir} does not exist; create it (on a disk that "
                          f"is kept, not tmpfs) or fix targets.{target.name}.label_dir")
    if not os.access(s.label_dir, os.W_OK | os.X_OK):
        raise TargetError(f"label_dir {s.label_dir} is not writable by this user; backup "
                          f"labels are written there at thaw")
    archiving = server.archive_mode == "always" or (server.archive_mode == "on"
                                                    and not server.standby)
    if not archiving:
        facts["warning"] = ("WAL archiving is off for this server: the WAL a backup needs "
                            "(through its stop LSN) exists only in the live pg_wal, which "
                            "recycles it; archive it, or restore snapshots without the label")
    facts["label_dir"] = s.label_dir
    facts["wait_for_archive"] = s.wait_for_archive
    return facts


@hookimpl
def flush(target: Target) -> dict:
    s = settings(target)
    psycopg = _psycopg()
    conn = _connect(target, s)
    server = None
    try:
        server = _inspect(conn)
        if not server.can_checkpoint:
            if s.mode == "checkpoint":
                raise TargetError(_checkpoint_grant(server))
            return {"checkpoint": "skipped: the role may not run CHECKPOINT; "
                                  "pg_backup_start runs its own"}
        try:
            conn.execute("CHECKPOINT")
            outcome = "done"
        except psycopg.errors.QueryCanceled:
            # The checkpointer goes on by itself; the snapshot stays correct, it only makes
            # recovery replay more WAL. Not worth failing the freeze for.
            outcome = (f"not finished within {target.timeout:g} s (it goes on in the "
                       f"background; recovery will replay more WAL)")
        lsn = conn.execute("SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
                           " ELSE pg_current_wal_lsn() END)::text").fetchone()[0]
        return {"checkpoint": outcome, "lsn": lsn}
    except psycopg.errors.InsufficientPrivilege as e:
        if server is None:
            raise TargetError(f"cannot read the server's settings on {s.where}: "
                              f"{one_line(e)}") from None
        raise TargetError(_checkpoint_grant(server)) from None
    except psycopg.Error as e:
        raise TargetError(f"CHECKPOINT on {s.where} failed: {one_line(e)}") from e
    finally:
        conn.close()


class _BackupSession:
    """The held session of a running backup. Used by one thread at a time (the lock)."""

    def __init__(self, conn, s: Settings, facts: dict[str, Any]):
        self.conn = conn
        self.s = s
        self.facts = facts
        self.lock = threading.Lock()
        self.result: dict[str, Any] | None = None
        self.error: HoldBroken | None = None

    def __repr__(self) -> str:
        return f"<postgresql backup session pid={self.facts.get('backend_pid')}>"


@hookimpl
def quiesce(target: Target) -> Hold:
    s = settings(target)
    if s.mode == "checkpoint":
        return Hold(facts={"mode": "checkpoint"})
    psycopg = _psycopg()
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    label = f"quiesce {safe_name(target.name)} {started:%Y-%m-%dT%H:%M:%SZ}"
    conn = _connect(target, s)
    try:
        version = conn.info.server_version
        if version >= 150000:
            start_sql = "SELECT pg_backup_start(%s, fast => true)::text, pg_is_in_recovery()"
        else:  # non-exclusive: the third argument false (the exclusive form is the default)
            start_sql = "SELECT pg_start_backup(%s, true, false)::text, pg_is_in_recovery()"
        target.lock_gate()  # connected: start the backup together with the other targets
        start_lsn, standby = conn.execute(start_sql, (label,)).fetchone()
        locked_at = time.time()
    except BaseException as e:
        conn.close()  # a backup half-started in this session is aborted with it
        if isinstance(e, psycopg.errors.InsufficientPrivilege):
            raise TargetError(_backup_grant(_inspect_safely(target, s))) from None
        if isinstance(e, psycopg.errors.QueryCanceled):
            raise TargetError(f"the backup did not start within {target.timeout:g} s (its "
                              f"checkpoint took longer); nothing is held; raise "
                              f"targets.{target.name}.timeout") from None
        if isinstance(e, psycopg.Error):
            raise TargetError(f"the backup did not start on {s.where}: {one_line(e)}") from e
        raise
    facts = {"mode": "backup", "label": label, "start_lsn": start_lsn,
             "started_at": f"{started:%Y-%m-%dT%H:%M:%SZ}", "backend_pid": conn.info.backend_pid,
             "version": _version_text(version), "standby": standby}
    return Hold(session=_BackupSession(conn, s, facts), facts=facts, locked_at=locked_at)


def _inspect_safely(target: Target, s: Settings) -> _Server:
    conn = _connect(target, s)
    try:
        return _inspect(conn)
    finally:
        conn.close()


@hookimpl
def thaw(target: Target, hold: Hold) -> dict | None:
    facts = hold.facts or {}
    mode = facts.get("mode") or settings(target).mode
    if mode != "backup":
        return None  # nothing was held
    session: _BackupSession | None = hold.session
    if session is None:
        pid = facts.get("backend_pid")
        raise HoldBroken(f"{target.name}: backup aborted: the session ended before "
                         f"pg_backup_stop (the holder is gone{f', backend pid {pid}' if pid else ''}); "
                         f"no backup label exists for this snapshot: restore it without one")
    with session.lock:
        if session.result is not None:
            return session.result
        if session.error is not None:
            raise session.error
        try:
            lsn, labelfile, spcmapfile = _stop(target, session)
        except HoldBroken as e:
            session.error = e
            raise
        finally:
            session.conn.close()
        session.result = write_label_files(target.name, session.facts, session.s.label_dir,
                                           session.s.wait_for_archive, lsn, labelfile,
                                           spcmapfile or b"")
        return session.result


def _stop(target: Target, session: _BackupSession) -> tuple[str, bytes, bytes | None]:
    psycopg = _psycopg()
    conn, s = session.conn, session.s
    lost = f"{target.name}: backup aborted: the session ended before pg_backup_stop"
    if conn.closed or conn.broken:
        raise HoldBroken(f"{lost} (its connection was closed)")
    if conn.info.server_version >= 150000:
        sql = "pg_backup_stop(wait_for_archive => %s)"
    else:
        sql = "pg_stop_backup(false, %s)"
    # convert_to(…, server_encoding) hands back the server's bytes unchanged: written byte
    # for byte, as the backup API asks.
    query = (f"SELECT lsn::text, convert_to(labelfile, current_setting('server_encoding')), "
             f"convert_to(spcmapfile, current_setting('server_encoding')) FROM {sql}")
    try:
        conn.execute(f"SET statement_timeout = {_ms(s.stop_timeout)}")
        return conn.execute(query, (s.wait_for_archive,)).fetchone()
    except psycopg.errors.QueryCanceled:
        raise HoldBroken(
            f"{target.name}: pg_backup_stop did not return within {s.stop_timeout:g} s "
            f"(waiting for WAL archiving?); the backup ended but its label was not returned, so "
            f"this snapshot can only be restored without one; fix archiving or raise "
            f"stop_timeout") from None
    except psycopg.errors.ObjectNotInPrerequisiteState as e:
        raise HoldBroken(f"{lost} ({one_line(e)})") from None
    except psycopg.OperationalError as e:
        raise HoldBroken(f"{lost} ({one_line(e)})") from None
    except psycopg.Error as e:
        raise HoldBroken(f"{target.name}: pg_backup_stop failed: {one_line(e)}; the snapshot "
                         f"has no usable backup label") from None
