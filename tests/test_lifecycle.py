"""freeze / thaw / status through the real CLI, with the detached holder."""

import json
import os
import signal
import subprocess
import time

import pytest

from .support.helpers import (QUIESCE, env_with, make_sqlite, records, run, sqlite_writable,
                      wait_until, write_config)


def recorder(tmp_path, **settings):
    return {"kind": "recorder", "record": str(tmp_path / "calls"), **settings}


@pytest.fixture
def sqlite_config(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    return db, write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}}, max_hold=30)


@pytest.fixture(autouse=True)
def no_holder_left(tmp_path):
    """Whatever a test does, release anything still held when it ends."""
    yield
    for config in tmp_path.glob("quiesce.toml"):
        run(config, "thaw", fakes=("recorder",))


def test_freeze_holds_sqlite_until_thaw(sqlite_config):
    db, config = sqlite_config
    proc = run(config, "freeze", "--json", check_json=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.report["ok"] and proc.report["action"] == "frozen"
    assert [(o["phase"], o["status"]) for o in proc.report["outcomes"]] == [
        ("check", "ok"), ("flush", "ok"), ("quiesce", "ok")]
    assert not sqlite_writable(db), "a writer committed while the target was held"
    status = run(config, "status", "--json", check_json=True)
    assert status.report["held"] and status.report["state"]["alive"]
    proc = run(config, "thaw", "--json", check_json=True)
    assert proc.returncode == 0, proc.stdout
    assert [(o["target"], o["phase"], o["status"]) for o in proc.report["outcomes"]] == [
        ("app", "thaw", "ok")]
    assert sqlite_writable(db)
    assert not run(config, "status", "--json", check_json=True).report["held"]


def test_hook_order_for_n_targets_and_thaw_all_at_once(tmp_path):
    names = ["t1", "t2", "t3", "t4"]
    config = write_config(tmp_path, {n: recorder(tmp_path) for n in names})
    assert run(config, "freeze", fakes=("recorder",)).returncode == 0
    thaw = run(config, "thaw", "--json", fakes=("recorder",), check_json=True)
    assert thaw.returncode == 0
    calls = records(tmp_path / "calls")
    phases = [c.split()[0] for c in calls]
    # every check before any flush before any quiesce (targets run concurrently in a phase)
    assert phases == ["check"] * 4 + ["flush"] * 4 + ["quiesce"] * 4 + ["thaw-without-session"] * 4
    # released all at once (no order among them), each exactly once; reported in reverse
    assert sorted(c.split()[1] for c in calls[-4:]) == names
    assert [o["target"] for o in thaw.report["outcomes"]] == names[::-1]


def test_release_all_failed_quiesce_releases_the_others_and_names_the_target(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)},
                                     "b": recorder(tmp_path, fail="quiesce", sleep={"quiesce": 0.3})},
                          on_target_failure="release-all")
    proc = run(config, "freeze", "--json", fakes=("recorder",), check_json=True)
    assert proc.returncode == 1
    report = proc.report
    assert not report["ok"] and "b (quiesce)" in report["message"]
    failed = [o for o in report["outcomes"] if o["status"] != "ok"]
    assert failed == [dict(failed[0], target="b", phase="quiesce", status="failed",
                           error="b was told to fail in quiesce")]
    assert ("app", "thaw", "ok") in [(o["target"], o["phase"], o["status"]) for o in report["outcomes"]]
    assert sqlite_writable(db)
    # the failure was reported by freeze; the post-script's thaw finds nothing held
    thaw = run(config, "thaw", fakes=("recorder",))
    assert thaw.returncode == 0 and "nothing to thaw" in thaw.stdout


def test_release_all_failed_check_quiesces_nothing(tmp_path):
    config = write_config(tmp_path, {"a": recorder(tmp_path), "b": recorder(tmp_path, fail="check")},
                          on_target_failure="release-all")
    proc = run(config, "freeze", fakes=("recorder",))
    assert proc.returncode == 1
    assert "b (check)" in proc.stdout
    assert [c for c in records(tmp_path / "calls") if not c.startswith("check")] == []


def test_watchdog_releases_when_no_thaw_comes_and_thaw_reports_it(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}}, max_hold=1.5)
    assert run(config, "freeze").returncode == 0
    assert not sqlite_writable(db)
    assert wait_until(lambda: sqlite_writable(db), timeout=5), "the watchdog did not release"
    proc = run(config, "thaw", "--json", check_json=True)
    assert proc.returncode == 1
    [outcome] = proc.report["outcomes"]
    assert outcome["target"] == "app" and outcome["status"] == "broken"
    assert "watchdog" in outcome["error"] and "max_hold (1.5 s)" in outcome["error"]
    again = run(config, "thaw")
    assert again.returncode == 0 and "already released (watchdog)" in again.stdout


def test_holder_killed_mid_hold_frees_sqlite_and_thaw_reports_broken_hold(sqlite_config):
    db, config = sqlite_config
    proc = run(config, "freeze", "--json", check_json=True)
    assert proc.returncode == 0
    os.kill(proc.report["holder_pid"], signal.SIGKILL)
    assert wait_until(lambda: sqlite_writable(db), timeout=5)
    thaw = run(config, "thaw", "--json", check_json=True)
    assert thaw.returncode == 1
    [outcome] = thaw.report["outcomes"]
    assert outcome["status"] == "broken" and "died before thaw" in outcome["error"]
    assert thaw.report["action"] == "recovered"


def test_server_kept_hold_survives_holder_death_and_is_released_by_recovery(tmp_path):
    config = write_config(tmp_path, {"cache": recorder(tmp_path)})
    proc = run(config, "freeze", "--json", fakes=("recorder",), check_json=True)
    os.kill(proc.report["holder_pid"], signal.SIGKILL)
    time.sleep(0.2)
    thaw = run(config, "thaw", "--json", fakes=("recorder",), check_json=True)
    # the fake's hold is server-kept: recovery releases it and the hold is intact
    assert thaw.returncode == 0, thaw.stdout
    assert records(tmp_path / "calls")[-1] == "thaw-without-session cache"


def test_freeze_killed_before_ready_leaves_nothing_locked(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)},
                                     # a slow lock (after the lock gate): app is locked
                                     # while slow's quiesce still runs
                                     "slow": recorder(tmp_path, sleep={"quiesce": 2},
                                                      lock_gate=True)})
    freeze = subprocess.Popen(QUIESCE + ["--config", str(config), "freeze"], env=env_with("recorder"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_until(lambda: not sqlite_writable(db), timeout=10), "sqlite was never locked"
    freeze.kill()
    freeze.wait()
    assert wait_until(lambda: sqlite_writable(db), timeout=10), "sqlite stayed locked"
    thaw = run(config, "thaw", "--json", fakes=("recorder",), check_json=True)
    assert thaw.returncode == 1
    assert {o["status"] for o in thaw.report["outcomes"]} == {"broken"}
    assert "died before it reported ready" in thaw.report["message"]


def test_thaw_twice_and_thaw_with_no_freeze(sqlite_config):
    _, config = sqlite_config
    first = run(config, "thaw")
    assert first.returncode == 0 and "nothing to thaw: no freeze is recorded" in first.stdout
    assert run(config, "freeze").returncode == 0
    assert run(config, "thaw").returncode == 0
    second = run(config, "thaw")
    assert second.returncode == 0 and "already released (thaw)" in second.stdout


def test_second_freeze_while_held_is_refused(sqlite_config):
    db, config = sqlite_config
    first = run(config, "freeze", "--json", check_json=True)
    second = run(config, "freeze")
    assert second.returncode == 3
    assert f"holder pid {first.report['holder_pid']}" in second.stderr
    assert "run `quiesce thaw` first" in second.stderr
    assert not sqlite_writable(db), "the refused freeze must not disturb the first hold"


def test_broken_hold_at_thaw_exits_nonzero_naming_the_target(tmp_path):
    config = write_config(tmp_path, {"a": recorder(tmp_path), "b": recorder(tmp_path, broken=True)})
    assert run(config, "freeze", fakes=("recorder",)).returncode == 0
    proc = run(config, "thaw", fakes=("recorder",))
    assert proc.returncode == 1
    assert "BROKEN" in proc.stdout and "b lost its lock" in proc.stdout
    assert sorted(records(tmp_path / "calls")[-2:]) == ["thaw-without-session a",
                                                        "thaw-without-session b"]


def test_lean_thaw_runs_without_site_packages_and_writes_no_disk_file(sqlite_config, tmp_path):
    db, config = sqlite_config
    assert run(config, "freeze").returncode == 0
    import quiesce.thaw, sys
    log = tmp_path / "log" / "quiesce.log"
    size_before = log.stat().st_size
    proc = subprocess.run([sys.executable, "-I", "-S", "-B", quiesce.thaw.__file__,
                           "--config", str(config), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["outcomes"][0]["status"] == "ok" and sqlite_writable(db)
    # the holder wrote its buffered log only after it released (it exits right after)
    assert wait_until(lambda: log.stat().st_size > size_before, timeout=5)
    assert "released by thaw" in log.read_text()


def test_control_socket_and_runtime_dir_are_private(sqlite_config, tmp_path):
    _, config = sqlite_config
    assert run(config, "freeze").returncode == 0
    run_dir = tmp_path / "run"
    assert run_dir.stat().st_mode & 0o777 == 0o700
    assert (run_dir / "thaw.fifo").stat().st_mode & 0o777 == 0o600
    assert (run_dir / "state.json").stat().st_mode & 0o777 == 0o600


def test_stand_in_watchdog_releases_server_kept_holds_when_the_holder_died(tmp_path):
    config = write_config(tmp_path, {"cache": recorder(tmp_path)}, max_hold=1)
    env = env_with("recorder")
    # a relative --config: the sentinel runs from / and must still find it
    proc = subprocess.run(QUIESCE + ["--config", config.name, "freeze", "--json"], env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    os.kill(json.loads(proc.stdout)["holder_pid"], signal.SIGKILL)
    # nothing but the sentinel is left to release it, at the deadline plus its grace
    assert wait_until(lambda: "thaw-without-session cache" in records(tmp_path / "calls"),
                      timeout=15), "the stand-in watchdog never released the target"
    thaw = run(config, "thaw", "--json", fakes=("recorder",), check_json=True)
    assert thaw.returncode == 1, "the operator's thaw must still report the broken hold"
    [outcome] = thaw.report["outcomes"]
    assert outcome["status"] == "broken" and "stand-in watchdog" in outcome["error"]
    assert run(config, "thaw", fakes=("recorder",)).returncode == 0


def test_a_failed_release_stays_recorded_and_the_next_thaw_retries_it(tmp_path):
    config = write_config(tmp_path, {"a": recorder(tmp_path, fail="thaw-without-session")})
    assert run(config, "freeze", fakes=("recorder",)).returncode == 0
    first = run(config, "thaw", "--json", fakes=("recorder",), check_json=True)
    assert first.returncode == 1 and first.report["outcomes"][0]["status"] == "failed"
    status = run(config, "status", "--json", check_json=True)
    assert status.report["held"], "a target whose release failed must still be recorded as held"
    # the next thaw tries again (the fake still fails: the operator sees it again)
    second = run(config, "thaw", "--json", fakes=("recorder",), check_json=True)
    assert second.returncode == 1 and second.report["action"] == "recovered"
    assert records(tmp_path / "calls").count("thaw-without-session a") == 2


def test_a_release_that_blocks_does_not_keep_the_others_quiesced(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    # thaw runs in reverse: "stuck" first, then "app"; stuck's release takes 4 s
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)},
                                     "stuck": recorder(tmp_path, sleep={"thaw-without-session": 4})})
    assert run(config, "freeze", fakes=("recorder",)).returncode == 0
    thaw = subprocess.Popen(QUIESCE + ["--config", str(config), "thaw"], env=env_with("recorder"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: sqlite_writable(db), timeout=3), "app waited for stuck's release"
        assert thaw.poll() is None, "the stuck release should still be running"
    finally:
        assert thaw.wait(timeout=30) == 0


def test_thaw_during_a_failing_freeze_reports_the_window_uncovered(tmp_path):
    config = write_config(tmp_path, {"a": recorder(tmp_path),
                                     "b": recorder(tmp_path, fail="quiesce",
                                                   sleep={"quiesce": 2})})
    freeze = subprocess.Popen(QUIESCE + ["--config", str(config), "freeze"], env=env_with("recorder"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_until(lambda: "quiesce b" in records(tmp_path / "calls"), timeout=10)
    thaw = run(config, "thaw", "--json", fakes=("recorder",), check_json=True)
    freeze.wait(timeout=30)
    assert thaw.returncode == 1, thaw.stdout
    assert "freeze had finished" in thaw.report["message"]


def test_a_fifo_release_is_reported_to_the_thaw_that_comes_after_it(tmp_path):
    config = write_config(tmp_path, {"a": recorder(tmp_path, broken=True)})
    assert run(config, "freeze", fakes=("recorder",)).returncode == 0
    fifo = tmp_path / "run" / "thaw.fifo"
    fd = os.open(fifo, os.O_RDWR)  # what the post-script's printf does
    os.write(fd, b"thaw\n")
    os.close(fd)
    state = tmp_path / "run" / "state.json"
    assert wait_until(lambda: json.loads(state.read_text())["phase"] == "released", timeout=5)
    assert json.loads(state.read_text())["acknowledged"] is False, "nobody has been told yet"
    thaw = run(config, "thaw", "--json", fakes=("recorder",), check_json=True)
    assert thaw.returncode == 1 and thaw.report["outcomes"][0]["status"] == "broken"


def test_facts_json_cannot_carry_are_reported_as_text(tmp_path):
    config = write_config(tmp_path, {"a": recorder(tmp_path, odd_facts=True)})
    proc = run(config, "freeze", "--json", fakes=("recorder",), check_json=True)
    assert proc.returncode == 0, proc.stdout
    [quiesced] = [o for o in proc.report["outcomes"] if o["phase"] == "quiesce"]
    assert quiesced["facts"]["taken_at"] == "2026-11-26 12:00:00+00:00"
    assert run(config, "thaw", fakes=("recorder",)).returncode == 0


def test_thaw_with_an_unreadable_config_never_guesses_the_runtime_dir(tmp_path):
    config = write_config(tmp_path, {"a": recorder(tmp_path)})
    assert run(config, "freeze", fakes=("recorder",)).returncode == 0
    good = config.read_text()
    config.write_text(good + "[oops\n")
    import quiesce.thaw, sys
    proc = subprocess.run([sys.executable, "-I", "-S", "-B", quiesce.thaw.__file__,
                           "--config", str(config)], capture_output=True, text=True,
                          env=env_with("recorder"))
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr, proc.stdout + proc.stderr
    config.write_text(good)
    assert run(config, "thaw", fakes=("recorder",)).returncode == 0


def test_exec_runs_the_snapshot_command_while_held_and_thaws_after(sqlite_config, tmp_path):
    db, config = sqlite_config
    probe = ("import sqlite3, sys\n"
             "try:\n"
             "    c = sqlite3.connect(sys.argv[1], timeout=0.2)\n"
             "    c.execute(\"INSERT INTO t (v) VALUES ('during')\"); c.commit()\n"
             "except sqlite3.OperationalError:\n"
             "    sys.exit(0)  # locked: what the snapshot command should see\n"
             "sys.exit(9)\n")
    import sys
    proc = run(config, "exec", "--json", "--", sys.executable, "-c", probe, str(db))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["command_status"] == 0 and report["outcomes"][0]["status"] == "ok"
    assert sqlite_writable(db)
    failing = run(config, "exec", "--", sys.executable, "-c", "raise SystemExit(7)")
    assert failing.returncode == 7, "exec must exit with the snapshot command's status"
    assert sqlite_writable(db), "thaw must run even when the command failed"
