"""Helpers for the Azure host tests: staged host roots, our own scripts, rehearsals.

A *host root* is a directory that stands for ``/`` (``--root``). Paths in the plugin
JSON are host paths (``/scripts/pre.sh``); the emulator looks them up under the root.
Scripts made here append one line per event to ``<tmp>/events`` (a real path, outside
the root), so a test sees which scripts ran, how often and in which order; the snapshot
step appends ``snapshot`` to the same file.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from .helpers import make_sqlite, records, rehearse_host, run, write_config

JSON_PATH = "/etc/azure/VMSnapshotScriptPluginConfig.json"
HOST_CONF_PATH = "/etc/azure/VMSnapshotPluginHost.conf"
WORKLOAD_CONF_PATH = "/etc/azure/workload.conf"
PRE_PATH = "/etc/azure/quiesce-pre-script.sh"
POST_PATH = "/etc/azure/quiesce-post-script.sh"
NOBODY = 65534

#: A plugin JSON with every key explicit; tests override what they exercise.
BASE_JSON = {
    "pluginName": "ScriptRunner",
    "preScriptLocation": "/scripts/pre.sh",
    "postScriptLocation": "/scripts/post.sh",
    "preScriptParams": [],
    "postScriptParams": [],
    "preScriptNoOfRetries": 0,
    "postScriptNoOfRetries": 0,
    "timeoutInSeconds": 5,
    "continueBackupOnFailure": True,
    "fsFreezeEnabled": True,
    "ScriptsExecutionPollTimeSeconds": 1,
}


def under(root: Path, host_path: str) -> Path:
    """Where a host path lives under the staged root."""
    return root / host_path.lstrip("/")


class Stage:
    """A host root with our own pre/post scripts and plugin JSON, plus a quiesce config."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.root = tmp_path / "root"
        self.root.mkdir(exist_ok=True)
        self.events = tmp_path / "events"
        db = make_sqlite(tmp_path / "unused.db")
        # rehearse reads only runtime_dir from it (for the "held" lines): keep it private.
        self.config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}})

    def script(self, host_path: str, body: str, *, mode: int = 0o700, label: str | None = None,
               shebang: str = "#!/bin/sh", record: bool = True) -> str:
        """Write a script that first records ``<label>`` in the events file, then *body*.

        In *body*, ``$EV`` is replaced by the (quoted) events file. With record=False the
        file is *body* alone (after the shebang).
        """
        path = under(self.root, host_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        label = label or Path(host_path).stem
        ev = shlex.quote(str(self.events))
        first = f"echo {label} >> {ev}\n" if record else ""
        path.write_text(f"{shebang}\n{first}{body.replace('$EV', ev)}\n")
        path.chmod(mode)
        return host_path

    def scripts(self, pre: str = "exit 0", post: str = "exit 0", **kw) -> None:
        self.script("/scripts/pre.sh", pre, **kw)
        self.script("/scripts/post.sh", post, **kw)

    def write_json(self, overrides: dict | None = None, *, text: str | bytes | None = None,
                   mode: int = 0o600, drop: tuple[str, ...] = ()) -> Path:
        path = under(self.root, JSON_PATH)
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            data = {k: v for k, v in {**BASE_JSON, **(overrides or {})}.items() if k not in drop}
            text = json.dumps(data, indent=2)
        if isinstance(text, str):
            text = text.encode("utf-8")
        path.write_bytes(text)
        path.chmod(mode)
        return path

    def snapshot_args(self) -> list[str]:
        return ["--snapshot-command", f"echo snapshot >> {shlex.quote(str(self.events))}"]

    def rehearse(self, *extra: str, **kw):
        return rehearse(self.config, self.root, *self.snapshot_args(), *extra, **kw)

    def recorded(self) -> list[str]:
        return records(self.events)


def rehearse(config: Path, root: Path, *extra: str, fakes: tuple[str, ...] = (),
             timeout: float = 90):
    """`quiesce rehearse azure --root ROOT --json ...`; the parsed report is ``.report``."""
    return rehearse_host("azure", config, root, *extra, fakes=fakes, timeout=timeout)


def install(config: Path, root: Path, log_dir: Path, *extra: str, fakes: tuple[str, ...] = ()):
    return run(config, "install", "azure", "--root", str(root), "--log-dir", str(log_dir),
               *extra, fakes=fakes)


def result(report: dict) -> tuple:
    """(host code, consistency, health code): what the host would report."""
    return report["code"], report["consistency"], report["health_code"]


def timeline(report: dict) -> list[str]:
    return [e["event"] for e in report["timeline"]]


def edit_json(root: Path, **changes) -> None:
    """Change keys of an installed plugin JSON, keeping it 0600 as the host demands."""
    path = under(root, JSON_PATH)
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2) + "\n")
    path.chmod(0o600)
    os.chown(path, 0, 0)


def process_ended(pid: int) -> bool:
    """Gone, or a zombie (an orphan whose new parent does not reap it holds nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
