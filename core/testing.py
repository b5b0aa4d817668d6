"""The adapter conformance kit: the promises every adapter keeps, as pytest tests.

Load it explicitly in your adapter's test file (it is not a pytest plugin and pytest does
not load it by itself), subclass :class:`AdapterContract`, and give the subclass a
``harness`` fixture that returns an object implementing :class:`Harness`::

    import pytest
    from quiesce.testing import AdapterContract, BaseHarness

    class Harness(BaseHarness):
        kind = "example"
        ...

    class TestContract(AdapterContract):
        @pytest.fixture
        def harness(self, tmp_path):
            server = start_server(tmp_path)     # a running instance of the application
            yield Harness(server)
            server.stop()

Every ``test_*`` method of :class:`AdapterContract` checks one promise. A broken promise
fails with a message that starts with ``promise broken: <the promise>:`` and says what was
observed. A promise that the harness cannot exercise (no ``break_hold``, a flush-only
adapter without ``durable``) is skipped with the reason.

The kit calls the adapter the way the core does: through
:func:`quiesce.plugins.load_adapters` (so a third-party adapter is found through its entry
point, under its kind), each hook through the phase runner of :mod:`quiesce.phases`
(errors become values), ``check``, ``flush`` and ``quiesce`` on a worker thread and
``thaw`` on another thread, as the holder does, and ``freeze`` / ``thaw`` through the real
``quiesce`` command in a subprocess. This module needs pytest; the core does not.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import pytest

from .errors import QuiesceError
from .target import Hold
from .testing_kit import (_BARE_REPR, PROMISES, BaseHarness, Harness, Kit, PromiseBroken,
                          _adapters_for, _fmt, _gone, _json_report, _one_line, _outcome_for,
                          _wait, broken)

__all__ = ["AdapterContract", "BaseHarness", "Harness", "PROMISES", "PromiseBroken"]


class _LoadingCheckAndFlush:
    """The promises of loading, validate, check and flush (a part of AdapterContract)."""

    # -- loading and settings ------------------------------------------------------

    def test_adapter_is_loaded_for_its_kind(self, contract_kit):
        kit = contract_kit
        plugin = kit.adapters.pm.get_plugin(kit.harness.kind)
        hooks = {h.name for h in kit.adapters.pm.get_hookcallers(plugin) or ()}
        missing = [h for h in ("validate", "check", "quiesce", "thaw") if h not in hooks]
        if missing:
            raise broken("loaded", f"the adapter for kind {kit.harness.kind!r} implements no "
                                   f"{', '.join(missing)} hook (decorate them with "
                                   f"@quiesce.hookimpl)")

    def test_validate_reads_every_setting(self, contract_kit):
        target = contract_kit.target()
        unknown = target.unknown_keys()
        if unknown:
            raise broken("validate", f"validate did not read {', '.join(unknown)}: the core "
                                     f"reports settings nobody read as unknown keys")

    # -- check and flush -----------------------------------------------------------

    def test_check_takes_no_lock(self, contract_kit):
        kit = contract_kit
        target = kit.target()
        kit.ok("check", target)
        kit.require_writable("check", "right after check")
        # Writes must also commit while check runs: run it in a loop meanwhile.
        stop, outcomes = threading.Event(), []

        def loop():
            while not stop.is_set():
                outcomes.append(kit.call("check", target)[0])

        thread = threading.Thread(target=loop, name="check-loop", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + self.check_for
            writes = 0
            while writes < 3 or time.monotonic() < deadline:
                if not kit.writable():
                    raise broken("check", f"a write while check was running did not commit "
                                          f"within {_fmt(self.write_timeout)}")
                writes += 1
        finally:
            stop.set()
            thread.join(timeout=max(60.0, target.call_limit))
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise broken("cycle", f"check failed when run repeatedly: {failed[0].error}")

    def test_flush_leaves_nothing_locked(self, contract_kit):
        kit = contract_kit
        target = kit.target()
        kit.ok("check", target)
        kit.ok("flush", target)
        kit.require_writable("flush", "right after flush")

    def test_results_are_json_facts(self, contract_kit):
        kit = contract_kit
        target = kit.target()
        for hook in ("check", "flush"):
            self._json_facts(hook, kit.ok(hook, target))
        hold = kit.quiesce(target)  # checks that quiesce returns a Hold or None
        if not isinstance(hold.facts, dict):
            raise broken("facts", f"Hold.facts is a {type(hold.facts).__name__}, not a dict")
        self._json_facts("quiesce (Hold.facts)", hold.facts)
        outcome, result = kit.thaw_with_result(target, hold)
        if not outcome.ok:
            raise broken("writable", f"thaw was {outcome.status}: {outcome.error}")
        self._json_facts("thaw", result)

    @staticmethod
    def _json_facts(hook: str, facts: Any) -> None:
        if facts is None:
            return
        if not isinstance(facts, dict):
            raise broken("facts", f"{hook} returned {type(facts).__name__}, not a dict or None")
        try:
            json.dumps(facts)
        except (TypeError, ValueError) as e:
            raise broken("facts", f"{hook} returned facts that are not JSON-serialisable: {e}")



class _QuiesceAndThaw:
    """The promises of quiesce, thaw and errors (a part of AdapterContract)."""

    # -- quiesce and thaw ----------------------------------------------------------

    def test_quiesce_then_thaw_leaves_the_application_writable(self, contract_kit):
        kit = contract_kit
        target = kit.target()
        hold = kit.quiesce(target)
        outcome = kit.thaw(target, hold)
        if not outcome.ok:
            raise broken("writable", f"thaw after a normal hold was {outcome.status}: "
                                     f"{outcome.error}")
        kit.require_writable("writable", "right after thaw")

    def test_writes_are_blocked_while_held(self, contract_kit):
        kit = contract_kit
        target = kit.target()
        if kit.flush_only:
            if not kit.writable():
                raise broken("durable", "the harness could not write before quiesce")
        hold = kit.quiesce(target)
        if kit.flush_only:
            try:
                durable = kit.harness.durable()
            except NotImplementedError as e:
                pytest.skip(f"flush-only adapter and the harness has no durable(): {e}")
            if not durable:
                raise broken("durable", "a write committed before quiesce was not durable "
                                        "once quiesce returned")
        else:
            for attempt in range(2):  # at the start of the hold and a while into it
                if not kit.blocked():
                    raise broken("blocked", f"a write committed while the target was held "
                                            f"({'at the start' if attempt == 0 else 'later in'} "
                                            f"the hold)")
        outcome = kit.thaw(target, hold)
        if not outcome.ok:
            raise broken("writable", f"thaw was {outcome.status}: {outcome.error}")

    def test_thaw_is_idempotent(self, contract_kit):
        kit = contract_kit
        target = kit.target()
        hold = kit.quiesce(target)
        first = kit.thaw(target, hold)
        if not first.ok:
            raise broken("idempotent", f"the first thaw was {first.status}: {first.error}")
        after_first = kit.writable()

        def same_as_first() -> bool:
            # Blocked after the first thaw (the "writable" promise reports that) must stay
            # blocked; a short wait tells.
            return kit.writable() if after_first else kit.blocked()

        second = kit.thaw(target, hold)
        if second.status == "failed":
            raise broken("idempotent", f"a second thaw with the same hold failed: "
                                       f"{second.error}")
        if not same_as_first():
            raise broken("idempotent", "a second thaw with the same hold changed whether the "
                                       "application is writable")
        # What a thaw after a crash sees: only the facts, the session gone.
        third = kit.thaw(target, Hold(session=None, facts=dict(hold.facts)))
        if third.status == "failed":
            raise broken("idempotent", f"a thaw from the hold's facts after it was released "
                                       f"failed: {third.error}")
        if not same_as_first():
            raise broken("idempotent", "a thaw from the hold's facts after it was released "
                                       "changed whether the application is writable")

    def test_thaw_with_nothing_held_is_safe(self, contract_kit):
        kit = contract_kit
        target = kit.target()
        outcome = kit.thaw(target, Hold())
        if outcome.status == "failed":
            raise broken("nothing-held", f"thaw(target, Hold()) with nothing quiesced failed: "
                                         f"{outcome.error}")
        if not kit.writable():
            raise broken("nothing-held", f"after thaw(target, Hold()) with nothing quiesced a "
                                         f"write did not commit within {_fmt(self.write_timeout)}")

    def test_thaw_with_nothing_held_releases_nothing_it_did_not_take(self, contract_kit):
        kit = contract_kit
        if self.empty_thaw_releases:
            pytest.skip(self.empty_thaw_releases)
        if kit.flush_only:
            pytest.skip("flush-only adapter: it holds nothing another thaw could release")
        target = kit.target()
        hold = kit.quiesce(target)
        if not kit.blocked():
            raise broken("blocked", "a write committed while the target was held")
        # Reporting the other hold (a failed outcome) is fine; releasing it is not.
        kit.thaw(kit.target(), Hold())
        if not kit.blocked():
            raise broken("not-mine", "thaw(target, Hold()) released a hold that another "
                                     "quiesce had taken (set empty_thaw_releases to the reason "
                                     "if the adapter does this on purpose)")
        released = kit.thaw(target, hold)
        if not released.ok:
            raise broken("writable", f"thaw was {released.status}: {released.error}")

    def test_lost_session_is_reported_as_broken_hold(self, contract_kit):
        kit = contract_kit
        target = kit.target()
        hold = kit.quiesce(target)
        try:
            kit.harness.break_hold(hold)
        except NotImplementedError as e:
            pytest.skip(f"the harness cannot break a hold: {e}")
        outcome = kit.thaw(target, hold)
        if outcome.status != "broken":
            raise broken("broken-hold", f"thaw after the hold was broken was {outcome.status}"
                                        f"{': ' + outcome.error if outcome.error else ''}; it "
                                        f"must raise quiesce.HoldBroken")
        if not _one_line(outcome.error):
            raise broken("errors", f"HoldBroken's message is not one line: {outcome.error!r}")
        if not kit.writable():
            raise broken("writable", f"after thaw of a broken hold a write did not commit "
                                     f"within {_fmt(self.write_timeout)}")

    # -- errors --------------------------------------------------------------------

    def test_errors_are_values_that_name_the_target(self, contract_kit):
        kit = contract_kit
        target = kit.target(kit.harness.unreachable_target())
        for hook in ("check", "flush", "quiesce"):
            outcome, result = kit.call(hook, target)
            if isinstance(result, Hold):
                kit._holds.append((target, result))
            if outcome.ok:
                if hook == "flush" or (hook == "quiesce" and kit.flush_only):
                    continue  # nothing to do, so nothing to notice; check must fail
                raise broken("errors", f"{hook} on a target that points at nothing was ok"
                                       + (": a snapshot would count it as quiesced"
                                          if hook == "quiesce" else ""))
            if outcome.target != target.name:
                raise broken("errors", f"the outcome names {outcome.target!r}, not "
                                       f"{target.name!r}")
            if not _one_line(outcome.error) or _BARE_REPR.match(outcome.error or ""):
                raise broken("errors", f"{hook}'s error is not one line for the operator: "
                                       f"{outcome.error!r}")
            if outcome.duration > target.call_limit:
                raise broken("errors", f"{hook} took {_fmt(outcome.duration)} to fail; every "
                                       f"wait must be bounded by target.timeout "
                                       f"({_fmt(target.timeout)})")
            try:
                kit.adapters.call(hook, target)
            except QuiesceError:
                pass
            except Exception as e:
                raise broken("errors", f"{hook} let {type(e).__name__} escape ({e}); raise "
                                       f"quiesce.TargetError with a message that says what was "
                                       f"wrong and what to do") from e



class _TheCommand:
    """The promises of the real ``quiesce`` command (a part of AdapterContract)."""

    # -- the quiesce command -------------------------------------------------------

    def test_cli_freeze_then_thaw(self, contract_kit):
        kit = contract_kit
        target, config = kit.cli_config("cycle")
        try:
            freeze = kit.command(config, "freeze", "--json")
            report = _json_report(freeze, "cli", "quiesce freeze")
            if freeze.returncode != 0 or not report.get("ok"):
                raise broken("cli", f"`quiesce freeze` exited {freeze.returncode}: "
                                    f"{report.get('message')} {report.get('outcomes')}")
            if not kit.flush_only and not kit.blocked():
                raise broken("blocked", "a write committed while `quiesce freeze` held the "
                                        "target")
            thaw = kit.command(config, "thaw", "--json")
            report = _json_report(thaw, "cli", "quiesce thaw")
            outcome = _outcome_for(report, target.name)
            if thaw.returncode != 0 or outcome is None or outcome["status"] != "ok":
                raise broken("cli", f"`quiesce thaw` exited {thaw.returncode} with "
                                    f"{outcome or report.get('message')}")
            if not kit.writable():
                raise broken("writable", f"a write started right after `quiesce thaw` did not "
                                         f"commit within {_fmt(self.write_timeout)}")
        finally:
            kit.command(config, "thaw")

    def test_thaw_after_the_holder_died(self, contract_kit):
        kit = contract_kit
        target, config = kit.cli_config("holder-death")
        pid = None
        try:
            freeze = kit.command(config, "freeze", "--json")
            report = _json_report(freeze, "cli", "quiesce freeze")
            if freeze.returncode != 0 or not report.get("ok"):
                raise broken("cli", f"`quiesce freeze` exited {freeze.returncode}: "
                                    f"{report.get('message')} {report.get('outcomes')}")
            pid = report["holder_pid"]
            status = _json_report(kit.command(config, "status", "--json"), "cli",
                                  "quiesce status")
            [entry] = [t for t in status["state"]["targets"] if t["name"] == target.name]
            session_bound = entry["session_bound"]
            os.kill(pid, signal.SIGKILL)
            if not _wait(lambda: _gone(pid), 10):
                raise broken("holder-death", f"the holder (pid {pid}) outlived kill -9 by 10 s")
            if session_bound:
                if not _wait(lambda: kit.writable(0.2), self.release_bound, 0.1):
                    raise broken("holder-death", f"a session-bound hold must end when the holder "
                                                 f"dies: no write committed within "
                                                 f"{_fmt(self.release_bound)} after kill -9 of "
                                                 f"holder pid {pid}")
            elif not kit.flush_only and not kit.blocked():
                raise broken("holder-death", "the hold is recorded as server-kept, but writes "
                                             "commit once the holder is dead: the snapshot is "
                                             "not covered and thaw cannot know")
            thaw = kit.command(config, "thaw", "--json")
            report = _json_report(thaw, "holder-death", "quiesce thaw")
            outcome = _outcome_for(report, target.name)
            if outcome is None:
                raise broken("holder-death", f"`quiesce thaw` after the holder died does not "
                                             f"name target {target.name!r}: {report}")
            expected = (1, "broken") if session_bound else (0, "ok")
            if (thaw.returncode, outcome["status"]) != expected:
                kind = "session-bound" if session_bound else "server-kept"
                raise broken("holder-death", f"for a {kind} hold `quiesce thaw` must exit "
                                             f"{expected[0]} with {target.name} {expected[1]}; "
                                             f"it exited {thaw.returncode} with "
                                             f"{outcome['status']}: {outcome.get('error')}")
            if not kit.writable():
                raise broken("holder-death", f"after `quiesce thaw` a write did not commit "
                                             f"within {_fmt(self.write_timeout)}")
        finally:
            if pid is not None and not _gone(pid):
                os.kill(pid, signal.SIGKILL)
            kit.command(config, "thaw")


class AdapterContract(_LoadingCheckAndFlush, _QuiesceAndThaw, _TheCommand):
    """The promises every adapter keeps. Subclass it and provide a ``harness`` fixture.

    Each ``test_*`` method checks one promise of :data:`PROMISES`. The class attributes
    below tune the timing for a slow application; override them in the subclass. To mark
    one promise as a known failure, override its method and decorate it with
    ``pytest.mark.xfail(strict=True, reason=...)``, calling ``super()``.
    """

    #: A write that should commit gets this long (seconds).
    write_timeout: float = 2.0
    #: A write that should be blocked must not commit within this long (seconds).
    blocked_for: float = 0.5
    #: How long check runs in a loop while writes must still commit (seconds).
    check_for: float = 0.5
    #: A session-bound hold must end within this long after the holder is killed (seconds).
    release_bound: float = 10.0
    #: max_hold in the config file of the command-line promises (seconds).
    cli_max_hold: float = 60.0
    #: Set to a reason when ``thaw(target, Hold())`` deliberately releases server-kept state
    #: it did not take (crash recovery without facts); the "not-mine" promise is then
    #: skipped with that reason.
    empty_thaw_releases: str | None = None

    @pytest.fixture
    def harness(self):
        raise NotImplementedError(
            "define a `harness` fixture in your AdapterContract subclass that returns an "
            "object implementing quiesce.testing.Harness (see quiesce.testing.BaseHarness)")

    @pytest.fixture
    def contract_kit(self, harness, tmp_path):
        adapters, explicit = _adapters_for(harness)
        kit = Kit(harness, adapters, self, explicit, tmp_path)
        try:
            yield kit
        finally:
            kit.cleanup()
