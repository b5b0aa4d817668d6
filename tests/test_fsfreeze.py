"""quiesce.fsfreeze on real loop-mounted filesystems (root only; see tests/support/loopfs.py).

Only filesystems made by the loopfs fixture are ever frozen. The tests that must not
freeze anything (refusals) replace the freeze ioctl with one that fails the test, so a
broken check cannot freeze / either.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quiesce import fsfreeze
from quiesce.fsfreeze import FreezeError, freeze, thaw
from tests.support.loopfs import unavailable

pytestmark = pytest.mark.root

BLOCK_CHECK = 0.4  # how long a writer must stay blocked to count as blocked
PROMPT = 1.5  # how soon after a thaw a blocked writer must have finished


# ------------------------------------------------------------------ helpers


def start_writer(path: Path) -> subprocess.Popen:
    """A process that creates a file: it blocks while the filesystem is frozen."""
    return subprocess.Popen(["/bin/sh", "-c", 'echo written > "$1"', "sh", str(path)])


def finished_at(proc: subprocess.Popen, timeout: float) -> float | None:
    """time.monotonic() when proc ended, or None if it is still running after timeout."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    assert proc.returncode == 0
    return time.monotonic()


def assert_blocked(proc: subprocess.Popen) -> None:
    assert finished_at(proc, BLOCK_CHECK) is None, "a write went through on a frozen filesystem"


def assert_writable(mountpoint: Path, name: str = "probe") -> None:
    # If this blocks, the fixture's thaw in teardown frees it.
    writer = start_writer(mountpoint / name)
    assert finished_at(writer, PROMPT) is not None, f"{mountpoint} is still frozen"


def process_gone(pid: int, within: float) -> bool:
    """The process exited (a zombie counts: it holds nothing)."""
    end = time.monotonic() + within
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)


FREEZER = """
import sys, time
from quiesce.fsfreeze import freeze
with freeze([sys.argv[1]], deadline_seconds=float(sys.argv[2])) as rec:
    print(rec.watchdog_pid, rec.deadline, flush=True)
    time.sleep(120)
"""


def start_freezer(mountpoint: Path, deadline: float) -> tuple[subprocess.Popen, int, float]:
    """Freeze in a child Python process; returns it, its watchdog's pid and the deadline."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    child = subprocess.Popen(
        [sys.executable, "-c", FREEZER, str(mountpoint), str(deadline)],
        stdout=subprocess.PIPE, text=True, env=env, cwd="/",
    )
    ready, _, _ = select.select([child.stdout], [], [], 10)
    line = child.stdout.readline() if ready else ""
    if not line:
        child.kill()
        child.wait()
        pytest.fail("the freezing child process did not report that it froze")
    pid, when = line.split()
    return child, int(pid), float(when)


@pytest.fixture
def no_freeze(monkeypatch):
    """For tests that must be refused before anything is frozen."""

    def refuse(fd):
        raise AssertionError("FIFREEZE was called by a test that must not freeze anything")

    monkeypatch.setattr(fsfreeze, "_fifreeze", refuse)


# ------------------------------------------------------------------ freeze and thaw


def test_writer_blocks_while_frozen_and_finishes_right_after_thaw(loopfs):
    fs = loopfs()
    with freeze([fs.mountpoint], deadline_seconds=5) as rec:
        writer = start_writer(fs.mountpoint / "during")
        assert_blocked(writer)  # if this fails, the with block's thaw still frees it
    done = finished_at(writer, PROMPT)
    assert done is not None, "the writer did not finish after the thaw"
    assert done - rec.thawed_at < PROMPT
    assert (fs.mountpoint / "during").read_text() == "written\n"
    assert not rec.thawed_by_watchdog


def test_freeze_and_thaw_in_with_records_times_and_stops_the_watchdog(loopfs):
    fs = loopfs()
    before = time.monotonic()
    with freeze([str(fs.mountpoint)], deadline_seconds=5) as rec:
        assert rec.mounts == (str(fs.mountpoint),)
        assert before <= rec.frozen_at <= time.monotonic() < rec.deadline
        assert abs(rec.frozen_at_wall - time.time()) < 5
        assert rec.thawed_at is None
        assert not process_gone(rec.watchdog_pid, 0)
        watchdog_fds = watchdog_files(rec.watchdog_pid)
    assert rec.frozen_at < rec.thawed_at <= time.monotonic()
    assert rec.frozen_at_wall <= rec.thawed_at_wall
    assert rec.thawed_early == () and rec.watchdog_thawed == ()
    assert not rec.thawed_by_watchdog
    assert process_gone(rec.watchdog_pid, 0), "the watchdog outlived the with block"
    assert_writable(fs.mountpoint)
    # The watchdog holds no file on disk: only /dev/null, pipes, its socket, the mount.
    assert all(
        t in ("/dev/null", str(fs.mountpoint)) or t.startswith(("pipe:", "socket:"))
        for t in watchdog_fds
    ), watchdog_fds


def watchdog_files(pid: int) -> list[str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    return [os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)]


def test_exception_in_the_body_still_thaws(loopfs):
    fs = loopfs()
    with pytest.raises(RuntimeError, match="boom"):
        with freeze([fs.mountpoint], deadline_seconds=5):
            raise RuntimeError("boom")
    assert_writable(fs.mountpoint)


def test_several_mounts_and_fstypes(loopfs):
    mounts = [loopfs("ext4").mountpoint, loopfs("xfs").mountpoint, loopfs("btrfs").mountpoint]
    with freeze(mounts, deadline_seconds=5) as rec:
        writers = [start_writer(m / "w") for m in mounts]
        for w in writers:
            assert_blocked(w)
    assert rec.mounts == tuple(map(str, mounts))
    for w in writers:
        assert finished_at(w, PROMPT) is not None
    assert not rec.thawed_by_watchdog


# ------------------------------------------------------------------ the watchdog


def test_a_failed_thaw_is_handed_to_the_watchdog_and_reported(loopfs, monkeypatch):
    fs = loopfs()

    def failing_thaw(fd):
        raise OSError(errno.EIO, "Input/output error")

    refused = rf"cannot thaw {fs.mountpoint}: Input/output error; the watchdog thawed it"
    with pytest.raises(FreezeError, match=refused):
        with freeze([fs.mountpoint], deadline_seconds=5) as rec:
            monkeypatch.setattr(fsfreeze, "_fithaw", failing_thaw)
    assert rec.watchdog_thawed == (str(fs.mountpoint),)
    assert_writable(fs.mountpoint)


def test_deadline_passes_inside_the_with_block(loopfs):
    fs = loopfs()
    with freeze([fs.mountpoint], deadline_seconds=1) as rec:
        writer = start_writer(fs.mountpoint / "late")
        done = finished_at(writer, 4)
        assert done is not None, "the watchdog did not thaw at the deadline"
        assert rec.deadline - 0.05 <= done <= rec.deadline + PROMPT
    # Our own thaw found it thawed: recorded, not raised.
    assert rec.thawed_by_watchdog
    assert rec.thawed_early == (str(fs.mountpoint),)
    assert rec.watchdog_thawed == (str(fs.mountpoint),)
    assert process_gone(rec.watchdog_pid, 0)


def test_watchdog_thaws_at_once_when_the_freezing_process_is_killed(loopfs):
    fs = loopfs()
    child, watchdog_pid, deadline = start_freezer(fs.mountpoint, deadline=4)
    try:
        writer = start_writer(fs.mountpoint / "after-kill")
        assert_blocked(writer)
        child.kill()  # SIGKILL: no finally, no thaw from the parent
        child.wait()
        killed = time.monotonic()
        done = finished_at(writer, deadline - killed + PROMPT)
    finally:
        child.kill()
        child.wait()
    assert done is not None, "still frozen after the deadline with the parent killed"
    # The watchdog sees its control socket close and thaws without waiting for the deadline.
    assert done - killed < PROMPT
    assert done < deadline
    assert process_gone(watchdog_pid, 2), "the watchdog did not exit"
    assert (fs.mountpoint / "after-kill").read_text() == "written\n"


def test_watchdog_thaws_at_the_deadline_when_the_freezing_process_hangs(loopfs):
    fs = loopfs()
    child, watchdog_pid, deadline = start_freezer(fs.mountpoint, deadline=2.5)
    try:
        os.kill(child.pid, signal.SIGSTOP)  # alive but never thaws
        writer = start_writer(fs.mountpoint / "after-hang")
        done = finished_at(writer, deadline - time.monotonic() + PROMPT)
        assert done is not None, "still frozen after the deadline"
        assert deadline - 0.05 <= done <= deadline + PROMPT
    finally:
        child.kill()  # SIGKILL works on a stopped process
        child.wait()
    assert process_gone(watchdog_pid, 2), "the watchdog did not exit after its parent died"


def test_watchdog_thaws_when_it_is_terminated(loopfs):
    fs = loopfs()
    with freeze([fs.mountpoint], deadline_seconds=5) as rec:
        writer = start_writer(fs.mountpoint / "w")
        assert_blocked(writer)
        os.kill(rec.watchdog_pid, signal.SIGTERM)
        assert finished_at(writer, PROMPT) is not None
    assert rec.watchdog_thawed == (str(fs.mountpoint),)


# ------------------------------------------------------------------ refusals


def test_refuses_root(no_freeze):
    with pytest.raises(FreezeError, match=r"refusing to freeze /: .*root directory.*allow_root"):
        with freeze(["/"], deadline_seconds=2):
            pass


def test_refuses_a_bind_mount_of_the_root_filesystem(no_freeze, tmp_path):
    if os.geteuid() != 0:
        unavailable("bind mounts need root")
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        with pytest.raises(FreezeError, match="refusing to freeze .*root directory"):
            with freeze([target], deadline_seconds=2):
                pass
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_allow_root_lifts_the_refusal_without_freezing_here():
    # Only the validation: actually freezing / would stop this machine.
    assert fsfreeze._validate(["/"], allow_root=True) == ["/"]


def test_refuses_a_directory_that_is_not_a_mount_point(loopfs, no_freeze):
    fs = loopfs()
    inside = fs.mountpoint / "sub"
    inside.mkdir()
    with pytest.raises(FreezeError, match=rf"{inside} is not a mount point .*{fs.mountpoint}"):
        with freeze([inside], deadline_seconds=2):
            pass
    with pytest.raises(FreezeError, match="no such directory"):
        with freeze([fs.mountpoint / "missing"], deadline_seconds=2):
            pass


def test_resolves_symlinks_and_refuses_the_same_filesystem_twice(loopfs, tmp_path):
    fs = loopfs()
    link = tmp_path / "link"
    link.symlink_to(fs.mountpoint)
    with pytest.raises(FreezeError, match="same filesystem"):
        with freeze([fs.mountpoint, link], deadline_seconds=2):
            pass
    with freeze([link], deadline_seconds=5) as rec:
        assert rec.mounts == (str(fs.mountpoint),)


def test_bad_arguments(no_freeze):
    with pytest.raises(FreezeError, match="positive"):
        with freeze(["/"], deadline_seconds=0):
            pass
    with pytest.raises(FreezeError, match="list of mount points"):
        with freeze("/mnt", deadline_seconds=2):
            pass


# ------------------------------------------------------------------ already frozen


def test_freezing_a_frozen_filesystem_fails_and_leaves_the_first_freeze(loopfs):
    fs = loopfs()
    with freeze([fs.mountpoint], deadline_seconds=5) as first:
        with pytest.raises(FreezeError, match=rf"cannot freeze {fs.mountpoint}: .*already frozen"):
            with freeze([fs.mountpoint], deadline_seconds=5):
                pytest.fail("the second freeze must not succeed")
        writer = start_writer(fs.mountpoint / "w")
        assert_blocked(writer)  # the failed attempt did not thaw the first freeze
    assert finished_at(writer, PROMPT) is not None
    assert not first.thawed_by_watchdog


def test_when_mount_k_fails_the_earlier_mounts_are_thawed(loopfs):
    one, two = loopfs(), loopfs()
    with freeze([two.mountpoint], deadline_seconds=5):
        refused = rf"cannot freeze {two.mountpoint}: .*already frozen"
        with pytest.raises(FreezeError, match=refused):
            with freeze([one.mountpoint, two.mountpoint], deadline_seconds=5):
                pass
        assert_writable(one.mountpoint)
        writer = start_writer(two.mountpoint / "w")
        assert_blocked(writer)
    assert finished_at(writer, PROMPT) is not None


def test_standalone_thaw(loopfs):
    fs = loopfs()
    assert thaw(fs.mountpoint) is False  # not frozen
    with freeze([fs.mountpoint], deadline_seconds=5) as rec:
        assert thaw(fs.mountpoint) is True
        assert_writable(fs.mountpoint)
    # Someone thawed before us: the freeze did not cover the whole block.
    assert rec.thawed_early == (str(fs.mountpoint),) and rec.watchdog_thawed == ()
    assert rec.thawed_by_watchdog
    with pytest.raises(FreezeError, match="not a mount point"):
        thaw(fs.mountpoint / "lost+found")


# ------------------------------------------------------------------ the snapshot


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_copy_made_while_frozen_mounts_and_holds_what_was_written(loopfs, fstype):
    fs = loopfs(fstype)
    with open(fs.mountpoint / "synced", "wb") as f:
        f.write(b"synced\n")
        os.fsync(f.fileno())
    big = os.urandom(3 * 1024 * 1024)  # still in the page cache: the freeze must flush it
    (fs.mountpoint / "unsynced").write_bytes(big)
    with freeze([fs.mountpoint], deadline_seconds=5) as rec:
        copy = fs.copy_image()
    assert not rec.thawed_by_watchdog
    restored = fs.mount_copy(copy)
    assert restored.mountpoint != fs.mountpoint and restored.device != fs.device
    assert (restored.mountpoint / "synced").read_bytes() == b"synced\n"
    assert (restored.mountpoint / "unsynced").read_bytes() == big
    assert_writable(restored.mountpoint)  # mounted read-write


# ------------------------------------------------------------------ guard (an agent freezes)


def agent_freeze(mountpoint: Path) -> None:
    """Freeze as a guest agent would: another process, not this module."""
    subprocess.run(["fsfreeze", "-f", str(mountpoint)], check=True, timeout=30)


def test_guard_thaws_what_someone_else_froze_when_the_block_ends(loopfs):
    fs = loopfs()
    writer = None
    with pytest.raises(RuntimeError, match="snapshot failed"):
        with fsfreeze.guard([fs.mountpoint], deadline_seconds=120) as mounts:
            assert mounts == [str(fs.mountpoint)]
            agent_freeze(fs.mountpoint)
            writer = start_writer(fs.mountpoint / "during")
            assert_blocked(writer)
            raise RuntimeError("snapshot failed")
    assert finished_at(writer, 30) is not None, "the guard did not thaw on its way out"
    assert_writable(fs.mountpoint)


def test_guard_watchdog_thaws_at_the_deadline_while_the_block_still_runs(loopfs):
    fs = loopfs()
    with fsfreeze.guard([fs.mountpoint], deadline_seconds=1):
        agent_freeze(fs.mountpoint)
        writer = start_writer(fs.mountpoint / "late")
        assert finished_at(writer, 30) is not None, "the watchdog did not thaw at the deadline"
    assert_writable(fs.mountpoint)


def test_guard_refuses_root_like_freeze(no_freeze):
    with pytest.raises(FreezeError, match="refusing to freeze /"):
        with fsfreeze.guard(["/"], deadline_seconds=5):
            pass
