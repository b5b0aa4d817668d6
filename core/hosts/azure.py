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

from ..thaw import FIFO_NAME
from . import Host, HostFile, InstallSettings, Verdict

CONFIG_JSON = "/etc/azure/VMSnapshotScriptPluginConfig.json"
HOST_CONF = "/etc/azure/VMSnapshotPluginHost.conf"
WORKLOAD_CONF = "/etc/azure/workload.conf"
PRE_SCRIPT = "/etc/azure/quiesce-pre-script.sh"
POST_SCRIPT = "/etc/azure/quiesce-post-script.sh"
MAX_TIMEOUT = 1800
POLL_SECONDS = 1
WORKLOADS = ("oracle", "mysql", "mariadb", "postgres")
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


class AzureHost(Host):
    name = "azure"

    def __init__(self, root: str = "/", *, owner: str | None = None):
        super().__init__(root)
        #: The owner the host demands. Not root: a rehearsal as another user checks
        #: against that user instead, and says so.
        self.owner = owner or pwd.getpwuid(os.geteuid()).pw_name
        self.plugin_config: PluginConfig | None = None

    # -- files ---------------------------------------------------------------------

    def files(self, settings: InstallSettings) -> list[HostFile]:
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
               f"report=$({q(settings.python)} -B -P -m quiesce --config {q(settings.config)} "
               "freeze </dev/null 2>&1)\n"
               "status=$?\n"
               f"log \"$report\" {q(settings.log_dir + '/azure-pre-script.log')}\n"
               "exit $status\n")
        fifo = q(f"{settings.runtime_dir}/{FIFO_NAME}")
        post = (f"#!/bin/sh\n{header}"
                "# Release every target. The shell's printf tells the holder at once (the FIFO\n"
                "# is on tmpfs; opened read-write it never blocks); Python then fetches the\n"
                "# report, held in memory until the targets are released, so nothing here\n"
                "# writes to a disk before they are.\n"
                "umask 077\n"
                f"[ -p {fifo} ] && printf 'thaw\\n' 1<>{fifo}\n"
                f"report=$({q(settings.python)} -I -S -B {q(settings.thaw_script)} "
                f"--config {q(settings.config)} </dev/null 2>&1)\n"
                "status=$?\n"
                f"{log_fn}"
                f"log \"$report\" {q(settings.log_dir + '/azure-post-script.log')}\n"
                "exit $status\n")
        return [HostFile(CONFIG_JSON, json.dumps(config, indent=2) + "\n", 0o600),
                HostFile(PRE_SCRIPT, pre, 0o700),
                HostFile(POST_SCRIPT, post, 0o700)]

    # -- validation, in the host's order ----------------------------------------------

    def validate(self, extension_dir: str | None = None) -> Verdict:
        host_conf = self.path(HOST_CONF)
        if not os.path.isfile(host_conf):
            host_conf = os.path.join(extension_dir, "main", "VMSnapshotPluginHost.conf") \
                if extension_dir else None
        if host_conf is None:  # doctor: the extension ships a valid one in its directory
            plugin_config_path, max_timeout = CONFIG_JSON, MAX_TIMEOUT
        else:
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
                plugin_config_path = section["pluginConfigPath0"]
                max_timeout = min(int(section["timeoutInSeconds"]), MAX_TIMEOUT)
            except (KeyError, ValueError, configparser.Error) as e:
                return _verdict(304, f"{host_conf} cannot be parsed: {e}")
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
        self.plugin_config = config
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
                    event: Callable[[str], None]) -> dict[str, Any]:
        """ScriptRunner.pre_script/post_script: `sh FILE params`, unread pipes, no kill."""
        location = config.pre if which == "pre" else config.post
        params = config.pre_params if which == "pre" else config.post_params
        retries = config.pre_retries if which == "pre" else config.post_retries
        label = "Prescript" if which == "pre" else "Postscript"
        argv = ["sh", self.path(location), *params]
        poll_total = config.timeout / config.poll
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
                time.sleep(config.poll)
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
                    event: Callable[[str], None]) -> dict[str, Any]:
        """PluginHost: run the script in a thread, noticing its end only at a poll."""
        box: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: box.update(self._run_script(which, config, cwd, event)),
                                  daemon=True)
        thread.start()
        for _ in range(int(MAX_TIMEOUT / config.poll) + 2):
            time.sleep(config.poll)
            if not thread.is_alive():
                break
        if thread.is_alive():
            code = 310 if which == "pre" else 311
            box.update(code=code, name=CODES[code])
        event(f"host noticed the {which}-script's end")
        return box

    def rehearse(self, *, snapshot, freeze_mounts: list[str] = (), allow_root_freeze: bool = False,
                 freeze_deadline: float = 60.0, on_event: Callable[[float, str], None] | None = None
                 ) -> dict[str, Any]:
        """Play the host: validate, pre, [freeze, snapshot, thaw], post; report its result."""
        t0 = time.monotonic()
        timeline: list[dict[str, Any]] = []

        def event(text: str) -> None:
            timeline.append({"t": round(time.monotonic() - t0, 4), "event": text})
            if on_event:
                on_event(timeline[-1]["t"], text)

        report: dict[str, Any] = {"host": self.name, "started_at": time.time(),
                                  "timeline": timeline, "pre": None,
                                  "post": None, "snapshot": None, "freeze": None}
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
            if verdict.code == 0:
                report["pre"] = pre = self._host_phase("pre", config, extension_dir, event)
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
                snapshot_code = self._freeze_and_snapshot(snapshot, freeze_mounts if freeze_enabled
                                                          else [], allow_root_freeze,
                                                          freeze_deadline, report, event)
            else:
                event("no snapshot: the host skips it")
            if verdict.code == 0:
                report["post"] = post = self._host_phase("post", config, extension_dir, event)
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

    def _freeze_and_snapshot(self, snapshot, mounts, allow_root, deadline, report, event) -> int:
        from .. import fsfreeze
        try:
            if mounts:
                with fsfreeze.freeze(mounts, deadline_seconds=deadline,
                                     allow_root=allow_root) as frozen:
                    event(f"froze {', '.join(frozen.mounts)} (watchdog thaws at +{deadline:g} s)")
                    event(f"snapshot: {snapshot.describe()}")
                    report["snapshot"] = snapshot.run()
                report["freeze"] = {"mounts": list(frozen.mounts),
                                    "frozen_at": frozen.frozen_at_wall,
                                    "thawed_at": frozen.thawed_at_wall,
                                    "frozen_for": round(frozen.frozen_for or 0, 4),
                                    "thawed_by_watchdog": frozen.thawed_by_watchdog}
                event(f"thawed {', '.join(frozen.mounts)}")
                if frozen.thawed_by_watchdog:
                    event("the freeze watchdog thawed before the snapshot ended")
                    return 121
            else:
                event(f"snapshot (no freeze): {snapshot.describe()}")
                report["snapshot"] = snapshot.run()
        except fsfreeze.FreezeError as e:
            event(f"freeze failed: {e}")
            report["freeze"] = {"error": str(e)}
            return 121
        if not report["snapshot"]["ok"]:
            event(f"snapshot failed: {report['snapshot']['error']}")
            return 2
        return 0

    @staticmethod
    def _result(verdict: Verdict, script_codes: list[int], do_backup: bool,
                snapshot_code: int) -> dict[str, Any]:
        """handle.py's final decision (azure-host.md §4.4)."""
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
