"""The config file: global settings and named targets, validated by their adapters."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass

from .errors import ConfigError, QuiesceError
from .plugins import Adapters
from .runtime import DEFAULT_RUNTIME_DIR
from .target import DEFAULT_MAX_HOLD, DEFAULT_TIMEOUT, Target, check_private_file

DEFAULT_LOG_FILE = "/var/log/quiesce/quiesce.log"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BARE_KEY = re.compile(r"^\s*\[*\s*([A-Za-z0-9_.-]+)")
_GLOBAL_KEYS = {"max_hold", "timeout", "runtime_dir", "log_file", "on_target_failure", "targets",
                "metrics_dir", "syslog_socket", "holder_scope"}
#: What freeze does with the targets it could quiesce when another one fails.
ON_TARGET_FAILURE = ("hold-others", "release-all")
HOLDER_SCOPES = ("none", "systemd")

EXAMPLE = """\
# quiesce config: chmod 600, owned by root. Times are in seconds.
max_hold = 120                 # the longest any target stays quiesced; then the watchdog releases it
timeout = 10                   # the longest any single step may take (connect, lock wait, statement)
runtime_dir = "/run/quiesce"   # must be on tmpfs: it is written while disks are frozen
log_file = "/var/log/quiesce/quiesce.log"
on_target_failure = "hold-others"   # or "release-all"; freeze exits 1 either way
# metrics_dir = "/var/lib/prometheus/node-exporter"  # write quiesce.prom there after each cycle
# holder_scope = "systemd"     # run the holder in its own systemd scope (see docs/systemd.md)

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
    on_target_failure: str = ON_TARGET_FAILURE[0]
    metrics_dir: str | None = None        # node_exporter's textfile directory; off when None
    syslog_socket: str | None = None      # None: the journal, else /dev/log
    holder_scope: str = "none"            # "systemd": the holder in its own transient scope

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


def decode(path: str, raw: bytes) -> str:
    """The file's text; bytes that are not UTF-8 are named by line (and key, if any)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        text = raw.decode("utf-8", "replace")
        raise ConfigError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} on line {line}; save "
                          f"the file as UTF-8", file=path, key=_key_on_line(text, line)) from None


def _key_on_line(text: str, line: int) -> str | None:
    """The key a line sets (or the table it opens), to name it in an error."""
    lines = text.split("\n")
    key = _BARE_KEY.match(lines[line - 1]) if 0 < line <= len(lines) else None
    return key.group(1) if key else None


def _refuse_nul(path: str, value: object, where: str = "") -> None:
    """No path, name or secret may hold a NUL byte (TOML can spell one as \\u0000)."""
    if isinstance(value, dict):
        for key, item in value.items():
            full = f"{where}.{key}" if where else key
            if "\0" in key:
                raise ConfigError("a key may not contain a NUL character",
                                  file=path, key=full)
            _refuse_nul(path, item, full)
    elif isinstance(value, list):
        for item in value:
            _refuse_nul(path, item, where)
    elif isinstance(value, str) and "\0" in value:
        raise ConfigError("may not contain a NUL character (\\u0000)", file=path, key=where)


def _optional_settings(data: dict, path: str) -> dict:
    """The settings that are off unless set: metrics, the summary line's socket, the scope."""
    settings = {key: data.get(key) for key in ("metrics_dir", "syslog_socket")}
    for key, value in settings.items():
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"expected a path, got {value!r}", file=path, key=key)
    settings["holder_scope"] = data.get("holder_scope", "none")
    if settings["holder_scope"] not in HOLDER_SCOPES:
        raise ConfigError(f"expected one of {', '.join(map(repr, HOLDER_SCOPES))}, got "
                          f"{settings['holder_scope']!r}", file=path, key="holder_scope")
    return settings



def parse(path: str, text: str) -> Config:
    """Parse and check the structure, without asking the adapters."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = re.search(r"\(at line (\d+),", str(e))
        raise ConfigError(f"not valid TOML: {e}", file=path,
                          key=_key_on_line(text, int(line.group(1))) if line else None) from None
    except RecursionError:
        raise ConfigError("not valid TOML: arrays or tables nested too deeply",
                          file=path) from None
    _refuse_nul(path, data)
    unknown = sorted(set(data) - _GLOBAL_KEYS)
    if unknown:
        raise ConfigError(unknown_key_message(unknown[0], _GLOBAL_KEYS), file=path,
                          key=unknown[0])
    max_hold = _number(data, "max_hold", DEFAULT_MAX_HOLD, path)
    timeout = _number(data, "timeout", DEFAULT_TIMEOUT, path)
    runtime_dir = _string(data, "runtime_dir", DEFAULT_RUNTIME_DIR, path)
    on_failure = data.get("on_target_failure", ON_TARGET_FAILURE[0])
    if on_failure not in ON_TARGET_FAILURE:
        raise ConfigError(f"expected one of {', '.join(map(repr, ON_TARGET_FAILURE))}, got "
                          f"{on_failure!r}", file=path, key="on_target_failure")
    log_file = data.get("log_file", DEFAULT_LOG_FILE)
    if log_file is not None and (not isinstance(log_file, str)):
        raise ConfigError(f"expected a path or \"\" for no log file, got {log_file!r}",
                          file=path, key="log_file")
    optional = _optional_settings(data, path)
    for key, value in (("runtime_dir", runtime_dir), ("log_file", log_file),
                       ("metrics_dir", optional["metrics_dir"]),
                       ("syslog_socket", optional["syslog_socket"])):
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
                  runtime_dir=runtime_dir, log_file=log_file or None, on_target_failure=on_failure,
                  **optional)


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
        with open(path, "rb") as f:
            raw = f.read()
    except PermissionError:  # a root-owned 0600 file read by another user: a config error
        raise ConfigError("cannot read the config file: permission denied (run quiesce "
                          "as root or as the file's owner)", file=path) from None
    config = parse(path, decode(path, raw))
    validate_targets(config, adapters)
    return config
