"""The holder: the detached process that keeps the targets quiesced (the process shell).

Session-bound states (a SQLite write lock, a MySQL global read lock, a PostgreSQL
backup) live only as long as the connection that created them, and the pre-script must
return before the snapshot starts. So ``quiesce freeze`` forks this process, which runs
the cycle (``orchestrator.Cycle``: the phases and the record) and keeps its connections
open until a release. This module is only the process around it: the fork and the pipes
to freeze, the control socket and the thaw FIFO, signals, the sentinel, the
single-holder lock and the time budgets. It releases every target on the first of:

* a ``thaw`` request (the normal case);
* the watchdog: ``max_hold`` seconds after the first target's lock was taken;
* the ``freeze`` command dying before it acknowledged "ready";
* SIGTERM or SIGINT.

It keeps its state on tmpfs and its log lines in memory until the targets are released,
because the host may freeze every disk filesystem while it holds (invariant 2 in docs/architecture.md). Its control socket is
an abstract unix socket named after the runtime dir: bound by ``freeze`` before anything
else, it is the single-holder lock and lives exactly as long as the holder serves,
whatever happens to the files in the runtime dir. After a release nobody has been told
about yet, the holder keeps it (and its report) until a ``thaw`` collects the report, a
new ``freeze`` asks it to step aside, or KEEP_REPORT passes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import Any

from . import logs, publish, report as reports, scope
from .config import Config
from .errors import BusyError, ConfigError
from .orchestrator import EARLY_THAW, Cycle, Events, step_limit
from .plugins import Adapters
from .report import Report
from .runtime import (FIFO_NAME, Unresponsive, UntrustedPeer, holder_address, peer_of, request,
                      still_held, thaw_requested_since, unsafe_runtime_dir, write_state)

log = logging.getLogger(__name__)

ACK_TIMEOUT = 30.0      # how long the holder waits for freeze to acknowledge "ready"
SENTINEL_GRACE = 5.0    # how long after the deadline the stand-in watchdog acts
SENTINEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sentinel.py")
KEEP_REPORT = 600.0     # how long a released holder waits for a thaw to collect its report
LOCK_WAIT = 2.0         # how long freeze waits for a starting freeze or a yielding holder


def prepare_runtime_dir(path: str) -> None:
    """Create the runtime directory, private to this user (it holds the holder's state).

    Refused when another user could replace it or anything above it (see
    thaw.unsafe_runtime_dir): whoever could would control what thaw reads.
    """
    reason = unsafe_runtime_dir(path)
    if reason:
        raise ConfigError(f"refusing runtime_dir {path}: {reason}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise ConfigError(f"cannot create runtime_dir {path}: {e}") from e
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError(f"refusing runtime_dir {path}: it must be a directory that belongs "
                          f"to this user and is private; run: chown {os.geteuid()} {path} && "
                          f"chmod 700 {path}")


def take_lock(runtime_dir: str, *, supersede: bool = False) -> socket.socket:
    """Bind the holder's abstract socket (the single-holder lock), or BusyError.

    With *supersede* (a freeze), a holder that has released everything and only keeps
    an uncollected report is asked to step aside; its report is then shown as a warning.
    """
    address = holder_address(runtime_dir)
    give_up = time.monotonic() + LOCK_WAIT
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(address)
            return sock
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE:
                raise
        answer = _ask(runtime_dir, "yield" if supersede else "status")
        if answer is not None and not answer.get("yielded"):
            raise _busy(answer)
        if answer is not None and answer.get("report"):
            sys.stderr.write(f"quiesce: warning: an earlier hold (holder pid "
                             f"{answer.get('holder_pid')}) was never reported to a thaw: "
                             f"{answer['report'].get('message')}\n")
        if time.monotonic() > give_up:
            raise BusyError("another quiesce freeze is starting for this runtime_dir; "
                            "wait for it, or run `quiesce status`")
        time.sleep(0.05)


def _ask(runtime_dir: str, op: str) -> dict[str, Any] | None:
    try:
        return request(runtime_dir, op)
    except Unresponsive as e:
        pid = e.pid or "?"
        raise BusyError(f"the holder (pid {pid}) does not answer within {e.waited:g} s: it is "
                        f"stopped or stuck; `kill {pid}` ends it, then run `quiesce thaw`"
                        ) from None
    except UntrustedPeer as e:
        raise BusyError(str(e)) from None


def _busy(answer: dict[str, Any]) -> BusyError:
    since = answer.get("held_since") or answer.get("started_at")
    when = time.strftime("%H:%M:%S", time.localtime(since)) if since else "unknown time"
    return BusyError(f"targets are already held since {when} by holder pid "
                     f"{answer.get('holder_pid', '?')}; run `quiesce thaw` first "
                     f"(or `quiesce status`)")


class Holder:
    """The holder process: runs one Cycle and serves thaw, status and yield requests."""

    def __init__(self, config: Config, adapters: Adapters, *, server: socket.socket,
                 report_fd: int, ack_fd: int, started: float):
        self.config, self.adapters = config, adapters
        self.runtime_dir = config.runtime_dir
        self.control = Control(self, server)
        self.report_fd, self.ack_fd = report_fd, ack_fd
        self.cycle = Cycle(config, adapters, Events(
            progress=lambda outcomes: self._send({"type": "progress", "outcomes": outcomes}),
            save=self.save, deadline=self._tell_sentinel, thaw_came=self._thaw_came,
            freeze_gone=self._parent_gone), started=started, holder_pid=os.getpid())
        self.cancel = threading.Event()      # a thaw came before freeze finished
        self.freeze_done = threading.Event()  # set as "ready" is sent: later thaws are on time
        self.released = threading.Event()
        self.answered = threading.Event()    # a thaw (or freeze) was told the report
        self.signalled: str | None = None
        self.sentinel: subprocess.Popen | None = None
        self._release_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self.published = False  # the cycle was told to the outside world (metrics, journal)

    @property
    def state(self):
        return self.cycle.state

    # -- the cycle's callbacks ---------------------------------------------------

    def save(self) -> None:
        try:
            write_state(self.runtime_dir, self.state)
        except OSError as e:  # the runtime dir was removed: the socket still answers
            log.warning("cannot record the state in %s: %s", self.runtime_dir, e)

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

    def _tell_sentinel(self, deadline: float) -> None:
        if self.sentinel is not None and self.sentinel.stdin is not None:
            try:
                self.sentinel.stdin.write(f"{deadline}\n".encode())
                self.sentinel.stdin.flush()
            except OSError:
                pass

    # -- freeze and release --------------------------------------------------------

    def _handshake(self) -> bool:
        """Tell freeze we hold (what we could); true once it acknowledged (it is alive)."""
        self.cycle.holding()
        with self._release_lock:
            # From here a thaw is on time: freeze returns as soon as it reads "ready", and
            # a thaw after that must never be called early (`quiesce exec` thaws at once).
            self.freeze_done.set()
            # only what freeze's report needs (report.frozen): the facts are in the outcomes
            state = self.state
            self._send({"type": "ready", "outcomes": self.cycle.quiesced, "report": {
                "held_since": state["held_since"], "deadline": state["deadline"],
                "not_held": state.get("not_held") or [],
                "targets": [{"name": t["name"], "status": t["status"]}
                            for t in state["targets"]]}})
        readable, _, _ = select.select([self.ack_fd], [], [], ACK_TIMEOUT)
        return bool(readable) and os.read(self.ack_fd, 16).startswith(b"ack")

    def release(self, by: str, reason: str | None = None) -> Report:
        """Release every target once (Cycle.release); later calls get the same report."""
        with self._release_lock:
            if self.cycle.report is None:
                self.cycle.release(by, reason, promised=self.freeze_done.is_set())
                self.released.set()
                if by == "freeze-failed":
                    self.answered.set()  # freeze itself reports it
            return self.cycle.report

    def thaw_now(self) -> Report:
        """A thaw came (socket or FIFO): release; before "ready", cancel the freeze first.

        A thaw that comes while freeze still runs waits for the step in progress to end
        and everything to be released (within budget()), so that when the post-script
        ends nothing is held.
        """
        if not self.freeze_done.is_set():
            budget = self.budget()
            self.cancel.set()  # the freeze stops at its next step and releases everything
            if self.released.wait(timeout=budget):
                return self.cycle.report
            return {"ok": False, "action": "freeze-in-progress", "outcomes": [],
                    "holder_pid": os.getpid(),
                    "message": f"{EARLY_THAW}: the holder (pid {os.getpid()}) releases every "
                               f"target as soon as its current step ends"}
        return self.release("thaw")

    def budget(self) -> float:
        """How long a thaw may take from now: the release, after any step in progress."""
        return self.cycle.budget(promised=self.freeze_done.is_set())

    def status_report(self) -> dict[str, Any]:
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
            self.control.start()
            self.save()
            # Started before anything is held, so the hold never pays for its fork and exec.
            self.sentinel = _start_sentinel(self.config)
            if not self.cycle.freeze():
                early = self.cancel.is_set()
                self.release("thaw" if early else "freeze-failed", EARLY_THAW if early else None)
                self._send({"type": "failed", "report": self.cycle.report,
                            "reason": self.cycle.failure})
                return 1
            if not self._handshake():
                self.release("freeze-died", "the freeze command died before it reported "
                                            "ready, so no hold was promised")
            self._hold()
            # The disk may be written now, but never by the thread that keeps the lock.
            threading.Thread(target=self._tell_outside, args=(write_log,), daemon=True).start()
            self._keep_report()
            return 0
        finally:
            self._end(write_log)

    def _tell_outside(self, write_log) -> None:
        """After release: the cycle's metrics and journal line (once), then the log file."""
        with self._publish_lock:
            if not self.published:
                self.published = True
                publish.cycle_finished(self.config, self.state)
        write_log()

    def _hold(self) -> None:
        while not self.released.wait(timeout=0.2):
            if self.signalled:
                self.release("signal", f"the holder received {self.signalled} and "
                                       f"released every target before thaw came")
            elif time.monotonic() >= self.cycle.deadline:
                self.release("watchdog", f"the watchdog released it after max_hold "
                                         f"({self.config.max_hold:g} s), before thaw came")
            elif self._thaw_came():  # a thaw that could not reach the socket left a note
                self.release("thaw")

    def _keep_report(self) -> None:
        """Serve the report until a thaw collects it, even if the runtime dir is gone."""
        give_up = time.monotonic() + KEEP_REPORT
        while not self.answered.wait(timeout=0.2):
            if self.signalled or self.control.stopping.is_set() or time.monotonic() > give_up:
                return

    def _end(self, write_log) -> None:
        """Release anything left, give up the lock, and only then touch the disk."""
        self.freeze_done.set()
        if self.cancel.is_set():  # a thaw client may be waiting for its answer
            self.answered.wait(timeout=5.0)
        try:
            if self.cycle.report is None and self.cycle.holds:
                self.release("holder-error", "the holder failed and released every target")
            self.control.stop()
            if self.sentinel is not None and not still_held(self.state):
                self.sentinel.kill()  # nothing left that a stand-in would have to release
                self.sentinel.wait()
        finally:
            try:
                os.unlink(FIFO_NAME)
            except OSError:
                pass
            self._tell_outside(write_log)  # released, lock free: may block safely


class Control:
    """The holder's ears: the control socket (thaw, status, yield) and the thaw FIFO."""

    def __init__(self, holder: Holder, server: socket.socket):
        self.holder = holder
        self.server = server  # bound by freeze; listening from our start to our end
        self.stopping = threading.Event()  # closed: a new freeze may take the lock

    def start(self) -> None:
        self.server.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()
        threading.Thread(target=self._watch_fifo, daemon=True).start()

    def _watch_fifo(self) -> None:
        """Release on the first line written to the thaw FIFO (the post-script's printf)."""
        try:
            os.unlink(FIFO_NAME)
        except FileNotFoundError:
            pass
        os.mkfifo(FIFO_NAME, 0o600)
        fd = os.open(FIFO_NAME, os.O_RDWR | os.O_NONBLOCK)
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid():
            log.warning("%s was replaced by something else; not watching it", FIFO_NAME)
            return
        os.set_blocking(fd, True)  # read-write: never sees EOF, never blocks a writer
        while os.read(fd, 64):
            log.info("thaw requested through %s", FIFO_NAME)
            self.holder.thaw_now()

    def _serve(self) -> None:
        self.server.settimeout(0.5)  # so that stop() is seen promptly
        while not self.stopping.is_set():
            try:
                conn, _ = self.server.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError as e:  # e.g. EMFILE: keep serving rather than die
                if self.stopping.is_set():
                    break
                log.warning("control socket: %s", e)
                time.sleep(0.1)
                continue
            with conn:
                try:
                    self._answer(conn)
                except Exception as e:  # one bad request must never stop the server
                    log.warning("control request failed: %s", e)

    def stop(self) -> None:
        """Give up the abstract name: from now on a new freeze may start."""
        self.stopping.set()
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()

    def _answer(self, conn: socket.socket) -> None:
        _, uid = peer_of(conn)
        if uid not in {0, os.geteuid()}:
            log.warning("refused a control request from uid %d", uid)
            return
        conn.settimeout(5.0)
        op = json.loads(conn.makefile("rb").readline() or b"{}").get("op")
        budget = self.holder.budget()
        conn.sendall(json.dumps({"pid": os.getpid(), "budget": budget}).encode() + b"\n")
        conn.settimeout(budget + 5.0)
        if op == "thaw":
            report = self.holder.thaw_now()
            conn.sendall(json.dumps(report, default=str).encode())
            if report.get("action") == "thawed":
                self.holder.state["acknowledged"] = True  # only now has a thaw told the operator
                self.holder.save()
                self.holder.answered.set()
        elif op == "status":
            conn.sendall(json.dumps(self.holder.status_report(), default=str).encode())
        elif op == "yield":
            self._yield(conn)

    def _yield(self, conn: socket.socket) -> None:
        """A new freeze asks for the lock: give it up once nothing is held any more."""
        if self.holder.cycle.report is None:
            conn.sendall(json.dumps({"yielded": False, **self.holder.status_report()},
                                    default=str).encode())
            return
        self.stop()  # before answering: the asker binds as soon as it reads this
        unreported = None if self.holder.answered.is_set() else self.holder.cycle.report
        conn.sendall(json.dumps({"yielded": True, "holder_pid": os.getpid(),
                                 "report": unreported}, default=str).encode())


def _start_sentinel(config: Config) -> subprocess.Popen | None:
    """A process that plays the watchdog if the holder dies holding server-kept states.

    A MongoDB fsync lock has no server-side deadline: if the holder were killed and no
    thaw came, the server would stay locked. The sentinel learns the deadline from the
    holder through a pipe, wakes shortly after it once the holder has ended, and
    releases what that holder recorded as held, if no other holder has the lock.
    """
    try:
        return subprocess.Popen([sys.executable, "-I", "-S", "-B", SENTINEL,
                                 str(SENTINEL_GRACE), config.path, str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, cwd="/")
    except OSError as e:
        log.warning("cannot start the stand-in watchdog: %s", e)
        return None


def _redirect_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def freeze_budget(config: Config) -> float:
    """The longest `quiesce freeze` waits: three phases at the hard limit, then the ack."""
    return 3 * step_limit(config.targets) + ACK_TIMEOUT


def start(config: Config, adapters: Adapters, *, lock: socket.socket | None = None,
          started: float | None = None, on_progress=None) -> Report:
    """Fork the holder and wait until it holds the targets (or failed); the freeze.

    *lock* is the holder's socket if the caller took it already (take_lock), and
    *started* the wall time the freeze began: a thaw noted after it cancels this freeze.
    """
    started = started or time.time()
    if lock is None:
        prepare_runtime_dir(config.runtime_dir)
        lock = take_lock(config.runtime_dir, supersede=True)
    report_r, report_w = os.pipe()
    ack_r, ack_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the holder
        code = 70
        try:
            os.setsid()  # out of the caller's session: the host's signals are not ours
            scope.enter(config.holder_scope)  # before stdio goes: its warning reaches freeze's
            os.close(report_r)
            os.close(ack_w)
            os.chdir(config.runtime_dir)  # never keep a frozen filesystem as cwd
            _redirect_stdio()  # never hold the host's pipes open
            code = Holder(config, adapters, server=lock, report_fd=report_w, ack_fd=ack_r,
                          started=started).run()
        except BaseException:
            log.exception("holder crashed")
            logging.shutdown()
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(ack_r)
    lock.close()  # the holder's copy is the lock now
    final, outcomes = _follow(report_r, time.monotonic() + freeze_budget(config), on_progress)
    os.close(report_r)
    if final and final["type"] == "ready":
        os.write(ack_w, b"ack\n")
    os.close(ack_w)
    return _freeze_report(config, pid, final, outcomes)


def _follow(report_r: int, deadline: float, on_progress) -> tuple[dict | None, list[dict]]:
    """Read the holder's progress until its final message (None: it died or stalled)."""
    outcomes: list[dict[str, Any]] = []
    pending = b""
    while True:
        # Raw reads, not a buffered readline: select() cannot see lines already buffered.
        readable, _, _ = select.select([report_r], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(report_r, 65536) if readable else b""
        if not chunk:
            return None, outcomes  # the holder died, or stalled past every bound
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            message = json.loads(line)
            outcomes += message.get("outcomes", [])  # "ready" carries the last phase's
            if on_progress and message.get("outcomes"):
                on_progress(message["outcomes"])
            if message["type"] != "progress":
                return message, outcomes


def _freeze_report(config: Config, pid: int, final: dict | None,
                   outcomes: list[dict]) -> Report:
    """freeze's report: held (the holder's "ready"), or why not."""
    if final is not None and final["type"] == "ready":
        return reports.frozen(final["report"], pid, config.max_hold, outcomes)
    report = Report(ok=False, action="freeze-failed", holder_pid=pid, outcomes=outcomes)
    if final is None:
        report["message"] = (f"the holder (pid {pid}) died or stalled before reporting; it "
                             f"releases whatever it took as soon as it sees freeze is gone")
        return report
    released = final["report"]
    report["outcomes"] += released["outcomes"]
    failed = [o for o in outcomes if o["status"] != "ok"]
    names = ", ".join(f"{o['target']} ({o['phase']})" for o in failed) or "none"
    report["message"] = final.get("reason") or (
        f"freeze failed for {names}; every target it had quiesced was released" if failed
        else released["message"])
    return report
