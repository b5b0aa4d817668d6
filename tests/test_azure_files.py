"""`quiesce install / uninstall / doctor azure`: the files the Azure host reads.

The generated JSON and scripts are byte-compared with tests/expected/azure/ after the
paths that vary per run (the temporary directory, the interpreter, quiesce's thaw.py)
are replaced by placeholders. To regenerate the expected files after a deliberate change
run with QUIESCE_REGEN_EXPECTED=1 and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import quiesce.thaw

from .support.azurekit import JSON_PATH, POST_PATH, PRE_PATH, WORKLOAD_CONF_PATH, install, under
from .support.helpers import QUIESCE, make_sqlite, run, sqlite_writable, write_config

#: 2026-12-04T15:37:09.123+00:00 and a space: ISO 8601 with milliseconds and the offset.
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d ")
EXPECTED = Path(__file__).parent / "expected" / "azure"
FILES = {JSON_PATH: 0o600, PRE_PATH: 0o700, POST_PATH: 0o700}
JSON_TYPES = {
    "pluginName": str, "preScriptLocation": str, "postScriptLocation": str,
    "preScriptParams": list, "postScriptParams": list, "preScriptNoOfRetries": int,
    "postScriptNoOfRetries": int, "timeoutInSeconds": int, "continueBackupOnFailure": bool,
    "fsFreezeEnabled": bool, "ScriptsExecutionPollTimeSeconds": int,
}
PYTHON = sys.executable
THAW = os.path.abspath(quiesce.thaw.__file__)


@pytest.fixture
def setup(tmp_path):
    """A SQLite config, a host root and a log dir, all under tmp_path."""
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}}, max_hold=90)
    return config, tmp_path / "root", tmp_path / "log"


@pytest.fixture(autouse=True)
def no_holder_left(tmp_path):
    yield
    for config in tmp_path.glob("quiesce.toml"):
        run(config, "thaw")


def normalise(text: str, tmp_path: Path) -> str:
    for real, placeholder in ((PYTHON, "@PYTHON@"), (THAW, "@THAW@"), (str(tmp_path), "@TMP@")):
        text = text.replace(real, placeholder)
    return text


def installed(root: Path) -> dict[str, Path]:
    return {host_path: under(root, host_path) for host_path in FILES}


def snapshot_tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ the files themselves


def test_generated_files_match_the_expected_bytes(setup, tmp_path):
    config, root, log_dir = setup
    proc = install(config, root, log_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    regenerate = os.environ.get("QUIESCE_REGEN_EXPECTED") == "1"
    for host_path, path in installed(root).items():
        actual = normalise(path.read_text(encoding="utf-8"), tmp_path)
        expected_file = EXPECTED / Path(host_path).name
        if regenerate:
            expected_file.parent.mkdir(parents=True, exist_ok=True)
            expected_file.write_text(actual, encoding="utf-8")
        assert actual == expected_file.read_text(encoding="utf-8"), host_path
    # Nothing else is written under the root but our manifest and the machine's own files
    # (tmpfiles.d, logrotate), and no stray tmp files.
    assert sorted(snapshot_tree(root)) == sorted(
        [p.lstrip("/") for p in FILES] + ["etc/quiesce/installed-azure.json",
                                          "etc/tmpfiles.d/quiesce.conf", "etc/logrotate.d/quiesce"])


def test_modes_and_owner(setup):
    config, root, log_dir = setup
    assert install(config, root, log_dir).returncode == 0
    for host_path, path in installed(root).items():
        st = path.stat()
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == FILES[host_path], f"{host_path}: {oct(st.st_mode)}"
        assert (st.st_uid, st.st_gid) == (0, 0), host_path
    manifest = under(root, "/etc/quiesce/installed-azure.json")
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o600
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o700


def _strict_json(raw: bytes) -> dict:
    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f"duplicate keys in {keys}"
        return dict(pairs)

    return json.loads(raw.decode("utf-8"), parse_constant=no_constants,
                      object_pairs_hook=no_duplicates)


def test_json_is_utf8_without_bom_strict_and_fully_typed(setup):
    config, root, log_dir = setup
    assert install(config, root, log_dir).returncode == 0
    raw = under(root, JSON_PATH).read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf"), "a BOM makes the host fail with 305"
    data = _strict_json(raw)
    assert set(data) == set(JSON_TYPES), "every key explicit, no unknown key"
    for key, kind in JSON_TYPES.items():
        value = data[key]
        assert isinstance(value, kind) and not (kind is int and isinstance(value, bool)), \
            f"{key} = {value!r} is not a JSON {kind.__name__}"
    assert data["pluginName"] == "ScriptRunner"
    assert (data["preScriptLocation"], data["postScriptLocation"]) == (PRE_PATH, POST_PATH)
    assert all(isinstance(p, str) for p in data["preScriptParams"] + data["postScriptParams"])
    assert 1 <= data["ScriptsExecutionPollTimeSeconds"] <= 5
    # One sqlite target with the default 10 s timeout: 3 phases x (4 x 10 + 5) + 10 s.
    assert data["timeoutInSeconds"] == 165
    assert data["continueBackupOnFailure"] is True and data["fsFreezeEnabled"] is True


def test_timeout_is_capped_at_the_hosts_1800(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db), "timeout": 900}})
    assert install(config, tmp_path / "root", tmp_path / "log").returncode == 0
    assert json.loads(under(tmp_path / "root", JSON_PATH).read_text())["timeoutInSeconds"] == 1800


def _command_words(script: str) -> list[list[str]]:
    lines = [ln for ln in script.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [shlex.split(ln.replace("$(", " ").replace(")", " ")) for ln in lines]


def test_scripts_are_posix_sh_with_absolute_interpreters(setup):
    config, root, log_dir = setup
    assert install(config, root, log_dir).returncode == 0
    for host_path in (PRE_PATH, POST_PATH):
        path = under(root, host_path)
        text = path.read_text()
        assert text.startswith("#!/bin/sh\n")
        checked = subprocess.run(["dash", "-n", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
        pythons = [w for words in _command_words(text) for w in words if "python" in w]
        assert pythons, f"{host_path} calls no interpreter"
        for word in pythons:
            assert os.path.isabs(word), f"{host_path}: {word} is a PATH lookup"
            assert "/shims/" not in word and ".pyenv" not in word, f"{host_path}: {word} is a shim"
            assert os.path.isfile(word) and os.access(word, os.X_OK), word
        assert str(config) in text, "the scripts pass this machine's config explicitly"
        assert str(log_dir) in text, "the scripts log to the log dir"
    assert THAW in under(root, POST_PATH).read_text(), "the post-script uses the lean thaw path"


def test_scripts_run_as_the_host_runs_them_and_print_nothing(setup, tmp_path):
    """`sh <script>` from another directory: quiet on stdout/stderr, output in the logs."""
    config, root, log_dir = setup
    db = tmp_path / "app.db"
    assert install(config, root, log_dir).returncode == 0
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin"}  # the host's environment is not a login shell
    pre = subprocess.run(["sh", str(under(root, PRE_PATH))], cwd=elsewhere, env=env,
                         capture_output=True, timeout=60)
    assert (pre.returncode, pre.stdout, pre.stderr) == (0, b"", b"")
    assert not sqlite_writable(db), "the pre-script returned without the database held"
    post = subprocess.run(["sh", str(under(root, POST_PATH))], cwd=elsewhere, env=env,
                          capture_output=True, timeout=60)
    assert (post.returncode, post.stdout, post.stderr) == (0, b"", b"")
    assert sqlite_writable(db)
    assert "holding 1 target(s)" in (log_dir / "azure-pre-script.log").read_text()
    assert "released 1 target(s)" in (log_dir / "azure-post-script.log").read_text()
    assert list(elsewhere.iterdir()) == [], "the scripts wrote into the host's cwd"
    # Every line of both logs, the report's detail lines too, starts with its time.
    for name in ("azure-pre-script.log", "azure-post-script.log"):
        lines = (log_dir / name).read_text().splitlines()
        assert len(lines) >= 2, lines  # the summary and one line per target
        for line in lines:
            assert ISO_MS.match(line), f"{name}: {line!r}"
            stamp = datetime.fromisoformat(line.split(" ", 1)[0])
            assert abs(stamp.timestamp() - time.time()) < 600, line  # now, with its offset


# ------------------------------------------------------------------ install, again and --force


def test_reinstall_is_a_no_op(setup):
    config, root, log_dir = setup
    assert install(config, root, log_dir).returncode == 0
    before = snapshot_tree(root)
    again = install(config, root, log_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "backed up" not in again.stdout
    assert snapshot_tree(root) == before, "a second install changed or added files"


@pytest.mark.parametrize("host_path", list(FILES))
def test_foreign_file_is_refused_without_force(setup, host_path):
    config, root, log_dir = setup
    foreign = under(root, host_path)
    foreign.parent.mkdir(parents=True)
    foreign.write_text("written by someone else\n")
    foreign.chmod(0o600)
    proc = install(config, root, log_dir)
    assert proc.returncode == 2
    assert "--force" in proc.stderr and str(foreign) in proc.stderr
    assert foreign.read_text() == "written by someone else\n"
    # All or nothing: none of the other files was written either.
    assert snapshot_tree(root) == {foreign.relative_to(root).as_posix():
                                   (b"written by someone else\n", 0o600)}


def test_force_backs_up_and_uninstall_restores(setup):
    config, root, log_dir = setup
    path = under(root, JSON_PATH)
    path.parent.mkdir(parents=True)
    old = b'{"preScriptLocation": "/opt/mine/pre.sh", "postScriptLocation": "/opt/mine/post.sh"}\n'
    path.write_bytes(old)
    path.chmod(0o600)
    proc = install(config, root, log_dir, "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [backup] = path.parent.glob(path.name + ".quiesce-backup-*")
    assert backup.read_bytes() == old
    assert str(backup) in proc.stdout
    assert json.loads(path.read_text())["preScriptLocation"] == PRE_PATH
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    gone = run(config, "uninstall", "azure", "--root", str(root))
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert path.read_bytes() == old, "the user's own JSON was not restored"
    assert not backup.exists()
    assert not under(root, PRE_PATH).exists() and not under(root, POST_PATH).exists()
    assert not under(root, "/etc/quiesce/installed-azure.json").exists()


def test_uninstall_removes_what_install_wrote(setup):
    config, root, log_dir = setup
    assert install(config, root, log_dir).returncode == 0
    gone = run(config, "uninstall", "azure", "--root", str(root))
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert snapshot_tree(root) == {}
    assert "removed" in gone.stdout
    again = run(config, "uninstall", "azure", "--root", str(root))
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_uninstall_refuses_a_file_changed_since_install(setup):
    config, root, log_dir = setup
    assert install(config, root, log_dir).returncode == 0
    pre = under(root, PRE_PATH)
    pre.write_text(pre.read_text() + "# local change\n")
    proc = run(config, "uninstall", "azure", "--root", str(root))
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert pre.exists() and under(root, JSON_PATH).exists()
    assert run(config, "uninstall", "azure", "--root", str(root), "--force").returncode == 0
    assert not pre.exists()


# ------------------------------------------------------------------ workload.conf and doctor


def _doctor(config, root):
    proc = run(config, "doctor", "azure", "--root", str(root))
    return proc, [ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL")]


@pytest.fixture
def tmpfs_setup(tmp_path):
    """Like setup, but with runtime_dir on tmpfs (/dev/shm) so doctor can pass."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm tmpfs for the runtime directory")
    runtime = shm / f"quiesce-test-{os.getpid()}-{tmp_path.name}"
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}},
                          max_hold=120, runtime_dir=str(runtime))
    yield config, tmp_path / "root", tmp_path / "log"
    subprocess.run(["rm", "-rf", "--", str(runtime)], check=False)


def test_doctor_passes_on_a_clean_install(tmpfs_setup):
    config, root, log_dir = tmpfs_setup
    assert install(config, root, log_dir).returncode == 0
    proc, fails = _doctor(config, root)
    assert (proc.returncode, fails) == (0, []), proc.stdout
    assert "0 Success" in proc.stdout


def test_doctor_warns_when_freeze_may_outlast_the_hosts_capped_wait(tmpfs_setup):
    """timeout = 200: the JSON's timeoutInSeconds is capped at 1800 s, freeze may take
    3 x (4 x 200 + 5) s plus the holder's 30 s acknowledgement; doctor warns instead of promising an application-consistent one."""
    config, root, log_dir = tmpfs_setup
    config.write_text(config.read_text().replace("[targets.app]", "timeout = 200\n[targets.app]", 1))
    assert install(config, root, log_dir).returncode == 0
    assert json.loads((root / JSON_PATH.lstrip("/")).read_text())["timeoutInSeconds"] == 1800
    proc, fails = _doctor(config, root)
    assert fails == [], proc.stdout
    assert "warn  the host waits for freeze: freeze may take up to 2445 s" in proc.stdout
    assert "but the host waits only 1800 s" in proc.stdout
    assert proc.stdout.splitlines()[-1] == ("the next backup may not be application-consistent "
                                            "(see warn above)")


@pytest.mark.parametrize("value, conflict", [("mysql", True), ("postgres", True),
                                             ("", False), ("MySQL", False)])
def test_workload_conf_is_detected_by_install_and_doctor(tmpfs_setup, value, conflict):
    """workload_name set to a supported value makes the host ignore our JSON."""
    config, root, log_dir = tmpfs_setup
    conf = under(root, WORKLOAD_CONF_PATH)
    conf.parent.mkdir(parents=True)
    conf.write_text(f"[workload]\nworkload_name = {value}\ncommand_path = \ncredString = \n")
    proc = install(config, root, log_dir)
    doctor, fails = _doctor(config, root)
    if conflict:
        assert proc.returncode == 1
        assert re.search(rf"WARNING: .*workload_name = {value}", proc.stdout), proc.stdout
        assert doctor.returncode == 1
        assert len(fails) == 1 and f"workload_name = {value}" in fails[0], doctor.stdout
        assert "would NOT be application-consistent" in doctor.stdout
    else:  # empty (the template) or not exactly a supported name: the JSON flow runs
        assert proc.returncode == 0 and "WARNING" not in proc.stdout
        assert (doctor.returncode, fails) == (0, []), doctor.stdout
    assert under(root, JSON_PATH).exists(), "the files are installed either way"


def test_doctor_names_the_hosts_code_for_a_broken_install(tmpfs_setup):
    config, root, log_dir = tmpfs_setup
    assert install(config, root, log_dir).returncode == 0
    under(root, JSON_PATH).chmod(0o644)
    proc, fails = _doctor(config, root)
    assert proc.returncode == 1
    assert any("317 FailedPrepostPluginConfigPermissionError" in f for f in fails), proc.stdout
    under(root, JSON_PATH).chmod(0o600)
    under(root, POST_PATH).unlink()
    proc, fails = _doctor(config, root)
    assert any("303 FailedPrepostPostScriptNotFound" in f for f in fails), proc.stdout


# ------------------------------------------------------------------ bugs found


def test_a_failing_freeze_stamps_its_error_lines_too(tmp_path):
    """The pre-script's log has no shell loop stamping lines any more: freeze --stamp must
    stamp what it prints on every path, an error included."""
    proc = subprocess.run(QUIESCE + ["--config", str(tmp_path / "missing.toml"), "freeze",
                                     "--stamp"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines and all(ISO_MS.match(line) for line in lines), lines
    assert "missing.toml" in proc.stderr


def test_relative_log_dir_is_made_absolute(setup, tmp_path):
    config, root, _ = setup
    proc = subprocess.run(QUIESCE + ["--config", str(config), "install", "azure", "--root",
                                     str(root), "--log-dir", "log"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for host_path in (PRE_PATH, POST_PATH):
        text = under(root, host_path).read_text()
        assert f"{tmp_path}/log/azure-" in text, host_path
        assert text.count("log/azure-") == text.count(f"{tmp_path}/log/azure-"), host_path
