"""Issue 12, items 3, 4, 5, 7, 8 and 9: the holder and the thaw path at their edges.

Real processes throughout: real holders killed or stopped, real runtime dirs (deleted,
symlinked, shared with another user), a real SQLite database, a real fsfreeze on a loop
filesystem the test made, and a real Redis adapter pointed at a port nobody serves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import quiesce.holder
import quiesce.runtime
import quiesce.thaw
from quiesce import fsfreeze

from .support.helpers import (env_with, make_sqlite, pids_with_args, records, run,
                              sqlite_writable, wait_until, write_config)
from .support.servers import free_port

NOBODY = 65534
LEAN_THAW = [sys.executable, "-I", "-S", "-B", quiesce.thaw.__file__]


def recorder(tmp_path, **settings):
    return {"kind": "recorder", "record": str(tmp_path / "calls"), **settings}


def sqlite_target(db: Path) -> dict:
    return {"app": {"kind": "sqlite", "path": str(db)}}


@pytest.fixture(autouse=True)
def no_holder_left(tmp_path):
    yield
    for config in tmp_path.glob("quiesce.toml"):
        run(config, "thaw", fakes=("recorder",))


@pytest.fixture
def shared_dir():
    """A directory like /tmp (mode 1777), so another user can create things in it."""
    path = Path(tempfile.mkdtemp(prefix="quiesce-shared-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def lean_thaw(config: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """The post-script's thaw: the standard-library client, as the host runs it."""
    return subprocess.run(LEAN_THAW + ["--config", str(config), "--json"], capture_output=True,
                          text=True, timeout=timeout, env=env_with("recorder"))


def as_nobody() -> None:
    os.setgid(NOBODY)
    os.setuid(NOBODY)


# -- item 3: a thaw answered by someone else ---------------------------------------------

def linked_runtime_dir(tmp_path: Path, shared_dir: Path) -> tuple[Path, Path, Path]:
    """(db, config, link): runtime_dir is a symlink in a shared directory, to a private one."""
    real = tmp_path / "real-run"
    real.mkdir(mode=0o700)
    link = shared_dir / "qrun"
    link.symlink_to(real)
    db = make_sqlite(tmp_path / "app.db")
    return db, write_config(tmp_path, sqlite_target(db), runtime_dir=str(link)), link


def test_freeze_refuses_a_runtime_dir_reached_through_a_symlink(tmp_path, shared_dir):
    db, config, link = linked_runtime_dir(tmp_path, shared_dir)
    proc = run(config, "freeze")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "symlink" in proc.stderr and str(link) in proc.stderr
    assert sqlite_writable(db)


@pytest.mark.root
@pytest.mark.parametrize("how", ["world-writable", "other-owner"])
def test_freeze_refuses_a_runtime_dir_another_user_could_replace(tmp_path, how):
    parent = tmp_path / "parent"
    parent.mkdir()
    if how == "world-writable":
        parent.chmod(0o777)  # no sticky bit: anyone may rename what is in it
    else:
        os.chown(parent, NOBODY, NOBODY)
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, sqlite_target(db), runtime_dir=str(parent / "run"))
    proc = run(config, "freeze")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(parent) in proc.stderr
    assert ("without the sticky bit" if how == "world-writable" else f"uid {NOBODY}") \
        in proc.stderr
    assert sqlite_writable(db)


IMPOSTOR = textwrap.dedent("""
    import json, os, socket, sys, threading
    abstract, path = sys.argv[1].encode("latin-1").replace(b"@", b"\\0", 1), sys.argv[2]
    lie = {"ok": True, "action": "thawed", "message": "released 1 target(s) (a lie)",
           "outcomes": [{"target": "app", "kind": "sqlite", "phase": "thaw", "status": "ok",
                         "duration": 0.001}]}
    def serve(sock, first_line):
        sock.listen(4)
        while True:
            conn, _ = sock.accept()
            conn.makefile("rb").readline()
            conn.sendall(first_line + json.dumps(lie).encode())
            conn.close()
    a = socket.socket(socket.AF_UNIX); a.bind(abstract)
    f = socket.socket(socket.AF_UNIX); f.bind(path)
    threading.Thread(target=serve, args=(a, b'{"pid": 1, "budget": 0}\\n'), daemon=True).start()
    threading.Thread(target=serve, args=(f, b""), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
""")


@pytest.mark.root
def test_thaw_does_not_trust_an_answer_from_another_user(tmp_path, shared_dir):
    """A runtime_dir link in a shared directory, swapped by another user who answers."""
    db = make_sqlite(tmp_path / "app.db")
    evil = shared_dir / "evil"
    subprocess.run(["mkdir", "-m", "700", str(evil)], check=True, preexec_fn=as_nobody)
    link = shared_dir / "qrun"
    link.symlink_to(evil)  # as if the user had swapped the operator's link
    config = write_config(tmp_path, sqlite_target(db), runtime_dir=str(link))
    address = quiesce.runtime.holder_address(str(link))
    abstract = address.replace(b"\0", b"@", 1).decode("latin-1")
    impostor = subprocess.Popen([sys.executable, "-c", IMPOSTOR, abstract,
                                 str(evil / "holder.sock")], preexec_fn=as_nobody,
                                stdout=subprocess.PIPE, text=True)
    try:
        assert impostor.stdout.readline().strip() == "ready"
        for proc in (lean_thaw(config, timeout=60), run(config, "thaw")):
            assert proc.returncode == 2, proc.stdout + proc.stderr
            assert "a lie" not in proc.stdout
            assert f"uid {NOBODY}" in proc.stderr or "symlink" in proc.stderr, proc.stderr
    finally:
        impostor.kill()
        impostor.wait()


def test_doctor_says_why_a_runtime_dir_is_unsafe(tmp_path, shared_dir):
    _, config, _ = linked_runtime_dir(tmp_path, shared_dir)
    proc = run(config, "doctor", "azure", "--root", str(tmp_path / "root"))
    assert proc.returncode == 1
    [line] = [ln for ln in proc.stdout.splitlines() if "runtime_dir is safe" in ln]
    assert line.startswith("FAIL") and "symlink" in line, proc.stdout


# -- item 4: exclusion and memory survive a deleted runtime_dir ---------------------------

def test_a_deleted_runtime_dir_neither_allows_a_second_holder_nor_hides_the_first(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, sqlite_target(db), max_hold=60)
    first = run(config, "freeze", "--json", check_json=True)
    assert first.returncode == 0, first.stdout + first.stderr
    shutil.rmtree(tmp_path / "run")  # a tmpfs cleaner, an operator, ...
    second = run(config, "freeze")
    assert second.returncode == 3, second.stdout + second.stderr
    assert f"holder pid {first.report['holder_pid']}" in second.stderr
    assert not sqlite_writable(db)
    status = run(config, "status", "--json", check_json=True)
    assert status.report["held"] and status.report["state"]["alive"]
    thaw = lean_thaw(config)
    assert thaw.returncode == 0, thaw.stdout + thaw.stderr
    assert [(o["target"], o["status"]) for o in json.loads(thaw.stdout)["outcomes"]] == [
        ("app", "ok")]
    assert sqlite_writable(db)


def test_a_broken_hold_whose_record_was_deleted_is_still_reported(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, sqlite_target(db), max_hold=1.5)
    assert run(config, "freeze").returncode == 0
    assert wait_until(lambda: sqlite_writable(db), timeout=10), "the watchdog did not release"
    shutil.rmtree(tmp_path / "run")
    thaw = lean_thaw(config)
    assert thaw.returncode == 1, thaw.stdout + thaw.stderr
    [outcome] = json.loads(thaw.stdout)["outcomes"]
    assert outcome["status"] == "broken" and "watchdog" in outcome["error"]
    again = run(config, "thaw")
    assert again.returncode == 0 and "nothing to thaw" in again.stdout


def test_a_new_freeze_takes_over_from_a_holder_that_only_keeps_its_report(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, sqlite_target(db), max_hold=1.5)
    first = run(config, "freeze", "--json", check_json=True)
    assert wait_until(lambda: sqlite_writable(db), timeout=10), "the watchdog did not release"
    second = run(config, "freeze", "--json", check_json=True)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"holder pid {first.report['holder_pid']}" in second.stderr  # the warning
    assert "never reported" in second.stderr
    assert run(config, "thaw").returncode in (0, 1)


# -- item 5: a holder that does not answer ------------------------------------------------

@pytest.mark.slow
def test_thaw_gives_up_on_a_stopped_holder_with_exit_3_naming_it(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    # timeout 1: hard limit 9 s, so the bound is 9 + 5 s; a hang would hit the 120 s guard
    config = write_config(tmp_path, sqlite_target(db), max_hold=120, timeout=1)
    freeze = run(config, "freeze", "--json", check_json=True)
    pid = freeze.report["holder_pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        thaw = lean_thaw(config, timeout=120)
        assert thaw.returncode == 3, thaw.stdout + thaw.stderr
        report = json.loads(thaw.stdout)
        assert report["holder_pid"] == pid and f"pid {pid}" in report["message"]
        full = run(config, "thaw", timeout=120)
        assert full.returncode == 3 and f"pid {pid}" in full.stdout, full.stdout + full.stderr
        assert run(config, "status", timeout=120).returncode == 3
        refused = run(config, "freeze", timeout=120)
        assert refused.returncode == 3 and f"pid {pid}" in refused.stderr
    finally:
        os.kill(pid, signal.SIGCONT)
    assert run(config, "thaw").returncode == 0
    assert sqlite_writable(db)


# -- item 7: clocks and lifetimes -------------------------------------------------------

def test_max_hold_runs_from_the_first_lock_not_from_before_quiesce(tmp_path):
    config = write_config(tmp_path, {"slow": recorder(tmp_path, sleep={"quiesce": 2})},
                          max_hold=30)
    before = time.time()
    freeze = run(config, "freeze", "--json", fakes=("recorder",), check_json=True)
    assert freeze.returncode == 0, freeze.stdout
    [quiesced] = [o for o in freeze.report["outcomes"] if o["phase"] == "quiesce"]
    # the only lock is taken when its quiesce returns, at least 2 s after freeze began
    assert freeze.report["held_since"] >= before + quiesced["duration"]
    assert freeze.report["deadline"] == pytest.approx(freeze.report["held_since"] + 30)


def test_held_since_is_the_first_locked_at_even_when_its_thread_started_late():
    """A call's thread can start well after the phase (32 of them take ~10 ms to start):
    its duration, counted from its own start, is no bound on when its lock was taken."""
    from quiesce import Hold
    from quiesce.orchestrator import Cycle, Events
    from quiesce.phases import Outcome

    cycle = Cycle.__new__(Cycle)
    cycle.config = type("C", (), {"max_hold": 30.0})()
    cycle.state, cycle.events = {}, Events(progress=None, save=None, deadline=lambda d: None,
                                          thaw_came=None)
    started, started_mono = time.time() - 0.05, time.monotonic() - 0.05
    late = Outcome("db", "sqlite", "quiesce", "ok", duration=0.012)  # its thread began late
    cycle._start_clock(started, started_mono, [(late, Hold(locked_at=started + 0.030))])
    assert cycle.state["held_since"] == pytest.approx(started + 0.030, abs=1e-6)
    assert cycle.state["deadline"] == pytest.approx(started + 30.030, abs=1e-6)


def test_a_release_thread_yields_the_cpu_once_its_release_is_written(tmp_path, monkeypatch):
    """Once the core has written a target's release (Hold.release), its thaw thread only
    reads the reply: it runs at a lower priority than the writers it let go. A target whose
    thaw hook itself releases, or whose prepared release failed to send, keeps the normal
    priority."""
    import threading

    from quiesce import Hold, Target
    from quiesce.orchestrator import YIELD_NICE, Release
    from quiesce.plugins import load_adapters

    adapters = load_adapters()
    held, other, lost = (Target(name, "sqlite", {"path": str(make_sqlite(tmp_path / f"{name}.db"))},
                                timeout=5, max_hold=30) for name in ("held", "other", "lost"))
    hold = adapters.call("quiesce", held)
    lost_hold = adapters.call("quiesce", lost)
    lost_hold.session.close()  # its release cannot be sent: the thaw hook must deal with it
    assert hold.release is not None and not sqlite_writable(tmp_path / "held.db")
    priority: dict[str, int] = {}
    call = adapters.call

    def spy(hook, target, **kwargs):  # the real thaw, noting its thread's nice value
        if hook == "thaw":
            priority[target.name] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return call(hook, target, **kwargs)

    monkeypatch.setattr(adapters, "call", spy)
    outcomes = Release(adapters, [held, other, lost]).fire(
        {"held": hold, "other": Hold(), "lost": lost_hold}, None)
    assert [o.status for o in outcomes] == ["ok", "ok", "failed"]
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert priority == {"held": min(base + YIELD_NICE, 19), "other": base, "lost": base}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    assert sqlite_writable(tmp_path / "held.db")


def test_freeze_fails_rather_than_promise_a_hold_with_almost_nothing_left(tmp_path):
    config = write_config(tmp_path, {"fast": recorder(tmp_path),
                                     "slow": recorder(tmp_path, sleep={"quiesce": 3})},
                          max_hold=4)
    freeze = run(config, "freeze", "--json", fakes=("recorder",), check_json=True)
    assert freeze.returncode == 1, freeze.stdout
    assert "max_hold" in freeze.report["message"] and "left" in freeze.report["message"]
    assert {"thaw-without-session fast", "thaw-without-session slow"} <= set(
        records(tmp_path / "calls"))
    thaw = run(config, "thaw", fakes=("recorder",))
    assert thaw.returncode == 0 and "nothing to thaw" in thaw.stdout


def _sentinels(config: Path) -> list[int]:
    return pids_with_args(quiesce.holder.SENTINEL, str(config))


def test_the_stand_in_watchdog_ends_with_its_own_freeze(tmp_path):
    config = write_config(tmp_path, {"cache": recorder(tmp_path)}, max_hold=2)
    first = run(config, "freeze", "--json", fakes=("recorder",), check_json=True)
    [sentinel] = _sentinels(config)
    os.kill(first.report["holder_pid"], signal.SIGKILL)
    assert run(config, "thaw", fakes=("recorder",)).returncode == 0  # recovered
    write_config(tmp_path, {"cache": recorder(tmp_path)}, max_hold=120)
    second = run(config, "freeze", "--json", fakes=("recorder",), check_json=True)
    assert second.returncode == 0
    # its own deadline (2 s) plus its grace (5 s) passes: it must not wait for the next one's
    assert wait_until(lambda: not Path(f"/proc/{sentinel}").exists()
                      or "Z" in Path(f"/proc/{sentinel}/stat").read_text().split(")")[1][:3],
                      timeout=30), "the first freeze's sentinel outlived its freeze"
    assert records(tmp_path / "calls").count("thaw-without-session cache") == 1, \
        "the old sentinel released the new freeze's target"


@pytest.mark.root
def test_a_holder_stuck_writing_its_log_never_blocks_the_next_freeze(tmp_path, loopfs):
    fs = loopfs()
    db = make_sqlite(tmp_path / "app.db")
    frozen_log = fs.mountpoint / "quiesce.log"
    config = write_config(tmp_path, sqlite_target(db), max_hold=60, log_file=str(frozen_log))
    first = run(config, "freeze", "--json", check_json=True)
    assert first.returncode == 0, first.stdout + first.stderr
    with fsfreeze.freeze([fs.mountpoint], deadline_seconds=30):
        thaw = lean_thaw(config)
        assert thaw.returncode == 0, thaw.stdout + thaw.stderr
        assert sqlite_writable(db)
        # the first holder now blocks writing its log to the frozen disk; a new cycle
        # (its config logs elsewhere) must not be refused because of it
        write_config(tmp_path, sqlite_target(db), max_hold=60)
        second = run(config, "freeze", timeout=30)
        assert second.returncode == 0, second.stdout + second.stderr
        assert not sqlite_writable(db)
        assert run(config, "thaw", timeout=30).returncode == 0
    assert wait_until(lambda: not Path(f"/proc/{first.report['holder_pid']}").exists()
                      or "quiesce-holder" not in Path(
                          f"/proc/{first.report['holder_pid']}/comm").read_text(), timeout=10)


# -- item 8: words that agree with the facts -----------------------------------------------

def test_the_log_never_says_ok_for_a_hold_the_report_calls_broken(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, sqlite_target(db), max_hold=60)
    freeze = run(config, "freeze", "--json", check_json=True)
    os.kill(freeze.report["holder_pid"], signal.SIGKILL)
    thaw = run(config, "thaw", "--json", check_json=True)
    assert thaw.returncode == 1 and thaw.report["outcomes"][0]["status"] == "broken"
    log = (tmp_path / "log" / "quiesce.log").read_text()
    assert "thaw app (sqlite): ok" not in log, log
    assert "thaw app (sqlite): broken" in log, log


def test_a_refused_freeze_never_lets_thaw_report_an_earlier_cycle(tmp_path):
    config = write_config(tmp_path, {"a": recorder(tmp_path, fail="check")})
    assert run(config, "freeze", fakes=("recorder",)).returncode == 1  # freeze-failed
    time.sleep(1.1)  # a later second, so the two cycles' times differ when printed
    bad = write_config(tmp_path, {"a": recorder(tmp_path, mode="nonsense")})
    refused = run(bad, "freeze", fakes=("recorder",))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    thaw = lean_thaw(bad)
    assert "freeze-failed" not in thaw.stdout, thaw.stdout
    assert "ended before it held anything" in json.loads(thaw.stdout)["message"]


def test_a_thaw_after_exec_s_freeze_returned_is_never_early(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, sqlite_target(db), max_hold=60)
    for _ in range(20):  # the race lost about one run in eight
        proc = run(config, "exec", "--json", "--", "true")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "before freeze had finished" not in proc.stdout


# -- item 9: one failing target does not waste the others -----------------------------------

def test_hold_others_keeps_what_could_be_held_and_says_what_is_consistent(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    stopped_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: Redis is down
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)},
                                     "cache": {"kind": "redis", "url": stopped_redis,
                                               "timeout": 1}}, max_hold=60)
    freeze = run(config, "freeze", "--json", check_json=True)
    assert freeze.returncode == 1, freeze.stdout + freeze.stderr
    assert freeze.report["consistent"] == ["app"]
    assert [(f["target"], f["phase"]) for f in freeze.report["not_held"]] == [("cache", "check")]
    assert "NOT consistent" in freeze.report["message"]
    assert not sqlite_writable(db), "app could be held, so it must be held for the snapshot"
    thaw = lean_thaw(config)
    assert thaw.returncode == 1, thaw.stdout
    report = json.loads(thaw.stdout)
    assert [(o["target"], o["status"]) for o in report["outcomes"]] == [("app", "ok")]
    assert "cache (check failed)" in report["message"]
    assert sqlite_writable(db)


def test_hold_others_is_still_bounded_by_the_watchdog(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)},
                                     "b": recorder(tmp_path, fail="flush")}, max_hold=2)
    freeze = run(config, "freeze", "--json", fakes=("recorder",), check_json=True)
    assert freeze.returncode == 1 and freeze.report["consistent"] == ["app"]
    assert not sqlite_writable(db)
    assert wait_until(lambda: sqlite_writable(db), timeout=10), "the watchdog did not release"
    thaw = run(config, "thaw", fakes=("recorder",))
    assert thaw.returncode == 1 and "BROKEN" in thaw.stdout


def test_on_target_failure_takes_only_its_two_values(tmp_path):
    config = write_config(tmp_path, {"a": recorder(tmp_path)}, on_target_failure="hold-some")
    proc = run(config, "check", fakes=("recorder",))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "on_target_failure" in proc.stderr
    assert "'hold-others', 'release-all'" in proc.stderr
