"""Calling one hook for many targets, each outcome kept as a value.

pluggy stops a 1:N call at the first exception; here every target gets its own call,
its own duration and its own result or error, so one failure never hides another.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .errors import HoldBroken, QuiesceError
from .logs import IN_REPORT
from .plugins import Adapters
from .target import Hold, Target

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one hook did to one target."""

    target: str
    kind: str
    phase: str
    status: str  # "ok" | "failed" | "broken"
    duration: float
    facts: dict[str, Any] | None = None
    error: str | None = None
    #: The call overran its hard limit and was left running in its thread.
    abandoned: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(error: BaseException) -> str:
    """One line for the operator; our own errors carry their message as is."""
    if isinstance(error, QuiesceError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def hard_limit(target: Target) -> float:
    """How long the core waits for one hook call before abandoning it.

    Adapters bound each wait by ``target.timeout``; a hook may take a few such steps
    (connect, then lock, then a statement), so the core allows several before it gives up.
    The Target owns the figure (:attr:`Target.call_limit`) so adapters can read it too.
    """
    return target.call_limit


def call(adapters: Adapters, hook: str, target: Target, *,
         judge: Callable[[Outcome], None] | None = None, **kwargs: Any) -> tuple[Outcome, Any]:
    """Call *hook* for *target*; never raises.

    *judge* may change the outcome (a release that worked, of a hold that had already
    broken, is "broken") before it is logged, so the log and the report say the same.
    """
    started = time.monotonic()
    result, error, status = None, None, "ok"
    try:
        result = adapters.call(hook, target, **kwargs)
    except HoldBroken as e:
        status, error = "broken", describe(e)
    except Exception as e:
        status, error = "failed", describe(e)
        log.debug("%s %s failed", hook, target.name, exc_info=True)
    duration = time.monotonic() - started
    facts = result.facts if isinstance(result, Hold) else result
    if facts is not None and not isinstance(facts, dict):
        facts = {"result": repr(facts)}
    if facts:  # a copy that JSON can carry: an adapter's datetime must not break a report
        facts = json.loads(json.dumps(facts, default=str))
    outcome = Outcome(target.name, target.kind, hook, status, duration, facts or None, error)
    if judge is not None:
        judge(outcome)
    status, error = outcome.status, outcome.error
    # A failure is a warning, a broken hold an error; the command's report already prints
    # them, so the console leaves them to it (logs.IN_REPORT).
    level = {"ok": logging.INFO, "failed": logging.WARNING}.get(status, logging.ERROR)
    log.log(level, "%s %s (%s): %s in %.1f ms%s", hook, target.name, target.kind, status,
            duration * 1000, f": {error}" if error else "", extra=IN_REPORT)
    return outcome, result


def run_phase(adapters: Adapters, hook: str, targets: list[Target], *,
              kwargs_for: Callable[[Target], dict[str, Any]] | None = None,
              finished: Callable[[Target], None] | None = None,
              **kwargs: Any) -> list[tuple[Outcome, Any]]:
    """Call *hook* for every target concurrently; results in the targets' order.

    *kwargs_for* adds per-target arguments (a thaw's hold). *finished* is told, in the
    call's thread, when a target's call has ended, however it ended (the lock gate).

    A call that overruns :func:`hard_limit` is reported as failed and abandoned: its
    thread may still finish, which is why a failed freeze ends the holder process.
    """
    if not targets:
        return []
    def one(target: Target, extra: dict[str, Any]) -> tuple[Outcome, Any]:
        try:
            return call(adapters, hook, target, **kwargs, **extra)
        finally:
            if finished is not None:
                finished(target)

    def run(future: Future, target: Target, extra: dict[str, Any]) -> None:
        try:
            future.set_result(one(target, extra))
        except BaseException as e:  # call() never raises; a KeyboardInterrupt might
            future.set_exception(e)

    # A thread per call that ends with it: a pool's idle workers would wake to exit only
    # when it is shut down, on the way from the locks to "ready".
    submitted = []
    for target in targets:
        future: Future = Future()
        threading.Thread(target=run, args=(future, target,
                                           kwargs_for(target) if kwargs_for else {}),
                         name=f"{hook}-{target.name}", daemon=True).start()
        submitted.append((target, future, time.monotonic()))
    # One wake-up when the last call ends (or the first hard limit passes), not one per
    # call: each wake-up of this thread would queue for the interpreter lock behind the
    # others, on the way from the locks to "ready".
    first_limit = min(started + hard_limit(target) for target, _, started in submitted)
    wait([future for _, future, _ in submitted],
         timeout=max(0.0, first_limit - time.monotonic()))
    results = []
    for target, future, started in submitted:
        limit = hard_limit(target)
        try:
            results.append(future.result(timeout=max(0.0, started + limit - time.monotonic())))
        except FutureTimeout:
            results.append((Outcome(target.name, target.kind, hook, "failed", limit,
                                    error=f"{hook} did not return within {limit:g} s; "
                                          f"abandoned", abandoned=True), None))
    return results
