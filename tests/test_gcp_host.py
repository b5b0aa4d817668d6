"""Google Cloud guest-flush: renders, the instance config merge and undo, the agent's
snapshot handler run with real scripts, and doctor's checks. One test per rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quiesce.hosts import gcp
from quiesce.hosts.gcp import GuestAgentEmulator

from .support.helpers import run
from .support.hostkit import FIXED, compare, held, install, lines, real_settings, recorder

SAMPLE = """# Written by the image build.
[InstanceSetup]
set_host_keys = true   # inline note kept

; a semicolon comment
[snapshots]
# who turned it off and why
Enabled = false
snapshot_service_port: 8081

[Accounts]
groups = adm,video
"""


@pytest.fixture
def agent(tmp_path):
    root, record = tmp_path / "root", tmp_path / "record"
    (root / gcp.SCRIPTS_DIR.lstrip("/")).mkdir(parents=True, mode=gcp.SCRIPTS_DIR_MODE)
    return root, record


def emulate(root, timeout=5.0, **kw) -> GuestAgentEmulator:
    return GuestAgentEmulator(str(root), timeout=timeout, pipe_grace=1.0, **kw)


def pre(root, record, **kw):
    return recorder(root / gcp.PRE.lstrip("/"), record, **kw)


@pytest.mark.parametrize("index,name", [(0, "pre.sh"), (1, "post.sh")])
def test_scripts_render_byte_exact(index, name):
    file = gcp.render_scripts(FIXED)[index]
    assert (file.path, file.mode) == (f"{gcp.SCRIPTS_DIR}/{name}", 0o700)
    compare("gcp", name, file.content)


def test_config_merge_is_byte_exact_and_keeps_every_other_line():
    merged, _ = gcp.merge_config(SAMPLE, gcp.wanted_config(30))
    compare("gcp", "instance_configs.cfg", merged)


@pytest.mark.parametrize("text", [SAMPLE, "", "[Core]\nx = 1", "[Core]\nx = 1\n",
                                  "[Snapshots]\nenabled = true\ntimeout_in_seconds = 300\n",
                                  "[Snapshots]", "[Snapshots]\nEnabled=false"])
def test_config_merge_then_undo_round_trips(text):
    merged, undo = gcp.merge_config(text, gcp.wanted_config(30))
    assert "enabled = true" in merged and "timeout_in_seconds = 60" in merged
    assert gcp.undo_config(merged, undo) == text


def test_undo_leaves_a_later_edit_alone():
    merged, undo = gcp.merge_config(SAMPLE, {"enabled": "true"})
    edited = merged.replace("groups = adm,video", "groups = adm")
    assert gcp.undo_config(edited, undo) == SAMPLE.replace("groups = adm,video", "groups = adm")


def test_wanted_timeout_covers_the_freeze():
    assert gcp.wanted_config(30)["timeout_in_seconds"] == "60"
    assert gcp.wanted_config(100.2)["timeout_in_seconds"] == "106"


def write(root: Path, name: str, text: str) -> None:
    path = root / name.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_distro_and_template_override_the_main_config(tmp_path):
    write(tmp_path, gcp.CONFIG, "[Snapshots]\nenabled = true\n")
    assert gcp.check_config(str(tmp_path)).ok
    write(tmp_path, gcp.CONFIG + ".template", "[SNAPSHOTS]\nENABLED = false\n")
    values, _ = gcp.effective_config(str(tmp_path))
    assert values["enabled"] == "false" and not gcp.check_config(str(tmp_path)).ok


def test_pre_gets_the_disk_list_and_no_error(agent):
    root, record = agent
    pre(root, record)
    response = emulate(root).handle(7, "PRE_SNAPSHOT", "1/2,3/4")
    assert (response.scripts_return_code, response.agent_return_code) == (0, gcp.NO_ERROR)
    assert lines(record) == ["pre.sh 1/2,3/4"]


def test_missing_script_is_script_not_found(agent):
    root, _ = agent
    response = emulate(root).handle(1, "POST_SNAPSHOT", "1/2")
    assert (response.scripts_return_code, response.agent_return_code) == \
        (-1, gcp.SCRIPT_NOT_FOUND)


def test_timeout_kills_the_script_only_and_reports_124(agent, tmp_path):
    root, record = agent
    survivor = tmp_path / "survivor"
    # a detached child with its own output, as quiesce's holder is, outlives the kill
    pre(root, record, sleep=30,
        extra=f"setsid sh -c 'sleep 1; touch {survivor}' </dev/null >/dev/null 2>&1 &\n")
    response = emulate(root, timeout=0.5).handle(2, "PRE_SNAPSHOT", "1/2")
    assert (response.scripts_return_code, response.agent_return_code) == \
        (124, gcp.SCRIPT_TIMED_OUT)
    for _ in range(50):
        if survivor.exists():
            break
        os.system("sleep 0.1")
    assert survivor.exists()


@pytest.mark.parametrize("code,agent_code", [(3, gcp.UNHANDLED), (124, gcp.SCRIPT_TIMED_OUT)])
def test_exit_codes(agent, code, agent_code):
    root, record = agent
    pre(root, record, code=code)
    response = emulate(root).handle(3, "PRE_SNAPSHOT", "1/2")
    assert (response.scripts_return_code, response.agent_return_code) == (code, agent_code)


def test_not_executable_is_unhandled_minus_one(agent):
    root, record = agent
    pre(root, record, mode=0o600)
    response = emulate(root).handle(4, "PRE_SNAPSHOT", "1/2")
    assert (response.scripts_return_code, response.agent_return_code) == (-1, gcp.UNHANDLED)


def test_child_holding_the_output_pipe_blocks_the_agent(agent):
    root, record = agent
    pre(root, record, extra="sleep 3 &\n")
    response = emulate(root, timeout=0.5).handle(5, "PRE_SNAPSHOT", "1/2")
    assert response.blocked and response.agent_return_code == gcp.SCRIPT_TIMED_OUT


def test_requests_are_deduplicated_by_operation_id_per_type(agent):
    root, record = agent
    pre(root, record)
    recorder(root / gcp.POST.lstrip("/"), record)
    emulator = emulate(root)
    assert emulator.handle(9, "PRE_SNAPSHOT", "a") is not None
    assert emulator.handle(9, "PRE_SNAPSHOT", "a") is None
    assert emulator.handle(9, "POST_SNAPSHOT", "a") is not None
    for op in range(100, 100 + gcp.DEDUP_SIZE):
        emulator._duplicate("PRE_SNAPSHOT", op)   # fill the LRU without running scripts
    assert emulator.handle(9, "PRE_SNAPSHOT", "a") is not None  # evicted: runs again
    assert emulator.handle(1, "NOT_SET", "a") is None
    assert lines(record) == ["pre.sh a", "post.sh a", "pre.sh a"]


def test_failed_pre_means_no_snapshot(agent):
    root, record = agent
    pre(root, record, code=1)
    recorder(root / gcp.POST.lstrip("/"), record)
    taken = []
    result = emulate(root).snapshot(11, "1/2", snapshot=lambda: taken.append(1))
    assert not result["snapshot_taken"] and taken == []
    assert result["pre"].agent_return_code == gcp.UNHANDLED


def test_rendered_scripts_hold_across_the_snapshot(tmp_path):
    config, settings = real_settings(tmp_path)
    root = tmp_path / "root"
    install(root, gcp.render_scripts(settings))
    seen = []
    try:
        result = emulate(root, timeout=60).snapshot(
            12, "1/2", snapshot=lambda: seen.append(held(config)))
        assert result["snapshot_taken"] and seen == [True] and not held(config)
        assert result["pre"].agent_return_code == result["post"].agent_return_code == gcp.NO_ERROR
        assert not result["pre"].blocked
        assert "disks 1/2: " in (tmp_path / "log" / "gcp-post.log").read_text()
    finally:
        run(config, "thaw")


def test_doctor_agent_and_version(tmp_path):
    assert not gcp.check_agent(str(tmp_path)).ok
    write(tmp_path, gcp.AGENT[0], "")
    assert gcp.check_agent(str(tmp_path), "Google Guest Agent 20231004.02").ok
    assert not gcp.check_agent(str(tmp_path), "Google Guest Agent 20200101.00").ok


def test_doctor_config(tmp_path):
    assert not gcp.check_config(str(tmp_path)).ok   # the default is disabled
    write(tmp_path, gcp.CONFIG, gcp.merge_config(SAMPLE, {"enabled": "true"})[0])
    assert gcp.check_config(str(tmp_path)).ok


def test_doctor_freeze_fits_the_timeout(tmp_path):
    assert gcp.check_timeout(str(tmp_path), 30).ok                # default 60 s
    assert not gcp.check_timeout(str(tmp_path), 90).ok
    write(tmp_path, gcp.CONFIG, "[Snapshots]\ntimeout_in_seconds = 120\n")
    assert gcp.check_timeout(str(tmp_path), 90).ok


def test_doctor_scripts_are_ours(tmp_path):
    assert not any(c.ok for c in gcp.check_scripts(str(tmp_path), FIXED))
    install(tmp_path, gcp.render_scripts(FIXED))
    assert all(c.ok for c in gcp.check_scripts(str(tmp_path), FIXED))
    Path(str(tmp_path) + gcp.PRE).write_text("#!/bin/sh\nsleep 1 &\n")
    assert [c.ok for c in gcp.check_scripts(str(tmp_path), FIXED)] == [False, True]
