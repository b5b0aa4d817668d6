"""Hosts as a plugin kind: discovery, third-party hosts through ``quiesce.hosts``, and a
fake third-party host (tests/fakes/fakehost) through install, doctor and rehearse.

The fake host is a real distribution on PYTHONPATH (a dist-info with an entry point), so
it is found exactly as a pip-installed one is. Its rehearsal freezes a loop filesystem
this test made, with SQLite on it, through quiesce's shared rehearsal step.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import pytest

from .support.helpers import make_sqlite, run, sqlite_writable, write_config

SHAPE = {"name": str, "description": str, "agent_present": bool, "bundled": bool}


def _hosts(*fakes: str) -> dict[str, dict]:
    proc = run(None, "hosts", "--json", fakes=fakes)
    assert proc.returncode == 0, proc.stderr
    return {h["name"]: h for h in json.loads(proc.stdout)}


def test_hosts_json_lists_bundled_and_third_party_hosts_with_their_agents(monkeypatch, tmp_path):
    agent = tmp_path / "fake-agent"
    agent.touch()
    monkeypatch.setenv("FAKEHOST_AGENT", str(agent))
    hosts = _hosts("fakehost")
    assert {"azure", "qemu-ga", "fakehost"} <= set(hosts)
    for h in hosts.values():
        for key, kind in SHAPE.items():
            assert isinstance(h[key], kind), (h, key)
        assert h["agent"] is None or isinstance(h["agent"], str)
        assert h["agent_present"] == (h["agent"] is not None)
    assert hosts["fakehost"]["bundled"] is False
    assert (hosts["fakehost"]["distribution"], hosts["fakehost"]["version"]) == ("quiesce-fakehost", "1.0")
    assert hosts["fakehost"]["agent"] == str(agent)
    assert hosts["azure"]["bundled"] is True
    assert hosts["qemu-ga"]["agent_present"] == os.access("/usr/sbin/qemu-ga", os.X_OK)
    monkeypatch.setenv("FAKEHOST_AGENT", str(tmp_path / "absent"))
    assert _hosts("fakehost")["fakehost"]["agent_present"] is False


def test_a_broken_third_party_host_is_one_warning_naming_it(monkeypatch):
    proc = run(None, "hosts", fakes=("fakehost", "brokenhost"))
    assert proc.returncode == 0, proc.stderr
    assert "fakehost" in proc.stdout and "shakyhost" not in proc.stdout
    [warning] = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert "'shakyhost' from quiesce-brokenhost 0.1 failed to load" in warning
    assert "QUIESCE_DISABLED_HOSTS=shakyhost" in warning
    assert "Traceback" not in proc.stderr
    monkeypatch.setenv("QUIESCE_STRICT_HOSTS", "1")
    proc = run(None, "hosts", fakes=("brokenhost",))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "shakyhost" in proc.stderr


def test_an_unknown_host_is_one_line_naming_the_known_ones(tmp_path):
    proc = run(None, "install", "vmware-nope", "--root", str(tmp_path))
    assert proc.returncode == 2
    assert "unknown host 'vmware-nope'; known hosts: aws-dlm, azure, gcp, qemu-ga, veeam, vmware" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_host_options_come_from_the_hosts_typed_options(tmp_path):
    proc = run(None, "install", "fakehost", "--help", fakes=("fakehost",))
    assert "--script-dir DIR" in proc.stdout and "--skip-post" not in proc.stdout
    proc = run(None, "rehearse", "fakehost", "--help", fakes=("fakehost",))
    assert "--script-dir DIR" in proc.stdout and "--skip-post" in proc.stdout
    proc = run(None, "install", "qemu-ga", "--help")
    assert "--enable-hook" in proc.stdout and "--agent-timeout" not in proc.stdout
    proc = run(None, "install", "azure", "--help")
    assert "--enable-hook" not in proc.stdout


@pytest.fixture
def fake_setup(tmp_path, monkeypatch):
    runtime = Path(tempfile.mkdtemp(prefix="quiesce-fakehost-", dir="/dev/shm"))
    monkeypatch.setenv("FAKEHOST_AGENT", str(tmp_path / "agent"))
    (tmp_path / "agent").touch()
    yield runtime
    run(None, "--config", str(tmp_path / "quiesce.toml"), "thaw")
    for path in sorted(runtime.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    runtime.rmdir()


@pytest.mark.root
def test_fake_third_party_host_installs_doctors_and_rehearses(tmp_path, loopfs, fake_setup):
    fs = loopfs()
    db = make_sqlite(fs.mountpoint / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}},
                          runtime_dir=str(fake_setup), max_hold=60)
    root = tmp_path / "root"
    proc = run(config, "install", "fakehost", "--root", str(root), "--log-dir",
               str(tmp_path / "log"), "--script-dir", "/opt/fake", fakes=("fakehost",))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("pre.sh", "post.sh"):
        st = (root / "opt/fake" / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o700
    manifest = json.loads((root / "etc/quiesce/installed-fakehost.json").read_text())
    assert set(manifest["files"]) == {"/opt/fake/pre.sh", "/opt/fake/post.sh",
                                      "/etc/tmpfiles.d/quiesce.conf", "/etc/logrotate.d/quiesce"}

    proc = run(config, "doctor", "fakehost", "--root", str(root), "--script-dir", "/opt/fake",
               "--json", fakes=("fakehost",))
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, report
    assert (report["host_code"], report["host_name"]) == (0, "Ready")
    checks = {f["check"]: f["ok"] for f in report["findings"]}
    assert checks["pre.sh is POSIX sh"] and checks["fake agent present"]
    assert checks["files match the config"]

    proc = run(config, "rehearse", "fakehost", "--root", str(root), "--script-dir", "/opt/fake",
               "--freeze", str(fs.mountpoint), "--wait", "0.2", "--json", fakes=("fakehost",))
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, report
    assert [(h["target"], h["status"], h["released_by"]) for h in report["holds"]] == [
        ("app", "ok", "thaw")]
    assert report["freeze"]["mounts"] == [str(fs.mountpoint)]
    assert sqlite_writable(db)

    # The same host with an agent that never runs post.sh: the result is not application-
    # consistent, the target stays held (until max_hold), and `quiesce thaw` releases it.
    proc = run(config, "rehearse", "fakehost", "--root", str(root), "--script-dir", "/opt/fake",
               "--skip-post", "--wait", "0", "--json", fakes=("fakehost",))
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == 1
    assert not sqlite_writable(db)
    assert run(config, "thaw").returncode == 0
    assert sqlite_writable(db)

    proc = run(config, "uninstall", "fakehost", "--root", str(root), "--script-dir", "/opt/fake",
               fakes=("fakehost",))
    assert proc.returncode == 0, proc.stderr
    assert not (root / "opt/fake/pre.sh").exists()


def test_doctor_without_a_host_checks_every_host_whose_agent_is_present(tmp_path, fake_setup):
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}},
                          runtime_dir=str(fake_setup))
    proc = run(config, "doctor", "--root", str(tmp_path / "root"), "--json", fakes=("fakehost",))
    report = json.loads(proc.stdout)
    checked = [h["host"] for h in report["hosts"]]
    expected = ["fakehost"] + (["qemu-ga"] if os.access("/usr/sbin/qemu-ga", os.X_OK) else [])
    assert checked == expected  # azure's agent is not on this machine: not checked
    # Nothing is installed under the root: no host would run quiesce.
    assert report["ok"] is False and proc.returncode == 1
    assert report["hosts"][0]["host_code"] == 1
    text = run(config, "doctor", "--root", str(tmp_path / "root"), fakes=("fakehost",))
    assert "== fakehost" in text.stdout and "== azure" not in text.stdout
    assert "fakehost: the next backup would NOT be application-consistent" in text.stdout


def test_two_hosts_share_the_system_files_in_any_install_and_uninstall_order(tmp_path):
    """tmpfiles.d and logrotate belong to every host that installed them: the last install
    may rewrite them (another log dir), and each host's uninstall still recognises them."""
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}},
                          runtime_dir=str(tmp_path / "run"))
    root = tmp_path / "root"
    for host, log_dir in (("azure", "log-a"), ("qemu-ga", "log-q")):
        proc = run(config, "install", host, "--root", str(root), "--log-dir",
                   str(tmp_path / log_dir))
        assert proc.returncode == 0, proc.stderr
    for host in ("azure", "qemu-ga"):
        proc = run(config, "uninstall", host, "--root", str(root))
        assert proc.returncode == 0, proc.stderr
    assert [p for p in root.rglob("*") if p.is_file()] == []
