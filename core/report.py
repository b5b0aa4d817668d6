"""The report a command prints: its type, how it reads, and the exit code it means.

freeze, thaw, status and check all end in one :class:`Report`: a message, one outcome per
target and phase, and whether it was ok. It is printed as lines or as JSON, and decides
the exit status. Standard library only: the lean thaw client prints it too.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TypedDict

from .runtime import STATE_NAME, State, Unresponsive, still_held

EXIT_OK = 0
EXIT_FAILED = 1  # a target failed, or a hold did not cover the whole window (cli.EXIT_CODES)
EXIT_BUSY = 3    # a holder that does not answer (cli.EXIT_CODES)

#: Outcome statuses that are not app-consistent; only "ok" is.
BAD_STATUSES = {"failed", "broken"}


class Report(TypedDict, total=False):
    ok: bool
    action: str        # frozen, partly-frozen, freeze-failed, thawed, recovered, nothing-held, ...
    message: str
    outcomes: list[dict[str, Any]]  # phases.Outcome.as_dict(), in the order they ran
    holder_pid: int | str | None
    released_by: str
    held_for: float
    held_since: float
    deadline: float
    consistent: list[str]           # freeze: the targets held for the snapshot
    not_held: list[dict[str, Any]]  # targets that failed and were never held
    held: bool                      # status: something may still be quiesced
    state: State                    # status: the holder's answer or the record
    last_cycle: dict[str, Any] | None  # status: publish.summarize() of the last cycle
    exit_code: int                  # only when the status is not 0/1 from "ok"
    elapsed_ms: float


def exit_code(report: Report) -> int:
    if "exit_code" in report:
        return report["exit_code"]
    return EXIT_FAILED if not report.get("ok", False) else EXIT_OK


def render(report: Report) -> str:
    """Human-readable lines for a freeze/thaw/check/status report."""
    lines = [report.get("message", "")]
    outcomes = report.get("outcomes", ())
    width = max((len(o["target"]) + len(o["kind"]) for o in outcomes), default=0)
    for o in outcomes:
        label = f"{o['target']} ({o['kind']})".ljust(width + 3)
        status = {"ok": "ok", "failed": "FAILED", "broken": "BROKEN"}.get(o["status"], o["status"])
        line = f"  {status:<7} {label} {o['phase']:<8} {o['duration'] * 1000:7.1f} ms"
        if o.get("error"):
            line += f"  {o['error']}"
        lines.append(line)
        for key, value in (o.get("facts") or {}).items():
            lines.append(f"            {key}: {value}")
    return "\n".join(line for line in lines if line)


def emit(report: Report, *, as_json: bool, started: float) -> None:
    """Print *report* on stdout, with the time since *started* (monotonic)."""
    report.setdefault("elapsed_ms", round((time.monotonic() - started) * 1000, 1))
    out = json.dumps(report, indent=2) if as_json else render(report)
    sys.stdout.write(out + "\n")
    sys.stdout.flush()


def _when(ts: float | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return time.strftime(fmt, time.localtime(ts or 0))


def nothing_held(message: str) -> Report:
    return Report(ok=True, action="nothing-held", outcomes=[], message=message)


def unresponsive(error: Unresponsive, runtime_dir: str) -> Report:
    who = f"pid {error.pid}" if error.pid else "pid unknown: see `pgrep quiesce-holder`"
    return Report(ok=False, action="unresponsive", holder_pid=error.pid, outcomes=[],
                  exit_code=EXIT_BUSY,
                  message=f"the holder ({who}) for {runtime_dir} did not answer within "
                          f"{error.waited:g} s: it is stopped or stuck, and whatever it holds "
                          f"stays held until its watchdog fires; killing it ends its sessions, "
                          f"then run `quiesce thaw` again to release what servers keep")


def from_state(state: State | None, runtime_dir: str) -> tuple[Report, bool]:
    """What thaw says when no holder answers; second item: adapters are needed to recover."""
    if state is None:
        return nothing_held(f"nothing to thaw: no freeze is recorded in {runtime_dir}"), False
    if state.get("corrupt"):
        return Report(ok=False, action="unknown", outcomes=[],
                      message=f"{runtime_dir}/{STATE_NAME} is unreadable; run `quiesce thaw` "
                              f"(the full command) to release every target"), True
    if still_held(state):
        return Report(), True
    if state.get("phase") == "starting" and not state.get("holder_pid"):
        return nothing_held(f"nothing to thaw: the freeze started at "
                            f"{_when(state.get('started_at'))} ended before it held anything "
                            f"(its own output says why)"), False
    if state.get("acknowledged"):
        return nothing_held(f"nothing to thaw: already released ({state.get('released_by')}) "
                            f"at {_when(state.get('released_at'))}"), False
    outcomes = state.get("outcomes", [])
    ok = not any(o["status"] in BAD_STATUSES for o in outcomes)
    return Report(ok=ok, action="reported", outcomes=outcomes,
                  message=state.get("message", "released before thaw came")), False


def frozen(state: State, pid: int, max_hold: float, outcomes: list[dict[str, Any]]) -> Report:
    """freeze's report once the holder said "ready": what is held, and what is not."""
    held = [t["name"] for t in state["targets"] if t["status"] == "held"]
    not_held = state.get("not_held") or []
    report = Report(ok=not not_held, action="partly-frozen" if not_held else "frozen",
                    holder_pid=pid, outcomes=outcomes, held_since=state["held_since"],
                    deadline=state["deadline"], consistent=held, not_held=not_held,
                    message=f"holding {len(held)} target(s) (holder pid {pid}) until "
                            f"`quiesce thaw`, or until the watchdog releases them at "
                            f"{_when(state['deadline'], '%H:%M:%S')} (max_hold {max_hold:g} s)")
    if not_held:
        report["message"] += (
            f"; consistent in the snapshot: {', '.join(held)}; NOT consistent (could not "
            f"be held): " + ", ".join(f"{f['target']} ({f['phase']})" for f in not_held))
    return report


def status(state: State | None) -> Report:
    """What `quiesce status` says about a holder's answer or the recorded state."""
    if state is None:
        return Report(ok=True, held=False, message="nothing held; no freeze recorded")
    held = [t["name"] for t in still_held(state)]
    alive = state.get("alive", False)
    fmt = lambda ts: _when(ts) if ts else "-"
    if held and alive:
        message = (f"holding {', '.join(held)} since {fmt(state.get('held_since'))} "
                   f"(holder pid {state['holder_pid']}); watchdog at {fmt(state.get('deadline'))}")
    elif held:
        message = (f"{', '.join(held)} recorded as held but the holder is gone; "
                   f"run `quiesce thaw` to release them")
    else:
        message = (f"nothing held; last released by {state.get('released_by')} at "
                   f"{fmt(state.get('released_at'))}")
    return Report(ok=not (held and not alive), held=bool(held), message=message, state=state)
