"""Shared parts of a rehearsal: the timeline, and the freeze plus snapshot step.

Every host's rehearse() reports the same way: a timeline of events with their offsets
from the start, and ``freeze``/``snapshot`` records from the step below.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from .. import fsfreeze
from ..snapshot import SnapshotStep


class Timeline:
    """Events with their offset from the start; each is also passed to *on_event*."""

    def __init__(self, on_event: Callable[[float, str], None] | None = None):
        self.t0 = time.monotonic()
        self.events: list[dict[str, Any]] = []
        self.on_event = on_event

    def __call__(self, text: str) -> None:
        self.events.append({"t": round(time.monotonic() - self.t0, 4), "event": text})
        if self.on_event:
            self.on_event(self.events[-1]["t"], text)


def new_report(host: str, timeline: Timeline) -> dict[str, Any]:
    return {"host": host, "started_at": time.time(), "timeline": timeline.events,
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
        report["freeze"] = {"mounts": list(frozen.mounts), "frozen_at": frozen.frozen_at_wall,
                            "thawed_at": frozen.thawed_at_wall,
                            "frozen_for": round(frozen.frozen_for or 0, 4),
                            "thawed_by_watchdog": frozen.thawed_by_watchdog}
        event(f"thawed {', '.join(frozen.mounts)}")
    except fsfreeze.FreezeError as e:
        event(f"freeze failed: {e}")
        report["freeze"] = {"error": str(e)}
        return "freeze"
    if frozen.thawed_by_watchdog:
        event("the freeze watchdog thawed before the snapshot ended")
        return "freeze"
    return "snapshot" if snapshot_failed(report, event) else None


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
