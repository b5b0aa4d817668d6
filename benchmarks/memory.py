"""The holder's memory while it holds: VmRSS and VmHWM from /proc/<pid>/status.

For a kind and a number of targets, run the real Azure pre-script (quiesce freeze), read
the holder's status while every target is held, then the post-script. The holder is the
process that keeps every session open for the whole hold, so its resident set is what a
backup costs the machine in memory; processes it started (a stand-in watchdog) are
reported beside it.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import harness
from report import KIND_LABEL, section_head


GOAL_MIB = 60e6 / 2**20  # the 60 MB for the holder at 32 targets, in MiB


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of *pid* in KiB; empty if it is gone."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return found


def descendants(pid: int) -> list[int]:
    """Every process started by *pid*, and by those, and so on."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += children
            queue += children
    return found


def sample(setup: harness.QuiesceSetup, log) -> dict | None:
    """One freeze, the holder's memory while it holds, one thaw."""
    _, _, pre_rc = harness.run_script(setup.pre, setup.env, setup.workdir, log)
    try:
        pid = setup.state().get("holder_pid")
        if pre_rc != 0 or not isinstance(pid, int):
            return None
        holder = status_kib(pid)
        others = [status_kib(child).get("VmRSS", 0) for child in descendants(pid)]
        return {"rss_kib": holder.get("VmRSS"), "hwm_kib": holder.get("VmHWM"),
                "children": len(others), "children_rss_kib": sum(others)}
    finally:
        harness.run_script(setup.post, setup.env, setup.workdir, log)
        setup.settle()


def measure(kind, n: int, samples: int, workdir: Path, shm_root: Path) -> dict:
    """The holder's memory for *n* targets of *kind* (median RSS, highest peak, in MiB)."""
    variant = next(v for v in kind.variants() if v.tool == "quiesce")
    work = Path(tempfile.mkdtemp(prefix=f"{kind.name}-memory-{n}-", dir=workdir))
    shm = Path(tempfile.mkdtemp(prefix=f"quiesce-bench-memory-{n}-", dir=shm_root))
    setup = harness.QuiesceSetup(work, kind.quiesce_toml(n, variant), shm=shm)
    taken = []
    try:
        with open(work / "scripts.log", "ab") as log:
            for _ in range(samples + 1):  # the first one warms the page cache
                taken.append(sample(setup, log))
    finally:
        setup.cleanup()
    good = [s for s in taken[1:] if s and s["rss_kib"]]
    result = {"kind": kind.name, "variant": variant.name, "targets": n, "samples": len(good)}
    if not good:
        result["error"] = "no freeze succeeded: " + " ".join(setup.failure().split())[:300]
        return result
    mib = 1024.0
    result.update(
        rss_mib=round(statistics.median(s["rss_kib"] for s in good) / mib, 1),
        hwm_mib=round(max(s["hwm_kib"] or 0 for s in good) / mib, 1),
        children=max(s["children"] for s in good),
        children_rss_mib=round(statistics.median(s["children_rss_kib"] for s in good) / mib, 1))
    return result


def table(r: dict) -> list[str]:
    """RESULTS.md's section on the holder's memory."""
    rows = r.get("memory") or []
    lines = section_head(
        "Holder memory", "The holder's resident set while every target is held (`VmRSS` from "
        "`/proc/<pid>/status`, median of the samples) and its peak over the whole freeze "
        "(`VmHWM`), after one warm-up freeze; beside it, what the processes it started (its "
        "stand-in watchdog) hold. Goal: under 60 MB (57.2 MiB) at 32 targets.", rows)
    if not rows:
        return lines
    lines += ["| database | targets | holder RSS (MiB) | holder peak (MiB) | "
              "its child processes: count, RSS (MiB) | samples | goal at 32 |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for m in rows:
        if m.get("error"):
            lines.append(f"| {KIND_LABEL[m['kind']]} | {m['targets']} | {m['error']} | | | 0 | |")
            continue
        goal = "" if m["targets"] != 32 else "met" if m["hwm_mib"] < GOAL_MIB else "**missed**"
        lines.append(f"| {KIND_LABEL[m['kind']]} | {m['targets']} | {m['rss_mib']:.1f} | "
                     f"{m['hwm_mib']:.1f} | {m['children']}, {m['children_rss_mib']:.1f} | "
                     f"{m['samples']} | {goal} |")
    return lines + [""]
