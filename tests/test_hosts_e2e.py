"""Each emulated host end to end on a loop-mounted filesystem: the host's own scripts
(rendered by quiesce) hold a SQLite database while a writer commits, the mount is frozen
for real, the image is copied as the snapshot, and the copy restores with every write
committed before the hold."""

from __future__ import annotations

import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

import quiesce.thaw
from quiesce import fsfreeze
from quiesce.hosts import aws_dlm, gcp, vmware
from quiesce.hosts.rehearsal import real_freeze
from quiesce.runtime import read_state, runtime_dir_of

from .support.helpers import make_sqlite, run, wait_until, write_config
from .support.hostkit import held, install
from .test_e2e_sqlite import WRITER, restored_writes

DEADLINE = 20.0
pytestmark = pytest.mark.root


def run_vmware(settings, root, freeze, snapshot):
    install(root, [vmware.render_dispatcher(settings)])
    emulator = vmware.VmbackupEmulator(str(root), config=vmware.VmbackupConfig(timeout=60),
                                       kill=((signal.SIGTERM, 1), (signal.SIGKILL, 1)))
    return emulator.run(sync_freeze=freeze, snapshot=snapshot).ok


def run_gcp(settings, root, freeze, snapshot):
    install(root, gcp.render_scripts(settings))
    result = gcp.GuestAgentEmulator(str(root), timeout=60).snapshot(
        1, "1/2", sync_freeze=freeze, snapshot=snapshot)
    return result["snapshot_taken"] and result["post"].agent_return_code == gcp.NO_ERROR


def run_aws(settings, root, freeze, snapshot):
    def frozen_snapshot():  # EBS freezes nothing: the freeze stands for its point in time
        thaw = freeze()
        try:
            snapshot()
        finally:
            thaw()
    result = aws_dlm.DlmEmulator(aws_dlm.render_script(settings), timeout=60).run(
        "None", snapshot=frozen_snapshot)
    return result.snapshot == "application-consistent" and result.post_ok


@pytest.mark.parametrize("host", [run_vmware, run_gcp, run_aws], ids=["vmware", "gcp", "aws-dlm"])
def test_snapshot_restores_with_every_committed_write(tmp_path, loopfs, host):
    fs = loopfs()
    db = make_sqlite(fs.mountpoint / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}}, max_hold=60)
    (tmp_path / "log").mkdir()
    settings = SimpleNamespace(config=str(config), python=sys.executable,
                               thaw_script=quiesce.thaw.__file__, log_dir=str(tmp_path / "log"),
                               runtime_dir=str(tmp_path / "run"), freeze_timeout=30.0)
    commits, stop = tmp_path / "commits", tmp_path / "stop-writer"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(commits), str(stop)],
                              stdin=subprocess.DEVNULL)
    copy = loopfs.new_path("snapshot", ".img")
    seen = []

    def snapshot():
        seen.append(held(config))
        fs.copy_image(copy)
    try:
        assert wait_until(lambda: commits.exists() and len(commits.read_text().split()) > 40,
                          timeout=10), "the writer does not commit"
        ok = host(settings, tmp_path / "root",
                  real_freeze([str(fs.mountpoint)], deadline_seconds=DEADLINE), snapshot)
        count = len(commits.read_text().splitlines())
        assert wait_until(lambda: len(commits.read_text().splitlines()) > count + 20,
                          timeout=10), "the writer did not resume"
    finally:
        stop.touch()
        writer.wait(timeout=60)
        run(config, "thaw")
        fsfreeze.thaw(fs.mountpoint)
    assert ok and seen == [True]
    state = read_state(runtime_dir_of(str(config)))
    committed, in_copy = restored_writes(fs, copy, commits)
    before = {i for i, t in committed if t < state["held_since"]}
    assert before and before <= in_copy, f"lost writes: {sorted(before - in_copy)[:10]}"
