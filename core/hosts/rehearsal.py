"""Shared parts of a rehearsal: the timeline, the freeze plus snapshot step, running a
host's script the way the host does, and the verdict from what quiesce itself saw.

Every host's rehearse() reports the same way: a timeline of events with their offsets
from the start, and ``freeze``/``snapshot`` records from the step below.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .. import fsfreeze
from ..snapshot import SnapshotStep


class Timeline:
    """Events with their offset from the start; each is also passed to *on_event*."""

    def __init__(self, on_event: Callable[[float, str], None] | None = None):
        self.t0 = time.monotonic()
        self.wall0 = time.time()  # the same instant on the wall clock: offsets map onto it
        self.events: list[dict[str, Any]] = []
        self.on_event = on_event

    def __call__(self, text: str) -> None:
        self.events.append({"t": round(time.monotonic() - self.t0, 4), "event": text})
        if self.on_event:
            self.on_event(self.events[-1]["t"], text)


def new_report(host: str, timeline: Timeline) -> dict[str, Any]:
    return {"host": host, "started_at": timeline.wall0, "timeline": timeline.events,
            "snapshot": None, "freeze": None}


def snapshot_step(snapshot: SnapshotStep, report: dict[str, Any], event: Timeline,
                  label: str = "snapshot") -> None:
    """Run the snapshot step and record it in the report."""
    event(f"{label}: {snapshot.describe()}")
    report["snapshot"] = snapshot.run()


def snapshot_failed(report: dict[str, Any], event: Timeline) -> bool:
    if report["snapshot"] and not report["snapshot"]["ok"]:
        event(f"snapshot failed: {report['snapshot']['error']}")
        return True
    return False


def freeze_and_snapshot(snapshot: SnapshotStep, mounts: list[str], allow_root: bool,
                        deadline: float, report: dict[str, Any], event: Timeline) -> str | None:
    """Freeze *mounts* (none: no freeze), take the snapshot, thaw.

    Returns None on success, "freeze" when the freeze failed or did not cover the
    snapshot (the watchdog thawed first), "snapshot" when the snapshot step failed.
    """
    try:
        if not mounts:
            snapshot_step(snapshot, report, event, "snapshot (no freeze)")
            return "snapshot" if snapshot_failed(report, event) else None
        with fsfreeze.freeze(mounts, deadline_seconds=deadline, allow_root=allow_root) as frozen:
            event(f"froze {', '.join(frozen.mounts)} (watchdog thaws at +{deadline:g} s)")
            snapshot_step(snapshot, report, event)
        _thawed(frozen, report, event)
    except fsfreeze.FreezeError as e:
        event(f"freeze failed: {e}")
        report["freeze"] = {"error": str(e)}
        return "freeze"
    if frozen.thawed_by_watchdog:
        event("the freeze watchdog thawed before the snapshot ended")
        return "freeze"
    return "snapshot" if snapshot_failed(report, event) else None


def _thawed(frozen, report: dict[str, Any], event: Timeline) -> None:
    report["freeze"] = {"mounts": list(frozen.mounts), "frozen_at": frozen.frozen_at_wall,
                        "thawed_at": frozen.thawed_at_wall,
                        "frozen_for": round(frozen.frozen_for or 0, 4),
                        "thawed_by_watchdog": frozen.thawed_by_watchdog}
    event(f"thawed {', '.join(frozen.mounts)}")


def sync_freeze(rehearsal, report: dict[str, Any],
                event: Timeline) -> Callable[[], Callable[[], None]]:
    """For an emulator that freezes apart from the snapshot (vmtoolsd's sync driver): freeze
    the named mounts for real and hand back their thaw; a failed freeze raises, as the
    driver fails. Recorded in the report as freeze_and_snapshot records it."""
    def freeze() -> Callable[[], None]:
        if not rehearsal.freeze_mounts:
            event("no mount named: nothing frozen")
            return lambda: None
        stack = contextlib.ExitStack()
        try:
            frozen = stack.enter_context(fsfreeze.freeze(
                rehearsal.freeze_mounts, deadline_seconds=rehearsal.freeze_deadline,
                allow_root=rehearsal.allow_root_freeze))
        except fsfreeze.FreezeError as e:
            event(f"freeze failed: {e}")
            report["freeze"] = {"error": str(e)}
            raise
        event(f"froze {', '.join(frozen.mounts)} (watchdog thaws at "
              f"+{rehearsal.freeze_deadline:g} s)")

        def thaw() -> None:
            stack.close()
            _thawed(frozen, report, event)
        return thaw
    return freeze


def holds(runtime_dir: str | None, since: float) -> list[dict[str, Any]]:
    """How long each target was held in this rehearsal, from the holder's record."""
    from ..runtime import read_state
    state = read_state(runtime_dir or "/nonexistent") or {}
    if not state.get("held_since") or not state.get("released_at") \
            or state.get("started_at", 0) < since:
        return []  # no freeze ran in this rehearsal
    seconds = state["released_at"] - state["held_since"]
    statuses = {o["target"]: o["status"] for o in state.get("outcomes", ())}
    return [{"target": t["name"], "kind": t["kind"], "seconds": round(seconds, 4),
             "released_by": state.get("released_by"), "status": statuses.get(t["name"], t["status"])}
            for t in state.get("targets", ())]


def conclude(report: dict[str, Any], event: Timeline, runtime_dir: str | None, *,
             host_ok: bool, host_says: str, failure: str | None = None) -> dict[str, Any]:
    """The result of a script-running host's rehearsal: application-consistent only when the
    host succeeded, the snapshot step did, and quiesce held every target (its own record)."""
    report["holds"] = held = holds(runtime_dir, report["started_at"])
    freeze = report["freeze"] or {}
    if freeze.get("thawed_by_watchdog"):
        event("the freeze watchdog thawed before the snapshot ended")
    snapshot_ok = bool(report["snapshot"]) and not snapshot_failed(report, event) \
        and not freeze.get("error") and not freeze.get("thawed_by_watchdog")
    quiesced = bool(held) and all(h["status"] == "ok" for h in held)
    report["host_sees"] = host_says
    if host_ok and snapshot_ok and quiesced:
        report.update(code=0, status="success", consistency="application",
                      message="every target was held for the whole snapshot")
    elif snapshot_ok:
        bad = [f"{h['target']}: {h['status']}" for h in held] or ["no target was held"]
        report.update(code=1, status="success" if host_ok else "error",
                      consistency="file-system" if report.get("freeze") else "crash",
                      message=failure or f"quiesce did not hold every target ({'; '.join(bad)})")
    else:
        report.update(code=2, status="error", consistency="none",
                      message=failure or "no snapshot was taken")
    health = report.get("validation") or {}
    if report["code"] and health.get("code"):
        report.update(health_code=health["code"], health_name=health["name"])
    else:
        report.update(health_code=None, health_name=None)
    event(f"result: {report['code']} {report['message']}")
    return report


def validation(report: dict[str, Any], event: Timeline, verdict) -> None:
    """Record the host's own prediction at the start of a rehearsal."""
    event(f"validation: {verdict.code} {verdict.name}: {verdict.message}")
    report["validation"] = {"code": verdict.code, "name": verdict.name, "message": verdict.message}


def snapshot_callback(rehearsal, report: dict[str, Any], event: Timeline) -> Callable[[], None]:
    """The host's snapshot, played by quiesce: freeze the named mounts, snapshot, thaw."""
    def snapshot() -> None:
        freeze_and_snapshot(rehearsal.snapshot, rehearsal.freeze_mounts,
                            rehearsal.allow_root_freeze, rehearsal.freeze_deadline, report, event)
    return snapshot


# -- running a host's script ----------------------------------------------------------


@dataclass
class ScriptRun:
    """How one script run ended, as the host sees it."""

    argv: list[str]
    returncode: int | None         # None: it never started (not found, not executable)
    timed_out: bool = False        # the host's timeout fired and it sent its kill signals
    pipes_held: bool = False       # it exited, but a child kept its output pipe open
    output: str = ""
    error: str = ""                # why it never started
    seconds: float = 0.0


def _stop(proc: subprocess.Popen, signals: Sequence[tuple[int, float]]) -> None:
    """Send each (signal, grace seconds) to the script itself (not its group), as hosts do."""
    for sig, grace in signals:
        if proc.poll() is not None:
            return
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue


def run_script(argv: Sequence[str], *, timeout: float | None,
               kill: Sequence[tuple[int, float]] = ((signal.SIGKILL, 5.0),),
               pipe_grace: float = 5.0, capture: bool = True, cwd: str | None = None,
               env: dict[str, str] | None = None) -> ScriptRun:
    """Run *argv* with its output on pipes the host reads, under *timeout* (None: none).

    At the timeout each signal in *kill* is sent in turn, waiting its grace. After the
    script exits, the host still reads its pipes to the end: a child that inherited them
    keeps the host waiting; we wait *pipe_grace* and then report ``pipes_held``. A host
    that does not read the output (*capture* false) gives the script /dev/null.
    """
    started = time.monotonic()
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env)
    except OSError as e:
        return ScriptRun(list(argv), None, error=e.strerror or str(e))
    chunks: list[bytes] = []
    reader = threading.Thread(daemon=True, target=lambda: proc.stdout and chunks.extend(
        iter(lambda: proc.stdout.read(4096), b"")))
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(proc, kill)
        proc.wait()
    reader.join(pipe_grace)
    held = reader.is_alive()
    if proc.stdout and not held:
        proc.stdout.close()
    return ScriptRun(list(argv), proc.returncode, timed_out, held,
                     b"".join(chunks).decode(errors="replace"),
                     seconds=time.monotonic() - started)


def real_freeze(mounts: Sequence[str], *, deadline_seconds: float,
                allow_root: bool = False) -> Callable[[], Callable[[], None]]:
    """An emulator's file-system freeze done for real: freeze *mounts* (with fsfreeze's
    independent deadline thaw) and hand back their thaw."""
    def freeze() -> Callable[[], None]:
        stack = contextlib.ExitStack()
        stack.enter_context(fsfreeze.freeze(mounts, deadline_seconds=deadline_seconds,
                                            allow_root=allow_root))
        return stack.close
    return freeze
