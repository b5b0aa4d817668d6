"""What a finished cycle tells the outside world (core/publish.py), and the systemd bits.

The metrics are scraped from the real node_exporter (Debian's prometheus-node-exporter)
with its textfile collector pointed at the test's directory; the summary line arrives on a
syslog socket the test creates; the tmpfiles.d and logrotate files are read by the real
systemd-tmpfiles and logrotate.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from quiesce import publish

from .support.helpers import make_sqlite, run, wait_until, write_config
from .support.markers import require
from .support.servers import free_port, skip_or_fail

NODE_EXPORTER = Path("/usr/bin/prometheus-node-exporter")
HOST = socket.gethostname()


@pytest.fixture
def syslog(tmp_path):
    """A datagram socket standing in for /dev/log."""
    path = tmp_path / "syslog.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield path, sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    lines = []
    while True:
        try:
            lines.append(sock.recv(65536).decode())
        except BlockingIOError:
            return lines


@pytest.fixture
def node_exporter(request, tmp_path):
    require(request, "server")
    if not NODE_EXPORTER.exists():
        skip_or_fail(f"{NODE_EXPORTER} is missing: apt-get install prometheus-node-exporter")
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [str(NODE_EXPORTER), f"--web.listen-address=127.0.0.1:{port}",
         "--collector.disable-defaults", "--collector.textfile",
         f"--collector.textfile.directory={textfiles}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        assert wait_until(lambda: _reachable(url), timeout=20), "node_exporter did not start"
        yield textfiles, url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).read()
        return True
    except OSError:
        return False


def scrape(url: str) -> dict[str, float]:
    """Every sample as {'name{labels}': value}, labels as node_exporter sorts them."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    samples["__text__"] = text
    return samples


def _cycle_config(tmp_path, db, syslog_path, metrics_dir, **settings):
    return write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}},
                        metrics_dir=str(metrics_dir), syslog_socket=str(syslog_path), **settings)


@pytest.mark.server
def test_metrics_scraped_from_node_exporter_and_one_line_per_cycle(tmp_path, node_exporter, syslog):
    textfiles, url = node_exporter
    syslog_path, sock = syslog
    db = make_sqlite(tmp_path / "app.db")
    config = _cycle_config(tmp_path, db, syslog_path, textfiles, max_hold=30)
    prom = textfiles / publish.METRICS_FILE

    # Cycle 1: a clean freeze and thaw. Nothing is published while the target is held.
    assert run(config, "freeze").returncode == 0
    time.sleep(0.3)
    assert not prom.exists() and received(sock) == [], "published before the release"
    thaw = run(config, "thaw")
    assert thaw.returncode == 0, thaw.stdout + thaw.stderr
    assert wait_until(prom.exists, timeout=10)
    lines: list[str] = []
    assert wait_until(lambda: received_into(sock, lines), timeout=5)
    first = scrape(url)
    assert first["node_textfile_scrape_error"] == 0, first["__text__"]
    assert first[f'quiesce_last_cycle_success{{host="{HOST}"}}'] == 1
    assert first['quiesce_target_consistent{kind="sqlite",target="app"}'] == 1
    assert first['quiesce_target_hold_seconds{kind="sqlite",target="app"}'] > 0
    assert first[f'quiesce_freeze_duration_seconds{{host="{HOST}"}}'] > 0
    assert f'quiesce_thaw_duration_seconds{{host="{HOST}"}}' in first
    assert first['quiesce_cycles_total{result="success"}'] == 1
    assert first['quiesce_cycles_total{result="failure"}'] == 0
    assert first[f'quiesce_watchdog_fired_total{{host="{HOST}"}}'] == 0
    ended = first[f'quiesce_last_cycle_timestamp_seconds{{host="{HOST}"}}']
    assert abs(ended - time.time()) < 60
    assert first[f'quiesce_last_success_timestamp_seconds{{host="{HOST}"}}'] == ended
    for name, kind in (("quiesce_cycles_total", "counter"), ("quiesce_last_cycle_success", "gauge")):
        assert f"# TYPE {name} {kind}" in first["__text__"]
        assert f"# HELP {name} " in first["__text__"]

    # Cycle 2: no thaw comes; the watchdog releases. Counters carry over.
    config = _cycle_config(tmp_path, db, syslog_path, textfiles, max_hold=1)
    assert run(config, "freeze").returncode == 0
    assert wait_until(lambda: scrape(url).get('quiesce_cycles_total{result="failure"}') == 1,
                      timeout=15)
    second = scrape(url)
    assert second["node_textfile_scrape_error"] == 0
    assert second[f'quiesce_last_cycle_success{{host="{HOST}"}}'] == 0
    assert second['quiesce_target_consistent{kind="sqlite",target="app"}'] == 0
    assert second['quiesce_target_inconsistent_total{kind="sqlite",target="app"}'] == 1
    assert second[f'quiesce_watchdog_fired_total{{host="{HOST}"}}'] == 1
    assert second['quiesce_cycles_total{result="success"}'] == 1
    assert second[f'quiesce_last_success_timestamp_seconds{{host="{HOST}"}}'] == ended
    # The operator's thaw reports the broken hold but is not a new cycle.
    assert run(config, "thaw").returncode == 1
    time.sleep(0.5)
    assert scrape(url)['quiesce_cycles_total{result="failure"}'] == 1

    assert wait_until(lambda: len(received_into(sock, lines)) >= 2, timeout=5)
    assert len(lines) == 2, lines
    assert lines[0].startswith("<30>") and "quiesce[" in lines[0]  # daemon.info
    assert "cycle ok: 1 target(s) application-consistent" in lines[0]
    assert lines[1].startswith("<27>")  # daemon.err
    assert "cycle FAILED, released by watchdog" in lines[1] and "app (broken" in lines[1]
    assert sorted(p.name for p in textfiles.iterdir()) == [publish.METRICS_FILE], "stray temp files"
    assert stat_mode(prom) == 0o644


def received_into(sock: socket.socket, lines: list) -> list:
    lines += received(sock)
    return lines


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_recovery_without_holder_is_published_by_thaw(tmp_path, syslog):
    syslog_path, sock = syslog
    db = make_sqlite(tmp_path / "app.db")
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    config = _cycle_config(tmp_path, db, syslog_path, metrics, max_hold=30)
    frozen = run(config, "freeze", "--json", check_json=True)
    assert frozen.returncode == 0
    os.kill(frozen.report["holder_pid"], signal.SIGKILL)
    try:
        thaw = run(config, "thaw", "--json", check_json=True)
        assert thaw.report["action"] == "recovered" and thaw.returncode == 1
        text = (metrics / publish.METRICS_FILE).read_text()
        assert f'quiesce_last_cycle_success{{host="{HOST}"}} 0' in text
        assert 'quiesce_cycles_total{result="failure"} 1' in text
        [line] = received(sock)
        assert "cycle FAILED, released by recovery" in line and "died before thaw" in line
    finally:
        _kill_sentinel(tmp_path / "run")


def _kill_sentinel(runtime_dir: Path) -> None:
    """The killed holder's stand-in watchdog would wait out max_hold: end it now."""
    state = str(runtime_dir / "state.json")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if state.encode() in cmdline:
            os.kill(int(pid), signal.SIGKILL)


def test_publishing_problems_are_logged_and_never_fail_the_cycle(tmp_path):
    """A missing metrics directory and a systemd scope where systemd is not running."""
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("systemd runs here: the fallback path is not taken")
    db = make_sqlite(tmp_path / "app.db")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}},
                          metrics_dir=str(tmp_path / "no-such-dir"), holder_scope="systemd")
    freeze = run(config, "freeze")
    assert freeze.returncode == 0, freeze.stderr
    assert "holder_scope = \"systemd\": systemd is not running here" in freeze.stderr
    assert "the holder stays in the caller's cgroup" in freeze.stderr
    thaw = run(config, "thaw")
    assert thaw.returncode == 0, thaw.stdout + thaw.stderr
    log = tmp_path / "log" / "quiesce.log"
    assert wait_until(lambda: "cannot write metrics" in log.read_text(), timeout=10)
    assert "no-such-dir" in log.read_text()


def test_journal_native_protocol(tmp_path):
    path = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert publish.send_summary("cycle FAILED: app (failed: line one\nline two)", False,
                                    journal_socket=str(path)) == str(path)
        fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
    assert fields == {"MESSAGE": "cycle FAILED: app (failed: line one line two)",
                      "PRIORITY": "3", "SYSLOG_IDENTIFIER": "quiesce", "SYSLOG_FACILITY": "3"}


def test_damaged_counters_restart_instead_of_stopping_the_metrics():
    counters, last = publish.previous_values(
        'quiesce_cycles_total{result="success"} 7\nquiesce_cycles_total{result="failure"} x\n'
        'quiesce_last_success_timestamp_seconds{host="h"} 12.5\n')
    assert counters == {'quiesce_cycles_total{result="success"}': 7.0} and last == 12.5


# -- tmpfiles.d and logrotate, read by the real tools ------------------------------------------


@pytest.fixture
def installed(tmp_path):
    db = make_sqlite(tmp_path / "app.db")
    runtime = Path(f"/dev/shm/quiesce-monitoring-{os.getpid()}")
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}},
                          runtime_dir=str(runtime))
    root = tmp_path / "root"
    proc = run(config, "install", "azure", "--root", str(root), "--log-dir", str(tmp_path / "slog"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield config, root, runtime
    shutil.rmtree(runtime, ignore_errors=True)


def test_tmpfiles_entry_creates_the_runtime_dir_and_doctor_checks_it(installed):
    config, root, runtime = installed
    tool = shutil.which("systemd-tmpfiles")
    if tool is None:
        skip_or_fail("systemd-tmpfiles is missing: apt-get install systemd")
    entry = root / "etc/tmpfiles.d/quiesce.conf"
    assert f"d {runtime} 0700 root root -" in entry.read_text().splitlines()
    proc = subprocess.run([tool, "--create", f"--root={root}", str(entry)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    created = root / str(runtime).lstrip("/")
    st = created.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o700, 0, 0)
    finding = _doctor_finding(config, root, "runtime_dir is in tmpfiles.d")
    assert finding["ok"] and not finding["warning"], finding
    entry.unlink()
    finding = _doctor_finding(config, root, "runtime_dir is in tmpfiles.d")
    assert finding["warning"] and "install azure" in finding["message"], finding


def _doctor_finding(config, root, check: str) -> dict:
    proc = run(config, "doctor", "azure", "--root", str(root), "--json")
    return next(f for f in json.loads(proc.stdout)["findings"] if f["check"] == check)


def test_logrotate_accepts_the_file(installed, tmp_path):
    _, root, _ = installed
    tool = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not os.path.exists(tool):
        skip_or_fail("logrotate is missing: apt-get install logrotate")
    conf = root / "etc/logrotate.d/quiesce"
    text = conf.read_text()
    assert f"{tmp_path / 'slog'}/*.log {tmp_path / 'log' / 'quiesce.log'} {{" in text
    proc = subprocess.run([tool, "--debug", "--state", str(tmp_path / "logrotate.state"), str(conf)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "error" not in proc.stderr.lower(), proc.stderr


def test_reinstall_changes_nothing_and_a_shared_file_outlives_one_host(installed, tmp_path):
    config, root, _ = installed
    again = run(config, "install", "azure", "--root", str(root), "--log-dir", str(tmp_path / "slog"),
                "--json", check_json=True)
    assert again.report["changed"] is False, again.report
    other = root / "etc/quiesce/installed-other.json"
    other.write_text(json.dumps({"files": {"/etc/tmpfiles.d/quiesce.conf": {}}}))
    gone = run(config, "uninstall", "azure", "--root", str(root))
    assert gone.returncode == 0, gone.stderr
    assert (root / "etc/tmpfiles.d/quiesce.conf").exists()
    assert not (root / "etc/logrotate.d/quiesce").exists()


def test_install_offers_the_metrics_where_node_exporter_reads_textfiles(tmp_path):
    from quiesce.sysfiles import NODE_EXPORTER_TEXTFILE_DIR
    if not os.path.isdir(NODE_EXPORTER_TEXTFILE_DIR):
        skip_or_fail(f"{NODE_EXPORTER_TEXTFILE_DIR} is missing: apt-get install "
                     f"prometheus-node-exporter")
    db = make_sqlite(tmp_path / "app.db")
    args = ("install", "azure", "--root", str(tmp_path / "root"), "--log-dir", str(tmp_path / "slog"))
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}})
    offered = run(config, *args)
    assert offered.returncode == 0, offered.stderr
    assert f'metrics_dir = "{NODE_EXPORTER_TEXTFILE_DIR}"' in offered.stdout
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db)}},
                          metrics_dir=str(tmp_path))
    assert "metrics_dir" not in run(config, *args).stdout
