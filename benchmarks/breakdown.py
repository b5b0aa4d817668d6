"""Where every millisecond of one target's freeze latency goes.

The freeze the Azure pre-script runs (``sh`` exec-ing ``python -B -P -m quiesce --config
FILE freeze``, here with ``--json``) is timed end to end, start to exit, as the harness
times the pre-script. The parts are measured, each the way it can be without touching
quiesce's code:

* ``sh -c :`` and ``python -B -P -c pass``: the shell's and the interpreter's own start;
* ``-X importtime`` on the same freeze command: every module the freeze process imports
  beyond the bare interpreter's, its own ("self") time summed per top-level package;
* the holder's outcomes in the freeze's JSON report: the check, flush and quiesce (lock)
  phases, as the holder timed them;
* in a fresh interpreter that has first imported every module the freeze process imports
  (as the holder, forked from it, has): the kind's driver, its import and one connection
  to the same server (the part of ``check`` that is not quiesce's own work); adapter
  discovery (entry points) and loading the config.

What is left (forking the holder, the handshake, printing the report, exiting) is the
end-to-end time minus all of these, and is shown as such.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from report import KIND_LABEL, section_head

#: Per kind: the driver's import and one connection, as the adapter makes it.
PROBES = {
    "sqlite": ("import sqlite3", "sqlite3.connect(t['path']).execute('select 1')"),
    "redis": ("import redis", "redis.Redis.from_url(t['url']).ping()"),
    "mariadb": ("import pymysql", "pymysql.connect(unix_socket=t['unix_socket'], user=t['user'])"),
    "postgresql": ("import psycopg", "psycopg.connect(host=t['host'], port=t['port'], "
                                     "user=t['user'], dbname=t['dbname'])"),
}
#: The holder is forked from the freeze process, so every module the freeze imported is
#: there already when the driver is imported: the probes import them first too.
PREIMPORT = """import importlib, json, sys, time
for name in json.load(sys.stdin):
    try:
        importlib.import_module(name)
    except Exception:
        pass
"""
PROBE = PREIMPORT + """t = json.loads(sys.argv[1])
a = time.perf_counter()
{imp}
b = time.perf_counter()
{conn}
c = time.perf_counter()
print(json.dumps([b - a, c - b]))
"""
#: Adapter discovery and config load, with every module the freeze imports already
#: imported (their cost is in the import rows): what is left is the entry-point scan and
#: the config itself.
CONFIG_PROBE = PREIMPORT + """from quiesce.config import load
from quiesce.plugins import load_adapters
a = time.perf_counter()
adapters = load_adapters()
b = time.perf_counter()
load(sys.argv[1], adapters)
c = time.perf_counter()
print(json.dumps([b - a, c - b]))
"""
_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| *(\S+)\s*$")
GROUPS = ("quiesce", "click", "pluggy")


def _py(*args: str) -> list[str]:
    return [sys.executable, "-B", "-P", *args]


def wall_ms(argv: list[str], env: dict, repeat: int) -> float:
    """Median start-to-exit time of *argv* (one unmeasured run first)."""
    times = []
    for _ in range(repeat + 1):
        start = time.monotonic()
        subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.monotonic() - start)
    return statistics.median(times[1:]) * 1000


def probe_ms(code: str, arg: str, env: dict, repeat: int, stdin: str = "") -> list[float] | None:
    """Median of each figure a probe prints (ms), or None if the probe fails."""
    runs = []
    for _ in range(repeat + 1):
        proc = subprocess.run(_py("-c", code, arg), env=env, input=stdin, capture_output=True,
                              text=True, timeout=60)
        if proc.returncode != 0:
            return None
        runs.append(json.loads(proc.stdout))
    return [statistics.median(r[i] for r in runs[1:]) * 1000 for i in range(len(runs[0]))]


def import_self_us(stderr: str) -> dict[str, int]:
    """Each imported module's own time (µs) from ``-X importtime`` output."""
    found = {}
    for line in stderr.splitlines():
        m = _IMPORT_LINE.match(line)
        if m:
            found[m.group(3)] = found.get(m.group(3), 0) + int(m.group(1))
    return found


OTHER = "standard library and other packages"


def import_groups_ms(freeze_us: dict[str, int], bare_us: dict[str, int], *,
                     by_package: bool = False) -> dict[str, float]:
    """The freeze's imports beyond the bare interpreter's, summed per group (quiesce,
    click, pluggy, the rest) or, *by_package*, per top-level package."""
    groups: dict[str, float] = {}
    for module, us in freeze_us.items():
        if module in bare_us:
            continue
        top = module.split(".")[0]
        group = top if by_package or top in GROUPS else OTHER
        groups[group] = groups.get(group, 0.0) + us / 1000
    return groups


def run_freeze(setup: harness.QuiesceSetup, argv: list[str], log) -> tuple[float, str]:
    """One freeze (start to exit, seconds; its output), then the post-script's thaw."""
    with tempfile.TemporaryFile() as out:
        start, end, rc = harness.run_script(argv, setup.env, setup.workdir, out)
        out.seek(0)
        text = out.read().decode(errors="replace")
    harness.run_script(setup.post, setup.env, setup.workdir, log)
    setup.settle()
    if rc != 0:
        raise RuntimeError(f"quiesce freeze exited {rc}: {text[-500:]}")
    return end - start, text


def phases_ms(text: str) -> dict[str, float]:
    """The holder's phase times (slowest target) from the freeze's JSON report."""
    report = json.loads(text[text.index("{"):])
    out: dict[str, float] = {}
    for o in report.get("outcomes", ()):
        out[o["phase"]] = max(out.get(o["phase"], 0.0), o["duration"] * 1000)
    return out


def measure(kind, runs: int, workdir: Path, shm_root: Path) -> dict:
    """The parts of one target's freeze latency for *kind*, medians in ms."""
    variant = next(v for v in kind.variants() if v.tool == "quiesce")
    work = Path(tempfile.mkdtemp(prefix=f"{kind.name}-breakdown-", dir=workdir))
    shm = Path(tempfile.mkdtemp(prefix="quiesce-bench-breakdown-", dir=shm_root))
    setup = harness.QuiesceSetup(work, kind.quiesce_toml(1, variant), shm=shm)
    env = setup.env
    freeze = ["sh", "-c", 'exec "$0" -B -P $2 -m quiesce --config "$1" freeze --json',
              sys.executable, str(setup.config)]
    totals, phases, imports = [], [], []
    try:
        with open(work / "scripts.log", "ab") as log:
            run_freeze(setup, [*freeze, ""], log)  # warm-up
            for _ in range(runs):
                seconds, text = run_freeze(setup, [*freeze, ""], log)
                totals.append(seconds * 1000)
                phases.append(phases_ms(text))
            for _ in range(max(2, runs // 3)):
                imports.append(import_self_us(run_freeze(setup, [*freeze, "-X importtime"],
                                                         log)[1]))
    finally:
        setup.cleanup()
    bare = import_self_us(subprocess.run(_py("-X", "importtime", "-c", "pass"), env=env,
                                         capture_output=True, text=True).stderr)
    groups = [import_groups_ms(i, bare) for i in imports]
    packages = [import_groups_ms(i, bare, by_package=True) for i in imports]
    others = {p: statistics.median(x.get(p, 0.0) for x in packages)
              for p in {p for x in packages for p in x} if p not in GROUPS}
    modules = json.dumps(sorted({m for i in imports for m in i if "__main__" not in m}))
    imp, conn = PROBES[kind.name]
    driver = probe_ms(PROBE.format(imp=imp, conn=conn), json.dumps(kind.quiesce_target(0)),
                      env, runs, modules)
    config = probe_ms(CONFIG_PROBE, str(setup.config), env, runs, modules)
    return {"kind": kind.name, "variant": variant.name, "runs": runs,
            "freeze_ms": round(statistics.median(totals), 1),
            "sh_ms": round(wall_ms(["sh", "-c", ":"], env, runs), 1),
            "python_ms": round(wall_ms(_py("-c", "pass"), env, runs), 1),
            "imports_ms": {g: round(statistics.median(x.get(g, 0.0) for x in groups), 1)
                           for g in sorted({g for x in groups for g in x})},
            "largest_other_imports_ms": {p: round(ms, 1) for p, ms in
                                         sorted(others.items(), key=lambda i: -i[1])[:8]},
            "adapters_ms": round(config[0], 1) if config else None,
            "config_ms": round(config[1], 1) if config else None,
            "driver_import_ms": round(driver[0], 1) if driver else None,
            "connect_ms": round(driver[1], 1) if driver else None,
            "phases_ms": {p: round(statistics.median(x.get(p, 0.0) for x in phases), 1)
                          for p in sorted({p for x in phases for p in x})}}


def rows(b: dict) -> list[tuple[str, float | None, str]]:
    """(part, ms, how it was measured); the last row is what is left, so they add up."""
    ph = b["phases_ms"]
    driver = (b["driver_import_ms"] or 0) + (b["connect_ms"] or 0)
    out = [("`sh` starts (the pre-script)", b["sh_ms"], "`sh -c :`"),
           ("Python interpreter starts (with site)", b["python_ms"], "`python -B -P -c pass`")]
    out += [(f"imports in the freeze process: {g}", ms, "`-X importtime`, own time")
            for g, ms in b["imports_ms"].items()]
    out += [("adapter discovery (entry points)", b["adapters_ms"], "probe, timed"),
            ("config load and validation", b["config_ms"], "probe, timed"),
            ("check: the driver's import", b["driver_import_ms"], "probe, timed"),
            ("check: connecting", b["connect_ms"], "probe, timed"),
            ("check: the rest (version, privileges)", max(0.0, ph.get("check", 0.0) - driver)
             if "check" in ph else None, "holder's check phase − the two above"),
            ("flush", ph.get("flush"), "holder's flush phase"),
            ("lock (quiesce phase)", ph.get("quiesce"), "holder's quiesce phase")]
    known = sum(ms for _, ms, _ in out if ms is not None)
    out.append(("the rest: fork, handshake, reports, exit (not separately measurable)",
                b["freeze_ms"] - known, "end to end − every row above"))
    return out


def table(r: dict) -> list[str]:
    """RESULTS.md's section: one table per kind."""
    found = r.get("breakdown") or []
    lines = section_head(
        "Where one target's freeze latency goes",
        "One target, `quiesce freeze --json` run as the pre-script runs it (`sh` exec-ing the "
        "interpreter), timed start to exit; each part measured separately (medians, ms). "
        "*probe*: a fresh interpreter that first imports every module the freeze process "
        "imported (the holder is forked from it, so it has them), then times the step. Parts "
        "measured by a probe or under `-X importtime` differ a little from the real run "
        "(importtime's own cost, caches not shared), so the last row, what the other rows do "
        "not explain, can come out small or negative.", found)
    if not found:
        return lines
    for b in found:
        if b.get("error"):
            lines += [f"**{KIND_LABEL[b['kind']]}**: not measured: {b['error']}", ""]
            continue
        lines += [f"**{KIND_LABEL[b['kind']]}**: freeze {b['freeze_ms']:.1f} ms end to end "
                  f"({b['runs']} runs)", "", "| part | ms | measured by |", "| --- | ---: | --- |"]
        lines += [f"| {part} | {'n/a' if ms is None else f'{ms:.1f}'} | {how} |"
                  for part, ms, how in rows(b)]
        largest = b.get("largest_other_imports_ms") or {}
        if largest:
            lines += ["", f"Largest in *{OTHER}* (top-level package, ms): "
                      + ", ".join(f"{p} {ms:.1f}" for p, ms in largest.items()) + "."]
        lines.append("")
    return lines
