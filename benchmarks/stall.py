"""Bounded stall: MariaDB with a long write statement running when freeze is called.

A long UPDATE (``... WHERE id = 1 AND SLEEP(<query_s>) = 0``) holds the table open for
writing. FLUSH TABLES WITH READ LOCK must wait for it, and every new write queues behind
the waiting FTWRL, so a naive FTWRL pre-script blocks all writers until the long statement
ends, before the snapshot even starts. Measured with the same independent writer:

1. quiesce as configured by default (``strategy = "auto"``: BACKUP STAGE on MariaDB);
2. quiesce with ``strategy = "ftwrl"``: its pre-check sees the long statement and refuses
   (fails fast, nothing held, writers never queue);
3. the naive FTWRL baseline. The harness does not sit out the whole query: after
   ``cap_s`` it kills the long statement, FTWRL then gets its lock and the cycle goes on.
   The writer was blocked for the whole cap; without the kill it would have been blocked
   until the statement ended.
"""

from __future__ import annotations

import math
import subprocess
import tempfile
import threading
import time
from bisect import bisect_left, bisect_right
from pathlib import Path
from typing import Any

from harness import (BaselineSetup, Cycle, QuiesceSetup, Writer, run_cycle, run_script,
                     wait_exit)
from kinds import Variant


class LongQuery:
    """A long write statement in its own session, killable from another one."""

    def __init__(self, server, seconds: float):
        self.server = server
        self.seconds = seconds
        self.conn = server.connect(database="bench", read_timeout=seconds + 60)
        with self.conn.cursor() as cur:
            cur.execute("SELECT CONNECTION_ID()")
            self.id = cur.fetchone()[0]
        self.started = math.nan
        self.ended = math.nan
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with self.conn.cursor() as cur:
                self.started = time.monotonic()
                cur.execute("UPDATE stall SET v = v + 1 WHERE id = 1 AND SLEEP(%s) = 0",
                            (self.seconds,))
        except Exception as e:  # reported, not raised: the harness must go on to clean up
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.ended = time.monotonic()

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the server shows it running
            rows = self.server.sql("SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                                   "WHERE ID = %s AND INFO LIKE 'UPDATE stall%%'", (self.id,))
            if rows and rows[0][0]:
                return
            time.sleep(0.02)
        raise RuntimeError("the long UPDATE did not start")

    def running_for(self) -> float | None:
        return None if not self.thread.is_alive() else time.monotonic() - self.started

    def kill(self) -> None:
        if self.thread.is_alive():
            try:
                self.server.sql(f"KILL QUERY {int(self.id)}")
            except Exception:
                pass  # it ended meanwhile
        self.thread.join(30)
        try:
            self.conn.close()
        except Exception:
            pass


def _capped_cycle(setup: BaselineSetup, step: float, cap: float, on_cap, log) -> tuple[Cycle, float | None]:
    """A cycle whose pre-script may wait; after *cap* s call *on_cap* (kill the blocker)."""
    start = time.monotonic()
    proc = subprocess.Popen(setup.pre, env=setup.env, cwd=setup.workdir,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    capped_at = None
    if not wait_exit(proc, cap):
        capped_at = time.monotonic()
        on_cap()
        if not wait_exit(proc, 120):
            proc.kill()
    end = time.monotonic()
    rc = proc.wait()
    cycle = Cycle(start, end, pre_rc=rc)
    time.sleep(step)
    cycle.post_start, cycle.post_end, cycle.post_rc = run_script(setup.post, setup.env,
                                                                 setup.workdir, log)
    cycle.problem = setup.settle()
    return cycle, capped_at


def _longest_stall(c: Cycle, times, until: float) -> tuple[float, float, float]:
    """(longest gap between commits from the pre-script's start to the first commit after
    the cycle, its start, its end)."""
    lo = max(bisect_right(times, c.pre_start) - 1, 0)
    hi = min(bisect_right(times, max(c.post_start, c.pre_end)) + 1, len(times),
             bisect_left(times, until))
    best = (0.0, c.pre_start, c.pre_start)
    for k in range(lo, hi - 1):
        gap = times[k + 1] - times[k]
        if gap > best[0]:
            best = (gap, times[k], times[k + 1])
    return best


def run_stall(kind, *, query_s: float, cap_s: float, step: float, workdir: Path, shm_root: Path,
              quick: bool, progress=print) -> dict[str, Any]:
    server = kind.servers[0]
    work = Path(tempfile.mkdtemp(prefix="stall-", dir=workdir))
    shm = Path(tempfile.mkdtemp(prefix="quiesce-bench-stall-", dir=shm_root))
    contenders: list[tuple[str, str, Any]] = []
    ftwrl = {"strategy": "ftwrl"}
    if quick:
        ftwrl["lock_retries"] = 0  # one attempt: refuses in a few ms instead of ~2 s
    for name, label, settings in (("quiesce", "quiesce (auto: BACKUP STAGE)", {}),
                                  ("quiesce-ftwrl", "quiesce (strategy ftwrl)", ftwrl)):
        sub = work / name
        sub.mkdir()
        subshm = shm / name
        subshm.mkdir()
        contenders.append((name, label, QuiesceSetup(
            sub, kind.quiesce_toml(1, Variant("quiesce", name, blocks_writers=True,
                                              settings=settings)), shm=subshm)))
    sub = work / "baseline"
    sub.mkdir()
    contenders.append(("baseline", "baseline (naive FTWRL)",
                       BaselineSetup(sub, kind.baseline_script, kind.baseline_args(1), shm=shm)))

    writer = Writer("mariadb", kind.writer_targets(1), work)
    long = LongQuery(server, query_s)
    cycles: list[tuple[str, str, Cycle, float | None, float | None]] = []
    try:
        long.start()
        time.sleep(1.5)  # older than quiesce's long_query_threshold (1 s)
        with open(work / "scripts.log", "ab") as log:
            for name, label, setup in contenders:
                ran_for = long.running_for()
                try:
                    if name == "baseline":
                        cycle, capped = _capped_cycle(setup, step, cap_s, long.kill, log)
                    else:
                        cycle, capped = run_cycle(setup, step, log), None
                finally:
                    setup.cleanup()
                cycles.append((name, label, cycle, ran_for, capped))
                time.sleep(0.3)
    finally:
        long.kill()
        times, _which, writer_problem = writer.stop()

    rows = []
    starts = [c.pre_start for _, _, c, _, _ in cycles] + [math.inf]
    for i, (name, label, c, ran_for, capped) in enumerate(cycles):
        gap, gap_from, gap_to = _longest_stall(c, times, starts[i + 1])
        held = c.pre_rc == 0
        beyond = gap - step if held else gap
        row = {
            "contender": name, "label": label,
            "long_query_running_s": round(ran_for, 2) if ran_for is not None else None,
            "freeze_ms": round((c.pre_end - c.pre_start) * 1000, 1),
            "freeze_exit": c.pre_rc, "thaw_exit": c.post_rc,
            "outcome": ("held (app-consistent snapshot)" if held else
                        "refused: nothing held, the host takes a file-system consistent snapshot"),
            "longest_writer_stall_ms": round(gap * 1000, 1),
            "stall_beyond_step_ms": round(beyond * 1000, 1),
            "stall_started_after_pre_ms": round((gap_from - c.pre_start) * 1000, 1),
            "capped": capped is not None,
            "problem": c.problem,
        }
        if capped is not None:
            remaining = query_s - (ran_for or 0)
            row["cap_s"] = cap_s
            row["note"] = (f"the harness killed the long statement {cap_s:g} s after FTWRL was "
                           f"issued; without that, writers would have been blocked about "
                           f"{remaining:.0f} s more before the snapshot could even start")
            row["projected_stall_s"] = round(remaining + (beyond - cap_s), 1)
        rows.append(row)
        progress(f"  stall      {label:<32} freeze {row['freeze_ms']:.0f} ms exit {c.pre_rc}  "
                 f"writers blocked {row['longest_writer_stall_ms']:.0f} ms "
                 f"(beyond step {row['stall_beyond_step_ms']:.0f} ms)")
    return {"query_s": query_s, "cap_s": cap_s, "step_s": step, "rows": rows,
            "long_query_end": long.error or "finished",
            "writer_problem": writer_problem}
