"""Docs and exports that must not drift from the code."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import quiesce
import quiesce.testing
from quiesce import hookspecs

ROOT = Path(__file__).resolve().parents[1]
AUTHOR_DOCS = ROOT / "docs" / "writing-adapters.md"


def hookspec_functions() -> dict[str, object]:
    marker = f"{hookspecs.PROJECT}_spec"  # what pluggy's HookspecMarker sets
    return {name: fn for name, fn in vars(hookspecs).items()
            if inspect.isfunction(fn) and hasattr(fn, marker)}


def _annotation(annotation: object) -> str:
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def signature_text(fn) -> str:
    """``name(param: Type, ...) -> Return``, as written in core/hookspecs.py."""
    sig = inspect.signature(fn)
    params = ", ".join(p.name if p.annotation is p.empty
                       else f"{p.name}: {_annotation(p.annotation)}"
                       for p in sig.parameters.values())
    returns = ("" if sig.return_annotation is sig.empty
               else f" -> {_annotation(sig.return_annotation)}")
    return f"{fn.__name__}({params}){returns}"


def test_the_hookspecs_are_the_five_hooks_and_register_commands():
    assert set(hookspec_functions()) == {"validate", "check", "flush", "quiesce", "thaw",
                                         "register_commands"}


@pytest.mark.parametrize("hook", sorted(hookspec_functions()))
def test_every_hook_is_documented_under_its_exact_signature(hook):
    expected = signature_text(hookspec_functions()[hook])
    headings = re.findall(r"^#{2,4} `([^`]+)`\s*$", AUTHOR_DOCS.read_text(), re.MULTILINE)
    assert expected in headings, (
        f"docs/writing-adapters.md has no section headed `{expected}` (the signature in "
        f"core/hookspecs.py); headings found: {headings}")


def test_no_documented_hook_is_stale():
    hooks = hookspec_functions()
    documented = re.findall(r"^#{2,4} `(\w+)\(", AUTHOR_DOCS.read_text(), re.MULTILINE)
    assert sorted(documented) == sorted(hooks), "a documented hook is not in core/hookspecs.py"


def test_the_author_docs_list_every_promise_of_the_kit():
    text = " ".join(AUTHOR_DOCS.read_text().split())  # line breaks do not matter
    missing = [p for p in quiesce.testing.PROMISES.values() if p not in text]
    assert missing == []
    contract = quiesce.testing.AdapterContract
    tests = [name for name in dir(contract) if name.startswith("test_")]  # its parts' too
    assert len(tests) >= 14
    assert [t for t in tests if f"`{t}`" not in text] == []


@pytest.mark.parametrize("module", [quiesce, quiesce.testing], ids=lambda m: m.__name__)
def test_all_is_exported_and_sorted(module):
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == [], f"{module.__name__}.__all__ names what it does not export"
    assert module.__all__ == sorted(module.__all__), f"{module.__name__}.__all__ is not sorted"
    assert len(set(module.__all__)) == len(module.__all__)


def test_the_man_page_is_generated_from_the_current_cli():
    import runpy
    page = runpy.run_path(str(ROOT / "docs" / "manpage.py"))["page"]()
    assert (ROOT / "docs" / "quiesce.1").read_text() == page, "run `make man`"
    for name in ("freeze", "thaw", "example-config", "restore-prepare"):
        assert f".SS {name.replace('-', chr(92) + '-')}\n" in page


def test_shell_completion_completes_commands_and_host_names():
    import os
    import subprocess
    from .support.helpers import QUIESCE
    env = {**os.environ, "_QUIESCE_COMPLETE": "bash_complete"}

    def complete(words: str) -> list[str]:
        out = subprocess.run(QUIESCE, env={**env, "COMP_WORDS": words,
                                           "COMP_CWORD": str(len(words.split()) - 1)},
                             capture_output=True, text=True, timeout=30).stdout
        return [line.split(",", 1)[1] for line in out.splitlines() if line]

    assert complete("quiesce doc") == ["doctor"]
    assert complete("quiesce install az") == ["azure"]
    assert complete("quiesce install nothing-like-it") == []


def test_the_testing_extra_installs_what_quiesce_testing_imports():
    import tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(req.startswith("pytest") for req in extras["testing"])
    assert "quiesce[testing]" in AUTHOR_DOCS.read_text()


ARCHITECTURE = ROOT / "docs" / "architecture.md"
INVARIANTS_HEADING = "## Invariants and the tests that guard them"


def invariant_rows() -> dict[str, list[str]]:
    """Invariant number -> the test references (`tests/x.py` or `tests/x.py::name`) its row names."""
    section = ARCHITECTURE.read_text().split(INVARIANTS_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \|.*\| (.*) \|$", section, re.MULTILINE)
    return {number: re.findall(r"`(tests/[\w/]+\.py(?:::\w+)?)`", tests) for number, tests in rows}


def defined_tests(path: Path) -> set[str]:
    """Test functions of a module: at top level or in a class (then as `Class::test`, too)."""
    import ast
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{n.name}" for n in node.body
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def test_every_invariant_names_tests_that_exist():
    rows = invariant_rows()
    assert sorted(rows, key=int) == [str(n) for n in range(1, 9)], (
        f"{ARCHITECTURE.name}: the invariants table must have rows 1 to 8, found {sorted(rows)}")
    missing = []
    for number, references in rows.items():
        assert references, f"invariant {number} names no test"
        for reference in references:
            file, _, name = reference.partition("::")
            if not (ROOT / file).is_file():
                missing.append(f"invariant {number}: no file {file}")
            elif name and name not in defined_tests(ROOT / file):
                missing.append(f"invariant {number}: {file} has no test {name}")
    assert missing == [], f"{ARCHITECTURE.name} names tests that do not exist: {missing}"


# Names of documents that live outside the repository; the repository must stand alone.
OUTSIDE_DOCUMENTS = re.compile(r"\b(?:DESIGN|azure-host|databases|peers|style)\.md\b"
                               r"|\breference/\w|\.\./shared\b")


def test_nothing_cites_a_document_outside_the_repository():
    here = Path(__file__).resolve()
    places = ["core", "adapters", "tests", "benchmarks", "docs", "ansible", "adapter-template",
              "demo"]
    files = [ROOT / "README.md"] + [path for place in places
                                     for path in (ROOT / place).rglob("*")
                                     if path.is_file() and path != here
                                     and path.suffix in {".py", ".md", ".toml", ".yml", ".yaml",
                                                         ".sh", ".j2", ".txt", ".cfg", ".1", ""}]
    citing = [f"{path.relative_to(ROOT)}:{number}"
              for path in files
              for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
              if OUTSIDE_DOCUMENTS.search(line)]
    assert citing == [], "cite docs/ instead of a document the repository does not have"
