"""A scripted MongoDB peer for wire-level tests of the mongodb adapter (mockupdb).

No MongoDB server can be installed here, so these tests speak the real wire protocol
(OP_MSG, as PyMongo sends it) to a MockupDB server. The fake answers the driver's own
traffic itself (handshakes, the monitor's ``hello``, ``endSessions``); every other
command is queued, and the test pops each one with :func:`expect`, which asserts its
exact name, arguments and order before replying.

:class:`ScriptedMongod` is for hook calls run in a thread (``run_hook``); the test plays
the server. :class:`StatefulMongod` answers by itself, keeping an fsync lock count like
mongod does, for tests where the adapter runs in another process (the CLI's holder).
"""

from __future__ import annotations

import threading
from typing import Any

from bson import ObjectId
from mockupdb import MockupDB, go

#: Fields the driver adds to every command; not part of what the adapter asked for.
PROTOCOL_FIELDS = {"$db", "lsid", "$clusterTime", "$readPreference", "$signature", "txnNumber",
                   "autocommit", "apiVersion", "apiStrict", "apiDeprecationErrors"}
DRIVER_COMMANDS = {"hello", "ismaster", "endsessions"}


class ScriptedMongod:
    """A mongod (or mongos) whose every non-driver command the test answers by hand.

    *member* is what ``hello`` says it is: "primary", "secondary", "standalone",
    "mongos" or "arbiter". The adapter's own ``hello`` is answered like the driver's, so
    tests see its effect (a refused primary, the member in the facts), not the request.
    """

    def __init__(self, member: str = "secondary", *, set_name: str = "rs0",
                 hidden: bool = False, max_wire_version: int = 21):
        self.member, self.set_name, self.hidden = member, set_name, hidden
        self.max_wire_version = max_wire_version
        self.process_id = ObjectId()
        self.stopped = False
        self.server = MockupDB(request_timeout=10)
        self.server.autoresponds(self._driver_traffic)
        self.server.run()

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.server.port}/"

    def hello(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "isWritablePrimary": self.member in {"primary", "standalone", "mongos"},
            "helloOk": True, "minWireVersion": 0, "maxWireVersion": self.max_wire_version,
            "maxBsonObjectSize": 16 * 1024 * 1024, "maxMessageSizeBytes": 48000000,
            "maxWriteBatchSize": 100000, "logicalSessionTimeoutMinutes": 30,
            "topologyVersion": {"processId": self.process_id, "counter": 0},
        }
        doc["ismaster"] = doc["isWritablePrimary"]
        if self.member == "mongos":
            doc["msg"] = "isdbgrid"
        elif self.member != "standalone":
            doc.update(setName=self.set_name, hosts=[f"127.0.0.1:{self.server.port}"],
                       me=f"127.0.0.1:{self.server.port}",
                       secondary=self.member == "secondary")
            if self.member == "arbiter":
                doc["arbiterOnly"] = True
            if self.hidden:
                doc["hidden"] = True
        return doc

    def _driver_traffic(self, request) -> bool:
        name = (request.command_name or "").lower()
        if name in {"hello", "ismaster"}:
            return request.replies(self.hello())
        if name == "endsessions":
            return request.ok()
        return False  # queued for the test

    def assert_quiet(self, wait: float = 0.3) -> None:
        """No command beyond the ones the test expected."""
        assert not self.server.got(timeout=wait), f"unexpected command: {self.server.request}"

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.server.stop()


def command_doc(request) -> dict[str, Any]:
    return {k: v for k, v in request.doc.items() if k not in PROTOCOL_FIELDS}


def expect(fake: ScriptedMongod, name: str, args: dict[str, Any] | None = None, *,
           reply: dict[str, Any] | None = None, error: tuple[int, str] | None = None,
           hangup: bool = False, answer: bool = True, timeout: float = 10):
    """Pop the next command, assert it is exactly ``{name: 1, **args}`` on admin, answer it.

    Values are compared with their types, so ``lock: True`` does not pass for
    ``lock: 1``.
    """
    request = fake.server.receives(timeout=timeout)
    assert request is not None, f"the server stopped before {name} arrived"
    doc = command_doc(request)
    expected = {name: 1, **(args or {})}
    assert request.doc.get("$db") == "admin", f"{name} sent to {request.doc.get('$db')}"
    assert list(doc) == list(expected) and all(
        doc[k] == v and type(doc[k]) is type(v) for k, v in expected.items()), (
        f"expected {expected}, got {doc}")
    if hangup:
        request.hangup()
    elif error:
        request.command_err(code=error[0], errmsg=error[1])
    elif answer:
        request.ok(**(reply or {}))
    return request


def run_hook(adapters, hook: str, target, **kwargs):
    """Call *hook* in a worker thread, as the core does; returns a future (call it)."""
    return go(adapters.call, hook, target, **kwargs)


class StatefulMongod(ScriptedMongod):
    """A fake that answers the adapter's commands by itself, keeping an fsync lock count.

    Only for end-to-end runs where the adapter lives in another process; what it proves
    is the protocol conversation and the lock count the server would have, not the
    behaviour of a real mongod.
    """

    def __init__(self, member: str = "secondary", **kwargs: Any):
        self.lock_count = 0
        self.log: list[str] = []
        self._lock = threading.Lock()
        super().__init__(member, **kwargs)
        self.server.autoresponds(self._answer)

    def _answer(self, request) -> bool:
        name = request.command_name or ""
        if name.lower() in DRIVER_COMMANDS:
            return False
        with self._lock:
            self.log.append(name)
            if name == "buildInfo":
                return request.ok(version="7.0.14")
            if name == "connectionStatus":
                return request.ok(authInfo={"authenticatedUsers": [], "authenticatedUserRoles": []})
            if name == "serverStatus":
                return request.ok(storageEngine={"name": "wiredTiger", "persistent": True})
            if name == "replSetGetStatus":
                return request.ok(members=[])
            if name == "currentOp":
                return request.ok(inprog=[], **({"fsyncLock": True} if self.lock_count else {}))
            if name == "fsync":
                if request.doc.get("lock"):
                    self.lock_count += 1
                    return request.ok(lockCount=self.lock_count)
                return request.ok(numFiles=1)
            if name == "fsyncUnlock":
                if not self.lock_count:
                    return request.command_err(code=125,
                                               errmsg="fsyncUnlock called when not locked")
                self.lock_count -= 1
                return request.ok(lockCount=self.lock_count)
        return False
