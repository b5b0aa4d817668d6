"""Helpers for the qemu-ga host tests: a staged root with the real stock dispatcher, the
CLI verbs for qemu-ga, and writers that record when each write was acknowledged.

The staged root gets a copy of Debian's ``/etc/qemu/fsfreeze-hook`` (the dispatcher
qemu-ga runs), so ``rehearse qemu-ga --root ROOT`` starts the real agent with the real
dispatcher and the hook ``install qemu-ga --root ROOT`` wrote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .helpers import rehearse_host, run

QEMU_GA = "/usr/sbin/qemu-ga"
DISPATCHER = "/etc/qemu/fsfreeze-hook"
HOOK = "/etc/qemu/fsfreeze-hook.d/quiesce"


def require_agent() -> None:
    if not os.access(QEMU_GA, os.X_OK) or not os.path.isfile(DISPATCHER):
        if os.environ.get("CI") == "true":
            pytest.fail("qemu-guest-agent is not installed (make deps installs it)")
        pytest.skip("qemu-guest-agent is not installed")


def stage_root(root: Path) -> Path:
    """A host root holding the machine's stock dispatcher, as the package installs it."""
    (root / "etc/qemu").mkdir(parents=True, exist_ok=True)
    shutil.copy2(DISPATCHER, root / "etc/qemu/fsfreeze-hook")
    return root


def install(config: Path, root: Path, log_dir: Path, *extra: str):
    return run(config, "install", "qemu-ga", "--root", str(root), "--log-dir", str(log_dir),
               *extra)


def rehearse(config: Path, root: Path, *extra: str, timeout: float = 120):
    return rehearse_host("qemu-ga", config, root, *extra, timeout=timeout)


def events(report: dict) -> list[str]:
    return [e["event"] for e in report["timeline"]]


def when(report: dict, prefix: str) -> float:
    """The wall-clock time of the first timeline event starting with *prefix*."""
    for e in report["timeline"]:
        if e["event"].startswith(prefix):
            return report["started_at"] + e["t"]
    raise AssertionError(f"no {prefix!r} event in {events(report)}")


def thaw_mount(fs) -> None:
    """Thaw the loop filesystem a test made (a no-op when it is not frozen)."""
    subprocess.run(["fsfreeze", "-u", str(fs.mountpoint)], capture_output=True, timeout=30)


class Writer(threading.Thread):
    """Calls write(i) for i = 0, 1, ... and records when each one was acknowledged."""

    def __init__(self, name: str, connect, write):
        super().__init__(daemon=True, name=f"writer-{name}")
        self.connect, self.write = connect, write
        self.stop = threading.Event()
        self.acked: dict[int, float] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        handle = None
        try:
            handle = self.connect()
            i = 0
            while not self.stop.is_set():
                self.write(handle, i)
                self.acked[i] = time.time()
                i += 1
                time.sleep(0.002)
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            if handle is not None:
                handle.close()  # an open SQLite file keeps the loop mount busy

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=90)
        assert not self.is_alive(), f"{self.name} is stuck"
        assert self.error is None, f"{self.name}: {self.error!r}"

    def acked_before(self, instant: float) -> set[int]:
        return {i for i, t in self.acked.items() if t < instant}
