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

from . import sysfiles
from .config import Config
from .errors import ConfigError
from .fsfreeze import fs_type
from .hosts import DoctorContext, Finding, Host, HostFile, InstallSettings
from .holder import freeze_budget
from .runtime import unsafe_runtime_dir

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
                           freeze_timeout=freeze_budget(config), log_file=config.log_file)


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

    def extra(self, key: str) -> Any:
        """What a host recorded beside its files (e.g. how to undo an edit it made)."""
        return self.manifest().get(key)

    def set_extra(self, key: str, value: Any) -> None:
        manifest = self.manifest()
        manifest[key] = value
        self._save(manifest)

    def install(self, settings: InstallSettings, *, force: bool = False) -> list[str]:
        """Write what differs; an empty list when everything was already in place."""
        manifest = self.manifest()
        before = json.dumps(manifest, sort_keys=True)
        actions = []
        files = self.host.render(settings) + sysfiles.files(settings)
        shared = self._shared()  # another host's install may have written a shared file
        # Check everything before writing anything: all or nothing.
        for hf in files:
            path = self.host.path(hf.path)
            current = _sha256(path)
            ours = {manifest["files"].get(hf.path, {}).get("sha256"), _content_sha256(hf)}
            if current is not None and current not in ours | shared.get(hf.path, set()) \
                    and not force:
                raise ConfigError(f"refusing to overwrite {path}: quiesce did not write it. "
                                  f"Rerun with --force to replace it; it will be backed up first")
        # The scripts write here on this machine: a real path, not under the host's root.
        os.makedirs(settings.log_dir, mode=0o700, exist_ok=True)
        for hf in files:
            path = self.host.path(hf.path)
            entry = manifest["files"].get(hf.path, {})
            current = _sha256(path)
            if current == _content_sha256(hf) and _mode(path) == hf.mode:
                manifest["files"][hf.path] = {**entry, "sha256": current}
                continue  # already in place (a reinstall, or another host wrote it)
            if current is not None and current not in {entry.get("sha256"), _content_sha256(hf)} \
                    | shared.get(hf.path, set()):
                backup = f"{path}.quiesce-backup-{time.strftime('%Y%m%dT%H%M%S')}"
                shutil.copy2(path, backup)
                entry["backup"] = backup
                actions.append(f"backed up {path} to {backup}")
            _write(path, hf.content, hf.mode)
            entry["sha256"] = _sha256(path)
            manifest["files"][hf.path] = entry
            if hf.path in shared:
                self._hand_over(hf.path, entry["sha256"])
            actions.append(f"wrote {path} (mode {hf.mode:04o})")
        manifest["settings"] = settings.__dict__
        if json.dumps(manifest, sort_keys=True) != before:
            self._save(manifest)
        return actions

    def _other_manifests(self):
        """(path, manifest) of every other host's install under the same root."""
        directory = os.path.dirname(self.manifest_path)
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
            path = os.path.join(directory, name)
            if name.startswith("installed-") and name.endswith(".json") \
                    and path != self.manifest_path:
                with open(path, encoding="utf-8") as f:
                    yield path, json.load(f)

    def _shared(self) -> dict[str, set[str]]:
        """Files another host's manifest also lists (tmpfiles.d, logrotate), with the
        checksums it recorded: theirs too."""
        shared: dict[str, set[str]] = {}
        for _, manifest in self._other_manifests():
            for name, entry in manifest.get("files", {}).items():
                shared.setdefault(name, set()).add(entry.get("sha256"))
        return shared

    def _hand_over(self, name: str, sha: str | None) -> None:
        """A shared file we keep is now the other hosts' as it is (the last install of any
        host may have rewritten it), so their own uninstall recognises it."""
        for path, manifest in self._other_manifests():
            if name in manifest.get("files", {}) and sha is not None:
                manifest["files"][name]["sha256"] = sha
                _write(path, json.dumps(manifest, indent=2) + "\n", 0o600)

    def uninstall(self, *, force: bool = False) -> list[str]:
        manifest = self.manifest()
        if not manifest["files"]:
            return [f"nothing to remove: {self.manifest_path} lists no files"]
        shared = self._shared()
        for name, entry in manifest["files"].items():
            path = self.host.path(name)
            current = _sha256(path)
            written = {entry["sha256"]} | shared.get(name, set())
            if current is not None and current not in written and not force:
                raise ConfigError(f"refusing to remove {path}: it changed since quiesce wrote it. "
                                  f"Rerun with --force to remove it anyway")
        actions = []
        for name, entry in manifest["files"].items():
            path = self.host.path(name)
            if name in shared:
                self._hand_over(name, _sha256(path))
                actions.append(f"kept {path}: another host's install uses it")
                continue
            if os.path.exists(path):
                os.unlink(path)
                actions.append(f"removed {path}")
            if entry.get("backup") and os.path.exists(entry["backup"]):
                os.replace(entry["backup"], path)
                actions.append(f"restored {path} from {entry['backup']}")
        os.unlink(self.manifest_path)
        return actions


def _content_sha256(hf: HostFile) -> str:
    return hashlib.sha256(hf.content.encode("utf-8")).hexdigest()


def _mode(path: str) -> int | None:
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return None


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


def doctor_checks(host: Host, installer: Installer, context: DoctorContext) -> list[Finding]:
    """quiesce's own checks of an installation, the same for every host."""
    findings = []
    settings = installer.manifest().get("settings")
    if settings is None:
        findings.append(Finding("installed", False, f"{installer.manifest_path} is missing: "
                                                    f"run `quiesce install {host.name}`"))
    else:
        findings += _installed_checks(host, settings, context.config)
    if context.config_error:
        findings.append(Finding("config is valid", False, context.config_error))
    elif context.config is not None:
        config = context.config
        findings.append(Finding("config is valid", True, config.path))
        kind = fs_type(config.runtime_dir if os.path.exists(config.runtime_dir)
                       else os.path.dirname(config.runtime_dir))
        unsafe = unsafe_runtime_dir(config.runtime_dir)
        findings.append(Finding("runtime_dir is safe", unsafe is None, unsafe and (
            f"{unsafe}: another user could answer thaw in the holder's place, so freeze "
            f"refuses it; use a directory under /run") or config.runtime_dir))
        findings.append(Finding("runtime_dir is on tmpfs", kind in {"tmpfs", "ramfs"},
                                f"{config.runtime_dir} is on {kind}" + (
                                    "" if kind in {"tmpfs", "ramfs"} else
                                    "; the holder writes there while disks are frozen and would "
                                    "hang: use a directory under /run")))
        findings += sysfiles.doctor_findings(host, config)
    for outcome in context.check_outcomes:
        findings.append(Finding(f"target {outcome['target']} ({outcome['kind']}) check",
                                outcome["status"] == "ok", outcome.get("error") or "ok"))
    return findings


def _installed_checks(host: Host, settings: dict[str, Any], config: Config | None) -> list[Finding]:
    """The installed files against what they were rendered from, and what they call."""
    findings = []
    recorded = InstallSettings(**settings)
    for hf in host.render(recorded):
        path = host.path(hf.path)
        if hf.shell and os.path.isfile(path):
            proc = subprocess.run([DASH, "-n", path], capture_output=True, text=True)
            findings.append(Finding(f"{os.path.basename(hf.path)} is POSIX sh",
                                    proc.returncode == 0,
                                    proc.stderr.strip() or f"{hf.path} parses with dash -n"))
    for key in ("python", "thaw_script"):
        path = settings[key]
        usable = os.path.isfile(path) and (key != "python" or os.access(path, os.X_OK))
        findings.append(Finding(f"{key} exists", usable, f"{path}" if usable else
                                f"{path} is missing; reinstall quiesce or run `quiesce install "
                                f"{host.name}` again"))
    log_dir = settings["log_dir"]
    findings.append(Finding("log directory exists", os.path.isdir(log_dir),
                            f"{log_dir}" if os.path.isdir(log_dir) else
                            f"{log_dir} is missing, so the scripts cannot log and fail; run "
                            f"`quiesce install {host.name}` again"))
    if config is not None:
        current = settings_for(config, log_dir=log_dir, python=settings["python"])
        stale = [hf.path for hf in host.render(current)
                 if _sha256(host.path(hf.path)) != hashlib.sha256(hf.content.encode()).hexdigest()]
        findings.append(Finding("files match the config", not stale,
                                "up to date" if not stale else
                                f"{', '.join(stale)} differ from what the current config "
                                f"needs; run `quiesce install {host.name}` again"))
    return findings


def script_permissions(path: str, shown: str) -> Finding:
    """A script a root host runs: a regular file, root-owned, no group/other write, executable."""
    name = "permissions"
    try:
        st = os.stat(path)
    except OSError:
        return Finding(name, False, f"{shown} is missing: run `quiesce install`")
    mode = st.st_mode & 0o7777
    if not os.path.isfile(path):
        return Finding(name, False, f"{shown} is not a regular file")
    if mode & 0o022:
        return Finding(name, False, f"{shown} has mode {mode:04o}: group or others may write "
                                    f"it, and the host runs it as root; chmod go-w it")
    if not mode & 0o100:
        return Finding(name, False, f"{shown} is not executable (mode {mode:04o}): the host "
                                    f"execs it directly; chmod u+x it")
    if st.st_uid != os.geteuid():
        return Finding(name, False, f"{shown} is owned by uid {st.st_uid}, not by the user the "
                                    f"host runs as (uid {os.geteuid()})")
    return Finding(name, True, f"{shown} is mode {mode:04o}, owned by uid {st.st_uid}")
