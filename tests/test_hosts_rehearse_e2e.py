"""Each new host end to end through the CLI, as root, on a loop-mounted ext4 this test made:

    quiesce install HOST --root ROOT
    quiesce rehearse HOST --root ROOT --freeze MOUNT --copy IMAGE COPY --json

with SQLite and Redis (AOF) keeping their data on the loop filesystem, each under a write
load that records when every write was acknowledged. The rehearsal runs the installed
scripts the way the host does (vmtoolsd's vmbackup, the Google guest agent's snapshot
listener, SSM running the DLM document, Veeam's job scripts), freezes only the loop mount
for real around the copy, and thaws. The copy is mounted and Redis started on it: every
write acknowledged before the snapshot step began must be there.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
import pytest

from .support.helpers import make_sqlite, rehearse_host, run, write_config
from .support.qgakit import Writer, events, thaw_mount, when
from .test_qemu_ga_e2e import _wait_more

pytestmark = [pytest.mark.root, pytest.mark.server]
HOSTS = {"vmware": (), "gcp": (), "aws-dlm": (), "veeam": ("--output", "/srv/veeam-scripts")}


def _writers(db, redis) -> dict[str, Writer]:
    return {
        "sqlite": Writer("sqlite", lambda: sqlite3.connect(db, timeout=60, isolation_level=None),
                         lambda c, i: c.execute("INSERT INTO t (id) VALUES (?)", (i,))),
        "redis": Writer("redis", lambda: redis.client(socket_timeout=90),
                        lambda c, i: c.set(f"k:{i}", str(i))),
    }


def _restored(copy, make_redis) -> dict[str, set[int]]:
    with closing(sqlite3.connect(copy / "app.db")) as conn:  # open, it keeps the mount busy
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        found = {"sqlite": {i for (i,) in conn.execute("SELECT id FROM t")}}
    client = make_redis.from_datadir(copy / "redis", persistence="aof").client(decode_responses=True)
    found["redis"] = {int(k.split(":")[1]) for k in client.keys("k:*")}
    client.close()
    return found


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_rehearsal_snapshot_restores_every_acknowledged_write(tmp_path, loopfs, make_redis, host):
    fs = loopfs("ext4", size_mb=256)
    db = make_sqlite(fs.mountpoint / "app.db")
    redis = make_redis(persistence="aof", datadir=fs.mountpoint / "redis")
    config = write_config(tmp_path, {
        "app": {"kind": "sqlite", "path": str(db)},
        "cache": {"kind": "redis", "url": f"unix://{redis.socket}", "timeout": 5},
    }, max_hold=60, timeout=5)
    root = tmp_path / "root"
    proc = run(config, "install", host, "--root", str(root), "--log-dir", str(tmp_path / "log"),
               *HOSTS[host])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    writers = _writers(db, redis)
    copy_image = fs.image.with_name(f"{host}-snapshot.img")
    try:
        for w in writers.values():
            w.start()
        assert all(_wait_more(w, 20) for w in writers.values()), "the writers do not write"
        report = rehearse_host(host, config, root, "--freeze", str(fs.mountpoint),
                               "--freeze-deadline", "60", "--copy", str(fs.image),
                               str(copy_image), timeout=180).report
        counts = {name: len(w.acked) for name, w in writers.items()}
        for name, w in writers.items():  # every writer goes on after the thaw
            assert _wait_more(w, counts[name]), name
    finally:
        thaw_mount(fs)
        run(config, "thaw")  # whatever a failure left held
        for w in writers.values():
            w.stop.set()
    for w in writers.values():
        w.finish()
    redis.stop()

    assert (report["code"], report["consistency"]) == (0, "application"), report
    assert {h["target"]: (h["status"], h["released_by"]) for h in report["holds"]} == {
        "app": ("ok", "thaw"), "cache": ("ok", "thaw")}
    assert report["freeze"]["mounts"] == [str(fs.mountpoint)], report["freeze"]
    assert not report["freeze"]["thawed_by_watchdog"]
    seen = events(report)
    assert any(e.startswith(f"froze {fs.mountpoint}") for e in seen), seen
    found = _restored(fs.mount_copy(copy_image).mountpoint, make_redis)
    snapshot_started = when(report, "snapshot:")
    for name, w in writers.items():
        expected = w.acked_before(snapshot_started)
        assert expected, f"{name}: no write was acknowledged before the snapshot"
        assert expected <= found[name], f"{name}: lost {sorted(expected - found[name])[:10]}"
