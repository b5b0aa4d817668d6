"""Loop-mounted throwaway filesystems for tests that freeze, copy and restore a volume.

``loopfs`` is a factory fixture::

    def test_x(loopfs):
        fs = loopfs()                 # ext4, 300 MB sparse image; loopfs("xfs"), loopfs("btrfs")
        fs.mountpoint, fs.device, fs.image, fs.fstype
        copy = fs.copy_image()        # sparse copy of the image (make it while frozen)
        restored = fs.mount_copy(copy)  # attached and mounted read-write on a new dir

Everything a test made is torn down even when it fails: thaw (these are the only
filesystems tests may freeze), kill what still uses the mount, unmount, detach, delete.

Copies carry the original's filesystem UUID. ext4 mounts them as they are; xfs refuses a
duplicate UUID, so copies are mounted with ``-o nouuid``; btrfs (kernel 6.7 and later)
gives a single-device clone a temporary fsid by itself, checked on this machine. On an
older kernel mount a btrfs copy only after the original is unmounted, or give it a new
fsid first with ``btrfstune -m`` (not done here).

Needs root, losetup and mkfs.<type>; otherwise the test is skipped with the reason,
except under CI (CI=true), where a missing tool is a failure, not a silent skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .markers import require

DEFAULT_SIZE_MB = 300  # the smallest size mkfs.xfs accepts
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
)
_MKFS = {
    "ext4": ["-q", "-F"],
    "xfs": ["-q", "-f"],
    "btrfs": ["-q", "-f"],
}
# Extra mount options for a copy, which has the same filesystem UUID as its original.
_COPY_MOUNT_OPTIONS = {"xfs": ["-o", "nouuid"]}


def unavailable(reason: str) -> None:
    """Skip the test with the reason; under CI (CI=true) fail it instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"loop filesystem tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _tool(name: str) -> str:
    path = shutil.which(name, path=_SEARCH_PATH)
    if path is None:
        unavailable(f"{name} is not installed")
    return path


def _run(*argv: str, timeout: float = 60) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _mounted_from(mountpoint: Path) -> str | None:
    """The source device mounted on exactly this path, or None if it is not a mount point."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            if point == str(mountpoint):
                found = fields[fields.index("-") + 2]
    return found


@dataclass
class LoopFS:
    mountpoint: Path
    device: str
    image: Path
    fstype: str
    _factory: LoopFactory = field(repr=False)

    def copy_image(self, dest: str | os.PathLike[str] | None = None) -> Path:
        """A sparse copy of the image: the "snapshot" when made while frozen.

        Without dest it goes into this fixture's directory and is deleted at teardown.
        """
        dest = Path(dest) if dest is not None else self._factory.new_path("copy", ".img")
        _run(_tool("cp"), "--sparse=always", str(self.image), str(dest))
        return dest

    def mount_copy(self, image: str | os.PathLike[str]) -> LoopFS:
        """Attach and mount a copy read-write on a new directory; undone at teardown."""
        return self._factory.attach(Path(image), self.fstype, copy=True)


class LoopFactory:
    def __init__(self) -> None:
        self._dir: Path | None = None
        self._mounted: list[LoopFS] = []  # torn down in reverse
        self._count = 0

    def __call__(self, fstype: str = "ext4", size_mb: int = DEFAULT_SIZE_MB) -> LoopFS:
        if fstype not in _MKFS:
            raise ValueError(f"loopfs: fstype must be one of {sorted(_MKFS)}, not {fstype!r}")
        self._check_can_run(fstype)
        image = self.new_path(fstype, ".img")
        with open(image, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)  # sparse: costs only what mkfs writes
        _run(_tool(f"mkfs.{fstype}"), *_MKFS[fstype], str(image), timeout=120)
        return self.attach(image, fstype, copy=False)

    @staticmethod
    def _check_can_run(fstype: str) -> None:
        if os.geteuid() != 0:
            unavailable("loop devices and fsfreeze need root")
        for name in ("losetup", "mount", "umount", "fsfreeze", "fuser", "cp", f"mkfs.{fstype}"):
            _tool(name)
        if not os.path.exists("/dev/loop-control"):
            unavailable("no /dev/loop-control: this kernel or container has no loop devices")

    def new_path(self, stem: str, suffix: str = "") -> Path:
        if self._dir is None:
            # Under the default temporary directory, on a disk (root) filesystem here.
            self._dir = Path(tempfile.mkdtemp(prefix="quiesce-loopfs-"))
        self._count += 1
        return self._dir / f"{stem}-{self._count}{suffix}"

    def attach(self, image: Path, fstype: str, *, copy: bool) -> LoopFS:
        device = _run(_tool("losetup"), "--find", "--show", str(image)).strip()
        mountpoint = self.new_path("mnt")
        mountpoint.mkdir()
        fs = LoopFS(mountpoint, device, image, fstype, self)
        self._mounted.append(fs)  # from here on, teardown owns it
        options = _COPY_MOUNT_OPTIONS.get(fstype, []) if copy else []
        _run(_tool("mount"), "-t", fstype, *options, device, str(mountpoint))
        return fs

    # ----------------------------------------------------------------- teardown

    def cleanup(self) -> None:
        errors: list[str] = []
        for fs in reversed(self._mounted):
            errors += self._teardown(fs)
        self._mounted.clear()
        if self._dir is not None:
            if any(_mounted_from(p) for p in self._dir.iterdir()):
                errors.append(f"{self._dir} left in place: something is still mounted in it")
            else:
                shutil.rmtree(self._dir, ignore_errors=True)
        if errors:
            raise RuntimeError("loopfs teardown: " + "; ".join(errors))

    def _teardown(self, fs: LoopFS) -> list[str]:
        errors: list[str] = []
        # Every fuser/fsfreeze call below is guarded by this: on a path that is not our
        # mount point they would act on the filesystem holding it, i.e. on /.
        if _mounted_from(fs.mountpoint) == fs.device:
            # Thaw first: writers blocked on a frozen fs cannot be killed, and umount waits.
            subprocess.run([_tool("fsfreeze"), "-u", str(fs.mountpoint)], capture_output=True)
            if not self._umount(fs.mountpoint):
                self._kill_users(fs)
                if not self._umount(fs.mountpoint):
                    errors.append(f"{fs.mountpoint} busy, lazily unmounted")
                    subprocess.run(
                        [_tool("umount"), "-l", str(fs.mountpoint)], capture_output=True
                    )
        elif _mounted_from(fs.mountpoint) is not None:
            errors.append(f"{fs.mountpoint} has a mount the fixture did not make; left alone")
        done = subprocess.run([_tool("losetup"), "-d", fs.device], capture_output=True, text=True)
        if done.returncode != 0:
            errors.append(f"losetup -d {fs.device}: {done.stderr.strip()}")
        if _mounted_from(fs.mountpoint) is None:
            try:
                fs.mountpoint.rmdir()
            except OSError as e:
                errors.append(f"cannot remove {fs.mountpoint}: {e.strerror}")
        return errors

    @staticmethod
    def _umount(mountpoint: Path) -> bool:
        done = subprocess.run([_tool("umount"), str(mountpoint)], capture_output=True)
        return done.returncode == 0

    @staticmethod
    def _kill_users(fs: LoopFS) -> None:
        """SIGKILL the processes that use our mount, never this test process itself."""
        if _mounted_from(fs.mountpoint) != fs.device:
            return
        # -M: fuser itself refuses unless the name is a mount point.
        listed = subprocess.run(
            [_tool("fuser"), "-M", "-m", str(fs.mountpoint)], capture_output=True, text=True
        )
        pids = {int(p) for p in listed.stdout.split() if p.isdigit()} - {os.getpid()}
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if pids:
            time.sleep(0.2)  # let the kernel release their files before umount retries


@pytest.fixture
def loopfs(request):
    """Factory: ``loopfs(fstype="ext4", size_mb=300)`` -> LoopFS, all torn down after."""
    require(request, "root")
    factory = LoopFactory()
    try:
        yield factory
    finally:
        factory.cleanup()
