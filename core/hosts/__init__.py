"""Snapshot hosts: the programs that call our pre- and post-scripts around a snapshot.

A host is the second kind of plugin, beside adapters. Where an adapter is a set of hooks
called per target, a host is one object with a few methods, so hosts are plain classes
registered by name (bundled ones in ``DEFAULT_HOSTS``, third-party ones through the
entry-point group ``quiesce.hosts``). Adding a host is one module that subclasses
:class:`Host`:

* :meth:`Host.files` renders the files the host needs (config, scripts);
* :meth:`Host.validate` checks the installed files exactly as the host would, returning
  the host's own code for the first failure;
* :meth:`Host.rehearse` plays the host's part: runs the scripts as it does, around a
  local freeze and snapshot step, and reports what the host would report.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

ENTRY_POINT_GROUP = "quiesce.hosts"
DEFAULT_HOSTS = {"azure": "quiesce.hosts.azure:AzureHost"}


@dataclass(frozen=True)
class HostFile:
    """One file a host needs: where it goes (absolute, as on the real machine)."""

    path: str
    content: str
    mode: int


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
    """What the host decides from its own validation of the installed files."""

    code: int                 # 0 = scripts will run
    name: str
    message: str

    @property
    def ok(self) -> bool:
        return self.code == 0


class Host(ABC):
    """Base class for a snapshot host. *root* re-roots every host path (staging, tests)."""

    name: str = ""

    def __init__(self, root: str = "/"):
        # Absolute: the host runs scripts from its own directory, not the caller's.
        self.root = os.path.abspath(root)

    def path(self, absolute: str) -> str:
        """Where *absolute* (a path on the real machine) is under this host's root."""
        return absolute if self.root in ("", "/") else self.root.rstrip("/") + absolute

    @abstractmethod
    def files(self, settings: InstallSettings) -> list[HostFile]:
        """The files to install, with their contents and modes."""

    @abstractmethod
    def validate(self) -> Verdict:
        """Check the installed files in the host's order, as the host itself does."""

    @abstractmethod
    def conflicts(self) -> list[str]:
        """Anything on this machine that would make the host ignore our files."""

    @abstractmethod
    def rehearse(self, **options: Any) -> dict[str, Any]:
        """Play the host's part end to end and return the report it would give."""


def get_host(name: str, root: str = "/") -> Host:
    """The host called *name*: bundled, or from a third-party entry point."""
    target = DEFAULT_HOSTS.get(name)
    if target is None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                target = ep.value
    if target is None:
        known = sorted(set(DEFAULT_HOSTS) | {ep.name for ep in
                                            importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})
        raise ConfigError(f"unknown host {name!r}; known hosts: {', '.join(known)}")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)(root=root)
