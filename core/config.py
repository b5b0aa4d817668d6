"""The config file: global settings and named targets, validated by their adapters."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass

from .errors import ConfigError, QuiesceError
from .plugins import Adapters
from .target import Target, check_private_file
from .thaw import DEFAULT_RUNTIME_DIR

DEFAULT_LOG_FILE = "/var/log/quiesce/quiesce.log"
DEFAULT_MAX_HOLD = 120.0
DEFAULT_TIMEOUT = 10.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_GLOBAL_KEYS = {"max_hold", "timeout", "runtime_dir", "log_file", "targets"}

EXAMPLE = """\
# quiesce config: chmod 600, owned by root. Times are in seconds.
max_hold = 120                 # the longest any target stays quiesced; then the watchdog releases it
timeout = 10                   # the longest any single step may take (connect, lock wait, statement)
runtime_dir = "/run/quiesce"   # must be on tmpfs: it is written while disks are frozen
log_file = "/var/log/quiesce/quiesce.log"

# One [targets.NAME] table per database. With only a kind, a server target connects
# where the database's own client would (its socket, its option files); every key
# and its default: docs/adapters/KIND.md. Uncomment what this machine runs.

[targets.app]
kind = "sqlite"
path = "/var/lib/app/app.db"

# [targets.main]
# kind = "postgresql"
# mode = "checkpoint"            # or "backup" (pg_backup_start; needs label_dir)
# host = "/var/run/postgresql"   # libpq's: a socket directory or a host name
# user = "postgres"              # a password comes from passfile = "/etc/quiesce/pgpass"

# [targets.shop]
# kind = "mysql"                 # MySQL or MariaDB; reads the client's option files
# user = "root"                  # socket authentication as root needs no password
# strategy = "auto"              # or "backup_stage", "instance_lock", "ftwrl"

# [targets.orders]
# kind = "mongodb"
# uri = "mongodb://127.0.0.1:27017"   # a URI with a password goes in uri_file (chmod 600)
# mode = "journal"               # or "lock" (fsyncLock; a secondary)

# [targets.cache]
# kind = "redis"
# url = "redis://127.0.0.1:6379"  # or unix:///run/redis/redis-server.sock
# mode = "pause"                 # or "flush-only"; a password goes in password_file
"""


@dataclass
class Config:
    path: str
    targets: list[Target]
    max_hold: float = DEFAULT_MAX_HOLD
    timeout: float = DEFAULT_TIMEOUT
    runtime_dir: str = DEFAULT_RUNTIME_DIR
    log_file: str | None = DEFAULT_LOG_FILE

    def target(self, name: str) -> Target | None:
        return next((t for t in self.targets if t.name == name), None)


#: Upper bounds: a day of hold, an hour per step; TOML also allows nan and inf.
_LIMITS = {"max_hold": 86400.0, "timeout": 3600.0}


def _number(data: dict, key: str, default: float, path: str, *, where: str = "") -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value <= _LIMITS[key]:
        raise ConfigError(f"expected a number of seconds above 0 and at most "
                          f"{_LIMITS[key]:g}, got {value!r}", file=path, key=f"{where}{key}")
    return float(value)


def _string(data: dict, key: str, default: str, path: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a non-empty string, got {value!r}", file=path, key=key)
    return value


def parse(path: str, text: str) -> Config:
    """Parse and check the structure, without asking the adapters."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", file=path) from None
    unknown = sorted(set(data) - _GLOBAL_KEYS)
    if unknown:
        raise ConfigError(unknown_key_message(unknown[0], _GLOBAL_KEYS), file=path,
                          key=unknown[0])
    max_hold = _number(data, "max_hold", DEFAULT_MAX_HOLD, path)
    timeout = _number(data, "timeout", DEFAULT_TIMEOUT, path)
    runtime_dir = _string(data, "runtime_dir", DEFAULT_RUNTIME_DIR, path)
    log_file = data.get("log_file", DEFAULT_LOG_FILE)
    if log_file is not None and (not isinstance(log_file, str)):
        raise ConfigError(f"expected a path or \"\" for no log file, got {log_file!r}",
                          file=path, key="log_file")
    for key, value in (("runtime_dir", runtime_dir), ("log_file", log_file)):
        if value and not os.path.isabs(value):
            raise ConfigError(f"must be an absolute path, got {value!r}", file=path, key=key)
    tables = data.get("targets")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError("no targets configured; add a [targets.NAME] table with a kind "
                          "(see: quiesce adapters)", file=path, key="targets")
    targets = []
    for name, table in tables.items():
        where = f"targets.{name}"
        if not _NAME.match(name):
            raise ConfigError("a target name may hold letters, digits, '_', '.' and '-' only",
                              file=path, key=where)
        if not isinstance(table, dict):
            raise ConfigError("expected a table", file=path, key=where)
        settings = dict(table)
        kind = settings.pop("kind", None)
        if not isinstance(kind, str):
            raise ConfigError("missing required key 'kind' (see: quiesce adapters)",
                              file=path, key=f"{where}.kind")
        target_timeout = _number(settings, "timeout", timeout, path, where=f"{where}.")
        settings.pop("timeout", None)
        targets.append(Target(name=name, kind=kind, settings=settings, timeout=target_timeout,
                              max_hold=max_hold, config_file=path))
    return Config(path=path, targets=targets, max_hold=max_hold, timeout=timeout,
                  runtime_dir=runtime_dir, log_file=log_file or None)


def validate_targets(config: Config, adapters: Adapters) -> None:
    """Let each target's adapter check its settings; report keys nobody read."""
    for target in config.targets:
        try:
            adapters.call("validate", target)
        except QuiesceError:
            # A misspelt key is the likelier cause of "missing required key 'path'".
            typo = next((key for key in target.unknown_keys()
                         if difflib.get_close_matches(key, sorted(target.known_keys()), n=1)),
                        None)
            if typo:
                raise target.error(typo, unknown_key_message(
                    typo, target.known_keys(), kind=target.kind)) from None
            raise
        except Exception as e:  # an adapter bug must still name the target
            raise ConfigError(f"adapter {target.kind!r} could not validate it: "
                              f"{type(e).__name__}: {e}", file=config.path,
                              key=f"targets.{target.name}") from e
        unknown = target.unknown_keys()
        if unknown:
            raise target.error(unknown[0], unknown_key_message(
                unknown[0], target.known_keys() | {"kind", "timeout"}, kind=target.kind))


def unknown_key_message(key: str, known: set[str], *, kind: str | None = None) -> str:
    """"unknown key 'paht' for kind 'sqlite'; did you mean `path`?" (or the known keys)."""
    for_kind = f" for kind {kind!r}" if kind else ""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    if close:
        return f"unknown key {key!r}{for_kind}; did you mean `{close[0]}`?"
    return f"unknown key {key!r}{for_kind}; known keys: {', '.join(sorted(known))}"


def load(path: str, adapters: Adapters) -> Config:
    """Read, check permissions, parse and validate the config at *path*."""
    if not os.path.lexists(path):
        raise ConfigError(f"the config file does not exist; create one with: quiesce "
                          f"example-config > {path} && chmod 600 {path}", file=path)
    check_private_file(path, what="config file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except PermissionError:  # a root-owned 0600 file read by another user: a config error
        raise ConfigError(f"cannot read the config file: permission denied (run quiesce "
                          f"as root or as the file's owner)", file=path) from None
    config = parse(path, text)
    validate_targets(config, adapters)
    return config
