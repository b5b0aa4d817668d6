"""AWS Data Lifecycle Manager: the SSM document (rendered, parsed back), each status code
against a real quiesce hold, the SSM/DLM emulator's rules, and doctor's checks."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import yaml

from quiesce.hosts import aws_dlm
from quiesce.hosts.aws_dlm import DlmEmulator, InvalidParameters

from .support.helpers import run, write_config
from .support.hostkit import FIXED, compare, held, install, lines, real_settings

EXEC_ID = "0f0e0d0c-0b0a-0908-0706-050403020100"


def test_document_render_is_byte_exact():
    file = aws_dlm.render_document(FIXED)
    assert (file.path, file.mode) == (aws_dlm.DOCUMENT, 0o600)
    compare("aws-dlm", "aws-dlm-ssm-document.yaml", file.content)


def test_document_parses_back_with_what_dlm_requires():
    doc = yaml.safe_load(aws_dlm.render_document(FIXED).content)
    assert doc["schemaVersion"] == "2.2"
    params = doc["parameters"]
    assert params["command"]["allowedValues"] == ["pre-script", "post-script", "dry-run"]
    assert params["command"]["default"] == "dry-run"
    assert params["executionId"]["allowedPattern"] == aws_dlm.EXECUTION_ID
    step = doc["mainSteps"][0]
    assert step["action"] == "aws:runShellScript"
    assert step["precondition"] == {"StringEquals": ["platformType", "Linux"]}
    assert step["inputs"]["runCommand"] == [aws_dlm.render_script(FIXED)]


def test_create_document_command_and_scripts_block():
    assert aws_dlm.create_document_command() == (
        "aws ssm create-document --name quiesce-dlm --document-type Command "
        "--document-format YAML --content file:///etc/quiesce/aws-dlm-ssm-document.yaml "
        "--tags Key=DLMScriptsAccess,Value=true")
    block = json.loads("{" + aws_dlm.scripts_block(30, retries=2) + "}")["Scripts"]
    assert block == [{"Stages": ["PRE", "POST"], "ExecutionHandlerService": "AWS_SYSTEMS_MANAGER",
                      "ExecutionHandler": "quiesce-dlm", "ExecuteOperationOnScriptFailure": True,
                      "ExecutionTimeout": 35, "MaximumRetryCount": 2}]


@pytest.mark.parametrize("budget,timeout", [(1, 10), (30, 35), (200, 120)])
def test_execution_timeout_within_10_to_120(budget, timeout):
    assert aws_dlm.execution_timeout(budget) == timeout


@pytest.mark.parametrize("command,execution_id", [("freeze", "None"), ("pre-script", "x; rm"),
                                                  ("pre-script", EXEC_ID + "0")])
def test_ssm_refuses_parameters_outside_the_document(command, execution_id):
    with pytest.raises(InvalidParameters):
        aws_dlm.interpolate("{{ command }}", command, execution_id)


def test_interpolation():
    assert aws_dlm.interpolate("a {{command}} {{ executionId }} {{ other }}", "dry-run",
                               EXEC_ID) == f"a dry-run {EXEC_ID} {{{{ other }}}}"


@pytest.fixture
def real(tmp_path):
    config, settings = real_settings(tmp_path)
    yield config, DlmEmulator(aws_dlm.render_script(settings), timeout=60), tmp_path
    run(config, "thaw")


def code(emulator: DlmEmulator, command: str) -> int | None:
    return emulator.send(command, EXEC_ID).code


def test_dry_run_changes_nothing(real):
    config, ssm, _ = real
    assert code(ssm, "dry-run") == 0 and not held(config)


def test_pre_then_post(real):
    config, ssm, tmp_path = real
    assert code(ssm, "pre-script") == 0 and held(config)
    assert code(ssm, "post-script") == 0 and not held(config)
    assert f"executionId {EXEC_ID}: " in (tmp_path / "log" / "aws-dlm.log").read_text()


def test_204_pre_while_frozen(real):
    config, ssm, _ = real
    assert code(ssm, "pre-script") == 0
    assert code(ssm, "pre-script") == 204 and held(config)


def test_205_post_while_nothing_is_frozen(real):
    _, ssm, _ = real
    assert code(ssm, "post-script") == 205


def test_203_released_by_max_hold_before_post(tmp_path):
    config, settings = real_settings(tmp_path, max_hold=1)
    ssm = DlmEmulator(aws_dlm.render_script(settings), timeout=60)
    try:
        assert code(ssm, "pre-script") == 0
        while held(config):
            time.sleep(0.2)
        assert code(ssm, "post-script") == 203
    finally:
        run(config, "thaw")


def test_201_pre_failed(tmp_path):
    _, settings = real_settings(tmp_path)
    write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(tmp_path / "gone.db")}})
    ssm = DlmEmulator(aws_dlm.render_script(settings), timeout=60)
    assert code(ssm, "pre-script") == 201
    assert code(ssm, "dry-run") == 206     # dry-run checks every target


def test_206_config_not_ready(tmp_path):
    config, settings = real_settings(tmp_path)
    config.write_text(config.read_text() + "no_such_key = 1\n")
    ssm = DlmEmulator(aws_dlm.render_script(settings), timeout=60)
    assert code(ssm, "pre-script") == 206 and not held(config)


def test_202_post_failed(tmp_path):
    """A thaw that reports failure (here a thaw program that does) is 202."""
    _, settings = real_settings(tmp_path)
    failing = tmp_path / "thaw.py"
    failing.write_text('import json\nprint(json.dumps({"ok": False, "action": "released"}, '
                       'indent=2))\nraise SystemExit(1)\n')
    settings.thaw_script = str(failing)
    assert code(DlmEmulator(aws_dlm.render_script(settings), timeout=60), "post-script") == 202


def recording_script(tmp_path, pre: str = "exit 0", post: str = "exit 0") -> str:
    record = tmp_path / "record"
    return (f"#!/bin/sh\necho '{{{{ command }}}}' >>{record}\n"
            f"case '{{{{ command }}}}' in pre-script) {pre} ;; post-script) {post} ;; esac\n")


def test_post_only_after_a_successful_pre(tmp_path):
    ssm = DlmEmulator(recording_script(tmp_path, pre="exit 201"), retries=0)
    result = ssm.run(snapshot=lambda: None)
    assert result.snapshot == "crash-consistent" and lines(tmp_path / "record") == ["pre-script"]


def test_no_crash_consistent_fallback_when_disabled(tmp_path):
    taken = []
    ssm = DlmEmulator(recording_script(tmp_path, pre="exit 201"),
                      crash_consistent_on_failure=False)
    assert ssm.run(snapshot=lambda: taken.append(1)).snapshot == "none" and taken == []


def test_retries_rerun_a_failed_script(tmp_path):
    ssm = DlmEmulator(recording_script(tmp_path, post="exit 202"), retries=2)
    result = ssm.run()
    assert result.snapshot == "application-consistent" and not result.post_ok
    assert lines(tmp_path / "record") == ["pre-script"] + ["post-script"] * 3


def test_timeout_fails_the_attempt(tmp_path):
    ssm = DlmEmulator(recording_script(tmp_path, pre="sleep 5"), timeout=0.5, kill_grace=0.5)
    attempt = ssm.send("pre-script")
    assert attempt.timed_out and not attempt.ok


@pytest.mark.parametrize("retries", [-1, 4])
def test_retry_count_is_0_to_3(retries):
    with pytest.raises(ValueError):
        DlmEmulator("", retries=retries)


def test_rehearsal_holds_across_the_snapshot(real):
    config, ssm, _ = real
    seen = []
    result = ssm.run(EXEC_ID, snapshot=lambda: seen.append(held(config)))
    assert result.snapshot == "application-consistent" and result.post_ok and seen == [True]


def test_doctor_ssm_agent(tmp_path):
    assert not aws_dlm.check_ssm_agent(str(tmp_path)).ok
    install(tmp_path, [SimpleNamespace(path=aws_dlm.SSM_AGENT[0], content="", mode=0o755)])
    assert aws_dlm.check_ssm_agent(str(tmp_path)).ok


def test_doctor_timeout():
    assert aws_dlm.check_timeout(30, 35).ok
    assert not aws_dlm.check_timeout(30, 20).ok
    assert not aws_dlm.check_timeout(30, 300).ok


def test_doctor_max_hold():
    assert not aws_dlm.check_max_hold(120, 35).warning
    assert aws_dlm.check_max_hold(3600, 35).warning


def test_doctor_document_matches_config(tmp_path):
    assert not aws_dlm.check_document(str(tmp_path), FIXED).ok
    install(tmp_path, [aws_dlm.render_document(FIXED)])
    assert aws_dlm.check_document(str(tmp_path), FIXED).ok
    assert not aws_dlm.check_document(str(tmp_path), SimpleNamespace(**{**vars(FIXED),
                                                                       "config": "/other"})).ok
