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
import time
from typing import Any

from quiesce import Hold, HoldBroken, Target, TargetError, hookimpl
from quiesce.adapters.redis_connection import (POLL, Deadline, Settings, bgrewriteaof, bgsave, busy_with,
                                               check_aof, config_value, connect, driver_errors,
                                               iso, read_info, save_points, server_ms,
                                               settings, version_of, wait_idle)

#: CLIENT PAUSE … WRITE appeared in Redis 6.2.
PAUSE_WRITE_SINCE = (6, 2)


@hookimpl
def validate(target: Target) -> None:
    settings(target)


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
    errors = driver_errors()
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
    errors = driver_errors()
    client = connect(s)
    try:
        try:
            info = read_info(client)
            points = save_points(client)
            appendfsync = config_value(client, "appendfsync")
            data_dir = config_value(client, "dir")
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

    version = version_of(info)
    if s.mode == "pause" and version < PAUSE_WRITE_SINCE:
        raise TargetError(f"Redis {info.get('redis_version')} at {s.where} cannot pause "
                          f"only writes (CLIENT PAUSE WRITE needs 6.2 or later); upgrade it, or "
                          f"set mode = \"flush-only\" for targets.{target.name} (saves before "
                          f"the snapshot, but does not pause writes)")

    facts = _check_facts(info, s, points, appendfsync, data_dir)
    warnings = _check_warnings(info, points, appendfsync)
    check_aof(info, s)
    if warnings:
        facts["warnings"] = warnings
    return facts


# --- flush ----------------------------------------------------------------------------

@hookimpl
def flush(target: Target) -> dict[str, Any] | None:
    s = settings(target)
    errors = driver_errors()
    client = connect(s)
    try:
        deadline = Deadline(target.timeout)
        p = wait_idle(client, s, deadline, "before flush")
        check_aof(p, s)
        points = save_points(client)
        facts: dict[str, Any] = {}
        if s.aof_rewrite and p.get("aof_enabled"):
            facts["aof_rewrite_seconds"] = bgrewriteaof(client, s, deadline)
        if points:
            facts["bgsave"] = bgsave(client, s, deadline, "waiting for BGSAVE")
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


def _settle(client, s: Settings, pause_deadline_ms: int, now_ms: int,
            points: list[tuple[int, int]], p: dict[str, Any]) -> dict[str, Any]:
    """Under the pause: leave disk files complete and nothing that could write later.

    *p* is INFO persistence as read under the pause, *points* the save points read
    before it (configuration: no need to hold writers for it)."""
    # Bounded by the timeout, and ended well before Redis ends the pause by itself.
    deadline = Deadline(min(s.timeout, (pause_deadline_ms - now_ms) / 1000 - 0.5))
    if busy_with(p):
        p = wait_idle(client, s, deadline, "under the write pause")
    facts: dict[str, Any] = {}
    dirty = p.get("rdb_changes_since_last_save", 0)
    aof = bool(p.get("aof_enabled"))
    if points and dirty and (not aof or _save_could_fire(points, p, pause_deadline_ms)):
        # The RDB is what a restore loads (AOF off), or an automatic save would start
        # while the disks are frozen: save the paused dataset now.
        facts["final_bgsave"] = bgsave(client, s, deadline, "final save under the pause")
        p = read_info(client, "persistence")
    else:
        facts["final_bgsave"] = "not needed"
    if aof:
        # Acknowledged writes are normally write()n to the AOF before the reply; with
        # appendfsync everysec a write can be postponed while an fsync runs. Wait for the
        # buffer to drain so the file holds them all (the freeze makes them durable).
        # The first reading came with the pause's own reply, from the same pass of Redis's
        # event loop, before Redis writes the buffer out (it does so before it next
        # sleeps): so read again at once, then back off to POLL.
        pause = 0.0
        while p.get("aof_buffer_length", 0):
            if deadline.passed():
                raise TargetError(f"the AOF buffer of Redis at {s.where} was not "
                                  f"written out within {deadline.seconds:g} s (slow disk?)")
            time.sleep(pause)
            pause = min(POLL, max(0.001, pause * 4))
            p = read_info(client, "persistence")
        check_aof(p, s)
    return facts


class _Pipeline:
    """Commands written now and read later on one connection: the lock gate writes the
    pause, the core writes the release (``Hold.release``), each in a single packet."""

    def __init__(self, client, *commands: tuple):
        self.client, self.commands = client, commands
        self.packed = client.connection.pack_commands(commands)
        self.sent_at: float | None = None  # time.monotonic() just before the write
        self.replied_at: float | None = None  # time.time() once the replies were read
        self.failed = False  # the write failed: redis-py has disconnected

    def send(self) -> None:
        self.sent_at = time.monotonic()
        try:
            self.client.connection.send_packed_command(self.packed, check_health=False)
        except BaseException:
            self.failed = True
            raise

    @property
    def usable(self) -> bool:
        return not self.failed and self.client.connection is not None  # None: closed

    def replies(self) -> list[Any]:
        """Each command's reply, parsed as redis-py parses it; an error reply raises."""
        if self.sent_at is None:
            self.send()
        replies = [self.client.parse_response(self.client.connection, command[0])
                   for command in self.commands]
        self.replied_at = time.time()
        return replies


#: thaw's round trip: whether the pause still held (Valkey 8 says; Redis 7.0 does not), the
#: release, then the server's clock and identity.
RELEASE = (("INFO", "clients"), ("CLIENT", "UNPAUSE"), ("INFO", "server"))


def _unpause_after_failure(s: Settings, deadline_ms: int) -> str:
    try:
        client = connect(s)
        try:
            client.execute_command("CLIENT", "UNPAUSE")
        finally:
            client.close()
        return "writers were released"
    except Exception:
        return f"writers could not be released now; Redis releases them at {iso(deadline_ms)}"


@hookimpl
def quiesce(target: Target) -> Hold | None:
    s = settings(target)
    if s.mode == "flush-only":
        return None
    errors = driver_errors()
    ms = max(1, math.ceil(target.max_hold * 1000))
    client = connect(s)
    deadline_ms = None
    try:
        server = read_info(client, "server")
        read_at = time.monotonic()  # the server read its clock before this
        points = save_points(client)  # configuration: read before the pause, not under it
        pause = _Pipeline(client, ("CLIENT", "PAUSE", ms, "WRITE"), ("INFO", "persistence"))
        # Redis sets the pause's end from its clock when it runs the PAUSE, after the INFO
        # above: this is the earliest it can be, so thaw errs towards reporting it broken.
        # Set before the write: from then on a failure (a timeout) may leave a pause.
        deadline_ms = server_ms(server) + ms
        try:  # written together with the other targets' locks, and read in turn with them
            paused, persistence = target.lock_gate(pause.send, pause.replies)
        except errors.ResponseError as e:
            deadline_ms = None  # refused: nothing is paused
            raise TargetError(f"CLIENT PAUSE {ms} WRITE failed on Redis at {s.where}: "
                              f"{e} (Redis 6.2 or later is needed; see mode = "
                              f"\"flush-only\")") from None
        finally:  # ... and it ran after the write, at least this long after the INFO
            before_ms = server_ms(server) + int(((pause.sent_at or read_at) - read_at) * 1000)
            if deadline_ms is not None:
                deadline_ms = before_ms + ms
        facts = {"pause_ms": ms, "pause_deadline": iso(deadline_ms),
                 "pause_deadline_ms": deadline_ms, "run_id": server.get("run_id")}
        facts.update(_settle(client, s, deadline_ms, before_ms, points, persistence))
        # the connection stays open for the release: thaw then costs no connect
        hold = Hold(session=None, facts=facts, locked_at=pause.replied_at,
                    release=_Pipeline(client, *RELEASE))
        client = None
        return hold
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
        if client is not None:
            client.close()


def _release(s: Settings, hold: Hold) -> list[Any]:
    """The replies to RELEASE: on the connection kept since quiesce (the core has written
    the release already), or, when it is gone (the holder died) or broken, a new one."""
    errors = driver_errors()
    kept = hold.release
    if kept is not None:
        try:
            if kept.usable:  # not: its write failed, or a second thaw of this hold
                return kept.replies()
        except (errors.ConnectionError, errors.TimeoutError):
            pass  # closed while idle (the server's `timeout`?): once more, connected anew
        finally:
            kept.client.close()
    deadline_ms = (hold.facts or {}).get("pause_deadline_ms")
    try:
        client = connect(s)
    except TargetError as e:
        later = f"; Redis ends the pause by itself at {iso(deadline_ms)}" if deadline_ms else ""
        raise TargetError(f"{e}{later}") from None
    try:
        return _Pipeline(client, *RELEASE).replies()
    finally:
        client.close()


@hookimpl
def thaw(target: Target, hold: Hold) -> dict[str, Any] | None:
    s = settings(target)
    facts = hold.facts or {}
    if s.mode == "flush-only" and "pause_deadline_ms" not in facts:
        return None  # nothing was paused
    errors = driver_errors()
    deadline_ms = facts.get("pause_deadline_ms")
    try:
        clients, _, server = _release(s, hold)
    except errors.RedisError as e:
        raise TargetError(f"CLIENT UNPAUSE failed on Redis at {s.where}: {e}"
                          + (f"; Redis ends the pause by itself at {iso(deadline_ms)}"
                             if deadline_ms else "")) from None
    now_ms = server_ms(server)
    result = {"unpaused_at": iso(now_ms)}
    if facts.get("run_id") and server.get("run_id") != facts["run_id"]:
        raise HoldBroken(f"Redis at {s.where} restarted during the hold (run_id "
                         f"changed), which ended the pause: the snapshot may contain writes "
                         f"made after the freeze")
    if deadline_ms is not None and now_ms >= deadline_ms:
        raise HoldBroken(f"the pause ended by itself at {iso(deadline_ms)}, before thaw: the "
                         f"snapshot may contain writes made after the freeze (raise the "
                         f"target's max_hold if the snapshot takes longer)")
    if deadline_ms is not None and clients.get("paused_actions") == "none":
        raise HoldBroken(f"the pause on {s.where} had already ended before thaw (another "
                         f"client's CLIENT UNPAUSE?): the snapshot may contain writes made "
                         f"after the freeze")
    if deadline_ms is not None:
        result["pause_left_ms"] = deadline_ms - now_ms
    return result
