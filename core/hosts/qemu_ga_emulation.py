"""The rehearsal of qemu-ga: the hypervisor's part, played through a private qemu-ga on a
socket of its own (sync, freeze the named mounts, snapshot, thaw, status); where qemu-ga
is not installed (or with --emulate), the agent's part too: its dispatcher, FIFREEZE and
FITHAW."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import TYPE_CHECKING, Any

from .. import fsfreeze
from . import Rehearsal
from .qga import AgentError, PrivateAgent
from .rehearsal import Timeline, holds, new_report, snapshot_failed, snapshot_step

if TYPE_CHECKING:
    from .qemu_ga import QemuGuestAgentHost


def rehearse(host: QemuGuestAgentHost, rehearsal: Rehearsal) -> dict[str, Any]:
    """Play the hypervisor: sync, freeze the named mounts, snapshot, thaw, status."""
    event = Timeline(rehearsal.on_event)
    report = new_report(host.name, event)
    verdict = host.predict()
    event(f"validation: {verdict.code} {verdict.name}: {verdict.message}")
    report["validation"] = {"code": verdict.code, "name": verdict.name, "message": verdict.message}
    if not rehearsal.freeze_mounts:
        return _result(report, event, rehearsal, "no mount named: the rehearsal "
                       "freezes only what --freeze names (never every filesystem)")
    binary = None if host.options.emulate else host.agent_binary()
    timeout = host.options.agent_timeout  # for each reply of the agent, or of the hook
    with tempfile.TemporaryDirectory(prefix="quiesce-qga-hook-") as tmp:
        # As the machine's agent would: no hook at all when it runs none.
        dispatcher = None if verdict.code == 3 else _private_dispatcher(host, tmp)
        try:
            with fsfreeze.guard(rehearsal.freeze_mounts, deadline_seconds=rehearsal.freeze_deadline,
                                allow_root=rehearsal.allow_root_freeze) as mounts:
                if binary:
                    if dispatcher is None:
                        event("the agent runs no hook (see validation): started without -F")
                    _drive_agent(binary, dispatcher, timeout, mounts, rehearsal, report, event)
                else:
                    report["note"] = ("qemu-ga was emulated (" + ("--emulate" if host.options.emulate
                                      else "not installed") + "): its dispatcher was run "
                                      "and the mounts frozen by quiesce, not by the agent")
                    _emulate(dispatcher, timeout, mounts, rehearsal, report, event)
        except fsfreeze.FreezeError as e:
            report["error"] = str(e)
            event(f"freeze refused: {e}")
    return _result(report, event, rehearsal, report.get("error"))


def _private_dispatcher(host: QemuGuestAgentHost, tmp: str) -> str:
    """The installed dispatcher (or the agent's stock one), next to the installed hook dir.

    The dispatcher finds fsfreeze-hook.d next to itself, so a copy beside a link to
    the hook directory under --root runs exactly what the agent would run.
    """
    source = next((p for p in (host.path(host.dispatcher()), *host.dispatchers)
                   if os.path.isfile(p)), None)
    target = os.path.join(tmp, "fsfreeze-hook")
    if source is None:  # no dispatcher anywhere: upstream's rules, written out
        with open(target, "w") as f:
            f.write(EMULATED_DISPATCHER)
    else:
        shutil.copyfile(source, target)
    os.chmod(target, 0o700)
    os.symlink(host.path(host.hook_dir()), os.path.join(tmp, "fsfreeze-hook.d"))
    return target


def _drive_agent(binary, dispatcher, timeout, mounts, rehearsal, report, event) -> None:
    try:
        with PrivateAgent(binary, dispatcher) as agent:
            event(f"started {' '.join(agent.argv())}")
            client = agent.client(timeout)
            try:
                client.sync()
                event("guest-sync answered")
                try:
                    count = client.call("guest-fsfreeze-freeze-list", {"mountpoints": mounts})
                    event(f"guest-fsfreeze-freeze-list froze {count} filesystem(s): "
                          f"{', '.join(mounts)}")
                    event(f"guest-fsfreeze-status: {client.call('guest-fsfreeze-status')}")
                    snapshot_step(rehearsal.snapshot, report, event)
                except AgentError as e:
                    report["agent_error"] = str(e)
                    event(f"agent: {e}")
                client = _thaw(agent, client, rehearsal, report, event)
            finally:
                client.close()
    except (AgentError, OSError) as e:
        report.setdefault("agent_error", str(e))
        event(f"agent: {e}")


def _thaw(agent, client, rehearsal, report, event):
    """guest-fsfreeze-thaw, as the hypervisor sends it even after a failed freeze.

    After a timed-out reply the agent may still be running the freeze (its hook, then
    FIFREEZE); a new connection is served only when it is done, so it gets until the
    freeze deadline, when the guard thaws anyway.
    """
    if client.out_of_step:
        client.close()
        event("reconnecting: the agent is still busy with the timed-out command")
        client = agent.client(rehearsal.freeze_deadline)
        client.sync()
    count = client.call("guest-fsfreeze-thaw")
    event(f"guest-fsfreeze-thaw thawed {count} filesystem(s)")
    event(f"guest-fsfreeze-status: {client.call('guest-fsfreeze-status')}")
    return client


def _emulate(dispatcher, timeout, mounts, rehearsal, report, event) -> None:
    """No qemu-ga here: the dispatcher with freeze, FIFREEZE, snapshot, FITHAW, thaw."""
    def run(arg: str) -> str:  # output to /dev/null, as qemu-ga 7.2 spawns its hook
        if dispatcher is None:
            return "not run (hooks disabled)"
        return "exited %d" % subprocess.run(
            [dispatcher, arg], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=timeout).returncode
    event(f"emulated: hook with freeze {run('freeze')}")
    with fsfreeze.freeze(mounts, deadline_seconds=rehearsal.freeze_deadline,
                         allow_root=rehearsal.allow_root_freeze):
        event(f"emulated: froze {', '.join(mounts)}")
        snapshot_step(rehearsal.snapshot, report, event)
    event(f"emulated: thawed; hook with thaw {run('thaw')}")


def _result(report, event, rehearsal: Rehearsal, error: str | None) -> dict[str, Any]:
    """What the hypervisor records, and what quiesce itself saw (the truth)."""
    report["holds"] = held = holds(rehearsal.runtime_dir, report["started_at"])
    agent_ok = not (error or report.get("agent_error"))
    snapshot_ok = agent_ok and not snapshot_failed(report, event)
    quiesced = bool(held) and all(h["status"] == "ok" for h in held)
    report["hypervisor_sees"] = "frozen snapshot" if snapshot_ok else "freeze failed"
    if snapshot_ok and quiesced:
        report.update(code=0, status="success", consistency="application",
                      message="every target was held for the whole freeze")
    elif snapshot_ok:
        bad = [f"{h['target']}: {h['status']}" for h in held] or ["no target was held"]
        report.update(code=1, status="success", consistency="file-system",
                      message="the agent froze and thawed, but quiesce did not hold every "
                              f"target ({'; '.join(bad)}); the hypervisor is not told")
    else:
        report.update(code=2, status="error", consistency="none",
                      message=error or report.get("agent_error") or "the snapshot failed")
    health = report["validation"] if report["code"] and report["validation"]["code"] else {}
    report.update(health_code=health.get("code"), health_name=health.get("name"))
    event(f"result: {report['code']} {report['message']}")
    return report


#: The stock dispatcher's rules (qemu scripts/qemu-guest-agent/fsfreeze-hook), for a
#: machine without it: every executable in fsfreeze-hook.d, backups skipped, exit 0.
EMULATED_DISPATCHER = r"""#!/bin/sh
FSFREEZE_D=$(dirname -- "$0")/fsfreeze-hook.d
[ -d "$FSFREEZE_D" ] || exit 0
for file in "$FSFREEZE_D"/*; do
    case "$file" in
        *~|*.bak|*.orig|*.rpmnew|*.rpmorig|*.rpmsave|*.sample|*.dpkg-*) continue ;;
    esac
    [ -x "$file" ] && "$file" "$@"
done
exit 0
"""
