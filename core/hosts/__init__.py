"""Snapshot hosts: the programs that call quiesce around a snapshot.

A host is the second kind of plugin, beside adapters. Where an adapter is a set of hooks
called per target, a host is one class with the same five verbs for every host:

* :meth:`Host.render` the files the host needs, as values, byte-exact;
* :meth:`Host.install` / :meth:`Host.uninstall` write or remove them through a manifest
  (files quiesce did not write are refused without ``force``);
* :meth:`Host.doctor` predicts, from the host's own rules, what it will do with the
  installed files, then adds quiesce's own checks;
* :meth:`Host.rehearse` plays the host's part around a real freeze and a snapshot step.

Options are typed: each host declares an :class:`HostOptions` dataclass (``Options``);
the CLI generates its command-line options from the fields, and the host reads
``self.options``. Bundled hosts are registered by name in ``BUNDLED_HOSTS``; third-party
hosts arrive through the entry-point group ``quiesce.hosts`` and are loaded one by one,
as adapters are (see :mod:`quiesce.hosts.registry` and docs/writing-hosts.md).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from ..config import Config
    from ..snapshot import SnapshotStep

ENTRY_POINT_GROUP = "quiesce.hosts"
BUNDLED_HOSTS = {
    "azure": "quiesce.hosts.azure:AzureHost",
    "qemu-ga": "quiesce.hosts.qemu_ga:QemuGuestAgentHost",
    "vmware": "quiesce.hosts.vmware:VmwareHost",
    "veeam": "quiesce.hosts.vmware:VeeamHost",
    "gcp": "quiesce.hosts.gcp:GcpHost",
    "aws-dlm": "quiesce.hosts.aws_dlm:AwsDlmHost",
}
VERBS = ("install", "uninstall", "doctor", "rehearse")


@dataclass(frozen=True)
class HostFile:
    """One file a host needs: where it goes (absolute, as on the real machine).

    ``shell`` marks a POSIX sh script: doctor parses it with dash.
    """

    path: str
    content: str
    mode: int
    shell: bool = False


@dataclass
class InstallSettings:
    """What the generated files must point at."""

    config: str               # absolute path of the quiesce config
    python: str               # absolute interpreter path (never a PATH lookup or a shim)
    thaw_script: str          # absolute path of quiesce/thaw.py, for the lean post-script
    log_dir: str              # where the scripts send their output
    runtime_dir: str          # the holder's runtime directory (its thaw FIFO)
    freeze_timeout: float     # longest `quiesce freeze` may take for this config
    log_file: str | None = None  # quiesce's own log (the config's log_file), for logrotate


@dataclass
class Verdict:
    """What the host decides from its own rules about the installed files."""

    code: int                 # 0 = the host will run quiesce
    name: str
    message: str

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass
class Finding:
    """One line of doctor's report."""

    check: str
    ok: bool
    message: str
    warning: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "ok": self.ok, "warning": self.warning,
                "message": self.message}


def under(root: str, absolute: str) -> str:
    """Where *absolute* (a path on the real machine) is under a staging *root*."""
    root = os.path.abspath(root)
    return absolute if root == "/" else root.rstrip("/") + absolute


def agent_version(binary: str | None) -> str:
    """What ``BINARY --version`` prints ('' when it does not run)."""
    if not binary:
        return ""
    try:
        return subprocess.run([binary, "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def option(default: Any, help: str, *, verbs: tuple[str, ...] = VERBS,
           metavar: str | None = None) -> Any:
    """A field of a host's Options: its default, its --help text, the verbs that take it.

    The CLI option is the field name with dashes (``enable_hook`` -> ``--enable-hook``);
    a bool is a flag, a list is repeatable, anything else takes one value of its type.
    """
    meta = {"help": help, "verbs": verbs, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class HostOptions:
    """Base of every host's options. A host with none uses it as is."""


@dataclass
class Rehearsal:
    """What every rehearsal takes, whatever the host: the part quiesce plays around it."""

    snapshot: SnapshotStep
    freeze_mounts: list[str] = field(default_factory=list)
    allow_root_freeze: bool = False
    freeze_deadline: float = 60.0
    on_event: Callable[[float, str], None] | None = None
    runtime_dir: str | None = None  # the holder's, to read what quiesce itself saw
    # How often an emulated host looks at a running script; None: as often as the real
    # host. Shorter only makes it notice an end sooner: its timeouts keep their length.
    poll_interval: float | None = None


@dataclass
class DoctorContext:
    """What doctor knows about quiesce's side: the config (or why it failed to load)."""

    config: Config | None
    config_error: str | None
    check_outcomes: list[dict[str, Any]] = field(default_factory=list)


class Host(ABC):
    """Base class for a snapshot host. *root* re-roots every host path (staging, tests)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[HostOptions]] = HostOptions
    #: Where the host's agent may be installed; the first executable one is the agent.
    agent_paths: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str = "/", options: HostOptions | None = None):
        # Absolute: the host runs scripts from its own directory, not the caller's.
        self.root = os.path.abspath(root)
        self.options = options if options is not None else self.Options()

    def path(self, absolute: str) -> str:
        """Where *absolute* (a path on the real machine) is under this host's root."""
        return under(self.root, absolute)

    # -- discovery ---------------------------------------------------------------------

    @classmethod
    def agent(cls) -> str | None:
        """The host's agent on this machine (a path), or None when it is not installed."""
        return next((p for p in cls.agent_paths if os.access(p, os.X_OK)), None)

    # -- the five verbs ----------------------------------------------------------------

    @abstractmethod
    def render(self, settings: InstallSettings) -> list[HostFile]:
        """The files to install, with their contents and modes."""

    def install(self, settings: InstallSettings, *, force: bool = False) -> list[str]:
        """Write the rendered files and record them; returns what was done."""
        from ..install import Installer
        return Installer(self).install(settings, force=force)

    def uninstall(self, *, force: bool = False) -> list[str]:
        from ..install import Installer
        return Installer(self).uninstall(force=force)

    def doctor(self, context: DoctorContext) -> tuple[Verdict, list[Finding]]:
        """The host's own prediction, then quiesce's checks of the installation."""
        from ..install import Installer, doctor_checks
        verdict = self.predict()
        findings = [Finding(f"{self.name} host validation", verdict.ok,
                            f"{verdict.code} {verdict.name}: {verdict.message}")]
        findings += [Finding("no conflicting host setup", False, c) for c in self.conflicts()]
        findings += self.host_checks(context)
        findings += doctor_checks(self, Installer(self), context)
        return verdict, findings

    @abstractmethod
    def rehearse(self, rehearsal: Rehearsal) -> dict[str, Any]:
        """Play the host's part end to end and return the report it would give.

        The report has at least: host, started_at, timeline, code (0 = application
        consistent), consistency, health_code, health_name, message.
        """

    # -- what doctor asks of a host ------------------------------------------------------

    @abstractmethod
    def predict(self) -> Verdict:
        """Check the installed files in the host's order, as the host itself does."""

    def conflicts(self) -> list[str]:
        """Anything on this machine that would make the host ignore our files."""
        return []

    def host_checks(self, context: DoctorContext) -> list[Finding]:
        """Host-specific checks beyond the prediction (agent, permissions, timeouts)."""
        return []


def options_fields(options_class: type[HostOptions], verb: str) -> list[dataclasses.Field]:
    """The fields of *options_class* that *verb* takes."""
    return [f for f in dataclasses.fields(options_class) if verb in f.metadata.get("verbs", ())]


from .registry import HostInfo, get_host, load_hosts  # noqa: E402  (needs Host above)

__all__ = ["BUNDLED_HOSTS", "DoctorContext", "ENTRY_POINT_GROUP", "Finding", "Host", "HostFile",
           "HostInfo", "HostOptions", "agent_version", "InstallSettings", "Rehearsal", "Verdict", "get_host",
           "load_hosts", "option", "options_fields", "under"]
