"""Azure Backup's VMSnapshotLinux extension: its files, its validation, its behaviour.

Every rule here follows the extension's source (ScriptRunner.py, PluginHost.py,
handle.py), not its documentation where the two differ; see docs/azure.md.

What we install and why:

* ``/etc/azure/VMSnapshotScriptPluginConfig.json``, root, 0600 (the host refuses any
  group/other bit and an owner-execute bit with 317), UTF-8 without BOM (a BOM is 305),
  every key explicit with real JSON types (a string where a number or boolean belongs
  breaks the host in ways that are hard to see):
  - ``ScriptsExecutionPollTimeSeconds: 1``: the host notices a finished script only at
    its next poll (3 s by default), and the databases stay quiesced while it waits;
  - ``timeoutInSeconds``: covers the longest ``quiesce freeze`` waits (holder.freeze_budget),
    capped at the host's 1800; the host never kills a script at its timeout, it moves on;
  - ``continueBackupOnFailure: true``: if a database cannot be quiesced, a file-system
    consistent backup (reported as such) beats no backup at all;
  - ``fsFreezeEnabled: true``: the host's freeze makes every filesystem consistent and
    is what makes a snapshot of several disks atomic;
  - ``pre/postScriptNoOfRetries: 0``: the host never re-runs a script, it only logs.
* A pre-script and a post-script, root, 0700, POSIX sh (the host runs ``sh FILE`` and
  ignores the shebang), interpreters by absolute path, output to a log file (the host
  never reads its pipes, which fill at 64 KiB). The post-script holds the thaw report in
  memory until the databases are released, then appends it to its log.
"""

from __future__ import annotations

import configparser
import glob
import json
import math
import os
import pwd
import shlex
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import DoctorContext, Finding, Host, HostFile, HostOptions, InstallSettings, Rehearsal, Verdict
from .rehearsal import Timeline, freeze_and_snapshot, new_report
from .shell import freeze_command, signal_thaw, thaw_report

CONFIG_JSON = "/etc/azure/VMSnapshotScriptPluginConfig.json"
HOST_CONF = "/etc/azure/VMSnapshotPluginHost.conf"
WORKLOAD_CONF = "/etc/azure/workload.conf"
PRE_SCRIPT = "/etc/azure/quiesce-pre-script.sh"
POST_SCRIPT = "/etc/azure/quiesce-post-script.sh"
MAX_TIMEOUT = 1800
POLL_SECONDS = 1
WORKLOADS = ("oracle", "mysql", "mariadb", "postgres")
#: Where the Azure VM agent unpacks the extension (one directory per version).
EXTENSION_GLOB = "/var/lib/waagent/Microsoft.Azure.RecoveryServices.VMSnapshotLinux-*"
#: How long the extension's safefreeze keeps disks frozen after the pre-script, at most.
SAFEFREEZE_SECONDS = 60
#: The plugin host conf the extension ships in its own directory (main/).
SHIPPED_HOST_CONF = """[pre_post]
timeoutInSeconds: 1800
numberOfPlugins: 1
pluginName0: ScriptRunner
pluginPath0: /etc/azure
pluginConfigPath0: /etc/azure/VMSnapshotScriptPluginConfig.json
"""

CODES = {
    0: "Success", 300: "FailedPrepostPreScriptFailed", 301: "FailedPrepostPostScriptFailed",
    302: "FailedPrepostPreScriptNotFound", 303: "FailedPrepostPostScriptNotFound",
    304: "FailedPrepostPluginhostConfigParsing", 305: "FailedPrepostPluginConfigParsing",
    306: "FailedPrepostPreScriptPermissionError", 307: "FailedPrepostPostScriptPermissionError",
    308: "FailedPrepostPreScriptTimeout", 309: "FailedPrepostPostScriptTimeout",
    313: "FailedPrepostPluginhostConfigNotFound",
    314: "FailedPrepostPluginhostConfigPermissionError",
    316: "FailedPrepostPluginConfigNotFound", 317: "FailedPrepostPluginConfigPermissionError",
    310: "FailedPrepostPluginhostPreTimeout", 311: "FailedPrepostPluginhostPostTimeout",
    121: "FailedRetryableFsFreezeFailed", 2: "error",
}
#: Validation failures after which the host takes a file-system consistent backup and
#: records no health code (the JSON framework is simply not in effect).
NOT_CONFIGURED = {304, 305, 313, 314, 316}


def _digits(st: os.stat_result) -> str:
    return oct(st.st_mode)[-3:]  # the host's own test: last three octal digits


def _owner(st: os.stat_result) -> str:
    try:
        return pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        return str(st.st_uid)


@dataclass
class PluginConfig:
    """The JSON as the host reads it (with its defaults and quirks)."""

    pre: str
    post: str
    pre_params: list[str] = field(default_factory=list)
    post_params: list[str] = field(default_factory=list)
    timeout: float = 10
    poll: int = 3
    pre_retries: int = 0
    post_retries: int = 0
    continue_on_failure: Any = True
    fs_freeze: Any = True

    @property
    def freeze_enabled(self) -> bool:
        return not (self.fs_freeze == False)  # noqa: E712 - the host compares == False


def _verdict(code: int, message: str) -> Verdict:
    return Verdict(code, CODES.get(code, "error"), message)


def _plugin_config(data: dict, plugin_config_path: str, max_timeout: float) -> Verdict | PluginConfig:
    """The JSON's keys as the host reads them, with its defaults and its type quirks."""
    # The host reads timeoutInSeconds first; a bool is a number to its min() (True = 1).
    timeout = data.get("timeoutInSeconds", 10)
    if not isinstance(timeout, (int, float)):
        return _verdict(304, f"timeoutInSeconds is {timeout!r}; the host needs a number")
    try:
        config = PluginConfig(pre=str(data["preScriptLocation"]),
                              post=str(data["postScriptLocation"]))
    except KeyError as e:
        return _verdict(305, f"{plugin_config_path} lacks the mandatory key {e}")
    config.timeout = min(timeout, max_timeout)
    if "ScriptsExecutionPollTimeSeconds" in data:
        try:
            poll = int(data["ScriptsExecutionPollTimeSeconds"])
        except ValueError:  # caught by the host's get_config
            return _verdict(305, "ScriptsExecutionPollTimeSeconds is not a number")
        except TypeError:  # not caught there: PluginHost turns it into 304
            return _verdict(304, "ScriptsExecutionPollTimeSeconds has the wrong JSON type")
        if 1 <= poll <= 5:
            config.poll = poll  # out of range is silently ignored by the host
    try:  # each element str()-ed; a bare string is iterated per character, as by the host
        config.pre_params = [str(p) for p in data.get("preScriptParams", [])]
        config.post_params = [str(p) for p in data.get("postScriptParams", [])]
    except TypeError:
        return _verdict(304, "preScriptParams/postScriptParams must be JSON arrays")
    # Wrong types here pass validation and break the host only when a script fails;
    # they are kept as they are so the rehearsal can show exactly that (see quirks()).
    config.pre_retries = data.get("preScriptNoOfRetries", 0)
    config.post_retries = data.get("postScriptNoOfRetries", 0)
    config.continue_on_failure = data.get("continueBackupOnFailure", True)
    config.fs_freeze = data.get("fsFreezeEnabled", True)
    return config


class AzureHost(Host):
    name = "azure"
    description = "Azure Backup (VMSnapshotLinux extension): pre- and post-script"

    def __init__(self, root: str = "/", options: HostOptions | None = None, *,
                 owner: str | None = None):
        super().__init__(root, options)
        #: The owner the host demands. Not root: a rehearsal as another user checks
        #: against that user instead, and says so.
        self.owner = owner or pwd.getpwuid(os.geteuid()).pw_name
        self.plugin_config: PluginConfig | None = None

    # -- files ---------------------------------------------------------------------

    @classmethod
    def agent(cls) -> str | None:
        found = sorted(glob.glob(EXTENSION_GLOB))
        return found[-1] if found else None

    def render(self, settings: InstallSettings) -> list[HostFile]:
        timeout = min(MAX_TIMEOUT, math.ceil(settings.freeze_timeout))
        config = {
            "pluginName": "ScriptRunner",
            "preScriptLocation": PRE_SCRIPT,
            "postScriptLocation": POST_SCRIPT,
            "preScriptParams": [],
            "postScriptParams": [],
            "preScriptNoOfRetries": 0,
            "postScriptNoOfRetries": 0,
            "timeoutInSeconds": timeout,
            "continueBackupOnFailure": True,
            "fsFreezeEnabled": True,
            "ScriptsExecutionPollTimeSeconds": POLL_SECONDS,
        }
        q = shlex.quote
        header = ("# Generated by quiesce for Azure Backup (VMSnapshotLinux). Do not edit:\n"
                  "# change {config} and run `quiesce install azure` again.\n"
                  "# The host runs `sh <this file>` as root, ignores the shebang, never reads\n"
                  "# our output, and does not kill us at its timeout.\n"
                  ).format(config=settings.config)
        # Every line of a script's log starts with the time its message came (ISO 8601,
        # milliseconds; GNU date), so a multi-line report keeps the prefix on each line.
        log_fn = ("log() {\n"
                  "  [ -n \"$1\" ] || return 0\n"
                  "  now=$(date +%Y-%m-%dT%H:%M:%S.%3N%:z)\n"
                  "  printf '%s\\n' \"$1\" | while IFS= read -r line; do\n"
                  "    printf '%s %s\\n' \"$now\" \"$line\"\n"
                  "  done >>\"$2\"\n"
                  "}\n")
        pre = (f"#!/bin/sh\n{header}"
               "# Quiesce every target; a detached holder keeps them quiesced until the\n"
               "# post-script (or its watchdog, after max_hold) releases them.\n"
               "umask 077\n"
               f"{log_fn}"
               f"report=$({freeze_command(settings)} </dev/null 2>&1)\n"
               "status=$?\n"
               f"log \"$report\" {q(settings.log_dir + '/azure-pre-script.log')}\n"
               "exit $status\n")
        post = (f"#!/bin/sh\n{header}"
                "# Release every target. The shell's printf tells the holder at once (the FIFO\n"
                "# is on tmpfs; opened read-write it never blocks); Python then fetches the\n"
                "# report, held in memory until the targets are released, so nothing here\n"
                "# writes to a disk before they are.\n"
                "umask 077\n"
                f"{signal_thaw(settings)}\n{thaw_report(settings)}\n"
                f"{log_fn}"
                f"log \"$report\" {q(settings.log_dir + '/azure-post-script.log')}\n"
                "exit $status\n")
        return [HostFile(CONFIG_JSON, json.dumps(config, indent=2) + "\n", 0o600),
                HostFile(PRE_SCRIPT, pre, 0o700, shell=True),
                HostFile(POST_SCRIPT, post, 0o700, shell=True)]

    # -- validation, in the host's order ----------------------------------------------

    def predict(self) -> Verdict:
        return self.validate()

    def host_checks(self, context: DoctorContext) -> list[Finding]:
        config = context.config
        if config is None:
            return []
        findings = []
        if config.max_hold < 90:
            findings.append(Finding(
                "max_hold covers the host's freeze", True, warning=True,
                message=f"max_hold is {config.max_hold:g} s; the host may keep disks frozen up "
                        f"to {SAFEFREEZE_SECONDS} s after the pre-script, so the watchdog could "
                        f"release before the post-script"))
        return findings + self._wait_findings(config)

    def _wait_findings(self, config) -> list[Finding]:
        """A warning when `freeze` may outlast the host's wait for the pre-script (the JSON's
        timeout is capped at 1800 s): the host would snapshot before every target is held."""
        from ..holder import freeze_budget
        waits = self.plugin_config.timeout if self.plugin_config else None
        budget = freeze_budget(config)
        if not isinstance(waits, (int, float)) or budget <= waits:
            return []
        return [Finding("the host waits for freeze", True, warning=True, message=(
            f"freeze may take up to {budget:.0f} s (3 phases at 4 x timeout + 5 s each, then "
            f"the holder's acknowledgement; timeout {max(t.timeout for t in config.targets):g} "
            f"s), but the host waits only {waits:g} s for the pre-script and then snapshots "
            f"without the databases held; lower the largest timeout"))]

    def validate(self, extension_dir: str | None = None) -> Verdict:
        """The host's checks in its order: plugin host conf, plugin JSON, then the scripts."""
        found = self._host_conf(extension_dir)
        if isinstance(found, Verdict):
            return found
        plugin_config_path, max_timeout = found
        data = self._plugin_json(plugin_config_path)
        if isinstance(data, Verdict):
            return data
        config = _plugin_config(data, plugin_config_path, max_timeout)
        if isinstance(config, Verdict):
            return config
        self.plugin_config = config
        return self._scripts_verdict(config)

    def _host_conf(self, extension_dir: str | None) -> Verdict | tuple[str, float]:
        """VMSnapshotPluginHost.conf: where the plugin JSON is, and the longest timeout."""
        host_conf = self.path(HOST_CONF)
        if not os.path.isfile(host_conf):
            host_conf = os.path.join(extension_dir, "main", "VMSnapshotPluginHost.conf") \
                if extension_dir else None
        if host_conf is None:  # doctor: the extension ships a valid one in its directory
            return CONFIG_JSON, MAX_TIMEOUT
        if not os.path.isfile(host_conf):
            return _verdict(313, f"neither {HOST_CONF} nor the extension's own "
                                 f"main/VMSnapshotPluginHost.conf exists")
        st = os.stat(host_conf)
        perm = _digits(st)
        if perm[1] not in "04" or perm[2] not in "04" or _owner(st) != self.owner:
            return _verdict(314, f"{host_conf} has mode {perm} owner {_owner(st)}; the host "
                                 f"wants no group/other write and owner {self.owner}")
        try:
            parser = configparser.ConfigParser()
            parser.read(host_conf)
            section = parser["pre_post"]
            if int(section.get("numberOfPlugins", "0")) != 1 or \
                    section.get("pluginName0") != "ScriptRunner":
                return _verdict(304, f"{host_conf} loads plugins other than one ScriptRunner; "
                                     f"quiesce cannot predict what they do")
            return section["pluginConfigPath0"], min(int(section["timeoutInSeconds"]), MAX_TIMEOUT)
        except (KeyError, ValueError, configparser.Error) as e:
            return _verdict(304, f"{host_conf} cannot be parsed: {e}")

    def _plugin_json(self, plugin_config_path: str) -> Verdict | dict:
        """The plugin JSON, if the host would read it: present, owned and moded as it demands."""
        json_path = self.path(plugin_config_path)
        if not os.path.isfile(json_path):
            return _verdict(316, f"{plugin_config_path} does not exist: pre/post scripts are "
                                 f"not configured; run `quiesce install azure`")
        st = os.stat(json_path)
        perm = _digits(st)
        if int(perm[0]) % 2 == 1 or perm[1] != "0" or perm[2] != "0" or _owner(st) != self.owner:
            return _verdict(317, f"{plugin_config_path} has mode {perm} owner {_owner(st)}; the "
                                 f"host wants owner {self.owner}, no owner-execute and no "
                                 f"group/other bits (chmod 600)")
        try:
            with open(json_path, encoding="utf-8") as f:
                data = json.load(f)
        except ValueError as e:  # bad JSON, a BOM, trailing commas
            return _verdict(305, f"{plugin_config_path} is not valid JSON for the host: {e}")
        if not isinstance(data, dict):
            return _verdict(304, f"{plugin_config_path} must hold a JSON object")
        return data

    def _scripts_verdict(self, config: PluginConfig) -> Verdict:
        for script, missing, denied in ((config.pre, 302, 306), (config.post, 303, 307)):
            path = self.path(script)
            if not os.path.isfile(path):
                return _verdict(missing, f"{script} does not exist")
            st = os.stat(path)
            perm = _digits(st)
            if perm[1] != "0" or perm[2] != "0" or _owner(st) != self.owner:
                return _verdict(denied, f"{script} has mode {perm} owner {_owner(st)}; the host "
                                        f"wants owner {self.owner} and no group/other bits (chmod 700)")
        return _verdict(0, f"the host will run the pre- and post-script (timeout "
                           f"{config.timeout:g} s, poll every {config.poll} s)")

    def quirks(self) -> list[str]:
        """Values the host accepts but mishandles (call after validate)."""
        config, found = self.plugin_config, []
        if config is None:
            return found
        if not isinstance(config.continue_on_failure, int):  # bool is an int: True & 0 works
            found.append(f"continueBackupOnFailure is {config.continue_on_failure!r}, not a JSON "
                         f"boolean: the host crashes (code 2, no post-script) when a script fails")
        for key, value in (("preScriptNoOfRetries", config.pre_retries),
                           ("postScriptNoOfRetries", config.post_retries)):
            if isinstance(value, bool) or not isinstance(value, int):
                found.append(f"{key} is {value!r}, not an integer: when the script fails the "
                             f"host's worker dies and it waits 1800 s (code 310/311)")
        if not isinstance(config.fs_freeze, bool):
            found.append(f"fsFreezeEnabled is {config.fs_freeze!r}, not a JSON boolean: the host "
                         f"treats anything but false as true")
        return found

    def conflicts(self) -> list[str]:
        found = self.quirks()
        path = self.path(WORKLOAD_CONF)
        try:
            parser = configparser.ConfigParser()
            parser.read(path)
            workload = parser.get("workload", "workload_name", fallback="").strip()
        except configparser.Error:
            return found
        if workload in WORKLOADS:
            found.append(f"{WORKLOAD_CONF} sets workload_name = {workload}: the host then runs its own "
                    f"'enhanced' {workload} scripts and ignores {CONFIG_JSON} entirely. Remove or "
                    f"empty workload_name to let quiesce's scripts run")
        return found

    # -- rehearsal --------------------------------------------------------------------

    def _run_script(self, which: str, config: PluginConfig, cwd: str,
                    event: Callable[[str], None], interval: float) -> dict[str, Any]:
        """ScriptRunner.pre_script/post_script: `sh FILE params`, unread pipes, no kill.

        The host looks every ``config.poll`` s and gives up after ``timeout / poll``
        looks; we look every *interval* s but give up when the host would.
        """
        location = config.pre if which == "pre" else config.post
        params = config.pre_params if which == "pre" else config.post_params
        retries = config.pre_retries if which == "pre" else config.post_retries
        label = "Prescript" if which == "pre" else "Postscript"
        argv = ["sh", self.path(location), *params]
        poll_total = math.ceil(config.timeout / config.poll) * config.poll / interval
        started = time.monotonic()
        event(f"{which}-script started: {' '.join(argv)}")
        process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        timed_out, curr, count = False, 0, 0
        while True:
            while process.poll() is None:
                if curr >= poll_total:
                    event(f"{label} for ScriptRunner timed out.")
                    timed_out = True
                    break
                curr += 1
                time.sleep(interval)
            if process.returncode == 0 or timed_out:
                break
            if isinstance(retries, bool) or not isinstance(retries, int):
                # `cnt >= retries` raises TypeError in the host's worker thread; the host
                # then waits 1800 s for it and reports 310/311. We report at once.
                event(f"host worker thread crashed comparing {which}ScriptNoOfRetries {retries!r}")
                result = {"argv": argv, "pid": process.pid, "exit_status": process.returncode,
                          "code": 310 if which == "pre" else 311,
                          "seconds": round(time.monotonic() - started, 3)}
                result["name"] = CODES[result["code"]]
                return result
            if count >= retries:
                break
            event(f"{label} for ScriptRunner failed. Retrying...")
            count += 1
        result: dict[str, Any] = {"argv": argv, "pid": process.pid, "retries_logged": count,
                                  "seconds": round(time.monotonic() - started, 3)}
        if timed_out:  # the host does not kill it: it keeps running on its own
            result.update(code=308 if which == "pre" else 309, exit_status=None,
                          still_running=True)
        elif process.returncode != 0:
            event(f"{label} for ScriptRunner failed with error code: {process.returncode} .")
            result.update(code=300 if which == "pre" else 301, exit_status=process.returncode)
        else:
            event(f"{label} for ScriptRunner successfully executed.")
            result.update(code=0, exit_status=0)
        result["name"] = CODES[result["code"]]
        return result

    def _host_phase(self, which: str, config: PluginConfig, cwd: str,
                    event: Callable[[str], None], interval: float) -> dict[str, Any]:
        """PluginHost: run the script in a thread, noticing its end only at a poll."""
        box: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: box.update(self._run_script(which, config, cwd, event, interval)),
            daemon=True)
        thread.start()
        host_wait = (int(MAX_TIMEOUT / config.poll) + 2) * config.poll
        for _ in range(math.ceil(host_wait / interval)):
            time.sleep(interval)
            if not thread.is_alive():
                break
        if thread.is_alive():
            code = 310 if which == "pre" else 311
            box.update(code=code, name=CODES[code])
        event(f"host noticed the {which}-script's end")
        return box

    def rehearse(self, rehearsal: Rehearsal) -> dict[str, Any]:
        """Play the host: validate, pre, [freeze, snapshot, thaw], post; report its result."""
        event = Timeline(rehearsal.on_event)
        report = new_report(self.name, event)
        report.update(pre=None, post=None)
        if self.owner != "root":
            report["note"] = (f"not run as root: ownership is checked against {self.owner!r} "
                              f"where the host demands root")
        with tempfile.TemporaryDirectory(prefix="quiesce-azure-ext-") as extension_dir:
            os.makedirs(os.path.join(extension_dir, "main"))
            shipped = os.path.join(extension_dir, "main", "VMSnapshotPluginHost.conf")
            with open(shipped, "w") as f:
                f.write(SHIPPED_HOST_CONF)
            os.chmod(shipped, 0o644)  # as the extension ships it, whatever our umask
            verdict = self.validate(extension_dir)
            config = self.plugin_config
            event(f"validation: {verdict.code} {verdict.name}: {verdict.message}")
            report["validation"] = {"code": verdict.code, "name": verdict.name,
                                    "message": verdict.message}
            conflicts = self.conflicts()
            if conflicts:
                report["conflicts"] = conflicts
                event(f"conflict: {conflicts[0]}")
            continue_on_failure = config.continue_on_failure if config else True
            freeze_enabled = config.freeze_enabled if config else True
            script_codes: list[int] = []
            interval = rehearsal.poll_interval or (config.poll if config else 1)
            if verdict.code == 0:
                report["pre"] = pre = self._host_phase("pre", config, extension_dir, event, interval)
                do_backup = True
                if pre["code"] and not isinstance(continue_on_failure, int):
                    return self._crash(report, event, "pre")
                if pre["code"]:
                    script_codes.append(pre["code"])
                    do_backup = bool(continue_on_failure) and freeze_enabled
            elif verdict.code in NOT_CONFIGURED:
                do_backup = True
            else:  # 302/303/306/307/317: no scripts; snapshot unless told not to continue
                do_backup = bool(continue_on_failure) or verdict.code == 317
            snapshot_code = 0
            if do_backup:
                failed = freeze_and_snapshot(
                    rehearsal.snapshot, rehearsal.freeze_mounts if freeze_enabled else [],
                    rehearsal.allow_root_freeze, rehearsal.freeze_deadline, report, event)
                snapshot_code = {None: 0, "freeze": 121, "snapshot": 2}[failed]
            else:
                event("no snapshot: the host skips it")
            if verdict.code == 0:
                report["post"] = post = self._host_phase("post", config, extension_dir, event, interval)
                if post["code"] and not isinstance(continue_on_failure, int):
                    return self._crash(report, event, "post")
                if post["code"]:
                    script_codes.append(post["code"])
                    if not continue_on_failure or not freeze_enabled:
                        do_backup = False
        report.update(self._result(verdict, script_codes, do_backup, snapshot_code))
        event(f"result: {report['code']} {report['message']}")
        return report

    @staticmethod
    def _crash(report: dict[str, Any], event: Callable[[str], None], which: str) -> dict[str, Any]:
        """PluginHost AND-s continueBackup with a string: TypeError, the enable fails."""
        report.update(code=2, status="error", consistency="none", health_code=None,
                      health_name=None, message=f"the host crashed after the {which}-script "
                      f"failed: continueBackupOnFailure is not a JSON boolean")
        event(f"result: 2 {report['message']}")
        return report

    @staticmethod
    def _result(verdict: Verdict, script_codes: list[int], do_backup: bool,
                snapshot_code: int) -> dict[str, Any]:
        """handle.py's final decision: docs/azure.md, "What the host reports"."""
        if snapshot_code:
            return {"code": 2, "status": "error", "consistency": "none",
                    "health_code": snapshot_code, "health_name": CODES[snapshot_code],
                    "message": f"the freeze or snapshot failed: {CODES[snapshot_code]}"}
        first_error = next((c for c in [verdict.code, *script_codes] if c), 0)
        if not do_backup:
            return {"code": 2, "status": "error", "consistency": "none",
                    "health_code": first_error, "health_name": CODES[first_error],
                    "message": f"PreScript failed for the plugin ScriptRunner "
                               f"StatusCode.{CODES[first_error]},"}
        if first_error == 0:
            return {"code": 0, "status": "success", "consistency": "application",
                    "health_code": None, "health_name": None,
                    "message": "Enable Succeeded with App Consistent Snapshot"}
        health = None if verdict.code in NOT_CONFIGURED else first_error
        return {"code": 1, "status": "success", "consistency": "file-system",
                "health_code": health, "health_name": CODES[health] if health else None,
                "message": "Enable Succeeded with File System Consistent Snapshot"
                           + (f" StatusCode.{CODES[health]}," if health else "")}
