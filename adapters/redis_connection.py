"""Redis: reaching the server (settings, connection) and what the hooks ask of it.

The settings are read through the Target API into one frozen :class:`Settings`; the
connection never retries (a retried BGSAVE or PAUSE is not what was asked); the waits for a
child process (save, rewrite) are bounded by the target's timeout.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from quiesce import Target, TargetError, import_driver

DEFAULT_URL = "redis://localhost:6379"
#: The server's own config on Debian/Ubuntu and RHEL 9, then RHEL 8: where a stock install
#: says whether it listens on a unix socket (`unixsocket`, commented out by default).
SERVER_CONFIGS = ("/etc/redis/redis.conf", "/etc/redis.conf")
MODES = ("pause", "flush-only")
POLL = 0.05  # seconds between INFO polls while waiting for a child process


# --- settings -------------------------------------------------------------------------

def default_url() -> str:
    """Without a url: the server's socket when its config names one that exists, else
    redis-cli's own default, TCP to localhost:6379."""
    for path in SERVER_CONFIGS:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.split()
            if len(words) == 2 and words[0].lower() == "unixsocket":
                socket = words[1].strip('"')
                if os.path.isabs(socket) and os.path.exists(socket):
                    return f"unix://{socket}"
        return DEFAULT_URL  # the first config found is the server's
    return DEFAULT_URL


def _parse_url(target: Target) -> dict[str, Any]:
    """Connection keyword arguments from ``url``; refuses credentials in the URL."""
    url = target.option("url", str, default=None) or default_url()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise target.error("url", f"not a valid URL: {e}") from None
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise target.error("url", f"must start with redis://, rediss:// or unix://, got {url!r}")
    if parts.password is not None:
        # Never echo the URL here: it holds the password.
        raise target.error("url", "contains a password; remove it from the URL and put it in "
                                  "a file named by password_file (mode 0600)")
    query = parse_qs(parts.query, keep_blank_values=True)
    if set(query) - {"db"}:
        raise target.error("url", f"unsupported URL parameter(s) "
                                  f"{', '.join(sorted(set(query) - {'db'}))}; only db is "
                                  f"accepted (connection options are settings of their own)")
    kwargs: dict[str, Any] = {}
    if parts.username:
        kwargs["username"] = unquote(parts.username)
    if parts.scheme == "unix":
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise target.error("url", f"a unix:// URL needs an absolute socket path "
                                      f"(unix:///run/redis/redis.sock), got {url!r}")
        kwargs["unix_socket_path"] = path
    else:
        kwargs["host"] = parts.hostname or "localhost"
        kwargs["port"] = port or 6379
        kwargs["ssl"] = parts.scheme == "rediss"
    # The database number does not matter: pauses and saves are server-wide.
    return kwargs


def _client_kwargs(target: Target) -> dict[str, Any]:
    """Everything the client needs to connect, read through the Target API."""
    kwargs = _parse_url(target)
    username = target.option("username", str, default=None)
    if username is not None:
        if "username" in kwargs and kwargs["username"] != username:
            raise target.error("username", "differs from the user named in url; keep one")
        kwargs["username"] = username
    password = target.secret("password_file", default=None)
    if password is not None:
        kwargs["password"] = password
    tls = {"ssl_ca_certs": target.option("ssl_ca_certs", str, default=None),
           "ssl_certfile": target.option("ssl_certfile", str, default=None),
           "ssl_keyfile": target.private_file("ssl_keyfile", default=None)}
    for key, path in tls.items():
        if path is None:
            continue
        if not kwargs.get("ssl"):
            raise target.error(key, "TLS options need a rediss:// url")
        if not os.path.isabs(path):
            raise target.error(key, f"must be an absolute path, got {path!r}")
        if not os.path.exists(path):
            raise target.error(key, f"{path} does not exist")
        kwargs[key] = path
    return kwargs


@dataclass(frozen=True)
class Settings:
    """A target's settings, read and checked, with the limits the hooks use."""

    mode: str
    aof_rewrite: bool
    client: dict[str, Any]  # keyword arguments for redis.Redis (may hold the password)
    where: str              # the URL, for messages: it can hold no password
    user: str               # the ACL user, for GRANT advice
    timeout: float

    def __repr__(self) -> str:  # never show the password
        return f"Settings(mode={self.mode!r}, where={self.where!r}, user={self.user!r})"


def settings(target: Target) -> Settings:
    """Read (and check) every setting. Used by validate and again by each hook."""
    client = _client_kwargs(target)
    return Settings(mode=target.option("mode", str, default="pause", choices=MODES),
                    aof_rewrite=target.option("aof_rewrite", bool, default=False),
                    client=client,
                    where=target.option("url", str, default=None) or default_url(),
                    user=client.get("username") or "default", timeout=target.timeout)



# --- talking to Redis -----------------------------------------------------------------

def driver():
    return import_driver("redis", "redis", "backoff", "exceptions", "retry")


def connect(s: Settings):
    """One connection, no retries (a retried BGSAVE or PAUSE is not what was asked)."""
    redis = driver()
    try:
        # single_connection_client connects and authenticates here, so connection and
        # auth errors get their own messages (no PING: Redis refuses it while a failed
        # save stops writes).
        return redis.Redis(
            **s.client,
            socket_timeout=s.timeout, socket_connect_timeout=s.timeout,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
            single_connection_client=True, decode_responses=True, protocol=2)
    except redis.exceptions.AuthenticationError as e:
        raise TargetError(f"Redis at {s.where} refused user {s.user!r} ({e}); "
                          f"check username and password_file") from None
    except redis.exceptions.RedisError as e:
        raise TargetError(f"cannot connect to Redis at {s.where} within "
                          f"{s.timeout:g} s: {e}; check url and that Redis is "
                          f"running") from None


def driver_errors():
    return driver().exceptions


def read_info(client, section: str | None = None) -> dict[str, Any]:
    return client.info(section) if section else client.info()


def config_value(client, name: str) -> str | None:
    """One CONFIG GET (one parameter per call: Redis 6.2 takes a single pattern)."""
    return client.config_get(name).get(name)


def save_points(client) -> list[tuple[int, int]]:
    """RDB save points as (seconds, changes); empty when RDB snapshots are off."""
    words = (config_value(client, "save") or "").split()
    return [(int(words[i]), int(words[i + 1])) for i in range(0, len(words) - 1, 2)]


def version_of(info: dict[str, Any]) -> tuple[int, ...]:
    parts = []
    for piece in str(info.get("redis_version", "0")).split(".")[:3]:
        parts.append(int(piece) if piece.isdigit() else 0)
    return tuple(parts)


def server_ms(info: dict[str, Any]) -> int:
    """The server's wall clock in ms (INFO server), or ours when it does not say."""
    usec = info.get("server_time_usec")
    return int(usec) // 1000 if isinstance(usec, int) else int(time.time() * 1000)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).astimezone().isoformat(
        timespec="milliseconds")


class Deadline:
    """The end of a bounded wait, and its length for messages."""

    def __init__(self, seconds: float):
        self.seconds = max(0.0, seconds)
        self.at = time.monotonic() + self.seconds

    def passed(self) -> bool:
        return time.monotonic() >= self.at


def busy_with(p: dict[str, Any]) -> list[str]:
    """What child process work is running or about to start, per INFO persistence."""
    busy = []
    if p.get("rdb_bgsave_in_progress"):
        busy.append("a background save")
    if p.get("aof_rewrite_in_progress") or p.get("aof_rewrite_scheduled"):
        busy.append("an AOF rewrite")
    if p.get("module_fork_in_progress"):
        busy.append("a module's fork")
    return busy


def wait_idle(client, s: Settings, deadline: Deadline, doing: str) -> dict[str, Any]:
    """Poll INFO persistence until no save or rewrite runs; bounded by *deadline*."""
    while True:
        p = read_info(client, "persistence")
        busy = busy_with(p)
        if not busy:
            return p
        if deadline.passed():
            raise TargetError(f"{' and '.join(busy)} still running on Redis at "
                              f"{s.where} after {deadline.seconds:g} s ({doing}); it "
                              f"goes on in the background. Raise the target's timeout to "
                              f"cover a full save of this dataset, or retry later")
        time.sleep(POLL)


def bgsave(client, s: Settings, deadline: Deadline, doing: str) -> dict[str, Any]:
    """BGSAVE (not SCHEDULE), wait until it ends, refuse a failed save. Returns facts."""
    errors = driver_errors()
    started = time.monotonic()
    while True:
        before = wait_idle(client, s, deadline, doing)
        try:
            client.execute_command("BGSAVE")
            break
        except errors.ResponseError as e:
            # A save or rewrite started between our INFO and BGSAVE: wait and retry.
            if ("progress" not in str(e) and "child process" not in str(e)) or (
                    deadline.passed()):
                raise TargetError(f"BGSAVE failed on Redis at {s.where}: {e}") from None
            time.sleep(POLL)
    after = wait_idle(client, s, deadline, doing)
    if after.get("rdb_last_bgsave_status") != "ok" or (
            "rdb_saves" in before and after.get("rdb_saves", 0) <= before["rdb_saves"]):
        raise TargetError(f"the background save on Redis at {s.where} failed "
                          f"(rdb_last_bgsave_status:{after.get('rdb_last_bgsave_status')}); "
                          f"the RDB on disk is not current. See the Redis log (disk full? "
                          f"dir not writable?), fix it, and run BGSAVE to confirm")
    return {"seconds": round(time.monotonic() - started, 3),
            "last_save": iso(int(after.get("rdb_last_save_time", 0)) * 1000)}


def bgrewriteaof(client, s: Settings, deadline: Deadline) -> float:
    started = time.monotonic()
    wait_idle(client, s, deadline, "before BGREWRITEAOF")
    try:
        client.execute_command("BGREWRITEAOF")
    except driver_errors().ResponseError as e:
        raise TargetError(f"BGREWRITEAOF failed on Redis at {s.where}: {e}") from None
    after = wait_idle(client, s, deadline, "waiting for BGREWRITEAOF")
    if after.get("aof_last_bgrewrite_status") != "ok":
        raise TargetError(f"the AOF rewrite on Redis at {s.where} failed "
                          f"(aof_last_bgrewrite_status:"
                          f"{after.get('aof_last_bgrewrite_status')}); see the Redis log")
    return round(time.monotonic() - started, 3)


def check_aof(p: dict[str, Any], s: Settings) -> None:
    if p.get("aof_enabled") and p.get("aof_last_write_status", "ok") != "ok":
        raise TargetError(f"Redis at {s.where} failed to write its AOF "
                          f"(aof_last_write_status:{p.get('aof_last_write_status')}): the log "
                          f"on disk is incomplete and Redis refuses writes. See the Redis log")
