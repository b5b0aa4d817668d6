"""The README's install section, run as written, and the sdist's contents.

The install test copies the checkout, runs the shell block of README.md's "Install"
section with /opt/quiesce replaced by a fresh virtual environment, and uses the installed
command the way a DBA would next. pip may answer from its local cache.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from .support.helpers import make_sqlite, write_config

ROOT = Path(__file__).resolve().parents[1]
VENV_IN_README = "/opt/quiesce"

pytestmark = pytest.mark.slow


def readme_install_commands() -> str:
    """The first ```sh block of the README's "## Install" section, as written."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Install\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Install' section"
    block = re.search(r"```sh\n(.*?)```", section.group(1), re.S)
    assert block, "the Install section has no ```sh block"
    return block.group(1)


def checkout_copy(dest: Path) -> Path:
    """The files of this checkout (tracked and new, not ignored), as a fresh clone has."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def test_the_readmes_install_section_works_as_written(tmp_path):
    commands = readme_install_commands()
    assert "pip wheel" in commands and "[all]" in commands
    checkout = checkout_copy(tmp_path / "checkout")
    venv = tmp_path / "opt-quiesce"
    script = commands.replace(VENV_IN_README, str(venv))
    proc = subprocess.run(["sh", "-e", "-x", "-c", script], cwd=checkout, capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Installed from the wheel the README built, not from the checkout (not editable).
    quiesce = venv / "bin" / "quiesce"
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import quiesce; print(quiesce.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert where.startswith(str(venv)), where
    assert list((checkout / "dist").glob("quiesce-*.whl"))

    version = subprocess.run([str(quiesce), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "version" in version.stdout, version.stderr
    adapters = subprocess.run([str(quiesce), "adapters", "--json"], capture_output=True,
                              text=True)
    assert adapters.returncode == 0, adapters.stderr
    drivers = {a["kind"]: a["driver_installed"] for a in json.loads(adapters.stdout)}
    assert drivers == dict.fromkeys(("mongodb", "mysql", "postgresql", "redis", "sqlite"),
                                    True), "[all] did not install every driver"

    config = write_config(tmp_path, {"app": {"kind": "sqlite",
                                             "path": str(make_sqlite(tmp_path / "a.db"))}})
    root = tmp_path / "root"
    install = subprocess.run([str(quiesce), "--config", str(config), "install", "azure",
                              "--root", str(root), "--log-dir", str(tmp_path / "log")],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    pre = (root / "etc" / "azure" / "quiesce-pre-script.sh").read_text()
    assert f"{venv}/bin/python" in pre, "the scripts must call the kept venv's interpreter"


def test_the_sdist_ships_the_package_docs_and_license_and_no_tests(tmp_path):
    out = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out),
                           str(checkout_copy(tmp_path / "checkout"))],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [sdist] = out.glob("quiesce-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "pyproject.toml", "core/cli.py", "adapters/mysql.py",
            "docs/azure.md", "docs/adapters/mysql.md", "docs/quiesce.1"} <= names
    # Tests without their conftest, helpers and servers cannot run: none are shipped.
    assert not [name for name in names if name.startswith("tests/")]
    # Every doc the README links to is in it.
    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\((docs/[^)#]+)\)", readme):
        assert link.rstrip("/") in names or any(n.startswith(link) for n in names), link
    assert "License-Expression: MIT" in tarfile.open(sdist).extractfile(
        f"{sdist.name.removesuffix('.tar.gz')}/PKG-INFO").read().decode()
