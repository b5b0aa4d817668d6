"""The Ansible collection (ansible/), run for real against localhost with a local connection.

Everything the role writes goes under a temporary staging root (``quiesce_root``); the
runtime directory is on tmpfs (/dev/shm) so that doctor can pass. The targets are a real
SQLite database and a real password-protected Redis server whose password comes from an
Ansible Vault-encrypted variable. The tests run in order and share one deployment.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import make_sqlite
from tests.support.servers import RedisServer, skip_or_fail

# The role writes root-owned files; a playbook run takes seconds.
pytestmark = [pytest.mark.root, pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PLAYBOOK = BIN / "ansible-playbook"
REDIS_PASSWORD = "s3cret-from-vault"
VAULT_PASSWORD = "vault-key-for-the-test"
RECAP = re.compile(r"ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


class Deployment:
    def __init__(self, base: Path, redis: RedisServer):
        self.base, self.root = base, base / "root"
        self.root.mkdir()
        self.runtime = Path(f"/dev/shm/quiesce-ansible-{os.getpid()}")
        self.db = make_sqlite(base / "app.db")
        self.config = self.root / "etc/quiesce/quiesce.toml"
        self.quiesce = self.root / "opt/quiesce/bin/quiesce"
        self.collections = base / "collections"
        # As the README says: build the collection, install it, build the wheel.
        self._ansible("ansible-galaxy", "collection", "build", str(REPO / "ansible"),
                      "--output-path", str(base / "dist"))
        self._ansible("ansible-galaxy", "collection", "install", "-p", str(self.collections),
                      str(base / "dist/quiesce-quiesce-0.1.0.tar.gz"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                        str(base / "dist"), str(REPO)], check=True, capture_output=True)
        [self.wheel] = (base / "dist").glob("quiesce-*.whl")
        (base / "vault-pass").write_text(VAULT_PASSWORD)
        self.inventory = base / "inventory.yml"
        self.inventory.write_text(json.dumps({"all": {"hosts": {"localhost": self.host_vars(
            redis)}}}))
        secret = self._ansible("ansible-vault", "encrypt_string", "--vault-password-file",
                               str(base / "vault-pass"), REDIS_PASSWORD, "--name",
                               "vault_redis_password")
        (base / "vault.yml").write_text(secret.stdout)

    def host_vars(self, redis: RedisServer) -> dict:
        return {
            "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "quiesce_root": str(self.root), "quiesce_host": "azure",
            "quiesce_wheel": str(self.wheel), "quiesce_extras": ["redis"],
            "quiesce_settings": {"runtime_dir": str(self.runtime), "max_hold": 120,
                                 "log_file": str(self.root / "var/log/quiesce/quiesce.log")},
            "quiesce_targets": [
                {"name": "app", "kind": "sqlite", "path": str(self.db)},
                {"name": "cache", "kind": "redis", "url": f"redis://{redis.host}:{redis.port}",
                 "secrets": {"password_file": "{{ vault_redis_password }}"}},
            ],
        }

    def env(self) -> dict:
        return {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(self.collections),
                "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOME": str(self.base / "ansible-home"),
                "ANSIBLE_LOCAL_TEMP": str(self.base / "ansible-tmp"),
                "ANSIBLE_REMOTE_TEMP": str(self.base / "ansible-remote-tmp"),
                "ANSIBLE_RETRY_FILES_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}"}

    def _ansible(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True,
                              env=self.env(), cwd=self.base, timeout=600, check=True)

    def play(self, *args: str, playbook: str | None = None) -> subprocess.CompletedProcess:
        site = self.base / "site.yml"
        site.write_text("- hosts: all\n  gather_facts: false\n  roles:\n"
                        "    - quiesce.quiesce.agent\n")
        proc = subprocess.run(
            [str(PLAYBOOK), "-i", str(self.inventory), "-e", f"@{self.base / 'vault.yml'}",
             "--vault-password-file", str(self.base / "vault-pass"), playbook or str(site),
             *args], capture_output=True, text=True, env=self.env(), cwd=self.base, timeout=600)
        found = RECAP.search(proc.stdout)
        proc.recap = dict(zip(("ok", "changed", "unreachable", "failed"),
                              map(int, found.groups()))) if found else None
        return proc

    def quiesce_cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.quiesce), "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=120)

    def files(self) -> set[str]:
        """Every file and link under the staging root (directories apart)."""
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*")
                if not p.is_dir() or p.is_symlink()}


@pytest.fixture(scope="module")
def redis_with_password(request):
    if why := RedisServer.missing():
        skip_or_fail(why)
    server = RedisServer.create(password=REDIS_PASSWORD)
    request.addfinalizer(server.cleanup)
    return server


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, redis_with_password):
    if not PLAYBOOK.exists():
        skip_or_fail(f"{PLAYBOOK} is missing: pip install -e '.[test]'")
    if os.geteuid() != 0:
        skip_or_fail("the role writes root-owned files: run as root")
    deployment = Deployment(tmp_path_factory.mktemp("ansible"), redis_with_password)
    yield deployment
    if deployment.quiesce.exists():  # a test failed before absent: release anything held
        deployment.quiesce_cli("thaw")
    shutil.rmtree(deployment.runtime, ignore_errors=True)


def test_check_mode_on_a_fresh_host_writes_nothing(deployed):
    proc = deployed.play("--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.recap["changed"] > 0, "check mode predicted no change on a fresh host"
    assert deployed.files() == set()


def test_first_run_installs_and_the_second_changes_nothing(deployed):
    first = deployed.play()
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.recap["changed"] >= 5
    for path in ("etc/azure/VMSnapshotScriptPluginConfig.json", "etc/azure/quiesce-pre-script.sh",
                 "etc/tmpfiles.d/quiesce.conf", "etc/logrotate.d/quiesce",
                 "etc/quiesce/installed-azure.json"):
        assert (deployed.root / path).is_file(), path
    second = deployed.play()
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.recap["changed"] == 0, second.stdout
    check = deployed.play("--check")
    assert check.returncode == 0 and check.recap["changed"] == 0, check.stdout


def test_config_is_private_and_secrets_live_in_their_own_files(deployed):
    config = deployed.config
    st = config.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
    text = config.read_text()
    assert REDIS_PASSWORD not in text
    secret = deployed.root / "etc/quiesce/secrets/cache.password_file"
    assert f'password_file = "{secret}"' in text
    assert secret.read_text() == REDIS_PASSWORD
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    # The installed quiesce accepts it: both real targets pass their check.
    check = deployed.quiesce_cli("check", "--json")
    assert check.returncode == 0, check.stdout + check.stderr
    assert {o["target"] for o in json.loads(check.stdout)["outcomes"]} == {"app", "cache"}


def test_a_secret_no_target_uses_is_removed(deployed):
    stale = deployed.root / "etc/quiesce/secrets/gone.password_file"
    stale.write_text("old")
    stale.chmod(0o600)
    proc = deployed.play()
    assert proc.returncode == 0 and proc.recap["changed"] == 1, proc.stdout
    assert not stale.exists()
    assert (deployed.root / "etc/quiesce/secrets/cache.password_file").exists()


def test_fleet_report_has_the_last_cycle(deployed):
    assert deployed.quiesce_cli("freeze").returncode == 0
    thaw = deployed.quiesce_cli("thaw", "--json")
    assert thaw.returncode == 0, thaw.stdout + thaw.stderr
    status = json.loads(deployed.quiesce_cli("status", "--json").stdout)
    report_dir = deployed.base / "report"
    report_dir.mkdir()
    proc = deployed.play("-e", f"fleet_report_dir={report_dir}",
                         playbook="quiesce.quiesce.fleet_report")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [row] = json.loads((report_dir / "fleet-report.json").read_text())
    cycle = status["last_cycle"]
    assert row == {
        "host": "localhost", "targets": "app cache", "consistent": True, "doctor": "ok",
        "hold_seconds": max(t["hold_seconds"] for t in cycle["targets"]),
        "last_cycle": row["last_cycle"]}
    assert row["hold_seconds"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["last_cycle"])
    with open(report_dir / "fleet-report.csv", newline="") as f:
        [csv_row] = list(csv.DictReader(f))
    assert csv_row == {**{k: str(v) for k, v in row.items()}, "consistent": "true"}
    table = [line for line in proc.stdout.splitlines() if "localhost " in line and "app cache" in line]
    assert table and "yes" in table[0] and table[0].rstrip('",').endswith("ok"), proc.stdout


def test_detection_without_a_named_host(deployed):
    """With quiesce_host unset the role asks `quiesce hosts --json`; where that command is
    missing (it is being built), the play stops and says to set quiesce_host."""
    hosts = deployed.quiesce_cli("hosts", "--json")
    proc = deployed.play("-e", "quiesce_host=")
    if hosts.returncode != 0:
        assert proc.returncode != 0
        assert "cannot detect the snapshot hosts" in proc.stdout and "set quiesce_host" in proc.stdout
    else:  # untested here until `quiesce hosts` lands
        present = [h["name"] for h in json.loads(hosts.stdout) if h["agent_present"]]
        if not present:
            assert proc.returncode != 0 and "no snapshot host agent was found" in proc.stdout
        for name in present:
            assert f"(item={name})" in proc.stdout, proc.stdout


def test_a_doctor_failure_fails_the_play_with_its_finding(deployed):
    """Every target passes its check, but runtime_dir is on a disk: doctor says no."""
    on_disk = deployed.base / "overrides.json"
    on_disk.write_text(json.dumps({"quiesce_settings": {
        "runtime_dir": str(deployed.base / "run-on-disk"), "max_hold": 120}}))
    proc = deployed.play("-e", f"@{on_disk}")
    assert proc.returncode != 0 and proc.recap["failed"] == 1, proc.stdout
    assert "the next backup would NOT be application-consistent" in proc.stdout
    assert "would hang: use a directory under /run" in proc.stdout, proc.stdout


def test_a_broken_target_fails_the_play_with_quiesces_message(deployed):
    broken = deployed.base / "broken.json"
    targets = [{"name": "app", "kind": "sqlite", "path": str(deployed.base / "missing.db")}]
    broken.write_text(json.dumps({"quiesce_targets": targets}))
    proc = deployed.play("-e", f"@{broken}")
    assert proc.returncode != 0 and proc.recap["failed"] == 1, proc.stdout
    direct = deployed.quiesce_cli("check", "--json")  # the config the play just wrote
    assert direct.returncode != 0
    message = json.loads(direct.stdout)["outcomes"][0]["error"]
    assert message and message in proc.stdout, (message, proc.stdout)
    assert "quiesce check failed" in proc.stdout


def test_absent_removes_everything_it_wrote(deployed):
    proc = deployed.play("-e", "quiesce_state=absent", "-e", "quiesce_remove_logs=true")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert deployed.files() == set()
    assert not deployed.runtime.exists()
    assert deployed.db.exists(), "absent must never touch the databases"
    again = deployed.play("-e", "quiesce_state=absent", "-e", "quiesce_remove_logs=true")
    assert again.returncode == 0 and again.recap["changed"] == 0, again.stdout


def test_ansible_lint_passes(deployed):
    lint = BIN / "ansible-lint"
    if not lint.exists():
        skip_or_fail(f"{lint} is missing: pip install -e '.[test]'")
    proc = subprocess.run([str(lint), "--offline", "--nocolor"], capture_output=True, text=True,
                          cwd=REPO / "ansible", env=deployed.env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
