"""The SQLite adapter against real database files and a concurrent writer process."""

import re
import sqlite3
import subprocess
import sys
import time

import pytest

from quiesce import Hold, HoldBroken, Target, TargetError
from quiesce.plugins import load_adapters

from .support.helpers import make_sqlite, sqlite_writable

WRITER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    conn.execute("INSERT INTO t (v) VALUES (?)", (repr(time.time()),))
    print(time.time(), flush=True)
    time.sleep(0.005)
"""

#: Commits back to back, each transaction a few milliseconds: the lock is free only for
#: the microseconds between them. Prints a line once it has committed.
TIGHT_WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
rows = [("x" * 50,)] * int(sys.argv[2])
while True:
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO t (v) VALUES (?)", rows)
    conn.execute("COMMIT")
    print("committed", flush=True)
"""

#: Takes the write lock and keeps it: a writer in the middle of a long transaction.
LOCK_KEEPER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def process():
    """Start a Python snippet with arguments; waits for its first line; killed after."""
    started = []

    def start(code, *args):
        proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline(), "the helper process did not start"
        return proc
    yield start
    for proc in started:
        proc.kill()
        proc.wait()


@pytest.fixture
def adapters():
    return load_adapters(load_entrypoints=False)


def target(path, **settings):
    t = Target("app", "sqlite", {"path": str(path), **settings}, timeout=2)
    load_adapters(load_entrypoints=False).call("validate", t)
    return t


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_concurrent_writer_is_held_back_then_resumes(tmp_path, adapters, journal_mode):
    db = make_sqlite(tmp_path / "app.db", journal_mode)
    t = target(db)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), "3"], stdout=subprocess.PIPE,
                              text=True)
    time.sleep(0.5)
    assert adapters.call("flush", t) is None or journal_mode == "wal"
    hold = adapters.call("quiesce", t)
    held_from = time.time()
    count_at_hold = sqlite3.connect(db).execute("SELECT count(*) FROM t").fetchone()[0]
    time.sleep(1.0)
    count_during = sqlite3.connect(db).execute("SELECT count(*) FROM t").fetchone()[0]
    held_until = time.time()
    adapters.call("thaw", t, hold=hold)
    commits = [float(line) for line in writer.communicate(timeout=30)[0].split()]
    assert count_during == count_at_hold, "rows were committed while the write lock was held"
    assert not [c for c in commits if held_from + 0.05 < c < held_until], "a commit returned mid-hold"
    assert [c for c in commits if c > held_until], "the writer did not resume after thaw"


def test_wal_checkpoint_empties_the_wal(tmp_path, adapters):
    db = make_sqlite(tmp_path / "app.db", "wal")
    conn = sqlite3.connect(db)
    conn.executemany("INSERT INTO t (v) VALUES (?)", [("x" * 100,)] * 500)
    conn.commit()
    facts = adapters.call("flush", target(db))
    assert facts["wal_checkpoint"] == "complete" and facts["wal_bytes_before"] > 0
    assert (tmp_path / "app.db-wal").stat().st_size == 0
    conn.close()


def test_lock_that_cannot_be_had_fails_fast_names_the_holder_and_leaves_nothing(
        tmp_path, adapters, process):
    db = make_sqlite(tmp_path / "app.db")
    keeper = process(LOCK_KEEPER, db)
    t = target(db, busy_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(TargetError) as info:
        adapters.call("quiesce", t)
    assert time.monotonic() - started < 2
    message = str(info.value)
    assert re.search(r"could not take the write lock .* within 0.3 s: it was busy at each of "
                     r"\d+ attempts", message), message
    assert f"pid {keeper.pid} (python" in message and "held the write lock at the end" in message
    assert f"open in {keeper.pid} (python" in message
    keeper.kill()
    keeper.wait()
    assert sqlite_writable(db), "the failed attempt left a lock behind"


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_lock_is_taken_against_a_tight_loop_writer(tmp_path, adapters, process, journal_mode):
    """Issue 12: SQLite's sleeping busy handler almost never met the gap between such a
    writer's transactions and gave up after seconds; retried promptly, the lock is had."""
    db = make_sqlite(tmp_path / "app.db", journal_mode)
    writer = process(TIGHT_WRITER, db, 1000)
    t = target(db, busy_timeout=2)
    for _ in range(5):
        hold = adapters.call("quiesce", t)
        assert not sqlite_writable(db)
        adapters.call("thaw", t, hold=hold)
        writer.stdout.readline()  # the writer got the lock back in between
    assert writer.poll() is None, "the writer died"


def test_check_reports_facts_and_takes_no_lock(tmp_path, adapters):
    db = make_sqlite(tmp_path / "app.db")
    facts = adapters.call("check", target(db))
    assert facts == {"sqlite_version": sqlite3.sqlite_version, "journal_mode": "wal"}
    assert sqlite_writable(db)


def test_check_names_a_missing_or_non_database_file(tmp_path, adapters):
    with pytest.raises(TargetError, match="does not exist; fix targets.app.path"):
        adapters.call("check", target(tmp_path / "absent.db"))
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(TargetError, match="is not a usable SQLite database"):
        adapters.call("check", target(junk))


def test_thaw_is_idempotent_and_reports_a_lost_lock(tmp_path, adapters):
    db = make_sqlite(tmp_path / "app.db")
    t = target(db)
    adapters.call("thaw", t, hold=Hold())  # nothing held: a no-op
    hold = adapters.call("quiesce", t)
    hold.session.execute("ROLLBACK")  # the transaction ended behind our back
    with pytest.raises(HoldBroken, match="was not held at thaw"):
        adapters.call("thaw", t, hold=hold)
    assert sqlite_writable(db)


def test_a_path_with_uri_characters_locks_that_very_file(tmp_path, adapters):
    db = make_sqlite(tmp_path / "app#1?x.db")
    t = target(db)
    hold = adapters.call("quiesce", t)
    try:
        assert not sqlite_writable(db), "another file was locked instead of the database"
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("app#1?x.db")) == []
    finally:
        adapters.call("thaw", t, hold=hold)


def test_flush_never_blocks_writers_behind_a_reader(tmp_path, adapters):
    db = make_sqlite(tmp_path / "app.db", "wal")
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchone()  # an open read snapshot
    sqlite3.connect(db).execute("INSERT INTO t (v) VALUES ('x')").connection.commit()
    started = time.monotonic()
    facts = adapters.call("flush", target(db))
    assert time.monotonic() - started < 1.0, "flush waited for the reader"
    assert facts["wal_checkpoint"] == "partial"
    reader.execute("ROLLBACK")


def test_busy_timeout_beyond_the_targets_timeout_is_refused(tmp_path):
    from quiesce import ConfigError
    with pytest.raises(ConfigError, match="busy_timeout: must be above 0 and at most"):
        target(tmp_path / "x.db", busy_timeout=30)


def test_the_release_the_core_makes_frees_writers_and_thaw_still_judges_it(tmp_path, adapters):
    """``Hold.release.send()`` (the core calls it for every target back to back) rolls back;
    thaw then only reports: held to the end, or not."""
    db = make_sqlite(tmp_path / "app.db")
    t = target(db)
    hold = adapters.call("quiesce", t)
    assert not sqlite_writable(db)
    hold.release.send()
    assert sqlite_writable(db), "the release did not let writers go"
    adapters.call("thaw", t, hold=hold)  # held to the end: no HoldBroken
    # a lock lost before the release is reported, even when the core released first
    hold = adapters.call("quiesce", t)
    hold.session.execute("ROLLBACK")  # what a lost lock looks like from the holder
    hold.release.send()
    with pytest.raises(HoldBroken, match="was not held at thaw"):
        adapters.call("thaw", t, hold=hold)
