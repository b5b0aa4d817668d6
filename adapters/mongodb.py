"""MongoDB: a checkpoint before the snapshot, or the server's fsync lock across it.

mode = "journal" (the default)
    flush    ``{fsync: 1}``: a WiredTiger checkpoint, so the restored copy replays
             little journal.
    quiesce  nothing. Correct when the snapshot captures all of dbPath, journal
             included, at one instant (one volume, or volumes in one consistency group):
             MongoDB documents any snapshot as safe then, the journal makes it so.
mode = "lock"
    flush    ``{fsync: 1}`` as above, so the lock's own flush is short.
    quiesce  ``currentOp`` must show no fsync lock (we never nest on someone else's),
             then ``{fsync: 1, lock: true}``; its reply's ``lockCount`` must be 1.
    thaw     one ``{fsyncUnlock: 1}``, after ``currentOp`` shows the lock still there;
             the reply's ``lockCount`` must be back to what it was before quiesce.
             Needed when the journal is on another volume than the data, or the volumes
             are not snapshotted at one instant.

The fsync lock is kept by the server (a ``fsyncLockWorker`` thread), not by our
connection: it survives the client exiting, nests by count, any authorised client can
release it, and nothing ever releases it by itself. So ``Hold.session`` stays ``None``
and ``Hold.facts`` records what ``thaw`` needs (the lock count we left, the server's
process id to detect a restart): a thaw after a crash, or the holder's watchdog at
``max_hold``, releases exactly the lock quiesce took and nothing else.

Replica sets: ``check`` reports the member's state from ``hello``; ``lock`` mode refuses
a primary (and a mongos, which locks every shard's primary) unless ``allow_primary =
true``. Sharded clusters: ``stop_balancer = true`` on a mongos target stops the
balancer in ``quiesce`` (unless an operator had already stopped it) and starts it again
in ``thaw``.

Settings: ``uri`` (no password in it) or ``uri_file`` (a 0600 file holding the URI),
``mode``, ``allow_primary``, ``stop_balancer``, ``tls``, ``tls_ca_file``,
``tls_certificate_key_file``, ``tls_certificate_key_file_password_file``. Every wait is
bounded by the target's ``timeout`` (server selection, connect, socket). See
docs/adapters/mongodb.md.
"""

from __future__ import annotations

import re
import time
from typing import Any

from quiesce import Hold, HoldBroken, Target, TargetError, hookimpl
from quiesce.adapters.mongodb_connection import (COMMAND_NOT_FOUND, UNAUTHORIZED, cmd,
                                                 connected, driver, endpoint, open_client,
                                                 reason, run, settings, translate, uri_hosts)

#: Releases whose mongos can fsync-lock the whole cluster (7.1 and later, plus backports).
MONGOS_LOCK_SINCE = {4: (4, 4, 25), 5: (5, 0, 22), 6: (6, 0, 11), 7: (7, 0, 2)}
#: ``fsyncLockAcquisitionTimeoutMillis`` exists from this release on.
ACQUISITION_TIMEOUT_SINCE = (7, 0, 2)


# -- server facts ----------------------------------------------------------------------


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("-")[0])[:3])


def _hello(target: Target, client) -> dict:
    errors = driver().errors
    try:
        return client.admin.command("hello")
    except errors.OperationFailure as e:
        if e.code != COMMAND_NOT_FOUND:  # before 4.4.2 the command was only isMaster
            raise translate(target, "reading the member state (hello)", e) from None
    except errors.PyMongoError as e:
        raise translate(target, "reading the member state (hello)", e) from None
    return run(target, client, "reading the member state (isMaster)", cmd("isMaster"))


def _member(hello: dict) -> dict[str, Any]:
    """What this server is: mongos, standalone, primary, secondary, arbiter or other."""
    primary = bool(hello.get("isWritablePrimary", hello.get("ismaster")))
    if hello.get("msg") == "isdbgrid":
        state = "mongos"
    elif hello.get("arbiterOnly"):
        state = "arbiter"
    elif hello.get("setName"):
        state = "primary" if primary else "secondary" if hello.get("secondary") else "other"
    else:
        state = "standalone" if primary else "other"
    member: dict[str, Any] = {"member": state}
    if hello.get("setName"):
        member["replica_set"] = hello["setName"]
    if hello.get("hidden"):
        member["hidden"] = True
    return member


def _process_id(hello: dict) -> str | None:
    """Unique per mongod start (4.4+): a different one at thaw means a restart."""
    tv = hello.get("topologyVersion") or {}
    return str(tv["processId"]) if tv.get("processId") is not None else None


def _refuse_member(target: Target, member: dict, version: tuple[int, ...]) -> None:
    """lock mode: lock where it hurts least, or refuse."""
    state = member["member"]
    allow_primary = settings(target).allow_primary
    where = endpoint(target)
    if state == "primary" and not allow_primary:
        raise TargetError(
            f"{where} is the PRIMARY of replica set {member.get('replica_set')}: an fsync lock "
            f"there blocks every write of the application for the whole snapshot; point the "
            f"URI at a (hidden) secondary, or set allow_primary = true to accept that")
    if state == "mongos":
        needed = MONGOS_LOCK_SINCE.get(version[0], (7, 1)) if version and version[0] <= 7 else ()
        if version < needed:
            raise TargetError(
                f"{where} is a mongos {'.'.join(map(str, version))}, which cannot take the "
                f"fsync lock (needs 7.1, 7.0.2, 6.0.11, 5.0.22 or 4.4.25); lock one secondary "
                f"of each shard and of the config server replica set with separate targets")
        if not allow_primary:
            raise TargetError(
                f"{where} is a mongos: an fsync lock through it blocks writes on every shard's "
                f"primary and the config servers; set allow_primary = true to accept that, or "
                f"lock one secondary per shard and config server with separate targets")
    if state in {"arbiter", "other"}:
        what = ("an arbiter, which holds no data" if state == "arbiter" else
                "neither primary nor secondary (recovering, starting or removed)")
        raise TargetError(f"{where} is {what}; point the URI at a healthy data-bearing member")


def _fsync_locked(target: Target, client, member: str) -> bool | None:
    """currentOp's fsyncLock flag; None on a mongos, whose currentOp does not report it.

    ``$ownOps`` lets a user without the ``inprog`` action run it; the flag is appended
    to the reply whatever the filter matches.
    """
    if member == "mongos":
        return None
    reply = run(target, client, "reading the fsync lock state (currentOp)",
                 cmd("currentOp", **{"$ownOps": True}))
    return bool(reply.get("fsyncLock"))


def _lock_counts(reply: dict, member: str) -> dict[str, int]:
    """The lock count per server in an fsync or fsyncUnlock reply."""
    if member != "mongos":
        return {"mongod": int(reply.get("lockCount", -1))}
    counts: dict[str, int] = {}

    def walk(doc: Any, name: str) -> None:
        if isinstance(doc, dict):
            if "lockCount" in doc:
                counts[name] = int(doc["lockCount"])
            for key, value in doc.items():
                walk(value, key if key not in {"all", "raw"} else name)

    walk({k: v for k, v in reply.items() if k in {"all", "raw"}}, "mongos")
    return counts


# -- privileges ------------------------------------------------------------------------


def _role_actions(mode: str, mongos: bool) -> list[str]:
    """The cluster actions of the role to create for *mode* (all members alike)."""
    unlock = ["fsyncUnlock" if mongos else "unlock"] if mode == "lock" else []
    return ["fsync", *unlock, "serverStatus", *([] if mongos else ["replSetGetStatus"])]


def _needs(mode: str, member: dict) -> list[str]:
    """The cluster actions this very server needs (replSetGetStatus only in a replica set)."""
    mongos = member["member"] == "mongos"
    return [a for a in _role_actions(mode, mongos)
            if a != "replSetGetStatus" or member.get("replica_set")]


def _role_definition(actions: list[str], balancer: bool, user: str, user_db: str) -> str:
    privileges = [f'{{resource: {{cluster: true}}, actions: [{", ".join(map(repr, actions))}]}}']
    if balancer:
        privileges.append('{resource: {db: "config", collection: "settings"}, '
                          'actions: ["find", "update"]}')
    return (f'db.getSiblingDB("admin").createRole({{role: "quiesce", privileges: '
            f'[{", ".join(privileges)}], roles: []}}); '
            f'db.getSiblingDB("{user_db}").grantRolesToUser("{user}", '
            f'[{{role: "quiesce", db: "admin"}}])').replace("'", '"')


def _granted(privileges: list[dict]) -> tuple[set[str], set[str]]:
    """Actions granted on the cluster, and on config.settings."""
    cluster: set[str] = set()
    settings: set[str] = set()
    for p in privileges:
        resource, actions = p.get("resource") or {}, set(p.get("actions") or ())
        if resource.get("anyResource"):
            cluster |= actions
            settings |= actions
        elif resource.get("cluster"):
            cluster |= actions
        elif (resource.get("db") == "config"
              and resource.get("collection") in {"settings", ""}):
            settings |= actions
    return cluster, settings


def _check_privileges(target: Target, client, mode: str, member: dict,
                      stop_balancer: bool) -> dict[str, Any]:
    status = run(target, client, "reading the privileges (connectionStatus)",
                  cmd("connectionStatus", showPrivileges=True))
    info = status.get("authInfo") or {}
    users = info.get("authenticatedUsers") or []
    if not users:
        return {"user": None}  # no auth, or not logged in: serverStatus tells which
    user, user_db = users[0].get("user", "?"), users[0].get("db", "admin")
    cluster, on_settings = _granted(info.get("authenticatedUserPrivileges") or [])
    if "unlock" in cluster:
        cluster.add("fsyncUnlock")  # what a mongos checks in 7.x; backports may check unlock
    missing = [a for a in _needs(mode, member) if a not in cluster and "anyAction" not in cluster]
    missing = [f"{', '.join(missing)} on the cluster"] if missing else []
    if stop_balancer and not ({"find", "update"} <= on_settings or "anyAction" in on_settings):
        missing.append("find, update on config.settings")
    if missing:
        role = _role_definition(_role_actions(mode, member["member"] == "mongos"),
                                stop_balancer, user, user_db)
        raise TargetError(
            f"user {user}@{user_db} on {endpoint(target)} lacks {' and '.join(missing)}, which "
            f"mode {mode} needs (the built-in backup role has no fsync or unlock); as a user "
            f"administrator run in mongosh: {role}")
    return {"user": f"{user}@{user_db}",
            "roles": sorted(f"{r.get('role')}@{r.get('db')}"
                            for r in info.get("authenticatedUserRoles") or [])}


def _replication_lag(status: dict) -> float | None:
    members = status.get("members") or []
    me = next((m for m in members if m.get("self")), None)
    primary = next((m for m in members if m.get("stateStr") == "PRIMARY"), None)
    if not me or not primary or not me.get("optimeDate") or not primary.get("optimeDate"):
        return None
    return round(max(0.0, (primary["optimeDate"] - me["optimeDate"]).total_seconds()), 3)


# -- hooks -----------------------------------------------------------------------------


@hookimpl
def validate(target: Target) -> None:
    settings(target)


@hookimpl
def check(target: Target) -> dict[str, Any]:
    s = settings(target)
    mode, stop_balancer = s.mode, s.stop_balancer
    with connected(target) as client:
        build = run(target, client, "reading the server version (buildInfo)", cmd("buildInfo"))
        version = _version(str(build.get("version", "0")))
        member = _member(_hello(target, client))
        facts: dict[str, Any] = {"version": build.get("version"), "mode": mode, **member}
        if stop_balancer and member["member"] != "mongos":
            raise TargetError(f"stop_balancer = true needs a mongos, but {endpoint(target)} is "
                              f"a {member['member']}; point the URI at a mongos or remove "
                              f"stop_balancer")
        if mode == "lock" or member["member"] == "arbiter":
            _refuse_member(target, member, version)
        facts.update(_check_privileges(target, client, mode, member, stop_balancer))
        try:
            status = client.admin.command("serverStatus")
        except driver().errors.PyMongoError as e:
            if getattr(e, "code", None) == UNAUTHORIZED and facts["user"] is None:
                role = _role_definition(_role_actions(mode, member["member"] == "mongos"),
                                        stop_balancer, "USER", "admin")
                raise TargetError(
                    f"{endpoint(target)} requires authentication and the URI logs in as nobody; "
                    f"create a user with this role and put mongodb://USER:PASSWORD@"
                    f"{uri_hosts(s.uri)}/?authSource=admin in uri_file: {role}") from None
            raise translate(target, "reading serverStatus", e) from None
        engine = status.get("storageEngine") or {}
        if engine.get("name"):
            facts["storage_engine"] = engine["name"]
        if engine.get("persistent") is False:
            raise TargetError(f"{endpoint(target)} runs the {engine.get('name')} storage engine, "
                              f"which keeps no data on disk: a disk snapshot holds nothing to "
                              f"restore; remove this target")
        if member.get("replica_set") and member["member"] != "mongos":
            rs = run(target, client, "reading the replica set status (replSetGetStatus)",
                      cmd("replSetGetStatus"))
            lag = _replication_lag(rs)
            if lag is not None:
                facts["replication_lag_s"] = lag
        if stop_balancer:
            balancer = run(target, client, "reading the balancer state (balancerStatus)",
                            cmd("balancerStatus"))
            facts["balancer"] = balancer.get("mode")
        if mode == "lock":
            locked = _fsync_locked(target, client, member["member"])
            if locked:
                raise _already_locked(target)
            if locked is not None:  # a mongos does not report it
                facts["fsync_locked"] = False
    return facts


def _already_locked(target: Target) -> TargetError:
    return TargetError(
        f"{endpoint(target)} is already fsync-locked by another client; quiesce does not nest "
        f"on a lock it did not take. Find the holder with db.currentOp(), and once its backup "
        f"is done release it with db.fsyncUnlock()")


@hookimpl
def flush(target: Target) -> dict[str, Any]:
    with connected(target) as client:
        run(target, client, "flushing to disk (fsync)", cmd("fsync"))
    return {"checkpoint": "done"}


def _stop_balancer(target: Target, client) -> bool:
    """Stop the balancer unless an operator had; true when we stopped it."""
    status = run(target, client, "reading the balancer state (balancerStatus)",
                  cmd("balancerStatus"))
    if status.get("mode") == "off":
        return False  # someone else stopped it: they start it again, not us
    try:
        run(target, client, "stopping the balancer (balancerStop)",
             cmd("balancerStop", maxTimeMS=max(1, int(target.timeout * 1000))))
    except TargetError:
        # The server turns the mode off before it waits for the round to end: a stop that
        # timed out may still have stopped it. Never leave it off behind a failure.
        _start_balancer(target, client)
        raise
    return True


def _start_balancer(target: Target, client) -> str | None:
    """Start the balancer again; an error message, or None."""
    try:
        run(target, client, "starting the balancer again (balancerStart)",
             cmd("balancerStart", maxTimeMS=max(1, int(target.timeout * 1000))))
    except TargetError as e:
        return f"{e}; the balancer stays stopped until you run sh.startBalancer()"
    return None


@hookimpl
def quiesce(target: Target) -> Hold | None:
    s = settings(target)
    mode, stop_balancer = s.mode, s.stop_balancer
    if mode == "journal" and not stop_balancer:
        return None  # the checkpoint was the flush; nothing to hold
    with connected(target) as client:
        facts: dict[str, Any] = {"mode": mode, "server": uri_hosts(s.uri)}
        version: tuple[int, ...] = ()
        member = {"member": "mongos"} if stop_balancer else {"member": "unknown"}
        if mode == "lock":
            build = run(target, client, "reading the server version (buildInfo)",
                         cmd("buildInfo"))
            version = _version(str(build.get("version", "0")))
            hello = _hello(target, client)
            member = _member(hello)
            _refuse_member(target, member, version)
            facts.update(member)
            if member["member"] != "mongos" and _process_id(hello):
                facts["process_id"] = _process_id(hello)
            if _fsync_locked(target, client, member["member"]):
                raise _already_locked(target)
        locked_at = None  # the balancer alone blocks no writer
        if stop_balancer:
            facts["balancer_stopped"] = _stop_balancer(target, client)
        if mode == "lock":
            try:
                target.lock_gate()  # checked: lock together with the other targets
                facts.update(_lock(target, client, member["member"], version))
                locked_at = time.time()
            except TargetError as e:
                if facts.get("balancer_stopped"):
                    problem = _start_balancer(target, client)
                    if problem:
                        raise TargetError(f"{e}; also: {problem}") from None
                raise
    return Hold(session=None, facts=facts, locked_at=locked_at)


def _lock(target: Target, client, member: str, version: tuple[int, ...]) -> dict[str, Any]:
    """Take one fsync lock and prove it is the only one; leave nothing behind on failure."""
    errors = driver().errors
    command = cmd("fsync", lock=True)
    if version >= ACQUISITION_TIMEOUT_SINCE:
        # Honoured on the mongos path (7.x); a direct mongod waits on the client's timeout.
        command["fsyncLockAcquisitionTimeoutMillis"] = max(1, int(target.timeout * 1000))
    try:
        reply = client.admin.command(command)
    except errors.ConnectionFailure as e:
        # The server may still be waiting for the lock and take it after we gave up.
        raise TargetError(f"could not take the fsync lock on {endpoint(target)} within "
                          f"{target.timeout:g} s ({reason(e)}); "
                          f"{_release_pending(target, client, member)}") from None
    except errors.OperationFailure as e:
        raise TargetError(f"the fsync lock failed on {endpoint(target)}: {reason(e)}; "
                          f"nothing was left locked (a failed fsync lock resets its count)"
                          ) from None
    counts = _lock_counts(reply, member)
    if any(n != 1 for n in counts.values()):  # (a mongos reply may carry no counts at all)
        # Someone else locked between our currentOp and our lock: give ours back.
        released = _unlock_once(target, client, member)
        raise TargetError(
            f"another client took an fsync lock on {endpoint(target)} at the same moment "
            f"(lock count {_show(counts)} after ours); released ours ({released}) and left "
            f"theirs: retry once their backup is done")
    facts: dict[str, Any] = {"locked": True, "locked_at": round(time.time(), 3),
                             "lock_count_before": 0}
    if member == "mongos":
        facts["lock_counts"] = counts
    else:
        facts["lock_count"] = counts["mongod"]
    return facts


def _show(counts: dict[str, int]) -> str:
    if set(counts) == {"mongod"}:
        return str(counts["mongod"])
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "not reported"


def _unlock_once(target: Target, client, member: str) -> str:
    try:
        reply = client.admin.command("fsyncUnlock")
    except driver().errors.PyMongoError as e:
        return (f"fsyncUnlock failed: {reason(e)}; run db.fsyncUnlock() on it once by hand")
    return f"lock count now {_show(_lock_counts(reply, member))}"


def _release_pending(target: Target, client, member: str) -> str:
    """After a lock request got no answer: release it if it was (or gets) granted.

    fsyncUnlock waits on the server for a pending fsync lock to finish, then takes one
    count off: our request's. If the lock request had failed, the count is 0 and the
    server answers "not locked".
    """
    errors = driver().errors
    try:
        reply = client.admin.command("fsyncUnlock")
    except errors.OperationFailure as e:
        if "not locked" in str(e):
            return "nothing was left locked"
        return (f"releasing it failed ({reason(e)}): check db.currentOp().fsyncLock on it and "
                f"run db.fsyncUnlock() if it is true")
    except errors.PyMongoError as e:
        return (f"releasing it got no answer either ({reason(e)}): the server may still take "
                f"the lock; check db.currentOp().fsyncLock on it and run db.fsyncUnlock() if "
                f"it is true")
    return (f"the request was granted after we gave up and was released (lock count now "
            f"{_show(_lock_counts(reply, member))}); a long operation kept it waiting")


@hookimpl
def thaw(target: Target, hold: Hold) -> dict[str, Any] | None:
    facts = hold.facts if hold is not None else {}
    mode = settings(target).mode
    if facts.get("thawed"):
        return None  # released by an earlier call: thaw is idempotent
    locked, balancer = bool(facts.get("locked")), bool(facts.get("balancer_stopped"))
    if not locked and not balancer:
        if mode == "lock" and not facts.get("mode"):
            return _check_nothing_left(target)
        return None
    result: dict[str, Any] = {}
    failures: list[str] = []
    broken: list[str] = []
    client = open_client(target)
    try:
        if locked:
            try:
                result.update(_release(target, client, facts))
                facts["locked"] = False
            except HoldBroken as e:
                facts["locked"] = False  # nothing of ours is left to release
                broken.append(str(e))
            except TargetError as e:
                failures.append(str(e))
        if balancer:
            problem = _start_balancer(target, client)
            if problem:
                failures.append(problem)
            else:
                facts["balancer_stopped"] = False
                result["balancer"] = "started"
    finally:
        client.close()
    if not facts.get("locked") and not facts.get("balancer_stopped"):
        facts["thawed"] = True
    if failures:
        raise TargetError("; ".join(failures + broken))
    if broken:
        raise HoldBroken("; ".join(broken))
    return result or None


def _release(target: Target, client, facts: dict[str, Any]) -> dict[str, Any]:
    """Release the one fsync lock quiesce took, verifying it is still ours to release."""
    errors = driver().errors
    where = endpoint(target)
    member = facts.get("member", "unknown")
    try:
        hello = client.admin.command("hello")
    except errors.OperationFailure:
        hello = {}
    except errors.ConnectionFailure as e:
        raise TargetError(
            f"cannot reach {where} to release the fsync lock ({reason(e)}): if mongod still "
            f"runs it stays locked (writes blocked) until released; run `quiesce thaw` again, "
            f"or db.fsyncUnlock() on it. If it stopped, the lock went with it and the "
            f"snapshot is only crash-consistent") from None
    recorded = facts.get("process_id")
    if recorded and _process_id(hello) and _process_id(hello) != recorded:
        raise HoldBroken(f"{where} restarted during the hold, and its fsync lock ended with "
                         f"the old process: the snapshot is only crash-consistent")
    if _fsync_locked(target, client, member) is False:
        raise HoldBroken(f"{where} was no longer fsync-locked at thaw: another client ran "
                         f"fsyncUnlock during the hold, so the snapshot is only "
                         f"crash-consistent")
    try:
        reply = client.admin.command("fsyncUnlock")
    except errors.OperationFailure as e:
        if "not locked" in str(e):
            raise HoldBroken(f"{where} was no longer fsync-locked at thaw ({reason(e)}): the "
                             f"snapshot is only crash-consistent") from None
        raise TargetError(f"fsyncUnlock failed on {where}: {reason(e)}; it stays locked "
                          f"(writes blocked): run db.fsyncUnlock() on it once") from None
    except errors.ConnectionFailure as e:
        raise TargetError(f"fsyncUnlock got no answer from {where} ({reason(e)}): the lock "
                          f"may still be held; check db.currentOp().fsyncLock and run "
                          f"db.fsyncUnlock() once if it is true") from None
    facts["locked"] = False  # our one count is off: never send a second unlock for it
    counts = _lock_counts(reply, member)
    before = int(facts.get("lock_count_before", 0))
    others = {k: n for k, n in counts.items() if n != before}
    if others:
        # Our lock is released; the count left belongs to someone else: not ours to release.
        raise TargetError(
            f"released our fsync lock on {where}, but it is still locked (lock count "
            f"{_show(others)}, was {before} before quiesce): another client took an fsync "
            f"lock during the hold and quiesce leaves it to them. Writes stay blocked until "
            f"it is released: find the holder with db.currentOp(), then db.fsyncUnlock()")
    return {"lock_count": _show(counts), "held_for_s": round(time.time() - facts.get(
        "locked_at", time.time()), 3)}


def _check_nothing_left(target: Target) -> dict[str, Any]:
    """lock mode, nothing recorded: quiesce was interrupted, or its record was lost.

    A lock we cannot attribute is never released here (it may be another backup's), but
    it is reported: a mongod left locked blocks every write until someone unlocks it.
    """
    with connected(target) as client:
        member = _member(_hello(target, client))["member"]
        locked = _fsync_locked(target, client, member)
    if locked:
        raise TargetError(
            f"{endpoint(target)} is fsync-locked (writes blocked) and quiesce has no record of "
            f"taking that lock (its quiesce was interrupted, or the record was lost); if no "
            f"other backup is running, release it with db.fsyncUnlock() until lockCount is 0")
    return {"fsync_locked": locked}
