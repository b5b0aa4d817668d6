"""One cycle of the targets, step by step: freeze, hold's clock, release; and recovery.

:class:`Cycle` runs the phases for every target of a config and keeps the cycle's record
(:class:`~quiesce.runtime.State`): check and flush for every target together, quiesce
(every target prepares its session, then all take their locks at once through the lock
gate, :mod:`~quiesce.lockgate`), the max_hold clock from the first lock, ``on_target_failure``, and the release of
every target at once (:class:`Release`). It knows nothing of processes: the holder
(``holder.py``) runs it in the detached process and learns what happens through :class:`Events` (progress to show,
whether to cancel, when to save the record, when the deadline changes).

:func:`recover` is the release when no holder is alive: it works from the record alone.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import runtime
from .config import Config
from .lockgate import LockGate
from .logs import IN_REPORT
from .phases import Outcome, call, hard_limit, run_phase
from .plugins import Adapters
from .report import Report
from .runtime import State
from .target import Hold, Target

log = logging.getLogger("quiesce.holder")

EARLY_THAW = "thaw came before freeze had finished, so the snapshot was not covered"
#: freeze fails rather than promise a hold with less than this left (or half of max_hold,
#: if that is less): the host still has to see the pre-script end and take its snapshot.
HOLD_MARGIN = 10.0
#: How much nicer a release thread gets once its release is written (_yield_to_writers).
YIELD_NICE = 10


def step_limit(targets: list[Target]) -> float:
    """The longest one phase can take: its slowest target's hard limit."""
    return max((hard_limit(t) for t in targets), default=0.0)


def release_budget(targets: list[Target]) -> float:
    """The longest a release can take: every target at once, so the slowest hard limit."""
    return step_limit(targets)


def hold_margin(config: Config) -> float:
    return min(HOLD_MARGIN, config.max_hold / 2)


@dataclass
class Events:
    """How a cycle tells its runner what happens, and learns whether to stop."""

    progress: Callable[[list[dict[str, Any]]], None]  # a phase ended: its outcomes
    save: Callable[[], None]                           # the record changed: keep it
    deadline: Callable[[float], None]                  # the latest release time (wall)
    thaw_came: Callable[[], bool]                      # cancel: release everything
    freeze_gone: Callable[[], bool] = lambda: False    # nobody waits for "ready" any more


class Cycle:
    def __init__(self, config: Config, adapters: Adapters, events: Events, *,
                 started: float, holder_pid: int):
        self.config, self.adapters, self.events = config, adapters, events
        self.state: State = runtime.new_state(config.path, holder_pid, started, config.max_hold,
                                              ((t.name, t.kind) for t in config.targets))
        self.holds: dict[str, Hold] = {}
        self.failed: list[dict[str, Any]] = []  # targets that could not be held (hold-others)
        self.failure: str | None = None  # why freeze failed, when no target's outcome says it
        self.deadline = math.inf  # monotonic: a clock step never stretches a hold
        self.report: Report | None = None
        self.armed: Release | None = None
        self.quiesced: list[dict[str, Any]] = []  # the quiesce phase's outcomes

    def entry(self, name: str) -> runtime.TargetState:
        return next(t for t in self.state["targets"] if t["name"] == name)

    # -- freeze ------------------------------------------------------------------

    def freeze(self) -> bool:
        """Check, flush, quiesce; true when there are holds that freeze may report."""
        targets = list(self.config.targets)
        for hook in ("check", "flush"):
            self.state["phase"] = hook
            results = run_phase(self.adapters, hook, targets)
            self.events.progress([o.as_dict() for o, _ in results])
            targets = self._survivors(targets, results)
            if not targets or self.events.thaw_came() or self.events.freeze_gone():
                return False
        results = self._quiesce(targets)
        self.quiesced = [o.as_dict() for o, _ in results]
        if self._survivors(targets, results) and not self.events.thaw_came() \
                and self._enough_left():
            return True  # the outcomes go out with "ready": one message less to wait for
        self.events.progress(self.quiesced)
        return False

    def _quiesce(self, targets: list[Target]) -> list[tuple[Outcome, Any]]:
        self.state["phase"] = "quiesce"
        for target in targets:
            self.entry(target.name)["status"] = runtime.QUIESCING  # a crash-thaw releases
        self.events.save()
        # the latest the deadline can be, until the first lock tells the real one
        self.events.deadline(time.time() + step_limit(targets) + self.config.max_hold)
        # The release threads start now, before any lock: a hold never pays for them.
        self.armed = Release(self.adapters, list(reversed(targets)))
        started, started_mono = time.time(), time.monotonic()
        # prepare every target, then lock them together (lockgate.py)
        with LockGate(targets).attached(targets) as gate:
            results = run_phase(self.adapters, "quiesce", targets, finished=gate.arrive)
        for target, (outcome, hold) in zip(targets, results):
            entry = self.entry(target.name)
            if outcome.ok:
                hold = hold if isinstance(hold, Hold) else Hold()
                self.holds[target.name] = hold
                entry.update(status=runtime.HELD, session_bound=hold.session_bound,
                             facts=hold.facts)
            elif not outcome.abandoned:
                entry["status"] = runtime.FAILED
            # an abandoned quiesce stays "quiescing": it may still take its lock, and the
            # sentinel or the next thaw must then release it
        self._start_clock(started, started_mono,
                          [(o, self.holds[o.target]) for o, _ in results if o.ok])
        # Saved by holding() or the release, whichever comes next, microseconds from now: a
        # holder that dies in between left its targets "quiescing", which a thaw releases.
        return results

    def _survivors(self, targets: list[Target], results: list) -> list[Target]:
        """The targets to go on with: those that worked, or none (release-all)."""
        failed = [o for o, _ in results if not o.ok]
        for o in failed:
            self.failed.append({"target": o.target, "kind": o.kind, "phase": o.phase,
                                "error": o.error})
            if o.phase != "quiesce":
                self.entry(o.target)["status"] = runtime.FAILED
        if failed and self.config.on_target_failure == "release-all":
            return []
        ok = {o.target for o, _ in results if o.ok}
        return [t for t in targets if t.name in ok]

    def _start_clock(self, started: float, started_mono: float,
                     held: list[tuple[Outcome, Hold]]) -> None:
        """max_hold runs from the first lock taken: the adapter's ``locked_at``, or else
        the earliest its quiesce can have returned (its duration after the phase started:
        its thread may have started later, so this errs early, towards a shorter hold).

        ``locked_at`` is wall-clock time: it is only kept within the phase's span, so a
        clock step cannot stretch the hold. (Capping it by the call's own duration, as this
        once did, moved it early by as much as the call's thread started late: some 10 ms
        with 32 targets.)"""
        if not held:
            return
        span = time.monotonic() - started_mono
        first = min(min(max(hold.locked_at - started, 0.0), span)
                    if hold.locked_at is not None else o.duration for o, hold in held)
        self.state["held_since"] = started + first
        self.state["deadline"] = started + first + self.config.max_hold
        self.deadline = started_mono + first + self.config.max_hold
        self.events.deadline(self.state["deadline"])

    def _enough_left(self) -> bool:
        """Refuse to promise a hold the watchdog would end before a snapshot could run."""
        left = self.deadline - time.monotonic()
        if left >= hold_margin(self.config):
            return True
        self.failure = (f"only {max(left, 0):.1f} s of max_hold ({self.config.max_hold:g} s) "
                        f"were left once every target was quiesced, less than the "
                        f"{hold_margin(self.config):g} s a snapshot needs; every target was "
                        f"released: raise max_hold, or find what made quiesce slow")
        return False

    def holding(self) -> None:
        """Record that the hold is promised: freeze is told "ready" next."""
        self.state.update(phase=runtime.HOLDING, frozen_at=time.time(), not_held=self.failed)
        self.events.save()

    # -- release -----------------------------------------------------------------

    def release(self, by: str, reason: str | None = None, *, promised: bool) -> Report:
        """Thaw every held target, all at once and once; later calls get the same report.

        *reason* set means the hold did not cover the window as promised: every released
        target is then reported as broken with that reason. *promised*: freeze was told
        "ready", so the targets that could not be held belong in this report.
        """
        if self.report is not None:
            return self.report
        outcomes = self._thaw_all(reason)
        now = time.time()
        held_for = now - self.state["held_since"] if self.state["held_since"] else 0.0
        not_held = self.failed if promised else []
        ok = not reason and not not_held and all(o.ok for o in outcomes)
        message = reason or (f"released {len(outcomes)} target(s), held for {held_for:.1f} s"
                             if all(o.ok for o in outcomes) else
                             "released, but not every target was held to the end")
        if not_held and not reason:
            message += "; not consistent in this snapshot (never held): " + ", ".join(
                f"{f['target']} ({f['phase']} failed)" for f in not_held)
        told = by == "freeze-failed" or (by == "thaw" and reason == EARLY_THAW)
        self.state.update(phase=runtime.CYCLE_RELEASED, released_by=by, released_at=now,
                          outcomes=[o.as_dict() for o in outcomes], message=message,
                          acknowledged=told)
        self.events.save()
        self.report = Report(ok=ok, action="thawed", released_by=by,
                             held_for=round(held_for, 3), message=message, not_held=not_held,
                             outcomes=[o.as_dict() for o in outcomes])
        log.log(logging.INFO if ok else logging.WARNING, "released by %s: %s", by, message,
                extra=IN_REPORT)
        return self.report

    def _thaw_all(self, reason: str | None) -> list[Outcome]:
        """Release every held target at once; outcomes in reverse config order."""
        # not armed: freeze ended before the quiesce phase, so nothing is held
        release = self.armed or Release(self.adapters, [])
        outcomes = release.fire(self.holds, reason)
        self.holds.clear()
        for outcome in outcomes:
            self.entry(outcome.target)["status"] = after_thaw(outcome)
        return outcomes

    def budget(self, *, promised: bool) -> float:
        """How long a thaw may take from now: the release, after any step in progress."""
        targets = self.config.targets
        if promised:
            return release_budget([t for t in targets if t.name in self.holds])
        return step_limit(targets) + release_budget(targets)


class Release:
    """Release threads armed before the locks: one wake-up releases every target at once.

    Each target of the quiesce phase gets a thread, started before any lock is taken, that
    waits on one event and then, if its target is held, calls its adapter's ``thaw``. So
    neither the hold nor the release pays for a thread start, and no target waits for
    another's release (the old order, each one after the previous, made the last target
    wait for every other). A hold with a prepared release (``Hold.release``) has its
    releasing statement written first, from the firing thread, back to back with the
    others': the writers of every target go within microseconds of each other, before any
    thread has even woken. Outcomes are listed in reverse config order. A release that
    overruns its hard limit is reported as failed and abandoned.
    """

    def __init__(self, adapters: Adapters, targets: list[Target]):
        self.adapters, self.targets = adapters, targets  # reverse config order
        self.go = threading.Event()
        self.holds: dict[str, Hold] = {}
        self.sent: set[str] = set()  # targets whose prepared release the firing thread wrote
        self.reason: str | None = None
        self.results: dict[str, Outcome] = {}
        self.threads = {t.name: threading.Thread(target=self._release, args=(t,),
                                                 name=f"thaw-{t.name}", daemon=True)
                        for t in targets}
        for thread in self.threads.values():
            thread.start()

    def judge(self, outcome: Outcome) -> None:  # before it is logged: log and report agree
        if self.reason and outcome.status == "ok":
            outcome.status, outcome.error = "broken", self.reason

    def _release(self, target: Target) -> None:
        self.go.wait()
        hold = self.holds.get(target.name)
        if hold is None:
            return
        if target.name in self.sent:
            _yield_to_writers()
        self.results[target.name], _ = call(self.adapters, "thaw", target,
                                            judge=self.judge, hold=hold)

    def fire(self, holds: dict[str, Hold], reason: str | None) -> list[Outcome]:
        """Release every held target now; their outcomes, in reverse config order."""
        self.holds, self.reason = dict(holds), reason
        held = [t for t in self.targets if t.name in self.holds]
        fired = time.monotonic()
        for target in held:
            release = self.holds[target.name].release
            if release is not None:
                try:
                    release.send()
                    self.sent.add(target.name)
                except Exception:  # its thaw hook finds out and reports it
                    log.debug("a prepared release failed to send", exc_info=True)
        self.go.set()
        outcomes = []
        for target in held:
            limit = hard_limit(target)
            self.threads[target.name].join(timeout=max(0.0, fired + limit - time.monotonic()))
            outcome = self.results.get(target.name) or Outcome(
                target.name, target.kind, "thaw", "failed", limit, abandoned=True,
                error=f"thaw did not return within {limit:g} s; abandoned")
            self.judge(outcome)  # an abandoned release was never judged in its thread
            outcomes.append(outcome)
        return outcomes


def _yield_to_writers() -> None:
    """Lower this thread's CPU priority: its target's release is written already, so what
    is left (reading the reply, checking the hold) must not take a CPU from the writers it
    has just let go. Linux sets a nice value per thread."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread,
                       min(19, os.getpriority(os.PRIO_PROCESS, thread) + YIELD_NICE))
    except (OSError, AttributeError):
        pass


def after_thaw(outcome: Outcome) -> str:
    """A thaw that failed leaves the target recorded as held, so the next thaw retries it."""
    return {"ok": runtime.RELEASED, "broken": runtime.BROKEN}.get(outcome.status, runtime.HELD)


# -- recovery ---------------------------------------------------------------------------


def recover(config: Config, adapters: Adapters, *, orphaned_by: int | None = None) -> Report:
    """Thaw with no holder alive: release what the record says is still held.

    The caller holds the single-holder lock (holder.take_lock), so no holder can start
    meanwhile. The holder died (killed, crashed, machine trouble) with targets held.
    Session-bound holds ended with it at an unknown moment, so they are reported as
    broken; server-kept states (a Redis pause, a MongoDB fsync lock) are released here
    through their adapters. With *orphaned_by* (the stand-in watchdog of that holder pid,
    after its deadline) only that holder's record is acted on; the release is reported as
    broken and left unacknowledged, so the operator's own thaw still reports it.
    """
    orphaned = orphaned_by is not None
    state = _record_to_recover(config, orphaned_by)
    pending = list(reversed(runtime.still_held(state)))
    if orphaned and not pending:
        return Report(ok=True, action="nothing-held", outcomes=[],
                      message="stand-in watchdog: nothing was held")
    pid = state.get("holder_pid", "?")
    outcomes = [_recover_one(config, adapters, entry, pid, orphaned) for entry in pending]
    ok = all(o.ok for o in outcomes)
    message = (f"no holder was alive; released {len(outcomes)} target(s) recorded as held"
               + ("" if ok else ": not every hold covered the window"))
    state.update(phase=runtime.CYCLE_RELEASED, released_by="watchdog" if orphaned else "recovery",
                 released_at=time.time(), acknowledged=not orphaned, message=message,
                 outcomes=[o.as_dict() for o in outcomes])
    runtime.write_state(config.runtime_dir, state)
    return Report(ok=ok, action="recovered", message=message,
                  outcomes=[o.as_dict() for o in outcomes])


def _record_to_recover(config: Config, orphaned_by: int | None) -> State:
    state = runtime.read_state(config.runtime_dir)
    if state is not None and not state.get("corrupt") and (
            orphaned_by is None or state.get("holder_pid") == orphaned_by):
        return state
    if orphaned_by is not None:  # nothing of its holder's is recorded (a later freeze's)
        return State(targets=[])
    # nothing trustworthy is recorded: every adapter releases what it can
    return State(holder_pid="?", targets=[  # type: ignore[typeddict-item]
        runtime.target_state(t.name, t.kind, runtime.HELD, session_bound=True)
        for t in config.targets])


def _recover_one(config: Config, adapters: Adapters, entry: runtime.TargetState, pid: Any,
                 orphaned: bool) -> Outcome:
    target = config.target(entry["name"])
    if target is None:
        return Outcome(entry["name"], entry["kind"], "thaw", "failed", 0.0,
                       error="recorded as held but no longer in the config; release it by hand")

    def judge(outcome: Outcome) -> None:  # before it is logged: log and report agree
        if outcome.status == "ok" and orphaned:
            outcome.status = "broken"
            outcome.error = (f"the holder (pid {pid}) had died; a stand-in watchdog released "
                             f"it after max_hold ({config.max_hold:g} s), before thaw came")
        elif outcome.status == "ok" and (entry["session_bound"]
                                         or entry["status"] == runtime.QUIESCING):
            outcome.status = "broken"
            outcome.error = (f"the holder (pid {pid}) died before thaw and its session ended "
                             f"with it, at an unknown time")
    # bounded like every phase: a server that hangs must not hang the post-script
    [(outcome, _)] = run_phase(adapters, "thaw", [target], judge=judge,
                               hold=Hold(session=None, facts=entry.get("facts") or {}))
    entry["status"] = after_thaw(outcome)
    return outcome
