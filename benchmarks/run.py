"""`make bench`: how long quiesce blocks writers, beside a shell baseline, in one run.

    python benchmarks/run.py                 # full: 1 to 32 targets, bounded stall
    python benchmarks/run.py --quick --output /tmp/x   # a few cycles, 1 target (tests)
    python benchmarks/run.py --sqlite-lock-only        # just that figure, into results.json

For SQLite, Redis, MariaDB and PostgreSQL (each started here, in temporary directories,
on unix sockets and loopback only, and always stopped), an independent writer process
commits as fast as it can while the driver runs whole snapshot cycles through the Azure
pre-/post-scripts that `quiesce install azure` generated, and through a hand-written
baseline script pair (benchmarks/baseline/). Figures: freeze latency, thaw latency, hold
overhead, for 1, 2, 4, 8, 16 and 32 targets (scaling.png), the bounded stall on MariaDB
behind a long statement, the holder's memory, where one target's freeze latency goes, and
a whole host cycle per host (rehearsal.png), and SQLite's lock acquisition against a
writer committing back to back (sqlite_lock.py). Results go to RESULTS.md, results.json and
the pictures in --output (default: benchmarks/); a full run into benchmarks/ also
refreshes the table the README quotes.

No filesystem is frozen: the snapshot step is a fixed sleep, and what is measured is the
databases' side of the cycle.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import breakdown  # noqa: E402
import harness  # noqa: E402
import kinds  # noqa: E402
import limits  # noqa: E402
import memory  # noqa: E402
import plot  # noqa: E402
import rehearsal  # noqa: E402
import report  # noqa: E402
import sqlite_lock  # noqa: E402
import stall  # noqa: E402

#: Cycles per configuration: fewer where each cycle is long, for a full run of about
#: 15 minutes on two CPUs (medians of 5 or more are what the tables show).
FULL_CYCLES = {1: 20, 2: 10, 4: 8, 8: 8, 16: 6, 32: 5}
QUICK_CYCLES = 3
LOCK_SAMPLES = {"full": 200, "quick": 5}  # SQLite lock acquisitions per contender
#: The extra figures: runs per breakdown, samples per memory figure, host cycles per
#: rehearsal (each takes 2-5 s: the host's polls), full and quick.
EXTRA_RUNS = {"full": {"breakdown": 10, "memory": 3, "rehearsal": 5},
              "quick": {"breakdown": 2, "memory": 1, "rehearsal": 1}}
HOSTS = ("azure",)  # rehearsed hosts; a host needs an entry in rehearsal.HOSTS
#: A full run also rehearses these hosts with another poll interval than the installed
#: one, on SQLite: Azure's own default (3 s), to show what that setting costs writers.
OTHER_POLLS = {"azure": 3}
STEP = 0.3          # seconds: the snapshot step
GAP = 0.15          # seconds between cycles, so the writer runs freely in between


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a few cycles, 1 target per kind, a short stall (well under a minute)")
    p.add_argument("--output", type=Path, default=HERE, help="where RESULTS.md and results.json go")
    p.add_argument("--kinds", default=",".join(kinds.KINDS),
                   help="comma-separated subset of: " + ", ".join(kinds.KINDS))
    p.add_argument("--targets", help="comma-separated target counts (default 1,2,4,8,16,32; "
                                     "quick: 1)")
    p.add_argument("--cycles", type=int, help="cycles per configuration (default: 20 at N=1 "
                                              "down to 5 at N=32; quick: 3)")
    p.add_argument("--step", type=float, default=STEP, help="snapshot step in seconds")
    p.add_argument("--no-stall", dest="stall", action="store_false",
                   help="skip the MariaDB bounded-stall scenario")
    p.add_argument("--sqlite-lock-only", action="store_true",
                   help="measure only SQLite's lock acquisition against a tight-loop writer; "
                        "the other figures in --output's results.json are kept")
    p.add_argument("--no-extras", dest="extras", action="store_false",
                   help="skip the holder memory, the freeze breakdown and the host rehearsals")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rewrite RESULTS.md (and, for a full run in "
                        "benchmarks/, the README table) from --output's results.json")
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(args.kinds) - set(kinds.KINDS)
    if unknown:
        p.error(f"unknown kind(s): {', '.join(sorted(unknown))}")
    if args.targets:
        args.targets = sorted({int(x) for x in args.targets.split(",")})
    else:
        args.targets = [1] if args.quick else sorted(FULL_CYCLES)
    return args


def cycles_for(args, n: int) -> int:
    if args.cycles:
        return args.cycles if n == 1 else max(3, args.cycles * FULL_CYCLES.get(n, 6) // 20)
    if args.quick:
        return QUICK_CYCLES
    return FULL_CYCLES.get(n, 6)


def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not available"
    return ((proc.stdout or proc.stderr).strip().splitlines() or ["?"])[0]


def _load() -> str:
    """The 1-, 5- and 15-minute load averages: other work on the machine skews the figures."""
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def machine() -> dict:
    cpu_model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    distro = "?"
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    try:
        from importlib.metadata import version
        quiesce_version = version("quiesce")
    except Exception:
        quiesce_version = "?"
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "core", "adapters"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        commit = f"{commit}{' + uncommitted changes in core/ or adapters/' if dirty else ''}"
    except (OSError, subprocess.TimeoutExpired):
        commit = "?"
    return {
        "cpus": os.cpu_count(), "cpu_model": cpu_model, "memory": mem,
        "kernel": platform.release(), "os": distro, "load_start": _load(),
        "python": f"{platform.python_implementation()} {platform.python_version()} "
                  f"({sys.executable})",
        "quiesce": f"{quiesce_version} (git {commit})",
        "clients": {"sh": os.path.realpath("/bin/sh"),
                    "sqlite3": _first_line(["sqlite3", "-version"]),
                    "mariadb": _first_line(["mariadb", "--version"]),
                    "psql": _first_line([str(kinds.servers.PG15_BINDIR / "psql"), "--version"]),
                    "redis-cli": _first_line(["redis-cli", "--version"])},
    }


def exit_ms(code: str, env: dict, repeat: int) -> float:
    """Median time from a Python process's last line (it prints the time, then calls
    os._exit) until its exit is seen (pidfd): the kernel tearing the process down."""
    times = []
    for _ in range(repeat + 1):
        proc = subprocess.Popen([sys.executable, "-B", "-c", code + "; import os, time; "
                                 "print(time.time(), flush=True); os._exit(0)"],
                                env=env, stdout=subprocess.PIPE)
        fd = os.pidfd_open(proc.pid)
        printed = float(proc.stdout.readline())
        select.select([fd], [], [])
        times.append(time.time() - printed)
        os.close(fd)
        proc.wait()
    return statistics.median(times[1:]) * 1000


def startup_costs(repeat: int) -> dict:
    """What the parts of a script cost here: the floor under freeze and thaw latency."""
    py = sys.executable
    thaw_py = str(ROOT / "core" / "thaw.py")
    scratch = Path(tempfile.mkdtemp(prefix="quiesce-bench-costs-"))
    (scratch / "run").mkdir(mode=0o700)
    config = scratch / "quiesce.toml"  # a runtime dir where nothing was ever held
    config.write_text(f'runtime_dir = "{scratch / "run"}"\n\n[targets.db]\nkind = "sqlite"\n'
                      f'path = "{scratch / "db.sqlite"}"\n')
    config.chmod(0o600)
    probes = {
        "sh -c : (a shell script's own start)": ["sh", "-c", ":"],
        "python -I -S -B -c pass (bare interpreter)": [py, "-I", "-S", "-B", "-c", "pass"],
        "python -I -S -B -c import json, socket (the lean client's first imports)":
            [py, "-I", "-S", "-B", "-c", "import json, socket"],
        "lean thaw client, nothing held (the post-script's python)":
            [py, "-I", "-S", "-B", thaw_py, "--config", str(config)],
        "python -B -m quiesce --version (CLI: click, pluggy)": [py, "-B", "-m", "quiesce", "--version"],
        "import the drivers (psycopg, pymysql, redis)":
            [py, "-B", "-c", "import psycopg, pymysql, redis"],
    }
    env = harness.script_env()
    try:
        costs = {label: round(breakdown.wall_ms(argv, env, repeat), 1)
                 for label, argv in probes.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    exits = {"a bare interpreter": "pass",
             "quiesce's CLI and adapters loaded, as freeze has": "import quiesce.cli, "
             "quiesce.holder, quiesce.plugins; quiesce.plugins.load_adapters()"}
    for label, code in exits.items():
        costs[f"a Python process's exit, seen by its parent: {label}"] = round(
            exit_ms(code, env, repeat), 2)
    for n in (1, 32):
        costs[f"{COORDINATES_COST} {n} at once, from {n} thread(s)"] = round(
            coordinates_ms(n, repeat), 2)
    return costs


#: The label of the coordinates file's cost in startup_ms (goals.py quotes it).
COORDINATES_COST = "MariaDB's coordinates file, written as quiesce writes it under the lock " \
                   "(write, fsync, rename, directory fsync), in a temporary directory:"


def coordinates_ms(n: int, repeat: int) -> float:
    """Median ms until *n* threads have each written a coordinates file (one directory each,
    as N servers' data directories), with the adapter's own function."""
    from quiesce.adapters.mysql import _write_coordinates
    scratch = Path(tempfile.mkdtemp(prefix="quiesce-bench-fsync-"))
    paths = [scratch / f"datadir{i}" / "quiesce-coordinates.json" for i in range(n)]
    coords = {"binlog": {"file": "mysql-bin.000001", "position": 4}, "gtid": None}
    try:
        for path in paths:
            path.parent.mkdir()
        times = []
        for _ in range(repeat):
            go = threading.Event()
            threads = [threading.Thread(target=lambda p=p: (go.wait(), _write_coordinates(str(p), coords)))
                       for p in paths]
            for thread in threads:
                thread.start()
            started = time.perf_counter()
            go.set()
            for thread in threads:
                thread.join()
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def finite(obj):
    """The results with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def update_readme(markdown_table: str) -> bool:
    """Replace the table between the bench markers in README.md (if the markers exist)."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{markdown_table}\n{end}{tail}")
    return True


def lock_only(out_dir: Path, mode: str) -> int:
    """Measure the SQLite lock figure alone and put it into the existing results."""
    path = out_dir / "results.json"
    if not path.exists():
        print(f"{path} does not exist: run a full or quick benchmark first", file=sys.stderr)
        return 2
    results = json.loads(path.read_text())
    work = Path(tempfile.mkdtemp(prefix="quiesce-bench-"))
    try:
        results["sqlite_lock"] = sqlite_lock.run(work, LOCK_SAMPLES[mode],
                                                 progress=lambda s: print(s, flush=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["sqlite_lock"]["date"] = datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds")
    path.write_text(json.dumps(finite(results), indent=2, allow_nan=False) + "\n")
    (out_dir / "RESULTS.md").write_text(report.render(results))
    print(f"wrote the SQLite lock figure into {path} and {out_dir / 'RESULTS.md'}")
    return 0
def extras(kind, args, work: Path, shm_root: Path, results: dict) -> None:
    """The holder's memory (1 and the most targets), where one target's freeze latency
    goes, and a whole host cycle per host (kinds whose quiesce blocks writers)."""
    runs = EXTRA_RUNS["quick" if args.quick else "full"]
    if kind.name in ("sqlite", "redis", "mariadb"):
        counts = sorted({1, 8, max(args.targets)} & set(range(1, max(args.targets) + 1)))
        results["limits"].append(limits.measure(kind, counts, "quick" if args.quick else "full"))
        print(f"  {kind.name:<10} one operation on each of N targets (ms): "
              f"{results['limits'][-1]['by_targets']}", flush=True)
    for n in sorted({1, max(args.targets)}):
        m = memory.measure(kind, n, runs["memory"], work, shm_root)
        results["memory"].append(m)
        print(f"  {kind.name:<10} N={n:<3} holder memory: RSS {m.get('rss_mib', '?')} MiB, "
              f"peak {m.get('hwm_mib', '?')} MiB {m.get('error', '')}", flush=True)
    b = breakdown.measure(kind, runs["breakdown"], work, shm_root)
    results["breakdown"].append(b)
    print(f"  {kind.name:<10} N=1   freeze breakdown: {b['freeze_ms']:.0f} ms end to end",
          flush=True)
    if not next(v for v in kind.variants() if v.tool == "quiesce").blocks_writers:
        return
    polls = [(host, None) for host in HOSTS]
    if kind.name == "sqlite" and not args.quick:
        polls += [(host, poll) for host, poll in OTHER_POLLS.items() if host in HOSTS]
    for host, poll in polls:
        results["rehearsals"].append(rehearsal.rehearse(
            host, kind, 1, runs["rehearsal"], args.step, work, shm_root, poll=poll,
            progress=lambda s: print(s, flush=True)))


def write_outputs(results: dict, out_dir: Path) -> None:
    """The pictures, results.json and RESULTS.md, all from the same results."""
    results["plots"] = plot.draw(results, out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    (out_dir / "RESULTS.md").write_text(report.render(results))


def compile_package() -> None:
    """Byte-compile quiesce's modules, as pip does when it installs the wheel. From a
    checkout (an editable install) with PYTHONDONTWRITEBYTECODE set, as on this machine,
    every run would compile them anew: some 40 ms of each freeze that no installed quiesce
    pays (the generated scripts run Python with -B, which writes no bytecode itself)."""
    import compileall

    import quiesce
    import quiesce.adapters
    for path in sorted({*quiesce.__path__, *quiesce.adapters.__path__}):
        compileall.compile_dir(path, quiet=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    out_dir = args.output.resolve()
    if args.report_only:
        results = json.loads((out_dir / "results.json").read_text())
        write_outputs(results, out_dir)
        print(f"wrote {out_dir / 'RESULTS.md'} from {out_dir / 'results.json'}")
        if results["mode"] == "full" and out_dir == HERE.resolve() and not results["errors"]:
            if update_readme(report.readme_table(results)):
                print("updated the table in README.md")
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    if args.sqlite_lock_only:
        return lock_only(out_dir, mode)
    print(f"quiesce benchmarks ({mode}): kinds {', '.join(args.kinds)}; targets "
          f"{', '.join(map(str, args.targets))}; results in {out_dir}", flush=True)
    results: dict = {
        "schema": 2, "mode": mode,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "versions": {},
        "settings": {"step_s": args.step, "gap_s": GAP, "max_hold_s": harness.MAX_HOLD,
                     "targets": args.targets, "warmup_cycles": 1,
                     "cycles": {str(n): cycles_for(args, n) for n in args.targets}},
        "startup_ms": {}, "figures": [], "stall": None, "sqlite_lock": None, "skipped": [], "errors": [],
        "memory": [], "breakdown": [], "rehearsals": [], "limits": [], "plots": {},
    }
    compile_package()
    results["startup_ms"] = startup_costs(3 if args.quick else 10)
    work = Path(tempfile.mkdtemp(prefix="quiesce-bench-"))
    shm_base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else work
    shm_root = Path(tempfile.mkdtemp(prefix="quiesce-bench-", dir=shm_base))
    try:
        for name in args.kinds:
            cls = kinds.KINDS[name]
            reason = cls.missing()
            if reason:
                results["skipped"].append({"kind": name, "reason": reason})
                print(f"  {name:<10} skipped: {reason}", flush=True)
                continue
            (work / name).mkdir()
            kind = cls(work / name)
            try:
                started = time.monotonic()
                kind.start(max(args.targets))
                results["versions"][name] = kind.version()
                print(f"  {name:<10} {max(args.targets)} target(s) ready in "
                      f"{time.monotonic() - started:.1f} s", flush=True)
                for n in args.targets:
                    for variant in kind.variants():
                        fig = harness.measure(kind, variant, n, cycles_for(args, n), args.step,
                                              GAP, work, shm_root,
                                              progress=lambda s: print(s, flush=True))
                        results["figures"].append(fig.as_dict())
                if name == "sqlite":
                    results["sqlite_lock"] = sqlite_lock.run(
                        work / name, LOCK_SAMPLES[mode], progress=lambda s: print(s, flush=True))
                if name == "mariadb" and args.stall:
                    results["stall"] = stall.run_stall(
                        kind, query_s=8 if args.quick else 60, cap_s=1.0 if args.quick else 10.0,
                        step=args.step, workdir=work, shm_root=shm_root, quick=args.quick,
                        progress=lambda s: print(s, flush=True))
                if args.extras:
                    extras(kind, args, work, shm_root, results)
            except Exception as e:
                traceback.print_exc()
                results["errors"].append({"kind": name, "error": f"{type(e).__name__}: {e}"})
            finally:
                kind.cleanup()
    finally:
        shutil.rmtree(shm_root, ignore_errors=True)
        if os.environ.get("QUIESCE_KEEP_BENCH_DIRS") != "1":
            shutil.rmtree(work, ignore_errors=True)
    results["duration_s"] = round(time.monotonic() - began, 1)
    results["machine"]["load_end"] = _load()
    results = finite(results)
    write_outputs(results, out_dir)
    print(f"wrote {out_dir / 'RESULTS.md'}, {out_dir / 'results.json'} and the pictures "
          f"({results['duration_s']:.0f} s)", flush=True)
    if mode == "full" and out_dir == HERE.resolve() and not results["errors"]:
        if update_readme(report.readme_table(results)):
            print("updated the table in README.md", flush=True)
    for error in results["errors"]:
        print(f"ERROR: {error['kind']}: {error['error']}", file=sys.stderr)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
