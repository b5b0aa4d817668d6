"""VMware Tools (vmbackup) and Veeam: renders, the vmbackup state machine run with real
scripts, tools.conf as vmtoolsd reads it, and doctor's checks. One test per rule."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from quiesce.hosts import vmware
from quiesce.hosts.vmware import (LEGACY_FREEZE, LEGACY_THAW, SCRIPTS_DIR, VmbackupConfig,
                                  VmbackupEmulator)

from .support.helpers import run
from .support.hostkit import FIXED, compare, held, install, lines, real_settings, recorder

FAST_KILL = ((signal.SIGTERM, 0.5), (signal.SIGKILL, 0.5))


@pytest.fixture
def host(tmp_path):
    root, record = tmp_path / "root", tmp_path / "record"
    (root / SCRIPTS_DIR.lstrip("/")).mkdir(parents=True)
    return root, record


def script(root: Path, path: str, record: Path, **kw) -> Path:
    return recorder(root / path.lstrip("/"), record, **kw)


def emulate(root, **config) -> VmbackupEmulator:
    return VmbackupEmulator(str(root), config=VmbackupConfig(**config), kill=FAST_KILL)


def test_dispatcher_render_is_byte_exact():
    file = vmware.render_dispatcher(FIXED)
    assert (file.path, file.mode) == (vmware.DISPATCHER, 0o700)
    compare("vmware", "50-quiesce", file.content)


@pytest.mark.parametrize("index,name", [(0, vmware.VEEAM_PRE), (1, vmware.VEEAM_POST)])
def test_veeam_renders_are_byte_exact(index, name):
    file = vmware.render_veeam(FIXED, "/out")[index]
    assert (file.path, file.mode) == (f"/out/{name}", 0o700)
    compare("vmware", name, file.content)


def test_legacy_first_then_ascending_names_then_reverse_thaw(host):
    root, record = host
    for name in ("b", "10-x", "9-y", "B"):
        script(root, f"{SCRIPTS_DIR}/{name}", record)
    script(root, LEGACY_FREEZE, record)
    script(root, LEGACY_THAW, record)
    result = emulate(root).run()
    assert result.ok and result.snapshot_taken
    assert lines(record) == ["pre-freeze-script freeze", "10-x freeze", "9-y freeze",
                             "B freeze", "b freeze", "b thaw", "B thaw", "9-y thaw",
                             "10-x thaw", "post-thaw-script thaw"]


def test_legacy_slot_kept_when_only_the_thaw_script_exists(host):
    root, record = host
    script(root, f"{SCRIPTS_DIR}/a", record)
    script(root, LEGACY_THAW, record)
    emulate(root).run()
    assert lines(record) == ["a freeze", "a thaw", "post-thaw-script thaw"]


def test_subdirectories_skipped_non_executable_file_aborts(host):
    root, record = host
    (root / SCRIPTS_DIR.lstrip("/") / "0-dir").mkdir()
    script(root, f"{SCRIPTS_DIR}/1-ok", record)
    script(root, f"{SCRIPTS_DIR}/2-noexec", record, mode=0o644)
    script(root, f"{SCRIPTS_DIR}/3-later", record)
    result = emulate(root).run()
    assert result.status == "freeze-script-failed"
    assert (result.runs[1][0], result.runs[1][2]) == (f"{SCRIPTS_DIR}/2-noexec", 126)
    assert lines(record) == ["1-ok freeze", "1-ok freezeFail"]


def test_failed_freeze_aborts_and_only_earlier_scripts_get_freezefail(host):
    root, record = host
    script(root, f"{SCRIPTS_DIR}/1", record)
    script(root, f"{SCRIPTS_DIR}/2", record)
    script(root, f"{SCRIPTS_DIR}/3", record, code=4)
    script(root, f"{SCRIPTS_DIR}/4", record)
    calls = []
    result = emulate(root).run(sync_freeze=lambda: calls.append("freeze") or (lambda: None),
                               snapshot=lambda: calls.append("snapshot"))
    assert result.status == "freeze-script-failed" and not result.snapshot_taken
    assert calls == []
    assert lines(record) == ["1 freeze", "2 freeze", "3 freeze", "2 freezeFail", "1 freezeFail"]


def test_sync_failure_runs_freezefail_on_every_script_in_reverse(host):
    root, record = host
    script(root, f"{SCRIPTS_DIR}/1", record)
    script(root, f"{SCRIPTS_DIR}/2", record)
    def broken():
        raise OSError("FIFREEZE failed")
    result = emulate(root).run(sync_freeze=broken)
    assert result.status == "sync-failed"
    assert lines(record) == ["1 freeze", "2 freeze", "2 freezeFail", "1 freezeFail"]


def test_timeout_kills_the_shell_running_the_freeze_script_and_runs_freezefail(host):
    root, record = host
    script(root, f"{SCRIPTS_DIR}/1", record)
    script(root, f"{SCRIPTS_DIR}/2", record, sleep=2)
    result = emulate(root, timeout=1).run()
    assert result.status == "timeout"
    # SIGTERM goes to the `/bin/sh -c` vmtoolsd started (dash does not exec the script,
    # which is orphaned and runs on); the killed script gets no freezeFail
    assert result.runs[1] == (f"{SCRIPTS_DIR}/2", "freeze", -signal.SIGTERM)
    assert lines(record) == ["1 freeze", "2 freeze", "1 freezeFail"]


def test_timeout_while_frozen_discards_the_snapshot(host):
    root, record = host
    script(root, f"{SCRIPTS_DIR}/1", record)
    thawed = []
    result = emulate(root, timeout=1).run(sync_freeze=lambda: (lambda: thawed.append(True)),
                                          snapshot=lambda: subprocess.run(["sleep", "1.5"]))
    assert result.status == "timeout" and not result.snapshot_taken and thawed == [True]
    assert lines(record) == ["1 freeze", "1 freezeFail"]


def test_failed_thaw_script_does_not_stop_the_others(host):
    root, record = host
    script(root, f"{SCRIPTS_DIR}/1", record)
    script(root, f"{SCRIPTS_DIR}/2", record, extra='[ "$1" = thaw ] && exit 5\n')
    result = emulate(root).run()
    assert result.status == "thaw-script-failed" and result.snapshot_taken
    assert lines(record) == ["1 freeze", "2 freeze", "2 thaw", "1 thaw"]


def test_exec_scripts_false_runs_no_script(host):
    root, record = host
    script(root, f"{SCRIPTS_DIR}/1", record)
    result = emulate(root, exec_scripts=False).run()
    assert result.ok and result.snapshot_taken and lines(record) == []


def test_script_arg_is_the_second_argument(host):
    root, record = host
    script(root, f"{SCRIPTS_DIR}/1", record)
    emulate(root, script_arg="job 7").run()
    assert lines(record) == ["1 freeze job 7", "1 thaw job 7"]


@pytest.mark.parametrize("text,expected", [
    ("", VmbackupConfig()),
    ("[vmbackup]\ntimeout=120\nexecScripts=false\nscriptArg=x\n"
     "excludedFileSystems=/data/*, /mnt/?\n",
     VmbackupConfig(False, 120, "x", ["/data/*", "/mnt/?"])),
    ("[vmbackup]\ntimeout=abc\nexecScripts=no\n", VmbackupConfig()),   # strict GKeyFile values
    ("[vmbackup]\ntimeout=-5\n", VmbackupConfig()),
    ("[vmbackup]\ntimeout=0\n", VmbackupConfig(timeout=0)),
    ("[vmbackup]\nTimeout=30\n", VmbackupConfig()),                     # keys are case-sensitive
])
def test_tools_conf_as_vmtoolsd_reads_it(tmp_path, text, expected):
    conf = tmp_path / vmware.TOOLS_CONF.lstrip("/")
    conf.parent.mkdir(parents=True)
    conf.write_text(text)
    assert vmware.read_tools_conf(str(tmp_path)) == expected


def test_dispatcher_holds_across_the_snapshot_and_thaws(tmp_path):
    config, settings = real_settings(tmp_path)
    root = tmp_path / "root"
    install(root, [vmware.render_dispatcher(settings)])
    seen = []
    try:
        result = emulate(root).run(snapshot=lambda: seen.append(held(config)))
        assert result.ok and seen == [True] and not held(config)
        log = (tmp_path / "log" / "vmware-backup-script.log").read_text()
        assert "thaw: " in log
    finally:
        run(config, "thaw")


def test_dispatcher_freezefail_releases(tmp_path):
    config, settings = real_settings(tmp_path)
    root = tmp_path / "root"
    install(root, [vmware.render_dispatcher(settings)])
    recorder(root / SCRIPTS_DIR.lstrip("/") / "90-fails", tmp_path / "record", code=1)
    try:
        result = emulate(root).run()
        assert result.status == "freeze-script-failed"
        assert [r[1] for r in result.runs] == ["freeze", "freeze", "freezeFail"]
        assert not held(config)
        assert "freezeFail: " in (tmp_path / "log" / "vmware-backup-script.log").read_text()
    finally:
        run(config, "thaw")


def test_veeam_scripts_run_without_arguments(tmp_path):
    config, settings = real_settings(tmp_path)
    pre, post = vmware.render_veeam(settings, str(tmp_path / "out"))
    for file in (pre, post):
        Path(file.path).parent.mkdir(exist_ok=True)
        Path(file.path).write_text(file.content)
        os.chmod(file.path, file.mode)
    try:
        assert subprocess.run([pre.path], timeout=60).returncode == 0 and held(config)
        assert subprocess.run([post.path], timeout=60).returncode == 0 and not held(config)
    finally:
        run(config, "thaw")


def test_doctor_vmtoolsd_and_version(tmp_path):
    assert not vmware.check_vmtoolsd(str(tmp_path)).ok
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/vmtoolsd").write_text("")
    check = vmware.check_vmtoolsd(str(tmp_path), "VMware Tools daemon, version 12.3.5.46049 "
                                                  "(build-22544099)")
    assert check.ok and "12.3.5.46049" in check.message


def test_doctor_exec_scripts():
    assert vmware.check_exec_scripts(VmbackupConfig()).ok
    assert not vmware.check_exec_scripts(VmbackupConfig(exec_scripts=False)).ok


def test_doctor_neighbours(host):
    root, record = host
    assert vmware.check_neighbours(str(root)).message == "no other backup script runs"
    script(root, LEGACY_THAW, record)
    check = vmware.check_neighbours(str(root))
    assert check.ok and check.warning and LEGACY_THAW in check.message
    script(root, f"{SCRIPTS_DIR}/x", record, mode=0o644)
    assert not vmware.check_neighbours(str(root)).ok


def test_doctor_permissions(tmp_path):
    assert not vmware.check_permissions(str(tmp_path)).ok
    install(tmp_path, [vmware.render_dispatcher(FIXED)])
    assert vmware.check_permissions(str(tmp_path)).ok
    os.chmod(str(tmp_path) + vmware.DISPATCHER, 0o722)
    assert not vmware.check_permissions(str(tmp_path)).ok


def test_doctor_timeout_against_freeze_and_max_hold():
    assert vmware.check_timeout(VmbackupConfig(timeout=900), 30, 120).ok
    assert not vmware.check_timeout(VmbackupConfig(timeout=20), 30, 10).ok
    late = vmware.check_timeout(VmbackupConfig(timeout=60), 30, 120)
    assert late.ok and late.warning
    assert vmware.check_timeout(VmbackupConfig(timeout=0), 30, 120).warning
    assert not vmware.check_veeam_timeout(700).ok and vmware.check_veeam_timeout(30).ok
