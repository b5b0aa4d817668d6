"""End to end, as root: PostgreSQL on a loop-mounted ext4 under a write load, rehearsed.

Each test puts a cluster's data directory (``pg_wal`` inside) on a loop-mounted ext4 made
by the ``loopfs`` fixture, runs a pgbench-style load from independent processes (each
client commits small transactions on its own connection and records every committed id
with the wall-clock time its COMMIT returned), installs the Azure host files with
``quiesce install azure --root``, and runs ``quiesce rehearse azure`` with a real
``fsfreeze`` of that mount point only and a copy of the volume image as the snapshot. The
copy is mounted and a FRESH server is started on it. What is checked on the restored copy:

* it starts (crash recovery in ``checkpoint`` mode; backup recovery after
  ``quiesce restore-prepare`` in ``backup`` mode) and ``pg_amcheck`` finds nothing;
* every transaction whose COMMIT returned before ``quiesce freeze`` returned (the holder's
  ``held_since``, recorded before the quiesce phase) is there, and so is every one that
  returned before the filesystem freeze (a lower bound of that instant: the rehearsal's own
  ``froze`` offset added to the moment the rehearsal was launched);
* nothing is there that no client saw committed, each client's transactions form a
  prefix of what it committed (they commit one after another), and the accounts' balances
  equal the sums of the history rows (no transaction is half there);
* in ``checkpoint`` mode the copy is a point in time: what was committed after the
  rehearsal returned is not in it.

In ``backup`` mode the restore needs the WAL archive; the refusal test shows that
``restore-prepare`` refuses (exit 1, the WAL named, nothing written) every way the WAL
can be missing, that installing the label anyway makes PostgreSQL refuse to start
(``WAL ends before end of online backup``), which is what the refusal prevents, and that
the same snapshot without the label starts with every committed transaction.

Only the loop filesystem each test created is ever frozen; servers, writers, copies and
mounts are stopped and removed by fixtures even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from quiesce.adapters import postgresql_restore as pgmod
from quiesce.runtime import read_state

from .support.azurekit import install, rehearse, result
from .support.helpers import run, wait_until, write_config
from .support.servers import ServerError

pytestmark = [pytest.mark.root, pytest.mark.server]

CLIENTS = 2
ACCOUNTS = 1000

# One pgbench-style client: a random account's balance moves by delta and a history row
# records it, in one transaction. Each committed id is printed with the time COMMIT
# returned, line-buffered to a file on the root filesystem (never the frozen one).
WRITER = r"""
import os, random, sys, time
import psycopg
dsn, client, clients, out, stop = sys.argv[1:6]
client, clients = int(client), int(clients)
rng = random.Random(client)
conn = psycopg.connect(dsn, autocommit=False, application_name=f"e2e-writer-{client}")
with open(out, "w", buffering=1) as f:
    i = client
    while not os.path.exists(stop):
        aid, delta = rng.randrange(1, %(accounts)d + 1), rng.randrange(-5000, 5001)
        with conn.cursor() as cur:
            cur.execute("UPDATE accounts SET abalance = abalance + %%s WHERE aid = %%s", (delta, aid))
            cur.execute("INSERT INTO history (id, aid, delta) VALUES (%%s, %%s, %%s)", (i, aid, delta))
        conn.commit()
        f.write(f"{i} {time.time():.6f}\n")
        i += clients
conn.close()
""" % {"accounts": ACCOUNTS}

SCHEMA = f"""
CREATE EXTENSION amcheck;
CREATE TABLE accounts (aid int PRIMARY KEY, abalance bigint NOT NULL DEFAULT 0,
                       filler char(84) NOT NULL DEFAULT '');
CREATE TABLE history (id bigint PRIMARY KEY, aid int NOT NULL REFERENCES accounts,
                      delta int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE INDEX history_aid ON history (aid);
INSERT INTO accounts (aid) SELECT g FROM generate_series(1, {ACCOUNTS}) g;
"""


# ------------------------------------------------------------------------------ the load

class Load:
    """CLIENTS writer processes, each on its own connection, recording what committed."""

    def __init__(self, dsn: str, workdir: Path):
        self.workdir = workdir
        self.stopfile = workdir / "stop-writers"
        self.outputs = [workdir / f"writer-{c}.log" for c in range(CLIENTS)]
        self.errors = [workdir / f"writer-{c}.err" for c in range(CLIENTS)]
        self.procs: list[subprocess.Popen] = []
        for c in range(CLIENTS):
            with open(self.errors[c], "wb") as err:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", WRITER, dsn, str(c), str(CLIENTS),
                     str(self.outputs[c]), str(self.stopfile)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err))

    def counts(self) -> list[int]:
        return [len(read_lines(p)) for p in self.outputs]

    def wait_for(self, each: int, timeout: float = 30) -> None:
        ok = wait_until(lambda: min(self.counts()) >= each or self._dead(), timeout, 0.05)
        assert ok and not self._dead(), f"the writers did not commit {each} each: {self.why()}"

    def _dead(self) -> bool:
        return any(p.poll() is not None for p in self.procs)

    def why(self) -> str:
        return "; ".join(f"writer {c}: exit {p.poll()}, {self.errors[c].read_text()[-500:]}"
                         for c, p in enumerate(self.procs))

    def stop(self) -> None:
        """Let each writer finish its transaction and exit; it must exit cleanly."""
        self.stopfile.touch()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        assert all(p.returncode == 0 for p in self.procs), self.why()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def committed(self) -> dict[int, float]:
        """id -> wall-clock time its COMMIT returned, for every client."""
        out: dict[int, float] = {}
        for path in self.outputs:
            for line in read_lines(path):
                ident, at = line.split()
                out[int(ident)] = float(at)
        return out


def read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [line for line in text.split("\n")[:-1] if line]  # drop a half-written last line


# ------------------------------------------------------------------------------ one cycle

@dataclass
class Cycle:
    """One rehearsed snapshot: the original server, the copy, and what the load saw."""

    mode: str
    fs: object
    server: object
    tmp: Path
    config: Path
    root: Path
    runtime_dir: Path
    copy: Path
    archive: Path | None
    label_dir: Path | None
    report: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    launched: float = 0.0    # wall clock just before the rehearsal was launched
    returned: float = 0.0    # wall clock just after it returned
    commits: dict[int, float] = field(default_factory=dict)

    @property
    def held_since(self) -> float:
        return self.state["held_since"]

    def event_t(self, prefix: str) -> float:
        return next(e["t"] for e in self.report["timeline"] if e["event"].startswith(prefix))

    @property
    def froze_no_earlier_than(self) -> float:
        """A lower bound of the wall-clock instant the filesystem was frozen.

        The rehearsal's offsets count from a clock read after its process started, which
        is after ``launched``.
        """
        return self.launched + self.event_t("froze ")

    def committed_before(self, instant: float) -> set[int]:
        return {i for i, at in self.commits.items() if at < instant}

    def committed_after(self, instant: float) -> set[int]:
        return {i for i, at in self.commits.items() if at > instant}

    @property
    def target_outcome(self) -> dict:
        [outcome] = self.state["outcomes"]
        return outcome


class E2E:
    """Builds cycles for one test and undoes everything they started."""

    def __init__(self, loopfs, make_pg, tmp: Path):
        self.loopfs, self.make_pg, self.tmp = loopfs, make_pg, tmp
        self.loads: list[Load] = []
        self.configs: list[tuple[Path, Path]] = []

    def cycle(self, mode: str = "checkpoint") -> Cycle:
        tmp = self.tmp
        fs = self.loopfs("ext4")
        archive = label_dir = None
        settings = {}
        if mode == "backup":
            archive = tmp / "archive"
            archive.mkdir()
            settings = {"archive_mode": "on",
                        "archive_command": f"test ! -f {archive}/%f && cp %p {archive}/%f"}
            label_dir = tmp / "labels"  # root filesystem, written by quiesce (root)
            label_dir.mkdir()
        server = self.make_pg(datadir=fs.mountpoint / "pgdata", settings=settings)
        assert os.stat(server.datadir).st_dev == os.stat(fs.mountpoint).st_dev
        assert os.stat(server.log_path).st_dev != os.stat(fs.mountpoint).st_dev
        if archive is not None:
            server.chown(archive)
        server.sql("CREATE DATABASE e2e")
        with server.connect(dbname="e2e") as conn:
            conn.execute(SCHEMA)

        runtime_dir = Path(tempfile.mkdtemp(prefix="quiesce-e2e-pg-", dir="/dev/shm"))
        target = {"kind": "postgresql", "host": server.host, "port": server.port,
                  "user": server.superuser, "dbname": "postgres", "mode": mode}
        if mode == "backup":
            target.update(label_dir=str(label_dir), wait_for_archive=True, stop_timeout=30)
        config = write_config(tmp, {"db": target}, runtime_dir=str(runtime_dir),
                              log_file=str(tmp / "log" / "quiesce.log"), max_hold=90, timeout=10)
        self.configs.append((config, runtime_dir))
        root = tmp / "root"
        proc = install(config, root, tmp / "log")
        assert proc.returncode == 0, proc.stdout + proc.stderr

        load = Load(server.dsn(dbname="e2e"), tmp)
        self.loads.append(load)
        load.wait_for(100)
        copy = tmp / "snapshot.img"
        cycle = Cycle(mode, fs, server, tmp, config, root, runtime_dir, copy, archive, label_dir)
        cycle.launched = time.time()
        proc = rehearse(config, root, "--freeze", str(fs.mountpoint),
                        "--copy", str(fs.image), str(copy), timeout=120)
        cycle.returned = time.time()
        cycle.report = proc.report
        before = sum(load.counts())
        # The load goes on after the post-script: these commits must NOT be in the copy.
        assert wait_until(lambda: sum(load.counts()) >= before + 100, 30, 0.05), load.why()
        load.stop()
        cycle.commits = load.committed()
        cycle.state = read_state(str(runtime_dir)) or {}
        return cycle

    def cleanup(self) -> None:
        for load in self.loads:
            load.kill()
        for config, runtime_dir in self.configs:
            # A failed rehearsal may have left a holder holding: release it (harmless if not).
            with contextlib.suppress(Exception):
                run(config, "thaw", timeout=60)
            shutil.rmtree(runtime_dir, ignore_errors=True)


@pytest.fixture
def e2e(loopfs, server_tmp_path, request):
    """Factory of cycles. Set up after loopfs and the server factory, so torn down before
    them: writers and holders first, then servers, then the mounts."""
    version = request.node.callspec.params["pg_version"]
    make_pg = request.getfixturevalue(f"make_{version}")
    env = E2E(loopfs, make_pg, server_tmp_path)
    try:
        yield env
    finally:
        env.cleanup()


# ------------------------------------------------------------------------------ checks

def restore(cycle: Cycle, image: Path | None = None):
    """Mount a copy of the volume; returns its data directory (no server started).

    The copy was taken while ext4 was frozen: freezing commits the journal and clears
    the needs_recovery feature, which a mounted, unfrozen ext4 always has (so a copy of
    the live volume shows it), and a forced read-only e2fsck finds nothing.
    """
    image = image or cycle.copy
    header = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    [features] = [line for line in header.stdout.splitlines()
                  if line.startswith("Filesystem features:")]
    assert "has_journal" in features and "needs_recovery" not in features, features
    fsck = subprocess.run(["e2fsck", "-f", "-n", str(image)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert fsck.returncode == 0, f"e2fsck {fsck.returncode}: {fsck.stdout}{fsck.stderr}"
    mounted = cycle.fs.mount_copy(image)
    datadir = mounted.mountpoint / "pgdata"
    assert (datadir / "PG_VERSION").exists()
    return datadir


def assert_rehearsal_ok(cycle: Cycle) -> None:
    report = cycle.report
    assert result(report) == (0, "application", None), json.dumps(report, indent=2)
    assert report["freeze"]["mounts"] == [str(cycle.fs.mountpoint)]
    assert not report["freeze"]["thawed_by_watchdog"]
    assert report["snapshot"]["ok"], report["snapshot"]
    [hold] = report["holds"]
    assert (hold["target"], hold["released_by"], hold["status"]) == ("db", "thaw", "ok"), hold
    events = [e["event"] for e in report["timeline"]]
    order = [next(i for i, e in enumerate(events) if e.startswith(p)) for p in
             ("pre-script started", "Prescript for ScriptRunner successfully", "froze ",
              "snapshot: copy", "thawed ", "post-script started",
              "Postscript for ScriptRunner successfully")]
    assert order == sorted(order), events
    # The scripts and quiesce logged to the root filesystem, not to the frozen one.
    for name in ("azure-pre-script.log", "azure-post-script.log", "quiesce.log"):
        assert (cycle.tmp / "log" / name).stat().st_size > 0, name
    assert cycle.held_since and cycle.launched < cycle.held_since < cycle.returned


def amcheck(server) -> None:
    proc = subprocess.run(
        [str(server.bin("pg_amcheck")), "-h", server.host, "-p", str(server.port),
         "-U", server.superuser, "-d", "e2e", "--heapallindexed", "--rootdescend",
         "--progress"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"pg_amcheck: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    # It really checked the tables the load wrote (the progress line counts relations).
    assert re.search(r"\d+/\d+ relations", proc.stderr), proc.stderr


def assert_holds_what_was_committed(cycle: Cycle, restored, *, point_in_time: bool) -> None:
    rows = restored.sql("SELECT id FROM history", dbname="e2e")
    present = {r[0] for r in rows}
    commits = cycle.commits

    before_freeze_returned = cycle.committed_before(cycle.held_since)
    assert len(before_freeze_returned) >= 200, len(before_freeze_returned)
    lost = sorted(before_freeze_returned - present)
    assert not lost, (f"{len(lost)} transactions committed before `quiesce freeze` returned "
                      f"are missing, e.g. {lost[:10]}")

    # Stronger: the commits returned before the filesystem froze are durable in the copy.
    before_fs_freeze = cycle.committed_before(cycle.froze_no_earlier_than)
    lost = sorted(before_fs_freeze - present)
    assert not lost, (f"{len(lost)} transactions committed before the filesystem was frozen "
                      f"are missing, e.g. {lost[:10]}")
    # The load really ran while freeze worked: commits between its launch and the hold.
    assert cycle.committed_before(cycle.held_since) - cycle.committed_before(cycle.launched)

    phantom = sorted(present - set(commits))
    assert not phantom, f"rows no client saw committed: {phantom[:10]}"
    for c in range(CLIENTS):
        sequence = sorted(i for i in commits if i % CLIENTS == c)
        mine = sorted(i for i in present if i % CLIENTS == c)
        assert mine == sequence[:len(mine)], f"client {c}: not a prefix of its commits"

    if point_in_time:
        after = cycle.committed_after(cycle.returned)
        assert after, "the load committed nothing after the rehearsal"
        assert not (after & present), "the copy holds transactions committed after the thaw"

    # Atomicity: every balance is the sum of its history rows.
    [(bad, total, deltas)] = restored.sql(
        "SELECT (SELECT count(*) FROM accounts a LEFT JOIN (SELECT aid, sum(delta) s FROM "
        "history GROUP BY aid) h USING (aid) WHERE a.abalance <> coalesce(h.s, 0)), "
        "(SELECT sum(abalance) FROM accounts), (SELECT coalesce(sum(delta), 0) FROM history)",
        dbname="e2e")
    assert bad == 0 and total == deltas, (bad, total, deltas)


def wait_out_of_recovery(server) -> None:
    assert wait_until(lambda: server.sql("SELECT pg_is_in_recovery()") == [(False,)], 60), \
        server.log_tail()


def restore_prepare(*args: str) -> subprocess.CompletedProcess:
    return run(None, "restore-prepare", "postgresql", *args, timeout=60)


def snapshot_of(datadir: Path) -> dict[str, bytes | None]:
    """The top level of a data directory: names and, for small files, contents."""
    out: dict[str, bytes | None] = {}
    for entry in sorted(os.scandir(datadir), key=lambda e: e.name):
        out[entry.name] = (Path(entry.path).read_bytes()
                           if entry.is_file() and entry.stat().st_size < 65536 else None)
    return out


# ------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("pg_version", ["pg15", "pg18"])
def test_checkpoint_mode_snapshot_restores_every_committed_transaction(e2e, pg_version):
    cycle = e2e.cycle("checkpoint")
    assert_rehearsal_ok(cycle)
    assert cycle.target_outcome["facts"] in (None, {}), cycle.target_outcome  # nothing held

    datadir = restore(cycle)
    assert not (datadir / "backup_label").exists()
    restored = e2e.make_pg.from_datadir(datadir)
    wait_out_of_recovery(restored)
    log = restored.log_tail(300)
    assert "database system was interrupted" in log and "redo done" in log, log
    assert "backup recovery" not in log, log
    amcheck(restored)
    assert_holds_what_was_committed(cycle, restored, point_in_time=True)


@pytest.mark.parametrize("pg_version", ["pg15", "pg18"])
def test_backup_mode_snapshot_restores_with_its_label_and_the_archive(e2e, pg_version):
    cycle = e2e.cycle("backup")
    assert_rehearsal_ok(cycle)
    facts = cycle.target_outcome["facts"]
    [target] = cycle.state["targets"]
    assert target["session_bound"] is True and target["facts"]["mode"] == "backup"

    # The label files are in label_dir, named after the target, with the stop in the note.
    label = Path(facts["label_file"])
    assert label.parent == cycle.label_dir and label.name.startswith("db-")
    assert sorted(p.name for p in cycle.label_dir.iterdir()) == sorted(
        label.name.replace(".backup_label", s)
        for s in (".backup_label", ".tablespace_map", ".restore.txt"))
    parsed = pgmod.parse_label(label.read_bytes())
    assert parsed.label == target["facts"]["label"] and parsed.backup_from == "primary"
    assert pgmod.lsn_text(parsed.start_lsn) == target["facts"]["start_lsn"]
    note = Path(facts["restore_note"]).read_text()
    assert f"STOP WAL LOCATION: {facts['stop_lsn']}" in note
    assert Path(facts["tablespace_map"]).read_bytes() == b""
    # wait_for_archive: the WAL through the stop was archived before thaw returned.
    last_needed = facts["wal_needed"].split(" through ")[1]
    assert (cycle.archive / last_needed).exists(), sorted(os.listdir(cycle.archive))

    datadir = restore(cycle)
    proc = restore_prepare("--datadir", str(datadir), "--label", str(label),
                           "--wal-source", str(cycle.archive), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prepared = json.loads(proc.stdout)["result"]
    assert prepared["stop_lsn"] == facts["stop_lsn"]
    assert (datadir / "backup_label").read_bytes() == label.read_bytes()
    assert (datadir / "recovery.signal").exists()

    restored = e2e.make_pg.from_datadir(datadir)
    wait_out_of_recovery(restored)
    log = restored.log_tail(400)
    for line in ("starting backup recovery", "completed backup recovery",
                 "consistent recovery state reached", "restored log file"):
        assert line in log, log
    amcheck(restored)
    # Archive recovery replays whatever the archive holds beyond the backup, so the copy
    # may hold later commits too: no point-in-time check here.
    assert_holds_what_was_committed(cycle, restored, point_in_time=False)


@pytest.mark.parametrize("pg_version", ["pg15"])
def test_restore_prepare_refuses_when_the_wal_is_missing(e2e, pg_version):
    cycle = e2e.cycle("backup")
    assert_rehearsal_ok(cycle)
    facts = cycle.target_outcome["facts"]
    label = facts["label_file"]
    first, last = facts["wal_needed"].split(" through ")
    # A second, identical snapshot (made before either is mounted).
    copy2 = cycle.tmp / "snapshot2.img"
    subprocess.run(["cp", "--sparse=always", str(cycle.copy), str(copy2)], check=True)
    datadir = restore(cycle)
    pristine = snapshot_of(datadir)

    def refused(*extra: str, why: str) -> str:
        proc = restore_prepare("--datadir", str(datadir), "--label", label, *extra)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "quiesce: error: the WAL this backup needs is not available" in proc.stderr, \
            proc.stderr
        assert why in proc.stderr, proc.stderr
        assert snapshot_of(datadir) == pristine, "a refused restore-prepare wrote something"
        return proc.stderr

    empty = cycle.tmp / "empty-wal"
    empty.mkdir()
    # 1. Only the snapshot's pg_wal: it has a file named like the segment being written,
    #    but not the end-of-backup record pg_backup_stop wrote after the snapshot.
    refused(why=facts["stop_lsn"])
    # 2. An empty WAL source.
    refused("--wal-source", str(empty), why=facts["stop_lsn"])
    # 3. An archive that lost the backup's segments (the history file is still there).
    partial = cycle.tmp / "partial-archive"
    shutil.copytree(cycle.archive, partial,
                    ignore=lambda d, names: [n for n in names if first <= n[:24] <= last
                                             and len(n) == 24])
    assert any(n.endswith(".backup") for n in os.listdir(partial))
    refused("--wal-source", str(partial), why=facts["stop_lsn"])
    # 4. The snapshot's pg_wal emptied of the needed segments too: named as missing.
    moved = cycle.tmp / "moved-wal"
    moved.mkdir()
    for name in os.listdir(datadir / "pg_wal"):
        if len(name) == 24 and first <= name <= last:
            shutil.move(datadir / "pg_wal" / name, moved / name)
    assert os.listdir(moved), "the snapshot's pg_wal held none of the backup's segments"
    pristine = snapshot_of(datadir)
    refused("--wal-source", str(partial), why=f"first missing: {first}")
    for name in os.listdir(moved):
        shutil.move(moved / name, datadir / "pg_wal" / name)

    # The refusal is right: the label installed anyway, as restore-prepare would have with
    # that empty WAL source, makes PostgreSQL refuse to start.
    datadir2 = restore(cycle, copy2)
    shutil.copyfile(label, datadir2 / "backup_label")
    (datadir2 / "recovery.signal").touch()
    with open(datadir2 / "postgresql.auto.conf", "a") as f:
        f.write(f"restore_command = 'cp {empty}/%f \"%p\"'\n")
    with pytest.raises(ServerError) as failed:
        e2e.make_pg.from_datadir(datadir2, start_timeout=60)
    assert "WAL ends before end of online backup" in str(failed.value), str(failed.value)

    # And the advice in the refusal holds: the snapshot without the label starts, by crash
    # recovery, with every committed transaction.
    restored = e2e.make_pg.from_datadir(datadir)
    wait_out_of_recovery(restored)
    log = restored.log_tail(300)
    assert "backup recovery" not in log and "redo done" in log, log
    amcheck(restored)
    assert_holds_what_was_committed(cycle, restored, point_in_time=True)
