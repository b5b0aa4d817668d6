"""The holder: a detached process that quiesces the targets and keeps them quiesced.

Session-bound states (a SQLite write lock, a MySQL global read lock, a PostgreSQL
backup) live only as long as the connection that created them, and the pre-script must
return before the snapshot starts. So ``quiesce freeze`` forks this process, which runs
every phase itself, keeps the connections open, and waits for ``quiesce thaw`` on a unix
socket in the runtime directory. It releases every target, in reverse order, on the
first of:

* a ``thaw`` request (the normal case);
* the watchdog: ``max_hold`` seconds after the targets were quiesced;
* the ``freeze`` command dying before it acknowledged "ready";
* SIGTERM or SIGINT.

It keeps its state on tmpfs and its log lines in memory until the targets are released,
because the host may freeze every disk filesystem while it holds (DESIGN.md invariant 2).
Its exclusive lock on ``<runtime_dir>/lock`` lasts exactly as long as it lives, so a
second ``freeze`` knows one is already holding, and a crash-thaw knows none is.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from . import logs
from .logs import IN_REPORT
from .config import Config
from .errors import BusyError, ConfigError
from .phases import Outcome, hard_limit, run_phase
from .plugins import Adapters
from .target import Hold
from .thaw import (FIFO_NAME, LOCK_NAME, SOCKET_NAME, STATE_NAME, read_state,
                   thaw_requested_since, write_state)

log = logging.getLogger(__name__)

ACK_TIMEOUT = 30.0      # how long the holder waits for freeze to acknowledge "ready"
ANSWER_GRACE = 10.0     # how long it waits for a thaw reply to be sent before exiting
EARLY_THAW = "thaw came before freeze had finished, so the snapshot was not covered"
THAW_STAGGER = 1.0      # longest one target's release may delay the next one's
SENTINEL_GRACE = 5.0    # how long after the deadline the stand-in watchdog acts

# The stand-in watchdog. Started before the targets are quiesced, it learns the deadline
# from the state file once the holder records it (re-read every second; tmpfs), falls
# back to the latest possible one, then runs an orphan thaw.
_SENTINEL = """
import json, os, sys, time
state, latest, grace = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
while True:
    try:
        with open(state) as f:
            deadline = float(json.load(f).get("deadline") or latest)
    except Exception:  # missing, half-written or odd: never let the safety net die
        deadline = latest
    wait = deadline + grace - time.time()
    if wait <= 0:
        break
    time.sleep(min(1.0, wait))
os.execv(sys.executable, [sys.executable, "-B", "-P", "-m", "quiesce", "--config",
                          sys.argv[4], "thaw", "--orphaned"])
"""


def prepare_runtime_dir(path: str) -> None:
    """Create the runtime directory, private to this user (it holds the control socket)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"cannot create runtime_dir {path}: {e}") from e
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError(f"refusing runtime_dir {path}: it must belong to this user and be "
                          f"private; run: chown {os.geteuid()} {path} && chmod 700 {path}")


def take_lock(runtime_dir: str) -> int:
    """The freeze lock, or BusyError naming the holder that has it."""
    fd = os.open(os.path.join(runtime_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        state = read_state(runtime_dir) or {}
        since = state.get("held_since") or state.get("started_at")
        when = time.strftime("%H:%M:%S", time.localtime(since)) if since else "unknown time"
        raise BusyError(f"targets are already held since {when} by holder pid "
                        f"{state.get('holder_pid', '?')}; run `quiesce thaw` first "
                        f"(or `quiesce status`)") from None
    return fd


class Holder:
    def __init__(self, config: Config, adapters: Adapters, *, report_fd: int, ack_fd: int,
                 started: float):
        self.config, self.adapters = config, adapters
        self.runtime_dir = config.runtime_dir
        self.report_fd, self.ack_fd = report_fd, ack_fd
        self.deadline = float("inf")  # monotonic: a clock step never stretches a hold
        self.holds: dict[str, Hold] = {}
        self.cancel = threading.Event()      # a thaw came before freeze finished
        self.freeze_done = threading.Event()
        self.released = threading.Event()
        self.answered = threading.Event()
        self.signalled: str | None = None
        self.sentinel: subprocess.Popen | None = None
        self._release_lock = threading.Lock()
        self.report: dict[str, Any] | None = None
        self.state: dict[str, Any] = {
            "version": 1, "config": config.path, "holder_pid": os.getpid(),
            "started_at": started, "held_since": None, "deadline": None,
            "max_hold": config.max_hold, "phase": "starting", "released_by": None,
            "released_at": None, "acknowledged": False, "outcomes": [],
            "targets": [{"name": t.name, "kind": t.kind, "status": "pending",
                         "session_bound": False, "facts": {}} for t in config.targets],
        }

    # -- bookkeeping -------------------------------------------------------------

    def _save(self) -> None:
        write_state(self.runtime_dir, self.state)

    def _target_state(self, name: str) -> dict[str, Any]:
        return next(t for t in self.state["targets"] if t["name"] == name)

    def _send(self, message: dict[str, Any]) -> None:
        try:
            os.write(self.report_fd, json.dumps(message, default=str).encode() + b"\n")
        except OSError:
            pass  # freeze is gone; the ack check will notice

    def _parent_gone(self) -> bool:
        readable, _, _ = select.select([self.ack_fd], [], [], 0)
        return bool(readable)  # freeze writes nothing before "ready": readable means EOF

    def _thaw_came(self) -> bool:
        """A thaw came, on the socket or (before it existed) as a note in the runtime dir."""
        if thaw_requested_since(self.runtime_dir, self.state["started_at"]):
            self.cancel.set()
        return self.cancel.is_set()

    # -- freeze ------------------------------------------------------------------

    def _freeze(self) -> bool:
        targets = self.config.targets
        # Started before anything is held, so the hold never pays for its fork and exec.
        # It acts after the latest possible watchdog deadline: phases, then max_hold.
        latest = time.time() + 3 * max(hard_limit(t) for t in targets) + self.config.max_hold
        self.sentinel = _start_sentinel(self.config, latest)
        for hook in ("check", "flush"):
            self.state["phase"] = hook
            results = run_phase(self.adapters, hook, targets)
            self._send({"type": "progress", "outcomes": [o.as_dict() for o, _ in results]})
            if any(not o.ok for o, _ in results) or self._thaw_came() or self._parent_gone():
                return False
        self.state["phase"] = "quiesce"
        for t in self.state["targets"]:
            t["status"] = "quiescing"  # recorded first: a crash-thaw must release these
        self.state["held_since"] = time.time()
        self.state["deadline"] = self.state["held_since"] + self.config.max_hold
        self.deadline = time.monotonic() + self.config.max_hold
        self._save()
        results = run_phase(self.adapters, "quiesce", targets)
        for target, (outcome, hold) in zip(targets, results):
            entry = self._target_state(target.name)
            if outcome.ok:
                hold = hold if isinstance(hold, Hold) else Hold()
                self.holds[target.name] = hold
                entry.update(status="held", session_bound=hold.session_bound, facts=hold.facts)
            elif not outcome.abandoned:
                entry["status"] = "failed"
            # an abandoned quiesce stays "quiescing": it may still take its lock, and the
            # sentinel or the next thaw must then release it
        self._save()
        self._send({"type": "progress", "outcomes": [o.as_dict() for o, _ in results]})
        return all(o.ok for o, _ in results) and not self._thaw_came()

    def _handshake(self) -> bool:
        """Tell freeze we hold everything; true once it acknowledged (it is alive)."""
        self.state["phase"] = "held"
        self._save()
        self._send({"type": "ready", "report": self._status_report()})
        readable, _, _ = select.select([self.ack_fd], [], [], ACK_TIMEOUT)
        return bool(readable) and os.read(self.ack_fd, 16).startswith(b"ack")

    # -- release -----------------------------------------------------------------

    def release(self, by: str, reason: str | None = None) -> dict[str, Any]:
        """Thaw every held target in reverse order, once; later calls get the same report.

        *reason* set means the hold did not cover the window as promised: every released
        target is then reported as broken with that reason.
        """
        with self._release_lock:
            if self.report is not None:
                return self.report
            outcomes = self._thaw_in_reverse(reason)
            now = time.time()
            held_for = now - self.state["held_since"] if self.state["held_since"] else 0.0
            ok = not reason and all(o.ok for o in outcomes)
            message = reason or (f"released {len(outcomes)} target(s), held for {held_for:.1f} s"
                                 if ok else "released, but not every target was held to the end")
            self.state.update(phase="released", released_by=by, released_at=now,
                              outcomes=[o.as_dict() for o in outcomes], message=message,
                              acknowledged=by == "freeze-failed")
            self._save()
            self.report = {"ok": ok, "action": "thawed", "released_by": by,
                           "held_for": round(held_for, 3), "message": message,
                           "outcomes": [o.as_dict() for o in outcomes]}
            self.released.set()
            log.log(logging.INFO if ok else logging.WARNING, "released by %s: %s", by, message,
                    extra=IN_REPORT)
            return self.report

    def _thaw_in_reverse(self, reason: str | None) -> list[Outcome]:
        """Thaw held targets in reverse config order, none waiting long on another.

        Each thaw starts once the previous one finished, or after THAW_STAGGER if it has
        not: a target whose release blocks (a backup stop writing to a disk the host still
        has frozen) must not keep the others quiesced.
        """
        held = [t for t in reversed(self.config.targets) if t.name in self.holds]
        holds = {t.name: self.holds.pop(t.name) for t in held}
        results = run_phase(self.adapters, "thaw", held, stagger=THAW_STAGGER,
                            kwargs_for=lambda t: {"hold": holds[t.name]})
        outcomes = []
        for target, (outcome, _) in zip(held, results):
            if reason and outcome.status == "ok":
                outcome.status, outcome.error = "broken", reason
            self._target_state(target.name)["status"] = _after_thaw(outcome)
            outcomes.append(outcome)
        return outcomes

    # -- control socket ----------------------------------------------------------

    def _listen(self) -> socket.socket:
        path = SOCKET_NAME  # relative: cwd is the runtime dir, and sun_path is short
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is created 0600: only this user connects
        try:
            server.bind(path)
        finally:
            os.umask(old_umask)
        server.listen(8)
        return server

    def _thaw_request(self) -> dict[str, Any]:
        """A thaw came (socket or FIFO): release once freeze is done, honestly labelled."""
        early = not self.freeze_done.is_set()
        self.cancel.set()
        self.freeze_done.wait()
        return self.release("thaw", EARLY_THAW if early else None)

    def _watch_fifo(self) -> None:
        """Release on the first line written to the thaw FIFO (the post-script's printf)."""
        try:
            os.unlink(FIFO_NAME)
        except FileNotFoundError:
            pass
        os.mkfifo(FIFO_NAME, 0o600)
        fd = os.open(FIFO_NAME, os.O_RDWR)  # read-write: never sees EOF, never blocks a writer
        while os.read(fd, 64):
            log.info("thaw requested through %s", FIFO_NAME)
            self._thaw_request()

    def _serve(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError as e:  # e.g. EMFILE: keep serving rather than die
                log.warning("control socket: %s", e)
                time.sleep(0.1)
                continue
            with conn:
                try:
                    self._answer(conn)
                except Exception as e:  # one bad request must never stop the server
                    log.warning("control request failed: %s", e)

    def _answer(self, conn: socket.socket) -> None:
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
        if uid not in {0, os.geteuid()}:
            log.warning("refused a control request from uid %d", uid)
            return
        conn.settimeout(5.0)
        op = json.loads(conn.makefile("rb").readline() or b"{}").get("op")
        if op == "thaw":
            report = self._thaw_request()
            conn.sendall(json.dumps(report, default=str).encode())
            self.state["acknowledged"] = True  # only now has a thaw told the operator
            self._save()
            self.answered.set()
        elif op == "status":
            conn.sendall(json.dumps(self._status_report(), default=str).encode())

    def _status_report(self) -> dict[str, Any]:
        return {"ok": True, "alive": True, **self.state}

    # -- main --------------------------------------------------------------------

    def run(self) -> int:
        write_log = logs.buffer_until_released(self.config.log_file)
        try:  # so `ps -o comm` and `pgrep quiesce-holder` tell it from a freeze (procfs, not disk)
            with open("/proc/self/comm", "w") as f:
                f.write("quiesce-holder")
        except OSError:
            pass
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: setattr(self, "signalled",
                                                              signal.Signals(signum).name))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        log.info("holder started for %s", ", ".join(t.name for t in self.config.targets))
        try:
            self._save()
            server = self._listen()
            threading.Thread(target=self._serve, args=(server,), daemon=True).start()
            threading.Thread(target=self._watch_fifo, daemon=True).start()
            if not self._freeze():
                early = self.cancel.is_set()
                self.release("thaw" if early else "freeze-failed", EARLY_THAW if early else None)
                self._send({"type": "failed", "report": self.report})
                return 1
            if not self._handshake():
                self.release("freeze-died", "the freeze command died before it reported "
                                            "ready, so no hold was promised")
                return 1
            if self.cancel.is_set():  # a thaw came while we waited for the ack
                self.release("thaw", EARLY_THAW)
            self.freeze_done.set()
            while not self.released.wait(timeout=0.2):
                if self.signalled:
                    self.release("signal", f"the holder received {self.signalled} and "
                                           f"released every target before thaw came")
                elif time.monotonic() >= self.deadline:
                    self.release("watchdog", f"the watchdog released it after max_hold "
                                             f"({self.config.max_hold:g} s), before thaw came")
                elif self._thaw_came():  # a thaw that could not reach the socket left a note
                    self.release("thaw")
            self.answered.wait(timeout=ANSWER_GRACE if self.state["released_by"] == "thaw" else 0)
            return 0
        finally:
            self.freeze_done.set()
            if self.cancel.is_set():  # a thaw client is waiting for its answer
                self.answered.wait(timeout=ANSWER_GRACE)
            try:
                if self.report is None and self.holds:
                    self.release("holder-error", "the holder failed and released every target")
                pending = [t for t in self.state["targets"]
                           if t["status"] in {"held", "quiescing"}]
                if self.sentinel is not None and not pending:
                    self.sentinel.kill()  # nothing left that a stand-in would have to release
                    self.sentinel.wait()
            finally:
                write_log()  # the targets are released: the disk may be written now
            for name in (SOCKET_NAME, FIFO_NAME):
                try:
                    os.unlink(name)
                except OSError:
                    pass


def _start_sentinel(config: Config, latest: float) -> subprocess.Popen | None:
    """A process that plays the watchdog if the holder dies holding server-kept states.

    A MongoDB fsync lock has no server-side deadline: if the holder were killed and no
    thaw came, the server would stay locked. The sentinel wakes shortly after the
    deadline (*latest* until the holder records it) and, only if no holder is alive,
    releases what is recorded as held.
    """
    try:
        return subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _SENTINEL,
                                 os.path.join(os.path.abspath(config.runtime_dir), STATE_NAME),
                                 str(latest), str(SENTINEL_GRACE), config.path],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, cwd="/")
    except OSError as e:
        log.warning("cannot start the stand-in watchdog: %s", e)
        return None


def _after_thaw(outcome: Outcome) -> str:
    """A thaw that failed leaves the target recorded as held, so the next thaw retries it."""
    return {"ok": "released", "broken": "broken"}.get(outcome.status, "held")


def _redirect_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def freeze_budget(config: Config) -> float:
    """The longest `quiesce freeze` waits: three phases at the hard limit, then the ack."""
    return 3 * max(hard_limit(t) for t in config.targets) + ACK_TIMEOUT


def start(config: Config, adapters: Adapters, *, lock_fd: int | None = None,
          started: float | None = None, on_progress=None) -> dict[str, Any]:
    """Fork the holder and wait until it holds every target (or failed); the freeze.

    *lock_fd* is the freeze lock if the caller took it already, and *started* the wall
    time the freeze began: a thaw noted after it cancels this freeze.
    """
    started = started or time.time()
    if lock_fd is None:
        prepare_runtime_dir(config.runtime_dir)
        lock_fd = take_lock(config.runtime_dir)
    report_r, report_w = os.pipe()
    ack_r, ack_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the holder
        code = 70
        try:
            os.setsid()  # out of the caller's session: the host's signals are not ours
            os.close(report_r)
            os.close(ack_w)
            os.chdir(config.runtime_dir)  # never keep a frozen filesystem as cwd
            _redirect_stdio()  # never hold the host's pipes open
            # lock_fd stays open in this process: the lock lives exactly as long as we do
            code = Holder(config, adapters, report_fd=report_w, ack_fd=ack_r,
                          started=started).run()
        except BaseException:
            log.exception("holder crashed")
            logging.shutdown()
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(ack_r)
    os.close(lock_fd)  # the holder's copy keeps the lock
    deadline = time.monotonic() + freeze_budget(config)
    outcomes: list[dict[str, Any]] = []
    final = None
    pending = b""
    while final is None:
        # Raw reads, not a buffered readline: select() cannot see lines already buffered.
        readable, _, _ = select.select([report_r], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(report_r, 65536) if readable else b""
        if not chunk:
            break  # the holder died, or stalled past every bound
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if message["type"] == "progress":
                outcomes += message["outcomes"]
                if on_progress:
                    on_progress(message["outcomes"])
            elif final is None:
                final = message
    os.close(report_r)
    if final and final["type"] == "ready":
        os.write(ack_w, b"ack\n")
    os.close(ack_w)
    report: dict[str, Any] = {"ok": False, "action": "freeze-failed", "holder_pid": pid,
                              "outcomes": outcomes}
    if final is None:
        report["message"] = (f"the holder (pid {pid}) died or stalled before reporting; it "
                             f"releases whatever it took as soon as it sees freeze is gone")
    elif final["type"] == "ready":
        state = final["report"]
        until = time.strftime("%H:%M:%S", time.localtime(state["deadline"]))
        report.update(ok=True, action="frozen", held_since=state["held_since"],
                      deadline=state["deadline"],
                      message=f"holding {len(config.targets)} target(s) (holder pid {pid}) "
                              f"until `quiesce thaw`, or until the watchdog releases them at "
                              f"{until} (max_hold {config.max_hold:g} s)")
    else:
        released = final["report"]
        report["outcomes"] += released["outcomes"]
        failed = [o for o in outcomes if o["status"] != "ok"]
        names = ", ".join(f"{o['target']} ({o['phase']})" for o in failed) or "none"
        report["message"] = (f"freeze failed for {names}; every target it had quiesced "
                             f"was released" if failed else released["message"])
    return report


def recover(config: Config, adapters: Adapters, *, orphaned: bool = False) -> dict[str, Any]:
    """Thaw with no holder alive: release what the state file says is still held.

    The holder died (killed, crashed, machine trouble) with targets held. Session-bound
    holds ended with it at an unknown moment, so they are reported as broken; server-kept
    states (a Redis pause, a MongoDB fsync lock) are released here through their adapters.
    With *orphaned* (the stand-in watchdog, after the deadline) the release is reported
    as broken and left unacknowledged, so the operator's own thaw still reports it.
    """
    prepare_runtime_dir(config.runtime_dir)
    lock_fd = take_lock(config.runtime_dir)  # BusyError: a holder lives but did not answer
    try:
        state = read_state(config.runtime_dir)
        if state is None or state.get("corrupt"):
            if orphaned:
                state = {"targets": []}
            else:  # nothing trustworthy is recorded: every adapter releases what it can
                state = {"holder_pid": "?", "targets": [
                    {"name": t.name, "kind": t.kind, "status": "held", "session_bound": True,
                     "facts": {}} for t in config.targets]}
        pending = [e for e in reversed(state["targets"]) if e["status"] in {"held", "quiescing"}]
        if orphaned and not pending:
            return {"ok": True, "action": "nothing-held", "outcomes": [],
                    "message": "stand-in watchdog: nothing was held"}
        pid = state.get("holder_pid", "?")
        outcomes = [_recover_one(config, adapters, entry, pid, orphaned) for entry in pending]
        ok = all(o.ok for o in outcomes)
        message = (f"no holder was alive; released {len(outcomes)} target(s) recorded as held"
                   + ("" if ok else ": not every hold covered the window"))
        state.update(phase="released", released_by="watchdog" if orphaned else "recovery",
                     released_at=time.time(), acknowledged=not orphaned, message=message,
                     outcomes=[o.as_dict() for o in outcomes])
        write_state(config.runtime_dir, state)
        return {"ok": ok, "action": "recovered", "message": message,
                "outcomes": [o.as_dict() for o in outcomes]}
    finally:
        os.close(lock_fd)


def _recover_one(config: Config, adapters: Adapters, entry: dict[str, Any], pid: Any,
                 orphaned: bool) -> Outcome:
    target = config.target(entry["name"])
    if target is None:
        return Outcome(entry["name"], entry["kind"], "thaw", "failed", 0.0,
                       error="recorded as held but no longer in the config; release it by hand")
    # bounded like every phase: a server that hangs must not hang the post-script
    [(outcome, _)] = run_phase(adapters, "thaw", [target],
                               hold=Hold(session=None, facts=entry.get("facts") or {}))
    if outcome.status == "ok" and orphaned:
        outcome.status = "broken"
        outcome.error = (f"the holder (pid {pid}) had died; a stand-in watchdog released it "
                         f"after max_hold ({config.max_hold:g} s), before thaw came")
    elif outcome.status == "ok" and (entry["session_bound"] or entry["status"] == "quiescing"):
        outcome.status = "broken"
        outcome.error = (f"the holder (pid {pid}) died before thaw and its session ended "
                         f"with it, at an unknown time")
    entry["status"] = _after_thaw(outcome)
    return outcome
