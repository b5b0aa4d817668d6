"""Installing a host's files, knowing which ones are ours, and checking them (doctor)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from .config import Config
from .errors import ConfigError
from .fsfreeze import fs_type
from .hosts import Host, InstallSettings
from .holder import freeze_budget

MANIFEST_DIR = "/etc/quiesce"
SHIM_MARKERS = ("/shims/", "/.pyenv/shims", "/.asdf/shims", "/mise/shims")
DASH = "/usr/bin/dash" if os.path.exists("/usr/bin/dash") else "/bin/sh"  # RHEL has no dash


def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def settings_for(config: Config, *, log_dir: str,
                 python: str | None = None) -> InstallSettings:
    python = python or sys.executable
    if not os.path.isabs(python) or any(m in python for m in SHIM_MARKERS):
        raise ConfigError(f"the interpreter {python} is a PATH lookup or a version-manager shim; "
                          f"run quiesce with the real interpreter (e.g. .venv/bin/python -m quiesce)")
    from . import thaw
    return InstallSettings(config=os.path.abspath(config.path), python=python,
                           thaw_script=os.path.abspath(thaw.__file__),
                           log_dir=os.path.abspath(log_dir), runtime_dir=config.runtime_dir,
                           freeze_timeout=freeze_budget(config))


class Installer:
    """Writes a host's files under its root and records them in a manifest."""

    def __init__(self, host: Host):
        self.host = host
        self.manifest_path = host.path(f"{MANIFEST_DIR}/installed-{host.name}.json")

    def manifest(self) -> dict[str, Any]:
        try:
            with open(self.manifest_path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return {"files": {}}

    def _save(self, manifest: dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(self.manifest_path), mode=0o700, exist_ok=True)
        _write(self.manifest_path, json.dumps(manifest, indent=2) + "\n", 0o600)

    def install(self, settings: InstallSettings, *, force: bool = False) -> list[str]:
        manifest = self.manifest()
        actions = []
        files = self.host.files(settings)
        # Check everything before writing anything: all or nothing.
        for hf in files:
            path = self.host.path(hf.path)
            current = _sha256(path)
            ours = manifest["files"].get(hf.path, {}).get("sha256")
            if current is not None and current != ours and not force:
                raise ConfigError(f"refusing to overwrite {path}: quiesce did not write it. "
                                  f"Rerun with --force to replace it; it will be backed up first")
        # The scripts write here on this machine: a real path, not under the host's root.
        os.makedirs(settings.log_dir, mode=0o700, exist_ok=True)
        for hf in files:
            path = self.host.path(hf.path)
            entry = manifest["files"].get(hf.path, {})
            current = _sha256(path)
            if current is not None and current != entry.get("sha256"):
                backup = f"{path}.quiesce-backup-{time.strftime('%Y%m%dT%H%M%S')}"
                shutil.copy2(path, backup)
                entry["backup"] = backup
                actions.append(f"backed up {path} to {backup}")
            _write(path, hf.content, hf.mode)
            entry["sha256"] = _sha256(path)
            manifest["files"][hf.path] = entry
            actions.append(f"wrote {path} (mode {hf.mode:04o})")
        manifest["settings"] = settings.__dict__
        self._save(manifest)
        return actions

    def uninstall(self, *, force: bool = False) -> list[str]:
        manifest = self.manifest()
        if not manifest["files"]:
            return [f"nothing to remove: {self.manifest_path} lists no files"]
        for name, entry in manifest["files"].items():
            path = self.host.path(name)
            current = _sha256(path)
            if current is not None and current != entry["sha256"] and not force:
                raise ConfigError(f"refusing to remove {path}: it changed since quiesce wrote it. "
                                  f"Rerun with --force to remove it anyway")
        actions = []
        for name, entry in manifest["files"].items():
            path = self.host.path(name)
            if os.path.exists(path):
                os.unlink(path)
                actions.append(f"removed {path}")
            if entry.get("backup") and os.path.exists(entry["backup"]):
                os.replace(entry["backup"], path)
                actions.append(f"restored {path} from {entry['backup']}")
        os.unlink(self.manifest_path)
        return actions


def _write(path: str, content: str, mode: int) -> None:
    """Write atomically with *mode* from the start (never briefly readable by others)."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.quiesce-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, content.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def finding(name: str, ok: bool, message: str, *, warning: bool = False) -> dict[str, Any]:
    return {"check": name, "ok": ok, "warning": warning, "message": message}


def _host_wait_findings(host: Host, config: Config) -> list[dict[str, Any]]:
    """A warning when `freeze` may outlast the host's wait for the pre-script (Azure caps
    it at 1800 s): the host would then snapshot before every target is held."""
    waits = getattr(getattr(host, "plugin_config", None), "timeout", None)
    budget = freeze_budget(config)
    if not isinstance(waits, (int, float)) or budget <= waits:
        return []
    return [finding("the host waits for freeze", True, warning=True, message=(
        f"freeze may take up to {budget:.0f} s (3 phases at 4 x timeout + 5 s each, then "
        f"the holder's acknowledgement; "
        f"timeout {max(t.timeout for t in config.targets):g} s), but the host waits only "
        f"{waits:g} s for the pre-script and then snapshots without the databases held; "
        f"lower the largest timeout"))]


def doctor_checks(host: Host, installer: Installer, config: Config | None,
                  config_error: str | None, check_outcomes: list | None) -> list[dict[str, Any]]:
    """quiesce's own checks of an installation, beyond what the host validates."""
    findings = []
    settings = installer.manifest().get("settings")
    if settings is None:
        findings.append(finding("installed", False, f"{installer.manifest_path} is missing: "
                                                    f"run `quiesce install {host.name}`"))
    for hf_role, path in (("pre-script", getattr(host, "plugin_config", None) and
                           host.plugin_config.pre),
                          ("post-script", getattr(host, "plugin_config", None) and
                           host.plugin_config.post)):
        if not path or not os.path.isfile(host.path(path)):
            continue
        proc = subprocess.run([DASH, "-n", host.path(path)], capture_output=True, text=True)
        findings.append(finding(f"{hf_role} is POSIX sh", proc.returncode == 0,
                                proc.stderr.strip() or f"{path} parses with dash -n"))
    if settings:
        for key in ("python", "thaw_script"):
            path = settings[key]
            usable = os.path.isfile(path) and (key != "python" or os.access(path, os.X_OK))
            findings.append(finding(f"{key} exists", usable, f"{path}" if usable else
                                    f"{path} is missing; reinstall quiesce or run `quiesce install "
                                    f"{host.name}` again"))
        log_dir = settings["log_dir"]
        findings.append(finding("log directory exists", os.path.isdir(log_dir),
                                f"{log_dir}" if os.path.isdir(log_dir) else
                                f"{log_dir} is missing, so the scripts cannot log and fail; run "
                                f"`quiesce install {host.name}` again"))
        if config is not None:
            current = settings_for(config, log_dir=settings["log_dir"], python=settings["python"])
            stale = [hf.path for hf in host.files(current)
                     if _sha256(host.path(hf.path)) != hashlib.sha256(hf.content.encode()).hexdigest()]
            findings.append(finding("files match the config", not stale,
                                    "up to date" if not stale else
                                    f"{', '.join(stale)} differ from what the current config "
                                    f"needs; run `quiesce install {host.name}` again"))
    if config_error:
        findings.append(finding("config is valid", False, config_error))
    elif config is not None:
        findings.append(finding("config is valid", True, config.path))
        kind = fs_type(config.runtime_dir if os.path.exists(config.runtime_dir)
                       else os.path.dirname(config.runtime_dir))
        findings.append(finding("runtime_dir is on tmpfs", kind in {"tmpfs", "ramfs"},
                                f"{config.runtime_dir} is on {kind}" + (
                                    "" if kind in {"tmpfs", "ramfs"} else
                                    "; the holder writes there while disks are frozen and would "
                                    "hang: use a directory under /run")))
        if config.max_hold < 90:
            findings.append(finding("max_hold covers the host's freeze", True, warning=True,
                                    message=f"max_hold is {config.max_hold:g} s; the host may keep "
                                            f"disks frozen up to 60 s after the pre-script, so the "
                                            f"watchdog could release before the post-script"))
        findings += _host_wait_findings(host, config)
    for outcome in check_outcomes or ():
        findings.append(finding(f"target {outcome['target']} ({outcome['kind']}) check",
                                outcome["status"] == "ok", outcome.get("error") or "ok"))
    return findings
