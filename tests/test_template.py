"""adapter-template/: its exact file list, and that it works as copied after a rename.

The rename test follows the template's README checklist literally: it copies the
template, runs the checklist's rename script and its leftover check, installs quiesce
(from this checkout) and the renamed package into a fresh virtual environment, runs the
package's own tests there, and asks that environment's `quiesce adapters` for it.
Select it alone with ``pytest -m template``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "adapter-template"
#: Left behind by installing or testing the template in place; never part of it.
IGNORED = ("__pycache__", ".pytest_cache", "*.egg-info", "build", "dist", ".venv")

EXPECTED_FILES = {
    ".github/workflows/publish.yml",
    ".github/workflows/test.yml",
    ".gitignore",
    "LICENSE",
    "README.md",
    "pyproject.toml",
    "src/quiesce_example/__init__.py",
    "src/quiesce_example/kv.py",
    "src/quiesce_example/kvd.py",
    "tests/test_quiesce_example.py",
}


def files_of(root: Path) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if not any(Path(d).match(pattern) for pattern in IGNORED)]
        for name in filenames:
            if not name.endswith((".pyc", ".pyo")):
                found.add((Path(dirpath) / name).relative_to(root).as_posix())
    return found


def test_template_file_list_is_deliberate():
    assert files_of(TEMPLATE) == EXPECTED_FILES


def test_template_identity_and_entry_point():
    import tomllib
    project = tomllib.loads((TEMPLATE / "pyproject.toml").read_text())["project"]
    assert project["name"] == "quiesce-example"
    assert project["entry-points"]["quiesce.adapters"] == {"example": "quiesce_example"}
    assert any(dep.replace(" ", "").startswith("quiesce>=0.1") for dep in project["dependencies"])
    assert any(dep.startswith("pytest") for dep in project["optional-dependencies"]["test"])
    publish = (TEMPLATE / ".github/workflows/publish.yml").read_text()
    assert "name: release" in publish and "id-token: write" in publish
    assert "python-version: [" in (TEMPLATE / ".github/workflows/test.yml").read_text()
    assert (TEMPLATE / "LICENSE").read_text().startswith("MIT License")


def checklist_steps(readme: str) -> tuple[str, str]:
    """The rename script and the leftover check, exactly as the README gives them."""
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "python3 - widget <<'EOF'")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "EOF")
    script = textwrap.dedent("\n".join(lines[start + 1:end])) + "\n"
    [grep] = re.findall(r"`(grep -rnIiw [^`]+)`", readme)
    return script, grep


def clean_env(venv: Path) -> dict[str, str]:
    """No trace of this test run's environment: only the fresh venv's quiesce counts."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("QUIESCE_", "PYTHON", "VIRTUAL_ENV", "PYTEST"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.slow
@pytest.mark.template
def test_template_renamed_by_its_checklist_installs_and_passes_its_tests(tmp_path):
    # 1. copy, 2. rename with the README's script, 3. the README's leftover check
    work = tmp_path / "quiesce-widget"
    shutil.copytree(TEMPLATE, work, ignore=shutil.ignore_patterns(*IGNORED))
    script, grep = checklist_steps((work / "README.md").read_text())
    renamed = subprocess.run([sys.executable, "-", "widget"], input=script, cwd=work,
                             capture_output=True, text=True, timeout=60)
    assert renamed.returncode == 0, renamed.stderr
    leftover = subprocess.run(grep, shell=True, cwd=work, capture_output=True, text=True)
    assert (leftover.returncode, leftover.stdout) == (1, ""), leftover.stdout
    expected = {f.replace("quiesce_example", "quiesce_widget") for f in EXPECTED_FILES}
    assert files_of(work) == expected
    readme = (work / "README.md").read_text()
    assert readme.startswith("# quiesce-widget\n") and "Rename checklist" not in readme
    assert 'widget = "quiesce_widget"' in (work / "pyproject.toml").read_text()

    # 4. install into a fresh environment: quiesce from this checkout, then the package
    source = tmp_path / "quiesce-source"  # a copy: building in place would litter the repo
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("core", "adapters"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns(*IGNORED))
    venv = tmp_path / "venv"
    env = clean_env(venv)
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert made.returncode == 0, made.stderr
    python = str(venv / "bin" / "python")
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          str(source), f"{work}[test]"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert pip.returncode == 0, pip.stdout + pip.stderr

    # its own tests, with its own pytest
    junit = tmp_path / "junit.xml"
    tests = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            f"--junitxml={junit}"], cwd=work, capture_output=True, text=True,
                           timeout=300, env=env)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    cases = {c.get("name"): [child.tag for child in c]
             for c in ET.parse(junit).getroot().iter("testcase")}
    kit = {"test_check_takes_no_lock", "test_writes_are_blocked_while_held",
           "test_quiesce_then_thaw_leaves_the_application_writable",
           "test_thaw_after_the_holder_died", "test_lost_session_is_reported_as_broken_hold"}
    assert kit <= set(cases), sorted(cases)  # the conformance kit ran
    assert "test_discovered_through_its_entry_point" in cases
    assert {name: tags for name, tags in cases.items()
            if set(tags) & {"failure", "error", "skipped"}} == {}

    # and that environment's quiesce lists it, with its distribution and version
    listed = subprocess.run([str(venv / "bin" / "quiesce"), "adapters", "--json"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert listed.returncode == 0, listed.stderr
    [widget] = [a for a in json.loads(listed.stdout) if a["kind"] == "widget"]
    assert widget == {"kind": "widget", "distribution": "quiesce-widget", "version": "0.1.0",
                      "bundled": False, "hooks": ["validate", "check", "flush", "quiesce", "thaw"],
                      "driver": None, "driver_installed": None, "driver_version": None}
    assert not any(a["kind"] == "example" for a in json.loads(listed.stdout))
