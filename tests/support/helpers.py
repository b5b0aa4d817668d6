"""Shared helpers for tests that drive the real `quiesce` command."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

FAKES = Path(__file__).parents[1] / "fakes"
QUIESCE = [sys.executable, "-m", "quiesce"]


def write_config(directory: Path, targets: dict[str, dict], **settings) -> Path:
    """A private config file with a runtime dir and log file under *directory*."""
    settings.setdefault("runtime_dir", str(directory / "run"))
    settings.setdefault("log_file", str(directory / "log" / "quiesce.log"))
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    for name, table in targets.items():
        lines.append(f"[targets.{name}]")
        for key, value in table.items():
            if isinstance(value, dict):
                value = "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"
            else:
                value = json.dumps(value)
            lines.append(f"{key} = {value}")
    path = directory / "quiesce.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def env_with(*fake_dists: str) -> dict[str, str]:
    """The environment for a subprocess that sees the named fake distributions."""
    env = dict(os.environ)
    paths = [str(FAKES / name) for name in fake_dists]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
    return env


def run(config: Path | None, *args: str, fakes: tuple[str, ...] = (), timeout: float = 60,
        check_json: bool = False) -> subprocess.CompletedProcess:
    cmd = QUIESCE + (["--config", str(config)] if config else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env_with(*fakes), stdin=subprocess.DEVNULL)
    if check_json:
        proc.report = json.loads(proc.stdout)
    return proc


#: How often an emulated host looks at a running script in the tests (`--poll-interval`):
#: its end is noticed within this instead of the host's whole-second poll; the host's
#: timeouts keep their length, so every decision is the host's.
REHEARSAL_POLL = 0.05


def rehearse_host(host: str, config: Path, root: Path, *extra: str, fakes: tuple[str, ...] = (),
                  timeout: float = 90) -> subprocess.CompletedProcess:
    """`quiesce rehearse HOST --root ROOT --json --poll-interval REHEARSAL_POLL ...`; the
    parsed report is ``.report``."""
    proc = run(config, "rehearse", host, "--root", str(root), "--json",
               "--poll-interval", str(REHEARSAL_POLL), *extra, fakes=fakes, timeout=timeout)
    try:
        proc.report = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"rehearse printed no JSON (exit {proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}") from None
    assert proc.returncode == (0 if proc.report["code"] == 0 else 1), proc.stderr
    return proc


def make_sqlite(path: Path, journal_mode: str = "wal") -> Path:
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA journal_mode={journal_mode}")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    conn.commit()
    conn.close()
    return path


def sqlite_writable(path: Path, timeout: float = 0.2) -> bool:
    """Can another connection commit right now (waiting at most *timeout*)?"""
    conn = sqlite3.connect(path, timeout=timeout)
    try:
        conn.execute("INSERT INTO t (v) VALUES ('probe')")
        conn.commit()
        return True
    except sqlite3.OperationalError as e:
        assert "locked" in str(e), e
        return False
    finally:
        conn.close()


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def records(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def pids_with_args(*parts: str) -> list[int]:
    """The processes whose command line holds every one of *parts* as a whole argument."""
    wanted = {part.encode() for part in parts}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted <= set(argv):
            found.append(int(pid))
    return found
