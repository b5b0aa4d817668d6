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
    from .helpers import QUIESCE
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
