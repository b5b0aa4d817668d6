"""What a finished cycle tells the outside world: a metrics file and one summary line.

The runtime calls :func:`cycle_finished` once per cycle, after every target is released
and never before: until then the host may have frozen every disk filesystem, and the
metrics directory lives on one. (The watchdog can fire while the host still holds the
disks frozen.) So the metrics are written by a child process that inherits no descriptor
(never the freeze lock) and that the caller waits for only ``PUBLISH_TIMEOUT`` seconds:
a write that blocks on a frozen disk delays neither the report nor the next freeze.
Failures are logged, never raised.

Standard library only, and runnable as a file (``python -I -S this_file``), like the
lean thaw path: the child reads its job as JSON on stdin.

Counters (``*_total``) are kept in the metrics file itself: each cycle reads the previous
file back and adds one. That file outlives reboots (the metrics directory is on disk, not
on tmpfs), there is no second file to keep in step with it, and if someone deletes it the
counters restart at zero, which Prometheus' ``rate()`` and ``increase()`` treat as a reset.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

log = logging.getLogger("quiesce.publish")

METRICS_FILE = "quiesce.prom"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_SOCKET = "/dev/log"
PUBLISH_TIMEOUT = 5.0    # how long the runtime waits for the child before leaving it
SEND_TIMEOUT = 1.0       # a full journal or syslog socket must not hold the holder
#: Statuses a target ends a cycle in (holder.py); only "released" was held to the end.
HELD_TO_THE_END = "released"
_COUNTER_LINE = re.compile(r"^(quiesce_[a-z_]+_total)(\{.*\})? (\S+)$")
_LAST_SUCCESS = re.compile(r"^quiesce_last_success_timestamp_seconds(?:\{.*\})? (\S+)$")


def summarize(state: dict) -> dict:
    """The cycle recorded in *state* (the holder's state.json) in a few values."""
    targets = state.get("targets") or []
    errors = {o["target"]: o.get("error") for o in state.get("outcomes") or ()}
    held_since, released_at = state.get("held_since"), state.get("released_at")
    held_for = max(0.0, released_at - held_since) if held_since and released_at else 0.0
    started, frozen = state.get("started_at"), state.get("frozen_at")
    per_target = [{"name": t["name"], "kind": t["kind"], "status": t["status"],
                   "consistent": t["status"] == HELD_TO_THE_END,
                   "hold_seconds": round(held_for, 3) if t["status"] != "pending" else 0.0,
                   "error": errors.get(t["name"])} for t in targets]
    return {
        "finished_at": released_at or time.time(),
        "success": bool(per_target) and all(t["consistent"] for t in per_target),
        "released_by": state.get("released_by"),
        # None when the freeze never finished: no duration to report
        "freeze_seconds": round(frozen - started, 6) if frozen and started else None,
        # every target is released at once, so the release took as long as the slowest
        "thaw_seconds": round(max((o.get("duration") or 0.0 for o in state.get("outcomes") or ()
                                   if o.get("phase") == "thaw"), default=0.0), 6),
        "targets": per_target,
    }


def summary_line(summary: dict) -> str:
    """One line an operator can read in the journal."""
    targets = summary["targets"]
    if summary["success"]:
        return (f"cycle ok: {len(targets)} target(s) application-consistent, held for "
                f"{max((t['hold_seconds'] for t in targets), default=0):.1f} s, released by "
                f"{summary['released_by']}")
    bad = ", ".join(f"{t['name']} ({t['status']}" + (f": {t['error']})" if t["error"] else ")")
                    for t in targets if not t["consistent"])
    return (f"cycle FAILED, released by {summary['released_by']}: not consistent: "
            f"{bad or 'no target'}")


# -- metrics --------------------------------------------------------------------------------


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{escape(str(v))}"' for k, v in labels.items()) + "}"


def previous_values(text: str) -> tuple[dict[str, float], float | None]:
    """The counters and the last success time from the previous metrics file."""
    counters, last_success = {}, None
    for line in text.splitlines():
        if m := _COUNTER_LINE.match(line):
            try:
                counters[m[1] + (m[2] or "")] = float(m[3])
            except ValueError:
                pass  # a damaged line restarts that counter; never stop publishing
        elif m := _LAST_SUCCESS.match(line):
            try:
                last_success = float(m[1])
            except ValueError:
                pass
    return counters, last_success


def render_metrics(summary: dict, previous: str, hostname: str) -> str:
    """The node_exporter textfile for this cycle, counters carried over from *previous*."""
    counters, last_success = previous_values(previous)
    host = _labels(host=hostname)
    if summary["success"]:
        last_success = summary["finished_at"]

    def bump(key: str, by: int) -> float:
        counters[key] = counters.get(key, 0.0) + by
        return counters[key]
    families = [
        ("quiesce_last_cycle_timestamp_seconds", "gauge",
         "When the last cycle ended (every target released), in Unix time.",
         [(host, summary["finished_at"])]),
        ("quiesce_last_cycle_success", "gauge",
         "1 if every target was application-consistent in the last cycle, else 0.",
         [(host, int(summary["success"]))]),
        ("quiesce_last_success_timestamp_seconds", "gauge",
         "When the last cycle with every target consistent ended, in Unix time.",
         [(host, last_success)] if last_success is not None else []),
        ("quiesce_target_consistent", "gauge",
         "1 if the target was held for the whole window in the last cycle, else 0.",
         [(_labels(target=t["name"], kind=t["kind"]), int(t["consistent"]))
          for t in summary["targets"]]),
        ("quiesce_target_hold_seconds", "gauge",
         "How long the target was held quiesced in the last cycle.",
         [(_labels(target=t["name"], kind=t["kind"]), t["hold_seconds"])
          for t in summary["targets"]]),
        ("quiesce_freeze_duration_seconds", "gauge",
         "How long the last freeze took, from its start until every target was held.",
         [(host, summary["freeze_seconds"])] if summary["freeze_seconds"] is not None else []),
        ("quiesce_thaw_duration_seconds", "gauge",
         "How long releasing the targets took in the last cycle.",
         [(host, summary["thaw_seconds"])]),
        ("quiesce_cycles_total", "counter", "Cycles ended, by result.",
         [(_labels(result=r), bump(f"quiesce_cycles_total{_labels(result=r)}",
                                   int(summary["success"] == (r == "success"))))
          for r in ("success", "failure")]),
        ("quiesce_watchdog_fired_total", "counter",
         "Cycles the watchdog ended because no thaw came within max_hold.",
         [(host, bump(f"quiesce_watchdog_fired_total{host}",
                      int(summary["released_by"] == "watchdog")))]),
        ("quiesce_target_inconsistent_total", "counter",
         "Cycles in which the target was not application-consistent.",
         [(_labels(target=t["name"], kind=t["kind"]),
           bump(f"quiesce_target_inconsistent_total{_labels(target=t['name'], kind=t['kind'])}",
                int(not t["consistent"]))) for t in summary["targets"]]),
    ]
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{labels} {_value(value)}" for labels, value in samples]
    return "\n".join(lines) + "\n"


def _value(value: float) -> str:
    """Integers as integers, floats as their shortest exact form (never 0.066000000000000003)."""
    return str(value) if isinstance(value, int) else repr(float(value))


def write_metrics(directory: str, summary: dict, hostname: str) -> str:
    """Atomically replace ``<directory>/quiesce.prom``: node_exporter never sees half a file
    (it reads only ``*.prom``, so the temporary name is ignored)."""
    path = os.path.join(directory, METRICS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            previous = f.read()
    except (FileNotFoundError, UnicodeDecodeError):
        previous = ""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        # 0644: node_exporter runs as its own user and must read it; it holds no secret
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render_metrics(summary, previous, hostname))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# -- the summary line -------------------------------------------------------------------------


def send_summary(line: str, ok: bool, *, syslog_socket: str | None = None,
                 journal_socket: str = JOURNAL_SOCKET) -> str | None:
    """Send *line* to the journal, or to syslog where there is no journal; where it went.

    An explicit *syslog_socket* wins (a chrooted rsyslog, a test); otherwise the journal's
    native socket, then ``/dev/log``. None when neither exists.
    """
    priority = 6 if ok else 3  # info, err
    line = " ".join(line.splitlines())  # an adapter's multi-line error stays one line
    if not syslog_socket and os.path.exists(journal_socket):
        fields = {"MESSAGE": line, "PRIORITY": str(priority), "SYSLOG_IDENTIFIER": "quiesce",
                  "SYSLOG_FACILITY": "3"}
        _send(journal_socket, "".join(f"{k}={v}\n" for k, v in fields.items()).encode())
        return journal_socket
    path = syslog_socket or SYSLOG_SOCKET
    if not os.path.exists(path):
        return None
    # RFC 3164 as glibc's syslog(3) sends it locally: facility daemon (3), no hostname
    stamp = time.strftime("%b %e %H:%M:%S")
    _send(path, f"<{3 * 8 + priority}>{stamp} quiesce[{os.getpid()}]: {line}".encode())
    return path


def _send(path: str, payload: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(SEND_TIMEOUT)
        sock.sendto(payload, path)


# -- running it -------------------------------------------------------------------------------


def cycle_finished(config, state: dict | None) -> None:
    """Publish the cycle in *state*; call once, after every target is released. Never raises.

    The summary line goes out from this process: its sockets are on tmpfs (/run, /dev),
    and a send is bounded by SEND_TIMEOUT. The metrics file may be on a disk, so a child
    process writes it.
    """
    if not state or state.get("corrupt"):
        return
    try:
        summary = summarize(state)
        send_summary(summary_line(summary), summary["success"],
                     syslog_socket=config.syslog_socket)
    except Exception as e:  # never let reporting break the cycle that it reports
        log.warning("cannot send the cycle's summary line: %s", e)
    if config.metrics_dir:
        _write_metrics_in_child(config.metrics_dir, state)


def _write_metrics_in_child(metrics_dir: str, state: dict) -> None:
    job = {"state": state, "metrics_dir": metrics_dir}
    try:
        child = subprocess.Popen([sys.executable, "-I", "-S", "-B", os.path.abspath(__file__)],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, cwd="/", start_new_session=True)
        _, err = child.communicate(json.dumps(job, default=str).encode(),
                                   timeout=PUBLISH_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.warning("writing metrics to %s took over %g s (a disk still frozen?); left it "
                    "running", metrics_dir, PUBLISH_TIMEOUT)
        return
    except Exception as e:
        log.warning("cannot write metrics to %s: %s", metrics_dir, e)
        return
    for problem in err.decode(errors="replace").splitlines():
        log.warning("%s", problem)


def main() -> int:
    """The child: write the metrics for the job on stdin; problems on stderr, one line each."""
    job = {}
    try:
        job = json.load(sys.stdin)
        write_metrics(job["metrics_dir"], summarize(job["state"]), socket.gethostname())
        return 0
    except Exception as e:  # one line for the log, never a traceback
        sys.stderr.write(f"cannot write metrics to {job.get('metrics_dir')}: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
