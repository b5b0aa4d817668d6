"""Shared by the VMware, Google Cloud and AWS DLM host tests: fixed and real install
settings, recording scripts, and the byte-compare of rendered files."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import quiesce.thaw

from .helpers import make_sqlite, run, write_config

EXPECTED = Path(__file__).parent.parent / "expected"
#: Fixed settings: renders are pure functions of these, so the bytes never vary.
FIXED = SimpleNamespace(config="/etc/quiesce/quiesce.toml", python="/usr/bin/python3",
                        thaw_script="/usr/lib/python3/dist-packages/quiesce/thaw.py",
                        log_dir="/var/log/quiesce", runtime_dir="/run/quiesce",
                        freeze_timeout=30.0)


def compare(host: str, name: str, content: str) -> None:
    """Byte-compare with tests/expected/<host>/<name> (QUIESCE_REGEN_EXPECTED=1 rewrites)."""
    path = EXPECTED / host / name
    if os.environ.get("QUIESCE_REGEN_EXPECTED"):
        path.write_text(content)
    assert content == path.read_text(), f"{name} differs from {path}"


def real_settings(tmp_path: Path, **config) -> tuple[Path, SimpleNamespace]:
    """A SQLite config under tmp_path and the settings that point at this quiesce."""
    db = make_sqlite(tmp_path / "app.db")
    cfg = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}}, **config)
    (tmp_path / "log").mkdir(exist_ok=True)
    return cfg, SimpleNamespace(config=str(cfg), python=sys.executable,
                                thaw_script=os.path.abspath(quiesce.thaw.__file__),
                                log_dir=str(tmp_path / "log"),
                                runtime_dir=str(tmp_path / "run"), freeze_timeout=30.0)


def held(config: Path) -> bool:
    return '"held": true' in run(config, "status", "--json").stdout


def install(root: Path, files) -> None:
    for file in files:
        path = Path(str(root) + file.path) if file.path.startswith("/") else root / file.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(file.content)
        path.chmod(file.mode)


def recorder(path: Path, record: Path, *, code: int = 0, sleep: float = 0, extra: str = "",
             mode: int = 0o755) -> Path:
    """A script that appends its name and arguments to *record*, then exits *code*."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho \"$(basename \"$0\") $*\" >>{record}\n{extra}"
                    + (f"sleep {sleep}\n" if sleep else "") + f"exit {code}\n")
    path.chmod(mode)
    return path


def lines(record: Path) -> list[str]:
    return record.read_text().splitlines() if record.exists() else []
