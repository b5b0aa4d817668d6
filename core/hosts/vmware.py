"""VMware Tools (vmtoolsd's vmbackup plugin) and Veeam's own pre-freeze/post-thaw scripts.

Every rule follows open-vm-tools ``services/plugins/vmbackup/`` (scriptOps.c,
stateMachine.c, vmBackupInt.h); docs/hosts/vmware.md lists each with its source.

What quiesce installs: one dispatcher in ``/etc/vmware-tools/backupScripts.d`` that
freezes on ``freeze`` and releases on ``thaw`` and ``freezeFail`` (vmtoolsd passes one
of the three as its first argument, and ``scriptArg`` from tools.conf as a second one,
which we ignore). For Veeam, two scripts without arguments the job uploads and runs.
"""

from __future__ import annotations

import configparser
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ConfigError
from ..install import script_permissions
from . import (DoctorContext, Finding, Host, HostFile, HostOptions, InstallSettings, Rehearsal,
               Verdict, agent_version, option, under)
from .rehearsal import (ScriptRun, Timeline, conclude, new_report, run_script, snapshot_callback,
                        snapshot_step, sync_freeze, validation)
from .shell import freeze, header, indent, thaw

SCRIPTS_DIR = "/etc/vmware-tools/backupScripts.d"
DISPATCHER = SCRIPTS_DIR + "/50-quiesce"
LEGACY_FREEZE = "/usr/sbin/pre-freeze-script"
LEGACY_THAW = "/usr/sbin/post-thaw-script"
TOOLS_CONF = "/etc/vmware-tools/tools.conf"
VMTOOLSD = ("/usr/bin/vmtoolsd", "/usr/sbin/vmtoolsd")
DEFAULT_TIMEOUT = 15 * 60     # GUEST_QUIESCE_DEFAULT_TIMEOUT_IN_SEC, vCenter's own limit
KILL = ((signal.SIGTERM, 5.0), (signal.SIGKILL, 15.0))  # ProcMgr_KillByPid
VEEAM_PRE = "quiesce-veeam-pre-freeze.sh"
VEEAM_POST = "quiesce-veeam-post-thaw.sh"
VEEAM_TIMEOUT = 10 * 60       # Veeam's default script timeout


# -- rendered files ---------------------------------------------------------------------


def render_dispatcher(settings: Any) -> HostFile:
    """The one script vmtoolsd runs: ``freeze`` freezes; ``thaw`` and ``freezeFail`` release."""
    how = ("vmtoolsd runs `\"<this file>\" freeze|thaw|freezeFail [scriptArg]` with /bin/sh,\n"
           "in name order for freeze and in reverse for thaw and freezeFail.")
    log = "vmware-backup-script.log"
    text = ("#!/bin/sh\n" + header("VMware Tools (vmbackup)", settings, how) +
            "umask 077\n"
            "case \"$1\" in\n"
            "freeze)\n" + indent(freeze(settings, log)) + "    ;;\n"
            "thaw|freezeFail)\n"
            "    # freezeFail: a later script, the file-system freeze or the timeout failed.\n"
            + indent(thaw(settings, log, "$1: ")) + "    ;;\n"
            "*)\n"
            "    echo \"usage: $0 freeze|thaw|freezeFail\" >&2\n"
            "    exit 2 ;;\n"
            "esac\n")
    return HostFile(DISPATCHER, text, 0o700, shell=True)


def render_veeam(settings: Any, output_dir: str) -> list[HostFile]:
    """Veeam's job-level scripts: run without arguments; success is exit 0."""
    how = "Veeam uploads this file and runs it without arguments; exit 0 is success."
    def script(name: str, body: str) -> HostFile:
        text = "#!/bin/sh\n" + header(f"Veeam ({name})", settings, how) + "umask 077\n" + body
        return HostFile(os.path.join(output_dir, name), text, 0o700, shell=True)
    return [script(VEEAM_PRE, freeze(settings, "veeam-pre-freeze.log")),
            script(VEEAM_POST, thaw(settings, "veeam-post-thaw.log"))]


# -- tools.conf -------------------------------------------------------------------------


@dataclass
class VmbackupConfig:
    """``[vmbackup]`` of tools.conf, with vmtoolsd's defaults and fallbacks."""

    exec_scripts: bool = True
    timeout: int = DEFAULT_TIMEOUT   # 0: no guest timeout
    script_arg: str | None = None
    excluded: list[str] = field(default_factory=list)


def _bool(value: str | None, default: bool) -> bool:
    # g_key_file_get_boolean accepts true/false/1/0 only; anything else is the default
    return {"true": True, "1": True, "false": False, "0": False}.get((value or "").strip(), default)


def read_tools_conf(root: str = "/") -> VmbackupConfig:
    parser = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",),
                                       comment_prefixes=("#",))
    parser.optionxform = str  # GKeyFile keys are case-sensitive
    try:
        parser.read(under(root, TOOLS_CONF), encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return VmbackupConfig()  # vmtoolsd ignores a config it cannot load
    section = parser["vmbackup"] if parser.has_section("vmbackup") else {}
    timeout = section.get("timeout")
    try:
        seconds = int(timeout) if timeout is not None else DEFAULT_TIMEOUT
    except ValueError:
        seconds = DEFAULT_TIMEOUT
    if seconds < 0 or seconds > 2**31 // 1000:
        seconds = DEFAULT_TIMEOUT  # VmBackupGetTimeout: out of range is the default
    excluded = [p.strip() for p in (section.get("excludedFileSystems") or "").split(",")]
    return VmbackupConfig(_bool(section.get("execScripts"), True), seconds,
                          section.get("scriptArg"), [p for p in excluded if p])


# -- the vmbackup state machine ----------------------------------------------------------


def script_list(root: str = "/") -> list[str]:
    """The freeze list: a legacy slot first (if either legacy script exists), then every
    regular file in backupScripts.d in strcmp order (subdirectories are skipped)."""
    scripts = []
    if os.path.isfile(under(root, LEGACY_FREEZE)) or os.path.isfile(under(root, LEGACY_THAW)):
        scripts.append(LEGACY_FREEZE)
    directory = under(root, SCRIPTS_DIR)
    names = sorted(os.listdir(directory), key=os.fsencode) if os.path.isdir(directory) else []
    scripts += [f"{SCRIPTS_DIR}/{n}" for n in names if os.path.isfile(f"{directory}/{n}")]
    return scripts


@dataclass
class VmbackupResult:
    """What vmtoolsd reports, and every script it ran, in order."""

    status: str   # ok | freeze-script-failed | sync-failed | timeout | thaw-script-failed
    runs: list[tuple[str, str, int | None]] = field(default_factory=list)
    snapshot_taken: bool = False
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _nothing() -> Callable[[], None]:
    return lambda: None


class VmbackupEmulator:
    """vmtoolsd's vmbackup for one quiesced snapshot, running the real scripts under *root*.

    *sync_freeze* is the sync driver: it freezes the file systems and returns their thaw
    (raising is a sync failure). *snapshot* is the host's snapshot. *kill* and the
    timeout are injectable so tests need not wait through vmtoolsd's real seconds.
    """

    def __init__(self, root: str = "/", *, config: VmbackupConfig | None = None,
                 kill=KILL, event: Callable[[str], None] = lambda text: None):
        self.root = root
        self.config = config or read_tools_conf(root)
        self.kill = kill
        self.event = event

    def _run(self, slot: str, op: str, deadline: float | None) -> ScriptRun:
        # scriptOps.c builds `"<path>" <op> ["<scriptArg>"]` and ProcMgr runs it with /bin/sh -c
        cmd = f'"{under(self.root, slot)}" {op}'
        if self.config.script_arg:
            cmd += f' "{self.config.script_arg}"'
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.event(f"vmtoolsd: {slot} {op}")
        return run_script(["/bin/sh", "-c", cmd], timeout=left, kill=self.kill, capture=False)

    def _path_for(self, slot: str, op: str) -> str | None:
        """The legacy slot holds post-thaw-script on the way back; absent files are skipped."""
        if slot == LEGACY_FREEZE and op != "freeze":
            slot = LEGACY_THAW
        return slot if os.path.isfile(under(self.root, slot)) else None

    def _backwards(self, scripts: list[str], start: int, op: str, result: VmbackupResult,
                   deadline: float | None) -> bool:
        """Run scripts[start], ..., scripts[0] with *op*; every one runs even after a
        failure (reported at the end). The timeout stops the rest. False: one failed."""
        ok = True
        for slot in reversed(scripts[:start + 1]):
            path = self._path_for(slot, op)
            if path is None:
                continue
            run = self._run(path, op, deadline)
            result.runs.append((path, op, run.returncode))
            if run.timed_out:
                result.status, result.message = "timeout", f"{path} {op} killed at the timeout"
                return False
            ok = ok and run.returncode == 0
        return ok

    def run(self, *, sync_freeze: Callable[[], Callable[[], None]] = _nothing,
            snapshot: Callable[[], None] = lambda: None) -> VmbackupResult:
        scripts = script_list(self.root) if self.config.exec_scripts else []
        started = time.monotonic()
        deadline = started + self.config.timeout if self.config.timeout else None
        result = VmbackupResult("ok")
        for index, slot in enumerate(scripts):
            path = self._path_for(slot, "freeze")
            if path is None:
                continue
            run = self._run(path, "freeze", deadline)
            result.runs.append((path, "freeze", run.returncode))
            if run.timed_out or run.returncode != 0:
                # the failed script gets no freezeFail: the index moves back first
                result.status = "timeout" if run.timed_out else "freeze-script-failed"
                result.message = f"{path} freeze " + ("killed at the timeout" if run.timed_out
                                                      else f"exited {run.returncode}")
                self._backwards(scripts, index - 1, "freezeFail", result, None)
                return result
        return self._freeze_and_thaw(scripts, deadline, sync_freeze, snapshot, result)

    def _freeze_and_thaw(self, scripts, deadline, sync_freeze, snapshot,
                         result: VmbackupResult) -> VmbackupResult:
        try:
            thaw = sync_freeze()
        except Exception as e:  # noqa: BLE001 - any sync driver failure is SYNC_ERROR
            result.status, result.message = "sync-failed", f"file-system freeze failed: {e}"
            self._backwards(scripts, len(scripts) - 1, "freezeFail", result, None)
            return result
        try:
            snapshot()
        finally:
            thaw()
        if deadline is not None and time.monotonic() > deadline:
            # the abort timer fired while frozen: undo the freeze, run freezeFail scripts
            result.status, result.message = "timeout", "the snapshot outlasted the timeout"
            self._backwards(scripts, len(scripts) - 1, "freezeFail", result, None)
            return result
        result.snapshot_taken = True
        if not self._backwards(scripts, len(scripts) - 1, "thaw", result, deadline) \
                and result.status == "ok":
            result.status, result.message = "thaw-script-failed", "a thaw script failed"
        return result


# -- doctor -----------------------------------------------------------------------------


def parse_vmtoolsd_version(output: str) -> str | None:
    """``vmtoolsd --version``: "VMware Tools daemon, version 12.3.5.46049 (build-...)"."""
    match = re.search(r"version\s+(\d+(?:\.\d+)+)", output)
    return match.group(1) if match else None


def check_vmtoolsd(root: str = "/", version_output: str | None = None) -> Finding:
    found = [p for p in VMTOOLSD if os.path.isfile(under(root, p))]
    if not found:
        return Finding("vmtoolsd", False, "vmtoolsd is not installed: install open-vm-tools")
    version = parse_vmtoolsd_version(version_output or "")
    return Finding("vmtoolsd", True, f"{found[0]} {('version ' + version) if version else ''}".strip())


def check_exec_scripts(config: VmbackupConfig) -> Finding:
    if not config.exec_scripts:
        return Finding("execScripts", False, f"{TOOLS_CONF} [vmbackup] execScripts is false: "
                                           f"vmtoolsd runs no script; remove it or set it true")
    return Finding("execScripts", True, "vmtoolsd runs backup scripts (execScripts)")


def check_neighbours(root: str = "/") -> Finding:
    """Legacy scripts and other backupScripts.d files run around ours; a non-executable
    one fails with 126 under /bin/sh and aborts the quiesced snapshot."""
    others = [s for s in script_list(root) if s != DISPATCHER]
    legacy = [p for p in (LEGACY_FREEZE, LEGACY_THAW) if os.path.isfile(under(root, p))]
    others = [s for s in others if s != LEGACY_FREEZE] + legacy
    broken = [s for s in others if not os.access(under(root, s), os.X_OK)]
    if broken:
        return Finding("other scripts", False, f"{', '.join(broken)} not executable: vmtoolsd "
                                             f"runs it anyway, it fails and aborts the snapshot")
    if others:
        return Finding("other scripts", True, f"also run around quiesce: {', '.join(others)}",
                     warning=True)
    return Finding("other scripts", True, "no other backup script runs")


def check_permissions(root: str = "/") -> Finding:
    return script_permissions(under(root, DISPATCHER), DISPATCHER)


def check_timeout(config: VmbackupConfig, freeze_budget: float, max_hold: float) -> Finding:
    name = "timeout"
    if not config.timeout:
        return Finding(name, True, "[vmbackup] timeout is 0: vmtoolsd never cancels; vCenter "
                                 f"still gives up after {DEFAULT_TIMEOUT} s", warning=True)
    if freeze_budget >= config.timeout:
        return Finding(name, False, f"quiesce freeze may take {freeze_budget:g} s, not within "
                                  f"vmtoolsd's timeout of {config.timeout} s: lower the "
                                  f"targets' timeouts or raise [vmbackup] timeout")
    if max_hold > config.timeout:
        return Finding(name, True, f"max_hold {max_hold:g} s outlasts vmtoolsd's timeout "
                                 f"{config.timeout} s; vmtoolsd cancels and runs freezeFail "
                                 f"first", warning=True)
    return Finding(name, True, f"freeze ({freeze_budget:g} s) and max_hold ({max_hold:g} s) "
                             f"fit vmtoolsd's timeout of {config.timeout} s")


def check_veeam_timeout(freeze_budget: float, timeout: float = VEEAM_TIMEOUT) -> Finding:
    ok = freeze_budget < timeout
    return Finding("veeam timeout", ok, f"quiesce freeze may take {freeze_budget:g} s; "
                                      f"the job's script timeout is {timeout:g} s"
                                      + ("" if ok else ": raise it in the job's settings"))


# -- the hosts --------------------------------------------------------------------------

CODES = {0: "ScriptsRun", 1: "DispatcherMissing", 2: "ScriptsDisabled", 3: "UnsafePermissions",
         4: "OtherScriptFails"}


@dataclass
class VmwareOptions(HostOptions):
    timeout: int = option(-1, "vmtoolsd's [vmbackup] timeout in seconds for the rehearsal "
                              "[default, -1: what tools.conf under --root says].",
                          verbs=("rehearse",), metavar="SECONDS")
    kill_grace: float = option(5.0, "Seconds vmtoolsd waits after SIGTERM before SIGKILL at "
                                    "the timeout.", verbs=("rehearse",), metavar="SECONDS")


class VmwareHost(Host):
    name = "vmware"
    description = ("VMware Tools (vSphere quiesced snapshots, Veeam and other vSphere backups): "
                   "backupScripts.d dispatcher")
    Options = VmwareOptions
    agent_paths = VMTOOLSD
    options: VmwareOptions

    def render(self, settings: InstallSettings) -> list[HostFile]:
        return [render_dispatcher(settings)]

    def predict(self) -> Verdict:
        """vmtoolsd's rules in its order: scripts enabled, ours runnable, none fails first."""
        if not os.path.isfile(self.path(DISPATCHER)):
            return Verdict(1, CODES[1], f"{DISPATCHER} is missing: run `quiesce install vmware`")
        for code, found in ((2, check_exec_scripts(read_tools_conf(self.root))),
                            (3, check_permissions(self.root)), (4, check_neighbours(self.root))):
            if not found.ok:
                return Verdict(code, CODES[code], found.message)
        order = ", ".join(script_list(self.root))
        return Verdict(0, CODES[0], f"vmtoolsd runs {order} with freeze, then in reverse with "
                                    f"thaw (freezeFail if the quiesce fails)")

    def host_checks(self, context: DoctorContext) -> list[Finding]:
        from ..holder import freeze_budget
        version = agent_version(self.agent()) if self.root == "/" else ""
        findings = [check_vmtoolsd(self.root, version), check_neighbours(self.root)]
        if context.config is not None:
            findings.append(check_timeout(read_tools_conf(self.root), freeze_budget(context.config),
                                          context.config.max_hold))
        return findings

    def rehearse(self, rehearsal: Rehearsal) -> dict[str, Any]:
        """vmbackup: freeze scripts, the file-system freeze and snapshot, thaw scripts."""
        event = Timeline(rehearsal.on_event)
        report = new_report(self.name, event)
        validation(report, event, self.predict())
        config = read_tools_conf(self.root)
        if self.options.timeout >= 0:
            config.timeout = self.options.timeout
        grace = self.options.kill_grace
        emulator = VmbackupEmulator(self.root, config=config, event=event,
                                    kill=((signal.SIGTERM, grace), (signal.SIGKILL, grace)))
        result = emulator.run(sync_freeze=sync_freeze(rehearsal, report, event),
                              snapshot=lambda: snapshot_step(rehearsal.snapshot, report, event))
        report["vmbackup"] = {"status": result.status, "message": result.message,
                              "runs": [{"script": s, "op": op, "exit": code}
                                       for s, op, code in result.runs]}
        says = "quiesced snapshot" if result.ok else f"quiesce failed: {result.message}"
        event(f"vmtoolsd reports: {says}")
        return conclude(report, event, rehearsal.runtime_dir, host_ok=result.ok, host_says=says,
                        failure=None if result.ok else result.message)


@dataclass
class VeeamOptions(HostOptions):
    output: str = option("", "The directory for the job's pre-freeze and post-thaw scripts "
                             "[doctor, rehearse, uninstall: where install wrote them].",
                         metavar="DIR")
    timeout: float = option(float(VEEAM_TIMEOUT), "The job's script timeout in seconds.",
                            verbs=("doctor", "rehearse"), metavar="SECONDS")


class VeeamHost(Host):
    """Veeam's job-level scripts: uploaded over SSH and run without arguments."""

    name = "veeam"
    description = ("Veeam job scripts (run over SSH, no agent on the machine): pre-freeze and "
                   "post-thaw scripts written to --output")
    Options = VeeamOptions
    options: VeeamOptions

    def output(self) -> str:
        if self.options.output:
            return os.path.abspath(self.options.output)
        from ..install import Installer
        installed = [f for f in Installer(self).manifest()["files"] if f.endswith(VEEAM_PRE)]
        if not installed:
            raise ConfigError("veeam needs --output DIR: the directory for the job's "
                              "pre-freeze and post-thaw scripts")
        return os.path.dirname(installed[0])

    def render(self, settings: InstallSettings) -> list[HostFile]:
        return render_veeam(settings, self.output())

    def scripts(self) -> tuple[str, str]:
        return os.path.join(self.output(), VEEAM_PRE), os.path.join(self.output(), VEEAM_POST)

    def predict(self) -> Verdict:
        for script in self.scripts():
            found = script_permissions(self.path(script), script)
            if not found.ok:
                return Verdict(1, "ScriptNotRunnable", found.message)
        return Verdict(0, "ScriptsReady", "the job's pre-freeze and post-thaw scripts are in "
                                          f"{self.output()}: point the job at them")

    def host_checks(self, context: DoctorContext) -> list[Finding]:
        from ..holder import freeze_budget
        if context.config is None:
            return []
        return [check_veeam_timeout(freeze_budget(context.config), self.options.timeout)]

    def rehearse(self, rehearsal: Rehearsal) -> dict[str, Any]:
        """The job: pre-freeze script; on exit 0 the snapshot; then the post-thaw script."""
        event = Timeline(rehearsal.on_event)
        report = new_report(self.name, event)
        validation(report, event, self.predict())
        pre, post = (self.path(s) for s in self.scripts())
        event(f"veeam: {pre}")
        first = run_script([pre], timeout=self.options.timeout)
        report["pre"] = {"exit": first.returncode, "timed_out": first.timed_out}
        if first.returncode != 0 or first.timed_out:
            says = f"pre-freeze script failed (exit {first.returncode})"
            event(f"veeam: {says}; no snapshot")
            return conclude(report, event, rehearsal.runtime_dir, host_ok=False,
                            host_says=says, failure=says)
        snapshot_callback(rehearsal, report, event)()
        event(f"veeam: {post}")
        second = run_script([post], timeout=self.options.timeout)
        report["post"] = {"exit": second.returncode, "timed_out": second.timed_out}
        ok = second.returncode == 0 and not second.timed_out
        says = "success" if ok else f"post-thaw script failed (exit {second.returncode})"
        return conclude(report, event, rehearsal.runtime_dir, host_ok=ok, host_says=says,
                        failure=None if ok else says)
