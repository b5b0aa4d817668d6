"""The thaw path, kept lean: standard library only, runnable as a file.

The post-script runs ``python -I -S -B <this file> --config FILE`` so that releasing the
databases costs one interpreter start and one round trip to the holder, without
importing pluggy, click or any driver. Only when no holder is alive and something is
still recorded as held does it hand over to the full CLI (``quiesce thaw``), which
loads the adapters to release server-kept state.

Nothing here writes to a disk filesystem: the runtime directory is on tmpfs and the
report goes to stdout (DESIGN.md invariant 2).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

DEFAULT_CONFIG = "/etc/quiesce/quiesce.toml"
DEFAULT_RUNTIME_DIR = "/run/quiesce"
ENV_CONFIG = "QUIESCE_CONFIG"
SOCKET_NAME = "holder.sock"
#: The post-script writes a line here with the shell's printf before Python starts, so
#: the holder starts releasing a few milliseconds into the post-script.
FIFO_NAME = "thaw.fifo"
STATE_NAME = "state.json"
LOCK_NAME = "lock"
THAW_REQUEST_NAME = "thaw-requested"

EXIT_OK = 0
EXIT_FAILED = 1  # a target failed, or a hold did not cover the whole window (cli.EXIT_CODES)

#: Statuses a target can end in; only "ok" means app-consistent for that target.
BAD_STATUSES = {"failed", "broken"}


def config_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG


def runtime_dir_of(config_file: str) -> str | None:
    """The runtime directory named by *config_file*, or None when it cannot be read.

    No other validation (freeze did it); never a guess: a wrong directory would make
    thaw say "nothing held" while targets are held elsewhere.
    """
    try:
        import tomllib
        with open(config_file, "rb") as f:
            value = tomllib.load(f).get("runtime_dir", DEFAULT_RUNTIME_DIR)
    except (OSError, ValueError, RecursionError):  # RecursionError: absurdly nested TOML
        return None
    usable = isinstance(value, str) and os.path.isabs(value) and "\0" not in value
    return value if usable else None


def read_state(runtime_dir: str) -> dict | None:
    try:
        with open(os.path.join(runtime_dir, STATE_NAME), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        return {"corrupt": True}


def write_state_file(path: str, text: str) -> None:
    """Atomically replace a file in the runtime dir (tmpfs: safe while disks are frozen)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_state(runtime_dir: str, state: dict) -> None:
    # default=str: an adapter's odd fact (a datetime, a Decimal) must never stop a save
    write_state_file(os.path.join(runtime_dir, STATE_NAME), json.dumps(state, default=str))


def request(runtime_dir: str, op: str, *, timeout: float) -> dict | None:
    """Send *op* to the holder; ``None`` when no holder is listening."""
    path = os.path.join(runtime_dir, SOCKET_NAME)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        if len(path.encode()) < 100:
            sock.connect(path)
        else:  # sun_path holds 107 bytes: connect by a relative name from inside the dir
            cwd = os.open(".", os.O_RDONLY)
            try:
                os.chdir(runtime_dir)
                sock.connect(SOCKET_NAME)
            finally:
                os.fchdir(cwd)
                os.close(cwd)
        with sock:
            sock.sendall(json.dumps({"op": op}).encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except (FileNotFoundError, ConnectionError):
        sock.close()
        return None  # no holder, or it exited while answering: the state file tells
    return json.loads(b"".join(chunks)) if chunks else None


def report_exit_code(report: dict) -> int:
    return EXIT_FAILED if not report.get("ok", False) else EXIT_OK


def render(report: dict) -> str:
    """Human-readable lines for a freeze/thaw/check/status report."""
    lines = [report.get("message", "")]
    width = max((len(o["target"]) + len(o["kind"]) for o in report.get("outcomes", ())), default=0)
    for o in report.get("outcomes", ()):
        label = f"{o['target']} ({o['kind']})".ljust(width + 3)
        status = {"ok": "ok", "failed": "FAILED", "broken": "BROKEN"}.get(o["status"], o["status"])
        line = f"  {status:<7} {label} {o['phase']:<8} {o['duration'] * 1000:7.1f} ms"
        if o.get("error"):
            line += f"  {o['error']}"
        lines.append(line)
        for key, value in (o.get("facts") or {}).items():
            lines.append(f"            {key}: {value}")
    return "\n".join(line for line in lines if line)


def state_report(state: dict | None, runtime_dir: str) -> tuple[dict, bool]:
    """What to say when no holder answers; second item: adapters are needed to recover."""
    if state is None:
        return {"ok": True, "action": "nothing-held", "outcomes": [],
                "message": f"nothing to thaw: no freeze is recorded in {runtime_dir}"}, False
    if state.get("corrupt"):
        return {"ok": False, "action": "unknown", "outcomes": [],
                "message": f"{runtime_dir}/{STATE_NAME} is unreadable; run `quiesce thaw` "
                           f"(the full command) to release every target"}, True
    pending = [t for t in state.get("targets", ()) if t["status"] in {"held", "quiescing"}]
    if pending:
        return {}, True
    if state.get("acknowledged"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.get("released_at") or 0))
        return {"ok": True, "action": "nothing-held", "outcomes": [],
                "message": f"nothing to thaw: already released ({state.get('released_by')}) "
                           f"at {when}"}, False
    outcomes = state.get("outcomes", [])
    ok = not any(o["status"] in BAD_STATUSES for o in outcomes)
    return {"ok": ok, "action": "reported", "outcomes": outcomes,
            "message": state.get("message", "released before thaw came")}, False


def acknowledge(runtime_dir: str, state: dict) -> None:
    state["acknowledged"] = True
    write_state(runtime_dir, state)


def note_thaw_request(runtime_dir: str) -> None:
    """Leave word for a freeze that is still starting: a thaw came, so release at once."""
    try:
        os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
        write_state_file(os.path.join(runtime_dir, THAW_REQUEST_NAME), str(time.time()))
    except OSError:
        pass


def thaw_requested_since(runtime_dir: str, since: float) -> bool:
    try:
        with open(os.path.join(runtime_dir, THAW_REQUEST_NAME)) as f:
            return float(f.read()) >= since
    except (OSError, ValueError):
        return False


def freeze_in_progress(runtime_dir: str) -> bool:
    """Does a freeze or holder hold the lock (without answering on the socket)?"""
    try:
        fd = os.open(os.path.join(runtime_dir, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def thaw_via_holder(runtime_dir: str, *, timeout: float = 300.0) -> tuple[dict | None, bool]:
    """Release through the holder, or from the state file alone.

    Returns ``(report, needs_recovery)``: when *needs_recovery* is true, targets are still
    recorded as held and no holder is alive, so the adapters must release them.
    """
    report = request(runtime_dir, "thaw", timeout=timeout)
    if report is not None:
        return report, False
    try:  # no holder reads it any more: never let lines pile up in it
        os.unlink(os.path.join(runtime_dir, FIFO_NAME))
    except OSError:
        pass
    note_thaw_request(runtime_dir)
    if freeze_in_progress(runtime_dir):
        return {"ok": False, "action": "freeze-in-progress", "outcomes": [],
                "message": "quiesce freeze was still starting (or its holder did not answer) "
                           "when thaw came: it will release every target as soon as it sees "
                           "this thaw request; the snapshot was not covered"}, False
    state = read_state(runtime_dir)
    report, needs_recovery = state_report(state, runtime_dir)
    if needs_recovery:
        return None, True
    if state and report.get("action") == "reported":
        acknowledge(runtime_dir, state)
    return report, False


def emit(report: dict, *, as_json: bool, started: float) -> None:
    report.setdefault("elapsed_ms", round((time.monotonic() - started) * 1000, 1))
    out = json.dumps(report, indent=2) if as_json else render(report)
    sys.stdout.write(out + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    import argparse  # after the clock starts: it is part of what we measure

    parser = argparse.ArgumentParser(prog="quiesce thaw", description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config")
    parser.add_argument("--json", action="store_true")
    args, rest = parser.parse_known_args(argv)
    cfg = config_path(args.config)
    runtime_dir = runtime_dir_of(cfg)
    report, needs_recovery = None, True  # the full CLI says what is wrong with the config
    if runtime_dir is not None:
        try:
            report, needs_recovery = thaw_via_holder(runtime_dir)
        except (OSError, ValueError) as e:
            sys.stderr.write(f"quiesce thaw: cannot reach the holder in {runtime_dir}: {e}\n")
    if needs_recovery:
        # The full CLI loads the adapters and releases what the server keeps by itself.
        cmd = [sys.executable, "-B", "-P", "-m", "quiesce", "--config", cfg, "thaw"]
        cmd += ["--json"] if args.json else []
        os.execv(sys.executable, cmd + rest)
    emit(report, as_json=args.json, started=started)
    return report_exit_code(report)


if __name__ == "__main__":
    sys.exit(main())
