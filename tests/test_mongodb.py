"""The mongodb adapter.

Two layers, in one module:

* Wire-level tests (always run): the adapter, called through the core's dispatcher in a
  worker thread, speaks PyMongo's real OP_MSG protocol to a scripted MockupDB peer; each
  test asserts every command's exact name, arguments and order, and answers it the way
  mongod does (lockCount, errors, hang-ups). They prove the conversation, not mongod's
  behaviour.
* Real-server tests (``real_mongod``): the same hooks against a throwaway ``mongod``
  when one is on PATH; skipped with the reason in tests/support/mongodb_server.py otherwise.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

import quiesce
from quiesce import Hold, HoldBroken, TargetError
from quiesce.errors import ConfigError
from quiesce.plugins import load_adapters

from .support.mongodb_server import NO_MONGOD, Mongod, free_port, mongod_binary
from .support.mongodb_wire import ScriptedMongod, StatefulMongod, expect, run_hook

pymongo = pytest.importorskip("pymongo")

OK_PRIVILEGES = {"authInfo": {
    "authenticatedUsers": [{"user": "snap", "db": "admin"}],
    "authenticatedUserRoles": [{"role": "quiesce", "db": "admin"}],
    "authenticatedUserPrivileges": [{"resource": {"cluster": True}, "actions": [
        "fsync", "unlock", "serverStatus", "replSetGetStatus"]}]}}
STORAGE = {"storageEngine": {"name": "wiredTiger", "persistent": True}}
NOT_LOCKED = {"inprog": []}
LOCKED = {"inprog": [], "fsyncLock": True,
          "info": "use db.fsyncUnlock() to terminate the fsync write/snapshot lock"}


@pytest.fixture(scope="module")
def adapters():
    return load_adapters(load_entrypoints=False)


@pytest.fixture
def fakes():
    made: list[ScriptedMongod] = []

    def make(member: str = "secondary", cls=ScriptedMongod, **kwargs) -> ScriptedMongod:
        made.append(cls(member, **kwargs))
        return made[-1]

    yield make
    for fake in made:
        fake.stop()


def target(adapters, uri: str, timeout: float = 5, **settings) -> quiesce.Target:
    t = quiesce.Target(name="t", kind="mongodb", settings={"uri": uri, **settings},
                       timeout=timeout, max_hold=30)
    adapters.call("validate", t)
    assert not t.unknown_keys()
    return t


# -- validate (no server) --------------------------------------------------------------


def test_validate_refuses_passwords_in_config_and_ambiguous_servers(adapters, tmp_path):
    def invalid(**settings) -> str:
        t = quiesce.Target(name="t", kind="mongodb", settings=settings)
        with pytest.raises(ConfigError) as e:
            adapters.call("validate", t)
        return str(e.value)

    assert "uri_file" in invalid(uri="mongodb://snap:s3cret@127.0.0.1:27017/")
    assert "s3cret" not in invalid(uri="mongodb://snap:s3cret@127.0.0.1:27017/")
    assert "exactly one host" in invalid(uri="mongodb://a:1,b:2/?replicaSet=rs0")
    assert "per server" in invalid(uri="mongodb+srv://cluster.example.net/")
    assert "'lock'" in invalid(uri="mongodb://127.0.0.1:1/", mode="fsync")
    loose = tmp_path / "uri"
    loose.write_text("mongodb://snap:s3cret@127.0.0.1:27017/\n")
    loose.chmod(0o644)
    assert "chmod 600" in invalid(uri_file=str(loose))
    loose.chmod(0o600)
    assert "not both" in invalid(uri="mongodb://127.0.0.1:1/", uri_file=str(loose))
    t = quiesce.Target(name="t", kind="mongodb", settings={"uri_file": str(loose), "typo": 1})
    adapters.call("validate", t)
    assert t.unknown_keys() == ["typo"]


def test_a_target_with_only_a_kind_connects_where_mongosh_would(adapters):
    """mongosh with no options: 127.0.0.1:27017, where a stock mongod.conf binds."""
    from quiesce.adapters import mongodb_connection
    t = quiesce.Target(name="t", kind="mongodb", settings={}, timeout=1)
    adapters.call("validate", t)
    assert mongodb_connection.settings(t).uri == "mongodb://127.0.0.1:27017/"
    assert "127.0.0.1:27017" in mongodb_connection.settings(t).where


# -- check -----------------------------------------------------------------------------


def test_check_reports_a_hidden_secondary_and_its_lag(adapters, fakes):
    fake = fakes("secondary", hidden=True)
    t = target(adapters, fake.uri, mode="lock")
    future = run_hook(adapters, "check", t)
    expect(fake, "buildInfo", reply={"version": "7.0.14"})
    expect(fake, "connectionStatus", {"showPrivileges": True}, reply=OK_PRIVILEGES)
    expect(fake, "serverStatus", reply=STORAGE)
    from datetime import datetime, timedelta
    now = datetime(2026, 1, 1)
    expect(fake, "replSetGetStatus", reply={"members": [
        {"stateStr": "PRIMARY", "optimeDate": now},
        {"stateStr": "SECONDARY", "self": True, "optimeDate": now - timedelta(seconds=2)}]})
    expect(fake, "currentOp", {"$ownOps": True}, reply=NOT_LOCKED)
    facts = future()
    fake.assert_quiet()
    assert facts == {"version": "7.0.14", "mode": "lock", "member": "secondary",
                     "replica_set": "rs0", "hidden": True, "user": "snap@admin",
                     "roles": ["quiesce@admin"], "storage_engine": "wiredTiger",
                     "replication_lag_s": 2.0, "fsync_locked": False}


def test_check_names_the_role_to_create_when_privileges_are_missing(adapters, fakes):
    fake = fakes("secondary")
    t = target(adapters, fake.uri, mode="lock")
    future = run_hook(adapters, "check", t)
    expect(fake, "buildInfo", reply={"version": "6.0.5"})
    expect(fake, "connectionStatus", {"showPrivileges": True}, reply={"authInfo": {
        "authenticatedUsers": [{"user": "snap", "db": "admin"}],
        "authenticatedUserRoles": [{"role": "backup", "db": "admin"}],
        "authenticatedUserPrivileges": [{"resource": {"cluster": True},
                                         "actions": ["listDatabases", "serverStatus"]}]}})
    with pytest.raises(TargetError) as e:
        future()
    fake.assert_quiet()
    message = str(e.value)
    assert "\n" not in message
    assert "lacks fsync, unlock, replSetGetStatus on the cluster" in message
    assert ('db.getSiblingDB("admin").createRole({role: "quiesce", privileges: [{resource: '
            '{cluster: true}, actions: ["fsync", "unlock", "serverStatus", "replSetGetStatus"]}], '
            'roles: []}); db.getSiblingDB("admin").grantRolesToUser("snap", '
            '[{role: "quiesce", db: "admin"}])') in message


def test_check_without_credentials_on_an_auth_server_says_how_to_log_in(adapters, fakes):
    fake = fakes("standalone")
    t = target(adapters, fake.uri)
    future = run_hook(adapters, "check", t)
    expect(fake, "buildInfo", reply={"version": "8.0.4"})
    expect(fake, "connectionStatus", {"showPrivileges": True},
           reply={"authInfo": {"authenticatedUsers": [], "authenticatedUserRoles": []}})
    expect(fake, "serverStatus", error=(13, "command serverStatus requires authentication"))
    with pytest.raises(TargetError, match=r"requires authentication.*uri_file.*createRole"):
        future()
    fake.assert_quiet()


def test_check_and_quiesce_refuse_a_primary_in_lock_mode(adapters, fakes):
    fake = fakes("primary")
    t = target(adapters, fake.uri, mode="lock")
    future = run_hook(adapters, "check", t)
    expect(fake, "buildInfo", reply={"version": "7.0.14"})
    with pytest.raises(TargetError, match=r"PRIMARY of replica set rs0.*allow_primary = true"):
        future()
    future = run_hook(adapters, "quiesce", t)
    expect(fake, "buildInfo", reply={"version": "7.0.14"})
    with pytest.raises(TargetError, match="PRIMARY"):
        future()
    fake.assert_quiet()  # no currentOp, and above all no fsync lock

    allowed = target(adapters, fake.uri, mode="lock", allow_primary=True)
    future = run_hook(adapters, "quiesce", allowed)
    expect(fake, "buildInfo", reply={"version": "7.0.14"})
    expect(fake, "currentOp", {"$ownOps": True}, reply=NOT_LOCKED)
    expect(fake, "fsync", {"lock": True, "fsyncLockAcquisitionTimeoutMillis": 5000},
           reply={"lockCount": 1})
    hold = future()
    assert hold.facts["member"] == "primary" and hold.facts["locked"]


def test_check_refuses_stop_balancer_on_a_replica_set_member(adapters, fakes):
    fake = fakes("secondary")
    t = target(adapters, fake.uri, stop_balancer=True)
    future = run_hook(adapters, "check", t)
    expect(fake, "buildInfo", reply={"version": "7.0.14"})
    with pytest.raises(TargetError, match="stop_balancer = true needs a mongos"):
        future()
    fake.assert_quiet()


def test_check_refuses_an_arbiter(adapters, fakes):
    fake = fakes("arbiter")
    future = run_hook(adapters, "check", target(adapters, fake.uri))
    expect(fake, "buildInfo", reply={"version": "7.0.14"})
    with pytest.raises(TargetError, match="an arbiter, which holds no data"):
        future()
    fake.assert_quiet()


# -- journal mode ----------------------------------------------------------------------


def test_journal_mode_flushes_and_holds_nothing(adapters, fakes):
    fake = fakes("primary")
    t = target(adapters, fake.uri)  # mode journal is the default; a primary is fine
    future = run_hook(adapters, "flush", t)
    expect(fake, "fsync", reply={"numFiles": 1})
    assert future() == {"checkpoint": "done"}
    assert adapters.call("quiesce", t) is None
    assert adapters.call("thaw", t, hold=Hold()) is None
    fake.assert_quiet()


def test_flush_failure_is_one_line_naming_the_server(adapters, fakes):
    fake = fakes("secondary")
    t = target(adapters, fake.uri)
    future = run_hook(adapters, "flush", t)
    expect(fake, "fsync", error=(13, "not authorized on admin to execute command"))
    with pytest.raises(TargetError) as e:
        future()
    assert f"127.0.0.1:{fake.server.port}" in str(e.value) and "quiesce check" in str(e.value)


# -- lock mode: the normal cycle --------------------------------------------------------


def lock(adapters, fake, t, *, version="7.0.14", lock_args=None):
    """Script a successful lock-mode quiesce; returns the Hold."""
    future = run_hook(adapters, "quiesce", t)
    expect(fake, "buildInfo", reply={"version": version})
    expect(fake, "currentOp", {"$ownOps": True}, reply=NOT_LOCKED)
    expect(fake, "fsync", lock_args or {"lock": True, "fsyncLockAcquisitionTimeoutMillis": 5000},
           reply={"lockCount": 1, "info": "now locked against writes"})
    return future()


def test_lock_mode_quiesce_then_thaw_from_another_thread(adapters, fakes):
    fake = fakes("secondary", hidden=True)
    t = target(adapters, fake.uri, mode="lock")
    hold = lock(adapters, fake, t)
    fake.assert_quiet()
    assert hold.session is None  # the server keeps the lock: nothing to hold open
    assert {k: v for k, v in hold.facts.items() if k != "locked_at"} == {
        "mode": "lock", "server": f"127.0.0.1:{fake.server.port}", "member": "secondary",
        "replica_set": "rs0", "hidden": True, "process_id": str(fake.process_id),
        "locked": True, "lock_count_before": 0, "lock_count": 1}
    json.dumps(hold.facts)  # stored on tmpfs as JSON

    result = {}
    thread = threading.Thread(target=lambda: result.update(
        out=adapters.call("thaw", t, hold=hold)))
    thread.start()
    expect(fake, "currentOp", {"$ownOps": True}, reply=LOCKED)
    expect(fake, "fsyncUnlock", reply={"info": "fsyncUnlock completed", "lockCount": 0})
    thread.join(10)
    assert result["out"]["lock_count"] == "0"
    # idempotent: a second thaw sends nothing
    assert adapters.call("thaw", t, hold=hold) is None
    fake.assert_quiet()


def test_no_acquisition_timeout_field_before_7_0_2(adapters, fakes):
    fake = fakes("secondary")
    hold = lock(adapters, fake, target(adapters, fake.uri, mode="lock"), version="6.0.5",
                lock_args={"lock": True})
    assert hold.facts["lock_count"] == 1


def test_thaw_after_a_crash_works_from_the_recorded_facts_alone(adapters, fakes):
    """The watchdog or a recovery thaw: a fresh Target, a Hold rebuilt from JSON."""
    fake = fakes("secondary")
    hold = lock(adapters, fake, target(adapters, fake.uri, mode="lock"))
    recorded = json.loads(json.dumps(hold.facts))
    fresh = target(adapters, fake.uri, mode="lock")
    future = run_hook(adapters, "thaw", fresh, hold=Hold(session=None, facts=recorded))
    expect(fake, "currentOp", {"$ownOps": True}, reply=LOCKED)
    expect(fake, "fsyncUnlock", reply={"lockCount": 0})
    assert future()["lock_count"] == "0"
    fake.assert_quiet()


# -- lock mode: hygiene and failure paths ----------------------------------------------


def test_quiesce_refuses_to_nest_on_someone_elses_lock(adapters, fakes):
    fake = fakes("secondary")
    t = target(adapters, fake.uri, mode="lock")
    future = run_hook(adapters, "quiesce", t)
    expect(fake, "buildInfo", reply={"version": "7.0.14"})
    expect(fake, "currentOp", {"$ownOps": True}, reply=LOCKED)
    with pytest.raises(TargetError, match="already fsync-locked by another client"):
        future()
    fake.assert_quiet()  # no fsync lock, no unlock of theirs


def test_a_lock_taken_at_the_same_moment_gives_ours_back(adapters, fakes):
    fake = fakes("secondary")
    t = target(adapters, fake.uri, mode="lock")
    future = run_hook(adapters, "quiesce", t)
    expect(fake, "buildInfo", reply={"version": "7.0.14"})
    expect(fake, "currentOp", {"$ownOps": True}, reply=NOT_LOCKED)
    expect(fake, "fsync", {"lock": True, "fsyncLockAcquisitionTimeoutMillis": 5000},
           reply={"lockCount": 2})
    expect(fake, "fsyncUnlock", reply={"lockCount": 1})
    with pytest.raises(TargetError, match=r"at the same moment \(lock count 2.*lock count now 1"):
        future()
    fake.assert_quiet()  # exactly one unlock: theirs stays


def test_someone_elses_lock_during_the_hold_is_reported_not_released(adapters, fakes):
    fake = fakes("secondary")
    t = target(adapters, fake.uri, mode="lock")
    hold = lock(adapters, fake, t)
    future = run_hook(adapters, "thaw", t, hold=hold)
    expect(fake, "currentOp", {"$ownOps": True}, reply=LOCKED)
    expect(fake, "fsyncUnlock", reply={"lockCount": 1})  # count was 2: theirs is left
    with pytest.raises(TargetError) as e:
        future()
    assert not isinstance(e.value, HoldBroken)  # our lock did cover the window
    assert "still locked (lock count 1, was 0 before quiesce)" in str(e.value)
    assert "db.fsyncUnlock()" in str(e.value)
    fake.assert_quiet()  # one unlock only
    assert adapters.call("thaw", t, hold=hold) is None  # ours is gone: nothing more to do
    fake.assert_quiet()


def test_fsync_unlock_failing_is_an_error_and_thaw_can_retry(adapters, fakes):
    fake = fakes("secondary")
    t = target(adapters, fake.uri, mode="lock")
    hold = lock(adapters, fake, t)
    future = run_hook(adapters, "thaw", t, hold=hold)
    expect(fake, "currentOp", {"$ownOps": True}, reply=LOCKED)
    expect(fake, "fsyncUnlock", error=(13, "not authorized on admin to execute command"))
    with pytest.raises(TargetError, match=r"fsyncUnlock failed.*stays locked") as e:
        future()
    assert not isinstance(e.value, HoldBroken)
    future = run_hook(adapters, "thaw", t, hold=hold)
    expect(fake, "currentOp", {"$ownOps": True}, reply=LOCKED)
    expect(fake, "fsyncUnlock", reply={"lockCount": 0})
    assert future()["lock_count"] == "0"


def test_a_lock_released_by_someone_else_is_a_broken_hold(adapters, fakes):
    fake = fakes("secondary")
    t = target(adapters, fake.uri, mode="lock")
    hold = lock(adapters, fake, t)
    future = run_hook(adapters, "thaw", t, hold=hold)
    expect(fake, "currentOp", {"$ownOps": True}, reply=NOT_LOCKED)
    with pytest.raises(HoldBroken, match="no longer fsync-locked"):
        future()
    fake.assert_quiet()  # no fsyncUnlock: it could only release someone else's lock


def test_a_restarted_mongod_is_a_broken_hold_and_its_new_locks_are_not_touched(adapters, fakes):
    fake = fakes("secondary")
    t = target(adapters, fake.uri, mode="lock")
    hold = lock(adapters, fake, t)
    from bson import ObjectId
    fake.process_id = ObjectId()  # what hello reports after a restart
    with pytest.raises(HoldBroken, match="restarted during the hold"):
        adapters.call("thaw", t, hold=hold)
    fake.assert_quiet()


def test_server_stopped_during_the_hold_thaw_reports_clearly(adapters, fakes):
    fake = fakes("secondary")
    t = target(adapters, fake.uri, timeout=1, mode="lock")
    hold = lock(adapters, fake, t, lock_args={"lock": True,
                                               "fsyncLockAcquisitionTimeoutMillis": 1000})
    fake.stop()
    started = time.monotonic()
    with pytest.raises(TargetError) as e:
        adapters.call("thaw", t, hold=hold)
    assert time.monotonic() - started < 5, "thaw must give up within the target's timeout"
    message = str(e.value)
    assert message.startswith(f"cannot reach MongoDB 127.0.0.1:{fake.server.port} (target t) "
                              f"to release the fsync lock")
    assert "quiesce thaw" in message and "db.fsyncUnlock()" in message and "\n" not in message
    assert hold.facts["locked"] and not hold.facts.get("thawed")  # a later thaw still tries


def test_connection_lost_during_fsync_unlock_says_the_state_is_unknown(adapters, fakes):
    fake = fakes("secondary")
    t = target(adapters, fake.uri, mode="lock")
    hold = lock(adapters, fake, t)
    future = run_hook(adapters, "thaw", t, hold=hold)
    expect(fake, "currentOp", {"$ownOps": True}, reply=LOCKED)
    expect(fake, "fsyncUnlock", hangup=True)
    with pytest.raises(TargetError, match=r"fsyncUnlock got no answer.*may still be held"):
        future()


def test_a_lock_that_is_not_granted_in_time_is_released_when_granted(adapters, fakes):
    fake = fakes("secondary")
    t = target(adapters, fake.uri, timeout=1, mode="lock")
    future = run_hook(adapters, "quiesce", t)
    expect(fake, "buildInfo", reply={"version": "7.0.14"})
    expect(fake, "currentOp", {"$ownOps": True}, reply=NOT_LOCKED)
    expect(fake, "fsync", {"lock": True, "fsyncLockAcquisitionTimeoutMillis": 1000},
           answer=False)  # mongod still waiting for the global lock: no reply
    # after the client gave up, the adapter takes our (pending) count back off
    expect(fake, "fsyncUnlock", reply={"lockCount": 0}, timeout=5)
    with pytest.raises(TargetError, match=r"within 1 s.*granted after we gave up and was released"):
        future()
    fake.assert_quiet()


def test_a_lock_that_failed_in_time_leaves_nothing(adapters, fakes):
    fake = fakes("secondary")
    t = target(adapters, fake.uri, timeout=1, mode="lock")
    future = run_hook(adapters, "quiesce", t)
    expect(fake, "buildInfo", reply={"version": "6.0.5"})
    expect(fake, "currentOp", {"$ownOps": True}, reply=NOT_LOCKED)
    expect(fake, "fsync", {"lock": True}, answer=False)
    expect(fake, "fsyncUnlock", error=(125, "fsyncUnlock called when not locked"), timeout=5)
    with pytest.raises(TargetError, match="nothing was left locked"):
        future()


def test_an_interrupted_quiesce_with_the_server_locked_is_reported(adapters, fakes):
    """Recovery after the holder died while quiescing: facts are empty."""
    fake = fakes("secondary")
    t = target(adapters, fake.uri, mode="lock")
    future = run_hook(adapters, "thaw", t, hold=Hold(session=None, facts={}))
    expect(fake, "currentOp", {"$ownOps": True}, reply=LOCKED)
    with pytest.raises(TargetError, match="no record of taking that lock"):
        future()
    fake.assert_quiet()  # not ours for sure: never released blindly
    future = run_hook(adapters, "thaw", t, hold=Hold(session=None, facts={}))
    expect(fake, "currentOp", {"$ownOps": True}, reply=NOT_LOCKED)
    assert future() == {"fsync_locked": False}


def test_password_from_uri_file_never_appears_in_errors(adapters, tmp_path):
    port = free_port()  # nobody listens there
    uri_file = tmp_path / "uri"
    uri_file.write_text(f"mongodb://snap:Pa55-word@127.0.0.1:{port}/?authSource=admin\n")
    uri_file.chmod(0o600)
    t = quiesce.Target(name="t", kind="mongodb", settings={"uri_file": str(uri_file)},
                       timeout=0.5)
    adapters.call("validate", t)
    with pytest.raises(TargetError) as e:
        adapters.call("check", t)
    assert "Pa55-word" not in str(e.value) and f"127.0.0.1:{port}" in str(e.value)


def test_connection_settings_reach_the_driver(adapters, tmp_path, monkeypatch):
    """uri_file, TLS/X.509 options and the timeouts, as PyMongo receives them."""
    uri_file, key, key_password, ca = (tmp_path / n for n in ("uri", "key.pem", "pw", "ca.pem"))
    for path, text in ((uri_file, "mongodb://snap:s3cret@db1:27017/?authSource=admin\n"),
                       (key, "-----BEGIN PRIVATE KEY-----\n"), (key_password, "k3y-pw\n"),
                       (ca, "-----BEGIN CERTIFICATE-----\n")):
        path.write_text(text)
        path.chmod(0o600)
    seen = {}

    class Recorder:
        def __init__(self, uri, **kwargs):
            seen.update(uri=uri, **kwargs)
            raise pymongo.errors.ConfigurationError(f"stop here: {uri}")

    monkeypatch.setattr(pymongo, "MongoClient", Recorder)
    t = quiesce.Target(name="t", kind="mongodb", timeout=2.5, settings={
        "uri_file": str(uri_file), "tls": True, "tls_ca_file": str(ca),
        "tls_certificate_key_file": str(key),
        "tls_certificate_key_file_password_file": str(key_password)})
    adapters.call("validate", t)
    with pytest.raises(TargetError) as e:
        adapters.call("check", t)
    assert "s3cret" not in str(e.value) and "***@db1:27017" in str(e.value)
    assert seen == {
        "uri": "mongodb://snap:s3cret@db1:27017/?authSource=admin", "directConnection": True,
        "appname": "quiesce", "serverSelectionTimeoutMS": 2500, "connectTimeoutMS": 2500,
        "socketTimeoutMS": 2500, "retryWrites": False, "retryReads": False,
        "serverMonitoringMode": "poll", "tls": True, "tlsCAFile": str(ca),
        "tlsCertificateKeyFile": str(key), "tlsCertificateKeyFilePassword": "k3y-pw"}
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="tls_certificate_key_file.*chmod 600"):
        adapters.call("validate", t)


# -- sharded clusters: the balancer, and a lock through mongos --------------------------


def test_stop_balancer_in_journal_mode_stops_and_starts_it(adapters, fakes):
    fake = fakes("mongos")
    t = target(adapters, fake.uri, stop_balancer=True)
    future = run_hook(adapters, "quiesce", t)
    expect(fake, "balancerStatus", reply={"mode": "full", "inBalancerRound": False})
    expect(fake, "balancerStop", {"maxTimeMS": 5000})
    hold = future()
    assert hold.facts == {"mode": "journal", "server": f"127.0.0.1:{fake.server.port}",
                          "balancer_stopped": True}
    future = run_hook(adapters, "thaw", t, hold=hold)
    expect(fake, "balancerStart", {"maxTimeMS": 5000})
    assert future() == {"balancer": "started"}
    fake.assert_quiet()


def test_a_balancer_stopped_by_the_operator_is_left_stopped(adapters, fakes):
    fake = fakes("mongos")
    t = target(adapters, fake.uri, stop_balancer=True)
    future = run_hook(adapters, "quiesce", t)
    expect(fake, "balancerStatus", reply={"mode": "off", "inBalancerRound": False})
    hold = future()
    assert hold.facts["balancer_stopped"] is False
    assert adapters.call("thaw", t, hold=hold) is None
    fake.assert_quiet()  # no balancerStop, no balancerStart


def test_lock_through_mongos_checks_every_shards_count(adapters, fakes):
    fake = fakes("mongos")
    t = target(adapters, fake.uri, mode="lock", allow_primary=True, stop_balancer=True)
    future = run_hook(adapters, "quiesce", t)
    expect(fake, "buildInfo", reply={"version": "7.0.14"})
    expect(fake, "balancerStatus", reply={"mode": "full"})
    expect(fake, "balancerStop", {"maxTimeMS": 5000})
    expect(fake, "fsync", {"lock": True, "fsyncLockAcquisitionTimeoutMillis": 5000}, reply={
        "numFiles": 1, "all": {"raw": {"shard1/a:1": {"lockCount": 1, "ok": 1},
                                        "config/c:1": {"lockCount": 1, "ok": 1}}}})
    hold = future()
    assert hold.facts["lock_counts"] == {"shard1/a:1": 1, "config/c:1": 1}
    future = run_hook(adapters, "thaw", t, hold=hold)
    expect(fake, "fsyncUnlock", reply={"raw": {"shard1/a:1": {"lockCount": 0, "ok": 1},
                                               "config/c:1": {"lockCount": 0, "ok": 1}}})
    expect(fake, "balancerStart", {"maxTimeMS": 5000})
    assert future()["balancer"] == "started"
    fake.assert_quiet()


def test_a_failed_lock_through_mongos_starts_the_balancer_again(adapters, fakes):
    fake = fakes("mongos")
    t = target(adapters, fake.uri, mode="lock", allow_primary=True, stop_balancer=True)
    future = run_hook(adapters, "quiesce", t)
    expect(fake, "buildInfo", reply={"version": "7.0.14"})
    expect(fake, "balancerStatus", reply={"mode": "full"})
    expect(fake, "balancerStop", {"maxTimeMS": 5000})
    expect(fake, "fsync", {"lock": True, "fsyncLockAcquisitionTimeoutMillis": 5000},
           error=(117, "Cannot take lock while DDL operation is in progress"))
    expect(fake, "balancerStart", {"maxTimeMS": 5000})
    with pytest.raises(TargetError, match="DDL operation is in progress"):
        future()
    fake.assert_quiet()


def test_old_mongos_cannot_lock(adapters, fakes):
    fake = fakes("mongos")
    t = target(adapters, fake.uri, mode="lock", allow_primary=True)
    future = run_hook(adapters, "quiesce", t)
    expect(fake, "buildInfo", reply={"version": "6.0.5"})
    with pytest.raises(TargetError, match="cannot take the fsync lock.*separate targets"):
        future()
    fake.assert_quiet()


# -- through the CLI, with the detached holder -----------------------------------------


def test_cli_freeze_holds_the_lock_until_thaw(adapters, fakes, tmp_path):
    """`quiesce freeze` / `quiesce thaw` with a config file, the holder in its own process.

    The peer is a fake that keeps mongod's lock count; what is asserted is the count the
    server would have (1 while held, 0 after), not blocked writers: that needs a mongod.
    """
    from .support.helpers import run, write_config
    fake = fakes("secondary", cls=StatefulMongod)
    config = write_config(tmp_path, {"m": {"kind": "mongodb", "uri": fake.uri, "mode": "lock"}},
                          max_hold=30, timeout=5)
    proc = run(config, "freeze", "--json", check_json=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(o["phase"], o["status"]) for o in proc.report["outcomes"]] == [
        ("check", "ok"), ("flush", "ok"), ("quiesce", "ok")]
    assert fake.lock_count == 1
    proc = run(config, "thaw", "--json", check_json=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(o["phase"], o["status"]) for o in proc.report["outcomes"]] == [("thaw", "ok")]
    assert fake.lock_count == 0
    assert fake.log == ["buildInfo", "connectionStatus", "serverStatus", "replSetGetStatus",
                        "currentOp", "fsync", "buildInfo", "currentOp", "fsync",
                        "currentOp", "fsyncUnlock"]


def test_cli_watchdog_releases_the_lock_at_max_hold(fakes, tmp_path):
    """No thaw comes: the holder's watchdog unlocks, because mongod never would."""
    from .support.helpers import run, wait_until, write_config
    fake = fakes("secondary", cls=StatefulMongod)
    config = write_config(tmp_path, {"m": {"kind": "mongodb", "uri": fake.uri, "mode": "lock"}},
                          max_hold=1.5, timeout=5)
    assert run(config, "freeze").returncode == 0
    assert fake.lock_count == 1
    assert wait_until(lambda: fake.lock_count == 0, timeout=10), "the watchdog did not unlock"
    proc = run(config, "thaw", "--json", check_json=True)
    assert proc.returncode == 1
    [outcome] = proc.report["outcomes"]
    assert outcome["status"] == "broken" and "watchdog" in outcome["error"]
    assert fake.log.count("fsyncUnlock") == 1


def test_cli_thaw_after_the_holder_was_killed_releases_from_the_record(fakes, tmp_path):
    """The crash path: no holder, only the facts on tmpfs; the lock is still released."""
    import os
    import signal
    from .support.helpers import run, write_config
    fake = fakes("secondary", cls=StatefulMongod)
    config = write_config(tmp_path, {"m": {"kind": "mongodb", "uri": fake.uri, "mode": "lock"}},
                          max_hold=30, timeout=5)
    proc = run(config, "freeze", "--json", check_json=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    os.kill(proc.report["holder_pid"], signal.SIGKILL)
    time.sleep(0.3)
    assert fake.lock_count == 1  # server-kept: the holder's death does not release it
    thaw = run(config, "thaw", "--json", check_json=True)
    assert thaw.returncode == 0, thaw.stdout + thaw.stderr
    assert thaw.report["action"] == "recovered"
    assert [(o["target"], o["status"]) for o in thaw.report["outcomes"]] == [("m", "ok")]
    assert fake.lock_count == 0 and fake.log[-2:] == ["currentOp", "fsyncUnlock"]


# -- against a real mongod, where one is installed ----------------------------------------


@pytest.fixture(scope="module")
def real_mongod():
    if not mongod_binary():
        pytest.skip(NO_MONGOD)  # allowed in CI too: no mongod is installable here
    server = Mongod().start()
    try:
        yield server
    finally:
        server.stop()


def _writer(server, results: dict) -> threading.Thread:
    def write():
        with server.client(socketTimeoutMS=60000) as client:
            client.test.w.insert_one({"at": time.time()})
            results["done"] = time.monotonic()
    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


@pytest.mark.server
def test_real_journal_mode_cycle(adapters, real_mongod):
    t = target(adapters, real_mongod.uri.split("?")[0])
    facts = adapters.call("check", t)
    assert facts["member"] == "primary" and facts["replica_set"] == "rs0"
    assert adapters.call("flush", t) == {"checkpoint": "done"}
    assert adapters.call("quiesce", t) is None


@pytest.mark.server
def test_real_lock_refuses_the_primary_without_allow_primary(adapters, real_mongod):
    t = target(adapters, real_mongod.uri.split("?")[0], mode="lock")
    with pytest.raises(TargetError, match="PRIMARY"):
        adapters.call("check", t)
    with pytest.raises(TargetError, match="PRIMARY"):
        adapters.call("quiesce", t)
    with real_mongod.client() as client:
        assert not client.admin.command({"currentOp": 1, "$ownOps": True}).get("fsyncLock")


@pytest.mark.server
def test_real_lock_blocks_writers_until_thaw_from_another_thread(adapters, real_mongod):
    t = target(adapters, real_mongod.uri.split("?")[0], mode="lock", allow_primary=True)
    adapters.call("check", t)
    adapters.call("flush", t)
    hold = adapters.call("quiesce", t)
    try:
        assert hold.facts["lock_count"] == 1 and hold.session is None
        results: dict = {}
        writer = _writer(real_mongod, results)
        time.sleep(1.5)
        assert "done" not in results, "a write committed while the fsync lock was held"
        thawed_at = time.monotonic()
        out = run_hook(adapters, "thaw", t, hold=Hold(None, json.loads(json.dumps(hold.facts))))()
        assert out["lock_count"] == "0"
        writer.join(20)
        assert results.get("done", 0) >= thawed_at, "the writer was not released by thaw"
    finally:
        real_mongod.unlock_all()


@pytest.mark.server
def test_real_someone_elses_lock_is_refused_and_reported(adapters, real_mongod):
    t = target(adapters, real_mongod.uri.split("?")[0], mode="lock", allow_primary=True)
    with real_mongod.client() as other:
        try:
            other.admin.command("fsync", lock=True)
            with pytest.raises(TargetError, match="already fsync-locked"):
                adapters.call("quiesce", t)
            other.admin.command("fsyncUnlock")
            hold = adapters.call("quiesce", t)
            assert other.admin.command("fsync", lock=True)["lockCount"] == 2  # theirs, nested
            with pytest.raises(TargetError, match="still locked"):
                adapters.call("thaw", t, hold=hold)
            assert other.admin.command({"currentOp": 1, "$ownOps": True}).get("fsyncLock")
            assert other.admin.command("fsyncUnlock")["lockCount"] == 0
        finally:
            real_mongod.unlock_all()


@pytest.mark.server
def test_real_check_names_the_role_for_a_backup_only_user(adapters, real_mongod, tmp_path):
    host = real_mongod.uri.split("//")[1].split("/")[0]
    with real_mongod.client() as client:
        client.admin.command("createUser", "snap-backup", pwd="pw-backup", roles=["backup"])
    try:
        # mongod runs without --auth here; logging in still makes connectionStatus list the
        # user's real privileges, which is what check reads
        uri_file = tmp_path / "uri"
        uri_file.write_text(f"mongodb://snap-backup:pw-backup@{host}/?authSource=admin\n")
        uri_file.chmod(0o600)
        t = quiesce.Target(name="t", kind="mongodb", timeout=5, settings={
            "uri_file": str(uri_file), "mode": "lock", "allow_primary": True})
        adapters.call("validate", t)
        with pytest.raises(TargetError, match=r"lacks fsync, unlock.*createRole") as e:
            adapters.call("check", t)
        assert "pw-backup" not in str(e.value)
    finally:
        with real_mongod.client() as client:
            client.admin.command("dropUser", "snap-backup")
