"""The independent thaw of fsfreeze.py: thaws what it was told about, whatever happens.

Run by fsfreeze.py as ``python -I -S -B fsfreeze_watchdog.py CTL_FD REPORT_FD DEADLINE
MOUNT...`` (isolated, no site, no bytecode writing: after its start the interpreter
touches no file on disk). It opens every mount before anything is frozen, so at the
deadline it thaws through descriptors it already has: no path lookup, no exec.

Control lines from the parent on CTL_FD: "+k" about to freeze mount k, "-k" that freeze
failed (not ours: never thaw it), "=k" mount k is frozen, "done" we thawed, exit quietly.
Report lines to the parent on REPORT_FD: "R" ready, "T k" thawed k, "X k errno" thaw of
k failed, "E k errno" could not open k. Any end other than "done" (the deadline, EOF on
CTL_FD because the parent died, SIGTERM/SIGINT/SIGHUP) thaws first.

Standard library only, and nothing of quiesce: it must work whatever state its parent
is in.
"""

import fcntl
import os
import select
import signal
import sys
import time

FITHAW = 0xC0045878
EINVAL = 22


class Watchdog:
    def __init__(self, report: int, fds: list[int]):
        self.report, self.fds = report, fds
        self.announced: list[int] = []  # mounts the parent is freezing or froze
        self.failed: set[int] = set()   # their freeze failed: someone else's, never thaw

    def say(self, line: str) -> None:
        try:
            os.write(self.report, (line + "\n").encode())
        except OSError:
            pass  # the parent is gone; thawing still matters

    def thaw_all(self) -> None:
        for k in reversed(self.announced):
            if k in self.failed:
                continue
            try:
                fcntl.ioctl(self.fds[k], FITHAW, 0)
                self.say("T %d" % k)
            except OSError as e:
                if e.errno != EINVAL:  # EINVAL: not frozen, nothing to do
                    self.say("X %d %d" % (k, e.errno))

    def control(self, line: bytes, fired: bool) -> bool:
        """Act on one control line; true for "done"."""
        if line == b"done":
            return True
        k = int(line[1:])
        if line[:1] == b"+":
            self.announced.append(k)
        elif line[:1] == b"-":
            self.failed.add(k)
        elif line[:1] == b"=" and fired:
            self.thaw_all()  # a freeze still in progress at the deadline: undo it now
        return False

    def watch(self, ctl: int, wake: int, deadline: float) -> bool:
        """Follow the parent until "done" (true), EOF or a signal (false)."""
        fired, buf = False, b""
        while True:
            timeout = None if fired else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([ctl, wake], [], [], timeout)
            if not ready:
                fired = True
                self.thaw_all()
                continue
            if wake in ready:
                return False
            chunk = os.read(ctl, 4096)
            if not chunk:  # the parent died or gave up without "done"
                return False
            buf += chunk
            *lines, buf = buf.split(b"\n")
            if any(self.control(line, fired) for line in lines):
                return True


def main() -> int:
    ctl, report, deadline = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    # A signal only wakes the select (no exception can cut a thaw pass short).
    wake, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda signum, frame: None)
    fds = []
    watchdog = Watchdog(report, fds)
    for k, path in enumerate(sys.argv[4:]):
        try:
            fds.append(os.open(path, os.O_RDONLY | os.O_DIRECTORY))
        except OSError as e:
            watchdog.say("E %d %d" % (k, e.errno))
            return 2
    watchdog.say("R")
    done = False
    try:
        done = watchdog.watch(ctl, wake, deadline)
    finally:
        if not done:
            watchdog.thaw_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
