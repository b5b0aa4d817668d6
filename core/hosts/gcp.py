"""Google Cloud guest-flush: the guest agent's snapshot listener runs pre.sh and post.sh.

Every rule follows GoogleCloudPlatform/guest-agent (google_guest_agent/
snapshot_listener.go, run/run.go, cfg/cfg.go, instance_setup.go); docs/hosts/gcp.md lists
each with its source.

What quiesce installs: ``/etc/google/snapshots/pre.sh`` and ``post.sh`` (root, 0700, in a
0700 directory), and ``[Snapshots] enabled = true`` plus ``timeout_in_seconds`` merged into
``/etc/default/instance_configs.cfg`` keeping every other line byte for byte.
"""

from __future__ import annotations

import configparser
import math
import os
import re
import signal
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from ..install import script_permissions
from . import (DoctorContext, Finding, Host, HostFile, HostOptions, InstallSettings, Rehearsal,
               Verdict, agent_version, option, under)
from .rehearsal import Timeline, conclude, new_report, run_script, snapshot_callback, validation
from .shell import freeze, header, thaw

SCRIPTS_DIR = "/etc/google/snapshots"
SCRIPTS_DIR_MODE = 0o700   # what the agent creates; install must create it the same way
PRE = SCRIPTS_DIR + "/pre.sh"
POST = SCRIPTS_DIR + "/post.sh"
CONFIG = "/etc/default/instance_configs.cfg"
#: Loaded after CONFIG, each overriding the one before (cfg.go defaultDataSources).
CONFIG_OVERRIDES = (CONFIG + ".distro", CONFIG + ".template")
SECTION = "Snapshots"
DEFAULTS = {"enabled": "false", "snapshot_service_ip": "169.254.169.254",
            "snapshot_service_port": "8081", "timeout_in_seconds": "60"}
AGENT = ("/usr/bin/google_guest_agent", "/usr/bin/gce_guest_agent")
FIRST_VERSION = 20200406   # the first release tag with snapshot_listener.go
DEDUP_SIZE = 128           # lru.New(128), one cache per operation type
TIMED_OUT = 124            # run.WithOutputTimeout's code for a deadline, "by convention"
NO_ERROR, SCRIPT_NOT_FOUND = "NO_ERROR", "SCRIPT_NOT_FOUND"
SCRIPT_TIMED_OUT, UNHANDLED = "SCRIPT_TIMED_OUT", "UNHANDLED_SCRIPT_ERROR"
TRUE = {"1", "t", "true", "y", "yes", "on"}  # go-ini's ParseBool spellings (case-folded)


# -- rendered files ---------------------------------------------------------------------


def render_scripts(settings: Any) -> list[HostFile]:
    how = ("The guest agent execs this file with the disk list (\"1/2,3/4\") as its one\n"
           "argument, kills it at timeout_in_seconds and reads its output to the end.")
    top = "#!/bin/sh\n" + header("Google Cloud guest-flush", settings, how) + "umask 077\n"
    return [HostFile(PRE, top + freeze(settings, "gcp-pre.log"), 0o700, shell=True),
            HostFile(POST, top + thaw(settings, "gcp-post.log", "disks $1: "), 0o700, shell=True)]


def wanted_config(freeze_budget: float) -> dict[str, str]:
    """The keys we set: a pre.sh killed before freeze returns would report a timeout."""
    return {"enabled": "true", "timeout_in_seconds": str(max(60, math.ceil(freeze_budget) + 5))}


# -- instance_configs.cfg merge and undo -------------------------------------------------

_HEADER = re.compile(r"^\s*\[([^\]]*)\]")


def _section_span(lines: list[str]) -> tuple[int, int] | None:
    """[header index, end) of the last [Snapshots] section (section names are case-folded)."""
    span = None
    for i, line in enumerate(lines):
        match = _HEADER.match(line)
        if match and match.group(1).strip().lower() == SECTION.lower():
            span = (i, len(lines))
        elif match and span and span[1] == len(lines) and i > span[0]:
            span = (span[0], i)
    return span


def _key_line(lines: list[str], span: tuple[int, int], key: str) -> int | None:
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*[=:]", re.IGNORECASE)
    found = [i for i in range(span[0] + 1, span[1]) if pattern.match(lines[i])]
    return found[-1] if found else None  # the last one wins


def merge_config(text: str, values: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Set *values* in [Snapshots]; returns the new text and what undo needs."""
    lines = text.splitlines(keepends=True)
    span = _section_span(lines)
    if span is None:
        added = ("" if not text or text.endswith("\n") else "\n") + ("\n" if text else "")
        added += f"[{SECTION}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
        return text + added, {"appended": added, "keys": {}}
    previous: dict[str, str | None] = {}
    unterminated = not text.endswith("\n")
    for key, value in values.items():
        index = _key_line(lines, span, key)
        previous[key] = lines[index] if index is not None else None
        if index is not None:
            lines[index] = f"{key} = {value}\n"
        else:
            end = span[1]
            while end > span[0] + 1 and not lines[end - 1].strip():
                end -= 1
            if not lines[end - 1].endswith("\n"):
                lines[end - 1] += "\n"
            lines.insert(end, f"{key} = {value}\n")
            span = (span[0], span[1] + 1)
    return "".join(lines), {"appended": None, "keys": previous, "unterminated": unterminated}


def undo_config(text: str, undo: dict[str, Any]) -> str:
    """Put back what :func:`merge_config` changed, leaving any other edit alone."""
    if undo.get("appended"):
        return text[:-len(undo["appended"])] if text.endswith(undo["appended"]) else text
    lines = text.splitlines(keepends=True)
    span = _section_span(lines)
    if span is None:
        return text
    for key, old in undo["keys"].items():
        index = _key_line(lines, span, key)
        if index is None:
            continue
        if old is None:
            del lines[index]
            span = (span[0], span[1] - 1)
        else:
            lines[index] = old
    text = "".join(lines)
    return text[:-1] if undo.get("unterminated") and text.endswith("\n") else text


def effective_config(root: str = "/") -> tuple[dict[str, str], list[str]]:
    """[Snapshots] as the agent reads it at start, and the files that set each key last."""
    values, origin = dict(DEFAULTS), {}
    for name in (CONFIG, *CONFIG_OVERRIDES):
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read(under(root, name), encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError):
            continue
        for section in parser.sections():
            if section.strip().lower() == SECTION.lower():
                for key, value in parser[section].items():
                    values[key], origin[key] = value.strip(), name
    return values, [f"{k}: {v}" for k, v in origin.items()]


# -- the snapshot listener ---------------------------------------------------------------


@dataclass
class SnapshotResponse:
    operation_id: int
    type: str                  # PRE_SNAPSHOT | POST_SNAPSHOT
    scripts_return_code: int
    agent_return_code: str
    blocked: bool = False      # a child kept the script's output pipe: the agent waited


class GuestAgentEmulator:
    """The agent's snapshot handler, running the real scripts under *root*."""

    def __init__(self, root: str = "/", *, timeout: float | None = None, pipe_grace: float = 5.0,
                 event: Callable[[str], None] = lambda text: None):
        self.root = root
        if timeout is None:
            timeout = int(effective_config(root)[0]["timeout_in_seconds"])
        self.timeout, self.pipe_grace, self.event = timeout, pipe_grace, event
        self.seen = {"PRE_SNAPSHOT": OrderedDict(), "POST_SNAPSHOT": OrderedDict()}

    def _duplicate(self, kind: str, operation_id: int) -> bool:
        seen = self.seen[kind]
        if operation_id in seen:
            seen.move_to_end(operation_id)  # a Get refreshes the LRU entry
            return True
        seen[operation_id] = operation_id
        if len(seen) > DEDUP_SIZE:
            seen.popitem(last=False)
        return False

    def run_script(self, path: str, disks: str) -> tuple[int, str, bool]:
        real = under(self.root, path)
        if not os.path.exists(real):
            return -1, SCRIPT_NOT_FOUND, False
        self.event(f"guest agent: {path} {disks}")
        # exec.CommandContext kills the script alone with SIGKILL, then still reads its pipes
        run = run_script([real, disks], timeout=self.timeout, kill=((signal.SIGKILL, 5.0),),
                         pipe_grace=self.pipe_grace)
        if run.returncode is None:
            return -1, UNHANDLED, False          # exec failed: not an *exec.ExitError
        code = run.returncode if run.returncode >= 0 else -1
        if run.timed_out or run.pipes_held:      # the deadline passed before Wait returned
            code = TIMED_OUT
        if code == TIMED_OUT:
            return code, SCRIPT_TIMED_OUT, run.pipes_held
        return code, (UNHANDLED if code else NO_ERROR), run.pipes_held

    def handle(self, operation_id: int, kind: str, disks: str) -> SnapshotResponse | None:
        """One request; None is no answer at all (a duplicate, or an unknown type)."""
        if kind not in self.seen or self._duplicate(kind, operation_id):
            return None
        code, agent, blocked = self.run_script(PRE if kind == "PRE_SNAPSHOT" else POST, disks)
        return SnapshotResponse(operation_id, kind, code, agent, blocked)

    def snapshot(self, operation_id: int, disks: str, *,
                 sync_freeze: Callable[[], Callable[[], None]] = lambda: (lambda: None),
                 snapshot: Callable[[], None] = lambda: None) -> dict[str, Any]:
        """A guest-flush snapshot: PRE, the snapshot only if PRE said NO_ERROR, then POST.
        *sync_freeze* stands in for the disks' own point in time (the agent freezes nothing)."""
        pre = self.handle(operation_id, "PRE_SNAPSHOT", disks)
        taken = False
        if pre is not None and pre.agent_return_code == NO_ERROR:
            thaw = sync_freeze()
            try:
                snapshot()
                taken = True
            finally:
                thaw()
        post = self.handle(operation_id, "POST_SNAPSHOT", disks)
        return {"pre": pre, "post": post, "snapshot_taken": taken}


# -- doctor -----------------------------------------------------------------------------


def parse_agent_version(output: str) -> int | None:
    match = re.search(r"(20\d{6})(?:\.\d+)?", output)
    return int(match.group(1)) if match else None


def check_agent(root: str = "/", version_output: str | None = None) -> Finding:
    found = [p for p in AGENT if os.path.isfile(under(root, p))]
    if not found:
        return Finding("guest agent", False, "google_guest_agent is not installed: install "
                                           "google-guest-agent")
    version = parse_agent_version(version_output or "")
    if version is not None and version < FIRST_VERSION:
        return Finding("guest agent", False, f"guest agent {version} predates the snapshot "
                                           f"listener ({FIRST_VERSION}): upgrade it")
    return Finding("guest agent", True, f"{found[0]}" + (f" version {version}" if version else ""))


def check_config(root: str = "/") -> Finding:
    values, origin = effective_config(root)
    if values.get("enabled", "").lower() not in TRUE:
        return Finding("config", False, f"[{SECTION}] enabled is not true in {CONFIG} (or a "
                                      f".distro/.template overrides it): run `quiesce install`")
    overridden = [o for o in origin if not o.endswith(CONFIG)]
    return Finding("config", True, "snapshots enabled; restart google-guest-agent after a "
                                 "change (it reads its config at start)"
                 + (f"; set last by {', '.join(overridden)}" if overridden else ""),
                 warning=bool(overridden))


def check_timeout(root: str, freeze_budget: float) -> Finding:
    try:
        timeout = int(effective_config(root)[0]["timeout_in_seconds"])
    except ValueError:
        return Finding("timeout", False, f"[{SECTION}] timeout_in_seconds is not a number")
    ok = freeze_budget < timeout
    return Finding("timeout", ok, f"quiesce freeze may take {freeze_budget:g} s; the agent "
                                f"kills pre.sh after {timeout} s"
                 + ("" if ok else ": raise timeout_in_seconds (quiesce install sets it)"))


def check_scripts(root: str, settings: Any) -> list[Finding]:
    """Each script is ours and safe; pre.sh sends its output to a file, so a holder it
    leaves behind neither holds the agent's pipe nor dies with the script at the timeout."""
    checks = []
    for file in render_scripts(settings):
        real = under(root, file.path)
        perm = script_permissions(real, file.path)
        if not perm.ok:
            checks.append(perm)
            continue
        with open(real, encoding="utf-8", errors="replace") as f:
            same = f.read() == file.content
        checks.append(Finding(os.path.basename(file.path), same,
                            f"{file.path} is what quiesce installs" if same else
                            f"{file.path} differs from what quiesce installs: "
                            f"run `quiesce install gcp --force`"))
    return checks


# -- the host ---------------------------------------------------------------------------

CODES = {0: "ScriptsRun", 1: "ScriptMissing", 2: "SnapshotsDisabled", 3: "UnsafePermissions"}


@dataclass
class GcpOptions(HostOptions):
    timeout: int = option(0, "The agent's timeout_in_seconds for the rehearsal [default, 0: "
                             "what the instance config under --root says].",
                          verbs=("rehearse",), metavar="SECONDS")
    disks: str = option("1/2", "The disk list the agent passes the scripts.",
                        verbs=("rehearse",), metavar="LIST")


class GcpHost(Host):
    name = "gcp"
    description = "Google Cloud guest-flush (guest agent's snapshot listener): pre.sh and post.sh"
    Options = GcpOptions
    agent_paths = AGENT
    options: GcpOptions

    def render(self, settings: InstallSettings) -> list[HostFile]:
        return render_scripts(settings)

    def install(self, settings: InstallSettings, *, force: bool = False) -> list[str]:
        """The scripts (in a 0700 directory, as the agent makes it), then the config merge;
        what the merge changed is kept in the manifest for uninstall."""
        from ..install import Installer
        directory = self.path(SCRIPTS_DIR)
        os.makedirs(directory, mode=SCRIPTS_DIR_MODE, exist_ok=True)
        os.chmod(directory, SCRIPTS_DIR_MODE)
        actions = super().install(settings, force=force)
        installer, path = Installer(self), self.path(CONFIG)
        text = _read(path)
        undo = installer.extra("config_undo")
        original = undo_config(text, undo) if undo else text
        created = bool(undo and undo.get("created")) or not os.path.exists(path)
        merged, undo = merge_config(original, wanted_config(settings.freeze_timeout))
        undo["created"] = created
        if merged != text:
            _write_keeping_mode(path, merged)
            actions.append(f"set [{SECTION}] {', '.join(wanted_config(settings.freeze_timeout))}"
                           f" in {path}")
            actions.append("NOTE: restart google-guest-agent: it reads its config only at start")
        installer.set_extra("config_undo", undo)
        return actions

    def uninstall(self, *, force: bool = False) -> list[str]:
        from ..install import Installer
        undo = Installer(self).extra("config_undo")
        actions = super().uninstall(force=force)
        path = self.path(CONFIG)
        if undo and os.path.exists(path):
            text = undo_config(_read(path), undo)
            if not text and undo.get("created"):
                os.unlink(path)
                actions.append(f"removed {path}: quiesce had created it")
            else:
                _write_keeping_mode(path, text)
                actions.append(f"undid quiesce's [{SECTION}] keys in {path}")
        return actions

    def predict(self) -> Verdict:
        """The agent's path: snapshots enabled, then each script found and runnable."""
        config = check_config(self.root)
        if not config.ok:
            return Verdict(2, CODES[2], config.message)
        for script in (PRE, POST):
            if not os.path.exists(self.path(script)):
                return Verdict(1, CODES[1], f"{script} is missing: the agent answers "
                                            f"{SCRIPT_NOT_FOUND}; run `quiesce install gcp`")
            found = script_permissions(self.path(script), script)
            if not found.ok:
                return Verdict(3, CODES[3], found.message)
        return Verdict(0, CODES[0], f"the agent runs {PRE} before the snapshot and {POST} after")

    def host_checks(self, context: DoctorContext) -> list[Finding]:
        from ..holder import freeze_budget
        from ..install import Installer
        version = agent_version(self.agent()) if self.root == "/" else ""
        findings = [check_agent(self.root, version)]
        if context.config is not None:
            findings.append(check_timeout(self.root, freeze_budget(context.config)))
        settings = Installer(self).manifest().get("settings")
        if settings:
            findings += check_scripts(self.root, InstallSettings(**settings))
        return findings

    def rehearse(self, rehearsal: Rehearsal) -> dict[str, Any]:
        """The snapshot listener: PRE_SNAPSHOT, the snapshot only after NO_ERROR, POST_SNAPSHOT;
        the same operation id again gets no answer."""
        event = Timeline(rehearsal.on_event)
        report = new_report(self.name, event)
        validation(report, event, self.predict())
        agent = GuestAgentEmulator(self.root, timeout=self.options.timeout or None, event=event)
        operation = int.from_bytes(os.urandom(4), "big")
        result = agent.snapshot(operation, self.options.disks,
                                snapshot=snapshot_callback(rehearsal, report, event))
        for kind in ("pre", "post"):
            answer = result[kind]
            report[kind] = answer and {"scripts_return_code": answer.scripts_return_code,
                                       "agent_return_code": answer.agent_return_code}
            event(f"{kind.upper()}_SNAPSHOT answer: " + (f"{answer.agent_return_code} "
                  f"({answer.scripts_return_code})" if answer else "none"))
        again = agent.handle(operation, "PRE_SNAPSHOT", self.options.disks)
        event(f"PRE_SNAPSHOT repeated with operation id {operation}: "
              + ("no answer (a duplicate)" if again is None else "answered again"))
        ok = all(result[k] and result[k].agent_return_code == NO_ERROR for k in ("pre", "post"))
        failure = next((f"{k}.sh: {result[k].agent_return_code if result[k] else 'no answer'}"
                        for k in ("pre", "post")
                        if not (result[k] and result[k].agent_return_code == NO_ERROR)), None)
        return conclude(report, event, rehearsal.runtime_dir, host_ok=ok,
                        host_says="NO_ERROR" if ok else failure, failure=failure)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _write_keeping_mode(path: str, text: str) -> None:
    from ..install import _write
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    _write(path, text, mode)
