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
``stop_timeout`` (seconds; default three times the target's timeout, at most four times:
the core abandons a thaw that overruns 4 × timeout + 5 s).

:func:`restore_prepare` installs a backup label into a restored data directory, after
checking that the WAL the backup needs is there (docs/adapters/postgresql.md).
"""

from __future__ import annotations

import datetime
import math
import mmap
import os
import re
import shlex
import struct
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any

from quiesce import Hold, HoldBroken, MissingDriverError, Target, TargetError, hookimpl

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
class _Config:
    mode: str
    dsn: str | None
    params: dict[str, Any]
    where: str  # the endpoint, for messages; never a secret
    label_dir: str | None
    wait_for_archive: bool
    stop_timeout: float


def _config(target: Target) -> _Config:
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
    elif not 0 < stop_timeout <= 4 * target.timeout:
        # longer, the core would abandon thaw before pg_backup_stop could say why it failed
        raise target.error("stop_timeout", f"must be above 0 and at most 4 × timeout "
                                           f"({4 * target.timeout:g} s); raise timeout for more")
    return _Config(mode, dsn, params, where, label_dir,
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
    _config(target)


# ---------------------------------------------------------------------------- sessions

def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise MissingDriverError("psycopg", "postgresql") from None
    return psycopg


def _oneline(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _connect(target: Target, cfg: _Config):
    """A direct autocommit session; nothing in it reconnects by itself."""
    psycopg = _psycopg()
    params = dict(cfg.params, application_name=APPLICATION_NAME,
                  connect_timeout=max(2, math.ceil(target.timeout)), **KEEPALIVES)
    try:
        conn = psycopg.connect(cfg.dsn or "", autocommit=True, **params)
    except psycopg.Error as e:
        raise TargetError(f"cannot connect to PostgreSQL ({cfg.where}): {_oneline(e)}; check "
                          f"targets.{target.name}'s connection settings") from e
    try:
        if conn.info.server_version < MIN_VERSION:
            raise TargetError(f"PostgreSQL {_version_text(conn.info.server_version)} at "
                              f"{cfg.where} is not supported; quiesce supports 12 and later")
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
            raise TargetError(f"cannot set up the session on {cfg.where}: {_oneline(e)}") from e
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
    cfg = _config(target)
    conn = _connect(target, cfg)
    try:
        server = _inspect(conn)
    except _psycopg().Error as e:
        raise TargetError(f"cannot read the server's settings on {cfg.where}: {_oneline(e)}") from e
    finally:
        conn.close()
    facts: dict[str, Any] = {
        "mode": cfg.mode, "version": server.version, "role": server.role,
        "superuser": server.superuser, "standby": server.standby, "wal_level": server.wal_level,
        "archive_mode": server.archive_mode, "can_checkpoint": server.can_checkpoint,
    }
    if cfg.mode == "checkpoint":
        if not server.can_checkpoint:
            raise TargetError(_checkpoint_grant(server))
        return facts
    if server.wal_level not in ("replica", "logical"):
        raise TargetError(f"wal_level is {server.wal_level!r} on {cfg.where}; backup mode needs "
                          f"'replica' or 'logical': run ALTER SYSTEM SET wal_level = 'replica'; "
                          f"and restart PostgreSQL")
    if not server.can_backup:
        raise TargetError(_backup_grant(server))
    if not os.path.isdir(cfg.label_dir):
        raise TargetError(f"label_dir {cfg.label_dir} does not exist; create it (on a disk that "
                          f"is kept, not tmpfs) or fix targets.{target.name}.label_dir")
    if not os.access(cfg.label_dir, os.W_OK | os.X_OK):
        raise TargetError(f"label_dir {cfg.label_dir} is not writable by this user; backup "
                          f"labels are written there at thaw")
    archiving = server.archive_mode == "always" or (server.archive_mode == "on"
                                                    and not server.standby)
    if not archiving:
        facts["warning"] = ("WAL archiving is off for this server: the WAL a backup needs "
                            "(through its stop LSN) exists only in the live pg_wal, which "
                            "recycles it; archive it, or restore snapshots without the label")
    facts["label_dir"] = cfg.label_dir
    facts["wait_for_archive"] = cfg.wait_for_archive
    return facts


@hookimpl
def flush(target: Target) -> dict:
    cfg = _config(target)
    psycopg = _psycopg()
    conn = _connect(target, cfg)
    server = None
    try:
        server = _inspect(conn)
        if not server.can_checkpoint:
            if cfg.mode == "checkpoint":
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
            raise TargetError(f"cannot read the server's settings on {cfg.where}: "
                              f"{_oneline(e)}") from None
        raise TargetError(_checkpoint_grant(server)) from None
    except psycopg.Error as e:
        raise TargetError(f"CHECKPOINT on {cfg.where} failed: {_oneline(e)}") from e
    finally:
        conn.close()


class _BackupSession:
    """The held session of a running backup. Used by one thread at a time (the lock)."""

    def __init__(self, conn, cfg: _Config, facts: dict[str, Any]):
        self.conn = conn
        self.cfg = cfg
        self.facts = facts
        self.lock = threading.Lock()
        self.result: dict[str, Any] | None = None
        self.error: HoldBroken | None = None

    def __repr__(self) -> str:
        return f"<postgresql backup session pid={self.facts.get('backend_pid')}>"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "target"


@hookimpl
def quiesce(target: Target) -> Hold:
    cfg = _config(target)
    if cfg.mode == "checkpoint":
        return Hold(facts={"mode": "checkpoint"})
    psycopg = _psycopg()
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    label = f"quiesce {_safe_name(target.name)} {started:%Y-%m-%dT%H:%M:%SZ}"
    conn = _connect(target, cfg)
    try:
        version = conn.info.server_version
        if version >= 150000:
            start_sql = "SELECT pg_backup_start(%s, fast => true)::text, pg_is_in_recovery()"
        else:  # non-exclusive: the third argument false (the exclusive form is the default)
            start_sql = "SELECT pg_start_backup(%s, true, false)::text, pg_is_in_recovery()"
        start_lsn, standby = conn.execute(start_sql, (label,)).fetchone()
    except BaseException as e:
        conn.close()  # a backup half-started in this session is aborted with it
        if isinstance(e, psycopg.errors.InsufficientPrivilege):
            raise TargetError(_backup_grant(_inspect_safely(target, cfg))) from None
        if isinstance(e, psycopg.errors.QueryCanceled):
            raise TargetError(f"the backup did not start within {target.timeout:g} s (its "
                              f"checkpoint took longer); nothing is held; raise "
                              f"targets.{target.name}.timeout") from None
        if isinstance(e, psycopg.Error):
            raise TargetError(f"the backup did not start on {cfg.where}: {_oneline(e)}") from e
        raise
    facts = {"mode": "backup", "label": label, "start_lsn": start_lsn,
             "started_at": f"{started:%Y-%m-%dT%H:%M:%SZ}", "backend_pid": conn.info.backend_pid,
             "version": _version_text(version), "standby": standby}
    return Hold(session=_BackupSession(conn, cfg, facts), facts=facts)


def _inspect_safely(target: Target, cfg: _Config) -> _Server:
    conn = _connect(target, cfg)
    try:
        return _inspect(conn)
    finally:
        conn.close()


@hookimpl
def thaw(target: Target, hold: Hold) -> dict | None:
    facts = hold.facts or {}
    mode = facts.get("mode") or target.settings.get("mode", "checkpoint")
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
        session.result = _write_label_files(target, session, lsn, labelfile, spcmapfile or b"")
        return session.result


def _stop(target: Target, session: _BackupSession) -> tuple[str, bytes, bytes | None]:
    psycopg = _psycopg()
    conn, cfg = session.conn, session.cfg
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
        conn.execute(f"SET statement_timeout = {_ms(cfg.stop_timeout)}")
        return conn.execute(query, (cfg.wait_for_archive,)).fetchone()
    except psycopg.errors.QueryCanceled:
        raise HoldBroken(
            f"{target.name}: pg_backup_stop did not return within {cfg.stop_timeout:g} s "
            f"(waiting for WAL archiving?); the backup ended but its label was not returned, so "
            f"this snapshot can only be restored without one; fix archiving or raise "
            f"stop_timeout") from None
    except psycopg.errors.ObjectNotInPrerequisiteState as e:
        raise HoldBroken(f"{lost} ({_oneline(e)})") from None
    except psycopg.OperationalError as e:
        raise HoldBroken(f"{lost} ({_oneline(e)})") from None
    except psycopg.Error as e:
        raise HoldBroken(f"{target.name}: pg_backup_stop failed: {_oneline(e)}; the snapshot "
                         f"has no usable backup label") from None


def _write_label_files(target: Target, session: _BackupSession, lsn: str, labelfile: bytes,
                       spcmapfile: bytes) -> dict[str, Any]:
    facts = session.facts
    cfg = session.cfg
    stamp = facts["started_at"].replace("-", "").replace(":", "")
    base = os.path.join(cfg.label_dir, f"{_safe_name(target.name)}-{stamp}")
    for n in range(1, 100):
        candidate = base if n == 1 else f"{base}-{n}"
        if not os.path.exists(candidate + ".backup_label"):
            base = candidate
            break
    label_path, map_path, note_path = (base + ".backup_label", base + ".tablespace_map",
                                       base + ".restore.txt")
    try:
        label = parse_label(labelfile)
        start_file = label.start_file
        stop_file = wal_file_name(label.timeline, lsn_to_int(lsn) // label.segment_size,
                                  label.segment_size)
    except ValueError:
        start_file = stop_file = "?"
    note = _restore_note(target, facts, lsn, start_file, stop_file, label_path, map_path,
                         bool(spcmapfile))
    try:
        for path, data in ((label_path, labelfile), (map_path, spcmapfile),
                           (note_path, note.encode())):
            _write_new(path, data)
        _fsync_dir(cfg.label_dir)
    except OSError as e:
        raise TargetError(f"{target.name}: the backup stopped at {lsn}, but writing its label to "
                          f"{cfg.label_dir} failed ({e}); without the label this snapshot can only "
                          f"be restored crash-consistently; fix label_dir") from e
    return {"stop_lsn": lsn, "label_file": label_path, "tablespace_map": map_path,
            "restore_note": note_path, "wal_needed": f"{start_file} through {stop_file}",
            "wait_for_archive": cfg.wait_for_archive}


def _write_new(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore_note(target: Target, facts: dict, lsn: str, start_file: str, stop_file: str,
                  label_path: str, map_path: str, has_map: bool) -> str:
    map_arg = f" --tablespace-map {map_path}" if has_map else ""
    return f"""\
PostgreSQL backup taken by quiesce for target {target.name!r}
LABEL: {facts['label']}
SERVER VERSION: {facts['version']}{' (standby)' if facts.get('standby') else ''}
START WAL LOCATION: {facts['start_lsn']} (file {start_file})
STOP WAL LOCATION: {lsn} (file {stop_file})

This label belongs to the disk snapshot taken while the backup ran (started
{facts['started_at']}). It is usable only together with ALL the WAL from
{start_file} through {stop_file}: the end of the backup was written to WAL
after the snapshot, so that WAL is not in the snapshot; it is in the WAL archive.

To restore with the label (point-in-time recovery, or a snapshot that was not atomic):
  1. Restore the snapshot. Do not start PostgreSQL yet.
  2. Run: quiesce restore-prepare postgresql --datadir DATADIR --label {label_path}{map_arg} --wal-source ARCHIVE_DIR
     It checks that the WAL is there, writes backup_label{' and tablespace_map' if has_map else ''}
     byte for byte, creates recovery.signal and sets restore_command.
  3. Start PostgreSQL; it replays WAL to the end of the backup and beyond.

Without that WAL, do NOT install the label: PostgreSQL would refuse to start
("WAL ends before end of online backup"). Start the restored snapshot as it is
instead; if the snapshot was atomic, crash recovery makes it consistent.
"""


# ---------------------------------------------------------------------------- restore

class RestoreRefused(TargetError):
    """restore_prepare will not install the label; the message says why and what to do."""


@dataclass(frozen=True)
class BackupLabel:
    start_lsn: int
    start_file: str
    checkpoint_lsn: int
    timeline: int
    backup_from: str
    label: str
    start_time: str
    segment_size: int


def lsn_to_int(text: str) -> int:
    hi, sep, lo = text.strip().partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def wal_file_name(timeline: int, segno: int, segment_size: int) -> str:
    per_id = 0x100000000 // segment_size
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def parse_label(data: bytes) -> BackupLabel:
    """The fields of a backup_label; the WAL segment size is inferred from its first line."""
    text = data.decode("utf-8", "replace")
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    m = re.fullmatch(r"([0-9A-Fa-f]+/[0-9A-Fa-f]+) \(file ([0-9A-F]{24})\)",
                     fields.get("START WAL LOCATION", "").strip())
    if not m or "START TIMELINE" not in fields or "CHECKPOINT LOCATION" not in fields:
        raise ValueError("it lacks START WAL LOCATION, CHECKPOINT LOCATION or START TIMELINE")
    start, start_file = lsn_to_int(m.group(1)), m.group(2)
    timeline = int(fields["START TIMELINE"])
    if int(start_file[:8], 16) != timeline:
        raise ValueError("its START WAL LOCATION file and START TIMELINE disagree")
    for shift in range(20, 31):  # initdb allows 1 MB … 1 GB, powers of two
        size = 1 << shift
        if wal_file_name(timeline, start // size, size) == start_file:
            break
    else:
        raise ValueError("its START WAL LOCATION does not match its file name")
    return BackupLabel(start, start_file, lsn_to_int(fields["CHECKPOINT LOCATION"]), timeline,
                       fields.get("BACKUP FROM", "primary").strip(), fields.get("LABEL", ""),
                       fields.get("START TIME", ""), size)


def restore_prepare(datadir: str | os.PathLike, label_file: str | os.PathLike,
                    spcmap_file: str | os.PathLike | None = None, *,
                    wal_source: str | os.PathLike | None = None, force: bool = False,
                    stop_lsn: str | None = None) -> dict[str, Any]:
    """Install a backup label into a restored (not yet started) data directory.

    Writes ``backup_label`` (and ``tablespace_map`` when *spcmap_file* is not empty) byte
    for byte, and with *wal_source* creates ``recovery.signal`` and a ``restore_command``
    copying from it. Refuses (:class:`RestoreRefused`) unless every WAL segment from the
    label's START WAL LOCATION through the end of the backup is in *wal_source* or in the
    data directory's ``pg_wal`` and holds the WAL records up to the backup's end. The end
    (stop LSN) comes from *stop_lsn*, else the backup history file in the WAL, else the
    restore note written next to the label. *force* only allows replacing an existing
    ``backup_label``, ``tablespace_map`` or ``recovery.signal``; the WAL check always runs.
    """
    datadir = os.path.abspath(datadir)
    label_file = os.fspath(label_file)
    spcmap_file = None if spcmap_file is None else os.fspath(spcmap_file)
    if not os.path.isfile(os.path.join(datadir, "PG_VERSION")):
        raise RestoreRefused(f"{datadir} is not a PostgreSQL data directory (no PG_VERSION)")
    try:
        with open(label_file, "rb") as f:
            label_bytes = f.read()
        spcmap_bytes = b""
        if spcmap_file is not None:
            with open(spcmap_file, "rb") as f:
                spcmap_bytes = f.read()
    except OSError as e:
        raise RestoreRefused(f"cannot read the backup label: {e}") from None
    try:
        label = parse_label(label_bytes)
    except ValueError as e:
        raise RestoreRefused(f"{label_file} is not a PostgreSQL backup label: {e}") from None
    if wal_source is not None:
        wal_source = os.path.abspath(os.fspath(wal_source))
        if not os.path.isdir(wal_source):
            raise RestoreRefused(f"wal_source {wal_source} is not a directory")
    running = _running_postmaster(datadir)
    if running:
        raise RestoreRefused(f"a server is running on {datadir} (postmaster.pid names pid "
                             f"{running}); restore-prepare is for a restored copy that has not "
                             f"been started")
    outputs = {"backup_label": label_bytes}
    if spcmap_bytes:
        outputs["tablespace_map"] = spcmap_bytes
    if wal_source is not None:
        outputs["recovery.signal"] = b""
    existing = [name for name in outputs if os.path.exists(os.path.join(datadir, name))]
    if existing and not force:
        raise RestoreRefused(f"{datadir} already has {', '.join(existing)}; it was prepared "
                             f"before (or started): pass force to replace")

    wal_dirs = [d for d in (wal_source, os.path.join(datadir, "pg_wal")) if d]
    stop = _stop_lsn(label, label_file, wal_dirs, stop_lsn)
    if stop < label.start_lsn:
        raise RestoreRefused(f"the stop LSN {lsn_text(stop)} lies before the label's start "
                             f"{lsn_text(label.start_lsn)}: they belong to different backups")
    first, last = label.start_lsn // label.segment_size, (stop - 1) // label.segment_size
    needed = [wal_file_name(label.timeline, s, label.segment_size) for s in range(first, last + 1)]
    where = " nor ".join(wal_dirs)
    missing = [n for n in needed if not any(os.path.isfile(os.path.join(d, n)) for d in wal_dirs)]
    if missing:
        raise RestoreRefused(
            f"the WAL this backup needs is not available: {len(missing)} of the {len(needed)} "
            f"segment(s) {needed[0]} through {needed[-1]} are in neither {where} (first "
            f"missing: {missing[0]}); supply the WAL archive as wal_source, or restore the "
            f"snapshot without the label")
    try:
        sysid = _system_identifier(datadir)
    except OSError as e:
        raise RestoreRefused(f"cannot read {datadir}/global/pg_control: {e}") from None
    reader = _WalReader(wal_dirs, label.timeline, label.segment_size, sysid)
    used = reader.verify(label, stop)

    written = []
    for name, data in outputs.items():
        _replace_file(os.path.join(datadir, name), data)
        written.append(os.path.join(datadir, name))
    restore_command = None
    if wal_source is not None:
        restore_command = _restore_command(wal_source)
        with open(os.path.join(datadir, "postgresql.auto.conf"), "a", encoding="utf-8") as f:
            _give_to_dir_owner(f.fileno(), datadir)
            f.write(f"# added by quiesce restore-prepare\nrestore_command = "
                    f"'{_guc_escape(restore_command)}'\n")
            f.flush()
            os.fsync(f.fileno())
    removed = _remove_stale_pidfile(datadir)
    _fsync_dir(datadir)
    return {"datadir": datadir, "written": written, "restore_command": restore_command,
            "start_lsn": lsn_text(label.start_lsn), "stop_lsn": lsn_text(stop),
            "wal": f"{needed[0]} through {needed[-1]}", "wal_from": sorted(used),
            "removed_stale_postmaster_pid": removed,
            "standby_signal": os.path.exists(os.path.join(datadir, "standby.signal"))}


def _stop_lsn(label: BackupLabel, label_file: str, wal_dirs: list[str],
              explicit: str | None) -> int:
    if explicit is not None:
        try:
            return lsn_to_int(explicit)
        except ValueError:
            raise RestoreRefused(f"stop_lsn {explicit!r} is not an LSN like 0/2000100") from None
    # A primary writes a backup history file into the WAL stream when the backup stops.
    history = f"{label.start_file}.{label.start_lsn % label.segment_size:08X}.backup"
    candidates = [os.path.join(d, history) for d in wal_dirs]
    base = label_file[:-len(".backup_label")] if label_file.endswith(".backup_label") else label_file
    candidates.append(base + ".restore.txt")
    for path in candidates:
        try:
            with open(path, "rb") as f:
                text = f.read(65536).decode("utf-8", "replace")
        except OSError:
            continue
        fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
        start = re.match(r"\s*([0-9A-Fa-f]+/[0-9A-Fa-f]+)", fields.get("START WAL LOCATION", ""))
        stop = re.match(r"\s*([0-9A-Fa-f]+/[0-9A-Fa-f]+)", fields.get("STOP WAL LOCATION", ""))
        if (start and stop and lsn_to_int(start.group(1)) == label.start_lsn
                and fields.get("LABEL", "").strip() == label.label.strip()):
            return lsn_to_int(stop.group(1))
    raise RestoreRefused(
        f"cannot tell where the backup ended: no backup history file {history} in "
        f"{' or '.join(wal_dirs)} and no restore note {base}.restore.txt; pass the stop LSN "
        f"(reported by quiesce thaw) explicitly")


def _system_identifier(datadir: str) -> int:
    with open(os.path.join(datadir, "global", "pg_control"), "rb") as f:
        return struct.unpack("=Q", f.read(8))[0]  # ControlFileData starts with it, in every version


def _running_postmaster(datadir: str) -> int | None:
    """The pid of a server that really runs on *datadir*, per its postmaster.pid."""
    try:
        with open(os.path.join(datadir, "postmaster.pid"), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        pid = int(lines[0])
        named = lines[1] if len(lines) > 1 else ""
    except (OSError, ValueError, IndexError):
        return None
    if os.path.realpath(named) != os.path.realpath(datadir):
        return None  # a copy: the file describes the server the snapshot was taken from
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            comm = f.read().strip()
    except OSError:
        return None
    return pid if comm.startswith(("postgres", "postmaster")) else None


def _remove_stale_pidfile(datadir: str) -> bool:
    """A restored snapshot carries the original server's postmaster.pid; it would make a
    server on the copy refuse to start while a process with that pid runs on this host."""
    path = os.path.join(datadir, "postmaster.pid")
    if os.path.exists(path) and not _running_postmaster(datadir):
        os.unlink(path)
        return True
    return False


def _replace_file(path: str, data: bytes) -> None:
    """Write *path* atomically, owned like its directory (the server must read it)."""
    tmp = path + ".quiesce-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _give_to_dir_owner(fd, os.path.dirname(path))
        _write_all(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _give_to_dir_owner(fd: int, directory: str) -> None:
    st = os.stat(directory)
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
        os.fchown(fd, st.st_uid, st.st_gid)


def _restore_command(wal_source: str) -> str:
    return f"cp {shlex.quote(os.path.join(wal_source, ''))}%f \"%p\""


def _guc_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "''")


class _WalGap(Exception):
    pass


# XLogPageHeaderData: magic u16, info u16, tli u32, pageaddr u64, rem_len u32 (+pad) = 24;
# the long header of a segment's first page adds sysid u64, seg_size u32, blcksz u32 = 40.
_PAGE = struct.Struct("=HHIQI")
_LONG = struct.Struct("=QII")
_SHORT_PHD, _LONG_PHD = 24, 40
_XLP_LONG_HEADER = 0x0002
# XLogRecord: tot_len u32, xid u32, prev u64, info u8, rmid u8, pad 2, crc u32 = 24 bytes.
_RECORD = struct.Struct("=IIQBBxxI")
_RM_XLOG_ID, _XLOG_SWITCH, _XLOG_BACKUP_END = 0, 0x40, 0x50


class _WalReader:
    """Follow the WAL record chain from a backup's start to its end, as recovery will.

    Checks each segment's long page header (this cluster's system identifier, the segment's
    own address and timeline), every page header crossed (a recycled or never-written page
    carries another address), each record's back-link, and finally the end-of-backup record
    (with its CRC) on a primary. A segment name that merely exists proves nothing: the
    snapshot's pg_wal holds the segment that was being written, and recycled segments
    renamed to future names.
    """

    def __init__(self, dirs: list[str], timeline: int, segment_size: int, sysid: int):
        self.dirs, self.timeline, self.segsize, self.sysid = dirs, timeline, segment_size, sysid
        self.blcksz = 8192
        self._cache: dict[int, tuple[mmap.mmap, str]] = {}
        self.used: set[str] = set()

    def _segment(self, segno: int) -> mmap.mmap:
        if segno in self._cache:
            return self._cache[segno][0]
        name = wal_file_name(self.timeline, segno, self.segsize)
        problems = []
        for d in self.dirs:
            path = os.path.join(d, name)
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size != self.segsize:
                        problems.append(f"{path}: {size} bytes, not a {self.segsize}-byte "
                                        f"WAL segment")
                        continue
                    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except FileNotFoundError:
                continue
            except OSError as e:
                problems.append(f"{path}: {e.strerror}")
                continue
            problem = self._check_segment(data, segno)
            if problem:
                problems.append(f"{path}: {problem}")
                continue
            self._cache = {k: v for k, v in self._cache.items() if k >= segno - 1}
            self._cache[segno] = (data, path)
            self.used.add(path)
            return data
        raise _WalGap(f"segment {name} is " + ("; ".join(problems) if problems else
                                               f"in neither {' nor '.join(self.dirs)}"))

    def _check_segment(self, data, segno: int) -> str | None:
        _magic, info, tli, pageaddr, _rem = _PAGE.unpack_from(data, 0)
        sysid, segsize, blcksz = _LONG.unpack_from(data, _SHORT_PHD)
        if not info & _XLP_LONG_HEADER or pageaddr != segno * self.segsize:
            return "a recycled or never-written segment (its header names another address)"
        if sysid != self.sysid:
            return "WAL of another cluster (its system identifier differs from pg_control's)"
        if segsize != self.segsize or blcksz not in (1024, 2048, 4096, 8192, 16384, 32768, 65536):
            return "an unexpected segment or page size in its header"
        if tli != self.timeline:
            return f"timeline {tli}, not {self.timeline}"
        self.blcksz = blcksz
        return None

    def _payload_start(self, pos: int) -> int:
        """*pos* moved past a page header if it sits on a page boundary (checking it)."""
        if pos % self.blcksz:
            return pos
        data = self._segment(pos // self.segsize)
        magic, info, tli, pageaddr, _rem = _PAGE.unpack_from(data, pos % self.segsize)
        if pageaddr != pos:
            raise _WalGap(f"the WAL ends at {lsn_text(pos)}: the page there was not written "
                          f"(segment {wal_file_name(self.timeline, pos // self.segsize, self.segsize)} "
                          f"is incomplete)")
        return pos + (_LONG_PHD if pos % self.segsize == 0 else _SHORT_PHD)

    def _read(self, pos: int, n: int, *, keep: bool) -> tuple[bytes, int]:
        """*n* record bytes from *pos*, skipping page headers; returns (bytes, end LSN)."""
        out = []
        while n:
            pos = self._payload_start(pos)
            take = min(n, self.blcksz - pos % self.blcksz)
            if keep:
                off = pos % self.segsize
                out.append(self._segment(pos // self.segsize)[off:off + take])
            pos += take
            n -= take
        return b"".join(out), pos

    def verify(self, label: BackupLabel, stop: int) -> set[str]:
        try:
            self._walk(label, stop)
        except _WalGap as e:
            raise RestoreRefused(
                f"the WAL this backup needs is not available: {e}; the backup needs WAL from "
                f"{lsn_text(label.start_lsn)} through {lsn_text(stop)}; supply the WAL archive "
                f"as wal_source, or restore the snapshot without the label") from None
        return self.used

    def _walk(self, label: BackupLabel, stop: int) -> None:
        self._segment(label.start_lsn // self.segsize)  # learns the page size
        pos, prev = label.start_lsn, None
        while True:
            pos = self._payload_start(pos)
            head, _ = self._read(pos, _RECORD.size, keep=True)
            tot_len, _xid, xl_prev, info, rmid, _crc = _RECORD.unpack(head)
            if tot_len < _RECORD.size or (prev is not None and xl_prev != prev):
                raise _WalGap(f"the WAL ends at {lsn_text(pos)} in "
                              f"{self._cache[pos // self.segsize][1]} (no valid record there)")
            is_end = rmid == _RM_XLOG_ID and info & 0xF0 == _XLOG_BACKUP_END
            record, end = self._read(pos, tot_len, keep=is_end)
            aligned = (end + 7) & ~7
            if label.backup_from == "standby":
                if aligned >= stop:  # a standby writes no end record; it ends at stop
                    return
            elif (is_end and aligned == stop and _crc32c_record(record)
                  and record[-8:] == struct.pack("=Q", label.start_lsn)):
                return
            if aligned > stop:
                raise _WalGap(f"no end-of-backup record at {lsn_text(stop)}: the WAL found "
                              f"does not belong to this backup")
            prev = pos
            if rmid == _RM_XLOG_ID and info & 0xF0 == _XLOG_SWITCH:
                pos = (pos // self.segsize + 1) * self.segsize
            else:
                pos = aligned


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def _crc32c_record(record: bytes) -> bool:
    """A WAL record's CRC-32C: over the data after the header, then the header up to xl_crc."""
    crc = 0xFFFFFFFF
    for byte in record[_RECORD.size:] + record[:20]:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF == struct.unpack_from("=I", record, 20)[0]
