"""A pre-script that outlives its timeout: the host does not kill it, goes on with the
snapshot and runs the post-script while the pre-script is still running. The generated
post-script must still leave every database released, and say honestly that the hold
did not cover the snapshot.

The generated scripts are installed as they are; only timeoutInSeconds is lowered in
the JSON. The fake adapters (tests/fakes/gate, tests/fakes/slowstart) reach the
generated scripts the way the host passes anything: through the environment
(PYTHONPATH), which the host hands down unchanged.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

import quiesce.thaw
from quiesce.runtime import read_state, runtime_dir_of

from .support.azurekit import edit_json, install, process_ended, rehearse, result
from .support.helpers import make_sqlite, records, run, sqlite_writable, wait_until, write_config

FAKES = ("gate", "slowstart")
TIMEOUT = 2  # the host's timeoutInSeconds for these runs
THAW_SCRIPT = os.path.abspath(quiesce.thaw.__file__)


@pytest.fixture(autouse=True)
def no_holder_left(tmp_path):
    yield
    (tmp_path / "gate-open").touch()  # never leave a hook waiting
    for config in tmp_path.glob("quiesce.toml"):
        run(config, "thaw", fakes=FAKES)


class LockProbe(threading.Thread):
    """Samples, every 0.1 s, whether another connection can commit to the database."""

    def __init__(self, db):
        super().__init__(daemon=True)
        self.db, self.samples, self.stop = db, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append(sqlite_writable(self.db, timeout=0))
            time.sleep(0.1)

    def locked(self) -> int:
        self.stop.set()
        self.join()
        return self.samples.count(False)


class GateKeeper(threading.Thread):
    """Opens the gate once the post-script's thaw has asked the holder to release and is
    waiting for its answer (blocked reading the control socket), so the fake target's
    slow step outlasts the pre-script's timeout and ends while the post-script runs,
    whatever the machine's speed."""

    def __init__(self, gate: Path, config: Path):
        super().__init__(daemon=True)
        self.gate, self.config, self.opened = gate, str(config), False

    def _thaw_waiting(self) -> bool:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
                with open(f"/proc/{pid}/wchan") as f:
                    wchan = f.read()
            except OSError:
                continue
            # Blocked in recv() on the control socket (poll() first: it has a timeout).
            if THAW_SCRIPT in argv and self.config in argv and \
                    ("unix_stream" in wchan or "poll_schedule" in wchan):
                return True
        return False

    def run(self):
        end = time.monotonic() + 30
        while time.monotonic() < end and not self._thaw_waiting():
            time.sleep(0.02)
        self.opened = time.monotonic() < end
        self.gate.touch()


def _setup(tmp_path, wait_in="flush"):
    db = make_sqlite(tmp_path / "app.db")
    calls, gate = tmp_path / "calls", tmp_path / "gate-open"
    config = write_config(tmp_path, {
        "app": {"kind": "sqlite", "path": str(db)},
        # Waiting in quiesce, it is prepared at once (passes the lock gate) and its lock is
        # what takes long, so SQLite is held meanwhile.
        "slow": {"kind": "gate", "record": str(calls), "gate": str(gate), "wait_in": wait_in,
                 "lock_gate_first": wait_in == "quiesce"},
    }, max_hold=60)
    root, log_dir = tmp_path / "root", tmp_path / "log"
    proc = install(config, root, log_dir, fakes=FAKES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    edit_json(root, timeoutInSeconds=TIMEOUT)
    return db, calls, gate, config, root, log_dir


def _state(config) -> dict:
    return read_state(runtime_dir_of(str(config))) or {}


@pytest.mark.parametrize("hook", ["flush", "quiesce"])
def test_post_script_releases_everything_while_the_pre_script_is_still_running(tmp_path, hook):
    """flush: the post-script's thaw comes before anything was quiesced.
    quiesce: it comes while SQLite is already held and the other target is quiescing."""
    db, calls, gate, config, root, log_dir = _setup(tmp_path, wait_in=hook)
    probe, keeper = LockProbe(db), GateKeeper(gate, config)
    probe.start()
    keeper.start()
    report = rehearse(config, root, "--wait", "0", fakes=FAKES).report
    locked_samples = probe.locked()
    keeper.join()
    assert keeper.opened, "the post-script's thaw never waited on the holder"

    assert result(report) == (1, "file-system", 308)
    pre, post = report["pre"], report["post"]
    assert pre["code"] == 308 and pre["still_running"]
    assert post is not None, "the post-script did not run after the pre-script timed out"
    # The thaw answered while the pre-script was still running, and honestly: the hold
    # (if any) did not cover the snapshot, so the post-script fails (301).
    assert post["code"] == 301, report["timeline"]
    assert "the snapshot was not covered" in (log_dir / "azure-post-script.log").read_text()

    # The orphan pre-script (the freeze command) and its holder end by themselves.
    state = _state(config)
    assert wait_until(lambda: process_ended(pre["pid"]), timeout=10), "the pre-script never ended"
    assert wait_until(lambda: process_ended(state["holder_pid"]), timeout=10)
    assert "not covered" in (log_dir / "azure-pre-script.log").read_text()

    # Every database released, nothing held, nothing left for a later thaw.
    assert sqlite_writable(db)
    status = run(config, "status", "--json", fakes=FAKES, check_json=True)
    assert status.returncode == 0 and status.report["held"] is False, status.stdout
    state = _state(config)
    assert state["released_by"] == "thaw"
    assert all(t["status"] != "held" for t in state["targets"])
    calls_made = records(calls)
    if hook == "flush":  # cancelled before quiescing anything
        assert calls_made == ["check slow", "flush slow"]
        assert locked_samples == 0, "SQLite was locked though the freeze was cancelled"
        assert state["outcomes"] == []
    else:  # both held, both released and reported broken
        assert calls_made == ["check slow", "flush slow", "quiesce slow", "thaw slow"]
        assert locked_samples > 0, "SQLite was never held: the scenario did not happen"
        assert {(o["target"], o["status"]) for o in state["outcomes"]} == {
            ("app", "broken"), ("slow", "broken")}
    again = run(config, "thaw", fakes=FAKES)
    assert again.returncode == 0 and "nothing to thaw" in again.stdout


def test_a_freeze_that_starts_after_the_post_script_holds_nothing(tmp_path, monkeypatch):
    db, calls, gate, config, root, log_dir = _setup(tmp_path)
    gate.touch()  # nothing waits here: the delay is in starting `quiesce freeze`
    # `quiesce freeze` spends 5 s loading adapters: the host times the pre-script out
    # (~1-2 s), snapshots and runs the post-script before any holder exists.
    monkeypatch.setenv("QUIESCE_TEST_IMPORT_DELAY", "5")
    edit_json(root, timeoutInSeconds=1)
    report = rehearse(config, root, "--wait", "0", fakes=FAKES).report
    # thaw found the freeze still starting: it left a note and reports the window uncovered
    assert result(report) == (1, "file-system", 308)
    assert report["post"]["code"] == 301
    assert "was still starting" in (log_dir / "azure-post-script.log").read_text()
    assert sqlite_writable(db)
    assert wait_until(lambda: process_ended(report["pre"]["pid"]), timeout=15)
    # The pre-script has ended: whatever it did, nothing may stay held after the post-script.
    assert wait_until(lambda: sqlite_writable(db), timeout=2), \
        "the orphaned freeze holds SQLite after the post-script ran (until max_hold)"
    status = run(config, "status", "--json", fakes=FAKES, check_json=True)
    assert status.report["held"] is False
