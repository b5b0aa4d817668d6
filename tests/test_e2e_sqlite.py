"""End to end as root: SQLite on a loop-mounted ext4, real fsfreeze, the volume image
copied as the snapshot, restored and checked (see tests/support/loopfs.py).

Only filesystems the loopfs fixture made are frozen, always with a deadline after which
an independent process thaws them, and the fixture thaws again at teardown.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quiesce import fsfreeze
from quiesce.runtime import read_state, runtime_dir_of

from .support.azurekit import install, rehearse, result, timeline
from .support.helpers import make_sqlite, run, sqlite_writable, wait_until, write_config

pytestmark = pytest.mark.root

DEADLINE = 20.0
O_ACCMODE = 0o3
SQLITE_FILES = ("", "-wal", "-shm", "-journal")
#: Kernel functions a task sleeps in when it waits for a frozen filesystem.
FROZEN_WAITS = ("percpu_rwsem", "sb_start", "__sb_start_write", "sb_wait_write", "freeze")

WRITER = r"""
import sqlite3, sys, time
db, log, stop = sys.argv[1:4]
conn = sqlite3.connect(db, timeout=30, isolation_level=None)
out = open(log, "a", buffering=1)
i = 0
while True:
    try:
        open(stop).close()
        break
    except FileNotFoundError:
        pass
    i += 1
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (id, v) VALUES (?, 'writer')", (i,))
            conn.execute("COMMIT")
            break
        except sqlite3.OperationalError:  # busy past the timeout: try again
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    out.write(f"{i} {time.time()!r}\n")  # after COMMIT returned: the write is committed
    time.sleep(0.005)
"""


def restored_writes(fs, copy: Path, commits: Path) -> tuple[list[tuple[int, float]], set[int]]:
    """The writer's (id, commit time) record, and the ids in the restored copy, whose
    integrity check passed."""
    committed = [(int(i), float(t)) for i, t in
                 (ln.split() for ln in commits.read_text().splitlines())]
    restored = fs.mount_copy(copy)
    conn = sqlite3.connect(restored.mountpoint / "app.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return committed, {i for (i,) in conn.execute("SELECT id FROM t WHERE v = 'writer'")}
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def no_holder_left(tmp_path):
    yield
    for config in tmp_path.glob("quiesce.toml"):
        run(config, "thaw")


def tasks(pid: int) -> list[tuple[str, str]]:
    """(state, wchan) of every thread of pid."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/task/{tid}/wchan") as f:
            found.append((state, f.read().strip()))
    return found


def blocked_on_freeze(pid: int) -> bool:
    return any(state == "D" or any(w in wchan for w in FROZEN_WAITS)
               for state, wchan in tasks(pid))


def writable_files_under(pid: int, mount: Path) -> set[str]:
    """Paths under *mount* that *pid* holds open for writing (from fdinfo flags)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = int(next(ln for ln in f if ln.startswith("flags:")).split()[1], 8)
        except (FileNotFoundError, StopIteration):
            continue
        if target.startswith(str(mount) + "/") and flags & O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
            found.add(target)
    return found


def test_holder_does_not_touch_a_frozen_filesystem(tmp_path, loopfs):
    """Issue 2: freeze, then fsfreeze the database's filesystem; status still answers, the
    holder never blocks on the frozen fs, logs only after release; thaw works."""
    fs = loopfs()
    db = make_sqlite(fs.mountpoint / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}}, max_hold=60)
    log_file = tmp_path / "log" / "quiesce.log"
    frozen_ok = {str(db) + suffix for suffix in SQLITE_FILES}

    proc = run(config, "freeze", "--json", check_json=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    holder = proc.report["holder_pid"]
    assert f" {holder} " not in log_file.read_text(), "the holder logged to disk while holding"
    with fsfreeze.freeze([fs.mountpoint], deadline_seconds=DEADLINE) as frozen:
        # Control: a real writer to the frozen fs is seen as blocked by the same check.
        writer = subprocess.Popen(["/bin/sh", "-c", f"echo x > {fs.mountpoint}/probe"])
        assert wait_until(lambda: blocked_on_freeze(writer.pid), timeout=3), \
            "the blocked-writer check does not recognise a writer on a frozen fs"
        status = run(config, "status", "--json", timeout=10,
                     check_json=True)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.report["held"] and status.report["state"]["alive"]
        assert status.report["state"]["holder_pid"] == holder
        for _ in range(10):  # over a second: the holder's watchdog loop ticks every 0.2 s
            assert not blocked_on_freeze(holder), tasks(holder)
            time.sleep(0.1)
        # Its only writable descriptors on the frozen fs are the database's own files
        # (the write lock needs them); no log, state or temporary file.
        assert writable_files_under(holder, fs.mountpoint) <= frozen_ok
        assert str(db) in writable_files_under(holder, fs.mountpoint)
        assert f" {holder} " not in log_file.read_text()
        assert writer.poll() is None, "a write went through on the frozen filesystem"
    assert not frozen.thawed_by_watchdog
    assert writer.wait(timeout=5) == 0
    thaw = run(config, "thaw", "--json", check_json=True)
    assert thaw.returncode == 0, thaw.stdout + thaw.stderr
    assert [(o["target"], o["status"]) for o in thaw.report["outcomes"]] == [("app", "ok")]
    assert sqlite_writable(db)
    holder_lines = [ln for ln in log_file.read_text().splitlines() if f" {holder} " in ln]
    assert any("holder started for app" in ln for ln in holder_lines), holder_lines
    assert any("released by thaw" in ln for ln in holder_lines), holder_lines


def test_rehearsal_snapshot_of_a_busy_database_restores_with_every_committed_write(
        tmp_path, loopfs):
    """Issue 3: install, rehearse with a real freeze and the loop image copied as the
    snapshot while a writer commits; the copy restores and holds every committed write."""
    fs = loopfs()
    db = make_sqlite(fs.mountpoint / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}}, max_hold=60)
    root = tmp_path / "root"
    proc = install(config, root, tmp_path / "log")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commits, stop = tmp_path / "commits", tmp_path / "stop-writer"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(commits), str(stop)],
                              stdin=subprocess.DEVNULL)
    copy = loopfs.new_path("snapshot", ".img")
    try:
        assert wait_until(lambda: commits.exists() and len(commits.read_text().split("\n")) > 20,
                          timeout=10), "the writer does not commit"
        report = rehearse(config, root, "--freeze", str(fs.mountpoint), "--freeze-deadline",
                          str(DEADLINE), "--copy", str(fs.image), str(copy)).report
        count = len(commits.read_text().splitlines())
        assert wait_until(lambda: len(commits.read_text().splitlines()) > count + 20,
                          timeout=10), "the writer did not resume after the rehearsal"
    finally:
        stop.touch()
        writer.wait(timeout=60)
    assert writer.returncode == 0

    # The host's verdict, and what happened in between.
    assert result(report) == (0, "application", None), report["timeline"]
    assert report["freeze"]["mounts"] == [str(fs.mountpoint)]
    assert not report["freeze"]["thawed_by_watchdog"]
    assert report["snapshot"]["ok"], report["snapshot"]
    lines = timeline(report)
    order = ["Prescript for ScriptRunner successfully executed.", "froze ", "snapshot: copy",
             "thawed ", "post-script started", "Postscript for ScriptRunner successfully"]
    positions = [next(i for i, ln in enumerate(lines) if ln.startswith(o)) for o in order]
    assert positions == sorted(positions), lines
    assert [(h["target"], h["released_by"], h["status"]) for h in report["holds"]] == [
        ("app", "thaw", "ok")]
    state = read_state(runtime_dir_of(str(config)))
    held_since, released_at = state["held_since"], state["released_at"]
    assert sqlite_writable(db)
    assert copy.stat().st_size == fs.image.stat().st_size
    assert copy.stat().st_blocks * 512 < copy.stat().st_size / 2, "the copy is not sparse"

    # The snapshot restores: integrity intact, every write committed before the hold there.
    committed, in_copy = restored_writes(fs, copy, commits)
    before = {i for i, t in committed if t < held_since}
    after = {i for i, t in committed if t > released_at}
    assert before and after
    assert before <= in_copy, f"lost committed writes: {sorted(before - in_copy)[:10]}"
    assert in_copy == set(range(1, max(in_copy) + 1)), "the copy has a gap"
    assert max(in_copy) < min(after), "a write committed after the snapshot is in it"
    assert in_copy <= {i for i, _ in committed}
    # The hold was real: no commit went through while the database was held.
    assert not [t for _, t in committed if held_since + 0.5 < t < released_at]


def holder_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_release_never_writes_to_a_frozen_filesystem(tmp_path, loopfs):
    """Issue 12 item 1: the holder's connection is the last one on a WAL database, and
    closing it would checkpoint and delete the -wal file. With the filesystem frozen during
    the thaw, the release must still report ok, the holder must end (it holds the
    single-holder lock), and after unfreezing a new freeze works on an intact database."""
    fs = loopfs()
    db = make_sqlite(fs.mountpoint / "app.db")  # WAL, and no connection left open
    assert sqlite_writable(db)  # one committed row, its connection closed
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}}, max_hold=60)

    freeze = run(config, "freeze", "--json", check_json=True)
    assert freeze.returncode == 0, freeze.stdout + freeze.stderr
    holder = freeze.report["holder_pid"]
    with fsfreeze.freeze([fs.mountpoint], deadline_seconds=DEADLINE) as frozen:
        thaw = run(config, "thaw", "--json", check_json=True)
        assert [(o["target"], o["status"]) for o in thaw.report["outcomes"]] == [("app", "ok")], \
            thaw.stdout + thaw.stderr
        assert thaw.returncode == 0, thaw.stdout + thaw.stderr
        assert wait_until(lambda: holder_gone(holder), timeout=10), \
            f"the holder is stuck on the frozen filesystem: {tasks(holder)}"
    assert not frozen.thawed_by_watchdog, "the release waited for the filesystem to thaw"

    again = run(config, "freeze", "--json", check_json=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert run(config, "thaw").returncode == 0
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT v FROM t").fetchall() == [("probe",)]
    finally:
        conn.close()
    assert sqlite_writable(db)
