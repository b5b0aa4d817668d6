"""Redis: persistence complete on disk, writes paused server-wide across the snapshot.

flush    Waits for any running save or AOF rewrite, then, when RDB save points are
         configured, ``BGSAVE`` (never ``BGSAVE SCHEDULE``: a scheduled save could start
         during the freeze) and waits until it has finished and succeeded; a failed save
         refuses the target. ``BGREWRITEAOF`` only with ``aof_rewrite = true``. No save is
         left running when flush returns.
quiesce  ``CLIENT PAUSE <max_hold ms> WRITE``: writes (and expiry, eviction, write
         scripts, PUBLISH) wait, reads go on. Never ALL: an ALL pause cannot be ended
         early. Under the pause it waits until no child process (save, rewrite) runs, the
         AOF buffer is written out, and, when the RDB on disk is what a restore loads
         (AOF off) and keys changed since flush's save, saves once more so the RDB
         holds every write acknowledged before the pause. The same final save runs with
         AOF on when a save point could otherwise fire during the hold.
thaw     ``CLIENT UNPAUSE``. The pause is kept by the server, not by a session, so thaw
         works the same from the holder or from a fresh process after a crash. Redis ends
         the pause by itself at the deadline; a thaw after it raises HoldBroken.

Redis 7.0 does not report whether a pause is active, so quiesce records the deadline
(server clock) and the server's run_id in the hold's facts, and thaw compares. Valkey 8
does report it (``paused_actions`` in INFO clients): there thaw also notices a pause that
another client's ``CLIENT UNPAUSE`` ended early.

Settings: ``url`` (redis://, rediss:// or unix://; no password in it), ``username``,
``password_file``, ``ssl_ca_certs``/``ssl_certfile``/``ssl_keyfile`` (rediss:// only),
``mode`` ("pause" or "flush-only"), ``aof_rewrite`` (bool). Each wait: at most ``timeout``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from quiesce import Hold, HoldBroken, Target, TargetError, hookimpl, import_driver

DEFAULT_URL = "redis://localhost:6379"
#: The server's own config on Debian/Ubuntu and RHEL 9, then RHEL 8: where a stock install
#: says whether it listens on a unix socket (`unixsocket`, commented out by default).
SERVER_CONFIGS = ("/etc/redis/redis.conf", "/etc/redis.conf")
MODES = ("pause", "flush-only")
#: CLIENT PAUSE … WRITE appeared in Redis 6.2.
PAUSE_WRITE_SINCE = (6, 2)
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


@hookimpl
def validate(target: Target) -> None:
    settings(target)


# --- talking to Redis -----------------------------------------------------------------

def _redis():
    return import_driver("redis", "redis", "backoff", "exceptions", "retry")


def _connect(s: Settings):
    """One connection, no retries (a retried BGSAVE or PAUSE is not what was asked)."""
    redis = _redis()
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


def _errors():
    return _redis().exceptions


def _info(client, section: str | None = None) -> dict[str, Any]:
    return client.info(section) if section else client.info()


def _config(client, name: str) -> str | None:
    """One CONFIG GET (one parameter per call: Redis 6.2 takes a single pattern)."""
    return client.config_get(name).get(name)


def _save_points(client) -> list[tuple[int, int]]:
    """RDB save points as (seconds, changes); empty when RDB snapshots are off."""
    words = (_config(client, "save") or "").split()
    return [(int(words[i]), int(words[i + 1])) for i in range(0, len(words) - 1, 2)]


def _version(info: dict[str, Any]) -> tuple[int, ...]:
    parts = []
    for piece in str(info.get("redis_version", "0")).split(".")[:3]:
        parts.append(int(piece) if piece.isdigit() else 0)
    return tuple(parts)


def _server_ms(info: dict[str, Any]) -> int:
    """The server's wall clock in ms (INFO server), or ours when it does not say."""
    usec = info.get("server_time_usec")
    return int(usec) // 1000 if isinstance(usec, int) else int(time.time() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).astimezone().isoformat(
        timespec="milliseconds")


class _Deadline:
    """The end of a bounded wait, and its length for messages."""

    def __init__(self, seconds: float):
        self.seconds = max(0.0, seconds)
        self.at = time.monotonic() + self.seconds

    def passed(self) -> bool:
        return time.monotonic() >= self.at


def _busy(p: dict[str, Any]) -> list[str]:
    """What child process work is running or about to start, per INFO persistence."""
    busy = []
    if p.get("rdb_bgsave_in_progress"):
        busy.append("a background save")
    if p.get("aof_rewrite_in_progress") or p.get("aof_rewrite_scheduled"):
        busy.append("an AOF rewrite")
    if p.get("module_fork_in_progress"):
        busy.append("a module's fork")
    return busy


def _wait_idle(client, s: Settings, deadline: _Deadline, doing: str) -> dict[str, Any]:
    """Poll INFO persistence until no save or rewrite runs; bounded by *deadline*."""
    while True:
        p = _info(client, "persistence")
        busy = _busy(p)
        if not busy:
            return p
        if deadline.passed():
            raise TargetError(f"{' and '.join(busy)} still running on Redis at "
                              f"{s.where} after {deadline.seconds:g} s ({doing}); it "
                              f"goes on in the background. Raise the target's timeout to "
                              f"cover a full save of this dataset, or retry later")
        time.sleep(POLL)


def _bgsave(client, s: Settings, deadline: _Deadline, doing: str) -> dict[str, Any]:
    """BGSAVE (not SCHEDULE), wait until it ends, refuse a failed save. Returns facts."""
    errors = _errors()
    started = time.monotonic()
    while True:
        before = _wait_idle(client, s, deadline, doing)
        try:
            client.execute_command("BGSAVE")
            break
        except errors.ResponseError as e:
            # A save or rewrite started between our INFO and BGSAVE: wait and retry.
            if ("progress" not in str(e) and "child process" not in str(e)) or (
                    deadline.passed()):
                raise TargetError(f"BGSAVE failed on Redis at {s.where}: {e}") from None
            time.sleep(POLL)
    after = _wait_idle(client, s, deadline, doing)
    if after.get("rdb_last_bgsave_status") != "ok" or (
            "rdb_saves" in before and after.get("rdb_saves", 0) <= before["rdb_saves"]):
        raise TargetError(f"the background save on Redis at {s.where} failed "
                          f"(rdb_last_bgsave_status:{after.get('rdb_last_bgsave_status')}); "
                          f"the RDB on disk is not current. See the Redis log (disk full? "
                          f"dir not writable?), fix it, and run BGSAVE to confirm")
    return {"seconds": round(time.monotonic() - started, 3),
            "last_save": _iso(int(after.get("rdb_last_save_time", 0)) * 1000)}


def _bgrewriteaof(client, s: Settings, deadline: _Deadline) -> float:
    started = time.monotonic()
    _wait_idle(client, s, deadline, "before BGREWRITEAOF")
    try:
        client.execute_command("BGREWRITEAOF")
    except _errors().ResponseError as e:
        raise TargetError(f"BGREWRITEAOF failed on Redis at {s.where}: {e}") from None
    after = _wait_idle(client, s, deadline, "waiting for BGREWRITEAOF")
    if after.get("aof_last_bgrewrite_status") != "ok":
        raise TargetError(f"the AOF rewrite on Redis at {s.where} failed "
                          f"(aof_last_bgrewrite_status:"
                          f"{after.get('aof_last_bgrewrite_status')}); see the Redis log")
    return round(time.monotonic() - started, 3)


def _check_aof(p: dict[str, Any], s: Settings) -> None:
    if p.get("aof_enabled") and p.get("aof_last_write_status", "ok") != "ok":
        raise TargetError(f"Redis at {s.where} failed to write its AOF "
                          f"(aof_last_write_status:{p.get('aof_last_write_status')}): the log "
                          f"on disk is incomplete and Redis refuses writes. See the Redis log")


# --- check ----------------------------------------------------------------------------

def _needed(s: Settings) -> list[str]:
    """The commands this adapter sends, in ACL syntax (least privilege)."""
    needed = ["info", "config|get", "bgsave"]
    if s.aof_rewrite:
        needed.append("bgrewriteaof")
    if s.mode == "pause":
        needed += ["client|pause", "client|unpause"]
    return needed + ["multi", "discard"]  # check's own harmless probe


def _acl_line(s: Settings) -> str:
    return f"ACL SETUSER {s.user} " + " ".join(f"+{c}" for c in _needed(s))


def _missing_permissions(client, s: Settings) -> list[str]:
    """Commands the user may not run, found without running any of them.

    Redis checks ACLs when a command is queued inside MULTI; DISCARD then drops the
    queue, so nothing is paused or saved (ACL DRYRUN would need ACL rights itself).
    """
    errors = _errors()
    probes = {"bgsave": ("BGSAVE",), "bgrewriteaof": ("BGREWRITEAOF",),
              "client|pause": ("CLIENT", "PAUSE", "1", "WRITE"),
              "client|unpause": ("CLIENT", "UNPAUSE")}
    wanted = [c for c in _needed(s) if c in probes]
    pipe = client.pipeline(transaction=False)
    pipe.execute_command("MULTI")
    for command in wanted:
        pipe.execute_command(*probes[command])
    pipe.execute_command("DISCARD")
    replies = pipe.execute(raise_on_error=False)
    if isinstance(replies[0], errors.NoPermissionError):
        return ["multi", "discard"]
    missing = [c for c, r in zip(wanted, replies[1:]) if isinstance(r, errors.NoPermissionError)]
    if isinstance(replies[-1], errors.NoPermissionError):
        missing.append("discard")
    return missing


def _check_facts(info: dict[str, Any], s: Settings, points: list[tuple[int, int]],
                 appendfsync: str | None, data_dir: str | None) -> dict[str, Any]:
    aof = bool(info.get("aof_enabled"))
    facts: dict[str, Any] = {
        "redis_version": str(info.get("redis_version")),
        "mode": s.mode,
        "role": info.get("role"),
        "rdb_save_points": " ".join(f"{secs} {changes}" for secs, changes in points) or "off",
        "aof": f"on, appendfsync {appendfsync}" if aof else "off",
        "dir": data_dir,
    }
    if "valkey_version" in info:
        facts["valkey_version"] = str(info["valkey_version"])
    return facts


def _check_warnings(info: dict[str, Any], points: list[tuple[int, int]],
                    appendfsync: str | None) -> list[str]:
    """What the operator should know about this server's persistence and role."""
    aof = bool(info.get("aof_enabled"))
    warnings = []
    if not points and not aof:
        warnings.append("NOTHING ON DISK: RDB save points and AOF are both off, so a restore "
                        "from this snapshot starts with an empty dataset")
    if info.get("cluster_enabled"):
        warnings.append("cluster mode: this target covers only this node; configure one target "
                        "per node (every primary) on each machine that runs one")
    if info.get("role") == "slave":
        warnings.append("replica: a write pause stops it applying the primary's stream until "
                        "thaw; the replica catches up afterwards")
    if aof and appendfsync == "no":
        warnings.append("appendfsync no: acknowledged writes may sit in the page cache; only "
                        "a filesystem freeze (which syncs) puts them in the snapshot")
    if info.get("rdb_last_bgsave_status") not in (None, "ok"):
        warnings.append("the last background save failed; flush will refuse this target "
                        "until a save succeeds (see the Redis log)")
    return warnings


@hookimpl
def check(target: Target) -> dict[str, Any]:
    s = settings(target)
    errors = _errors()
    client = _connect(s)
    try:
        try:
            info = _info(client)
            points = _save_points(client)
            appendfsync = _config(client, "appendfsync")
            data_dir = _config(client, "dir")
            missing = _missing_permissions(client, s)
        except errors.NoPermissionError as e:
            raise TargetError(f"user {s.user!r} lacks a permission on Redis at "
                              f"{s.where} ({e}); grant it with: "
                              f"{_acl_line(s)}") from None
        except errors.RedisError as e:
            raise TargetError(f"check of Redis at {s.where} failed: {e}") from None
    finally:
        client.close()
    if missing:
        raise TargetError(f"user {s.user!r} may not run "
                          f"{', '.join(m.upper().replace('|', ' ') for m in missing)} on Redis "
                          f"at {s.where}; grant it with: {_acl_line(s)}")

    version = _version(info)
    if s.mode == "pause" and version < PAUSE_WRITE_SINCE:
        raise TargetError(f"Redis {info.get('redis_version')} at {s.where} cannot pause "
                          f"only writes (CLIENT PAUSE WRITE needs 6.2 or later); upgrade it, or "
                          f"set mode = \"flush-only\" for targets.{target.name} (saves before "
                          f"the snapshot, but does not pause writes)")

    facts = _check_facts(info, s, points, appendfsync, data_dir)
    warnings = _check_warnings(info, points, appendfsync)
    _check_aof(info, s)
    if warnings:
        facts["warnings"] = warnings
    return facts


# --- flush ----------------------------------------------------------------------------

@hookimpl
def flush(target: Target) -> dict[str, Any] | None:
    s = settings(target)
    errors = _errors()
    client = _connect(s)
    try:
        deadline = _Deadline(target.timeout)
        p = _wait_idle(client, s, deadline, "before flush")
        _check_aof(p, s)
        points = _save_points(client)
        facts: dict[str, Any] = {}
        if s.aof_rewrite and p.get("aof_enabled"):
            facts["aof_rewrite_seconds"] = _bgrewriteaof(client, s, deadline)
        if points:
            facts["bgsave"] = _bgsave(client, s, deadline, "waiting for BGSAVE")
        if not points and not p.get("aof_enabled"):
            facts["warnings"] = ["NOTHING ON DISK: RDB and AOF are off; nothing was saved"]
        return facts or None
    except errors.RedisError as e:
        raise TargetError(f"flush of Redis at {s.where} failed: {e}") from None
    finally:
        client.close()


# --- quiesce / thaw -------------------------------------------------------------------

def _save_could_fire(points: list[tuple[int, int]], p: dict[str, Any], until_ms: int) -> bool:
    """Whether serverCron could start an automatic BGSAVE before *until_ms*."""
    dirty = p.get("rdb_changes_since_last_save", 0)
    last = int(p.get("rdb_last_save_time", 0)) * 1000
    return any(dirty >= changes and until_ms - last > seconds * 1000
               for seconds, changes in points)


def _settle(client, s: Settings, pause_deadline_ms: int, now_ms: int) -> dict[str, Any]:
    """Under the pause: leave disk files complete and nothing that could write later."""
    # Bounded by the timeout, and ended well before Redis ends the pause by itself.
    deadline = _Deadline(min(s.timeout, (pause_deadline_ms - now_ms) / 1000 - 0.5))
    p = _wait_idle(client, s, deadline, "under the write pause")
    facts: dict[str, Any] = {}
    points = _save_points(client)
    dirty = p.get("rdb_changes_since_last_save", 0)
    aof = bool(p.get("aof_enabled"))
    if points and dirty and (not aof or _save_could_fire(points, p, pause_deadline_ms)):
        # The RDB is what a restore loads (AOF off), or an automatic save would start
        # while the disks are frozen: save the paused dataset now.
        facts["final_bgsave"] = _bgsave(client, s, deadline, "final save under the pause")
        p = _info(client, "persistence")
    else:
        facts["final_bgsave"] = "not needed"
    if aof:
        # Acknowledged writes are normally write()n to the AOF before the reply; with
        # appendfsync everysec a write can be postponed while an fsync runs. Wait for the
        # buffer to drain so the file holds them all (the freeze makes them durable).
        while p.get("aof_buffer_length", 0):
            if deadline.passed():
                raise TargetError(f"the AOF buffer of Redis at {s.where} was not "
                                  f"written out within {deadline.seconds:g} s (slow disk?)")
            time.sleep(POLL)
            p = _info(client, "persistence")
        _check_aof(p, s)
    return facts


def _unpause_after_failure(s: Settings, deadline_ms: int) -> str:
    try:
        client = _connect(s)
        try:
            client.execute_command("CLIENT", "UNPAUSE")
        finally:
            client.close()
        return "writers were released"
    except Exception:
        return f"writers could not be released now; Redis releases them at {_iso(deadline_ms)}"


@hookimpl
def quiesce(target: Target) -> Hold | None:
    s = settings(target)
    if s.mode == "flush-only":
        return None
    errors = _errors()
    ms = max(1, math.ceil(target.max_hold * 1000))
    client = _connect(s)
    deadline_ms = None
    try:
        target.lock_gate()  # connected: pause together with the other targets
        server = _info(client, "server")  # after the gate: before_ms bounds the pause's start
        before_ms = _server_ms(server)
        # Redis sets its deadline from its clock at some instant after before_ms, so this
        # is the earliest the pause can end: thaw errs towards reporting it broken. Set
        # before sending: from here on a failure (a timeout) may leave a pause to release.
        deadline_ms = before_ms + ms
        try:
            client.execute_command("CLIENT", "PAUSE", ms, "WRITE")
            locked_at = time.time()
        except errors.ResponseError as e:
            deadline_ms = None  # refused: nothing is paused
            raise TargetError(f"CLIENT PAUSE {ms} WRITE failed on Redis at {s.where}: "
                              f"{e} (Redis 6.2 or later is needed; see mode = "
                              f"\"flush-only\")") from None
        facts = {"pause_ms": ms, "pause_deadline": _iso(deadline_ms),
                 "pause_deadline_ms": deadline_ms, "run_id": server.get("run_id")}
        facts.update(_settle(client, s, deadline_ms, before_ms))
        return Hold(session=None, facts=facts, locked_at=locked_at)
    except BaseException as e:
        if deadline_ms is not None:
            released = _unpause_after_failure(s, deadline_ms)
            if isinstance(e, errors.RedisError):
                raise TargetError(f"quiesce of Redis at {s.where} failed: {e}; "
                                  f"{released}") from None
            if isinstance(e, TargetError):
                raise TargetError(f"{e}; {released}") from None
        elif isinstance(e, errors.RedisError):
            raise TargetError(f"quiesce of Redis at {s.where} failed: {e}") from None
        raise
    finally:
        client.close()


@hookimpl
def thaw(target: Target, hold: Hold) -> dict[str, Any] | None:
    s = settings(target)
    facts = hold.facts or {}
    if s.mode == "flush-only" and "pause_deadline_ms" not in facts:
        return None  # nothing was paused
    errors = _errors()
    deadline_ms = facts.get("pause_deadline_ms")
    try:
        client = _connect(s)
    except TargetError as e:
        later = f"; Redis ends the pause by itself at {_iso(deadline_ms)}" if deadline_ms else ""
        raise TargetError(f"{e}{later}") from None
    try:
        # One round trip: whether the pause still held (Valkey 8 says; Redis 7.0 does
        # not), the release, then the server's clock and identity.
        pipe = client.pipeline(transaction=False)
        pipe.info("clients")
        pipe.execute_command("CLIENT", "UNPAUSE")
        pipe.info("server")
        clients, _, server = pipe.execute()
    except errors.RedisError as e:
        raise TargetError(f"CLIENT UNPAUSE failed on Redis at {s.where}: {e}"
                          + (f"; Redis ends the pause by itself at {_iso(deadline_ms)}"
                             if deadline_ms else "")) from None
    finally:
        client.close()
    now_ms = _server_ms(server)
    result = {"unpaused_at": _iso(now_ms)}
    if facts.get("run_id") and server.get("run_id") != facts["run_id"]:
        raise HoldBroken(f"Redis at {s.where} restarted during the hold (run_id "
                         f"changed), which ended the pause: the snapshot may contain writes "
                         f"made after the freeze")
    if deadline_ms is not None and now_ms >= deadline_ms:
        raise HoldBroken(f"the pause ended by itself at {_iso(deadline_ms)}, before thaw: the "
                         f"snapshot may contain writes made after the freeze (raise the "
                         f"target's max_hold if the snapshot takes longer)")
    if deadline_ms is not None and clients.get("paused_actions") == "none":
        raise HoldBroken(f"the pause on {s.where} had already ended before thaw (another "
                         f"client's CLIENT UNPAUSE?): the snapshot may contain writes made "
                         f"after the freeze")
    if deadline_ms is not None:
        result["pause_left_ms"] = deadline_ms - now_ms
    return result
