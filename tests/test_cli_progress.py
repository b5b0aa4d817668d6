"""`quiesce freeze` shows progress per target and phase on a terminal, and nothing when
its output is not a terminal (the host's log, a script)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time

from .support.helpers import QUIESCE, env_with, make_sqlite, run, write_config


def _run_on_a_pty(argv: list[str], timeout: float = 60) -> tuple[int, str]:
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary,
                            env=env_with(), close_fds=True)
    os.close(secondary)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([primary], [], [], 0.5)
            if readable:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(primary)
    return proc.wait(timeout=timeout), out.decode(errors="replace").replace("\r\n", "\n")


def test_freeze_on_a_terminal_shows_each_target_and_phase(tmp_path):
    config = write_config(tmp_path, {
        "app": {"kind": "sqlite", "path": str(make_sqlite(tmp_path / "a.db"))},
        "logs": {"kind": "sqlite", "path": str(make_sqlite(tmp_path / "b.db"))}})
    try:
        code, out = _run_on_a_pty(QUIESCE + ["--config", str(config), "freeze"])
    finally:
        run(config, "thaw")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "freezing 2 target(s): check..."
    for phase in ("check", "flush", "quiesce"):
        for name in ("app", "logs"):
            assert any(line.startswith(f"  {phase:<8} {name} (sqlite): ok in ") for line in lines), out
    assert lines.index("flush...") < lines.index("quiesce...")
    assert any(line.startswith("holding 2 target(s)") for line in lines), out


def test_freeze_off_a_terminal_prints_only_its_report(tmp_path):
    config = write_config(tmp_path, {
        "app": {"kind": "sqlite", "path": str(make_sqlite(tmp_path / "a.db"))}})
    try:
        proc = run(config, "freeze")
    finally:
        run(config, "thaw")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "freezing" not in proc.stdout and "flush..." not in proc.stdout
