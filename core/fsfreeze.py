"""Freeze filesystems for a snapshot, safely, and always thaw them again.

Used by ``rehearse`` to play the snapshot host's part on filesystems it created. A frozen
filesystem blocks every writer in uninterruptible sleep (no signal frees it, only a thaw),
and a frozen ``/`` stops the whole machine. So every freeze here is bounded twice:

* ``freeze()`` thaws in a ``finally`` when its ``with`` block ends, however it ends;
* before freezing anything it starts an independent watchdog process (its own session,
  stdio on /dev/null) that thaws every mount it was told about when the deadline passes,
  when its parent dies (its control socket reaches EOF without a "done"), or when it is
  sent SIGTERM/SIGINT/SIGHUP. It never opens a file on disk: it reports on a pipe.

How: the FIFREEZE/FITHAW ioctls on an O_RDONLY descriptor of the mount directory, not
``/usr/sbin/fsfreeze`` (which makes the very same ioctls). In process we get the errno
itself (EBUSY, EOPNOTSUPP, EINVAL) instead of parsing a message, we pay no fork and exec
on the path where writers are blocked, and the watchdog thaws through descriptors it
opened before the freeze, so at the deadline it needs no path lookup and no exec.

There is deliberately no ``is_frozen()``: the kernel offers no query. Every probe either
changes the state (FIFREEZE to see EBUSY freezes a thawed filesystem; FITHAW to see EINVAL
thaws a frozen one) or blocks in uninterruptible sleep (any write). Callers learn the
state from ``freeze()``'s record and from ``thaw()``'s return value.

Nothing in this module logs, and nothing writes to a file while a filesystem is frozen.
Standard library only, so the module can be used before the rest of the package loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import math
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator

# _IOWR('X', 119, int) and _IOWR('X', 120, int) from <linux/fs.h>; checked on this
# machine by compiling a C program against the header (0xc0045877, 0xc0045878).
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878

# How long the watchdog may take to start and report ready; it is a bare interpreter
# (-I -S -B) importing a few standard modules, normally 15-20 ms.
_WATCHDOG_START_TIMEOUT = 10.0
# How long to wait for the watchdog to exit after "done" before killing it (it has
# nothing left to do by then; waiting longer only delays the caller).
_WATCHDOG_STOP_TIMEOUT = 5.0

__all__ = ["FIFREEZE", "FITHAW", "FreezeError", "FrozenMounts", "freeze", "thaw"]


class FreezeError(Exception):
    """A freeze or thaw could not be done; ``str(error)`` says what and what to do."""


@dataclasses.dataclass
class FrozenMounts:
    """What ``freeze()`` did. Times are ``time.monotonic()``; ``*_wall`` are ``time.time()``.

    ``frozen_at`` is when the last mount was frozen (a snapshot may start);
    ``thawed_at`` is when our thaw of every mount had finished.
    """

    mounts: tuple[str, ...]
    deadline: float  # monotonic time at which the watchdog thaws
    watchdog_pid: int | None = None
    frozen_at: float | None = None
    frozen_at_wall: float | None = None
    thawed_at: float | None = None
    thawed_at_wall: float | None = None
    # Mounts that were no longer frozen when we came to thaw them (FITHAW gave EINVAL):
    # the watchdog, or someone else, thawed them before the with block ended.
    thawed_early: tuple[str, ...] = ()
    # Mounts the watchdog reports it thawed itself.
    watchdog_thawed: tuple[str, ...] = ()

    @property
    def thawed_by_watchdog(self) -> bool:
        """True when the freeze did not last until our own thaw: the watchdog (deadline
        passed, parent stuck, watchdog signalled) or someone else thawed first, so a
        snapshot taken late in the with block was not covered by the freeze."""
        return bool(self.thawed_early or self.watchdog_thawed)

    @property
    def frozen_for(self) -> float | None:
        if self.frozen_at is None or self.thawed_at is None:
            return None
        return self.thawed_at - self.frozen_at


# --------------------------------------------------------------------------- mounts


@dataclasses.dataclass(frozen=True)
class _Mount:
    mountpoint: str
    dev: str  # "major:minor" of the superblock, the thing FIFREEZE acts on
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _read_mounts() -> list[_Mount]:
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            # id parent major:minor root mountpoint options [optional...] - fstype source ...
            sep = fields.index("-")
            mounts.append(
                _Mount(
                    mountpoint=_unescape(fields[4]),
                    dev=fields[2],
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                )
            )
    return mounts


def _mount_containing(path: str, mounts: list[_Mount]) -> _Mount:
    """The mount a (resolved) path lives on: the longest mount point prefix, the last
    listed when mounts are stacked (a later mount covers an earlier one)."""
    best: _Mount | None = None
    for m in mounts:
        mp = m.mountpoint
        inside = path == mp or mp == "/" or path.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best.mountpoint)):
            best = m
    assert best is not None, "/proc/self/mountinfo lists no root mount"
    return best


def fs_type(path: str | os.PathLike[str]) -> str:
    """The type of the filesystem holding *path* (for checks such as "is this tmpfs?")."""
    return _mount_containing(os.path.realpath(path), _read_mounts()).fstype


def _resolve_mountpoint(path: str | os.PathLike[str], mounts: list[_Mount]) -> _Mount:
    raw = os.fspath(path)
    real = os.path.realpath(raw)
    if not os.path.isdir(real):
        raise FreezeError(
            f"{raw}: no such directory; give the mount point of a mounted filesystem"
        )
    listed = [m for m in mounts if m.mountpoint == real]
    if not listed:
        owner = _mount_containing(real, mounts)
        raise FreezeError(
            f"{raw} is not a mount point (it is inside the {owner.fstype} filesystem "
            f"mounted on {owner.mountpoint}); give the mount point itself"
        )
    return listed[-1]


def _protected(mounts: list[_Mount]) -> dict[str, tuple[str, str]]:
    """Superblocks this process itself needs writable: dev -> (what, path).

    Compared by superblock, not by path, so a bind mount of a directory of ``/`` is
    refused as surely as ``/`` itself.
    """
    places = [
        ("the root directory", "/"),
        ("the running Python interpreter", os.path.realpath(sys.executable or "/")),
        ("the Python installation", os.path.realpath(sys.prefix)),
        ("the Python installation", os.path.realpath(sys.base_prefix)),
        ("the current working directory", os.path.realpath(os.getcwd())),
        ("the temporary directory", os.path.realpath(tempfile.gettempdir())),
    ]
    found: dict[str, tuple[str, str]] = {}
    for what, path in places:
        found.setdefault(_mount_containing(path, mounts).dev, (what, path))
    return found


def _validate(mountpoints: Iterable[str | os.PathLike[str]], allow_root: bool) -> list[str]:
    if isinstance(mountpoints, (str, bytes, os.PathLike)):
        raise FreezeError("freeze() takes a list of mount points, not a single path")
    mounts = _read_mounts()
    protected = {} if allow_root else _protected(mounts)
    chosen: list[_Mount] = []
    for path in mountpoints:
        m = _resolve_mountpoint(path, mounts)
        if m.dev in protected:
            what, where = protected[m.dev]
            raise FreezeError(
                f"refusing to freeze {m.mountpoint}: it is the filesystem that holds "
                f"{what} ({where}), so freezing it could stop this process or the whole "
                "machine until something else thaws it. Pass allow_root=True only if "
                "nothing here writes to it while it is frozen."
            )
        for other in chosen:
            if other.dev == m.dev:
                raise FreezeError(
                    f"{m.mountpoint} and {other.mountpoint} are the same filesystem "
                    f"(device {m.dev}); list it once"
                )
        chosen.append(m)
    if not chosen:
        raise FreezeError("freeze() needs at least one mount point")
    return [m.mountpoint for m in chosen]


# --------------------------------------------------------------------------- ioctls


def _open_dir(mountpoint: str) -> int:
    # Opening a directory and the ioctls never write, so this is safe on a frozen fs.
    try:
        return os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise FreezeError(f"cannot open {mountpoint}: {e.strerror}") from e


def _fifreeze(fd: int) -> None:
    fcntl.ioctl(fd, FIFREEZE, 0)


def _fithaw(fd: int) -> None:
    fcntl.ioctl(fd, FITHAW, 0)


def _freeze_error(mountpoint: str, e: OSError) -> FreezeError:
    if e.errno == errno.EBUSY:
        why = (
            "it is already frozen (by another process or an earlier freeze); "
            "that freeze was left as it is. Wait for its thaw or run: fsfreeze -u " + mountpoint
        )
    elif e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
        why = "this filesystem type cannot be frozen"
    elif e.errno == errno.EPERM:
        why = "freezing needs root (CAP_SYS_ADMIN)"
    else:
        why = f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e.strerror}"
    return FreezeError(f"cannot freeze {mountpoint}: {why}")


def thaw(mountpoint: str | os.PathLike[str]) -> bool:
    """Thaw one mounted filesystem. True if it was frozen, False if it was not (EINVAL).

    Works on any mount point, ``/`` included: thawing is always safe. Raises
    ``FreezeError`` when the path is not a mount point or the thaw itself fails.
    """
    m = _resolve_mountpoint(mountpoint, _read_mounts())
    fd = _open_dir(m.mountpoint)
    try:
        _fithaw(fd)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        if e.errno == errno.EPERM:
            raise FreezeError(
                f"cannot thaw {m.mountpoint}: thawing needs root (CAP_SYS_ADMIN)"
            ) from e
        raise FreezeError(f"cannot thaw {m.mountpoint}: {e.strerror}") from e
    finally:
        os.close(fd)
    return True


# --------------------------------------------------------------------------- watchdog

# The watchdog is a file beside this one (fsfreeze_watchdog.py, its protocol described
# there), run as `python -I -S -B FILE ctl_fd report_fd deadline mount...`: isolated, no
# site, no bytecode writing, so the interpreter touches no file on disk after start.
_WATCHDOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsfreeze_watchdog.py")


class _Watchdog:
    """The parent's end of the watchdog: start it, talk to it, stop it."""

    def __init__(self, mounts: list[str], deadline: float):
        self.mounts = mounts
        # A socket, not a pipe, for control: send(MSG_NOSIGNAL) cannot kill us with
        # SIGPIPE if the watchdog died, whatever the caller did with that signal.
        self._ctl, ctl_child = socket.socketpair()
        self._report, report_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-I", "-S", "-B", _WATCHDOG,
                    str(ctl_child.fileno()), str(report_w), repr(deadline), *mounts,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(ctl_child.fileno(), report_w),
                start_new_session=True,  # no terminal signal or session end reaches it
                cwd="/",  # never keeps one of our mounts busy through its cwd
            )
        except BaseException:
            self._ctl.close()
            os.close(self._report)
            raise
        finally:
            ctl_child.close()
            os.close(report_w)
        self._buf = b""
        self._closed = False
        self.thawed: list[int] = []
        self.thaw_errors: list[tuple[int, int]] = []
        try:
            self._await_ready()
        except BaseException:
            self.stop(done=True)  # nothing was frozen yet
            raise

    def _read_lines(self, timeout: float) -> list[str] | None:
        """Report lines that arrive within timeout; None at EOF (the watchdog exited)."""
        ready, _, _ = select.select([self._report], [], [], max(0.0, timeout))
        if not ready:
            return []
        chunk = os.read(self._report, 4096)
        if not chunk:
            return None
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        return [line.decode() for line in lines]

    def _await_ready(self) -> None:
        end = time.monotonic() + _WATCHDOG_START_TIMEOUT
        while time.monotonic() < end:
            lines = self._read_lines(end - time.monotonic())
            if lines is None:
                raise FreezeError(
                    f"the freeze watchdog exited at start (status {self.proc.wait()}); "
                    "nothing was frozen"
                )
            for line in lines:
                if line == "R":
                    return
                if line.startswith("E "):
                    k, err = (int(x) for x in line.split()[1:])
                    raise FreezeError(
                        f"the freeze watchdog cannot open {self.mounts[k]}: "
                        f"{os.strerror(err)}; nothing was frozen"
                    )
        raise FreezeError(
            f"the freeze watchdog did not start within {_WATCHDOG_START_TIMEOUT:.0f} s; "
            "nothing was frozen"
        )

    def send(self, line: str) -> None:
        """Raises FreezeError if the watchdog is gone: then nothing more may be frozen."""
        try:
            self._ctl.send((line + "\n").encode(), socket.MSG_NOSIGNAL)
        except OSError as e:
            raise FreezeError(
                f"the freeze watchdog is gone ({e.strerror}); stopped before freezing more"
            ) from None

    def stop(self, *, done: bool) -> None:
        """done=True: we thawed everything, the watchdog exits without thawing.
        done=False: it thaws whatever it was told about, at once, then exits."""
        if self._closed:
            return
        self._closed = True
        try:
            if done:
                with contextlib.suppress(OSError):
                    self._ctl.send(b"done\n", socket.MSG_NOSIGNAL)
        finally:
            self._ctl.close()
        try:
            end = time.monotonic() + _WATCHDOG_STOP_TIMEOUT
            while time.monotonic() < end:
                lines = self._read_lines(end - time.monotonic())
                if lines is None:
                    break
                for line in lines:
                    kind, *args = line.split()
                    if kind == "T":
                        self.thawed.append(int(args[0]))
                    elif kind == "X":
                        self.thaw_errors.append((int(args[0]), int(args[1])))
            try:
                self.proc.wait(timeout=max(0.0, end - time.monotonic()) + 0.5)
            except subprocess.TimeoutExpired:
                # Only after our own thaw, or after it was handed the thaw and had
                # _WATCHDOG_STOP_TIMEOUT to do it (e.g. it was SIGSTOPped). Ours, by pid.
                self.proc.kill()
                self.proc.wait()
        finally:
            os.close(self._report)


# --------------------------------------------------------------------------- freeze


@contextlib.contextmanager
def freeze(
    mountpoints: Iterable[str | os.PathLike[str]],
    *,
    deadline_seconds: float,
    allow_root: bool = False,
) -> Iterator[FrozenMounts]:
    """Freeze mounted filesystems for the body of a ``with`` block, then thaw them.

    Each path must be a mount point (symlinks are resolved). Unless ``allow_root`` is
    true, the filesystem of ``/``, of the running interpreter, of the working directory
    and of the temporary directory are refused: freezing one of them could stop this
    process or the machine. Mounts are frozen in the order given and thawed in reverse.

    ``deadline_seconds`` bounds the freeze: when it has passed, an independent watchdog
    process thaws every mount, even if this process is stuck or was killed (it thaws at
    once if this process dies). The with block then ends without error and the record's
    ``thawed_by_watchdog`` is true; the snapshot taken inside was not fully quiesced.

    If mount k cannot be frozen, mounts 0..k-1 are thawed and ``FreezeError`` names
    mount k and why (already frozen, filesystem cannot freeze, not root, ...).
    """
    if not (isinstance(deadline_seconds, (int, float)) and math.isfinite(deadline_seconds)
            and deadline_seconds > 0):
        raise FreezeError(f"deadline_seconds must be a positive number, not {deadline_seconds!r}")
    mounts = _validate(mountpoints, allow_root)
    if not sys.executable:
        raise FreezeError("cannot start the freeze watchdog: sys.executable is unknown here")
    fds: list[int] = []
    watchdog: _Watchdog | None = None
    frozen: list[int] = []
    try:
        for mp in mounts:
            fds.append(_open_dir(mp))
        deadline = time.monotonic() + deadline_seconds
        record = FrozenMounts(mounts=tuple(mounts), deadline=deadline)
        watchdog = _Watchdog(mounts, deadline)
        record.watchdog_pid = watchdog.proc.pid
        try:
            for k, mp in enumerate(mounts):
                if time.monotonic() >= deadline:
                    raise FreezeError(
                        f"the {deadline_seconds} s deadline passed before {mp} was frozen; "
                        "raise deadline_seconds"
                    )
                _freeze_one(k, mp, fds[k], watchdog)
                frozen.append(k)
            record.frozen_at, record.frozen_at_wall = time.monotonic(), time.time()
            yield record
        finally:
            _thaw_frozen(record, fds, frozen, watchdog)
    finally:
        if watchdog is not None:
            watchdog.stop(done=not frozen)  # no-op when already stopped above
        for fd in fds:
            os.close(fd)


def _freeze_one(k: int, mp: str, fd: int, watchdog: _Watchdog) -> None:
    """Freeze mount k, with the watchdog told before and after."""
    if watchdog.proc.poll() is not None:
        raise FreezeError(
            f"the freeze watchdog died before {mp} was frozen; nothing would "
            "thaw it in time, so it was not frozen"
        )
    watchdog.send(f"+{k}")  # announce first: if we die mid-ioctl, it still thaws
    try:
        _fifreeze(fd)
    except OSError as e:
        # Not our freeze (EBUSY: someone else's): the watchdog must not thaw
        # it. Were we killed right here it would; that window is microseconds.
        with contextlib.suppress(FreezeError):
            watchdog.send(f"-{k}")
        raise _freeze_error(mp, e) from None
    watchdog.send(f"={k}")


def _thaw_frozen(record: FrozenMounts, fds: list[int], frozen: list[int],
                 watchdog: _Watchdog) -> None:
    """Thaw what we froze, in reverse; record who thawed what; raise if a thaw failed."""
    mounts = record.mounts
    early, failures = [], []
    for k in reversed(frozen):
        try:
            _fithaw(fds[k])
        except OSError as e:
            if e.errno == errno.EINVAL:
                early.append(mounts[k])  # the watchdog (or someone) thawed first
            else:
                failures.append((k, e.strerror))
    record.thawed_at, record.thawed_at_wall = time.monotonic(), time.time()
    record.thawed_early = tuple(early)
    # After a failed thaw, stopping without "done" makes the watchdog try too.
    watchdog.stop(done=not failures)
    record.watchdog_thawed = tuple(mounts[k] for k in watchdog.thawed)
    if failures:
        raise FreezeError("; ".join(
            f"cannot thaw {mounts[k]}: {why}; "
            + ("the watchdog thawed it" if k in watchdog.thawed
               else f"it may still be frozen: run fsfreeze -u {mounts[k]}")
            for k, why in failures
        ))


@contextlib.contextmanager
def guard(
    mountpoints: Iterable[str | os.PathLike[str]],
    *,
    deadline_seconds: float,
    allow_root: bool = False,
) -> Iterator[list[str]]:
    """Bound a freeze that someone else makes (a guest agent), as ``freeze()`` bounds ours.

    The mounts are checked as ``freeze()`` checks them and yielded as resolved mount
    points. An independent watchdog thaws them all when the deadline passes or this
    process dies; when the ``with`` block ends, each one is thawed here (a thaw of a
    filesystem that is not frozen does nothing), however the block ended.
    """
    mounts = _validate(mountpoints, allow_root)
    watchdog = _Watchdog(mounts, time.monotonic() + deadline_seconds)
    try:
        for k in range(len(mounts)):
            watchdog.send(f"+{k}")
            watchdog.send(f"={k}")
        yield mounts
    finally:
        failed = False
        for mp in reversed(mounts):
            try:
                thaw(mp)
            except FreezeError:
                failed = True
        watchdog.stop(done=not failed)  # not done: it thaws what we could not
