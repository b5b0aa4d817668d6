"""RESULTS.md (and the README's table) from results.json's dictionary."""

from __future__ import annotations

from typing import Iterator

KIND_ORDER = ("sqlite", "redis", "mariadb", "postgresql")
KIND_LABEL = {"sqlite": "SQLite", "redis": "Redis", "mariadb": "MariaDB",
              "postgresql": "PostgreSQL 15"}
TARGETS = {"sqlite": "database files", "redis": "servers", "mariadb": "servers",
           "postgresql": "clusters"}



def _busy_at_start(load: str | None) -> bool:
    """Whether the 1-minute load average at the start says other work was running."""
    try:
        return float((load or "").split()[0]) >= 1.0  # a CPU's worth, of two
    except (ValueError, IndexError):
        return False

def section_head(title: str, intro: str, found) -> list[str]:
    """A section's heading and introduction, and a note when nothing was *found*."""
    return [f"## {title}", "", intro, ""] + ([] if found else ["Not measured in this run.", ""])


def _cell(stats: dict | None, digits: int = 1) -> str:
    if not stats:
        return "n/a"
    return f"{stats['median']:.{digits}f} / {stats['p95']:.{digits}f}"


def _median(stats: dict | None) -> float | None:
    return stats["median"] if stats else None


def pairs(r: dict) -> Iterator[tuple[str, int, dict, dict | None]]:
    """(kind, N, a quiesce figure, the baseline figure of the same kind and N)."""
    figs = r["figures"]
    for kind in KIND_ORDER:
        for n in r["settings"]["targets"]:
            mine = [f for f in figs if f["kind"] == kind and f["targets"] == n]
            base = next((f for f in mine if f["tool"] == "baseline"), None)
            for f in mine:
                if f["tool"] == "quiesce":
                    yield kind, n, f, base


def _row_label(kind: str, fig: dict, several_variants: bool) -> str:
    label = KIND_LABEL[kind]
    if several_variants:
        label += " — " + fig["label"].replace("quiesce (", "").rstrip(")")
    return label


def _variants(r: dict, kind: str) -> int:
    return len({f["variant"] for f in r["figures"] if f["kind"] == kind and f["tool"] == "quiesce"})


def figure_table(r: dict, metric: str, *, na_note: str = "") -> list[str]:
    lines = ["| database | targets | quiesce median / p95 | baseline median / p95 | cycles (q / b) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for kind, n, q, b in pairs(r):
        label = _row_label(kind, q, _variants(r, kind) > 1)
        qs, bs = q.get(metric), b.get(metric) if b else None
        if not q["blocks_writers"] and na_note:
            qcell = bcell = na_note
        else:
            qcell, bcell = _cell(qs), _cell(bs) if b else "not run"
        cycles = f"{q['ok_cycles']}/{q['cycles']} / " + (f"{b['ok_cycles']}/{b['cycles']}" if b else "-")
        lines.append(f"| {label} | {n} | {qcell} | {bcell} | {cycles} |")
    return lines


def verification_table(r: dict) -> list[str]:
    lines = ["| database | targets | contender | cycles ok | writer blocked through the step | "
             "commits during the step (min–max; strict max) | writer's commit interval (µs) |",
             "| --- | ---: | --- | ---: | --- | ---: | ---: |"]
    for kind in KIND_ORDER:
        for n in r["settings"]["targets"]:
            for f in (f for f in r["figures"] if f["kind"] == kind and f["targets"] == n):
                ok = f["ok_cycles"]
                if f["blocks_writers"]:
                    held = (f"yes, {f['held_cycles']}/{ok}" if ok and f["held_cycles"] == ok
                            else f"**NO** ({f['held_cycles']}/{ok} held)")
                else:
                    held = "no — by design" if ok and f["held_cycles"] == 0 else \
                           f"blocked in {f['held_cycles']}/{ok}"
                c = f.get("commits_in_hold") or {}
                commits = (f"{c.get('min', '-')}–{c.get('max', '-')}; {c.get('strict_max', '-')}"
                           if c else "-")
                interval = f["writer"].get("median_commit_interval_us")
                lines.append(f"| {KIND_LABEL[kind]} | {n} | {f['label']} | {ok}/{f['cycles']} | "
                             f"{held} | {commits} | {interval if interval is not None else '-'} |")
    return lines


def slower(r: dict) -> list[tuple[str, str, int, float, float]]:
    """(figure, row label, N, quiesce median, baseline median) where quiesce is slower."""
    found = []
    for metric, name in (("freeze_ms", "freeze latency"), ("thaw_ms", "thaw latency"),
                         ("hold_overhead_ms", "hold overhead")):
        for kind, n, q, b in pairs(r):
            qm, bm = _median(q.get(metric)), _median(b.get(metric)) if b else None
            if qm is not None and bm is not None and qm > bm:
                found.append((name, _row_label(kind, q, _variants(r, kind) > 1), n, qm, bm))
    return found


def stall_table(s: dict) -> list[str]:
    lines = ["| contender | long UPDATE running for | freeze (ms) | freeze exit | outcome | "
             "longest writer stall (ms) | of which beyond the snapshot step (ms) |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for row in s["rows"]:
        running = f"{row['long_query_running_s']:.1f} s" if row["long_query_running_s"] else "ended"
        beyond = f"{row['stall_beyond_step_ms']:.0f}"
        if row.get("capped"):
            beyond = f"≥ {beyond} (capped; ≈ {row['projected_stall_s']:.0f} s uncapped)"
        lines.append(f"| {row['label']} | {running} | {row['freeze_ms']:.0f} | {row['freeze_exit']} | "
                     f"{row['outcome']} | {row['longest_writer_stall_ms']:.0f} | {beyond} |")
    return lines


def sqlite_lock_section(r: dict) -> list[str]:
    lock = r.get("sqlite_lock")
    lines = ["## SQLite lock acquisition against a tight-loop writer (ms)", ""]
    if not lock:
        return lines + ["Not run (SQLite not among the kinds measured)."]
    when = f" Measured on {lock['date']} (`--sqlite-lock-only`)." if lock.get("date") else ""
    lines += [
        "A writer process commits `BEGIN IMMEDIATE` / INSERT / `COMMIT` back to back "
        "(WAL, `synchronous=NORMAL`), so the write lock is free only for the microseconds "
        "between its transactions. Each sample opens a connection, takes the write lock and releases it at once; "
        "the contenders alternate, 20 ms apart, against the same writer. **quiesce** is the "
        "sqlite adapter's `quiesce` hook (it retries every millisecond); **baseline** is "
        "`BEGIN IMMEDIATE` with SQLite's default busy handler (what the adapter did before), "
        f"whose sleeps grow to 100 ms. A sample that found no gap within "
        f"{lock['timeout_s']:g} s failed and is not in the percentiles.{when}", "",
        "| writer's transaction | contender | p50 | p95 | p99 | max | failed / samples |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]

    def cell(value):
        return "–" if value is None else f"{value:.1f}"
    for row in lock["rows"]:
        for tool in ("quiesce", "baseline"):
            st = row[tool]
            lines.append(f"| {row['rows_per_transaction']} row(s) | {tool} | {cell(st['p50'])} | "
                         f"{cell(st['p95'])} | {cell(st['p99'])} | {cell(st['max'])} | "
                         f"{st['failed']} / {st['n']} |")
    return lines


def _fig(r: dict, kind: str, n: int, tool: str, variant: str | None = None) -> dict | None:
    return next((f for f in r["figures"] if f["kind"] == kind and f["targets"] == n
                 and f["tool"] == tool and (variant is None or f["variant"] == variant)), None)


def growth_table(r: dict) -> list[str]:
    """Each figure's median against the number of targets, side by side."""
    ns = r["settings"]["targets"]
    if len(ns) < 2:
        return []
    head = " → ".join(str(n) for n in ns)
    lines = [f"| database | figure | quiesce, N = {head} | baseline, N = {head} |",
             "| --- | --- | ---: | ---: |"]
    for kind in KIND_ORDER:
        quiesce_variants = sorted({f["variant"] for f in r["figures"]
                                   if f["kind"] == kind and f["tool"] == "quiesce"})
        for variant in quiesce_variants:
            for metric, name in (("freeze_ms", "freeze"), ("thaw_ms", "thaw"),
                                 ("hold_overhead_ms", "hold overhead")):
                qs = [_fig(r, kind, n, "quiesce", variant) for n in ns]
                bs = [_fig(r, kind, n, "baseline") for n in ns]
                if not any(q and q.get(metric) for q in qs):
                    continue
                label = KIND_LABEL[kind] + (f" ({qs[0]['label']})" if len(quiesce_variants) > 1
                                            and qs[0] else "")

                def series(figs):
                    return " → ".join(f"{_median(f.get(metric)):.0f}" if f and f.get(metric)
                                      else "-" for f in figs)
                lines.append(f"| {label} | {name} | {series(qs)} | {series(bs)} |")
    return lines


def faster(r: dict) -> list[tuple[str, str, int, float, float]]:
    found = []
    for metric, name in (("freeze_ms", "freeze latency"), ("thaw_ms", "thaw latency"),
                         ("hold_overhead_ms", "hold overhead")):
        for kind, n, q, b in pairs(r):
            qm, bm = _median(q.get(metric)), _median(b.get(metric)) if b else None
            if qm is not None and bm is not None and qm < bm:
                found.append((name, _row_label(kind, q, _variants(r, kind) > 1), n, qm, bm))
    return found


def lead_table(r: dict) -> list[str]:
    lines = ["| database | targets | contender | lock → pre-script exit | of which: holder's "
             "first lock → \"ready\" | \"ready\" → pre-script exit | post-script start → "
             "first commit (thaw) | hold overhead |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for kind in KIND_ORDER:
        for n in r["settings"]["targets"]:
            for f in (f for f in r["figures"] if f["kind"] == kind and f["targets"] == n
                      and f["blocks_writers"]):
                split = [_cell(f.get(k)) if f.get(k) else "-"
                         for k in ("lock_to_ready_ms", "ready_to_exit_ms")]
                lines.append(f"| {KIND_LABEL[kind]} | {n} | {f['label']} | "
                             f"{_cell(f.get('locked_before_exit_ms'))} | {' | '.join(split)} | "
                             f"{_cell(f.get('thaw_ms'))} | {_cell(f.get('hold_overhead_ms'))} |")
    return lines


def phases_table(r: dict) -> list[str]:
    lines = ["| database | targets | contender | check | flush | quiesce | thaw (in the holder) |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for kind in KIND_ORDER:
        for n in r["settings"]["targets"]:
            for f in (f for f in r["figures"] if f["kind"] == kind and f["targets"] == n
                      and f["tool"] == "quiesce"):
                p = f.get("phases_ms") or {}
                cells = [f"{p[k]:.1f}" if k in p else "-" for k in ("check", "flush", "quiesce", "thaw")]
                lines.append(f"| {KIND_LABEL[kind]} | {n} | {f['label']} | " + " | ".join(cells) + " |")
    return lines


README_TARGETS = (1, 8, 32)


def ratio_cell(q: dict, b: dict | None, metric: str) -> str:
    """'quiesce / baseline = ratio×' for one figure's medians."""
    if not q["blocks_writers"] and metric != "freeze_ms":
        return "n/a (never blocks)"
    qm, bm = _median(q.get(metric)), _median(b.get(metric)) if b else None
    if qm is None:
        return "n/a"
    if bm is None:
        return f"{qm:.0f} (no baseline)"
    ratio = f"{qm / bm:.1f}×" if bm > 0 else "∞"
    return f"{qm:.0f} / {bm:.0f} = **{ratio}**"


def ratio_table(r: dict, targets=None) -> list[str]:
    """Each figure's median, quiesce / baseline = ratio, for every (or the given) N."""
    lines = ["| database | targets | freeze latency, ms | thaw latency, ms | hold overhead, ms |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for kind, n, q, b in pairs(r):
        if targets is None or n in targets:
            label = _row_label(kind, q, _variants(r, kind) > 1)
            lines.append(f"| {label} | {n} | " + " | ".join(
                ratio_cell(q, b, m) for m in ("freeze_ms", "thaw_ms", "hold_overhead_ms")) + " |")
    return lines


def readme_table(r: dict) -> str:
    """Each figure's median, quiesce against the baseline and their ratio, at 1, 8 and 32
    targets (those of them that ran); the README quotes it."""
    lines = ratio_table(r, README_TARGETS)
    lines.append("")
    stall = r.get("stall")
    rows = {row["contender"]: row for row in (stall or {}).get("rows", ())}
    if {"quiesce", "quiesce-ftwrl", "baseline"} <= set(rows):
        q, f, b = rows["quiesce"], rows["quiesce-ftwrl"], rows["baseline"]
        lines.append(f"Behind a {stall['query_s']:g}-second MariaDB UPDATE, writers waited "
                     f"{q['stall_beyond_step_ms']:.0f} ms beyond the snapshot step with quiesce "
                     f"(BACKUP STAGE), {f['stall_beyond_step_ms']:.0f} ms with quiesce's FTWRL "
                     f"strategy (it refused the lock), and "
                     + (f"at least {b['stall_beyond_step_ms'] / 1000:.0f} s with the naive FTWRL "
                        f"baseline (the run cut it short; about "
                        f"{b.get('projected_stall_s') or 0:.0f} s otherwise)."
                        if b.get("capped") else
                        f"{b['stall_beyond_step_ms']:.0f} ms with the naive FTWRL baseline."))
        lines.append("")
    lock = {row["rows_per_transaction"]: row for row in (r.get("sqlite_lock") or {}).get("rows", ())}
    if lock:
        worst = max(lock.values(), key=lambda row: row["baseline"]["p99"] or 0)
        lines.append(f"Against a SQLite writer committing back to back, quiesce took the write "
                     f"lock in {worst['quiesce']['p99']:.0f} ms at p99 (SQLite's own busy "
                     f"handler: {worst['baseline']['p99']:.0f} ms), with "
                     f"{worst['rows_per_transaction']}-row transactions.")
        lines.append("")
    cycles = r["settings"]["cycles"]
    lines.append(f"Each cell: quiesce / baseline = ratio (medians of {cycles.get('1', '?')} cycles "
                 f"at 1 target down to {cycles.get(str(max(r['settings']['targets'])), '?')} at "
                 f"{max(r['settings']['targets'])}) on {r['machine']['cpus']} CPUs, "
                 f"{r['date'][:10]}; baseline: a shell script with the database's client kept "
                 f"open on a FIFO. Details, p95, every N from 1 to 32 and the scaling plot: "
                 f"[benchmarks/RESULTS.md](benchmarks/RESULTS.md).")
    return "\n".join(lines)


def render(r: dict) -> str:
    m = r["machine"]
    st = r["settings"]
    step_ms = st["step_s"] * 1000
    L: list[str] = []
    add = L.append
    add("# quiesce benchmarks: how long writers are blocked")
    add("")
    add(f"Generated by `benchmarks/run.py` ({r['mode']} mode; `make bench` runs the full one) "
        f"on {r['date']}, in {r['duration_s']:.0f} s. Raw figures: `results.json`.")
    if r["mode"] != "full":
        add("")
        add("**Quick mode: a few cycles, one target; a smoke test, not a measurement.**")
    add("")
    add("## Machine")
    add("")
    add("| | |")
    add("| --- | --- |")
    add(f"| CPU | {m['cpus']} × {m['cpu_model']} |")
    add(f"| memory | {m['memory']} |")
    add(f"| load average (1, 5, 15 min) at start / end | {m.get('load_start', '?')} / "
        f"{m.get('load_end', '?')} (at start: other work, which would share the CPUs with "
        f"the run; at the end the run's own servers and writers count too) |")
    add(f"| OS, kernel | {m['os']}, Linux {m['kernel']} |")
    add(f"| Python | {m['python']} |")
    add(f"| quiesce | {m['quiesce']} |")
    for kind in KIND_ORDER:
        if kind in r["versions"]:
            add(f"| {KIND_LABEL[kind]} | {r['versions'][kind]} |")
    for name, version in m["clients"].items():
        add(f"| baseline client `{name}` | {version} |")
    add("")
    add("## How it is measured")
    add("")
    add("For each database the harness starts its own servers (temporary directories, unix "
        "sockets, loopback), and for each configuration an **independent writer process** "
        "that commits small writes (one INSERT, or INCR for Redis) as fast as it can and notes "
        "when each commit completed (`time.monotonic()`: CLOCK_MONOTONIC, the same clock in "
        "every process). With several targets the writer commits to them in turn, so it is "
        "blocked whenever the target it is on is. A driver runs whole cycles as the Azure host "
        "does: `sh <pre-script>`, a snapshot step of a fixed "
        f"{step_ms:.0f} ms, `sh <post-script>`, noting when each script started and exited; "
        f"{st['gap_s'] * 1000:.0f} ms pass between cycles, and one warm-up cycle per "
        "configuration is not counted. No filesystem is frozen (the host would freeze them; "
        "here the step is a sleep), so the figures are the databases' side of the cycle. "
        "Cycles counted per configuration, by number of targets: "
        + ", ".join(f"N = {n}: {c}" for n, c in st["cycles"].items())
        + " (fewer where each cycle is long, to keep a full run near a quarter of an hour); "
        "every quiesce figure has its baseline from the same run, same servers, same writer.")
    add("")
    add("* **quiesce**: the pre-/post-scripts generated by `quiesce install azure --root <tmp> "
        "--log-dir <tmp>`, with a config of N targets (defaults: `timeout = 10`, "
        f"`max_hold = {st['max_hold_s']}`, runtime directory on tmpfs). quiesce's modules are "
        "byte-compiled first, as `pip install` leaves them (from a checkout, with "
        "`PYTHONDONTWRITEBYTECODE` set, each run would otherwise compile them again).")
    add("* **baseline**: `benchmarks/baseline/<kind>.sh pre|post`, POSIX sh, the way the best "
        "public samples do it: one client per target kept connected on a FIFO whose write end "
        "a keeper process holds open, the lock statement sent at pre, a marker after it awaited "
        "(so exit 0 means locked), the release sent at post. The keeper's lifetime "
        f"({st['max_hold_s']} s) is its watchdog.")
    add("")
    add("Figures (median / p95, milliseconds):")
    add("")
    add("* **freeze latency**: pre-script start → pre-script exit;")
    add("* **thaw latency**: post-script start → the writer's first commit after it (with N "
        "targets: until it has committed to every one of them);")
    add(f"* **hold overhead**: the longest gap between two commits in the cycle, minus the "
        f"{step_ms:.0f} ms step: how long writers waited beyond the snapshot itself.")
    add("")
    add("What a target is: SQLite — a database file; Redis, MariaDB — a server (CLIENT PAUSE, "
        "BACKUP STAGE and FTWRL are server-wide, so N databases of one server are one target); "
        "PostgreSQL — a cluster (CHECKPOINT and the backup API act on a cluster). N servers "
        "start from one initialised data directory, copied. Durability settings chosen so the "
        "writer commits every few microseconds to a few hundred: SQLite WAL with "
        "`synchronous=NORMAL`; MariaDB `innodb_flush_log_at_trx_commit=2`, `sync_binlog=0`; "
        "PostgreSQL `synchronous_commit=off`; Redis AOF `everysec`, no RDB save points (with "
        "save points quiesce also saves under the pause, which the baseline does not). The "
        "SQLite writer retries a locked database every 0.2 ms (SQLite has no lock queue and "
        "its own busy handler backs off to 100 ms sleeps); the servers queue a blocked writer "
        "and wake it when the lock goes.")
    add("")
    add("**PostgreSQL never blocks writers**, with quiesce or with the baseline: quiesce's "
        "default `checkpoint` mode holds nothing (the snapshot is atomic; CHECKPOINT only "
        "shortens recovery) and the backup API (`mode = \"backup\"`, and the baseline) does "
        "not block writes. So thaw latency and hold overhead do not exist for it and are "
        "reported as n/a; its freeze latency is still measured, for both modes, and the "
        "verification table shows the writer committing through every snapshot step.")
    add("")
    add("## Freeze latency (ms)")
    add("")
    add("Pre-script start → exit.")
    add("")
    L.extend(figure_table(r, "freeze_ms"))
    add("")
    add("## Thaw latency (ms)")
    add("")
    add("Post-script start → the writer's next commit on every target.")
    add("")
    L.extend(figure_table(r, "thaw_ms", na_note="n/a (never blocks)"))
    add("")
    add("## Hold overhead (ms)")
    add("")
    add(f"Longest gap between commits in the cycle − the {step_ms:.0f} ms snapshot step.")
    add("")
    L.extend(figure_table(r, "hold_overhead_ms", na_note="n/a (never blocks)"))
    add("")
    add("## quiesce against the baseline: ratios (medians, ms)")
    add("")
    add("The goals: hold overhead and thaw latency ≤ 1.0×, freeze latency ≤ 2.0× at "
        "32 targets.")
    add("")
    L.extend(ratio_table(r))
    add("")
    growth = growth_table(r)
    if growth:
        add("## How the figures grow with the number of targets (medians, ms)")
        add("")
        L.extend(growth)
        add("")
    add("### Where the hold overhead goes")
    add("")
    add("The longest gap starts at the writer's last commit before the lock and ends at its "
        "first commit after the release: (lock → pre-script exit) + step + thaw latency. For "
        "quiesce the holder's record splits the first part: from its first lock (the earliest "
        "target's `locked_at`) to the moment it told freeze \"ready\" (what the adapters do "
        "under the lock, then the state saved), and from \"ready\" to the pre-script's exit "
        "(freeze reads the holder's report, prints its own, exits).")
    add("")
    L.extend(lead_table(r))
    add("")
    add("### quiesce's phases inside the holder (median ms, slowest target)")
    add("")
    L.extend(phases_table(r))
    add("")
    add("## Did the hold really hold?")
    add("")
    add("For every cycle the harness checks the writer's record: no commit may complete between "
        "the pre-script's exit and the post-script's start (the snapshot step) when a lock is "
        "held. This also verifies the baseline scripts really hold their lock across the window. "
        "A commit the writer noted within 5 ms of the pre-script's exit counts as before it "
        "(the writer reads the clock after the database returned and can be descheduled in "
        "between; \"strict\" counts it anyway); a lock that does not hold lets thousands through.")
    add("")
    L.extend(verification_table(r))
    add("")
    L.extend(sqlite_lock_section(r))
    add("")
    s = r.get("stall")
    add("## Bounded stall: MariaDB behind a long write")
    add("")
    if s:
        add(f"A `{s['query_s']:g}`-second `UPDATE ... WHERE id = 1 AND SLEEP({s['query_s']:g}) = 0` "
            "is running (it holds its table open for writing) when freeze is called; the same "
            "writer commits to another table. FLUSH TABLES WITH READ LOCK must wait for the "
            "UPDATE, and every new write queues behind the waiting FTWRL. The harness does not "
            f"sit out the whole statement: {s['cap_s']:g} s into the baseline's pre-script it "
            "kills the UPDATE, FTWRL then gets its lock and the cycle completes.")
        add("")
        L.extend(stall_table(s))
        add("")
        add("quiesce's default on MariaDB is BACKUP STAGE: BLOCK_COMMIT does not wait for "
            "running statements, only blocks commits, so the long UPDATE does not delay the "
            "freeze and writers are blocked for the usual hold only. With `strategy = \"ftwrl\"` "
            "quiesce reads the process list first, sees a write running longer than "
            "`long_query_threshold` (1 s) and refuses without ever queueing the lock (it retries "
            "`lock_retries` times, a second apart, then fails; the host then takes a "
            "file-system-consistent snapshot and says so): writers are never blocked. The naive "
            "baseline blocks every writer from the moment FTWRL is sent until the long "
            "statement ends, before the snapshot can even start.")
    else:
        add("Not run (MariaDB not available, or `--no-stall`).")
    add("")
    import breakdown, memory, plot, rehearsal  # their sections (they import this module)
    for section in (plot.section, breakdown.table, memory.table, rehearsal.table):
        L.extend(section(r))
    add("## Where quiesce is slower than the baseline, and why")
    add("")
    found = slower(r)
    compared = sum(1 for metric in ("freeze_ms", "thaw_ms", "hold_overhead_ms")
                   for _, _, q, b in pairs(r)
                   if _median(q.get(metric)) is not None and b and _median(b.get(metric)) is not None)
    if found and len(found) == compared:
        one = [(_median(q.get("hold_overhead_ms")), _median(b.get("hold_overhead_ms")))
               for _, n, q, b in pairs(r) if n == 1 and b and q.get("hold_overhead_ms")
               and b.get("hold_overhead_ms")]
        span = ""
        if one:
            qs, bs = [a for a, _ in one], [b for _, b in one]
            span = (f": {min(qs):.0f}–{max(qs):.0f} ms per snapshot with one target, against "
                    f"{min(bs):.0f}–{max(bs):.0f} ms for the baseline")
        add(f"quiesce's median is higher than the baseline's on every figure, for every database "
            f"and every number of targets ({compared} comparisons in the tables above). For "
            f"writers, what matters is the hold overhead{span}. Why, and what would close "
            f"each gap:")
        add("")
    elif found:
        add("Rows where quiesce's median is higher:")
        add("")
        for name, label, n, qm, bm in found:
            add(f"* {name}, {label}, {n} target(s): {qm:.1f} ms against {bm:.1f} ms")
        add("")
    else:
        add("Nowhere in this run.")
        add("")
    wins = faster(r)
    if wins:
        add("Rows where quiesce's median is lower:")
        add("")
        for name, label, n, qm, bm in wins:
            add(f"* {name}, {label}, {n} target(s): {qm:.1f} ms against {bm:.1f} ms")
        add("")
    import goals  # imports this module
    L.extend(goals.section(r))
    L.extend(goals.limits_table(r))
    add("")
    add("### What the parts cost on this machine (median ms)")
    add("")
    add("| | ms |")
    add("| --- | ---: |")
    for label, ms in r.get("startup_ms", {}).items():
        add(f"| {label} | {ms:.1f} |")
    add("")
    add("## Not measured here")
    add("")
    add("* A real snapshot: in the cycles the step is a sleep and no filesystem is frozen; "
        "the host's polling and its freeze (of an idle loop filesystem, when run as root) "
        "are measured in *A whole host cycle* above, but a cloud disk snapshot's own capture "
        "time is the provider's and is not.")
    add("* A cold first run: one warm-up cycle per configuration is discarded, so the "
        "interpreter, the drivers and the clients come from the page cache; the first backup "
        "after a boot pays their reads from disk once.")
    add("* MySQL 8, MongoDB and PostgreSQL 18: no MySQL 8 or MongoDB server is installable "
        "here, and PostgreSQL is measured on 15 only (its backup API does not block writers "
        "in 18 either, so only the freeze latency could differ).")
    if _busy_at_start(m.get("load_start")):
        add(f"* An idle machine: other work was running when the run started (load average "
            f"{m['load_start']}) and shared the CPUs with it; medians are robust to a few "
            f"disturbed cycles, p95 less so.")
    add("")
    if r.get("skipped") or r.get("errors"):
        add("### Skipped in this run")
        add("")
        for s_ in r.get("skipped", []):
            add(f"* {s_['kind']}: skipped: {s_['reason']}")
        for e in r.get("errors", []):
            add(f"* {e['kind']}: harness error: {e['error']}")
        add("")
    problems = [(f, p) for f in r["figures"] for p in f.get("problems", [])]
    if problems:
        add("## Failed cycles")
        add("")
        for f, p in problems[:20]:
            text = " ".join(str(p).split())[:400]
            add(f"* {KIND_LABEL[f['kind']]}, {f['targets']} target(s), {f['label']}: {text}")
        add("")
    return "\n".join(L)
