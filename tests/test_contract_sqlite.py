"""The bundled SQLite adapter against the conformance kit (quiesce.testing)."""

from __future__ import annotations

import pytest

from quiesce import Hold, Target
from quiesce.testing import AdapterContract, BaseHarness

from .support.helpers import make_sqlite, sqlite_writable


class SqliteHarness(BaseHarness):
    """A WAL-mode database file; the "independent client" is a second connection."""

    kind = "sqlite"

    def __init__(self, directory):
        self.directory = directory
        self.db = make_sqlite(directory / "app.db")

    def target(self, **overrides) -> Target:
        return Target("app", "sqlite", {"path": str(self.db), **overrides}, timeout=2.0,
                      max_hold=60.0)

    def write(self, timeout: float) -> bool:
        return sqlite_writable(self.db, timeout=timeout)

    def break_hold(self, hold: Hold) -> None:
        # What SQLite does to a transaction after an I/O error or a full disk: it rolls it
        # back under the connection, and the write lock is gone before thaw comes.
        hold.session.execute("ROLLBACK")

    def unreachable_target(self) -> Target:
        return Target("gone", "sqlite", {"path": str(self.directory / "missing" / "app.db")},
                      timeout=1.0)


class TestSqliteContract(AdapterContract):
    @pytest.fixture
    def harness(self, tmp_path):
        return SqliteHarness(tmp_path)
