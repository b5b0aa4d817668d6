"""Prepare every target, then lock together: the quiesce phase's lock gate, through the CLI.

The slow target is the ``gate`` fake: its quiesce waits until the test creates a file (its
"preparation"), then calls ``target.lock_gate()`` like a real adapter. The other target is
a real SQLite database, whose adapter calls the gate right before ``BEGIN IMMEDIATE``.
"""

import json
import subprocess
import time

import pytest

from .support.helpers import (QUIESCE, env_with, make_sqlite, records, run, sqlite_writable,
                      wait_until, write_config)

FAKES = ("gate", "recorder")


@pytest.fixture(autouse=True)
def no_holder_left(tmp_path):
    yield
    (tmp_path / "open").touch()  # a freeze still waiting in the fake goes on
    for config in tmp_path.glob("quiesce.toml"):
        run(config, "thaw", fakes=FAKES)


def start_freeze(config):
    return subprocess.Popen(QUIESCE + ["--config", str(config), "freeze", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_with(*FAKES), stdin=subprocess.DEVNULL)


def slow(tmp_path, **settings):
    return {"kind": "gate", "record": str(tmp_path / "calls"), "gate": str(tmp_path / "open"),
            "wait_in": "quiesce", "lock_gate": True, **settings}


def finish(freeze):
    out, err = freeze.communicate(timeout=60)
    return json.loads(out), err


def test_no_lock_is_taken_before_every_target_is_prepared(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db), "timeout": 30},
                                     "slow": slow(tmp_path, timeout=30)}, max_hold=60)
    freeze = start_freeze(config)
    assert wait_until(lambda: "quiesce slow" in records(tmp_path / "calls"), 30)
    # slow is preparing: app's quiesce waits at the gate, its lock not yet taken
    preparing = time.time()
    assert sqlite_writable(db), "app was locked before slow was prepared"
    (tmp_path / "open").touch()
    report, err = finish(freeze)
    assert report["ok"], err
    state = run(config, "status", "--json", check_json=True, fakes=FAKES).report["state"]
    # the first lock came after slow was seen preparing (held_since is the earliest
    # target's locked_at, or the moment its quiesce returned)
    assert state["held_since"] > preparing
    assert not sqlite_writable(db)
    assert run(config, "thaw", fakes=FAKES).returncode == 0
    assert sqlite_writable(db)


@pytest.mark.parametrize("policy", ["hold-others", "release-all"])
def test_a_failed_preparation_never_blocks_the_others(tmp_path, policy):
    db = make_sqlite(tmp_path / "app.db")
    # app's timeout is longer than the run's: a gate that waited for the failed target
    # would hang this freeze past it
    failing = {"kind": "recorder", "record": str(tmp_path / "calls"), "fail": "quiesce"}
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db), "timeout": 90},
                                     "bad": failing},
                          max_hold=600, on_target_failure=policy)
    proc = run(config, "freeze", "--json", fakes=FAKES, check_json=True)
    assert [(o["target"], o["phase"], o["status"]) for o in proc.report["outcomes"]
            if o["phase"] == "quiesce"] == [("app", "quiesce", "ok"), ("bad", "quiesce", "failed")]
    if policy == "hold-others":
        assert "consistent in the snapshot: app" in proc.report["message"]
        assert "could not be held): bad" in proc.report["message"]
        assert not sqlite_writable(db)
        run(config, "thaw", fakes=FAKES)
    else:
        assert proc.report["action"] != "frozen"
    assert sqlite_writable(db)


def test_a_preparation_that_overruns_lets_the_others_lock_anyway(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db), "timeout": 1},
                                     "slow": slow(tmp_path, timeout=30)}, max_hold=60)
    freeze = start_freeze(config)
    # app waits at most its own timeout at the gate, then locks while slow still prepares
    assert wait_until(lambda: not sqlite_writable(db), 30), "app never locked"
    assert "quiesce slow" in records(tmp_path / "calls")
    (tmp_path / "open").touch()
    report, err = finish(freeze)
    assert report["ok"], err
    assert run(config, "thaw", fakes=FAKES).returncode == 0
    assert sqlite_writable(db)
    log = (tmp_path / "log" / "quiesce.log").read_text()  # the holder's, written at release
    assert "slow was not prepared within app's timeout (1 s)" in log


def test_the_gate_writes_every_lock_statement_back_to_back_from_one_thread():
    """Adapters that can split their lock into a write and a read (Redis) hand the write to
    the gate: the thread that opens it writes them all, before any waiter wakes; a write's
    error is raised in its own target's thread only."""
    import threading

    import quiesce
    from quiesce.lockgate import LockGate

    targets = [quiesce.Target(f"t{i}", "x", {}, timeout=10) for i in range(8)]
    gate = LockGate(targets)
    events: list[tuple[str, str, int]] = []  # (what, target, thread)

    def sender(name):
        def send():
            events.append(("write", name, threading.get_ident()))
            if name == "t3":
                raise ConnectionResetError("the server went away")
        return send

    def prepare_and_lock(target, delay):
        time.sleep(delay)  # preparations end at different moments
        try:
            gate.wait(target, sender(target.name))
            events.append(("locked", target.name, threading.get_ident()))
        except ConnectionResetError as e:
            events.append((f"error: {e}", target.name, threading.get_ident()))

    prepare_in_threads(prepare_and_lock, targets)
    writes = [e for e in events if e[0] == "write"]
    assert sorted(name for _, name, _ in writes) == sorted(t.name for t in targets)
    assert len({thread for _, _, thread in writes}) == 1, "the writes came from several threads"
    assert events[:len(targets)] == writes, "a waiter went on before every lock was written"
    outcomes = {name: what for what, name, _ in events[len(targets):]}
    assert outcomes.pop("t3") == "error: the server went away"
    assert set(outcomes.values()) == {"locked"}


def prepare_in_threads(prepare_and_lock, targets):
    """One thread per target, as the quiesce phase runs them; preparations end 20 ms apart."""
    import threading

    threads = [threading.Thread(target=prepare_and_lock, args=(t, 0.02 * i))
               for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)


def test_a_target_that_reaches_an_opened_gate_writes_its_own_lock():
    import quiesce
    from quiesce.lockgate import LockGate

    fast, slow = (quiesce.Target(n, "x", {}, timeout=0.2) for n in ("fast", "slow"))
    gate = LockGate([fast, slow])
    written = []
    prepared, reply = gate.wait(fast, lambda: written.append("fast"), lambda: "fast's reply")
    assert (prepared, reply) == (False, "fast's reply")  # slow never came: timeout
    assert written == ["fast"]
    prepared, reply = gate.wait(slow, lambda: written.append("slow"), lambda: "slow's reply")
    assert (prepared, reply) == (False, "slow's reply")  # late: alone, at once
    assert written == ["fast", "slow"]


def test_the_gate_reads_every_reply_in_turn_after_every_write():
    """With a receive too (MySQL, Redis), the opening thread writes every lock, then reads
    every reply in turn, then wakes the waiters: each gets its own reply, or its own error."""
    import threading

    import quiesce
    from quiesce.lockgate import LockGate

    targets = [quiesce.Target(f"t{i}", "x", {}, timeout=10) for i in range(6)]
    gate = LockGate(targets)
    events: list[tuple[str, str, int]] = []
    got: dict[str, object] = {}

    def send_and_receive(name):
        def send():
            events.append(("write", name, threading.get_ident()))

        def receive():
            events.append(("read", name, threading.get_ident()))
            if name == "t2":
                raise TimeoutError("no reply within the read timeout")
            return f"{name}: OK"
        return send, receive

    def prepare_and_lock(target, delay):
        time.sleep(delay)
        try:
            got[target.name] = gate.wait(target, *send_and_receive(target.name))[1]
        except TimeoutError as e:
            got[target.name] = f"error: {e}"
        events.append(("woke", target.name, threading.get_ident()))

    prepare_in_threads(prepare_and_lock, targets)
    n = len(targets)
    assert [e[0] for e in events[:2 * n]] == ["write"] * n + ["read"] * n, \
        "a reply was read before every lock was written, or a waiter woke before every read"
    assert len({thread for _, _, thread in events[:2 * n]}) == 1, "several threads did it"
    assert [e[1] for e in events[n:2 * n]] == [e[1] for e in events[:n]], "not read in turn"
    assert got.pop("t2") == "error: no reply within the read timeout"
    assert got == {t.name: f"{t.name}: OK" for t in targets if t.name != "t2"}
