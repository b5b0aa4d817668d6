"""``holder_scope = "systemd"``: move the holder out of the host agent's cgroup.

A host agent that runs our pre-script inside its own service cgroup (Azure's waagent does)
takes the holder down with it when that service restarts: systemd kills every process in
the cgroup. The holder then dies holding, and the snapshot is only crash-consistent.

``systemd-run --scope CMD`` avoids that by asking systemd for a transient scope unit that
contains its own PID (``StartTransientUnit`` with the ``PIDs`` property), then exec'ing
CMD. The holder is already a forked process with its pipes and lock in hand, so it makes
the same request for its own PID, through ``busctl``, instead of re-exec'ing itself. Its
children (the stand-in watchdog) are started afterwards, so they are in the scope too.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time

log = logging.getLogger(__name__)

SYSTEMD_RUNNING = "/run/systemd/system"  # sd_booted(3): systemd is the running init
BUSCTL_TIMEOUT = 5.0
MOVE_WAIT = 2.0


def enter(scope: str) -> None:
    """Put this process in its own systemd scope when *scope* is "systemd"; else nothing.

    Where that is impossible it warns and carries on in the caller's cgroup: a holder that
    a host-agent restart could kill is still better than no hold at all.
    """
    if scope != "systemd":
        return
    problem = move_to_scope(f"quiesce-holder-{os.getpid()}.scope")
    if problem:
        log.warning("holder_scope = \"systemd\": %s; the holder stays in the caller's cgroup, "
                    "where a restart of the host agent can kill it", problem)


def move_to_scope(unit: str) -> str | None:
    """Ask systemd to start *unit* as a scope holding this process; None once it is in."""
    if not os.path.isdir(SYSTEMD_RUNNING):
        return f"systemd is not running here ({SYSTEMD_RUNNING} is missing)"
    busctl = shutil.which("busctl", path="/usr/bin:/bin")
    if busctl is None:
        return "busctl (systemd) is not installed"
    try:
        proc = subprocess.run(
            [busctl, "--system", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
             "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
             unit, "fail", "3",
             "PIDs", "au", "1", str(os.getpid()),
             "Description", "s", "quiesce holder: keeps databases quiesced until thaw",
             "CollectMode", "s", "inactive-or-failed",
             "0"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BUSCTL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot ask systemd for a scope: {e}"
    if proc.returncode != 0:
        return f"systemd refused the scope {unit}: {proc.stderr.strip() or proc.returncode}"
    # The call returns a job; the move is done when our cgroup names the unit.
    deadline = time.monotonic() + MOVE_WAIT
    while time.monotonic() < deadline:
        if unit in _own_cgroup():
            return None
        time.sleep(0.02)
    return f"systemd accepted {unit} but did not move the holder into it"


def _own_cgroup() -> str:
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""
