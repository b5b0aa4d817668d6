"""The rehearsal of Azure Backup: the extension's PluginHost and ScriptRunner played around a
real freeze and a snapshot step, with the decision table of handle.py (docs/azure.md,
"Rehearsal" and "What the host reports")."""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from . import Rehearsal, Verdict
from .azure_rules import CODES, MAX_TIMEOUT, NOT_CONFIGURED, SHIPPED_HOST_CONF, PluginConfig
from .rehearsal import Timeline, freeze_and_snapshot, new_report

if TYPE_CHECKING:
    from .azure import AzureHost


def rehearse(host: AzureHost, rehearsal: Rehearsal) -> dict[str, Any]:
    """Play the host: validate, pre, [freeze, snapshot, thaw], post; report its result."""
    event = Timeline(rehearsal.on_event)
    report = new_report(host.name, event)
    report.update(pre=None, post=None)
    if host.owner != "root":
        report["note"] = (f"not run as root: ownership is checked against {host.owner!r} "
                          f"where the host demands root")
    with tempfile.TemporaryDirectory(prefix="quiesce-azure-ext-") as extension_dir:
        _ship_host_conf(extension_dir)
        verdict = host.validate(extension_dir)
        config = host.plugin_config
        event(f"validation: {verdict.code} {verdict.name}: {verdict.message}")
        report["validation"] = {"code": verdict.code, "name": verdict.name,
                                "message": verdict.message}
        conflicts = host.conflicts()
        if conflicts:
            report["conflicts"] = conflicts
            event(f"conflict: {conflicts[0]}")
        continue_on_failure = config.continue_on_failure if config else True
        freeze_enabled = config.freeze_enabled if config else True
        script_codes: list[int] = []
        interval = rehearsal.poll_interval or (config.poll if config else 1)
        if verdict.code == 0:
            report["pre"] = pre = _host_phase(host.path, "pre", config, extension_dir, event,
                                              interval)
            do_backup = True
            if pre["code"] and not isinstance(continue_on_failure, int):
                return _crash(report, event, "pre")
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
            report["post"] = post = _host_phase(host.path, "post", config, extension_dir, event,
                                                interval)
            if post["code"] and not isinstance(continue_on_failure, int):
                return _crash(report, event, "post")
            if post["code"]:
                script_codes.append(post["code"])
                if not continue_on_failure or not freeze_enabled:
                    do_backup = False
    report.update(_result(verdict, script_codes, do_backup, snapshot_code))
    event(f"result: {report['code']} {report['message']}")
    return report


def _ship_host_conf(extension_dir: str) -> None:
    """The plugin host conf in the extension's own directory, as the extension ships it."""
    os.makedirs(os.path.join(extension_dir, "main"))
    shipped = os.path.join(extension_dir, "main", "VMSnapshotPluginHost.conf")
    with open(shipped, "w") as f:
        f.write(SHIPPED_HOST_CONF)
    os.chmod(shipped, 0o644)  # as the extension ships it, whatever our umask


def _host_phase(path: Callable[[str], str], which: str, config: PluginConfig, cwd: str,
                event: Callable[[str], None], interval: float) -> dict[str, Any]:
    """PluginHost: run the script in a thread, noticing its end only at a poll."""
    box: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: box.update(_run_script(path, which, config, cwd, event, interval)),
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


def _run_script(path: Callable[[str], str], which: str, config: PluginConfig, cwd: str,
                event: Callable[[str], None], interval: float) -> dict[str, Any]:
    """ScriptRunner.pre_script/post_script: `sh FILE params`, unread pipes, no kill.

    The host looks every ``config.poll`` s and gives up after ``timeout / poll``
    looks; we look every *interval* s but give up when the host would.
    """
    location = config.pre if which == "pre" else config.post
    params = config.pre_params if which == "pre" else config.post_params
    retries = config.pre_retries if which == "pre" else config.post_retries
    label = "Prescript" if which == "pre" else "Postscript"
    argv = ["sh", path(location), *params]
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


def _crash(report: dict[str, Any], event: Callable[[str], None], which: str) -> dict[str, Any]:
    """PluginHost AND-s continueBackup with a string: TypeError, the enable fails."""
    report.update(code=2, status="error", consistency="none", health_code=None,
                  health_name=None, message=f"the host crashed after the {which}-script "
                  f"failed: continueBackupOnFailure is not a JSON boolean")
    event(f"result: 2 {report['message']}")
    return report


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
