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
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pluggy
import pytest

from . import hookspecs
from .errors import QuiesceError
from .phases import Outcome, call, hard_limit, run_phase
from .plugins import Adapters, load_adapters
from .target import Hold, Target

__all__ = ["AdapterContract", "BaseHarness", "Harness", "PROMISES", "PromiseBroken"]

#: Every promise the kit checks, by key; the text appears in each failure message.
PROMISES = {
    "loaded": "the adapter is loaded for its kind the way the core loads it",
    "cycle": "check, flush and quiesce succeed on a running application",
    "validate": "validate accepts a good target and reads every setting it was given",
    "check": "check takes no lock",
    "flush": "flush leaves nothing locked",
    "facts": "hooks return JSON-serialisable facts and quiesce returns a Hold",
    "writable": "thaw must leave the application writable",
    "blocked": "writes are blocked while held",
    "durable": "writes are made durable while held (flush-only adapter)",
    "idempotent": "thaw is idempotent",
    "nothing-held": "thaw is safe with nothing held",
    "not-mine": "thaw with nothing held releases nothing it did not take",
    "cli": "freeze and thaw through the quiesce command hold and release the target",
    "holder-death": ("thaw after the holder died tells the truth and leaves the application "
                     "writable"),
    "broken-hold": "a lost session is reported by thaw as a broken hold",
    "errors": "errors are values that name the target",
}


class PromiseBroken(AssertionError):
    """An adapter broke a promise of the contract; the message names it."""

    def __init__(self, promise: str, detail: str):
        self.promise = promise
        super().__init__(f"promise broken: {PROMISES[promise]}: {detail}")


def broken(promise: str, detail: str) -> PromiseBroken:
    return PromiseBroken(promise, detail)


class Harness(Protocol):
    """What the kit needs from an adapter author: the application, running, and a writer.

    Required:

    ``kind``
        The adapter's kind: its entry-point name (bundled adapters: their kind).
    ``target(**overrides) -> Target``
        A fresh :class:`quiesce.Target` of that kind pointing at the running application;
        *overrides* replace settings. The kit runs ``validate`` on it, as the core does.
    ``write(timeout) -> bool``
        Try one write from an independent client (not through the adapter). True if it
        committed within *timeout* seconds, False if it was still blocked then. Must not
        raise for a blocked write; must not leave anything locked when it gives up.
    ``unreachable_target() -> Target``
        A target with valid settings that points at nothing (a closed port, a missing
        file), for the error promises.

    Optional (:class:`BaseHarness` has the defaults):

    ``flush_only: bool``
        True when the adapter does not block writes while held (default False). Then the
        kit checks ``durable()`` instead of blocked writes.
    ``durable() -> bool``
        Flush-only adapters: True when every write this harness committed is on stable
        storage now (would be in a snapshot taken now). Raise NotImplementedError to skip.
    ``break_hold(hold) -> None``
        Make *hold* invalid the way real life does: kill the held session server-side,
        restart the server, let a server-side deadline pass. Raise NotImplementedError
        to skip the broken-hold promise.
    ``plugin``
        An adapter object (module or instance with ``@quiesce.hookimpl`` functions) to test
        without installing it: it is registered under ``kind`` on a fresh plugin manager.
        Default None: the adapter is loaded through its entry point, as in production.
        With a plugin that is not installed, the promises that run the ``quiesce``
        command are skipped.
    """

    kind: str

    def target(self, **overrides: Any) -> Target: ...

    def write(self, timeout: float) -> bool: ...

    def unreachable_target(self) -> Target: ...


class BaseHarness:
    """Defaults for the optional parts of :class:`Harness`; subclass it."""

    kind: str = ""
    flush_only: bool = False
    plugin: Any = None

    def target(self, **overrides: Any) -> Target:
        raise NotImplementedError("a harness must implement target(**overrides)")

    def write(self, timeout: float) -> bool:
        raise NotImplementedError("a harness must implement write(timeout)")

    def unreachable_target(self) -> Target:
        raise NotImplementedError("a harness must implement unreachable_target()")

    def durable(self) -> bool:
        raise NotImplementedError("this harness cannot tell whether writes are durable")

    def break_hold(self, hold: Hold) -> None:
        raise NotImplementedError("this harness cannot break a hold")


def _fmt(seconds: float) -> str:
    return f"{seconds:.1f} s"


def _one_line(error: str | None) -> bool:
    return bool(error and error.strip()) and "\n" not in error


_BARE_REPR = re.compile(r"^[A-Za-z_][\w.]*\(.*\)$")


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)  # a JSON string or number is a TOML basic string or number
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v, where)}"
                                for k, v in value.items()) + " }"
    raise TypeError(f"{where}: cannot write {value!r} to a TOML config file")


def write_config(directory: Path, target: Target, *, max_hold: float) -> Path:
    """A private config file for *target*, with runtime dir and log under *directory*."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"max_hold = {max_hold!r}",
             f"runtime_dir = {json.dumps(str(directory / 'run'))}",
             f"log_file = {json.dumps(str(directory / 'quiesce.log'))}",
             f"[targets.{json.dumps(target.name)}]",
             f"kind = {json.dumps(target.kind)}",
             f"timeout = {float(target.timeout)!r}"]
    for key, value in target.settings.items():
        lines.append(f"{json.dumps(key)} = {_toml_value(value, f'targets.{target.name}.{key}')}")
    path = directory / "quiesce.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


@dataclass
class Kit:
    """One test's view of the adapter: calls hooks the way the core does, cleans up."""

    harness: Any
    adapters: Adapters
    contract: AdapterContract
    explicit: bool
    tmp_path: Path
    _holds: list[tuple[Target, Hold]] = field(default_factory=list)

    # -- the application ---------------------------------------------------------

    @property
    def flush_only(self) -> bool:
        return bool(getattr(self.harness, "flush_only", False))

    def writable(self, timeout: float | None = None) -> bool:
        return bool(self.harness.write(self.contract.write_timeout if timeout is None
                                       else timeout))

    def blocked(self) -> bool:
        """True when a write does not commit within ``blocked_for`` seconds."""
        return not self.harness.write(self.contract.blocked_for)

    def require_writable(self, promise: str, when: str) -> None:
        timeout = self.contract.write_timeout
        if not self.writable(timeout):
            raise broken(promise, f"a write started {when} did not commit within {_fmt(timeout)}")

    # -- targets and hooks -------------------------------------------------------

    def target(self, target: Target | None = None, **overrides: Any) -> Target:
        """A harness target, validated as ``quiesce`` validates a config (settings read)."""
        target = target if target is not None else self.harness.target(**overrides)
        if target.kind != self.harness.kind:
            raise broken("validate", f"the harness made a target of kind {target.kind!r}, "
                                     f"not {self.harness.kind!r}")
        try:
            self.adapters.call("validate", target)
        except Exception as e:
            raise broken("validate", f"validate refused the harness's target {target.name!r} "
                                     f"({type(e).__name__}: {e})") from e
        return target

    def call(self, hook: str, target: Target, **kwargs: Any) -> tuple[Outcome, Any]:
        """One hook on a worker thread (as ``run_phase`` does), or thaw on this thread."""
        if hook == "thaw":
            return call(self.adapters, hook, target, **kwargs)
        [(outcome, result)] = run_phase(self.adapters, hook, [target], **kwargs)
        return outcome, result

    def ok(self, hook: str, target: Target, **kwargs: Any) -> Any:
        """Call *hook*; its failure on a running application breaks the "cycle" promise."""
        outcome, result = self.call(hook, target, **kwargs)
        if not outcome.ok:
            raise broken("cycle", f"{hook} on {target.name!r} was {outcome.status}: "
                                  f"{outcome.error}")
        return result

    def quiesce(self, target: Target) -> Hold:
        """check, flush and quiesce, as freeze does; teardown thaws what a test left held."""
        self.ok("check", target)
        self.ok("flush", target)
        hold = self.ok("quiesce", target)
        if hold is not None and not isinstance(hold, Hold):
            raise broken("facts", f"quiesce returned {type(hold).__name__}, not a "
                                  f"quiesce.Hold or None")
        hold = hold if hold is not None else Hold()
        self._holds.append((target, hold))
        return hold

    def thaw(self, target: Target, hold: Hold) -> Outcome:
        return self.thaw_with_result(target, hold)[0]

    def thaw_with_result(self, target: Target, hold: Hold) -> tuple[Outcome, Any]:
        outcome, result = self.call("thaw", target, hold=hold)
        if outcome.status != "failed":  # released (or reported broken): no cleanup needed
            self._holds = [(t, h) for t, h in self._holds if h is not hold]
        return outcome, result

    def cleanup(self) -> None:
        """Thaw whatever a failed test left quiesced (best effort; errors ignored)."""
        for target, hold in reversed(self._holds):
            try:
                self.adapters.call("thaw", target, hold=hold)
            except Exception:
                pass
        self._holds.clear()

    # -- the quiesce command ------------------------------------------------------

    def command(self, config: Path, *args: str,
                timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "quiesce", "--config", str(config), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def cli_config(self, name: str) -> tuple[Target, Path]:
        """A target and a private config file for it, for the ``quiesce`` command."""
        if self.explicit:
            listed = subprocess.run([sys.executable, "-m", "quiesce", "adapters", "--json"],
                                    capture_output=True, text=True, timeout=60,
                                    stdin=subprocess.DEVNULL)
            kinds = {a["kind"] for a in json.loads(listed.stdout or "[]")} \
                if listed.returncode == 0 else set()
            if self.harness.kind not in kinds:
                pytest.skip(f"the harness passes its adapter as a plugin object and kind "
                            f"{self.harness.kind!r} is not installed, so the quiesce command "
                            f"cannot load it; install the package (pip install -e .) to check "
                            f"this promise")
        target = self.target()
        return target, write_config(self.tmp_path / f"quiesce-{name}", target,
                                    max_hold=self.contract.cli_max_hold)


def _json_report(proc: subprocess.CompletedProcess, promise: str, what: str) -> dict:
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise broken(promise, f"`{what}` printed no JSON report (exit {proc.returncode}): "
                              f"{(proc.stdout + proc.stderr).strip()[-2000:]}") from None


def _outcome_for(report: dict, name: str, phase: str = "thaw") -> dict | None:
    return next((o for o in report.get("outcomes", ())
                 if o.get("target") == name and o.get("phase") == phase), None)


def _gone(pid: int) -> bool:
    """True when *pid* no longer runs (exited, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def _wait(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def _adapters_for(harness: Any) -> tuple[Adapters, bool]:
    kind = getattr(harness, "kind", "")
    if not kind:
        raise broken("loaded", "the harness has no kind")
    plugin = getattr(harness, "plugin", None)
    if plugin is not None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        try:
            pm.register(plugin, name=kind)
            pm.check_pending()
        except Exception as e:
            raise broken("loaded", f"the plugin object for kind {kind!r} cannot be registered: "
                                   f"{type(e).__name__}: {e}") from e
        return Adapters(pm, {kind: (f"plugin object {plugin!r}", "?")}, []), True
    adapters = load_adapters()
    if kind not in adapters.kinds():
        why = [w for w in adapters.warnings if repr(kind) in w]
        raise broken("loaded", f"no adapter is registered for kind {kind!r}"
                               + (f": {why[0]}" if why else
                                  f"; known kinds: {', '.join(adapters.kinds())}. Is the "
                                  f"package installed (pip install -e .) and its entry point "
                                  f"in the group quiesce.adapters named {kind!r}?"))
    return adapters, False


class AdapterContract:
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
            thread.join(timeout=max(60.0, hard_limit(target)))
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
            if outcome.duration > hard_limit(target):
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
