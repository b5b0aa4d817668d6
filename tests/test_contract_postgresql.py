"""The bundled PostgreSQL adapter against the conformance kit (quiesce.testing), on the real
PostgreSQL 15 and 18 servers started by tests/support/servers.py, in both of its modes.

PostgreSQL's quiesce never blocks writers, so both harnesses are flush-only
(``flush_only = True``): the kit checks ``durable()`` instead of blocked writes, and skips
"not-mine" (nothing is held that another thaw could release).

``durable()`` is checked from outside the adapter: every write of the harness records
``pg_current_wal_insert_lsn()`` right after its commit, and the writes are durable when the
last completed checkpoint (``pg_control_checkpoint()``, read from pg_control) has its REDO
point at or past that LSN, i.e. a checkpoint that started after the commit has finished and
the row is in the data files, not only in the WAL.

checkpoint mode
    flush runs ``CHECKPOINT``; quiesce and thaw do nothing and hold nothing. There is no
    hold to lose, so "broken-hold" is skipped (``break_hold`` raises NotImplementedError
    with the reason). quiesce holds nothing and contacts nothing, which the kit accepts
    for a flush-only adapter: check and flush fail on a target that points at nothing.
backup mode
    quiesce runs ``pg_backup_start`` in a session the holder keeps; the hold *is* that
    session (session-bound: the holder-death promise expects it to end with the holder and
    thaw to report it broken). ``break_hold`` ends it server-side with
    ``pg_terminate_backend`` of the held backend, as an administrator or a crash of the
    backend would. Writes go on throughout.
"""

from __future__ import annotations

import uuid

import pytest

from quiesce import Hold, Target
from quiesce.testing import AdapterContract, BaseHarness

from .support.servers import free_port

VERSIONS = ["pg15", "pg18"]


@pytest.fixture(params=VERSIONS)
def pg(request):
    """The shared server of each version in turn."""
    return request.getfixturevalue(request.param)


class PostgresHarness(BaseHarness):
    """The "independent client" is a superuser connection doing one INSERT."""

    kind = "postgresql"
    flush_only = True  # neither mode blocks writes (module docstring)

    def __init__(self, server, mode: str, label_dir: str | None = None):
        self.server = server
        self.mode = mode
        self.label_dir = label_dir
        self.table = f"qcontract_{uuid.uuid4().hex[:8]}"
        self.last_lsn: str | None = None  # WAL insert position right after the last commit
        server.sql(f"CREATE TABLE {self.table} (id bigserial PRIMARY KEY, v text)")

    def drop(self) -> None:
        self.server.sql(f"DROP TABLE IF EXISTS {self.table}")

    def _settings(self) -> dict:
        settings = {"mode": self.mode}
        if self.mode == "backup":
            settings["label_dir"] = self.label_dir
        return settings

    def target(self, **overrides) -> Target:
        settings = {"host": self.server.host, "port": self.server.port,
                    "user": self.server.superuser, "dbname": "postgres", **self._settings()}
        return Target("db", "postgresql", {**settings, **overrides}, timeout=5.0, max_hold=60.0)

    def write(self, timeout: float) -> bool:
        import psycopg

        with self.server.connect(connect_timeout=max(2, int(timeout) + 1)) as conn:
            conn.execute(f"SET statement_timeout = {max(1, int(timeout * 1000))}")
            conn.execute(f"SET lock_timeout = {max(1, int(timeout * 1000))}")
            try:
                conn.execute(f"INSERT INTO {self.table} (v) VALUES ('contract')")
            except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable):
                return False  # still waiting after timeout: cancelled, nothing left behind
            # autocommit with synchronous_commit = on: the commit record is flushed to the
            # WAL before INSERT returns; the insert position now lies at or past its end.
            self.last_lsn = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
        return True

    def durable(self) -> bool:
        if self.last_lsn is None:
            return False
        # The REDO point of the last completed checkpoint: everything before it is in the
        # data files. It lies past the commit only if that checkpoint started after it.
        [(covered,)] = self.server.sql(
            "SELECT redo_lsn >= %s::pg_lsn FROM pg_control_checkpoint()", (self.last_lsn,))
        return bool(covered)

    def break_hold(self, hold: Hold) -> None:
        if self.mode != "backup":
            raise NotImplementedError(
                "checkpoint mode holds nothing (quiesce returns no session and leaves no "
                "server state), so there is no hold to lose")
        pid = int(hold.facts["backend_pid"])
        # PostgreSQL 14+: waits (up to 10 s) until the backend has exited.
        [(ended,)] = self.server.sql("SELECT pg_terminate_backend(%s, 10000)", (pid,))
        assert ended, f"backend {pid} of the held backup session did not end"

    def unreachable_target(self) -> Target:
        return Target("gone", "postgresql",
                      {"host": "127.0.0.1", "port": free_port(), "user": "postgres",
                       "dbname": "postgres", **self._settings()}, timeout=1.0)


@pytest.mark.server
class TestCheckpointContract(AdapterContract):
    @pytest.fixture
    def harness(self, pg):
        harness = PostgresHarness(pg, "checkpoint")
        yield harness
        harness.drop()


@pytest.mark.server
class TestBackupContract(AdapterContract):
    @pytest.fixture
    def harness(self, pg, tmp_path):
        labels = tmp_path / "labels"  # written by thaw in this process, not by the server
        labels.mkdir()
        harness = PostgresHarness(pg, "backup", str(labels))
        yield harness
        harness.drop()
