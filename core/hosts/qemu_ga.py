"""The QEMU guest agent (qemu-ga): Proxmox VE, libvirt, OpenStack and KubeVirt.

How the agent runs quiesce (docs/hosts/qemu-ga.md has each fact with its upstream source):

* the hypervisor sends ``guest-fsfreeze-freeze`` (or ``-freeze-list``); qemu-ga runs its
  fsfreeze hook with ``freeze`` *before* it freezes, and with ``thaw`` *after*
  ``guest-fsfreeze-thaw`` has thawed;
* the hook runs only when qemu-ga was started with ``-F`` or its config file names
  ``fsfreeze-hook``; the stock hook is a dispatcher that runs every executable in the
  ``fsfreeze-hook.d`` next to it and always exits 0, so the hypervisor never learns that a
  database was not quiesced.

We install one script, ``fsfreeze-hook.d/quiesce``: on ``freeze`` it runs `quiesce freeze`
(disks are not frozen yet, so it may log to disk; the holder it leaves keeps its own log
in memory), on ``thaw`` the lean thaw client (disks are thawed again by then).
``--enable-hook`` also writes the agent's config key that turns hooks on. The rehearsal
(the hypervisor's part, and the agent's where qemu-ga is missing) is in
:mod:`quiesce.hosts.qemu_ga_emulation`.
"""

from __future__ import annotations

import configparser
import io
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any

from . import (DoctorContext, Finding, Host, HostFile, HostOptions, InstallSettings, Rehearsal,
               Verdict, option)
from . import qemu_ga_emulation, shell

AGENT_PATHS = ("/usr/sbin/qemu-ga", "/usr/bin/qemu-ga", "/usr/local/bin/qemu-ga")
#: The dispatcher qemu-ga runs for a bare -F (Debian, upstream), then RHEL's.
DISPATCHERS = ("/etc/qemu/fsfreeze-hook", "/etc/qemu-ga/fsfreeze-hook")
#: Where qemu-ga reads its config unless the binary names another (QGA_CONF_DEFAULT).
CONFIG_FILE = "/etc/qemu/qemu-ga.conf"
HOOK_NAME = "quiesce"  # no suffix: the dispatcher skips *.sample, *.dpkg-*, *~ and the like
AGENT_LOG = "qemu-ga-hook.log"

CODES = {0: "HooksRun", 1: "HookNotInstalled", 2: "DispatcherMissing", 3: "HooksDisabled",
         4: "OtherHookProgram"}


@dataclass
class QemuGaOptions(HostOptions):
    hook_dir: str = option("", "The agent's fsfreeze-hook.d [default: next to the dispatcher "
                               "this machine has: /etc/qemu or /etc/qemu-ga].", metavar="DIR")
    enable_hook: bool = option(False, "Also write the agent's qemu-ga.conf with fsfreeze-hook "
                                      "set, so qemu-ga runs hooks (restart the agent after).",
                               verbs=("install",))
    agent: str = option("", "The qemu-ga binary [default: the one installed].",
                        verbs=("doctor", "rehearse"), metavar="PATH")
    emulate: bool = option(False, "Emulate the agent (its dispatcher, FIFREEZE, FITHAW) even "
                                  "where qemu-ga is installed.", verbs=("rehearse",))
    agent_timeout: float = option(60.0, "How long the rehearsal, playing the hypervisor, waits "
                                        "for each reply of the agent.",
                                  verbs=("rehearse",), metavar="SECONDS")


def _verdict(code: int, message: str) -> Verdict:
    return Verdict(code, CODES[code], message)


def _running_agents() -> list[list[str]]:
    """The command lines of every qemu-ga process on this machine."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == "qemu-ga":
            found.append(argv)
    return found


def hook_from_argv(argv: list[str]) -> str | None:
    """The hook program a qemu-ga command line enables (-F/--fsfreeze-hook), or None."""
    for arg in argv[1:]:
        if arg in ("-F", "--fsfreeze-hook"):
            return DISPATCHERS[0]
        if arg.startswith("--fsfreeze-hook="):
            return arg.partition("=")[2]
        if arg.startswith("-F"):  # getopt's optional argument: attached, never separate
            return arg[2:]
    return None


class QemuGuestAgentHost(Host):
    name = "qemu-ga"
    description = "QEMU guest agent (Proxmox VE, libvirt, OpenStack, KubeVirt): fsfreeze hook"
    Options = QemuGaOptions
    agent_paths = AGENT_PATHS
    dispatchers = DISPATCHERS  # the stock ones, where the rehearsal looks when none is installed
    options: QemuGaOptions

    def agent_binary(self) -> str | None:
        return self.options.agent or self.agent()

    # -- where things are --------------------------------------------------------------

    def dispatcher(self) -> str:
        """The dispatcher whose fsfreeze-hook.d we install into (a path on the machine)."""
        if self.options.hook_dir:
            return os.path.join(os.path.dirname(self.options.hook_dir.rstrip("/")), "fsfreeze-hook")
        return next((d for d in DISPATCHERS if os.path.exists(self.path(d))), DISPATCHERS[0])

    def config_file(self) -> str:
        """The agent's config file, as compiled into the agent (distributions differ)."""
        try:
            with open(self.agent_binary() or "", "rb") as f:
                found = re.search(rb"\0(/[\w./-]+/qemu-ga\.conf)\0", f.read())
        except OSError:
            found = None
        return found.group(1).decode() if found else CONFIG_FILE

    def hook_dir(self) -> str:
        return self.options.hook_dir.rstrip("/") or self.dispatcher() + ".d"

    def hook_path(self) -> str:
        return f"{self.hook_dir()}/{HOOK_NAME}"

    # -- render --------------------------------------------------------------------------

    def render(self, settings: InstallSettings) -> list[HostFile]:
        how = ("qemu-ga's fsfreeze dispatcher runs this file with `freeze` before the agent\n"
               "freezes the filesystems and with `thaw` after it has thawed them. Its exit\n"
               "status never reaches the hypervisor: `quiesce status` and our log tell.")
        hook = ("#!/bin/sh\n" + shell.header("the QEMU guest agent (qemu-ga)", settings, how) +
                "umask 077\n"
                'case "$1" in\n'
                "freeze)\n" + shell.indent(shell.freeze(settings, AGENT_LOG)) + "    ;;\n"
                "thaw)\n" + shell.indent(shell.thaw(settings, AGENT_LOG)) + "    ;;\n"
                "esac\n"
                "exit 0\n")
        files = [HostFile(self.hook_path(), hook, 0o700, shell=True)]
        if self.options.enable_hook:
            files.append(HostFile(self.config_file(), self._config_with_hook(), 0o644))
        return files

    def install(self, settings: InstallSettings, *, force: bool = False) -> list[str]:
        """Install, then say exactly what else the agent needs to run the hook."""
        actions = super().install(settings, force=force)
        verdict = self.predict()
        if verdict.code == 3:
            actions.append(f"NOTE: qemu-ga runs no fsfreeze hook yet. Rerun with --enable-hook, "
                           f"or set `fsfreeze-hook={self.dispatcher()}` under [general] in "
                           f"{self.config_file()} (or start qemu-ga with -F); then restart the agent")
        elif self.options.enable_hook and self.root == "/" and _running_agents():
            actions.append("NOTE: restart the agent (systemctl restart qemu-guest-agent): it "
                           f"reads {self.config_file()} only when it starts")
        return actions

    def _config_with_hook(self) -> str:
        """The agent's config with fsfreeze-hook set, keeping every other key it has."""
        parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
        parser.optionxform = str  # GKeyFile keys are case-sensitive
        parser.read(self.path(self.config_file()))
        if not parser.has_section("general"):
            parser.add_section("general")
        parser["general"]["fsfreeze-hook"] = self.dispatcher()
        out = io.StringIO()
        parser.write(out, space_around_delimiters=False)
        return out.getvalue()

    # -- doctor ----------------------------------------------------------------------------

    def enabled_hook(self) -> tuple[str | None, str]:
        """The hook program qemu-ga runs (None: hooks off) and where that was learned."""
        if self.root == "/":
            for argv in _running_agents():
                hook = hook_from_argv(argv)
                if hook:
                    return hook, f"the running agent's arguments ({' '.join(argv)})"
        parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
        config_file = self.config_file()
        try:
            parser.read(self.path(config_file))
            hook = parser.get("general", "fsfreeze-hook", fallback=None)
        except configparser.Error:
            hook = None
        if hook is not None:
            return hook or DISPATCHERS[0], f"{config_file} (fsfreeze-hook)"
        running = "no running qemu-ga has -F and " if self.root == "/" else ""
        return None, f"{running}{config_file} sets no fsfreeze-hook"

    def predict(self) -> Verdict:
        hook = self.path(self.hook_path())
        if not os.access(hook, os.X_OK):
            return _verdict(1, f"{self.hook_path()} is missing or not executable: run "
                               f"`quiesce install qemu-ga`")
        dispatcher = self.path(self.dispatcher())
        if not os.access(dispatcher, os.X_OK):
            return _verdict(2, f"{self.dispatcher()} (the dispatcher that runs "
                               f"{self.hook_dir()}) is missing or not executable")
        program, source = self.enabled_hook()
        if program is None:
            return _verdict(3, f"qemu-ga runs no hook: {source}. Run `quiesce install qemu-ga "
                               f"--enable-hook` (writes {self.config_file()}), then restart the agent")
        if os.path.realpath(self.path(program)) != os.path.realpath(dispatcher):
            return _verdict(4, f"qemu-ga runs {program} (from {source}), not {self.dispatcher()}: "
                               f"our hook runs only if that program runs {self.hook_dir()}")
        return _verdict(0, f"qemu-ga runs {program} (from {source}), which runs "
                           f"{self.hook_path()} with freeze and thaw")

    def host_checks(self, context: DoctorContext) -> list[Finding]:
        return [self._agent_finding(), *self._permission_findings(), *_confinement_findings(),
                *_max_hold_findings(context)]

    def _agent_finding(self) -> Finding:
        binary = self.agent_binary()
        if not binary:
            return Finding("qemu-ga is installed", False, f"no qemu-ga in {', '.join(AGENT_PATHS)}; "
                                                          f"install the qemu-guest-agent package")
        try:
            version = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                     timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired) as e:
            return Finding("qemu-ga is installed", False, f"{binary} does not run: {e}")
        return Finding("qemu-ga is installed", True, f"{binary}: {version}")

    def _permission_findings(self) -> list[Finding]:
        findings = []
        for what, path in (("dispatcher", self.dispatcher()), ("hook directory", self.hook_dir()),
                           ("hook", self.hook_path())):
            try:
                st = os.stat(self.path(path))
            except FileNotFoundError:
                continue
            loose = st.st_mode & 0o022
            findings.append(Finding(f"{what} is root's alone", st.st_uid == os.geteuid() and not loose,
                                    f"{path} is owned by uid {st.st_uid}, mode {st.st_mode & 0o777:04o}"
                                    + ("; anyone who can change it runs code as root at the next "
                                       "backup: chown root and chmod go-w" if loose else "")))
        return findings

    # -- rehearse -------------------------------------------------------------------------

    def rehearse(self, rehearsal: Rehearsal) -> dict[str, Any]:
        """Play the hypervisor: sync, freeze the named mounts, snapshot, thaw, status."""
        return qemu_ga_emulation.rehearse(self, rehearsal)


def _confinement_findings() -> list[Finding]:
    """SELinux or AppArmor confining the agent: RHEL's policy blocks hook scripts."""
    findings = []
    try:
        with open("/sys/fs/selinux/enforce") as f:
            if f.read().strip() == "1":
                findings.append(Finding("SELinux lets the agent run hooks", True, warning=True,
                                        message="SELinux is enforcing: the virt_qemu_ga_t domain "
                                                "may not run the hook; check `getsebool "
                                                "virt_qemu_ga_run_unconfined` and the hook's label"))
    except OSError:
        pass
    try:
        with open("/sys/kernel/security/apparmor/profiles") as f:
            confined = [line.strip() for line in f if "qemu-ga" in line and "enforce" in line]
        if confined:
            findings.append(Finding("AppArmor lets the agent run hooks", True, warning=True,
                                    message=f"AppArmor confines the agent ({'; '.join(confined)}): "
                                            f"the profile must allow the dispatcher, the hook and "
                                            f"the interpreter it calls"))
    except OSError:
        pass
    return findings


def _max_hold_findings(context: DoctorContext) -> list[Finding]:
    if context.config is None:
        return []
    return [Finding("max_hold against the hypervisor's freeze", True, warning=True,
                    message=f"max_hold is {context.config.max_hold:g} s. qemu-ga on Linux never "
                            f"thaws by itself; Proxmox VE and libvirt send guest-fsfreeze-thaw "
                            f"when their snapshot or backup start is done. If the thaw never "
                            f"comes, the disks stay frozen while the watchdog releases the "
                            f"databases at max_hold, and quiesce thaw reports the hold broken")]
