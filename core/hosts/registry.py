"""Finding hosts: bundled ones by name, third-party ones through ``quiesce.hosts``.

Loaded the way adapters are: each entry point on its own, so a broken third-party host
becomes a warning naming its distribution and how to disable it, never an exception
that takes the tool down (``QUIESCE_STRICT_HOSTS=1`` makes it an error, for host
developers). A third-party host may not take a bundled host's name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..plugins import distribution_of, load_failure
from . import BUNDLED_HOSTS, ENTRY_POINT_GROUP, Host

log = logging.getLogger(__name__)

#: Set to 1 to load no third-party host at all.
ENV_DISABLE_EXTERNAL = "QUIESCE_DISABLE_EXTERNAL_HOSTS"
#: Comma-separated names whose third-party hosts are not loaded.
ENV_DISABLED = "QUIESCE_DISABLED_HOSTS"
#: Set to 1 to make a broken third-party host an error.
ENV_STRICT = "QUIESCE_STRICT_HOSTS"


@dataclass(frozen=True)
class HostInfo:
    name: str
    cls: type[Host]
    distribution: str
    version: str
    bundled: bool

    def agent(self) -> str | None:
        """The host's agent on this machine; a third-party host whose check breaks has none."""
        try:
            return self.cls.agent()
        except Exception:
            log.debug("agent() of host %r failed", self.name, exc_info=True)
            return None

    def as_dict(self) -> dict[str, Any]:
        agent = self.agent()
        return {"name": self.name, "description": self.cls.description,
                "agent_present": agent is not None, "agent": agent, "bundled": self.bundled,
                "distribution": self.distribution, "version": self.version}


def _load_class(target: str) -> type[Host]:
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Host)):
        raise TypeError(f"{target} is not a subclass of quiesce.hosts.Host")
    return cls


def _own_version() -> str:
    try:
        return importlib.metadata.version("quiesce")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _external(hosts: dict[str, HostInfo], warnings: list[str]) -> None:
    disabled = {n.strip() for n in os.environ.get(ENV_DISABLED, "").split(",") if n.strip()}
    strict = os.environ.get(ENV_STRICT, "") in {"1", "true"}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist, version = distribution_of(ep)
        if ep.name in disabled:
            continue
        if ep.name in hosts:
            raise ConfigError(f"{dist} {version} provides a host called {ep.name!r}, which "
                              f"{hosts[ep.name].distribution} already provides; uninstall one, "
                              f"or set {ENV_DISABLED}={ep.name}")
        try:
            cls = _load_class(ep.value)
        except Exception as e:
            load_failure("host", ep, e, ENV_DISABLED, strict, warnings)
            continue
        hosts[ep.name] = HostInfo(ep.name, cls, dist, version, False)


def load_hosts(*, load_entrypoints: bool = True) -> tuple[dict[str, HostInfo], list[str]]:
    """Every host quiesce knows, by name, and a warning per third-party host that broke."""
    hosts: dict[str, HostInfo] = {}
    warnings: list[str] = []
    for name, target in BUNDLED_HOSTS.items():
        hosts[name] = HostInfo(name, _load_class(target), "quiesce", _own_version(), True)
    if load_entrypoints and os.environ.get(ENV_DISABLE_EXTERNAL, "") not in {"1", "true"}:
        _external(hosts, warnings)
    return hosts, warnings


def get_host(name: str, root: str = "/", options=None) -> Host:
    """The host called *name*, bundled or third-party, re-rooted at *root*."""
    hosts, _ = load_hosts()
    if name not in hosts:
        raise ConfigError(f"unknown host {name!r}; known hosts: {', '.join(sorted(hosts))} "
                          f"(see: quiesce hosts)")
    return hosts[name].cls(root, options)
