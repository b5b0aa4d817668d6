"""End to end, as root: MariaDB on a loop-mounted ext4 under write load, rehearsed as
Azure Backup would run it, restored into a fresh server and checked (issue 5).

MariaDB's data directory, binary logs included (``log-bin = binlog``, relative to the
data directory), lives on an ext4 made by the ``loopfs`` fixture; its unix socket, pid
file, ``tmpdir`` and error log stay in the harness's workdir on the root filesystem. Two
independent writer processes run under load: one commits small InnoDB transactions one
after another (a row in ``tx`` plus an update of a hot ``counter`` row, so a half
transaction would show), the other INSERTs rows into a MyISAM table ``mi`` one at a time
(autocommit). Each records, for every statement, the wall-clock time it was sent and the
time the server acknowledged it. Then, with the real generated host files and a mysql
target on the default strategy (``auto`` → ``backup_stage`` on MariaDB 10.11), connecting
as an account with only the documented privileges, credentials in a private option file::

    quiesce install azure --root ROOT --log-dir LOG
    quiesce rehearse azure --root ROOT --freeze MOUNT --copy IMAGE COPY --json

The copy of the volume image (the "snapshot") is mounted and a FRESH MariaDB is started on
its data directory: InnoDB crash recovery and the binlog's own crash recovery run, as after
a power cut at the snapshot instant. What must hold, and is asserted:

* the host reports an application-consistent backup (code 0); the holder held the target
  with ``backup_stage`` (exact coordinates) and released it on thaw with status ok;
* the restored server starts and every table, system tables included, passes
  ``CHECK TABLE … EXTENDED`` with no message but "OK" (the restored server runs with
  ``myisam-recover-options = OFF``, so a MyISAM table left open would be reported, not
  silently repaired), and so does ``mariadb-check --all-databases --extended``;
* the snapshot is exactly the point at which the lock was taken: every write acknowledged
  before ``held_since`` (the adapter's ``locked_at``, taken as the last lock statement
  returned, so before ``quiesce freeze`` returned), before the pre-script returned and before the lock's ``taken_at`` is there,
  and nothing sent after the lock was taken; each table holds a prefix of what its writer
  wrote, and the counter row agrees with the InnoDB rows;
* nothing was acknowledged while the lock was held (from ``taken_at`` until the
  post-script started), and each writer had one statement waiting across the whole hold
  (the InnoDB writer's COMMIT, held by ``BLOCK_COMMIT``; the MyISAM writer's INSERT, held
  since ``FLUSH``); nothing written after the rehearsal returned is in the copy;
* the coordinates file is in the copied data directory, equals what the holder recorded,
  and matches the restored binary log exactly: the recorded file is the snapshot's last
  binlog, its size in the copy is the recorded position, which is also where the last
  event the restored server reads from it ends; the last GTID in it is the recorded
  ``gtid_binlog_pos``, and so is the restored server's ``@@gtid_binlog_pos`` before any
  write; the restored server opened the next binlog file at start;
* the binary log agrees with the storage engines: the writers' ids logged in the
  snapshot's binlogs are exactly the ids in the restored ``tx`` and ``mi`` tables.

Only the loop filesystem made here is ever frozen (by ``rehearse --freeze``, under its own
deadline). Everything is undone even when an assertion fails: the writers are killed, a
holder left holding is released with ``quiesce thaw``, servers are stopped (the server
factory), and copies are unmounted and deleted (the loopfs fixture), in that order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from quiesce.runtime import read_state

from .support.azurekit import install, rehearse, result, timeline
from .support.helpers import run, wait_until, write_config
from .support.loopfs import _mounted_from

pytestmark = [pytest.mark.root, pytest.mark.server]

MARIADB_CHECK = Path("/usr/bin/mariadb-check")
QZ_USER, QZ_PASSWORD = "quiesce", "qz-e2e-5190"
MAX_HOLD = 60          # the rehearsal holds for a few seconds
FREEZE_DEADLINE = 20   # rehearse's independent thaw, should anything hang
# A statement sent this long after the lock was taken still counts as "in flight at the
# lock" (the writer sends its next statement within microseconds; a busy 2-CPU machine may
# deschedule it for a while).
SEND_SLACK = 0.5
# A write the server finished just before the lock may be recorded by its writer a little
# after ``taken_at`` (read two round trips after the lock, truncated to the millisecond).
ACK_SLACK = 0.25

SCHEMA = (
    "CREATE DATABASE e2e",
    "CREATE TABLE e2e.tx (id INT PRIMARY KEY, payload VARCHAR(64) NOT NULL) ENGINE=InnoDB",
    "CREATE TABLE e2e.counter (k INT PRIMARY KEY, n BIGINT NOT NULL, last_id INT NOT NULL) "
    "ENGINE=InnoDB",
    "INSERT INTO e2e.counter VALUES (1, 0, 0)",
    "CREATE TABLE e2e.mi (id INT PRIMARY KEY, payload VARCHAR(64) NOT NULL) ENGINE=MyISAM",
    # The account the docs prescribe for MariaDB 10.5.2+, and nothing more.
    f"CREATE USER '{QZ_USER}'@'localhost' IDENTIFIED BY '{QZ_PASSWORD}'",
    f"GRANT RELOAD, PROCESS, BINLOG MONITOR ON *.* TO '{QZ_USER}'@'localhost'",
)

# A writer: one connection, autocommit on. "innodb": one small transaction at a time
# (explicit BEGIN/COMMIT: a row in tx and the hot counter row); "myisam": one autocommit
# INSERT at a time. Each acknowledged statement is recorded as "id sent acked" (the COMMIT
# for InnoDB), line-buffered to a file on the root filesystem.
WRITER = r"""
import os, sys, time
import pymysql
mode, host, port, out, stop = sys.argv[1:6]
conn = pymysql.connect(host=host, port=int(port), user="root", password=os.environ["E2E_PW"],
                       database="e2e", autocommit=True, connect_timeout=10,
                       read_timeout=120, write_timeout=120)
cur = conn.cursor()
with open(out, "w", buffering=1) as f:
    i = 0
    while not os.path.exists(stop):
        i += 1
        if mode == "innodb":
            cur.execute("BEGIN")
            cur.execute("INSERT INTO tx (id, payload) VALUES (%s, %s)", (i, f"row-{i}"))
            cur.execute("UPDATE counter SET n = n + 1, last_id = %s WHERE k = 1", (i,))
            sent = time.time()
            cur.execute("COMMIT")
        else:
            sent = time.time()
            cur.execute("INSERT INTO mi (id, payload) VALUES (%s, %s)", (i, f"row-{i}"))
        f.write(f"{i} {sent:.6f} {time.time():.6f}\n")
conn.close()
"""

LOGGED_INSERT = re.compile(r"INSERT INTO (tx|mi) \(id, payload\) VALUES \((\d+),")
GTID_EVENT = re.compile(r"GTID (\d+-\d+-\d+)")


# ------------------------------------------------------------------------------ the writer

class Writer:
    """An independent writer process and what it saw acknowledged."""

    def __init__(self, mode: str, server, workdir: Path):
        self.mode = mode
        self.out = workdir / f"writer-{mode}.log"
        self.err = workdir / f"writer-{mode}.err"
        self.stopfile = workdir / "stop-writers"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WRITER, mode, server.host, str(server.port),
                 str(self.out), str(self.stopfile)],
                env={**os.environ, "E2E_PW": server.root_password},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def acked(self) -> dict[int, tuple[float, float]]:
        """id -> (sent, acked) of every acknowledged statement."""
        try:
            text = self.out.read_text()
        except FileNotFoundError:
            return {}
        found = {}
        for line in text.split("\n")[:-1]:  # a half-written last line is not counted
            ident, sent, acked = line.split()
            found[int(ident)] = (float(sent), float(acked))
        return found

    def why(self) -> str:
        return f"{self.mode} writer: exit {self.proc.poll()}: {self.err.read_text()[-800:]}"

    def wait_for(self, count: int, timeout: float = 30) -> None:
        ok = wait_until(lambda: len(self.acked()) >= count or self.proc.poll() is not None,
                        timeout, 0.05)
        assert ok and self.proc.poll() is None, f"not {count} writes: {self.why()}"

    def stop(self) -> None:
        self.stopfile.touch()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
        assert self.proc.returncode == 0, self.why()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------------------ helpers

def wall(iso: str) -> float:
    """The adapter's ``taken_at`` ("…T10:27:16.109Z", truncated to ms) as epoch seconds."""
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def event_t(report: dict, prefix: str) -> float:
    return next(e["t"] for e in report["timeline"] if e["event"].startswith(prefix))


def rows(server, sql: str, database: str | None = None) -> list[tuple]:
    return server.sql(sql, database=database) or []


def binlog_index(datadir: Path) -> list[str]:
    """The binlog file names listed in the data directory's binlog.index, in order."""
    return [Path(line.strip()).name for line in (datadir / "binlog.index").read_text().splitlines()
            if line.strip()]


def next_binlog(name: str) -> str:
    stem, number = name.rsplit(".", 1)
    return f"{stem}.{int(number) + 1:0{len(number)}d}"


def check_every_table(server) -> list[str]:
    """CHECK TABLE … EXTENDED on every base table; returns the tables checked."""
    tables = [f"`{schema}`.`{name}`" for schema, name in rows(
        server, "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES "
                "WHERE TABLE_TYPE IN ('BASE TABLE', 'SYSTEM VERSIONED') AND TABLE_SCHEMA NOT IN "
                "('information_schema', 'performance_schema') ORDER BY 1, 2")]
    bad = []
    for table in tables:
        answer = rows(server, f"CHECK TABLE {table} EXTENDED")
        # One row per message; a clean table gives exactly ("status", "OK").
        if [(op, kind, text) for _, op, kind, text in answer] != [("check", "status", "OK")]:
            bad.append(f"{table}: {answer}")
    assert not bad, "CHECK TABLE found problems:\n" + "\n".join(bad)
    return tables


def mariadb_check(server, workdir: Path) -> None:
    if not MARIADB_CHECK.exists():
        return
    defaults = workdir / "check.cnf"
    defaults.write_text(f"[client]\nuser = root\npassword = {server.root_password}\n"
                        f"socket = {server.socket}\n")
    defaults.chmod(0o600)
    proc = subprocess.run([str(MARIADB_CHECK), f"--defaults-extra-file={defaults}",
                           "--all-databases", "--extended"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"mariadb-check: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert any(ln.startswith("e2e.mi ") for ln in lines), proc.stdout
    not_ok = [ln for ln in lines if not re.fullmatch(r"\S+\s+OK", ln)]
    assert not not_ok, proc.stdout


def logged_ids(server, files: list[str]) -> tuple[dict[str, list[int]], list[tuple]]:
    """The writer's ids in the named binlogs of *server*, per table, and the events read."""
    ids: dict[str, list[int]] = {"tx": [], "mi": []}
    events: list[tuple] = []
    for name in files:
        for event in rows(server, f"SHOW BINLOG EVENTS IN '{name}'"):
            events.append(event)
            match = LOGGED_INSERT.search(event[5] or "") if event[2] == "Query" else None
            if match:
                ids[match.group(1)].append(int(match.group(2)))
    return ids, events


def assert_point_in_time(name: str, acked: dict[int, tuple[float, float]], present: list[int],
                        *, held_since: float, taken_at: float, pre_returned: float,
                        post_started: float, returned: float) -> None:
    """*present* (ids in the restored table) is what one sequential writer had acknowledged
    when the lock was taken: every write acknowledged before then, nothing sent after."""
    assert present == list(range(1, len(present) + 1)), f"{name}: the rows are not a prefix"
    before_freeze = {i for i, (_, at) in acked.items() if at < held_since}
    assert len(before_freeze) >= 200, (name, len(before_freeze))
    lost = sorted(before_freeze - set(present))
    assert not lost, f"{name}: {len(lost)} writes acknowledged before freeze missing: {lost[:10]}"
    # Stronger: before the pre-script returned, before the lock was taken, and even before
    # the post-script started (nothing is acknowledged in between but a write that the
    # server finished before the lock and its writer recorded a moment late).
    for bound in (pre_returned, taken_at, post_started):
        lost = sorted({i for i, (_, at) in acked.items() if at < bound} - set(present))
        assert not lost, f"{name}: {len(lost)} acknowledged writes are missing: {lost[:10]}"
    unknown = sorted(set(present) - set(acked))
    late = sorted(i for i in present if i in acked and acked[i][0] > taken_at + 0.001)
    assert not unknown and not late, \
        f"{name}: never acknowledged {unknown[:10]}, sent after the lock {late[:10]}"
    after = {i for i, (sent, _) in acked.items() if sent > returned}
    assert after and not after & set(present), \
        f"{name}: writes sent after the rehearsal are in the snapshot"


# ------------------------------------------------------------------------------ fixture

class Cleanup:
    """What the test started beyond the fixtures: undone before servers and mounts."""

    def __init__(self):
        self.writers: list[Writer] = []
        self.configs: list[Path] = []
        self.runtime_dirs: list[Path] = []
        self.mounts: list = []

    def run(self) -> None:
        for writer in self.writers:
            writer.kill()
        for fs in self.mounts:  # thaw our own loop fs only, if a failure left it frozen
            if _mounted_from(fs.mountpoint) == fs.device:
                subprocess.run(["fsfreeze", "-u", str(fs.mountpoint)], capture_output=True,
                               timeout=30)
        for config in self.configs:  # release a holder left holding (harmless if none)
            try:
                run(config, "thaw", timeout=60)
            except Exception:
                pass
        for path in self.runtime_dirs:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cleanup(loopfs, make_mariadb):
    """Set up after loopfs and make_mariadb, so torn down first: writers and holder, then
    the servers (make_mariadb), then the mounts and copies (loopfs)."""
    undo = Cleanup()
    try:
        yield undo
    finally:
        undo.run()


# ------------------------------------------------------------------------------ the test

def test_rehearsed_snapshot_under_load_restores_with_every_commit_and_exact_coordinates(
        tmp_path, loopfs, make_mariadb, cleanup):
    fs = loopfs("ext4")
    cleanup.mounts.append(fs)
    loop_dev = os.stat(fs.mountpoint).st_dev
    original = make_mariadb(datadir=fs.mountpoint / "mysql")

    # Where things live: data and binlogs on the loop fs; socket, pid, tmp and log not.
    [(datadir, log_bin, log_bin_basename, trx_commit, sync_binlog, binlog_format)] = rows(
        original, "SELECT @@datadir, @@log_bin, @@log_bin_basename, "
                  "@@innodb_flush_log_at_trx_commit, @@sync_binlog, @@binlog_format")
    assert Path(datadir) == original.datadir and log_bin == 1
    assert Path(log_bin_basename).parent == original.datadir
    # What makes "every acknowledged commit survives a crash-consistent copy" hold.
    assert (trx_commit, sync_binlog) == (1, 1)
    assert binlog_format in ("MIXED", "STATEMENT"), binlog_format  # statements readable below
    assert os.stat(original.datadir).st_dev == loop_dev
    first_binlog = rows(original, "SHOW MASTER STATUS")[0][0]
    assert os.stat(original.datadir / first_binlog).st_dev == loop_dev
    for path in (original.socket, original.workdir / "mysqld.pid", original.log_path,
                 original.workdir):
        assert os.stat(path).st_dev != loop_dev, path
    for stmt in SCHEMA:
        original.sql(stmt)

    # The quiesce config: private files, runtime state on tmpfs, log on the root fs.
    option_file = tmp_path / "mysql.cnf"
    option_file.write_text(f"[client]\nuser = {QZ_USER}\npassword = {QZ_PASSWORD}\n"
                           f"socket = {original.socket}\n")
    option_file.chmod(0o600)
    runtime_dir = Path(tempfile.mkdtemp(prefix="quiesce-e2e-mariadb-", dir="/dev/shm"))
    cleanup.runtime_dirs.append(runtime_dir)
    config = write_config(tmp_path, {"db": {"kind": "mysql", "option_file": str(option_file)}},
                          runtime_dir=str(runtime_dir), max_hold=MAX_HOLD, timeout=10,
                          log_file=str(tmp_path / "log" / "quiesce.log"))
    cleanup.configs.append(config)
    assert os.stat(config.parent).st_dev != loop_dev
    root = tmp_path / "root"
    proc = install(config, root, tmp_path / "log")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    writers = [Writer(mode, original, tmp_path) for mode in ("innodb", "myisam")]
    cleanup.writers += writers
    for writer in writers:
        writer.wait_for(300)

    copy = loopfs.new_path("snapshot", ".img")
    launched = time.time()
    report = rehearse(config, root, "--freeze", str(fs.mountpoint), "--freeze-deadline",
                      str(FREEZE_DEADLINE), "--copy", str(fs.image), str(copy), timeout=120).report
    returned = time.time()
    state = read_state(str(runtime_dir)) or {}
    for writer in writers:  # the load goes on after thaw
        writer.wait_for(len(writer.acked()) + 100)
    for writer in writers:
        writer.stop()
    innodb, myisam = (writer.acked() for writer in writers)

    # ---- the host's verdict and the hold
    assert result(report) == (0, "application", None), json.dumps(report["timeline"], indent=1)
    assert report["freeze"]["mounts"] == [str(fs.mountpoint)]
    assert not report["freeze"]["thawed_by_watchdog"]
    assert report["snapshot"]["ok"], report["snapshot"]
    events = timeline(report)
    order = ["Prescript for ScriptRunner successfully executed.", "froze ", "snapshot: copy",
             "thawed ", "post-script started", "Postscript for ScriptRunner successfully"]
    positions = [next(i for i, e in enumerate(events) if e.startswith(o)) for o in order]
    assert positions == sorted(positions), events
    assert [(h["target"], h["released_by"], h["status"]) for h in report["holds"]] == [
        ("db", "thaw", "ok")]
    [target] = state["targets"]
    facts = target["facts"]
    assert target["session_bound"] is True
    assert facts["strategy"] == "backup_stage" and facts["flavour"] == "mariadb"
    assert facts["locks"] == ["BACKUP STAGE START", "BACKUP STAGE BLOCK_COMMIT"]
    coords = facts["coordinates"]
    assert coords["exact"] is True and coords["strategy"] == "backup_stage"
    assert facts["coordinates_file"] == str(original.datadir / "quiesce-coordinates.json")
    held_since, released_at = state["held_since"], state["released_at"]
    taken_at = wall(coords["taken_at"])  # read after BLOCK_COMMIT returned, ms precision
    assert launched < held_since <= taken_at + 0.001 < released_at < returned
    # When the pre-script returned and the post-script (which ends the backup stage)
    # started, give or take a millisecond: the rehearsal's offsets count from started_at.
    origin = report["started_at"] - 0.001
    assert launched < origin
    pre_returned_lb = origin + event_t(report, "Prescript for ScriptRunner successfully")
    post_started_lb = origin + event_t(report, "post-script started")
    assert taken_at < post_started_lb

    # ---- the writers during the hold: nothing acknowledged, one statement each waited
    # through it (InnoDB: a COMMIT, held by BLOCK_COMMIT; MyISAM: an INSERT, held since FLUSH)
    for name, acked in (("InnoDB", innodb), ("MyISAM", myisam)):
        in_hold = sorted(i for i, (_, at) in acked.items()
                         if taken_at + ACK_SLACK < at < post_started_lb)
        assert not in_hold, f"{name} writes acknowledged while held: {in_hold[:5]}"
        across = [(i, sent, at) for i, (sent, at) in acked.items() if sent < post_started_lb < at]
        assert len(across) == 1 and across[0][1] <= taken_at + SEND_SLACK, (name, across, taken_at)
        # The load really ran up to the lock.
        assert any(taken_at - 1.0 < at < taken_at for _, at in acked.values()), name

    # ---- the snapshot: mounted, and a fresh server started on it
    restored_fs = fs.mount_copy(copy)
    copy_datadir = restored_fs.mountpoint / "mysql"
    recorded = json.loads((copy_datadir / "quiesce-coordinates.json").read_text())
    assert recorded == coords, (recorded, coords)
    binlog = recorded["binlog"]
    assert binlog and binlog["file"] and binlog["position"] > 4, recorded
    recorded_gtid = recorded["gtid"]["gtid_binlog_pos"]
    assert re.fullmatch(r"0-1-\d+", recorded_gtid), recorded_gtid
    # The recorded binlog is the snapshot's last one, and ends exactly at the position.
    snapshot_binlogs = binlog_index(copy_datadir)
    assert snapshot_binlogs and snapshot_binlogs[-1] == binlog["file"], snapshot_binlogs
    assert (copy_datadir / binlog["file"]).stat().st_size == binlog["position"]

    restored = make_mariadb.from_datadir(copy_datadir, options={"myisam-recover-options": "OFF"})
    assert os.stat(restored.datadir).st_dev == os.stat(restored_fs.mountpoint).st_dev != loop_dev
    log = restored.log_tail(400)
    # The copy's binlog is still marked in use, as after a power cut: the server recovers
    # with it (commits or rolls back what InnoDB had prepared to agree with it).
    assert "Recovering after a crash using binlog" in log, log

    # Coordinates vs the restored binary log, read before anything writes to it.
    [(gtid_now,)] = rows(restored, "SELECT @@GLOBAL.gtid_binlog_pos")
    assert gtid_now == recorded_gtid
    [status] = rows(restored, "SHOW MASTER STATUS")
    assert status[0] == next_binlog(binlog["file"]), status  # rotated at start
    logs = dict((name, size) for name, size, *_ in rows(restored, "SHOW BINARY LOGS"))
    assert logs[binlog["file"]] == binlog["position"], logs
    assert (copy_datadir / binlog["file"]).stat().st_size == binlog["position"]
    ids, binlog_events = logged_ids(restored, snapshot_binlogs)
    last_file_events = [e for e in binlog_events if e[0] == binlog["file"]]
    assert last_file_events[-1][4] == binlog["position"], last_file_events[-3:]
    gtids = [GTID_EVENT.search(e[5]).group(1) for e in last_file_events if e[2] == "Gtid"]
    assert gtids and gtids[-1] == recorded_gtid, gtids[-3:]

    # ---- integrity
    checked = check_every_table(restored)
    assert {"`e2e`.`tx`", "`e2e`.`counter`", "`e2e`.`mi`"} <= set(checked), checked
    mariadb_check(restored, tmp_path)

    # ---- the data: every acknowledged write before the lock, nothing after it
    tx_ids = sorted(i for (i,) in rows(restored, "SELECT id FROM tx", "e2e"))
    mi_ids = sorted(i for (i,) in rows(restored, "SELECT id FROM mi", "e2e"))
    [(n, last_id)] = rows(restored, "SELECT n, last_id FROM counter WHERE k = 1", "e2e")
    assert (n, last_id) == (len(tx_ids), len(tx_ids)), "a transaction is only half there"
    bounds = dict(held_since=held_since, taken_at=taken_at, pre_returned=pre_returned_lb,
                  post_started=post_started_lb, returned=returned)
    assert_point_in_time("InnoDB", innodb, tx_ids, **bounds)
    assert_point_in_time("MyISAM", myisam, mi_ids, **bounds)

    # The binary log agrees with the engines, row for row.
    assert sorted(ids["tx"]) == tx_ids, (len(ids["tx"]), len(tx_ids))
    assert sorted(ids["mi"]) == mi_ids, (len(ids["mi"]), len(mi_ids))

    # The live server wrote on after thaw, into the same binlog file the snapshot recorded.
    [(live_file, live_pos, *_)] = rows(original, "SHOW MASTER STATUS")
    assert (live_file, live_pos > binlog["position"]) == (binlog["file"], True)
