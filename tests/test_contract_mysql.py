"""The bundled MySQL/MariaDB adapter against the conformance kit (quiesce.testing), on the
real MariaDB started by tests/support/servers.py."""

from __future__ import annotations

import threading

import pytest

from quiesce import Hold, Target
from quiesce.testing import AdapterContract, BaseHarness

from .support.servers import free_port
from .test_mysql import db, option_file  # noqa: F401  (db is a fixture)


class MariaDBHarness(BaseHarness):
    """The "independent client" is a root connection doing one InnoDB insert."""

    kind = "mysql"

    def __init__(self, server, directory):
        self.server = server
        self.option_file = option_file(directory, server)

    def target(self, **overrides) -> Target:
        return Target("db", "mysql", {"option_file": self.option_file, **overrides}, timeout=5.0,
                      max_hold=60.0)

    def write(self, timeout: float) -> bool:
        conn = self.server.connect(read_timeout=60)
        done = threading.Event()

        def insert():
            try:
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO qmy.t (v) VALUES (3)")
                done.set()
            except Exception:
                pass  # killed below

        thread = threading.Thread(target=insert, daemon=True)
        thread.start()
        try:
            thread.join(timeout)
            if done.is_set():
                return True
            # Still waiting: kill it, so the harness leaves nothing queued behind.
            try:
                self.server.sql(f"KILL QUERY {int(conn.thread_id())}")
            except Exception:
                pass
            thread.join(10)
            return done.is_set()
        finally:
            conn.close()

    def break_hold(self, hold: Hold) -> None:
        self.server.sql(f"KILL {int(hold.facts['thread_id'])}")

    def unreachable_target(self) -> Target:
        return Target("gone", "mysql", {"host": "127.0.0.1", "port": free_port(), "user": "x"},
                      timeout=1.0)


@pytest.mark.server
class TestMariaDBContract(AdapterContract):
    @pytest.fixture
    def harness(self, db, tmp_path):  # noqa: F811
        return MariaDBHarness(db, tmp_path)
