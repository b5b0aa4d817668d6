"""The plugin manager: bundled adapters, isolated third-party loading, conflicts."""

import json
import os
import sys

import pytest

from quiesce import AdapterConflictError, Target
from quiesce.plugins import DEFAULT_ADAPTERS, HOOKS, load_adapters

from .support.helpers import FAKES, run


def test_bundled_adapters_are_registered_under_their_kind():
    adapters = load_adapters(load_entrypoints=False)
    assert adapters.kinds() == sorted(DEFAULT_ADAPTERS)
    for info in adapters.info():
        assert info.bundled and info.distribution == "quiesce"
        assert set(info.hooks) <= set(HOOKS) and "quiesce" in info.hooks


def test_call_reaches_only_the_adapter_of_the_targets_kind(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(FAKES / "recorder"))
    adapters = load_adapters()
    record = tmp_path / "calls"
    target = Target("a", "recorder", {"record": str(record)})
    assert adapters.call("check", target) == {"checked": True}
    assert record.read_text() == "check a\n"


def test_third_party_adapter_is_listed_with_distribution_and_version():
    proc = run(None, "adapters", "--json", fakes=("recorder",))
    assert proc.returncode == 0, proc.stderr
    listed = {a["kind"]: a for a in json.loads(proc.stdout)}
    assert listed["recorder"] == {"kind": "recorder", "distribution": "quiesce-fake",
                                  "version": "1.0", "bundled": False,
                                  "hooks": ["validate", "check", "flush", "quiesce", "thaw"],
                                  "driver": None, "driver_installed": None,
                                  "driver_version": None}
    assert listed["sqlite"]["bundled"] is True


def test_broken_adapter_is_one_warning_and_does_not_take_the_tool_down():
    proc = run(None, "adapters", fakes=("recorder", "broken"))
    assert proc.returncode == 0
    assert "recorder" in proc.stdout and "shaky" not in proc.stdout
    [warning] = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert "adapter 'shaky' from quiesce-broken 0.3 failed to load" in warning
    assert "QUIESCE_DISABLED_ADAPTERS=shaky" in warning and "pip uninstall quiesce-broken" in warning


def test_broken_adapter_is_an_error_in_strict_mode(monkeypatch):
    monkeypatch.setenv("QUIESCE_STRICT_ADAPTERS", "1")
    proc = run(None, "adapters", fakes=("broken",))
    assert proc.returncode == 2 and "quiesce-broken" in proc.stderr


def test_external_adapters_can_be_disabled(monkeypatch):
    monkeypatch.setenv("QUIESCE_DISABLE_EXTERNAL_ADAPTERS", "1")
    proc = run(None, "adapters", fakes=("recorder", "broken"))
    assert proc.returncode == 0 and "recorder" not in proc.stdout and proc.stderr == ""


def test_one_external_adapter_can_be_disabled_by_kind(monkeypatch):
    monkeypatch.setenv("QUIESCE_DISABLED_ADAPTERS", "shaky")
    proc = run(None, "adapters", fakes=("recorder", "broken"))
    assert proc.returncode == 0 and "recorder" in proc.stdout and proc.stderr == ""


def test_two_adapters_for_one_kind_is_an_error_naming_both(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKES / "conflict"))
    with pytest.raises(AdapterConflictError) as info:
        load_adapters()
    message = str(info.value)
    assert "two adapters claim kind 'sqlite'" in message
    assert "quiesce 0.1.0" in message and "quiesce-sqlite-clone 2.0" in message
    proc = run(None, "adapters", fakes=("conflict",))
    assert proc.returncode == 2 and "quiesce-sqlite-clone" in proc.stderr


def test_help_imports_no_driver_and_no_adapter():
    code = ("import sys; from quiesce.cli import cli\n"
            "try: cli(['--help'])\nexcept SystemExit: pass\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "{'psycopg','pymysql','redis','pymongo'} or m.startswith('quiesce.adapters')]\n"
            "print(bad)")
    import subprocess, sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_a_missing_driver_is_one_line_naming_the_extra(tmp_path):
    from .support.helpers import write_config
    config = write_config(tmp_path, {"main": {"kind": "postgresql", "dsn": "host=127.0.0.1"}})
    proc = run(config, "check", "--json", fakes=("nodrivers",), check_json=True)
    assert proc.returncode == 1
    [outcome] = proc.report["outcomes"]
    assert outcome["status"] == "failed"
    # The pip of the environment quiesce runs in, not whichever pip is first on PATH.
    pip = os.path.join(os.path.dirname(sys.executable), "pip")
    assert outcome["error"] == ("the Python module 'psycopg' is not installed; "
                                f"install it with: {pip} install 'quiesce[postgresql]'")


def test_adapters_shows_whether_each_driver_is_importable_and_its_version():
    proc = run(None, "adapters", "--json", fakes=("nodrivers",), check_json=True)
    drivers = {a["kind"]: (a["driver"], a["driver_installed"], a["driver_version"])
               for a in proc.report}
    assert drivers["postgresql"] == ("psycopg", False, None)  # shadowed by the fake
    assert drivers["mysql"][:2] == ("pymysql", True)
    import pymysql
    assert drivers["mysql"][2] == pymysql.__version__ or drivers["mysql"][2].startswith("1.")
    text = run(None, "adapters", fakes=("nodrivers",)).stdout
    assert "psycopg NOT INSTALLED" in text
    assert "pymysql " + drivers["mysql"][2] in text


def test_adapters_add_commands_and_a_failing_one_is_only_a_warning():
    proc = run(None, "greeter-hello", "world", fakes=("commands",))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "greeting: hello world"
    assert "adapter 'clumsy' could not add its commands (RuntimeError: no commands today)" \
        in proc.stderr
    as_json = json.loads(run(None, "greeter-hello", "x", "--json", fakes=("commands",)).stdout)
    assert as_json["ok"] is True and as_json["result"] == {"greeting": "hello x"}
    # a core command is never replaced, and never loads the adapters' commands
    core = run(None, "example-config", fakes=("commands",))
    assert core.returncode == 0 and "hijacked" not in core.stdout and core.stderr == ""
    unknown = run(None, "no-such-command", fakes=("commands",))
    assert unknown.returncode == 2 and "No such command 'no-such-command'" in unknown.stderr
