"""The thaw path, kept lean: standard library only, runnable as a file.

The post-script runs ``python -I -S -B <this file> --config FILE`` so that releasing the
databases costs one interpreter start and one round trip to the holder, without
importing pluggy, click or any driver. Only when no holder is alive and something is
still recorded as held does it hand over to the full CLI (``quiesce thaw``), which
loads the adapters to release server-kept state.

Nothing here writes to a disk filesystem: the runtime directory is on tmpfs and the
report goes to stdout (invariant 2 in docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import sys
import time

DEFAULT_CONFIG = "/etc/quiesce/quiesce.toml"
DEFAULT_RUNTIME_DIR = "/run/quiesce"
ENV_CONFIG = "QUIESCE_CONFIG"
#: The post-script writes a line here with the shell's printf before Python starts, so
#: the holder starts releasing a few milliseconds into the post-script.
FIFO_NAME = "thaw.fifo"
STATE_NAME = "state.json"
THAW_REQUEST_NAME = "thaw-requested"
#: How long a client waits for the holder to accept a request. A holder that is stopped
#: or stuck never does; the release itself then gets the budget the holder announces.
ANSWER_GRACE = 5.0

EXIT_OK = 0
EXIT_FAILED = 1  # a target failed, or a hold did not cover the whole window (cli.EXIT_CODES)
EXIT_BUSY = 3    # a holder that does not answer (cli.EXIT_CODES)


class UntrustedPeer(OSError):
    """Something other than our holder answered, or the runtime dir could be replaced."""


class Unresponsive(Exception):
    """The holder accepted no request, or did not finish it, within its bound."""

    def __init__(self, pid: int | None, waited: float):
        super().__init__(pid, waited)
        self.pid, self.waited = pid, waited


def holder_address(runtime_dir: str) -> bytes:
    """The holder's abstract unix socket: one per runtime_dir path, bound for its life.

    An abstract name lives exactly as long as the socket, whatever happens to files:
    deleting the runtime dir can neither let a second holder start nor hide a live one.
    """
    digest = hashlib.sha256(os.path.abspath(runtime_dir).encode()).hexdigest()[:32]
    return b"\0quiesce-holder-" + digest.encode()


def unsafe_runtime_dir(path: str) -> str | None:
    """Why another user could replace *path* or a directory above it; None if none could.

    Walks from / with lstat (a symlink is never followed): every existing component must
    be a real directory owned by root or by us, and not writable by group or others
    unless the sticky bit stops them from renaming what is ours (/tmp, /dev/shm).
    """
    me, current = os.geteuid(), "/"
    for part in os.path.abspath(path).split("/"):
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return None  # created by us, 0700, under a directory checked above
        except OSError as e:
            return f"{current} cannot be checked: {e.strerror}"
        if stat.S_ISLNK(st.st_mode):
            return f"{current} is a symlink; name the real directory"
        if not stat.S_ISDIR(st.st_mode):
            return f"{current} is not a directory"
        if st.st_uid not in {0, me}:
            return f"{current} belongs to uid {st.st_uid}, who could replace what is below it"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return (f"{current} is writable by group or others without the sticky bit, so "
                    f"they could replace what is below it")
    return None


def peer_of(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected unix socket."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      struct.calcsize("3i")))
    return pid, uid

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


def request(runtime_dir: str, op: str) -> dict | None:
    """Send *op* to the holder; ``None`` when no holder is listening.

    The holder accepts at once with its pid and how long the answer may take (its
    release budget); Unresponsive when it does not accept within ANSWER_GRACE or does
    not answer within that budget, UntrustedPeer when the peer is not root or us.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with sock:
        sock.settimeout(ANSWER_GRACE)
        try:
            sock.connect(holder_address(runtime_dir))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except (socket.timeout, TimeoutError):  # its backlog is full: it accepts nothing
            raise Unresponsive(None, ANSWER_GRACE) from None
        pid, uid = peer_of(sock)
        if uid not in {0, os.geteuid()}:
            raise UntrustedPeer(f"the process answering for {runtime_dir} (pid {pid}) runs as "
                                f"uid {uid}, not root or us; refusing to trust it")
        waited = ANSWER_GRACE
        try:
            sock.sendall(json.dumps({"op": op}).encode() + b"\n")
            reader = sock.makefile("rb")
            accepted = json.loads(reader.readline() or b"null")
            if accepted is None:
                return None  # it exited while we asked: the state file tells
            waited = float(accepted.get("budget", 0)) + ANSWER_GRACE
            sock.settimeout(waited)
            answer = reader.read()
        except (socket.timeout, TimeoutError):
            raise Unresponsive(pid, waited) from None
        except ConnectionError:
            return None
    return json.loads(answer) if answer else None


def unresponsive_report(error: Unresponsive, runtime_dir: str) -> dict:
    who = f"pid {error.pid}" if error.pid else "pid unknown: see `pgrep quiesce-holder`"
    return {"ok": False, "action": "unresponsive", "holder_pid": error.pid, "outcomes": [],
            "exit_code": EXIT_BUSY,
            "message": f"the holder ({who}) for {runtime_dir} did not answer within "
                       f"{error.waited:g} s: it is stopped or stuck, and whatever it holds "
                       f"stays held until its watchdog fires; killing it ends its sessions, "
                       f"then run `quiesce thaw` again to release what servers keep"}


def report_exit_code(report: dict) -> int:
    if "exit_code" in report:
        return report["exit_code"]
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
    if state.get("phase") == "starting" and not state.get("holder_pid"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.get("started_at") or 0))
        return {"ok": True, "action": "nothing-held", "outcomes": [],
                "message": f"nothing to thaw: the freeze started at {when} ended before it "
                           f"held anything (its own output says why)"}, False
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
    """Is the holder's name bound by a freeze still starting (not listening yet)?"""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with probe:
        try:
            probe.bind(holder_address(runtime_dir))
        except OSError:
            return True
    return False


def thaw_via_holder(runtime_dir: str) -> tuple[dict | None, bool]:
    """Release through the holder, or from the state file alone.

    Returns ``(report, needs_recovery)``: when *needs_recovery* is true, targets are still
    recorded as held and no holder is alive, so the adapters must release them.
    """
    try:
        report = request(runtime_dir, "thaw")
    except Unresponsive as e:
        return unresponsive_report(e, runtime_dir), False
    if report is not None:
        return report, False
    reason = unsafe_runtime_dir(runtime_dir)
    if reason:  # what is in it could have been put there by someone else
        raise UntrustedPeer(f"refusing runtime_dir {runtime_dir}: {reason}")
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
        except UntrustedPeer as e:
            sys.stderr.write(f"quiesce thaw: {e}\n")
            return 2
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
