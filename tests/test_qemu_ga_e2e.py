"""End to end, as root, with the real qemu-ga: four databases on one loop-mounted ext4.

SQLite, PostgreSQL 15 (``checkpoint`` mode), MariaDB and Redis (AOF) keep their data on
a loop filesystem this test made, each under a write load from its own thread that
records when every write was acknowledged. Then, with the real generated hook:

    quiesce install qemu-ga --root ROOT --enable-hook
    quiesce rehearse qemu-ga --root ROOT --freeze MOUNT --copy IMAGE COPY --json

starts a private qemu-ga with the real stock dispatcher, sends ``guest-sync`` and
``guest-fsfreeze-freeze-list`` naming only the loop mount (the agent runs the hook with
``freeze``, which runs ``quiesce freeze``, then freezes the mount), copies the image,
sends ``guest-fsfreeze-thaw`` (the agent thaws, then runs the hook with ``thaw``) and
``guest-fsfreeze-status``. The copy is mounted and fresh servers are started on it.

What must hold: the rehearsal reports application consistency with every target held
and released by thaw; every write acknowledged before the snapshot step began is in the
restored copy; PRAGMA integrity_check, pg_amcheck and CHECK TABLE find nothing; every
writer went on after the thaw. Only the loop mount is ever frozen (the agent gets it by
name; the rehearsal's guard thaws it at its deadline and when it ends).
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import psycopg
import pymysql
import pytest

from .support.helpers import make_sqlite, run, write_config
from .support.qgakit import Writer, events, install, rehearse, require_agent, stage_root, thaw_mount, when
from .test_e2e_mariadb import check_every_table
from .test_e2e_postgresql import amcheck

pytestmark = [pytest.mark.root, pytest.mark.server]


def _writers(db: Path, pg, maria, redis) -> dict[str, Writer]:
    def sqlite_connect():
        return sqlite3.connect(db, timeout=60, isolation_level=None)

    def pg_connect():
        return psycopg.connect(pg.dsn(dbname="e2e"), autocommit=True)

    def maria_connect():
        return pymysql.connect(unix_socket=str(maria.socket), user="root",
                               password=maria.root_password, database="e2e", autocommit=True,
                               read_timeout=90, write_timeout=90)

    def maria_write(conn, i):
        with conn.cursor() as cur:
            cur.execute("INSERT INTO t (id) VALUES (%s)", (i,))

    return {
        "sqlite": Writer("sqlite", sqlite_connect,
                         lambda c, i: c.execute("INSERT INTO t (id) VALUES (?)", (i,))),
        "postgresql": Writer("postgresql", pg_connect,
                             lambda c, i: c.execute("INSERT INTO t (id) VALUES (%s)", (i,))),
        "mariadb": Writer("mariadb", maria_connect, maria_write),
        "redis": Writer("redis", lambda: redis.client(socket_timeout=90),
                        lambda c, i: c.set(f"k:{i}", str(i))),
    }


def _restored_ids(copy: Path, make_pg15, make_mariadb, make_redis) -> dict[str, set[int]]:
    conn = sqlite3.connect(copy / "app.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        found = {"sqlite": {i for (i,) in conn.execute("SELECT id FROM t")}}
    finally:
        conn.close()  # an open database keeps the copy's mount busy
    pg = make_pg15.from_datadir(copy / "pgdata")
    amcheck(pg)
    found["postgresql"] = {i for (i,) in pg.sql("SELECT id FROM t", dbname="e2e")}
    maria = make_mariadb.from_datadir(copy / "mysql", options={"myisam-recover-options": "OFF"})
    assert check_every_table(maria)
    found["mariadb"] = {i for (i,) in maria.sql("SELECT id FROM t", database="e2e")}
    client = make_redis.from_datadir(copy / "redis", persistence="aof").client(decode_responses=True)
    found["redis"] = {int(k.split(":")[1]) for k in client.keys("k:*")}
    client.close()
    return found


def test_real_qemu_ga_freeze_restores_every_acknowledged_write(
        tmp_path, loopfs, make_pg15, make_mariadb, make_redis):
    require_agent()
    fs = loopfs("ext4", size_mb=512)
    db = make_sqlite(fs.mountpoint / "app.db")
    pg = make_pg15(datadir=fs.mountpoint / "pgdata")
    pg.sql("CREATE DATABASE e2e")
    pg.sql("CREATE EXTENSION amcheck", dbname="e2e")
    pg.sql("CREATE TABLE t (id int PRIMARY KEY)", dbname="e2e")
    maria = make_mariadb(datadir=fs.mountpoint / "mysql")
    maria.sql("CREATE DATABASE e2e")
    maria.sql("CREATE TABLE e2e.t (id INT PRIMARY KEY) ENGINE=InnoDB")
    redis = make_redis(persistence="aof", datadir=fs.mountpoint / "redis")
    option_file = tmp_path / "mysql.cnf"
    option_file.write_text(f"[client]\nuser = root\npassword = {maria.root_password}\n"
                           f"socket = {maria.socket}\n")
    option_file.chmod(0o600)
    runtime = Path(tempfile.mkdtemp(prefix="quiesce-qga-e2e-", dir="/dev/shm"))
    config = write_config(tmp_path, {
        "app": {"kind": "sqlite", "path": str(db)},
        "pg": {"kind": "postgresql", "host": pg.host, "port": pg.port, "user": pg.superuser,
               "dbname": "e2e", "mode": "checkpoint"},
        "maria": {"kind": "mysql", "option_file": str(option_file)},
        "cache": {"kind": "redis", "url": f"unix://{redis.socket}", "timeout": 10},
    }, runtime_dir=str(runtime), max_hold=90, timeout=10)
    root = stage_root(tmp_path / "root")
    writers = _writers(db, pg, maria, redis)
    try:
        proc = install(config, root, tmp_path / "log", "--enable-hook")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for w in writers.values():
            w.start()
        copy_image = fs.image.with_name("qga-snapshot.img")
        report = rehearse(config, root, "--freeze", str(fs.mountpoint), "--freeze-deadline", "60",
                          "--copy", str(fs.image), str(copy_image)).report
        counts = {name: len(w.acked) for name, w in writers.items()}
        for name, w in writers.items():  # every writer goes on after the thaw
            assert _wait_more(w, counts[name]), name
    finally:
        for w in writers.values():
            w.stop.set()
        thaw_mount(fs)
        run(config, "thaw")  # whatever a failure left held
        shutil.rmtree(runtime, ignore_errors=True)
    for w in writers.values():
        w.finish()
    redis.stop()

    assert report["code"] == 0, report
    assert report["consistency"] == "application"
    assert {h["target"]: (h["status"], h["released_by"]) for h in report["holds"]} == {
        t: ("ok", "thaw") for t in ("app", "pg", "maria", "cache")}
    seen = events(report)
    assert any(e.startswith("guest-fsfreeze-freeze-list froze 1 filesystem") for e in seen), seen
    assert "guest-fsfreeze-status: frozen" in seen and "guest-fsfreeze-status: thawed" in seen
    snapshot_started = when(report, "snapshot:")
    found = _restored_ids(fs.mount_copy(copy_image).mountpoint, make_pg15, make_mariadb,
                          make_redis)
    for name, w in writers.items():
        expected = w.acked_before(snapshot_started)
        assert expected, f"{name}: no write was acknowledged before the snapshot"
        assert expected <= found[name], f"{name}: lost {sorted(expected - found[name])[:10]}"
    # The hook logged where install said, on the root filesystem, not the frozen one.
    assert (tmp_path / "log" / "qemu-ga-hook.log").stat().st_size > 0


def _wait_more(writer: Writer, count: int, timeout: float = 30) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(writer.acked) > count + 3 or writer.error:
            return writer.error is None
        time.sleep(0.05)
    return False
