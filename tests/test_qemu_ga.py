"""The qemu-ga host: its files, doctor's prediction, and rehearsals with the real agent,
including the ways a cycle goes wrong (a target down, the hook killed, the hypervisor's
command timing out while the hook runs).

Rehearsals start a private qemu-ga on a unix socket with the real stock dispatcher
(copied into a staged root) and send only ``guest-fsfreeze-freeze-list`` naming a loop
mount the test made.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from quiesce.hosts.qemu_ga import hook_from_argv
from quiesce.hosts.qga import AgentError, PrivateAgent

from .support.helpers import (make_sqlite, pids_with_args, run, sqlite_writable, wait_until,
                              write_config)
from .support.qgakit import (HOOK, QEMU_GA, events, install, rehearse, require_agent, stage_root,
                     thaw_mount)

CONF = "etc/qemu/qemu-ga.conf"


def _doctor(config: Path, root: Path) -> dict:
    proc = run(config, "doctor", "qemu-ga", "--root", str(root), "--json")
    return json.loads(proc.stdout)


class Stage:
    """A staged root with the stock dispatcher, a SQLite target, runtime state on tmpfs."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.runtime = Path(tempfile.mkdtemp(prefix="quiesce-qga-", dir="/dev/shm"))
        self.db = make_sqlite(tmp_path / "app.db")
        self.root = stage_root(tmp_path / "root")
        self.config = self.configure()

    def configure(self, settings: dict | None = None, **extra_targets) -> Path:
        self.config = write_config(self.tmp, {"app": {"kind": "sqlite", "path": str(self.db)},
                                              **extra_targets},
                                   runtime_dir=str(self.runtime), max_hold=60, timeout=10,
                                   **(settings or {}))
        return self.config

    def enable(self) -> None:
        proc = install(self.config, self.root, self.tmp / "log", "--enable-hook")
        assert proc.returncode == 0, proc.stderr


@pytest.fixture
def stage(tmp_path):
    require_agent()
    staged = Stage(tmp_path)
    yield staged
    run(staged.config, "thaw")
    shutil.rmtree(staged.runtime, ignore_errors=True)


def test_install_writes_one_posix_hook_and_enable_hook_keeps_the_agents_other_keys(stage, tmp_path):
    root, config = stage.root, stage.config
    (root / CONF).write_text("[general]\nverbose=true\n")
    proc = install(config, root, tmp_path / "log")
    assert proc.returncode == 0, proc.stderr
    assert "NOTE: qemu-ga runs no fsfreeze hook yet" in proc.stdout  # and what to change:
    assert "fsfreeze-hook=/etc/qemu/fsfreeze-hook` under [general]" in proc.stdout
    hook = root / HOOK.lstrip("/")
    assert stat.S_IMODE(hook.stat().st_mode) == 0o700
    body = hook.read_text()
    assert subprocess.run(["dash", "-n", str(hook)]).returncode == 0
    interpreters = [line.split()[1] for line in body.splitlines() if line.strip().startswith("exec /")]
    assert interpreters and all(os.path.isabs(p) and os.access(p, os.X_OK) for p in interpreters)
    assert "freeze)" in body and "thaw)" in body and str(tmp_path / "log") in body
    assert (root / CONF).read_text() == "[general]\nverbose=true\n"  # untouched

    proc = install(config, root, tmp_path / "log", "--enable-hook")
    assert proc.returncode == 2 and "refusing to overwrite" in proc.stderr  # not ours
    proc = install(config, root, tmp_path / "log", "--enable-hook", "--force")
    assert proc.returncode == 0, proc.stderr
    assert "NOTE" not in proc.stdout  # staged root: no running agent to restart
    assert (root / CONF).read_text() == ("[general]\nverbose=true\n"
                                         "fsfreeze-hook=/etc/qemu/fsfreeze-hook\n\n")
    proc = run(config, "uninstall", "qemu-ga", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    assert not hook.exists()
    assert (root / CONF).read_text() == "[general]\nverbose=true\n"  # restored


def test_doctor_predicts_whether_the_agent_will_run_the_hook(stage, tmp_path):
    root, config = stage.root, stage.config
    assert _doctor(config, root)["host_name"] == "HookNotInstalled"
    install(config, root, tmp_path / "log")
    report = _doctor(config, root)
    assert (report["host_code"], report["host_name"]) == (3, "HooksDisabled")
    assert "--enable-hook" in report["findings"][0]["message"]
    (root / CONF).write_text("[general]\nfsfreeze-hook=/usr/local/bin/my-hook\n")
    assert _doctor(config, root)["host_name"] == "OtherHookProgram"
    (root / CONF).write_text("[general]\nfsfreeze-hook=\n")  # empty: the default dispatcher
    report = _doctor(config, root)
    assert report["host_code"] == 0, report
    checks = {f["check"]: f for f in report["findings"]}
    assert checks["qemu-ga is installed"]["message"].startswith(QEMU_GA + ": QEMU Guest Agent")
    assert checks["hook is root's alone"]["ok"]
    assert checks["max_hold against the hypervisor's freeze"]["warning"]
    os.chmod(root / "etc/qemu/fsfreeze-hook.d", 0o777)
    checks = {f["check"]: f for f in _doctor(config, root)["findings"]}
    assert not checks["hook directory is root's alone"]["ok"]


def test_hook_enabled_is_read_from_the_agents_command_line():
    assert hook_from_argv(["/usr/sbin/qemu-ga"]) is None
    assert hook_from_argv(["/usr/sbin/qemu-ga", "-F"]) == "/etc/qemu/fsfreeze-hook"
    assert hook_from_argv(["qemu-ga", "-m", "virtio-serial", "-F/opt/h"]) == "/opt/h"
    assert hook_from_argv(["qemu-ga", "--fsfreeze-hook=/opt/h"]) == "/opt/h"
    assert hook_from_argv(["qemu-ga", "--fsfreeze-hook"]) == "/etc/qemu/fsfreeze-hook"


@pytest.mark.server
def test_the_client_never_sends_a_freeze_of_every_filesystem():
    require_agent()
    with PrivateAgent(QEMU_GA, None) as agent:
        client = agent.client(10)
        try:
            client.sync()
            for command, args in (("guest-fsfreeze-freeze", None),
                                  ("guest-fsfreeze-freeze-list", None),
                                  ("guest-fsfreeze-freeze-list", {"mountpoints": []})):
                with pytest.raises(AgentError, match="would freeze every filesystem"):
                    client.call(command, args)
            assert client.call("guest-fsfreeze-status") == "thawed"
            assert client.call("guest-info")["version"].startswith("7.")
        finally:
            client.close()


def test_rehearsal_refuses_to_freeze_without_a_named_mount(stage, tmp_path):
    stage.enable()
    proc = rehearse(stage.config, stage.root)
    assert proc.report["code"] == 2
    assert "never every filesystem" in proc.report["message"]
    assert not any(e.startswith("guest-fsfreeze") for e in events(proc.report))


@pytest.mark.server
@pytest.mark.root
@pytest.mark.parametrize("on_failure", ["hold-others", "release-all"])
def test_a_target_down_the_agent_still_freezes_and_quiesce_tells_the_truth(stage, tmp_path, loopfs,
                                                                          on_failure):
    fs = loopfs()
    config = stage.configure({"on_target_failure": on_failure},
                             cache={"kind": "redis", "url": f"unix://{tmp_path}/no-redis.sock",
                                    "timeout": 2})
    stage.enable()
    root = stage.root
    try:
        proc = rehearse(config, root, "--freeze", str(fs.mountpoint), "--wait", "0.2")
    finally:
        thaw_mount(fs)
    report = proc.report
    assert report["hypervisor_sees"] == "frozen snapshot"  # the dispatcher exits 0 regardless
    assert (report["code"], report["consistency"]) == (1, "file-system")
    statuses = {hold["target"]: (hold["status"], hold["released_by"]) for hold in report["holds"]}
    if on_failure == "hold-others":
        # The SQLite target was held across the snapshot and released by the thaw hook; the
        # one that failed is named as such.
        assert statuses == {"app": ("ok", "thaw"), "cache": ("failed", "thaw")}, report
    else:  # the check failed, so the freeze released what it had and held nothing
        assert report["holds"] == [] and "no target was held" in report["message"]
        # `quiesce status` keeps the last cycle's end: released because the freeze failed.
        status = json.loads(run(config, "status", "--json").stdout)
        assert status["held"] is False and "released by freeze-failed" in status["message"]
    assert sqlite_writable(stage.db)


def _quiesce_freeze_pids(config: Path) -> list[int]:
    return pids_with_args(str(config), "freeze", "-m")


@pytest.mark.server
@pytest.mark.root
def test_a_killed_hook_leaves_nothing_quiesced_and_says_so(stage, tmp_path, loopfs):
    fs = loopfs()
    stage.enable()
    root, config, db = stage.root, stage.config, stage.db
    blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # `quiesce freeze` now waits for the write lock
    killed: list[int] = []

    def kill_the_hook():
        if wait_until(lambda: _quiesce_freeze_pids(config), timeout=30, interval=0.02):
            for pid in _quiesce_freeze_pids(config):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.5)
        blocker.execute("COMMIT")

    killer = threading.Thread(target=kill_the_hook)
    killer.start()
    try:
        proc = rehearse(config, root, "--freeze", str(fs.mountpoint), "--wait", "0.2")
    finally:
        killer.join(timeout=60)
        blocker.close()
        thaw_mount(fs)
    assert killed, "the hook's `quiesce freeze` was never seen running"
    report = proc.report
    assert report["hypervisor_sees"] == "frozen snapshot"
    assert "guest-fsfreeze-status: thawed" in events(report)
    # Killed before it acknowledged "ready", so its holder released everything: the agent
    # froze anyway (the dispatcher exits 0), and only quiesce's report says nothing was held.
    assert (report["code"], report["consistency"]) == (1, "file-system"), report
    assert not any(h["status"] == "ok" for h in report["holds"])
    assert sqlite_writable(db)
    status = json.loads(run(config, "status", "--json").stdout)
    assert status["held"] is False, status


@pytest.mark.server
@pytest.mark.root
def test_the_hypervisors_timeout_while_the_hook_runs_still_ends_thawed(stage, tmp_path, loopfs):
    fs = loopfs()
    stage.enable()
    root, config = stage.root, stage.config
    slow = root / "etc/qemu/fsfreeze-hook.d/00-slow"  # runs before ours, as the dispatcher sorts
    slow.write_text("#!/bin/sh\nsleep 3\n")
    slow.chmod(0o700)
    try:
        proc = rehearse(config, root, "--freeze", str(fs.mountpoint), "--wait", "0.2",
                        "--agent-timeout", "1")
    finally:
        thaw_mount(fs)
    report = proc.report
    seen = events(report)
    assert (report["code"], report["consistency"]) == (2, "none")
    assert "no reply within 1 s" in report["agent_error"]
    assert any(e.startswith("reconnecting") for e in seen), seen
    assert "guest-fsfreeze-status: thawed" in seen
    # The hook did run (late); its thaw released the target.
    assert [(h["target"], h["status"]) for h in report["holds"]] == [("app", "ok")]
    assert sqlite_writable(stage.db)


@pytest.mark.root
def test_emulated_rehearsal_says_so_and_runs_the_dispatcher(stage, tmp_path, loopfs):
    fs = loopfs()
    stage.enable()
    try:
        proc = rehearse(stage.config, stage.root, "--freeze", str(fs.mountpoint), "--wait", "0.2",
                        "--emulate")
    finally:
        thaw_mount(fs)
    report = proc.report
    assert report["code"] == 0, report
    assert "emulated" in report["note"]
    assert "emulated: hook with freeze exited 0" in events(report)
    assert not any(e.startswith("guest-") for e in events(report))
