"""The bundled MongoDB adapter against the conformance kit (quiesce.testing), in two layers.

No mongod can be installed here (tests/support/mongodb_server.py), so what is verified where:

Wire level (``TestWireLockContract``, ``TestWireJournalContract``; always run)
    The kit drives the real adapter, loaded through its entry point, in worker threads and
    through the real ``quiesce`` command in subprocesses (holder, kill -9, recovery thaw),
    against a MockupDB peer speaking MongoDB's wire protocol: :class:`WireMongod`, the
    :class:`~tests.support.mongodb_wire.StatefulMongod` of tests/support/mongodb_wire.py (which keeps the
    fsync lock count as mongod does) plus the two things the kit needs from an
    application: it acknowledges the harness's ``insert`` commands, holding each reply
    back while its fsync lock count is above 0, as mongod holds writes behind an fsync
    lock; and it can simulate a restart (a new ``topologyVersion.processId``, no lock).

    So here "writes are blocked" means: the adapter left the server's fsync lock count at
    1 for exactly the hold, 0 after thaw (that is the adapter's doing), and a locked
    mongod holds writes (that is the fake's model of mongod, not mongod). "durable"
    (journal mode, flush-only) means: an ``{fsync: 1}``, which on mongod is a WiredTiger
    checkpoint of every acknowledged write, reached the server after the harness's last
    acknowledged insert. The promises that need no server at all ("loaded", "validate")
    and the "errors" promise (a closed port: real driver, real timeouts) are fully real.

Real server (``TestRealLockContract``, ``TestRealJournalContract``)
    The same harness against a throwaway one-member replica set (tests/support/mongodb_server.py)
    when a ``mongod`` is on PATH (or QUIESCE_MONGOD names one); skipped otherwise with the
    reason. There "blocked" is mongod's own fsync lock, and "durable" is
    replSetGetStatus' ``lastStableRecoveryTimestamp`` (the most recent checkpoint) at or
    past the ``operationTime`` of the harness's last write. This layer could not be run
    where it was written: it follows MongoDB's documented behaviour, unexercised.

Both layers, per mode:

lock mode (``allow_primary = true``: the only member is the primary, so the harness's
writes go to the locked server)
    The fsync lock is server-kept (``Hold.session`` is None): after ``kill -9`` of the
    holder writes stay blocked until ``quiesce thaw``. "broken-hold" runs twice:
    ``foreign-unlock`` (another client runs ``fsyncUnlock`` during the hold) and
    ``restart`` (simulated on the wire; skipped on the real server, whose test fixture
    cannot restart on the same dbpath). "not-mine": thaw with nothing recorded does not
    release the lock; by documented design (docs/adapters/mongodb.md) it reports it
    ("no record of taking that lock"), checked by
    ``test_thaw_with_nothing_recorded_leaves_the_lock_alone``.
journal mode (the default; flush-only)
    flush is ``{fsync: 1}``; quiesce holds nothing, so "broken-hold" and "not-mine" are
    skipped. quiesce contacts nothing; check and flush fail on a target that points at
    nothing.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from quiesce import Hold, Target
from quiesce.testing import AdapterContract, BaseHarness

from .support.mongodb_server import Mongod, free_port, mongod_binary

pymongo = pytest.importorskip("pymongo")
pytest.importorskip("mockupdb")

from bson import ObjectId  # noqa: E402  (after the importorskip of pymongo)

from .support.mongodb_wire import StatefulMongod  # noqa: E402  (needs mockupdb)

NO_REAL_MONGOD = ("no mongod (none on PATH, QUIESCE_MONGOD unset): the MongoDB adapter is "
                  "covered at the wire level by tests/test_mongodb.py and by this module's "
                  "TestWire* classes")


# -- the wire-level peer ------------------------------------------------------------------


class WireMongod(StatefulMongod):
    """StatefulMongod that also takes writes, held back while fsync-locked, and restarts.

    ``events`` records, in order, each acknowledged ``insert`` and each plain ``{fsync: 1}``
    (a checkpoint on mongod), for the wire-level ``durable()``.
    """

    #: How long a held-back insert waits for the lock to go before the fake drops it.
    HOLD_WRITES_FOR = 120.0

    def __init__(self, member: str = "primary", **kwargs: Any):
        self.events: list[str] = []
        super().__init__(member, **kwargs)

    def _answer(self, request) -> bool:
        name = request.command_name or ""
        if name == "insert":
            with self._lock:
                locked = self.lock_count > 0
                if not locked:
                    self._acknowledge(request)
            if locked:  # answer later, from a thread: this one serves every connection
                threading.Thread(target=self._acknowledge_when_unlocked, args=(request,),
                                 daemon=True).start()
            return True
        handled = super()._answer(request)
        if name == "fsync" and not request.doc.get("lock"):
            with self._lock:
                self.events.append("checkpoint")
        return handled

    def _acknowledge(self, request) -> None:
        """Reply to one insert (caller holds self._lock)."""
        try:
            request.ok(n=1)  # the harness inserts one document at a time
        except OSError:
            return  # the client gave up and hung up: not acknowledged
        self.events.append("insert")

    def _acknowledge_when_unlocked(self, request) -> None:
        deadline = time.monotonic() + self.HOLD_WRITES_FOR
        while time.monotonic() < deadline and not self.stopped:
            with self._lock:
                if self.lock_count == 0:
                    self._acknowledge(request)
                    return
            time.sleep(0.02)

    def restart(self) -> None:
        """What a mongod restart looks like to a client: a new processId, no fsync lock."""
        with self._lock:
            self.process_id = ObjectId()
            self.lock_count = 0


# -- the harness ---------------------------------------------------------------------------


class MongoHarness(BaseHarness):
    """The "independent client" is a PyMongo client doing one insert_one."""

    kind = "mongodb"

    def __init__(self, uri: str, mode: str, *, fake: WireMongod | None = None,
                 server: Mongod | None = None):
        self.uri = uri  # mongodb://host:port/, no options (the adapter adds its own)
        self.mode = mode
        self.flush_only = mode == "journal"
        self.fake, self.server = fake, server
        self.break_by = "foreign-unlock"
        self.last_operation_time = None
        self.acknowledged = 0
        self.client = pymongo.MongoClient(self.uri, directConnection=True, appname="writer",
                                          serverSelectionTimeoutMS=5000, retryWrites=False)

    def close(self) -> None:
        self.client.close()

    def _settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"mode": self.mode}
        if self.mode == "lock":
            settings["allow_primary"] = True  # the only member: the writes go there
        return settings

    def target(self, **overrides) -> Target:
        return Target("docs", "mongodb", {"uri": self.uri, **self._settings(), **overrides},
                      timeout=5.0, max_hold=60.0)

    def write(self, timeout: float) -> bool:
        try:
            with self.client.start_session() as session:
                with pymongo.timeout(timeout):  # socket timeout and maxTimeMS on the server
                    self.client.quiesce_contract.w.insert_one({"at": time.time()},
                                                              session=session)
                operation_time = session.operation_time
        except pymongo.errors.PyMongoError as e:
            if e.timeout:
                return False  # still held back: the connection is dropped, nothing is held
            raise
        self.last_operation_time = operation_time
        self.acknowledged += 1
        return True

    def durable(self) -> bool:
        if self.fake is not None:
            events = self.fake.events
            if "insert" not in events:
                return False
            last_insert = len(events) - 1 - events[::-1].index("insert")
            return "checkpoint" in events[last_insert:]
        if self.last_operation_time is None:
            return False
        status = self.client.admin.command("replSetGetStatus")
        stable = status.get("lastStableRecoveryTimestamp")
        if stable is None:
            raise NotImplementedError("this mongod reports no lastStableRecoveryTimestamp in "
                                      "replSetGetStatus, so the last checkpoint is unknown")
        return stable >= self.last_operation_time

    def break_hold(self, hold: Hold) -> None:
        if self.flush_only:
            raise NotImplementedError("journal mode holds nothing (quiesce returns no hold), "
                                      "so there is no hold to lose")
        if self.break_by == "restart":
            if self.fake is None:
                raise NotImplementedError("tests/support/mongodb_server.py's Mongod cannot restart on "
                                          "the same dbpath (stop() removes it)")
            self.fake.restart()
            return
        # Another client (an operator, another backup tool) releases the lock.
        with pymongo.MongoClient(self.uri, directConnection=True,
                                 serverSelectionTimeoutMS=5000) as other:
            reply = other.admin.command("fsyncUnlock")
        assert reply.get("lockCount") == 0, f"fsyncUnlock left lockCount {reply}"

    def unreachable_target(self) -> Target:
        return Target("gone", "mongodb", {"uri": f"mongodb://127.0.0.1:{free_port()}/",
                                          **self._settings()}, timeout=1.0)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def wire_mongod():
    fake = WireMongod("primary")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def real_mongod():
    if not mongod_binary():
        pytest.skip(NO_REAL_MONGOD)
    server = Mongod().start()
    try:
        yield server
    finally:
        server.stop()


def wire_harness(fake: WireMongod, mode: str):
    harness = MongoHarness(fake.uri, mode, fake=fake)
    try:
        yield harness
    finally:
        harness.close()


def real_harness(server: Mongod, mode: str):
    harness = MongoHarness(server.uri.split("?")[0], mode, server=server)
    try:
        yield harness
    finally:
        harness.close()
        server.unlock_all()  # whatever a failed test left locked


# -- the contract, per mode ----------------------------------------------------------------


class LockModeContract(AdapterContract):
    """lock mode: the promises as the kit states them."""

    @pytest.mark.parametrize("how", ["foreign-unlock", "restart"])
    def test_lost_session_is_reported_as_broken_hold(self, contract_kit, how):
        contract_kit.harness.break_by = how
        super().test_lost_session_is_reported_as_broken_hold(contract_kit)

    def test_thaw_with_nothing_recorded_leaves_the_lock_alone(self, contract_kit):
        """What "not-mine" checks, minus its demand that the empty thaw is not "failed"."""
        kit = contract_kit
        target = kit.target()
        hold = kit.quiesce(target)
        assert kit.blocked(), "a write committed while the target was held"
        outcome = kit.thaw(kit.target(), Hold())
        assert outcome.status == "failed" and "no record of taking that lock" in outcome.error
        assert outcome.target == target.name and "\n" not in outcome.error
        assert kit.blocked(), "thaw(target, Hold()) released the lock another quiesce took"
        released = kit.thaw(target, hold)
        assert released.ok, released.error
        assert kit.writable(), "no write committed after thaw of the real hold"


class JournalModeContract(AdapterContract):
    """journal mode (flush-only): the promises as the kit states them."""


class TestWireLockContract(LockModeContract):
    @pytest.fixture
    def harness(self, wire_mongod):
        yield from wire_harness(wire_mongod, "lock")

    def test_the_fake_holds_writes_only_while_fsync_locked(self, wire_mongod, harness):
        """The peer's model of mongod, checked on its own (no adapter involved)."""
        assert harness.write(2.0)
        with pymongo.MongoClient(wire_mongod.uri, directConnection=True) as other:
            assert other.admin.command("fsync", lock=True)["lockCount"] == 1
            assert not harness.write(0.5)
            assert other.admin.command("fsyncUnlock")["lockCount"] == 0
        assert harness.write(2.0)


class TestWireJournalContract(JournalModeContract):
    @pytest.fixture
    def harness(self, wire_mongod):
        yield from wire_harness(wire_mongod, "journal")


@pytest.mark.server
class TestRealLockContract(LockModeContract):
    @pytest.fixture
    def harness(self, real_mongod):
        yield from real_harness(real_mongod, "lock")


@pytest.mark.server
class TestRealJournalContract(JournalModeContract):
    @pytest.fixture
    def harness(self, real_mongod):
        yield from real_harness(real_mongod, "journal")
