"""`quiesce rehearse azure`: the host's decision table, its validation codes
and the way it runs scripts (docs/azure.md, "Rehearsal"), with our own small scripts.

Each script appends its name to an events file and the snapshot step appends
``snapshot``, so every test sees what ran and in which order, not only what the report
claims. Runs use ScriptsExecutionPollTimeSeconds 1 (the host's minimum) and look at the
scripts every ``REHEARSAL_POLL`` (tests/support/helpers.py) rather than every second, so a
rehearsal takes as long as its scripts, not whole polls; the host's timeouts keep their
length. test_relative_root_rehearses_like_an_absolute_one runs at the host's own poll.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from quiesce.hosts.azure import AzureHost
from quiesce.hosts.azure_rules import SHIPPED_HOST_CONF

from .support.azurekit import (HOST_CONF_PATH, JSON_PATH, NOBODY, Stage, edit_json, install,
                       rehearse, result, timeline, under)
from .support.helpers import QUIESCE, make_sqlite, wait_until, write_config

FS = "file-system"
APP = "application"
SLOW = "sleep 4; echo {label}-end >> $EV"


@pytest.fixture
def stage(tmp_path):
    return Stage(tmp_path)


def ran(stage: Stage) -> list[str]:
    """Events in order, without the '-end' markers of scripts that outlived their timeout."""
    return [e for e in stage.recorded() if not e.endswith("-end")]


# ---------------------------------------------------------------- §4.4 decision table

ROWS = {
    # id: (JSON overrides, pre body, post body, what ran, host result, pre code, post code)
    "all-ok": ({}, "exit 0", "exit 0",
               ["pre", "snapshot", "post"], (0, APP, None), 0, 0),
    "pre-fails-continue": ({}, "exit 3", "exit 0",
                           ["pre", "snapshot", "post"], (1, FS, 300), 300, 0),
    "pre-times-out-continue": ({"timeoutInSeconds": 1}, SLOW, "exit 0",
                               ["pre", "snapshot", "post"], (1, FS, 308), 308, 0),
    "pre-fails-no-continue": ({"continueBackupOnFailure": False}, "exit 3", "exit 0",
                              ["pre", "post"], (2, "none", 300), 300, 0),
    "pre-times-out-no-continue": ({"continueBackupOnFailure": False, "timeoutInSeconds": 1},
                                  SLOW, "exit 0", ["pre", "post"], (2, "none", 308), 308, 0),
    "pre-fails-no-fsfreeze": ({"fsFreezeEnabled": False}, "exit 3", "exit 0",
                              ["pre", "post"], (2, "none", 300), 300, 0),
    "post-fails-continue": ({}, "exit 0", "exit 4",
                            ["pre", "snapshot", "post"], (1, FS, 301), 0, 301),
    "post-times-out-continue": ({"timeoutInSeconds": 1}, "exit 0", SLOW,
                                ["pre", "snapshot", "post"], (1, FS, 309), 0, 309),
    "post-fails-no-continue": ({"continueBackupOnFailure": False}, "exit 0", "exit 4",
                               ["pre", "snapshot", "post"], (2, "none", 301), 0, 301),
    "post-fails-no-fsfreeze": ({"fsFreezeEnabled": False}, "exit 0", "exit 4",
                               ["pre", "snapshot", "post"], (2, "none", 301), 0, 301),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_decision_table(stage, row):
    overrides, pre, post, expected_events, expected, pre_code, post_code = ROWS[row]
    stage.script("/scripts/pre.sh", pre.replace("{label}", "pre"))
    stage.script("/scripts/post.sh", post.replace("{label}", "post"))
    stage.write_json(overrides)
    report = stage.rehearse().report
    assert ran(stage) == expected_events
    assert result(report) == expected, report["timeline"]
    assert report["status"] == ("error" if expected[0] == 2 else "success")
    assert report["validation"]["code"] == 0
    assert (report["pre"]["code"], report["post"]["code"]) == (pre_code, post_code)
    assert (report["snapshot"] is not None) == ("snapshot" in expected_events)
    if report["snapshot"] is not None:
        assert report["snapshot"]["ok"]
    timed_out = [p for p in ("pre", "post") if report[p]["code"] in (308, 309)]
    for which in timed_out:
        # The host does not kill a script at its timeout: it finishes on its own, later.
        assert report[which]["still_running"] and report[which]["exit_status"] is None
        if which == "post":  # still running when the rehearsal ended
            assert "post-end" not in stage.recorded()
        assert wait_until(lambda: f"{which}-end" in stage.recorded(), timeout=6), \
            f"the timed-out {which}-script was killed"
        if which == "pre":  # it was still running while the post-script ran
            events = stage.recorded()
            assert events.index("post") < events.index("pre-end")


@pytest.mark.root
def test_no_fsfreeze_means_no_freeze_even_when_asked(stage, loopfs):
    fs = loopfs()
    stage.scripts()
    stage.write_json({"fsFreezeEnabled": False})
    probe = fs.mountpoint / "written-during-snapshot"
    report = rehearse(stage.config, stage.root, "--freeze", str(fs.mountpoint),
                      "--freeze-deadline", "5", "--snapshot-command",
                      f"echo snapshot >> {stage.events} && echo x > {probe}").report
    assert result(report) == (0, APP, None)
    assert report["freeze"] is None
    assert probe.read_text() == "x\n", "the snapshot step could not write: the mount was frozen"
    assert ran(stage) == ["pre", "snapshot", "post"]


# ---------------------------------------------------------------- §2 validation codes

def _valid(stage: Stage) -> None:
    stage.scripts()
    stage.write_json()


def _host_conf(stage: Stage, mode: int, text: str = SHIPPED_HOST_CONF, uid: int = 0) -> None:
    path = under(stage.root, HOST_CONF_PATH)
    path.write_text(text)
    path.chmod(mode)
    os.chown(path, uid, 0)


LOCATIONS = {"preScriptLocation": "/scripts/pre.sh", "postScriptLocation": "/scripts/post.sh"}
NOT_CONFIGURED = {
    # The JSON framework is not in effect: no script runs, a file-system consistent
    # snapshot is taken and no health code is recorded.
    "316-json-missing": (316, lambda s: s.scripts()),
    "305-bad-json": (305, lambda s: (s.scripts(), s.write_json(  # a trailing comma
        text=json.dumps(LOCATIONS)[:-1] + ",}"))),
    "305-bom": (305, lambda s: (s.scripts(), s.write_json(
        text=b"\xef\xbb\xbf" + json.dumps(LOCATIONS).encode()))),
    "305-missing-key": (305, lambda s: (s.scripts(), s.write_json(drop=("postScriptLocation",)))),
    "305-poll-not-a-number": (305, lambda s: (s.scripts(), s.write_json(
        {"ScriptsExecutionPollTimeSeconds": "fast"}))),
    "304-timeout-string": (304, lambda s: (s.scripts(), s.write_json({"timeoutInSeconds": "30"}))),
    "304-not-an-object": (304, lambda s: (s.scripts(), s.write_json(
        text=json.dumps([LOCATIONS])))),
    "314-host-conf-group-writable": (314, lambda s: (_valid(s), _host_conf(s, 0o664))),
    "314-host-conf-other-writable": (314, lambda s: (_valid(s), _host_conf(s, 0o646))),
    "314-host-conf-not-root": (314, lambda s: (_valid(s), _host_conf(s, 0o644, uid=NOBODY))),
    "304-host-conf-unparseable": (304, lambda s: (_valid(s), _host_conf(s, 0o644, "not ini\n"))),
}


@pytest.mark.parametrize("case", list(NOT_CONFIGURED))
def test_not_configured_codes_take_a_file_system_consistent_snapshot(stage, case):
    code, make = NOT_CONFIGURED[case]
    make(stage)
    report = stage.rehearse().report
    assert report["validation"]["code"] == code, report["validation"]
    assert result(report) == (1, FS, None)
    assert ran(stage) == ["snapshot"], "no script may run when validation failed"
    assert report["pre"] is None and report["post"] is None


def _mode(host_path: str, mode: int):
    return lambda s: under(s.root, host_path).chmod(mode)


def _owner(host_path: str):
    return lambda s: os.chown(under(s.root, host_path), NOBODY, 0)


SCRIPT_CODES = {
    # Validation failures with a health code; continueBackupOnFailure decides the snapshot.
    "302-pre-missing": (302, lambda s: under(s.root, "/scripts/pre.sh").unlink()),
    "302-pre-empty-location": (302, lambda s: edit_json(s.root, preScriptLocation="")),
    "303-post-missing": (303, lambda s: under(s.root, "/scripts/post.sh").unlink()),
    "306-pre-group-readable": (306, _mode("/scripts/pre.sh", 0o740)),
    "306-pre-other-executable": (306, _mode("/scripts/pre.sh", 0o701)),
    "306-pre-not-root": (306, _owner("/scripts/pre.sh")),
    "307-post-group-writable": (307, _mode("/scripts/post.sh", 0o720)),
    "307-post-not-root": (307, _owner("/scripts/post.sh")),
    "306-before-303": (306, lambda s: (_mode("/scripts/pre.sh", 0o755)(s),
                                       under(s.root, "/scripts/post.sh").unlink())),
}


@pytest.mark.parametrize("continue_", [True, False], ids=["continue", "no-continue"])
@pytest.mark.parametrize("case", list(SCRIPT_CODES))
def test_script_validation_codes(stage, case, continue_):
    code, make = SCRIPT_CODES[case]
    stage.scripts()
    stage.write_json({"continueBackupOnFailure": continue_})
    make(stage)
    report = stage.rehearse().report
    assert report["validation"]["code"] == code, report["validation"]
    assert report["pre"] is None and report["post"] is None
    if continue_:
        assert result(report) == (1, FS, code)
        assert ran(stage) == ["snapshot"]
    else:  # the host skips the snapshot and reports an error with the code
        assert result(report) == (2, "none", code)
        assert report["status"] == "error"
        assert ran(stage) == []


@pytest.mark.parametrize("continue_", [True, False], ids=["continue", "no-continue"])
@pytest.mark.parametrize("how", ["0644", "0700", "0640", "not-root"])
def test_317_json_permissions(stage, how, continue_):
    """The JSON is not read when its permissions are wrong: the snapshot is always taken."""
    stage.scripts()
    path = stage.write_json({"continueBackupOnFailure": continue_})
    if how == "not-root":
        os.chown(path, NOBODY, 0)
    else:
        path.chmod(int(how, 8))
    report = stage.rehearse().report
    assert report["validation"]["code"] == 317
    assert result(report) == (1, FS, 317)
    assert ran(stage) == ["snapshot"]


def test_313_no_host_conf_anywhere(stage, tmp_path):
    """rehearse always supplies the extension's own main/VMSnapshotPluginHost.conf, so
    313 is reachable only through validate() with an extension directory lacking it."""
    _valid(stage)
    bare = tmp_path / "extension"
    bare.mkdir()
    verdict = AzureHost(str(stage.root)).validate(str(bare))
    assert (verdict.code, verdict.name) == (313, "FailedPrepostPluginhostConfigNotFound")
    (bare / "main").mkdir()
    (bare / "main" / "VMSnapshotPluginHost.conf").write_text(SHIPPED_HOST_CONF)
    assert AzureHost(str(stage.root)).validate(str(bare)).code == 0


@pytest.mark.parametrize("what, mode", [
    ("json", 0o400), ("json", 0o200), ("pre", 0o600), ("pre", 0o500), ("post", 0o400),
    ("host-conf", 0o644), ("host-conf", 0o640), ("host-conf", 0o604), ("host-conf", 0o600),
    ("pre", 0o4700),  # setuid/setgid/sticky are beyond the last three octal digits
])
def test_modes_the_host_accepts(stage, what, mode):
    """The host's rules are looser than the docs: these all pass its validation."""
    _valid(stage)
    if what == "host-conf":
        _host_conf(stage, mode)
    else:
        path = {"json": under(stage.root, JSON_PATH), "pre": under(stage.root, "/scripts/pre.sh"),
                "post": under(stage.root, "/scripts/post.sh")}[what]
        path.chmod(mode)
    verdict = AzureHost(str(stage.root)).validate()
    assert verdict.code == 0, verdict


def test_host_conf_under_root_names_the_json(stage):
    """A custom /etc/azure/VMSnapshotPluginHost.conf decides which JSON the host reads."""
    stage.scripts()
    stage.write_json({"continueBackupOnFailure": False})
    other = under(stage.root, "/etc/azure/other.json")
    other.write_text(json.dumps({"preScriptLocation": "/scripts/nope.sh",
                                 "postScriptLocation": "/scripts/post.sh"}))
    other.chmod(0o600)
    _host_conf(stage, 0o644, SHIPPED_HOST_CONF.replace(JSON_PATH, "/etc/azure/other.json"))
    verdict = AzureHost(str(stage.root)).validate()
    assert verdict.code == 302 and "/scripts/nope.sh" in verdict.message


# ---------------------------------------------------------------- §3/§4 how scripts run


def test_retries_are_logged_but_the_script_runs_once(stage):
    stage.scripts(pre="exit 1", post="exit 5")
    stage.write_json({"preScriptNoOfRetries": 3, "postScriptNoOfRetries": 2})
    report = stage.rehearse().report
    assert ran(stage) == ["pre", "snapshot", "post"], "a retry re-ran a script"
    lines = timeline(report)
    assert lines.count("Prescript for ScriptRunner failed. Retrying...") == 3
    assert lines.count("Postscript for ScriptRunner failed. Retrying...") == 2
    assert (report["pre"]["retries_logged"], report["pre"]["exit_status"]) == (3, 1)
    assert (report["post"]["retries_logged"], report["post"]["exit_status"]) == (2, 5)
    assert result(report) == (1, FS, 300)  # the first script error is the health code
    assert report["post"]["code"] == 301


def test_params_are_separate_str_arguments(stage):
    body = 'echo "argc:$#" >> $EV; for a in "$@"; do echo "arg:$a" >> $EV; done'
    stage.scripts(pre=body, post=body)
    stage.write_json({"preScriptParams": ["a b", "", 7, 2.5, True, None, {"k": 1}],
                      "postScriptParams": "x y"})  # a bare string: iterated per character
    # Each element is str()-ed: True -> "True", None -> "None", an object -> its repr.
    report = stage.rehearse().report
    assert result(report) == (0, APP, None)
    events = stage.recorded()
    snap = events.index("snapshot")
    assert events[:snap] == ["pre", "argc:7", "arg:a b", "arg:", "arg:7", "arg:2.5", "arg:True",
                             "arg:None", "arg:{'k': 1}"]
    assert events[snap + 1:] == ["post", "argc:3", "arg:x", "arg: ", "arg:y"]


def test_scripts_run_through_sh_in_an_extension_directory(stage, tmp_path):
    """Shebangs are ignored: bash-shebang POSIX sh works (even without an exec bit), a
    Python script fails because sh runs it."""
    sh = os.path.realpath(shutil.which("sh"))
    stage.script("/scripts/pre.sh", shebang="#!/bin/bash", mode=0o400, body="\n".join([
        'echo "dollar0:$0" >> $EV',
        'echo "cwd:$(pwd)" >> $EV',
        '[ -f main/VMSnapshotPluginHost.conf ] && echo "cwd-has-main" >> $EV',
        'echo "shell:$(readlink /proc/$$/exe)" >> $EV',
    ]))
    marker = tmp_path / "python-ran"
    post = stage.script("/scripts/post.sh", shebang="#!/usr/bin/python3", record=False, body=(
        f"import sys\nopen({str(marker)!r}, 'w').write('yes')\nsys.exit(0)"))
    # The post-script is valid Python that succeeds when run by its shebang's interpreter.
    assert subprocess.run(["/usr/bin/python3", str(under(stage.root, post))]).returncode == 0
    marker.unlink()
    stage.write_json()
    report = stage.rehearse().report
    events = stage.recorded()
    assert events[0] == "pre" and "snapshot" in events
    facts = dict(e.split(":", 1) for e in events if ":" in e)
    assert facts["dollar0"] == str(under(stage.root, "/scripts/pre.sh"))
    assert facts["shell"] == sh, "the script was not interpreted by sh"
    assert "cwd-has-main" in events, "the cwd is not the extension directory"
    assert Path(facts["cwd"]).name.startswith("quiesce-azure-ext-")
    assert not Path(facts["cwd"]).exists(), "the extension directory was left behind"
    assert report["pre"]["argv"] == ["sh", str(under(stage.root, "/scripts/pre.sh"))]
    assert report["pre"]["code"] == 0
    assert report["post"]["code"] == 301 and report["post"]["exit_status"] != 0
    assert not marker.exists(), "the Python post-script ran as Python"
    assert result(report) == (1, FS, 301)


def test_output_pipes_are_never_read(stage):
    """200 KB on stdout fills the unread pipe: the script blocks until the timeout (308);
    10 KB on each of stdout and stderr fits in the pipes and finishes."""
    stage.scripts(pre="head -c 204800 /dev/zero && echo pre-done >> $EV",
                  post="head -c 10000 /dev/zero && head -c 10000 /dev/zero >&2 && "
                       "echo post-done >> $EV")
    stage.write_json({"timeoutInSeconds": 1})
    report = stage.rehearse().report
    assert report["pre"]["code"] == 308 and report["pre"]["still_running"]
    assert report["post"]["code"] == 0
    assert result(report) == (1, FS, 308)
    time.sleep(0.5)
    events = stage.recorded()
    assert "post-done" in events
    assert "pre-done" not in events, "the pre-script's 200 KB went through an unread pipe"


def test_fsfreeze_enabled_as_a_string_means_freeze_on(stage):
    """The host compares fsFreezeEnabled == False: the string "false" leaves it on, so a
    failed pre-script still gets a (file-system consistent) snapshot."""
    stage.scripts(pre="exit 3")
    stage.write_json({"fsFreezeEnabled": "false"})
    report = stage.rehearse().report
    assert report["validation"]["code"] == 0
    assert result(report) == (1, FS, 300)
    assert ran(stage) == ["pre", "snapshot", "post"]


# ---------------------------------------------------------------- bugs found


@pytest.mark.parametrize("value", [None, [1]], ids=["null", "list"])
def test_poll_of_the_wrong_type_is_304(stage, value):
    stage.scripts()
    stage.write_json({"ScriptsExecutionPollTimeSeconds": value})
    report = stage.rehearse().report
    assert report["validation"]["code"] == 304
    assert result(report) == (1, FS, None)


def test_continue_backup_on_failure_as_a_string_with_good_scripts(stage):
    stage.scripts()
    stage.write_json({"continueBackupOnFailure": "true"})
    report = stage.rehearse().report
    assert report["validation"]["code"] == 0
    assert result(report) == (0, APP, None)
    assert ran(stage) == ["pre", "snapshot", "post"]


def test_relative_root_rehearses_like_an_absolute_one(stage, tmp_path):
    stage.scripts()
    stage.write_json()
    proc = subprocess.run(QUIESCE + ["--config", str(stage.config), "rehearse", "azure",
                                     "--root", "root", "--json", *stage.snapshot_args()],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    report = json.loads(proc.stdout)
    assert result(report) == (0, APP, None), report["timeline"]


def test_holds_reported_belong_to_this_rehearsal(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}}, max_hold=60)
    root = tmp_path / "root"
    assert install(config, root, tmp_path / "log").returncode == 0
    first = rehearse(config, root, "--wait", "0").report
    assert result(first) == (0, APP, None)
    assert [h["target"] for h in first["holds"]] == ["app"]
    under(root, JSON_PATH).unlink()  # 316: the next rehearsal runs no script at all
    second = rehearse(config, root, "--wait", "0").report
    assert second["validation"]["code"] == 316 and second["pre"] is None
    assert second["holds"] == [], "a hold from the previous rehearsal is reported as this one's"
