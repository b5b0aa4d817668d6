"""RESULTS.md's verdict: each performance goal, met or missed, and for a miss the limit that
the figures of the same run point to (the explanations are generated from results.json, so
they always quote this run's numbers).

The goals: hold overhead and thaw latency at most the baseline's (1.0×) for every kind at
1, 8 and 32 targets; freeze latency at most 2.0× at 32 targets; the holder under 60 MB at
32 targets; SQLite's lock taken within 100 ms at p99 against a writer in a tight loop.
"""

from __future__ import annotations

from report import KIND_LABEL, KIND_ORDER, _fig, _median

GOAL_TARGETS = (1, 8, 32)
RATIO_GOALS = {"hold_overhead_ms": 1.0, "thaw_ms": 1.0}
FREEZE_GOAL = 2.0          # at 32 targets
MEMORY_GOAL_MIB = 60e6 / 2**20
LOCK_GOAL_MS = 100.0


def _pairs(r: dict, metric: str, counts) -> list[tuple[str, int, float, float]]:
    """(kind, N, quiesce median, baseline median) where both were measured."""
    found = []
    for kind in KIND_ORDER:
        for n in counts:
            q, b = _fig(r, kind, n, "quiesce"), _fig(r, kind, n, "baseline")
            qm = _median(q.get(metric)) if q else None
            bm = _median(b.get(metric)) if b else None
            if qm is not None and bm:
                found.append((kind, n, qm, bm))
    return found


def _limit(r: dict, kind: str, n: int) -> dict | None:
    for row in r.get("limits") or []:
        if row["kind"] == kind:
            return row["by_targets"].get(str(n))
    return None


def _q(r: dict, kind: str, n: int, key: str) -> float | None:
    f = _fig(r, kind, n, "quiesce")
    return _median(f.get(key)) if f else None


def _b(r: dict, kind: str, n: int, key: str) -> float | None:
    f = _fig(r, kind, n, "baseline")
    return _median(f.get(key)) if f else None


def _ms(value: float | None) -> str:
    return f"{value:.1f} ms" if value is not None else "not measured"


def _ratio_table(rows, goal: float) -> list[str]:
    lines = ["| database | targets | quiesce | baseline | ratio | goal |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for kind, n, qm, bm in rows:
        ratio = qm / bm
        lines.append(f"| {KIND_LABEL[kind]} | {n} | {qm:.1f} | {bm:.1f} | {ratio:.2f}× | "
                     f"{'met' if ratio <= goal else '**missed**'} |")
    return lines


def _hold_miss(r: dict, kind: str, n: int) -> str:
    """Why writers of *kind* wait longer with quiesce at *n* targets: the split of the
    longest gap, and the interpreter's limit from limits.py."""
    lead, base_lead = _q(r, kind, n, "locked_before_exit_ms"), _b(r, kind, n, "locked_before_exit_ms")
    l2r, r2e = _q(r, kind, n, "lock_to_ready_ms"), _q(r, kind, n, "ready_to_exit_ms")
    thaw, base_thaw = _q(r, kind, n, "thaw_ms"), _b(r, kind, n, "thaw_ms")
    text = (f"{KIND_LABEL[kind]}, {n} target(s): lock → pre-script exit {_ms(lead)} against "
            f"{_ms(base_lead)}; of quiesce's, the holder's first lock → \"ready\" took "
            f"{_ms(l2r)} and \"ready\" → exit {_ms(r2e)}; the thaw side {_ms(thaw)} against "
            f"{_ms(base_thaw)}.")
    lim = _limit(r, kind, n)
    if n > 1 and lim:
        reads = ("the gate's thread reads every reply in turn, then " if kind != "sqlite"
                 else "")
        text += (f" Once the lock statements have gone out together, {reads}each target's "
                 f"hook thread must wake to finish, and the phase ends with the last: on "
                 f"this machine, waking {n} threads for one {_OPERATION[kind]} each takes "
                 f"{lim['threads']:.1f} ms, the same {n} from one thread {lim['in_turn']:.1f} ms"
                 + (f" ({lim['together']:.1f} ms written together)" if "together" in lim else "")
                 + " (*What the interpreter allows*). That queue for CPython's one interpreter "
                 "lock and the two CPUs, which the writer and the servers share, is the "
                 "limit: the hooks run one thread per target (a hook may block for its "
                 "target's timeout, and no target may wait on another's call), so the holder "
                 "pays one wake-up per target between the locks and \"ready\".")
    elif n == 1:
        costs = r.get("startup_ms") or {}
        bare = next((v for k, v in costs.items() if k.endswith("a bare interpreter")), None)
        loaded = next((v for k, v in costs.items() if "as freeze has" in k), None)
        text += (" The baseline's client is already connected and only prints a marker that "
                 "its shell is polling for; quiesce's pre-script is a second process by "
                 "design (the holder keeps the sessions and must outlive it), so after the "
                 "lock the holder saves its record and sends \"ready\" through a pipe, and "
                 "freeze wakes, prints its report and exits: the \"ready\" → exit figure is "
                 "that hand-over.")
        if bare is not None and loaded is not None:
            text += (f" Of it, the kernel's teardown of the exiting process alone takes "
                     f"{loaded:.1f} ms with quiesce's modules loaded, against {bare:.1f} ms "
                     f"for a bare interpreter (*What the parts cost*); and on two CPUs that "
                     f"the writer and the server keep busy, each wake-up on the way waits "
                     f"for a CPU.")
    return text + _coordinates_cost(r, kind, n)


def _coordinates_cost(r: dict, kind: str, n: int) -> str:
    costs = r.get("startup_ms") or {}
    cost = next((v for k, v in costs.items() if k.startswith("MariaDB's coordinates file")
                 and k.endswith(f"{n} at once, from {n} thread(s)")), None)
    if kind != "mariadb" or cost is None:
        return ""
    return (f" MariaDB also writes its binary-log coordinates durably under the lock (the "
            f"snapshot must carry them; the baseline records none): {n} such file(s) at once "
            f"take {cost:.1f} ms here (*What the parts cost*).")


_OPERATION = {"sqlite": "BEGIN IMMEDIATE + ROLLBACK", "redis": "PING round trip",
              "mariadb": "DO 0 round trip"}


def _thaw_miss(r: dict, kind: str, n: int) -> str:
    lim = _limit(r, kind, n)
    text = (f"{KIND_LABEL[kind]}, {n} target(s): {_ms(_q(r, kind, n, 'thaw_ms'))} against "
            f"{_ms(_b(r, kind, n, 'thaw_ms'))}.")
    if lim and n > 1:
        text += (f" The releases themselves are written back to back from one thread "
                 f"(`Hold.release`; {n} written together: "
                 f"{lim.get('together', lim['in_turn']):.1f} ms); the {n} thaw threads that "
                 f"then read the replies and check the holds compete with the writer for the two "
                 f"CPUs ({lim['threads']:.1f} ms to wake them), while the writer goes round "
                 f"its {n} targets.")
    else:
        text += (" The post-script's `printf` wakes the holder's FIFO thread, which writes the "
                 "release; the baseline's client reads the same FIFO line. What differs is a "
                 "Python thread's wake-up against a C client's.")
    return text


def section(r: dict) -> list[str]:
    lines = ["## The goals, one by one", "",
             "Medians of this run, quiesce against the baseline of the same run. For a goal "
             "missed, the figures of this run that explain it.", ""]
    counts = [n for n in GOAL_TARGETS if n in r["settings"]["targets"]]
    for metric, title, explain in (("hold_overhead_ms", "Hold overhead ≤ 1.0×", _hold_miss),
                                   ("thaw_ms", "Thaw latency ≤ 1.0×", _thaw_miss)):
        rows = [row for row in _pairs(r, metric, counts) if row[0] != "postgresql"]
        lines += [f"### {title}", ""] + _ratio_table(rows, RATIO_GOALS[metric]) + [""]
        missed = [(k, n) for k, n, qm, bm in rows if qm / bm > RATIO_GOALS[metric]]
        if missed:
            lines += ["Missed:", ""] + [f"* {explain(r, k, n)}" for k, n in missed] + [""]
    lines += _freeze(r) + _memory(r) + _lock(r)
    return lines


def _freeze(r: dict) -> list[str]:
    big = max(r["settings"]["targets"])
    rows = _pairs(r, "freeze_ms", [big])
    lines = [f"### Freeze latency ≤ {FREEZE_GOAL:.1f}× at {big} targets", ""]
    lines += _ratio_table(rows, FREEZE_GOAL) + [""]
    missed = [(k, qm, bm) for k, _, qm, bm in rows if qm / bm > FREEZE_GOAL]
    for kind, qm, bm in missed:
        lines.append(f"* Missed for {KIND_LABEL[kind]}: {qm:.0f} ms against {bm:.0f} ms; "
                     f"*Where one target's freeze latency goes* shows the fixed part (interpreter, "
                     f"imports, adapters) that every freeze pays before the first connect.")
    one = _pairs(r, "freeze_ms", [1])
    if one:
        lines += ["", "At one target the goal is to come as close to the interpreter's own "
                  "start as the drivers allow: "
                  + "; ".join(f"{KIND_LABEL[k]} {qm:.0f} ms against {bm:.0f} ms" for k, _, qm, bm in one)
                  + ". *Where one target's freeze latency goes* accounts for every millisecond: "
                  "the interpreter, the imports (click, pluggy, quiesce, the standard library), "
                  "adapter discovery, the driver's import, connect, check, flush and lock; all "
                  "of it passes before the lock, while writers still run."]
    return lines + [""]


def _memory(r: dict) -> list[str]:
    rows = [m for m in r.get("memory") or [] if not m.get("error")]
    if not rows:
        return []
    lines = ["### The holder under 60 MB at 32 targets", ""]
    for m in rows:
        if m["targets"] == max(x["targets"] for x in rows):
            verdict = "met" if m["hwm_mib"] < MEMORY_GOAL_MIB else "**missed**"
            lines.append(f"* {KIND_LABEL[m['kind']]}, {m['targets']} targets: peak "
                         f"{m['hwm_mib']:.1f} MiB (RSS {m['rss_mib']:.1f} MiB while holding): "
                         f"{verdict}")
    return lines + [""]


def _lock(r: dict) -> list[str]:
    lock = r.get("sqlite_lock") or {}
    rows = lock.get("rows") or []
    if not rows:
        return []
    lines = [f"### SQLite's lock within {LOCK_GOAL_MS:.0f} ms at p99", ""]
    for row in rows:
        p99 = row["quiesce"]["p99"]
        verdict = "met" if p99 is not None and p99 <= LOCK_GOAL_MS else "**missed**"
        lines.append(f"* writer's transaction of {row['rows_per_transaction']} row(s): p99 "
                     f"{p99} ms (SQLite's busy handler: {row['baseline']['p99']} ms): {verdict}")
    return lines + [""]


def limits_table(r: dict) -> list[str]:
    rows = r.get("limits") or []
    lines = ["## What the interpreter allows", "",
             "One small operation on each of N targets (the same servers and drivers, no "
             "writer running; median ms): from N threads woken together, as quiesce's hooks "
             "run; from one thread in turn; and written together, every request before any "
             "reply is read, as the lock gate and `Hold.release` write the statements that "
             "lock and release. The gap between the first and the other two is the price of "
             "waking N Python threads on this machine.", ""]
    if not rows:
        return lines + ["Not measured in this run.", ""]
    lines += ["| database | operation | targets | N threads | one thread, in turn | "
              "one thread, written together |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        for n, fig in row["by_targets"].items():
            together = f"{fig['together']:.2f}" if "together" in fig else "-"
            lines.append(f"| {KIND_LABEL[row['kind']]} | {_OPERATION[row['kind']]} | {n} | "
                         f"{fig['threads']:.2f} | {fig['in_turn']:.2f} | {together} |")
    return lines + [""]
