"""The benchmark harness works: one quick run, its JSON and its report.

No timing assertions: the figures depend on the machine. What is checked is that the
harness ran every configuration it could, wrote results with the expected structure and
only finite numbers, and (for SQLite, which is always there) that both contenders really
held the database through every snapshot step; that the extra figures (holder memory, the
freeze breakdown, the host rehearsal) and the pictures exist.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

# benchmarks/run.py --quick: real servers, a loop filesystem, about a minute.
pytestmark = [pytest.mark.root, pytest.mark.server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
STATS = {"median", "p95", "min", "max", "n"}
FIGURE_KEYS = {"kind", "label", "variant", "tool", "targets", "step_s", "blocks_writers", "cycles",
               "ok_cycles", "warmup_cycles", "held_cycles", "freeze_ms", "post_ms", "thaw_ms",
               "hold_overhead_ms", "locked_before_exit_ms", "max_gap_ms", "commits_in_hold",
               "phases_ms", "per_cycle", "writer", "verdict", "problems"}


def _numbers(value, path="$"):
    """Every number in a JSON value, with where it is."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
                           "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"benchmarks/run.py --quick failed:\n{proc.stdout}\n{proc.stderr}"

    def reject(constant):
        raise AssertionError(f"results.json holds {constant}")
    results = json.loads((out / "results.json").read_text(), parse_constant=reject)
    return results, out


def test_structure(quick_run):
    r, _ = quick_run
    assert r["schema"] == 2 and r["mode"] == "quick"
    for key in ("date", "machine", "versions", "settings", "startup_ms", "figures", "stall",
                "sqlite_lock", "skipped", "errors", "duration_s", "memory", "breakdown", "rehearsals", "plots"):
        assert key in r, key
    assert isinstance(r["machine"]["cpus"], int) and r["machine"]["kernel"]
    assert r["settings"]["targets"] == [1]
    assert r["errors"] == []
    assert r["startup_ms"]
    measured = {f["kind"] for f in r["figures"]}
    skipped = {s["kind"] for s in r["skipped"]}
    assert measured | skipped == {"sqlite", "redis", "mariadb", "postgresql"}
    assert not measured & skipped
    for f in r["figures"]:
        assert FIGURE_KEYS <= set(f), FIGURE_KEYS - set(f)
        assert f["tool"] in {"quiesce", "baseline"} and f["targets"] == 1
        assert f["cycles"] >= 1 and f["warmup_cycles"] == 1
        for key in ("freeze_ms", "post_ms", "max_gap_ms"):
            if f["ok_cycles"]:
                assert set(f[key]) == STATS, (f["kind"], f["variant"], key)
        if f["blocks_writers"] and f["ok_cycles"]:
            for key in ("thaw_ms", "hold_overhead_ms"):
                assert set(f[key]) == STATS, (f["kind"], f["variant"], key)
        if not f["blocks_writers"]:
            assert f["thaw_ms"] is None and f["hold_overhead_ms"] is None
    for kind in measured:
        tools = {f["tool"] for f in r["figures"] if f["kind"] == kind}
        assert tools == {"quiesce", "baseline"}, kind


def test_numbers_are_finite(quick_run):
    r, _ = quick_run
    numbers = list(_numbers(r))
    assert numbers
    for path, value in numbers:
        assert math.isfinite(value), path


def test_sqlite_both_contenders_held(quick_run):
    r, _ = quick_run
    sqlite = [f for f in r["figures"] if f["kind"] == "sqlite"]
    if not sqlite:
        pytest.skip("the sqlite3 command-line shell is not installed: no SQLite baseline")
    for f in sqlite:
        assert f["ok_cycles"] == f["cycles"], f["problems"]
        assert f["held_cycles"] == f["ok_cycles"], f["verdict"]


def test_sqlite_lock_figure(quick_run):
    r, out = quick_run
    lock = r["sqlite_lock"]
    assert [row["rows_per_transaction"] for row in lock["rows"]] == [1, 100]
    for row in lock["rows"]:
        for tool in ("quiesce", "baseline"):
            assert row[tool]["n"] == lock["samples"] > 0
        assert row["quiesce"]["failed"] == 0, "quiesce did not get the lock within its timeout"
        assert isinstance(row["quiesce"]["p99"], float)
    assert "## SQLite lock acquisition against a tight-loop writer" in (
        out / "RESULTS.md").read_text()


def test_stall_structure(quick_run):
    r, _ = quick_run
    if "mariadb" not in {f["kind"] for f in r["figures"]}:
        assert r["stall"] is None
        return
    s = r["stall"]
    assert [row["contender"] for row in s["rows"]] == ["quiesce", "quiesce-ftwrl", "baseline"]
    for row in s["rows"]:
        for key in ("freeze_ms", "longest_writer_stall_ms", "stall_beyond_step_ms"):
            assert isinstance(row[key], (int, float)), key


def test_report_written(quick_run):
    _, out = quick_run
    text = (out / "RESULTS.md").read_text()
    for heading in ("## Machine", "## Freeze latency", "## Thaw latency", "## Hold overhead",
                    "## Did the hold really hold?", "## Bounded stall",
                    "## Where quiesce is slower than the baseline"):
        assert heading in text, heading


def _measured(r):
    return {f["kind"] for f in r["figures"]}


def test_holder_memory(quick_run):
    r, _ = quick_run
    assert {(m["kind"], m["targets"]) for m in r["memory"]} == {(k, 1) for k in _measured(r)}
    for m in r["memory"]:
        assert "error" not in m, m
        assert m["samples"] >= 1
        assert 0 < m["rss_mib"] <= m["hwm_mib"], m


def test_freeze_breakdown_adds_up(quick_run):
    r, _ = quick_run
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import breakdown
    assert {b["kind"] for b in r["breakdown"]} == _measured(r)
    for b in r["breakdown"]:
        assert b["phases_ms"] and "quiesce" in b["imports_ms"], b
        for key in ("freeze_ms", "sh_ms", "python_ms", "driver_import_ms", "connect_ms"):
            assert isinstance(b[key], (int, float)) and b[key] >= 0, (b["kind"], key)
        for key in ("adapters_ms", "config_ms"):  # None: the probe no longer fits the core
            assert b[key] is None or b[key] >= 0, (b["kind"], key)
        rows = breakdown.rows(b)
        assert rows[-1][0].startswith("the rest")
        assert sum(ms for _, ms, _ in rows if ms is not None) == pytest.approx(b["freeze_ms"])


def test_host_rehearsal(quick_run):
    r, _ = quick_run
    blocking = {f["kind"] for f in r["figures"] if f["tool"] == "quiesce" and f["blocks_writers"]}
    assert {(h["host"], h["kind"]) for h in r["rehearsals"]} == {("azure", k) for k in blocking}
    for h in r["rehearsals"]:
        assert h["codes"] and all(code == 0 for code in h["codes"]), h
        assert h["ok_cycles"] == h["cycles"] == h["held_cycles"], h
        for c in h["per_cycle"]:  # the parts tile the writer's wait
            assert c["host"] > 0 and c["quiesce"] >= 0 and c["held"], c
            parts = sum(c[k] for k in ("quiesce_freeze", "host_poll", "host_fs_freeze_thaw",
                                       "host_snapshot", "host_other", "quiesce_thaw"))
            assert parts == pytest.approx(max(c["blocked"], c["host"] + c["quiesce_thaw"]),
                                          abs=0.1), c


def test_pictures_and_sections(quick_run):
    r, out = quick_run
    assert r["plots"] == {"scaling": "scaling.png", "rehearsal": "rehearsal.png"}
    for name in r["plots"].values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    text = (out / "RESULTS.md").read_text()
    for heading in ("## quiesce against the baseline: ratios", "## Scaling curves",
                    "## Where one target's freeze latency goes", "## Holder memory",
                    "## A whole host cycle"):
        assert heading in text, heading
    assert "](scaling.png)" in text and "](rehearsal.png)" in text
