"""End to end, as root: Redis 7.0 and Valkey 8.1 on a loop-mounted ext4, rehearsed as Azure
Backup would run it.

Redis keeps its data directory (``dir``: the RDB, or the AOF directory) on a loop-mounted
ext4 made by the ``loopfs`` fixture; its log and unix socket stay on the root filesystem
(a Redis log on a frozen filesystem stalls the whole server: docs/adapters/redis.md). A writer
thread SETs increasing keys as fast as it can and records, for each one, when it sent the
command and when Redis acknowledged it. Then, with the real generated files:

    quiesce install azure --root ROOT --log-dir LOG
    quiesce rehearse azure --root ROOT --freeze MOUNT --copy IMAGE COPY --json

runs the pre-script (``quiesce freeze``: check, BGSAVE, ``CLIENT PAUSE … WRITE``), freezes
the loop filesystem for real, copies its image (the "snapshot"), thaws, and runs the
post-script (the lean thaw: ``CLIENT UNPAUSE``). The copy is then mounted and a fresh Redis
with the same persistence mode is started on the copy's data directory.

What must hold, for AOF and for RDB-only persistence:

* the host reports an application-consistent backup (code 0), and the holder released the
  target on thaw and reported the hold as covering the window;
* the restored server holds *exactly* the keys the writer saw acknowledged before the
  pause was lifted, each with its value: every write acknowledged before ``freeze``
  returned is in the snapshot, and none made after the snapshot leaked into it;
* no SET was acknowledged while the pause held (from the pause's start, which the adapter
  records from the server's clock, to the server's clock at ``CLIENT UNPAUSE``), one SET
  was waiting across the whole hold, and the writer went on after thaw;
* reads were served all along, while the filesystem was frozen too (Redis did not touch the
  frozen filesystem from its main thread);
* the filesystem was frozen only inside the pause: a probe thread writing to the loop
  filesystem blocks exactly while it is frozen, and that interval lies within the pause.

Only the loop filesystem made here is ever frozen (by ``rehearse --freeze``, under its own
deadline); cleanup thaws that one mount if a failure left it frozen, releases the pause,
stops both servers and lets the fixtures unmount and delete everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from .support.azurekit import install, rehearse, result, timeline
from .support.helpers import run, wait_until, write_config
from .support.loopfs import _mounted_from
from .support.servers import REDIS_FAMILY, RedisServer, skip_or_fail

pytestmark = [pytest.mark.root, pytest.mark.server]

MAX_HOLD = 30.0          # the pause's server-side deadline; the whole rehearsal takes a few s
FREEZE_DEADLINE = 20     # rehearse's independent thaw, should anything hang
WRITER_TIMEOUT = MAX_HOLD + 15  # a SET blocked by the pause must wait, not time out
# A SET the server ran just before CLIENT PAUSE may be seen acknowledged a little after the
# instant the adapter records as the pause's start (the server's clock read just before it
# sends the pause); a thread on a busy 2-CPU machine may also record its time late.
# Observed: at most 34 ms.
PAUSE_SLACK = 0.15
PROBE_INTERVAL = 0.001
# Data on the volume besides Redis', so that copying the image (the snapshot) takes a
# while, as it does for a real volume.
FILLER_MB = 96
VALUE_PAD = "x" * 64


def _wall(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


class Writer(threading.Thread):
    """SET k:00000000, k:00000001, … one after another; records (key, value, sent, acked)."""

    def __init__(self, server: RedisServer, mode: str):
        super().__init__(daemon=True, name="redis-writer")
        self.client = server.client(socket_timeout=WRITER_TIMEOUT, decode_responses=True)
        self.mode = mode
        self.stop = threading.Event()
        self.acked: list[tuple[str, str, float, float]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                key, value = f"k:{i:08d}", f"{self.mode}-{i}-{VALUE_PAD}"
                sent = time.time()
                self.client.set(key, value)
                self.acked.append((key, value, sent, time.time()))
                i += 1
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.client.close()


class Reader(threading.Thread):
    """GET in a loop; records (sent, answered) per read."""

    def __init__(self, server: RedisServer):
        super().__init__(daemon=True, name="redis-reader")
        self.client = server.client(socket_timeout=WRITER_TIMEOUT)
        self.stop = threading.Event()
        self.reads: list[tuple[float, float]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                sent = time.time()
                self.client.get("k:00000000")
                self.reads.append((sent, time.time()))
                time.sleep(0.005)
        except BaseException as e:
            self.error = e
        finally:
            self.client.close()


class FreezeProbe(threading.Thread):
    """Rewrites one byte of a file on the loop filesystem in a loop: the one write that
    takes long is the one the freeze blocked, so its interval brackets the freeze."""

    def __init__(self, path: Path):
        super().__init__(daemon=True, name="freeze-probe")
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        self.stop = threading.Event()
        self.writes: list[tuple[float, float]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                started = time.time()
                os.pwrite(self.fd, b"p", 0)
                self.writes.append((started, time.time()))
                time.sleep(PROBE_INTERVAL)
        except BaseException as e:
            self.error = e
        finally:
            os.close(self.fd)

    def longest(self) -> tuple[float, float]:
        return max(self.writes, key=lambda w: w[1] - w[0])


def _thaw_our_mount(fs) -> None:
    """Thaw the loop filesystem this test made, and only it (a no-op if not frozen)."""
    if _mounted_from(fs.mountpoint) == fs.device:
        subprocess.run(["fsfreeze", "-u", str(fs.mountpoint)], capture_output=True, timeout=30)


def _restored_keys(server: RedisServer) -> dict[str, str]:
    client = server.client(decode_responses=True, socket_timeout=30)
    try:
        keys = sorted(client.keys("*"))
        values: dict[str, str] = {}
        for i in range(0, len(keys), 5000):
            chunk = keys[i:i + 5000]
            values.update(zip(chunk, client.mget(chunk)))
        return values
    finally:
        client.close()


@pytest.mark.parametrize("family", sorted(REDIS_FAMILY))
@pytest.mark.parametrize("persistence", ["aof", "rdb"])
def test_rehearsal_snapshot_restores_every_acknowledged_write(persistence, family, loopfs,
                                                              tmp_path):
    fs = loopfs("ext4")
    datadir = fs.mountpoint / "redis"
    snapshot = fs.image.with_name(f"snapshot-{persistence}.img")  # loopfs deletes its dir
    runtime = Path(tempfile.mkdtemp(prefix="quiesce-e2e-redis-", dir="/dev/shm"))
    root, log_dir = tmp_path / "root", tmp_path / "log"

    servers: list[RedisServer] = []
    threads: list[threading.Thread] = []
    original = None
    config = None
    try:
        with open(fs.mountpoint / "filler", "wb") as f:
            for _ in range(FILLER_MB):
                f.write(b"\xa5" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
        server_class = REDIS_FAMILY[family]
        if server_class.missing():
            skip_or_fail(server_class.missing())
        original = server_class.create(persistence=persistence, datadir=datadir)
        servers.append(original)
        # Where things live: data on the loop fs, log and socket on the root fs.
        loop_dev = os.stat(fs.mountpoint).st_dev
        probe_client = original.client(decode_responses=True)
        assert Path(probe_client.config_get("dir")["dir"]) == datadir
        probe_client.close()
        assert os.stat(datadir).st_dev == loop_dev
        assert os.stat(original.log_path).st_dev != loop_dev
        assert os.stat(original.socket).st_dev != loop_dev

        config = write_config(
            tmp_path, {"cache": {"kind": "redis", "url": f"unix://{original.socket}",
                                 "timeout": 10}},
            max_hold=MAX_HOLD, runtime_dir=str(runtime), log_file=str(log_dir / "quiesce.log"))
        installed = install(config, root, log_dir)
        assert installed.returncode == 0, installed.stdout + installed.stderr

        writer, reader = Writer(original, persistence), Reader(original)
        probe = FreezeProbe(fs.mountpoint / "freeze-probe")
        threads += [writer, reader, probe]
        for t in threads:
            t.start()
        assert wait_until(lambda: len(writer.acked) >= 2000 or writer.error, 15), \
            "the writer did not get going"
        assert writer.error is None, writer.error

        # The host's own 1 s poll: the hold must last long enough to show writers waiting.
        proc = rehearse(config, root, "--freeze", str(fs.mountpoint), "--poll-interval", "1",
                        "--freeze-deadline", str(FREEZE_DEADLINE),
                        "--copy", str(fs.image), str(snapshot))
        report = proc.report
        state = json.loads((runtime / "state.json").read_text())

        # Redis' record of the pause, and of its end (the server's clock at CLIENT UNPAUSE).
        facts = next((t.get("facts") or {} for t in state["targets"]), {})
        thaw_facts = next((o.get("facts") or {} for o in state.get("outcomes", ())), {})
        unpaused = _wall(thaw_facts["unpaused_at"]) if "unpaused_at" in thaw_facts else None
        if unpaused is not None:  # let the writer go on for a while after thaw
            wait_until(lambda: writer.error is not None or sum(
                1 for a in writer.acked[-200:] if a[3] > unpaused) >= 200, 10)
        for t in threads:
            t.stop.set()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), "a load thread did not stop"
        for t in threads:
            assert t.error is None, f"{t.name}: {t.error!r}"

        # --- the host's verdict and the holder's record -----------------------------------
        assert result(report) == (0, "application", None), json.dumps(report, indent=2)
        events = timeline(report)
        assert report["snapshot"]["ok"], report["snapshot"]
        assert report["freeze"]["mounts"] == [str(fs.mountpoint)]
        assert not report["freeze"]["thawed_by_watchdog"]
        order = [next(i for i, e in enumerate(events) if e.startswith(p))
                 for p in ("pre-script started", "Prescript for ScriptRunner successfully",
                           "froze ", "snapshot: ", "thawed ", "post-script started")]
        assert order == sorted(order), events
        assert [(h["target"], h["released_by"], h["status"]) for h in report["holds"]] == \
            [("cache", "thaw", "ok")], report["holds"]
        assert state["released_by"] == "thaw" and state["acknowledged"], state
        [held] = state["targets"]
        assert held["status"] == "released", held
        assert "pause_deadline_ms" in facts, f"the target was not paused: {held}"
        [thawed] = state["outcomes"]
        assert thawed["status"] == "ok" and unpaused is not None, thawed
        assert thaw_facts["pause_left_ms"] > 0, thawed

        pause_start = (facts["pause_deadline_ms"] - facts["pause_ms"]) / 1000
        held_since, released_at = state["held_since"], state["released_at"]
        assert held_since <= pause_start + 0.01 and unpaused <= released_at + 0.01, \
            (held_since, pause_start, unpaused, released_at)
        assert unpaused - pause_start - PAUSE_SLACK > 0.1, "the hold is too short to show anything"

        acked = writer.acked
        blocked_from, blocked_to = probe.longest()
        print(f"{persistence}: {len(acked)} SETs; pause {pause_start:.3f} .. {unpaused:.3f} "
              f"({unpaused - pause_start:.3f} s, held_since {held_since - pause_start:+.4f}, "
              f"released_at {released_at - unpaused:+.4f}); freeze probe blocked "
              f"{blocked_from - pause_start:.3f} s after pause start, "
              f"{unpaused - blocked_to:.3f} s before unpause, for "
              f"{blocked_to - blocked_from:.3f} s (frozen_for {report['freeze']['frozen_for']})")

        # --- writers blocked during the hold, released by thaw ---------------------------
        during = [a for a in acked if pause_start + PAUSE_SLACK < a[3] < unpaused]
        assert during == [], (f"{len(during)} SET(s) acknowledged while the pause held "
                              f"({pause_start:.3f} .. {unpaused:.3f}): {during[:3]}")
        spanning = [a for a in acked if a[2] <= pause_start + PAUSE_SLACK and a[3] >= unpaused]
        assert len(spanning) == 1, "no SET waited across the hold: was the writer idle?"
        after = [a for a in acked if a[3] > unpaused]
        assert len(after) >= 200, f"only {len(after)} SETs after thaw: writers not resumed"
        before_hold = [a for a in acked if a[3] < held_since]
        assert len(before_hold) >= 2000, "too little load before the hold"

        # --- reads went on, the freeze lay inside the pause ------------------------------
        in_hold = [r for r in reader.reads if pause_start < r[0] and r[1] < unpaused]
        assert len(in_hold) >= 10, f"only {len(in_hold)} reads completed during the hold"
        slowest = max(r[1] - r[0] for r in reader.reads if pause_start < r[0] < unpaused)
        assert slowest < 0.5, f"a read took {slowest:.3f} s during the hold"
        # The probe's longest write is the one the freeze blocked: it began when the freeze
        # started and ended at the thaw (it may begin a little after frozen_at: the probe
        # sleeps between writes).
        frozen_for = report["freeze"]["frozen_for"]
        assert blocked_to - blocked_from >= frozen_for - 0.005, \
            (blocked_to - blocked_from, frozen_for, "the probe did not see the freeze")
        assert pause_start < blocked_from and blocked_to < unpaused, (
            f"the filesystem was frozen ({blocked_from:.3f} .. {blocked_to:.3f}) outside the "
            f"pause ({pause_start:.3f} .. {unpaused:.3f})")

        # --- restore the copy into a fresh server ----------------------------------------
        original.cleanup()  # not needed, but the copy must not depend on it running
        copy = fs.mount_copy(snapshot)
        restored = server_class.from_datadir(copy.mountpoint / "redis", persistence=persistence)
        servers.append(restored)
        assert "DB loaded from" in restored.log_tail(200), restored.log_tail()
        got = _restored_keys(restored)
        expected = {key: value for key, value, _, ack in acked if ack < unpaused}
        before_freeze_returned = {a[0] for a in before_hold}
        missing = sorted(before_freeze_returned - set(got))
        assert not missing, (f"{len(missing)} of {len(before_freeze_returned)} keys acknowledged "
                             f"before freeze returned are missing, first {missing[:5]}")
        missing = sorted(set(expected) - set(got))
        assert not missing, (f"{len(missing)} of {len(expected)} keys acknowledged before thaw "
                             f"are missing, first {missing[:5]}")
        extra = sorted(set(got) - set(expected))
        assert not extra, f"{len(extra)} keys written after the snapshot are in it: {extra[:5]}"
        wrong = [k for k, v in expected.items() if got[k] != v]
        assert not wrong, f"{len(wrong)} keys restored with a wrong value, first {wrong[:5]}"
    finally:
        for t in threads:
            t.stop.set()
        _thaw_our_mount(fs)  # only if rehearse died with it frozen: first, so nothing hangs
        if config is not None and (runtime / "state.json").exists():
            # A holder that still holds (a failure mid-rehearsal) releases on thaw.
            with contextlib.suppress(Exception):
                run(config, "thaw", timeout=60)
        if original is not None and original.running:
            with contextlib.suppress(Exception):
                c = original.client(socket_timeout=5)
                c.execute_command("CLIENT", "UNPAUSE")
                c.close()
        for t in threads:
            t.join(15)
        for server in reversed(servers):
            server.cleanup()
        shutil.rmtree(runtime, ignore_errors=True)
