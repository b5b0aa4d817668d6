"""How long a snapshot host's cycle blocks writers, and whose part each millisecond is.

``rehearse(host, kind, ...)`` installs quiesce for *host* under a staging root and plays
the host's part with the host's own rehearsal (``Host.rehearse``: the scripts run the way
the host runs them, with its polling, its filesystem freeze and a snapshot step) while the
independent writer commits to the kind's targets. Nothing of the host is replaced: its
poll interval is the one in the files ``quiesce install`` wrote. Per cycle:

* blocked in total   the writer's longest gap (its last commit before the lock to its
                     first commit after the release);
* quiesce's part     lock -> the freeze script's exit, plus the thaw script's start -> the
                     writer's first commit after it;
* the host's part    the freeze script's exit -> the thaw script's start: noticing the
                     exit (its poll), freezing, the snapshot step, thawing, starting the
                     thaw script.

The freeze script's exit is seen the moment it happens (a pidfd on the host's child
process); the host's own steps come from its timeline events. Adding a host is one entry
in ``HOSTS``: the events that mark its steps.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import harness
from report import KIND_LABEL, section_head


@dataclass(frozen=True)
class HostEvents:
    """The start of the host's timeline events that mark each step of its cycle, and
    where its poll interval is set (a JSON file the install writes, and the key)."""

    freeze_script: str      # the host starts the script that freezes the databases
    noticed: str            # the host noticed that script's end (after its poll)
    thaw_script: str        # the host starts the script that releases them
    poll_setting: tuple[str, str] | None = None


GAP = 0.15  # seconds between rehearsals, so the writer runs freely in between
HOSTS = {
    "azure": HostEvents(freeze_script="pre-script started",
                        noticed="host noticed the pre-script's end",
                        thaw_script="post-script started",
                        poll_setting=("/etc/azure/VMSnapshotScriptPluginConfig.json",
                                      "ScriptsExecutionPollTimeSeconds")),
}


def set_poll(host, events: HostEvents, seconds: int | None) -> int | None:
    """Set the installed poll interval to *seconds* (None: keep it); the one in effect."""
    if events.poll_setting is None:
        return None
    path, key = host.path(events.poll_setting[0]), events.poll_setting[1]
    with open(path) as f:
        data = json.load(f)
    if seconds is not None:
        data[key] = seconds
        with open(path, "w") as f:  # the same file: its owner and mode stay
            json.dump(data, f, indent=2)
    return data.get(key)


def _children() -> set[int]:
    found = set()
    for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            pass
    return found


class ChildExits(threading.Thread):
    """When each process this one starts from now on exits, noted the moment it does."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen = _children()
        self.started: dict[int, float] = {}
        self.exits: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        fds: dict[int, int] = {}
        try:
            while not self.done.is_set():
                for pid in _children() - self.seen:
                    self.seen.add(pid)
                    try:
                        fds[os.pidfd_open(pid)] = pid
                        self.started[pid] = time.monotonic()
                    except OSError:  # gone already: too short to matter here
                        pass
                readable, _, _ = select.select(list(fds), [], [], 0.001)
                for fd in readable:
                    self.exits[fds.pop(fd)] = time.monotonic()
                    os.close(fd)
        finally:
            for fd in fds:
                os.close(fd)

    def first_exit_after(self, moment: float) -> float | None:
        """The exit of the first process started after *moment*."""
        pids = sorted((t, pid) for pid, t in self.started.items() if t >= moment)
        return self.exits.get(pids[0][1]) if pids else None


def loop_mount(stack) -> tuple[str | None, str]:
    """A small ext4 filesystem on a loop device for the host to freeze (root only), torn
    down with *stack*; or None and why not. Never any other filesystem."""
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        return None, "not root, or no loop devices: the host's freeze is left out"
    try:
        from tests.support.loopfs import LoopFactory
        factory = LoopFactory()
        stack.callback(factory.cleanup)
        return str(factory("ext4", 64).mountpoint), "an idle 64 MiB ext4 loop filesystem"
    except BaseException as e:  # also pytest's skip, which loopfs raises for a missing tool
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return None, f"no loop filesystem ({e}): the host's freeze is left out"


def one_cycle(host, events: HostEvents, step: float, mount: str | None) -> dict:
    """One rehearsal: the host's report, its events' times and the freeze script's exit."""
    from quiesce.hosts import Rehearsal
    from quiesce.snapshot import SnapshotStep
    marks: dict[str, float] = {}
    names = {"freeze_script": events.freeze_script, "noticed": events.noticed,
             "thaw_script": events.thaw_script}

    def on_event(_t: float, text: str) -> None:
        now = time.monotonic()
        for key, prefix in names.items():
            if text.startswith(prefix):
                marks.setdefault(key, now)
    exits = ChildExits()
    exits.start()
    try:
        report = host.rehearse(Rehearsal(snapshot=SnapshotStep(wait=step),
                                         freeze_mounts=[mount] if mount else [],
                                         freeze_deadline=60, on_event=on_event))
    finally:
        exits.done.set()
        exits.join()
    if "freeze_script" in marks:
        marks["freeze_exit"] = exits.first_exit_after(marks["freeze_script"])
    return {"report": report, "marks": marks}


def split(cycle: dict, times, which, n: int, until: float) -> dict | None:
    """Whose part of the writers' wait each millisecond of one rehearsal was (ms)."""
    marks, report = cycle["marks"], cycle["report"]
    if report.get("code") != 0 or any(marks.get(k) is None for k in
                                      ("freeze_script", "freeze_exit", "noticed", "thaw_script")):
        return None
    c = harness.Cycle(marks["freeze_script"], marks["freeze_exit"], marks["thaw_script"],
                      pre_rc=0, post_rc=0)
    f = harness.cycle_figures(c, times, which, n, until)
    if f.thaw is None or not f.max_gap > 0:
        return None
    snapshot = (report.get("snapshot") or {}).get("duration") or 0.0
    frozen = (report.get("freeze") or {}).get("frozen_for") or 0.0
    host = marks["thaw_script"] - marks["freeze_exit"]
    poll = marks["noticed"] - marks["freeze_exit"]
    # lock -> exit from the gap, not from the commit before it: a writer descheduled
    # between its commit and reading the clock notes that commit after the exit.
    lead = max(0.0, f.max_gap - host - f.thaw)
    parts = {"quiesce_freeze": lead, "host_poll": poll,
             "host_fs_freeze_thaw": max(0.0, frozen - snapshot) if frozen else 0.0,
             "host_snapshot": snapshot, "quiesce_thaw": f.thaw}
    parts["host_other"] = host - poll - parts["host_fs_freeze_thaw"] - snapshot
    out = {k: round(v * 1000, 2) for k, v in parts.items()}
    out.update(blocked=round(f.max_gap * 1000, 2), quiesce=round((lead + f.thaw) * 1000, 2),
               host=round(host * 1000, 2), held=f.commits_in_hold == 0)
    return out


def failure(cycle: dict) -> str:
    """Why a rehearsal gave no figures: the host's result, its last events, missing marks."""
    report = cycle["report"]
    missing = [k for k in ("freeze_script", "freeze_exit", "noticed", "thaw_script")
               if cycle["marks"].get(k) is None]
    events = "; ".join(e["event"] for e in report.get("timeline", [])[-4:])
    return (f"host result {report.get('code')} {report.get('message', '')}"
            + (f"; not seen: {', '.join(missing)}" if missing else "") + f"; last events: {events}")


def rehearse(host_name: str, kind, n: int, cycles: int, step: float, workdir: Path,
             shm_root: Path, *, poll: int | None = None, progress=print) -> dict:
    """*cycles* rehearsals of *host_name* (plus a warm-up) on *n* targets of *kind*, with
    the host's poll interval as installed or, given *poll*, set to that."""
    from contextlib import ExitStack
    from quiesce.hosts import get_host
    events = HOSTS[host_name]
    variant = next(v for v in kind.variants() if v.tool == "quiesce")
    work = Path(tempfile.mkdtemp(prefix=f"{kind.name}-{host_name}-", dir=workdir))
    shm = Path(tempfile.mkdtemp(prefix=f"quiesce-bench-{host_name}-", dir=shm_root))
    setup = harness.QuiesceSetup(work, kind.quiesce_toml(n, variant), shm=shm, host=host_name)
    host = get_host(host_name, root=str(setup.root))
    result = {"host": host_name, "kind": kind.name, "variant": variant.name, "targets": n,
              "step_s": step, "poll_s": set_poll(host, events, poll),
              "poll_as_installed": poll is None}
    done = []
    with ExitStack() as stack:
        mount, result["freeze"] = loop_mount(stack)
        writer = harness.Writer(kind.name, kind.writer_targets(n), work)
        try:
            for _ in range(cycles + 1):
                done.append(one_cycle(host, events, step, mount))
                time.sleep(GAP)
        finally:
            try:
                setup.cleanup()
            finally:
                times, which, problem = writer.stop()
    starts = [c["marks"].get("freeze_script", 0.0) for c in done] + [float("inf")]
    rows = [split(c, times, which, n, starts[i + 1]) for i, c in enumerate(done)][1:]
    good = [r for r in rows if r]
    problems = [failure(c) for c, r in zip(done[1:], rows) if r is None] + [problem]
    result.update(cycles=len(rows), ok_cycles=len(good), held_cycles=sum(r["held"] for r in good),
                  per_cycle=good, problems=[p for p in problems if p][:3],
                  codes=[c["report"].get("code") for c in done[1:]],
                  median_ms={k: round(statistics.median(r[k] for r in good), 1)
                             for k in good[0] if k != "held"} if good else {})
    progress(f"  {kind.name:<10} N={n:<3} {host_name} rehearsal (poll {result['poll_s']} s): ok {len(good)}/{len(rows)}  "
             f"blocked {result['median_ms'].get('blocked', float('nan')):.0f} ms, quiesce "
             f"{result['median_ms'].get('quiesce', float('nan')):.0f} ms, host "
             f"{result['median_ms'].get('host', float('nan')):.0f} ms")
    return result


PARTS = (("quiesce_freeze", "quiesce: lock → freeze script's exit"),
         ("host_poll", "host: noticing the exit (its poll)"),
         ("host_fs_freeze_thaw", "host: filesystem freeze and thaw"),
         ("host_snapshot", "host: snapshot step"),
         ("host_other", "host: the rest, up to starting the thaw script"),
         ("quiesce_thaw", "quiesce: thaw script's start → writable"))


def poll_cell(h: dict) -> str:
    return f"{h.get('poll_s', '?')}" + ("" if h.get("poll_as_installed", True) else " (set)")


def table(r: dict) -> list[str]:
    """RESULTS.md's section: one row per host and kind, then what it means."""
    found = r.get("rehearsals") or []
    lines = section_head(
        "A whole host cycle: whose part of the writers' wait",
        "The host's own rehearsal (`Host.rehearse`, what `quiesce rehearse` runs) plays its "
        "part: the scripts run the way the host runs them, with the poll interval `quiesce "
        "install` configured, around the host's filesystem freeze and a snapshot step; the "
        "independent writer commits meanwhile. *Blocked* is the writer's longest gap; "
        "quiesce's part is lock → the freeze script's exit plus the thaw script's start → "
        "writable; the host's part is everything in between (the freeze script's exit is "
        "taken from a pidfd, the host's steps from its timeline). Medians, ms.", found)
    if not found:
        return lines
    lines += ["| host | poll (s) | database | targets | cycles ok, held | blocked (min–max) | "
              + " | ".join(label for _, label in PARTS) + " | host's share |",
              "| --- | ---: | --- | ---: | ---: | ---: | "
              + " | ".join("---:" for _ in PARTS) + " | ---: |"]
    for h in found:
        m = h.get("median_ms") or {}
        if not m:
            lines.append(f"| {h['host']} | {poll_cell(h)} | {KIND_LABEL[h['kind']]} | "
                         f"{h['targets']} | 0/{h.get('cycles', 0)} | no good cycle |"
                         + " |" * (len(PARTS) + 1))
            continue
        blocked = [c["blocked"] for c in h["per_cycle"]]
        lines.append(f"| {h['host']} | {poll_cell(h)} | {KIND_LABEL[h['kind']]} | "
                     f"{h['targets']} | {h['ok_cycles']}/{h['cycles']}, {h['held_cycles']} | {m['blocked']:.0f} "
                     f"({min(blocked):.0f}–{max(blocked):.0f}) | "
                     + " | ".join(f"{m[k]:.1f}" for k, _ in PARTS)
                     + f" | {100 * m['host'] / m['blocked']:.0f} % |")
    lines += ["", "Filesystem frozen by the host here: "
              + "; ".join(sorted({f"{h['host']}: {h['freeze']}" for h in found})) + ".", ""]
    azure = [h for h in found if h["host"] == "azure" and h.get("median_ms")
             and h.get("poll_as_installed", True)]
    if azure:
        share = min(100 * h["median_ms"]["host"] / h["median_ms"]["blocked"] for h in azure)
        poll = [c["host_poll"] for h in azure for c in h["per_cycle"]]
        ours = max(h["median_ms"]["quiesce"] for h in azure)
        lines += [f"With Azure, the host's part dominates: at least {share:.0f} % of the time "
                  f"writers wait is the host's, and quiesce's part is at most {ours:.0f} ms "
                  f"(median). Most of the host's part is noticing the pre-script's exit: "
                  f"{min(poll):.0f}–{max(poll):.0f} ms here. The extension (as the rehearsal "
                  "plays it, from its source) has two loops that each sleep "
                  "`ScriptsExecutionPollTimeSeconds` (1 s as installed; 3 s is the "
                  "extension's default): the script runner checks its child once per interval "
                  "and the plugin host checks the script runner once per interval, so the "
                  "exit is noticed up to two intervals after it happens. That interval is "
                  "the operator's setting to tune; quiesce's part is not. *The rest* is the "
                  "rehearsal's own work between the snapshot and the post-script (its freeze "
                  "watchdog, its threads): the real extension's differs.", ""]
    for h in found:
        if not h.get("poll_as_installed", True) and h.get("median_ms"):
            lines += [f"With the poll set to {h['poll_s']} s, {KIND_LABEL[h['kind']]}'s writers "
                      f"wait {h['median_ms']['blocked']:.0f} ms per cycle (median), "
                      f"{h['median_ms']['host_poll']:.0f} ms of it for the host to notice the "
                      f"pre-script's exit.", ""]
    return lines
