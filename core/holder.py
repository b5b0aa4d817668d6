"""The holder: a detached process that quiesces the targets and keeps them quiesced.

Session-bound states (a SQLite write lock, a MySQL global read lock, a PostgreSQL
backup) live only as long as the connection that created them, and the pre-script must
return before the snapshot starts. So ``quiesce freeze`` forks this process, which runs
every phase itself, keeps the connections open, and waits for ``quiesce thaw`` on its
control socket. It releases every target, in reverse order, on the first of:

* a ``thaw`` request (the normal case);
* the watchdog: ``max_hold`` seconds after the first target's lock was taken;
* the ``freeze`` command dying before it acknowledged "ready";
* SIGTERM or SIGINT.

It keeps its state on tmpfs and its log lines in memory until the targets are released,
because the host may freeze every disk filesystem while it holds (invariant 2 in docs/architecture.md).
Its control socket is an abstract unix socket named after the runtime dir: bound by
``freeze`` before anything else, it is the single-holder lock and lives exactly as long
as the holder serves, whatever happens to the files in the runtime dir. After a release
nobody has been told about yet, the holder keeps it (and its report) until a ``thaw``
collects the report, a new ``freeze`` asks it to step aside, or KEEP_REPORT passes.
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

from . import logs, publish, scope
from .logs import IN_REPORT
from .config import Config
from .errors import BusyError, ConfigError
from .phases import Outcome, hard_limit, run_phase
from .plugins import Adapters
from .target import Hold, Target
from .thaw import (FIFO_NAME, STATE_NAME, Unresponsive, UntrustedPeer, holder_address, peer_of,
                   read_state, request, thaw_requested_since, unsafe_runtime_dir, write_state)

log = logging.getLogger(__name__)

ACK_TIMEOUT = 30.0      # how long the holder waits for freeze to acknowledge "ready"
EARLY_THAW = "thaw came before freeze had finished, so the snapshot was not covered"
THAW_STAGGER = 1.0      # longest one target's release may delay the next one's
SENTINEL_GRACE = 5.0    # how long after the deadline the stand-in watchdog acts
#: freeze fails rather than promise a hold with less than this left (or half of max_hold,
#: if that is less): the host still has to see the pre-script end and take its snapshot.
HOLD_MARGIN = 10.0
KEEP_REPORT = 600.0     # how long a released holder waits for a thaw to collect its report
LOCK_WAIT = 2.0         # how long freeze waits for a starting freeze or a yielding holder

# The stand-in watchdog. It belongs to one holder: it reads that holder's deadline from
# its stdin (a pipe only the holder writes), learns of the holder's end by EOF, and then
# only if a deadline was set (something may be quiesced) runs an orphan thaw for that
# holder's pid after the deadline. It never reads the state of a later freeze.
_SENTINEL = """
import os, sys, time
grace, config, pid = float(sys.argv[1]), sys.argv[2], sys.argv[3]
deadline = None
while True:
    line = sys.stdin.readline()
    if not line:
        break
    try:
        deadline = float(line)
    except ValueError:
        pass
if deadline is None:
    sys.exit(0)
time.sleep(max(0.0, deadline + grace - time.time()))
os.execv(sys.executable, [sys.executable, "-B", "-P", "-m", "quiesce", "--config", config,
                          "thaw", "--orphaned", pid])
"""


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


def release_budget(targets: list[Target]) -> float:
    """The longest a release can take: staggered starts, then the slowest hard limit."""
    if not targets:
        return 0.0
    return max(hard_limit(t) for t in targets) + THAW_STAGGER * (len(targets) - 1)


def hold_margin(config: Config) -> float:
    return min(HOLD_MARGIN, config.max_hold / 2)


class Holder:
    def __init__(self, config: Config, adapters: Adapters, *, server: socket.socket,
                 report_fd: int, ack_fd: int, started: float):
        self.config, self.adapters = config, adapters
        self.runtime_dir = config.runtime_dir
        self.server = server  # bound by freeze; listening from our start to our end
        self.report_fd, self.ack_fd = report_fd, ack_fd
        self.deadline = float("inf")  # monotonic: a clock step never stretches a hold
        self.holds: dict[str, Hold] = {}
        self.failed: list[dict[str, Any]] = []  # targets that could not be held (hold-others)
        self.failure: str | None = None  # why freeze failed, when no target's outcome says it
        self.cancel = threading.Event()      # a thaw came before freeze finished
        self.freeze_done = threading.Event()  # set as "ready" is sent: later thaws are on time
        self.released = threading.Event()
        self.answered = threading.Event()    # a thaw (or freeze) was told the report
        self.stopping = threading.Event()    # close the control socket: let a new freeze in
        self.signalled: str | None = None
        self.sentinel: subprocess.Popen | None = None
        self._release_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self.published = False  # the cycle was told to the outside world (metrics, journal)
        self.report: dict[str, Any] | None = None
        self.state: dict[str, Any] = {
            "version": 1, "config": config.path, "holder_pid": os.getpid(),
            "started_at": started, "held_since": None, "deadline": None,
            "max_hold": config.max_hold, "phase": "starting", "released_by": None,
            "released_at": None, "acknowledged": False, "outcomes": [], "not_held": [],
            "targets": [{"name": t.name, "kind": t.kind, "status": "pending",
                         "session_bound": False, "facts": {}} for t in config.targets],
        }

    # -- bookkeeping -------------------------------------------------------------

    def _save(self) -> None:
        try:
            write_state(self.runtime_dir, self.state)
        except OSError as e:  # the runtime dir was removed: the socket still answers
            log.warning("cannot record the state in %s: %s", self.runtime_dir, e)

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

    def _tell_sentinel(self, deadline: float) -> None:
        if self.sentinel is not None and self.sentinel.stdin is not None:
            try:
                self.sentinel.stdin.write(f"{deadline}\n".encode())
                self.sentinel.stdin.flush()
            except OSError:
                pass

    # -- freeze ------------------------------------------------------------------

    def _freeze(self) -> bool:
        """Check, flush, quiesce; true when there are holds that freeze may report."""
        targets = list(self.config.targets)
        # Started before anything is held, so the hold never pays for its fork and exec.
        self.sentinel = _start_sentinel(self.config)
        for hook in ("check", "flush"):
            self.state["phase"] = hook
            results = run_phase(self.adapters, hook, targets)
            self._send({"type": "progress", "outcomes": [o.as_dict() for o, _ in results]})
            targets = self._survivors(targets, results)
            if not targets or self._thaw_came() or self._parent_gone():
                return False
        self.state["phase"] = "quiesce"
        for target in targets:
            self._target_state(target.name)["status"] = "quiescing"  # a crash-thaw releases
        self._save()
        # the latest the deadline can be, until the first lock tells the real one
        self._tell_sentinel(time.time() + max(hard_limit(t) for t in targets)
                            + self.config.max_hold)
        started, started_mono = time.time(), time.monotonic()
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
        self._start_clock(started, started_mono, [o for o, _ in results if o.ok])
        self._save()
        self._send({"type": "progress", "outcomes": [o.as_dict() for o, _ in results]})
        if not self._survivors(targets, results) or self._thaw_came():
            return False
        return self._enough_left()

    def _survivors(self, targets: list[Target], results: list) -> list[Target]:
        """The targets to go on with: those that worked, or none (release-all)."""
        failed = [o for o, _ in results if not o.ok]
        for o in failed:
            self.failed.append({"target": o.target, "kind": o.kind, "phase": o.phase,
                                "error": o.error})
            if o.phase != "quiesce":
                self._target_state(o.target)["status"] = "failed"
        if failed and self.config.on_target_failure == "release-all":
            return []
        ok = {o.target for o, _ in results if o.ok}
        return [t for t in targets if t.name in ok]

    def _start_clock(self, started: float, started_mono: float, held: list[Outcome]) -> None:
        """max_hold runs from the first lock taken (the first quiesce to return)."""
        if not held:
            return
        first = min(o.duration for o in held)
        self.state["held_since"] = started + first
        self.state["deadline"] = started + first + self.config.max_hold
        self.deadline = started_mono + first + self.config.max_hold
        self._tell_sentinel(self.state["deadline"])

    def _enough_left(self) -> bool:
        """Refuse to promise a hold the watchdog would end before a snapshot could run."""
        left = self.deadline - time.monotonic()
        if left >= hold_margin(self.config):
            return True
        self.failure = (f"only {max(left, 0):.1f} s of max_hold ({self.config.max_hold:g} s) "
                        f"were left once every target was quiesced, less than the "
                        f"{hold_margin(self.config):g} s a snapshot needs; every target was "
                        f"released: raise max_hold, or find what made quiesce slow")
        return False

    def _handshake(self) -> bool:
        """Tell freeze we hold (what we could); true once it acknowledged (it is alive)."""
        self.state.update(phase="held", frozen_at=time.time(), not_held=self.failed)
        self._save()
        with self._release_lock:
            # From here a thaw is on time: freeze returns as soon as it reads "ready", and
            # a thaw after that must never be called early (`quiesce exec` thaws at once).
            self.freeze_done.set()
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
            not_held = self.failed if self.freeze_done.is_set() else []
            ok = not reason and not not_held and all(o.ok for o in outcomes)
            message = reason or (f"released {len(outcomes)} target(s), held for {held_for:.1f} s"
                                 if all(o.ok for o in outcomes) else
                                 "released, but not every target was held to the end")
            if not_held and not reason:
                message += "; not consistent in this snapshot (never held): " + ", ".join(
                    f"{f['target']} ({f['phase']} failed)" for f in not_held)
            told = by == "freeze-failed" or (by == "thaw" and reason == EARLY_THAW)
            self.state.update(phase="released", released_by=by, released_at=now,
                              outcomes=[o.as_dict() for o in outcomes], message=message,
                              acknowledged=told)
            self._save()
            self.report = {"ok": ok, "action": "thawed", "released_by": by,
                           "held_for": round(held_for, 3), "message": message,
                           "not_held": not_held, "outcomes": [o.as_dict() for o in outcomes]}
            self.released.set()
            if by == "freeze-failed":
                self.answered.set()  # freeze itself reports it
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

        def judge(outcome: Outcome) -> None:  # before it is logged: log and report agree
            if reason and outcome.status == "ok":
                outcome.status, outcome.error = "broken", reason
        results = run_phase(self.adapters, "thaw", held, stagger=THAW_STAGGER, judge=judge,
                            kwargs_for=lambda t: {"hold": holds[t.name]})
        outcomes = []
        for target, (outcome, _) in zip(held, results):
            judge(outcome)  # an abandoned release was never judged in its thread
            self._target_state(target.name)["status"] = _after_thaw(outcome)
            outcomes.append(outcome)
        return outcomes

    # -- control socket ----------------------------------------------------------

    def _thaw_now(self) -> dict[str, Any]:
        """A thaw came (socket or FIFO): release; before "ready", cancel the freeze first.

        A thaw that comes while freeze still runs waits for the step in progress to end
        and everything to be released (within budget()), so that when the post-script
        ends nothing is held.
        """
        if not self.freeze_done.is_set():
            budget = self.budget()
            self.cancel.set()  # the freeze stops at its next step and releases everything
            if self.released.wait(timeout=budget):
                return self.report
            return {"ok": False, "action": "freeze-in-progress", "outcomes": [],
                    "holder_pid": os.getpid(),
                    "message": f"{EARLY_THAW}: the holder (pid {os.getpid()}) releases every "
                               f"target as soon as its current step ends"}
        return self.release("thaw")

    def budget(self) -> float:
        """How long a thaw may take from now: the release, after any step in progress."""
        if self.freeze_done.is_set():
            return release_budget([t for t in self.config.targets if t.name in self.holds])
        return max(hard_limit(t) for t in self.config.targets) + \
            release_budget(self.config.targets)

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
            self._thaw_now()

    def _serve(self) -> None:
        self.server.settimeout(0.5)  # so that stop_serving() is seen promptly
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

    def stop_serving(self) -> None:
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
        budget = self.budget()
        conn.sendall(json.dumps({"pid": os.getpid(), "budget": budget}).encode() + b"\n")
        conn.settimeout(budget + 5.0)
        if op == "thaw":
            report = self._thaw_now()
            conn.sendall(json.dumps(report, default=str).encode())
            if report.get("action") == "thawed":
                self.state["acknowledged"] = True  # only now has a thaw told the operator
                self._save()
                self.answered.set()
        elif op == "status":
            conn.sendall(json.dumps(self._status_report(), default=str).encode())
        elif op == "yield":
            self._yield(conn)

    def _yield(self, conn: socket.socket) -> None:
        """A new freeze asks for the lock: give it up once nothing is held any more."""
        if self.report is None:
            conn.sendall(json.dumps({"yielded": False, **self._status_report()},
                                    default=str).encode())
            return
        self.stop_serving()  # before answering: the asker binds as soon as it reads this
        unreported = None if self.answered.is_set() else self.report
        conn.sendall(json.dumps({"yielded": True, "holder_pid": os.getpid(),
                                 "report": unreported}, default=str).encode())

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
            self.server.listen(8)
            threading.Thread(target=self._serve, daemon=True).start()
            self._save()
            threading.Thread(target=self._watch_fifo, daemon=True).start()
            if not self._freeze():
                early = self.cancel.is_set()
                self.release("thaw" if early else "freeze-failed", EARLY_THAW if early else None)
                self._send({"type": "failed", "report": self.report, "reason": self.failure})
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
            elif time.monotonic() >= self.deadline:
                self.release("watchdog", f"the watchdog released it after max_hold "
                                         f"({self.config.max_hold:g} s), before thaw came")
            elif self._thaw_came():  # a thaw that could not reach the socket left a note
                self.release("thaw")

    def _keep_report(self) -> None:
        """Serve the report until a thaw collects it, even if the runtime dir is gone."""
        give_up = time.monotonic() + KEEP_REPORT
        while not self.answered.wait(timeout=0.2):
            if self.signalled or self.stopping.is_set() or time.monotonic() > give_up:
                return

    def _end(self, write_log) -> None:
        """Release anything left, give up the lock, and only then touch the disk."""
        self.freeze_done.set()
        if self.cancel.is_set():  # a thaw client may be waiting for its answer
            self.answered.wait(timeout=5.0)
        try:
            if self.report is None and self.holds:
                self.release("holder-error", "the holder failed and released every target")
            self.stop_serving()
            pending = [t for t in self.state["targets"] if t["status"] in {"held", "quiescing"}]
            if self.sentinel is not None and not pending:
                self.sentinel.kill()  # nothing left that a stand-in would have to release
                self.sentinel.wait()
        finally:
            try:
                os.unlink(FIFO_NAME)
            except OSError:
                pass
            self._tell_outside(write_log)  # released, lock free: may block safely


def _start_sentinel(config: Config) -> subprocess.Popen | None:
    """A process that plays the watchdog if the holder dies holding server-kept states.

    A MongoDB fsync lock has no server-side deadline: if the holder were killed and no
    thaw came, the server would stay locked. The sentinel learns the deadline from the
    holder through a pipe, wakes shortly after it once the holder has ended, and
    releases what that holder recorded as held, if no other holder has the lock.
    """
    try:
        return subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _SENTINEL,
                                 str(SENTINEL_GRACE), config.path, str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
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


def start(config: Config, adapters: Adapters, *, lock: socket.socket | None = None,
          started: float | None = None, on_progress=None) -> dict[str, Any]:
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
            if message["type"] != "progress":
                return message, outcomes
            outcomes += message["outcomes"]
            if on_progress:
                on_progress(message["outcomes"])


def _freeze_report(config: Config, pid: int, final: dict | None,
                   outcomes: list[dict]) -> dict[str, Any]:
    report: dict[str, Any] = {"ok": False, "action": "freeze-failed", "holder_pid": pid,
                              "outcomes": outcomes}
    if final is None:
        report["message"] = (f"the holder (pid {pid}) died or stalled before reporting; it "
                             f"releases whatever it took as soon as it sees freeze is gone")
    elif final["type"] == "ready":
        state = final["report"]
        until = time.strftime("%H:%M:%S", time.localtime(state["deadline"]))
        held = [t["name"] for t in state["targets"] if t["status"] == "held"]
        not_held = state.get("not_held") or []
        report.update(ok=not not_held, action="frozen" if not not_held else "partly-frozen",
                      held_since=state["held_since"], deadline=state["deadline"],
                      consistent=held, not_held=not_held,
                      message=f"holding {len(held)} target(s) (holder pid {pid}) "
                              f"until `quiesce thaw`, or until the watchdog releases them at "
                              f"{until} (max_hold {config.max_hold:g} s)")
        if not_held:
            report["message"] += (
                f"; consistent in the snapshot: {', '.join(held)}; NOT consistent (could not "
                f"be held): " + ", ".join(f"{f['target']} ({f['phase']})" for f in not_held))
    else:
        released = final["report"]
        report["outcomes"] += released["outcomes"]
        failed = [o for o in outcomes if o["status"] != "ok"]
        names = ", ".join(f"{o['target']} ({o['phase']})" for o in failed) or "none"
        report["message"] = final.get("reason") or (
            f"freeze failed for {names}; every target it had quiesced was released" if failed
            else released["message"])
    return report


def recover(config: Config, adapters: Adapters, *,
            orphaned_by: int | None = None) -> dict[str, Any]:
    """Thaw with no holder alive: release what the state file says is still held.

    The holder died (killed, crashed, machine trouble) with targets held. Session-bound
    holds ended with it at an unknown moment, so they are reported as broken; server-kept
    states (a Redis pause, a MongoDB fsync lock) are released here through their adapters.
    With *orphaned_by* (the stand-in watchdog of that holder pid, after its deadline) only
    that holder's record is acted on; the release is reported as broken and left
    unacknowledged, so the operator's own thaw still reports it.
    """
    orphaned = orphaned_by is not None
    prepare_runtime_dir(config.runtime_dir)
    lock = take_lock(config.runtime_dir)  # BusyError: a holder lives but did not answer
    try:
        state = read_state(config.runtime_dir)
        if state is None or state.get("corrupt") or (
                orphaned and state.get("holder_pid") != orphaned_by):
            if orphaned:  # nothing of its holder's is recorded (a later freeze's record)
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
        lock.close()


def _recover_one(config: Config, adapters: Adapters, entry: dict[str, Any], pid: Any,
                 orphaned: bool) -> Outcome:
    target = config.target(entry["name"])
    if target is None:
        return Outcome(entry["name"], entry["kind"], "thaw", "failed", 0.0,
                       error="recorded as held but no longer in the config; release it by hand")

    def judge(outcome: Outcome) -> None:  # before it is logged: log and report agree
        if outcome.status == "ok" and orphaned:
            outcome.status = "broken"
            outcome.error = (f"the holder (pid {pid}) had died; a stand-in watchdog released "
                             f"it after max_hold ({config.max_hold:g} s), before thaw came")
        elif outcome.status == "ok" and (entry["session_bound"] or entry["status"] == "quiescing"):
            outcome.status = "broken"
            outcome.error = (f"the holder (pid {pid}) died before thaw and its session ended "
                             f"with it, at an unknown time")
    # bounded like every phase: a server that hangs must not hang the post-script
    [(outcome, _)] = run_phase(adapters, "thaw", [target], judge=judge,
                               hold=Hold(session=None, facts=entry.get("facts") or {}))
    entry["status"] = _after_thaw(outcome)
    return outcome
