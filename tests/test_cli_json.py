"""`--json` on every path: each command's failure modes print one JSON document on stdout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .support.helpers import make_sqlite, run, write_config


def _json(proc) -> dict:
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"stdout is not JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture
def configs(tmp_path) -> dict[str, Path]:
    """A missing, a broken (misspelt key), a failing (no database) and a good config."""
    out = {"missing": tmp_path / "missing.toml"}
    for name, table in (("broken", {"kind": "sqlite", "paht": "/x.db"}),
                        ("failing", {"kind": "sqlite", "path": str(tmp_path / "none.db")}),
                        ("good", {"kind": "sqlite", "path": str(make_sqlite(tmp_path / "a.db"))})):
        directory = tmp_path / name
        directory.mkdir()
        out[name] = write_config(directory, {"app": table})
    return out


COMMANDS = [
    ["check"], ["freeze"], ["thaw"], ["status"], ["exec", "--json", "--", "true"],
    ["install", "azure", "--root", "{root}"], ["uninstall", "azure", "--root", "{root}"],
    ["doctor", "azure", "--root", "{root}"], ["rehearse", "azure", "--root", "{root}"],
]


@pytest.mark.parametrize("config", ["missing", "broken", "failing", "good"])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_every_command_prints_json_on_every_path(tmp_path, configs, config, command):
    args = [a.replace("{root}", str(tmp_path / "root")) for a in command]
    if "--json" not in args:
        args.append("--json")
    proc = run(configs[config], *args, timeout=120)
    report = _json(proc)
    if proc.returncode == 2:  # a config error: where it is, as fields
        assert report["ok"] is False
        assert report["error"]["kind"] == "config"
        assert report["error"]["message"] in proc.stderr
    run(configs[config], "thaw")  # never leave a target held


def test_a_config_error_names_file_target_and_key_as_json(configs):
    proc = run(configs["broken"], "check", "--json")
    assert proc.returncode == 2
    assert _json(proc) == {"ok": False, "error": {
        "kind": "config", "file": str(configs["broken"]), "target": "app", "key": "paht",
        "message": f"{configs['broken']}: targets.app.paht: unknown key 'paht' for kind "
                   f"'sqlite'; did you mean `path`?"}}


@pytest.mark.parametrize("args", [
    ["check", "--json", "--no-such-option"],
    ["restore-prepare", "postgresql", "--datadir", "/nonexistent", "--label", "/x", "--json"],
    ["install", "no-such-host", "--json"],
])
def test_usage_errors_are_json_too(configs, args):
    proc = run(configs["good"], *args)
    assert proc.returncode == 2
    assert _json(proc)["ok"] is False


def test_exec_json_is_not_ok_when_the_snapshot_command_failed(configs):
    proc = run(configs["good"], "exec", "--json", "--", "false")
    report = _json(proc)
    assert (proc.returncode, report["ok"], report["command_status"]) == (1, False, 1)


def test_exec_names_the_snapshot_commands_status(configs):
    proc = run(configs["good"], "exec", "--", "sh", "-c", "exit 7")
    assert proc.returncode == 7
    assert "the snapshot command sh exited with status 7" in proc.stdout.splitlines()[0]


def test_without_json_a_config_error_leaves_stdout_empty(configs):
    proc = run(configs["broken"], "check")
    assert (proc.returncode, proc.stdout) == (2, "")
