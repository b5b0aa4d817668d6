"""The machinery of the conformance kit (:mod:`quiesce.testing`): the promises, the
harness protocol, and the :class:`Kit` that calls an adapter the way the core does.

Kept apart from the tests themselves so each file reads as one thing: this one how an
adapter is driven, ``testing.py`` what it must do. Needs pytest, as the kit does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pluggy
import pytest

from . import hookspecs
from .phases import Outcome, call, run_phase
from .plugins import Adapters, load_adapters
from .target import Hold, Target


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

    __module__ = "quiesce.testing"  # its public home: pytest prints the class by it

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
    contract: Any  # the AdapterContract subclass: its timing attributes
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
