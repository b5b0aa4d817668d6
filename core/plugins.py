"""Building the plugin manager: bundled adapters, then third-party ones, one at a time."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .errors import AdapterConflictError, AdapterLoadError, ConfigError
from .target import Target

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "quiesce.adapters"
#: Bundled adapters, registered explicitly under their kind so a checkout works as is.
DEFAULT_ADAPTERS = {
    "sqlite": "quiesce.adapters.sqlite",
    "postgresql": "quiesce.adapters.postgresql",
    "mysql": "quiesce.adapters.mysql",
    "mongodb": "quiesce.adapters.mongodb",
    "redis": "quiesce.adapters.redis",
}
#: Each bundled kind's driver: (import name, distribution); SQLite's is in the stdlib.
DRIVERS = {
    "sqlite": ("sqlite3", None),
    "postgresql": ("psycopg", "psycopg"),
    "mysql": ("pymysql", "PyMySQL"),
    "mongodb": ("pymongo", "pymongo"),
    "redis": ("redis", "redis"),
}
HOOKS = ("validate", "check", "flush", "quiesce", "thaw")
#: Set to 1 to load no third-party adapter at all.
ENV_DISABLE_EXTERNAL = "QUIESCE_DISABLE_EXTERNAL_ADAPTERS"
#: Comma-separated kinds whose third-party adapters are not loaded.
ENV_DISABLED = "QUIESCE_DISABLED_ADAPTERS"
#: Set to 1 to make a broken third-party adapter an error (for adapter developers).
ENV_STRICT = "QUIESCE_STRICT_ADAPTERS"


@dataclass(frozen=True)
class AdapterInfo:
    kind: str
    distribution: str
    version: str
    hooks: tuple[str, ...]
    bundled: bool
    #: The database driver's import name, and its version when importable (else None).
    driver: str | None = None
    driver_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "distribution": self.distribution, "version": self.version,
                "hooks": list(self.hooks), "bundled": self.bundled, "driver": self.driver,
                # None: quiesce does not know a third-party adapter's driver
                "driver_installed": None if self.driver is None else self.driver_version is not None,
                "driver_version": self.driver_version}


def driver_version(kind: str) -> tuple[str | None, str | None]:
    """(import name, version) of a bundled kind's driver; version None when not importable.

    Imported for real: only that proves it works (a broken or shadowed install does not)."""
    if kind not in DRIVERS:
        return None, None
    module, dist = DRIVERS[kind]
    if dist is None:
        import sqlite3
        return module, f"SQLite {sqlite3.sqlite_version}"
    try:
        importlib.import_module(module)
        return module, importlib.metadata.version(dist)
    except Exception:  # any failure to import means the hooks will fail the same way
        return module, None


class Adapters:
    """The plugin manager plus a typed way to call one kind's adapter for one target."""

    def __init__(self, pm: pluggy.PluginManager, origins: dict[str, tuple[str, str]],
                 warnings: list[str]):
        self.pm = pm
        self._origins = origins  # kind -> (distribution, version)
        self.warnings = warnings

    def kinds(self) -> list[str]:
        return sorted(self._origins)

    def info(self) -> list[AdapterInfo]:
        infos = []
        for kind in self.kinds():
            plugin = self.pm.get_plugin(kind)
            hooks = tuple(h.name for h in self.pm.get_hookcallers(plugin) or ())
            dist, version = self._origins[kind]
            bundled = kind in DEFAULT_ADAPTERS and dist == "quiesce"
            driver, driver_ver = driver_version(kind) if bundled else (None, None)
            infos.append(AdapterInfo(kind, dist, version, tuple(h for h in HOOKS if h in hooks),
                                     bundled, driver, driver_ver))
        return infos

    def register_commands(self, cli: Any) -> None:
        """Let every adapter add its commands to the click group *cli*.

        Each adapter's hook is called on its own: one that raises is reported as a warning
        naming its kind, and never takes the command line down."""
        for impl in self.pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(cli=cli)
            except Exception as e:
                log.debug("register_commands of %s failed", impl.plugin_name, exc_info=True)
                self.warnings.append(f"adapter {impl.plugin_name!r} could not add its commands "
                                     f"({type(e).__name__}: {e}); they are unavailable")

    def call(self, hook: str, target: Target, **kwargs: Any) -> Any:
        """Call *hook* on the adapter for ``target.kind`` only."""
        plugin = self.pm.get_plugin(target.kind)
        if plugin is None:
            raise ConfigError(f"unknown kind {target.kind!r}; known kinds: "
                              f"{', '.join(self.kinds())} (see: quiesce adapters)",
                              file=target.config_file, key=target.key("kind"))
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        caller = self.pm.subset_hook_caller(hook, remove_plugins=others)
        return caller(target=target, **kwargs)


def distribution_of(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return "unknown distribution", "?"
    return dist.metadata["Name"], dist.version


def load_failure(what: str, ep: importlib.metadata.EntryPoint, error: Exception,
                 disable_env: str, strict: bool, warnings: list[str]) -> str:
    """A third-party plugin failed to load: one warning naming it and how to disable it
    (an error in strict mode). Shared by adapters and hosts."""
    dist, version = distribution_of(ep)
    message = (f"{what} {ep.name!r} from {dist} {version} failed to load "
               f"({type(error).__name__}: {error}); it is skipped. Disable it with "
               f"{disable_env}={ep.name} or: pip uninstall {dist}")
    if strict:
        raise (AdapterLoadError if what == "adapter" else ConfigError)(message) from error
    log.debug("%s load failure", what, exc_info=True)
    warnings.append(message)
    return message


def load_adapters(*, load_entrypoints: bool = True) -> Adapters:
    """Build the plugin manager. No import-time side effects anywhere else.

    Bundled adapters are imported by module name (importing one never imports its
    driver). Third-party adapters come from the entry-point group ``quiesce.adapters``,
    each loaded on its own: a broken one becomes a warning naming its distribution and
    how to disable it, never an exception that takes the tool down.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    origins: dict[str, tuple[str, str]] = {}
    warnings: list[str] = []
    try:
        own_version = importlib.metadata.version("quiesce")
    except importlib.metadata.PackageNotFoundError:
        own_version = "unknown"
    for kind, modname in DEFAULT_ADAPTERS.items():
        try:
            pm.register(importlib.import_module(modname), name=kind)
        except ImportError as e:
            raise AdapterLoadError(f"bundled adapter {kind!r} cannot be imported: {e}") from e
        origins[kind] = ("quiesce", own_version)

    if load_entrypoints and os.environ.get(ENV_DISABLE_EXTERNAL, "") not in {"1", "true"}:
        disabled = {k.strip() for k in os.environ.get(ENV_DISABLED, "").split(",") if k.strip()}
        strict = os.environ.get(ENV_STRICT, "") in {"1", "true"}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist, version = distribution_of(ep)
            if ep.name in disabled:
                log.debug("third-party adapter %r (%s %s) disabled by %s",
                          ep.name, dist, version, ENV_DISABLED)
                continue
            if ep.name in origins:
                other = "%s %s" % origins[ep.name]
                raise AdapterConflictError(
                    f"two adapters claim kind {ep.name!r}: {other} and {dist} {version}; "
                    f"uninstall one, or set {ENV_DISABLED}={ep.name} to skip the third-party one")
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
                pm.check_pending()
            except Exception as e:
                if pm.get_plugin(ep.name) is not None:
                    pm.unregister(name=ep.name)
                load_failure("adapter", ep, e, ENV_DISABLED, strict, warnings)
                continue
            origins[ep.name] = (dist, version)
    pm.check_pending()
    if os.environ.get("QUIESCE_TRACE_HOOKS", "") in {"1", "true"}:
        pm.trace.root.setwriter(lambda msg: log.debug("hook: %s", msg.rstrip()))
        pm.enable_tracing()
    return Adapters(pm, origins, warnings)
