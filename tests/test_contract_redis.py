"""The bundled Redis adapter against the conformance kit (quiesce.testing), on real Redis
servers started by tests/support/servers.py (a fresh server per test, RDB persistence), each test
once on Redis 7.0 and once on Valkey 8.1 (``make_redis_family``).

mode = "pause" (``TestPauseContract``)
    quiesce sends ``CLIENT PAUSE <max_hold> WRITE``: writes from other clients wait, so the
    kit checks that they are blocked while held. The pause is kept by the server, not by a
    session (``Hold.session`` is None): the holder-death promise expects writes to stay
    blocked after ``kill -9`` of the holder until ``quiesce thaw``.

    "broken-hold" runs twice, once for each way the adapter can tell a pause was lost
    (adapters/redis.py: thaw compares the server clock with the recorded deadline, and the
    server's run_id with the recorded one):

    * ``deadline``: the target's max_hold is 2 s and ``break_hold`` waits until Redis ended
      the pause by itself (a write commits again);
    * ``restart``: ``break_hold`` restarts redis-server on the same port.

    An external ``CLIENT UNPAUSE`` from another connection is not used: it ends the pause
    too, but Redis 7.0 does not report pause state, so thaw cannot notice it
    (docs/adapters/redis.md says so); it is not a promise the adapter can keep.

    "not-mine" is skipped through the kit's ``empty_thaw_releases``: thaw with an empty
    hold sends ``CLIENT UNPAUSE`` on purpose (crash recovery with nothing recorded), and
    that ends every ``CLIENT PAUSE``, someone else's too.

mode = "flush-only" (``TestFlushOnlyContract``)
    flush saves (BGSAVE) and quiesce holds nothing, so the kit checks ``durable()``: INFO
    persistence reports no change since the last successful save, i.e. every write is in
    the RDB file on disk. quiesce contacts nothing; check and flush fail on a target that
    points at nothing.
"""

from __future__ import annotations

import time

import pytest

from quiesce import Hold, Target
from quiesce.testing import AdapterContract, BaseHarness

from .support.servers import free_port

#: max_hold (so the pause length) of the target when break_hold waits for the deadline.
SHORT_HOLD = 2.0


class RedisHarness(BaseHarness):
    """The "independent client" is a plain redis-py client doing one SET."""

    kind = "redis"

    def __init__(self, server, mode: str = "pause"):
        self.server = server
        self.mode = mode
        self.flush_only = mode == "flush-only"
        self.max_hold = 60.0
        self.break_by = "deadline"
        self.writes = 0

    def target(self, **overrides) -> Target:
        settings = {"url": f"redis://{self.server.host}:{self.server.port}", "mode": self.mode}
        return Target("cache", "redis", {**settings, **overrides}, timeout=5.0,
                      max_hold=self.max_hold)

    def write(self, timeout: float) -> bool:
        import redis

        client = self.server.client(socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            client.set("contract", f"write {self.writes}")
            self.writes += 1
            return True
        except redis.TimeoutError:
            # Still paused. Closing the connection drops the queued SET: nothing is left
            # behind, and Redis holds no lock for a paused client anyway.
            return False
        finally:
            client.close()

    def durable(self) -> bool:
        if not self.writes:
            return False
        p = self.server.client().info("persistence")
        # The RDB is written to a temporary file, fsynced and renamed by the save; no
        # change since the last successful one means every write is in the file on disk.
        return (p["rdb_last_bgsave_status"] == "ok" and p["rdb_changes_since_last_save"] == 0
                and not p["rdb_bgsave_in_progress"])

    def break_hold(self, hold: Hold) -> None:
        if self.flush_only:
            raise NotImplementedError("flush-only mode holds nothing (quiesce returns no hold), "
                                      "so there is no hold to lose")
        if self.break_by == "restart":
            self.server.restart()  # the pause dies with the process; run_id changes
            return
        # Redis ends the pause by itself at the deadline (its own clock).
        deadline_ms = int(hold.facts["pause_deadline_ms"])
        client = self.server.client()
        try:
            while True:
                seconds, micros = client.time()
                now_ms = seconds * 1000 + micros // 1000
                if now_ms >= deadline_ms:
                    break
                time.sleep(min(0.2, (deadline_ms - now_ms) / 1000 + 0.01))
        finally:
            client.close()
        waited = time.monotonic() + 10
        while not self.write(0.2):  # Redis unblocks paused clients on its next cron tick
            assert time.monotonic() < waited, "Redis did not end the pause at its deadline"

    def unreachable_target(self) -> Target:
        return Target("gone", "redis", {"url": f"redis://127.0.0.1:{free_port()}",
                                        "mode": self.mode}, timeout=1.0)


@pytest.mark.server
class TestPauseContract(AdapterContract):
    empty_thaw_releases = (
        "by design (adapters/redis.py thaw, docs/adapters/redis.md 'nothing recorded'): thaw "
        "with nothing recorded sends CLIENT UNPAUSE anyway, so that `quiesce thaw` after a "
        "holder that died while quiescing still releases the server-kept pause; Redis 7.0 "
        "cannot tell whose pause it is, and CLIENT UNPAUSE ends every CLIENT PAUSE, also one "
        "someone else took")

    @pytest.fixture
    def harness(self, make_redis_family):
        return RedisHarness(make_redis_family(persistence="rdb"), "pause")

    @pytest.mark.parametrize("how", ["deadline", "restart"])
    def test_lost_session_is_reported_as_broken_hold(self, contract_kit, how):
        harness = contract_kit.harness
        harness.break_by = how
        if how == "deadline":
            harness.max_hold = SHORT_HOLD  # the pause Redis ends by itself
        super().test_lost_session_is_reported_as_broken_hold(contract_kit)


@pytest.mark.server
class TestFlushOnlyContract(AdapterContract):
    @pytest.fixture
    def harness(self, make_redis_family):
        return RedisHarness(make_redis_family(persistence="rdb"), "flush-only")
