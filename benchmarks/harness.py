"""Running cycles and reading the writer's record.

A *cycle* is what the snapshot host does: run the pre-script (``sh <script>``), take the
snapshot (here: sleep for a fixed step), run the post-script. The driver notes, on
CLOCK_MONOTONIC, when each script started and exited; the independent writer (writer.py)
notes when each of its commits completed. Every figure comes from those two records:

* freeze latency   pre-script start -> pre-script exit;
* thaw latency     post-script start -> the first commit after it (with several targets:
                   the first commit after it on *every* target, i.e. until all are writable);
* hold overhead    the longest gap between two commits in the cycle, minus the step;
* held             no commit completed between the pre-script's exit and the post-script's
                   start (the databases really were quiesced while the "snapshot" ran).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WRITER = HERE / "writer.py"
MAX_HOLD = 120          # seconds: quiesce's max_hold and the baseline's keeper/pause timeout
#: A commit the writer noted this soon after the pre-script's exit still counts as before
#: it: the writer reads the clock after the database returned, and on a busy machine it can
#: be descheduled in between. A lock that does not hold lets through thousands of commits.
HOLD_SLACK = 0.005
SCRIPT_TIMEOUT = 900    # seconds: a script that runs longer is a harness failure
#: One target's line in a freeze/thaw report: "  ok      name (kind) phase    1.2 ms".
_OUTCOME = re.compile(r"^  \S+\s+\S+ \(\S+\)\s+(check|flush|quiesce|thaw)\s+([\d.]+) ms")
#: The ISO-8601 time the generated scripts put in front of every line they log.
_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)? ")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ------------------------------------------------------------------ processes and clocks

def alive(pid: int) -> bool:
    """The process runs; a zombie (exited, waiting to be reaped) does not count."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(")") + 2:][:1] not in ("Z", "X", "")


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until every pid has exited; the ones still running after *timeout*."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        left = [p for p in left if alive(p)]
    return left


def script_env(extra_path: str = "") -> dict[str, str]:
    """A host-like environment: a system PATH, nothing inherited from the harness."""
    path = f"{extra_path}:{SYSTEM_PATH}" if extra_path else SYSTEM_PATH
    return {"PATH": path, "LANG": "C", "LC_ALL": "C", "HOME": os.environ.get("HOME", "/root")}


# ----------------------------------------------------------------------------- the writer

class Writer:
    """The independent writer process (writer.py) and its record."""

    def __init__(self, kind: str, targets: list[dict], workdir: Path):
        self.prefix = str(workdir / "commits")
        self.err = open(workdir / "writer.err", "wb")
        spec = json.dumps({"kind": kind, "targets": targets})
        self.proc = subprocess.Popen([sys.executable, "-B", str(WRITER), spec, self.prefix],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.err)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the writer did not start: {self.error_text()}")

    def error_text(self) -> str:
        self.err.flush()
        with open(self.err.name, "rb") as f:
            return f.read().decode(errors="replace")[-2000:].strip() or "(no output)"

    def stop(self, timeout: float = 30) -> tuple[array, array, str | None]:
        """Stop it and read its record: (times, target indexes, problem or None)."""
        problem = None
        if self.proc.poll() is not None:
            problem = f"the writer died during the run (status {self.proc.returncode}): " \
                      f"{self.error_text()}"
        else:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                problem = f"the writer was still blocked {timeout:g} s after it was told to stop"
        self.proc.stdout.close()
        self.err.close()
        times, which = array("d"), array("H")
        with open(self.prefix + ".t", "rb") as f:
            times.frombytes(f.read())
        with open(self.prefix + ".i", "rb") as f:
            which.frombytes(f.read())
        n = min(len(times), len(which))
        return times[:n], which[:n], problem


# --------------------------------------------------------------------- the two contenders

class QuiesceSetup:
    """A quiesce config for some targets, installed for a host (Azure unless told) under a
    staging root. The cycles run Azure's pre-/post-scripts; other hosts are rehearsed."""

    tool = "quiesce"

    def __init__(self, workdir: Path, targets_toml: str, *, shm: Path, host: str = "azure"):
        self.workdir = workdir
        self.runtime_dir = shm / "run"
        self.logs = workdir / "log"
        self.root = workdir / "root"
        self.config = workdir / "quiesce.toml"
        self.config.write_text(f"max_hold = {MAX_HOLD}\nruntime_dir = \"{self.runtime_dir}\"\n"
                               f"log_file = \"{self.logs}/quiesce.log\"\n\n{targets_toml}")
        self.config.chmod(0o600)
        proc = subprocess.run([sys.executable, "-m", "quiesce", "--config", str(self.config),
                               "install", host, "--root", str(self.root),
                               "--log-dir", str(self.logs)],
                              capture_output=True, text=True, cwd=workdir)
        if proc.returncode != 0:
            raise RuntimeError(f"quiesce install {host} failed: {proc.stdout}{proc.stderr}")
        self.pre = ["sh", str(self.root / "etc/azure/quiesce-pre-script.sh")]
        self.post = ["sh", str(self.root / "etc/azure/quiesce-post-script.sh")]
        self.env = script_env()

    def state(self) -> dict:
        try:
            return json.loads((self.runtime_dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def settle(self) -> str | None:
        """After a cycle: wait for the holder to exit (the next freeze needs its lock)."""
        pid = self.state().get("holder_pid")
        if isinstance(pid, int) and wait_gone([pid], 15):
            return f"the holder (pid {pid}) was still running 15 s after thaw"
        return None

    def marks(self) -> tuple[float, float]:
        """The holder's first lock and its "ready", from its record (wall clock, kept with
        microseconds), on time.monotonic()'s clock like every other time here."""
        state = self.state()
        offset = time.time() - time.monotonic()
        first, ready = state.get("held_since"), state.get("frozen_at")
        return (first - offset if isinstance(first, float) else math.nan,
                ready - offset if isinstance(ready, float) else math.nan)

    def phase_medians(self, skip: int = 1) -> dict[str, float]:
        """Median time of each phase per cycle (the slowest target's, as they run
        concurrently), from the reports the scripts logged; the first *skip* are warm-up."""
        per_phase: dict[str, list[float]] = {}
        for name in ("azure-pre-script.log", "azure-post-script.log"):
            try:
                text = (self.logs / name).read_text(errors="replace")
            except OSError:
                continue
            blocks: list[dict[str, float]] = []
            for line in text.splitlines():
                line = _STAMP.sub("", line, count=1)
                if line and not line[0].isspace():
                    blocks.append({})
                    continue
                m = _OUTCOME.match(line)
                if m and blocks:
                    phase, ms = m.group(1), float(m.group(2))
                    blocks[-1][phase] = max(blocks[-1].get(phase, 0.0), ms)
            for block in blocks[skip:]:
                for phase, ms in block.items():
                    per_phase.setdefault(phase, []).append(ms)
        return {phase: round(statistics.median(v), 1) for phase, v in per_phase.items()}

    def failure(self) -> str:
        """What the scripts logged, for a failed cycle."""
        parts = []
        for name in ("azure-pre-script.log", "azure-post-script.log"):
            path = self.logs / name
            if path.exists():
                parts.append(f"{name}: " + path.read_text(errors="replace")[-1500:].strip())
        return "\n".join(parts)

    def cleanup(self) -> None:
        """Release anything still held (an interrupted run): the post-script is idempotent."""
        if self.state().get("phase") not in (None, "released"):
            subprocess.run(self.post, env=self.env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        self.settle()


class BaselineSetup:
    """The shell baseline for some targets: benchmarks/baseline/<kind>.sh pre|post."""

    tool = "baseline"

    def __init__(self, workdir: Path, script: str, args: list[str], *, shm: Path,
                 extra_path: str = ""):
        self.state_dir = shm / "baseline"
        script_path = str(HERE / "baseline" / script)
        common = [str(self.state_dir), str(MAX_HOLD), *args]
        self.pre = ["sh", script_path, "pre", *common]
        self.post = ["sh", script_path, "post", *common]
        self.env = script_env(extra_path)
        self.workdir = workdir
        self.last_output = ""

    def marks(self) -> tuple[float, float]:
        return math.nan, math.nan  # no holder: the shell's clients keep no record

    def _pids(self) -> list[int]:
        pids = []
        for state in (self.state_dir, Path(f"{self.state_dir}.done")):
            for path in state.glob("*/*"):
                if path.name in ("client", "keeper"):
                    try:
                        pids.append(int(path.read_text().split()[0]))
                    except (OSError, ValueError, IndexError):
                        pass
        return pids

    def settle(self) -> str | None:
        """After a cycle: every client and keeper has exited (else: end them, and say so)."""
        left = wait_gone(self._pids(), 10)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        return f"baseline processes {left} were still running 10 s after post" if left else None

    def failure(self) -> str:
        parts = []
        for state in (self.state_dir, Path(f"{self.state_dir}.done")):
            for out in sorted(state.glob("*/out"))[:3]:
                parts.append(f"{out}: {out.read_text(errors='replace')[-500:].strip()}")
        return "\n".join(parts)

    def cleanup(self) -> None:
        if self.state_dir.exists():
            subprocess.run(self.post, env=self.env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        for pid in self._pids():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------- cycles

@dataclass
class Cycle:
    pre_start: float
    pre_end: float = math.nan
    post_start: float = math.nan
    post_end: float = math.nan
    pre_rc: int | None = None
    post_rc: int | None = None
    problem: str | None = None
    warmup: bool = False
    #: quiesce only, from the holder's record, on this clock: its first lock (the earliest
    #: target's locked_at) and the moment it told freeze "ready" (state's frozen_at)
    first_lock: float = math.nan
    ready: float = math.nan

    @property
    def ok(self) -> bool:
        return self.pre_rc == 0 and self.post_rc == 0 and self.problem is None


def wait_exit(proc: subprocess.Popen, timeout: float | None) -> bool:
    """Wait until *proc* exits (True) or *timeout* passes (False), noticing the exit at once.

    Not ``Popen.wait(timeout)``: that polls with sleeps growing to 50 ms, so it notices an
    exit up to 50 ms late, which would add to every freeze latency measured here. A pidfd
    becomes readable the moment the process exits.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): the polling wait
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def run_script(argv: list[str], env: dict, cwd: Path, log, timeout: float = SCRIPT_TIMEOUT
               ) -> tuple[float, float, int | None]:
    """Run a script as the host does (``sh FILE args``): (start, exit, status)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT)
    exited = wait_exit(proc, timeout)
    end = time.monotonic()
    if not exited:
        proc.kill()
    rc = proc.wait()
    return start, end, rc if exited else None


def run_cycle(setup, step: float, log, *, warmup: bool = False) -> Cycle:
    pre_start, pre_end, pre_rc = run_script(setup.pre, setup.env, setup.workdir, log)
    cycle = Cycle(pre_start, pre_end, pre_rc=pre_rc, warmup=warmup)
    cycle.first_lock, cycle.ready = setup.marks()
    time.sleep(max(0.0, step - (time.monotonic() - pre_end)))  # the snapshot step
    cycle.post_start, cycle.post_end, cycle.post_rc = run_script(setup.post, setup.env,
                                                                 setup.workdir, log)
    cycle.problem = setup.settle()
    if not cycle.ok and not cycle.problem:
        cycle.problem = (f"pre-script exit {pre_rc}, post-script exit {cycle.post_rc}: "
                         f"{setup.failure()}")
    return cycle


# ------------------------------------------------------------------------------- analysis

@dataclass
class CycleFigures:
    freeze: float
    post: float
    thaw: float | None          # None: some target had no commit after the post-script
    max_gap: float
    commits_in_hold: int              # noted after pre-exit + HOLD_SLACK, before post-start
    commits_in_hold_strict: int       # noted after pre-exit, before post-start
    locked_before_exit: float | None  # the longest gap's start -> the pre-script's exit
    lock_to_ready: float | None       # quiesce: the holder's first lock -> its "ready"
    ready_to_exit: float | None       # quiesce: its "ready" -> the pre-script's exit


def cycle_figures(c: Cycle, times: array, which: array, n: int, until: float) -> CycleFigures:
    """The figures of one cycle from the writer's record (*until*: the next cycle's start)."""
    lo = max(bisect_right(times, c.pre_start) - 1, 0)
    first: dict[int, float] = {}
    j = bisect_right(times, c.post_start)
    while j < len(times) and times[j] < until and len(first) < n:
        first.setdefault(which[j], times[j])
        j += 1
    thaw = max(first.values()) - c.post_start if len(first) == n else None
    end = min(j, len(times))
    at = max(range(lo, end - 1), key=lambda k: times[k + 1] - times[k], default=None)
    gap = times[at + 1] - times[at] if at is not None else math.nan
    lead = c.pre_end - times[at] if at is not None and times[at] < c.pre_end else None
    until_post = bisect_left(times, c.post_start)
    in_hold = until_post - bisect_right(times, c.pre_end + HOLD_SLACK)
    strict = until_post - bisect_right(times, c.pre_end)
    def span(a: float, b: float) -> float | None:
        return b - a if math.isfinite(a) and math.isfinite(b) else None
    return CycleFigures(c.pre_end - c.pre_start, c.post_end - c.post_start, thaw, gap,
                        max(0, in_hold), max(0, strict), lead, span(c.first_lock, c.ready),
                        span(c.ready, c.pre_end))


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def stats_ms(values: list[float | None]) -> dict[str, Any] | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    ms = [v * 1000 for v in values]
    return {"median": round(percentile(ms, 0.5), 2), "p95": round(percentile(ms, 0.95), 2),
            "min": round(min(ms), 2), "max": round(max(ms), 2), "n": len(ms)}


@dataclass
class Figure:
    """One configuration's result: a kind, a number of targets, a contender."""

    kind: str
    label: str
    variant: str
    tool: str
    targets: int
    step_s: float
    blocks_writers: bool
    cycles: int = 0
    ok_cycles: int = 0
    warmup_cycles: int = 0
    held_cycles: int = 0
    freeze_ms: dict | None = None
    post_ms: dict | None = None
    thaw_ms: dict | None = None
    hold_overhead_ms: dict | None = None
    locked_before_exit_ms: dict | None = None
    lock_to_ready_ms: dict | None = None   # quiesce: the holder's first lock -> "ready"
    ready_to_exit_ms: dict | None = None   # quiesce: "ready" -> the pre-script's exit
    max_gap_ms: dict | None = None
    commits_in_hold: dict | None = None
    phases_ms: dict | None = None
    #: Every counted cycle's own figures, in order (None where a cycle failed).
    per_cycle: dict = field(default_factory=dict)
    writer: dict = field(default_factory=dict)
    verdict: str = ""
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def commit_interval_us(times: array, cycles: list[Cycle]) -> float | None:
    """The writer's median time between commits outside every cycle: its resolution."""
    gaps: list[float] = []
    edges = [-math.inf] + [t for c in cycles for t in (c.pre_start - 0.05, c.post_end + 0.05)]
    edges.append(math.inf)
    for a, b in zip(edges[0::2], edges[1::2]):  # the stretches between cycles
        lo, hi = bisect_right(times, a), bisect_left(times, b)
        gaps += [times[k + 1] - times[k] for k in range(lo, max(lo, hi - 1))]
    return round(percentile(gaps, 0.5) * 1e6, 1) if gaps else None


def summarise(fig: Figure, cycles: list[Cycle], times: array, which: array,
              writer_problem: str | None) -> Figure:
    measured = [c for c in cycles if not c.warmup]
    fig.cycles = len(measured)
    fig.warmup_cycles = len(cycles) - len(measured)
    ok = [c for c in measured if c.ok]
    fig.ok_cycles = len(ok)
    fig.problems = [c.problem for c in measured if c.problem][:3]
    if writer_problem:
        fig.problems.append(writer_problem)
    starts = [c.pre_start for c in cycles] + [math.inf]
    figures = []
    for c in ok:
        until = min((s for s in starts if s > c.post_start), default=math.inf)
        figures.append(cycle_figures(c, times, which, fig.targets, until))
    step = fig.step_s
    fig.freeze_ms = stats_ms([f.freeze for f in figures])
    fig.post_ms = stats_ms([f.post for f in figures])
    fig.max_gap_ms = stats_ms([f.max_gap for f in figures])
    holds = [f.commits_in_hold for f in figures]
    if holds:
        fig.commits_in_hold = {"min": min(holds), "max": max(holds),
                               "strict_max": max(f.commits_in_hold_strict for f in figures)}

    def ms(value):
        return round(value * 1000, 2) if value is not None and math.isfinite(value) else None
    fig.per_cycle = {
        "freeze_ms": [ms(f.freeze) for f in figures],
        "thaw_ms": [ms(f.thaw) for f in figures] if fig.blocks_writers else [],
        "hold_overhead_ms": [ms(f.max_gap - step) for f in figures] if fig.blocks_writers else [],
        "commits_in_hold": holds,
        "commits_in_hold_strict": [f.commits_in_hold_strict for f in figures],
    }
    fig.held_cycles = sum(1 for h in holds if h == 0)
    if fig.blocks_writers:
        fig.thaw_ms = stats_ms([f.thaw for f in figures])
        fig.hold_overhead_ms = stats_ms([f.max_gap - step for f in figures])
        fig.locked_before_exit_ms = stats_ms([f.locked_before_exit for f in figures])
        fig.lock_to_ready_ms = stats_ms([f.lock_to_ready for f in figures])
        fig.ready_to_exit_ms = stats_ms([f.ready_to_exit for f in figures])
        if not figures:
            fig.verdict = "no successful cycle"
        elif fig.held_cycles == len(figures):
            fig.verdict = "held: the writer was blocked through every snapshot step"
        else:
            fig.verdict = (f"NOT HELD in {len(figures) - fig.held_cycles} of {len(figures)} "
                           f"cycles: the writer committed while the snapshot ran")
    else:
        fig.verdict = ("never blocks writers (by design): the writer committed through every "
                       "snapshot step" if figures and fig.held_cycles == 0 else
                       "writers were blocked in some cycles" if figures else
                       "no successful cycle")
    span = (times[-1] - times[0]) if len(times) > 1 else 0
    fig.writer = {"commits": len(times),
                  "commits_per_s": round(len(times) / span) if span else None,
                  "median_commit_interval_us": commit_interval_us(times, cycles)}
    return fig


def measure(kind, variant, n: int, cycles: int, step: float, gap: float, workdir: Path,
            shm_root: Path, progress=print) -> Figure:
    """Run *cycles* cycles (plus one warm-up) of *variant* on *n* targets of *kind*."""
    tag = f"{kind.name}-{variant.name}-{n}"
    work = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=workdir))
    shm = Path(tempfile.mkdtemp(prefix=f"quiesce-bench-{tag}-", dir=shm_root))
    if variant.tool == "quiesce":
        setup = QuiesceSetup(work, kind.quiesce_toml(n, variant), shm=shm)
    else:
        setup = BaselineSetup(work, kind.baseline_script, kind.baseline_args(n), shm=shm,
                              extra_path=kind.script_path())
    fig = Figure(kind.name, variant.label, variant.name, variant.tool, n, step,
                 variant.blocks_writers)
    writer = Writer(kind.name, kind.writer_targets(n), work)
    done: list[Cycle] = []
    try:
        with open(work / "scripts.log", "ab") as log:
            time.sleep(gap)
            for i in range(cycles + 1):
                done.append(run_cycle(setup, step, log, warmup=(i == 0)))
                time.sleep(gap)
    finally:
        try:
            setup.cleanup()
        finally:
            times, which, problem = writer.stop()
    summarise(fig, done, times, which, problem)
    if isinstance(setup, QuiesceSetup):
        fig.phases_ms = setup.phase_medians()
    progress(f"  {kind.name:<10} N={n:<3} {variant.label:<30} " + brief(fig))
    return fig


def brief(fig: Figure) -> str:
    def m(s):
        return f"{s['median']:.1f}/{s['p95']:.1f}" if s else "n/a"
    return (f"ok {fig.ok_cycles}/{fig.cycles}  freeze {m(fig.freeze_ms)}  thaw {m(fig.thaw_ms)}"
            f"  overhead {m(fig.hold_overhead_ms)} ms  held {fig.held_cycles}")
