"""SQLite lock acquisition against a writer that commits back to back.

SQLite has no lock queue: a connection that finds the write lock taken retries. A writer
that starts its next transaction microseconds after the last one committed leaves only
those microseconds free. Measured here, in one run against the same writer process:

* **quiesce**: the sqlite adapter's own ``quiesce`` hook (retries every millisecond);
* **baseline**: ``BEGIN IMMEDIATE`` with SQLite's default busy handler (the adapter before
  this figure existed), whose sleeps grow from 1 ms to 100 ms.

Each sample is a connection opened and its lock taken (or given up after ``timeout``) and released at once; the
contenders alternate. Writers with one-row and with 100-row transactions.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import percentile
from quiesce import Target
from quiesce.plugins import load_adapters

TIMEOUT = 10.0   # seconds: the target's default timeout, and so the adapter's busy_timeout
PAUSE = 0.02     # seconds between samples, so the writer runs freely in between
ROWS = (1, 100)  # rows per writer transaction

WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
conn.execute("PRAGMA synchronous=NORMAL")
rows = [("x" * 50,)] * int(sys.argv[2])
print("ready", flush=True)
while True:
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO t (v) VALUES (?)", rows)
    conn.execute("COMMIT")
"""


def _baseline(db: Path) -> float | None:
    started = time.monotonic()  # from before connecting, as the adapter's hook is timed
    conn = sqlite3.connect(db, timeout=TIMEOUT, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        took = time.monotonic() - started
        conn.execute("ROLLBACK")
        return took
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()


def _quiesce(adapters, target: Target) -> float | None:
    started = time.monotonic()
    try:
        hold = adapters.call("quiesce", target)
    except Exception:  # the adapter's one-line TargetError: a failed sample
        return None
    took = time.monotonic() - started
    adapters.call("thaw", target, hold=hold)
    adapters.call("flush", target)  # closes the released connection (thaw never does)
    return took


def _stats(samples: list[float | None]) -> dict[str, Any]:
    took = [s * 1000 for s in samples if s is not None]
    return {"n": len(samples), "failed": len(samples) - len(took),
            **{name: round(percentile(took, q), 2) if took else None
               for name, q in (("p50", .5), ("p95", .95), ("p99", .99), ("max", 1.0))}}


def measure_one(workdir: Path, rows: int, samples: int) -> dict[str, Any]:
    db = workdir / f"lock-{rows}.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    conn.close()
    adapters = load_adapters(load_entrypoints=False)
    target = Target("bench", "sqlite", {"path": str(db)}, timeout=TIMEOUT)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(rows)],
                              stdout=subprocess.PIPE, text=True)
    try:
        writer.stdout.readline()
        time.sleep(0.2)
        quiesce, baseline = [], []
        for _ in range(samples):
            quiesce.append(_quiesce(adapters, target))
            time.sleep(PAUSE)
            baseline.append(_baseline(db))
            time.sleep(PAUSE)
        if writer.poll() is not None:
            raise RuntimeError(f"the tight-loop writer died (exit {writer.returncode})")
    finally:
        writer.kill()
        writer.wait()
    return {"rows_per_transaction": rows, "quiesce": _stats(quiesce),
            "baseline": _stats(baseline)}


def run(workdir: Path, samples: int, progress) -> dict[str, Any]:
    results = []
    for rows in ROWS:
        row = measure_one(workdir, rows, samples)
        progress(f"  sqlite-lock {rows:>3} row(s)/tx: quiesce p99 {row['quiesce']['p99']} ms, "
                 f"baseline p99 {row['baseline']['p99']} ms")
        results.append(row)
    return {"timeout_s": TIMEOUT, "samples": samples, "rows": results}
