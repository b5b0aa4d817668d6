"""The conformance kit itself: adapters that break a promise must fail it, naming it.

Each adapter under test is a third-party package (a module plus a dist-info with its
entry point, on PYTHONPATH), so the kit finds it the way the core does; one is passed as
a plugin object instead. The kit runs on them in a separate pytest process: a lock or a
connection a broken adapter leaks dies with that process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from quiesce.testing import PROMISES, PromiseBroken

ADAPTERS = {
    # The bundled SQLite adapter with a thaw that returns without ROLLBACK: the write lock
    # stays taken by the holder's connection.
    "leaky": '''
        """SQLite, except that thaw never releases the write lock (on purpose)."""
        from quiesce import hookimpl
        from quiesce.adapters.sqlite import check, flush, quiesce, validate  # the same hooks


        @hookimpl
        def thaw(target, hold):
            return None  # BUG on purpose: no ROLLBACK, no close
    ''',
    # The bundled SQLite adapter with a check that takes the write lock and keeps it.
    "greedy": '''
        """SQLite, except that check takes the write lock and keeps it (on purpose)."""
        import sqlite3

        from quiesce import hookimpl
        from quiesce.adapters.sqlite import flush, quiesce, thaw, validate

        kept = []


        @hookimpl
        def check(target):
            conn = sqlite3.connect(target.settings["path"], isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")  # BUG on purpose: a preflight that locks
            kept.append(conn)
            return {"locked": True}
    ''',
    # A correct flush-only adapter: writes go on; quiesce checkpoints the WAL into the
    # database file, so a snapshot of that file alone holds every committed write.
    "flushy": '''
        """SQLite, flush-only: the WAL is checkpointed at quiesce, writes are never blocked."""
        import sqlite3

        from quiesce import Hold, TargetError, hookimpl
        from quiesce.adapters.sqlite import check, validate


        @hookimpl
        def flush(target):
            return None  # the checkpoint happens in quiesce, right before the snapshot


        @hookimpl
        def quiesce(target):
            path = target.settings["path"]
            try:
                conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=target.timeout)
                try:
                    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                finally:
                    conn.close()
            except sqlite3.Error as e:
                raise TargetError(f"cannot checkpoint {path}: {e}") from None
            if busy:
                raise TargetError("the WAL checkpoint was blocked by a reader; retry")
            return Hold(facts={"mode": "flush-only"})


        @hookimpl
        def thaw(target, hold):
            return None  # nothing was held
    ''',
}

KIT_RUN = '''
    import os
    import sqlite3

    import pytest

    from quiesce import Hold, Target, hookimpl
    from quiesce.adapters import sqlite as bundled
    from quiesce.testing import AdapterContract, BaseHarness


    class Harness(BaseHarness):
        def __init__(self, kind, directory, timeout):
            self.kind, self.directory, self.timeout = kind, directory, timeout
            self.db = directory / "app.db"
            conn = sqlite3.connect(self.db)
            conn.execute("PRAGMA journal_mode=wal")
            conn.execute("CREATE TABLE t (v)")
            conn.commit()
            conn.close()

        def target(self, **overrides):
            return Target("app", self.kind, {"path": str(self.db), **overrides},
                          timeout=self.timeout)

        def write(self, timeout):
            conn = sqlite3.connect(self.db, timeout=timeout)
            try:
                conn.execute("INSERT INTO t VALUES (1)")
                conn.commit()
                return True
            except sqlite3.OperationalError:
                return False
            finally:
                conn.close()

        def break_hold(self, hold):
            hold.session.execute("ROLLBACK")

        def unreachable_target(self):
            return Target("gone", self.kind, {"path": str(self.directory / "no" / "app.db")},
                          timeout=1.0)


    class FlushOnlyHarness(Harness):
        flush_only = True

        def __init__(self, *args):
            super().__init__(*args)
            # The application keeps a connection open, as applications do; otherwise SQLite
            # checkpoints the WAL whenever the last writer closes its connection.
            self.app = sqlite3.connect(self.db)
            self.app.execute("SELECT count(*) FROM t").fetchone()

        def durable(self):
            # Every committed write is in the database file itself: the WAL is empty.
            wal = f"{self.db}-wal"
            return not os.path.exists(wal) or os.path.getsize(wal) == 0

        def break_hold(self, hold):
            raise NotImplementedError("a flush-only hold cannot be lost")


    class Liar:
        """Says flush-only but checkpoints nothing (on purpose); given as a plugin object."""

        @hookimpl
        def validate(self, target):
            bundled.validate(target)

        @hookimpl
        def check(self, target):
            return bundled.check(target)

        @hookimpl
        def quiesce(self, target):
            return Hold(facts={"mode": "flush-only"})  # BUG on purpose: no checkpoint

        @hookimpl
        def thaw(self, target, hold):
            return None


    class TestLeaky(AdapterContract):
        @pytest.fixture
        def harness(self, tmp_path):
            return Harness("leaky", tmp_path, 2.0)


    class TestGreedy(AdapterContract):
        write_timeout = 0.5
        blocked_for = 0.2

        @pytest.fixture
        def harness(self, tmp_path):
            return Harness("greedy", tmp_path, 0.5)


    class TestFlushy(AdapterContract):
        @pytest.fixture
        def harness(self, tmp_path):
            return FlushOnlyHarness("flushy", tmp_path, 2.0)


    class TestLiar(AdapterContract):
        @pytest.fixture
        def harness(self, tmp_path):
            harness = FlushOnlyHarness("liar", tmp_path, 2.0)
            harness.plugin = Liar()
            return harness
'''


def fake_distribution(root: Path, kind: str, source: str) -> None:
    """A module and its dist-info with an entry point, as pip would install them."""
    module = f"quiesce_{kind}"
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: quiesce-{kind}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[quiesce.adapters]\n{kind} = {module}\n")


@pytest.fixture(scope="module")
def kit_run(tmp_path_factory):
    """Run the kit on every adapter above once; (status, message) by (class, test)."""
    root = tmp_path_factory.mktemp("kit-run")
    site = root / "site"
    site.mkdir()
    for kind, source in ADAPTERS.items():
        fake_distribution(site, kind, source)
    (root / "test_adapters.py").write_text(textwrap.dedent(KIT_RUN))
    env = dict(os.environ, COLUMNS="400")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    junit = root / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", "test_adapters.py",
                           # Greedy: only the promise it breaks first (the rest follow from it).
                           "-k", "not TestGreedy or test_check_takes_no_lock"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        found = {tag: case.find(tag) for tag in ("failure", "error", "skipped")}
        status = next((tag for tag, element in found.items() if element is not None), "passed")
        message = found[status].get("message", "") if status != "passed" else ""
        results[(case.get("classname").rsplit(".", 1)[-1], case.get("name"))] = (status, message)
    return proc, results


def of(results, cls, *statuses):
    return {name: message for (c, name), (status, message) in results.items()
            if c == cls and status in statuses}


@pytest.mark.slow
def test_a_thaw_that_does_not_release_fails_the_kit_naming_the_promise(kit_run):
    proc, results = kit_run
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = of(results, "TestLeaky", "failure", "error")
    assert set(failed) == {"test_quiesce_then_thaw_leaves_the_application_writable",
                           "test_lost_session_is_reported_as_broken_hold"}, failed
    assert failed["test_quiesce_then_thaw_leaves_the_application_writable"] == (
        "quiesce.testing.PromiseBroken: promise broken: thaw must leave the application "
        "writable: a write started right after thaw did not commit within 2.0 s")
    assert failed["test_lost_session_is_reported_as_broken_hold"].startswith(
        "quiesce.testing.PromiseBroken: promise broken: a lost session is reported by thaw as "
        "a broken hold: thaw after the hold was broken was ok")
    # what the adapter author reads at the end of their pytest run
    assert ("FAILED test_adapters.py::TestLeaky::"
            "test_quiesce_then_thaw_leaves_the_application_writable - quiesce.testing."
            "PromiseBroken: promise broken: thaw must leave the application writable") \
        in proc.stdout


@pytest.mark.slow
def test_a_check_that_locks_fails_the_kit_naming_the_promise(kit_run):
    _, results = kit_run
    assert of(results, "TestGreedy", "failure", "error") == {"test_check_takes_no_lock": (
        "quiesce.testing.PromiseBroken: promise broken: check takes no lock: a write started "
        "right after check did not commit within 0.5 s")}


@pytest.mark.slow
def test_a_flush_only_adapter_keeps_the_contract_with_durable_writes(kit_run):
    _, results = kit_run
    assert of(results, "TestFlushy", "failure", "error") == {}
    skipped = of(results, "TestFlushy", "skipped")
    assert set(skipped) == {"test_thaw_with_nothing_held_releases_nothing_it_did_not_take",
                            "test_lost_session_is_reported_as_broken_hold"}, skipped
    assert "a flush-only hold cannot be lost" in \
        skipped["test_lost_session_is_reported_as_broken_hold"]
    assert {"test_writes_are_blocked_while_held", "test_cli_freeze_then_thaw",
            "test_thaw_after_the_holder_died"} <= set(of(results, "TestFlushy", "passed"))


@pytest.mark.slow
def test_a_flush_only_adapter_that_flushes_nothing_fails_the_durable_promise(kit_run):
    _, results = kit_run
    assert of(results, "TestLiar", "failure", "error") == {
        "test_writes_are_blocked_while_held": (
            "quiesce.testing.PromiseBroken: promise broken: writes are made durable while held "
            "(flush-only adapter): a write committed before quiesce was not durable once "
            "quiesce returned")}
    # a plugin object that is not installed: the quiesce command cannot load it
    skipped = of(results, "TestLiar", "skipped")
    assert {"test_cli_freeze_then_thaw", "test_thaw_after_the_holder_died"} <= set(skipped)
    assert "kind 'liar' is not installed" in skipped["test_cli_freeze_then_thaw"]


def test_every_promise_message_names_its_promise():
    error = PromiseBroken("writable", "a write did not commit")
    assert isinstance(error, AssertionError)
    assert str(error) == ("promise broken: thaw must leave the application writable: "
                          "a write did not commit")
    assert error.promise == "writable" and len(set(PROMISES.values())) == len(PROMISES)
