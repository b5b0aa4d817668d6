"""MySQL and MariaDB: the lightest global lock that makes the snapshot consistent, held in
the holder's session, with bounded waits and the binary-log coordinates in the snapshot.

Strategies (``strategy``; ``auto`` picks from ``VERSION()`` / ``@@version_comment``):

backup_stage   MariaDB 10.4.1+. ``BACKUP STAGE START`` then ``BLOCK_COMMIT`` (which runs
               the ``FLUSH`` and ``BLOCK_DDL`` stages on its way: MariaDB's sequence for
               storage snapshots) held; ``BACKUP STAGE END`` at thaw. Non-transactional
               tables are flushed and closed, DDL and commits wait; running InnoDB
               statements and DDL do not hold it up. Coordinates are exact.
instance_lock  MySQL 8.0+. ``LOCK INSTANCE FOR BACKUP`` (blocks DDL and file operations,
               lets DML and commits go on); coordinates from ``performance_schema.log_status``
               taken under the lock, so they are a consistent point just *before* the
               snapshot, not the snapshot's own. When non-transactional user tables exist,
               or ``exact_coordinates = true``, ``FLUSH TABLES WITH READ LOCK`` is taken
               on top (same guards as ``ftwrl``) and coordinates are exact.
ftwrl          Everything else. ``FLUSH TABLES WITH READ LOCK``; ``UNLOCK TABLES`` at thaw.

Bounded impact: the holder session sets ``lock_wait_timeout`` (and, on MariaDB,
``max_statement_time``); before a lock that would wait for running statements while
writers queue behind it (FTWRL), ``information_schema.PROCESSLIST`` is read and the
attempt is abandoned — or the statements are killed, with ``kill_long_queries`` — when one
has run longer than ``long_query_threshold``. A failed attempt releases what it took
(``BACKUP STAGE END`` / ``UNLOCK ...``); if the client-side read timeout fires, the
holder's own session is killed from a second connection, so no queued lock request is
left. ``wait_timeout`` on the holder session is a server-side dead-man switch a little
past ``max_hold``.

The SQL for a given flavour, version and strategy is computed by pure functions in
:mod:`quiesce.adapters.mysql_strategies` (``choose_strategy``, ``lock_plan``,
``replica_sql``, ``coordinates_sql``, ``required_privileges``), so the MySQL-only paths are
tested without a MySQL server. The settings (read once, by :func:`settings`) and the
sessions live in :mod:`quiesce.adapters.mysql_connection`; this module acquires the lock
and implements the hooks.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from quiesce import Hold, HoldBroken, Target, TargetError, hookimpl
from quiesce.adapters.mysql_connection import (COORDINATES_NAME, CR_CONNECTION_LOST,
                                               DENIED_CODES, ER_BACKUP_NOT_RUNNING,
                                               ER_KILL_DENIED, ER_NO_SUCH_THREAD, TIMEOUT_CODES,
                                               Settings, close, connect, driver, error_code,
                                               error_text, nontransactional_tables, query,
                                               query_dicts, server_info, settings)
from quiesce.adapters.mysql_strategies import (Plan, Server, choose_strategy, grant_statements,
                                               is_suspect, is_victim, lock_plan,
                                               missing_privileges, parse_grants, processlist_sql,
                                               replica_sql, required_privileges,
                                               session_setup_sql)

# Connections this module released in thaw: a second thaw is then a no-op, not a "lost
# session". Weak, so a closed connection is not kept alive by it.
_RELEASED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _make_plan(conn, server: Server, s: Settings) -> Plan:
    strategy = choose_strategy(s.strategy, server)
    ftwrl_too = strategy == "instance_lock" and (s.exact_coordinates
                                                 or bool(nontransactional_tables(conn)))
    return lock_plan(server, strategy, ftwrl_too=ftwrl_too)


def _check_privileges(conn, server: Server, plan: Plan, info: dict, s: Settings) -> None:
    grants = parse_grants([r[0] for r in query(conn, "SHOW GRANTS")])
    needs = required_privileges(server, plan, binlog=info["log_bin"], kill=s.kill_long_queries,
                                replica=s.stop_replica_sql_thread)
    missing = missing_privileges(needs, grants)
    if missing:
        what = ", ".join(f"{n.grant} (for {n.why})" for n in missing)
        raise TargetError(f"the account {info['account']} lacks {what} for strategy "
                          f"{plan.strategy!r} on {server.label}; run: "
                          + "; ".join(grant_statements(missing, info["account"])))


def _replica_status(conn, server: Server) -> dict[str, Any] | None:
    rows = query_dicts(conn, replica_sql(server, "status"))
    if not rows:
        return None
    r = rows[0]

    def pick(*names):
        return next((r[n] for n in names if n in r), None)

    status = {"source_host": pick("Source_Host", "Master_Host"),
              "io_running": pick("Replica_IO_Running", "Slave_IO_Running"),
              "sql_running": pick("Replica_SQL_Running", "Slave_SQL_Running"),
              "relay_source_log_file": pick("Relay_Source_Log_File", "Relay_Master_Log_File"),
              "exec_source_log_pos": pick("Exec_Source_Log_Pos", "Exec_Master_Log_Pos"),
              "seconds_behind_source": pick("Seconds_Behind_Source", "Seconds_Behind_Master")}
    for gtid in ("Executed_Gtid_Set", "Gtid_Slave_Pos", "Gtid_IO_Pos"):
        if r.get(gtid):
            status[gtid.lower()] = r[gtid]
    if server.mariadb:
        status["gtid_slave_pos"] = query(conn, "SELECT @@GLOBAL.gtid_slave_pos")[0][0]
    return {k: (int(v) if isinstance(v, int) else v) for k, v in status.items()}


@dataclass
class Blocker:
    id: int
    user: str
    host: str
    seconds: float
    state: str
    info: str

    def describe(self) -> str:
        text = " ".join(self.info.split())
        return (f"query {self.id} by {self.user} running {self.seconds:.0f} s "
                f"({self.state or 'no state'}): {text[:80]!r}")


def _running(conn, server: Server, kind: str, older_than: float) -> list[Blocker]:
    found = []
    for id_, user, host, _cmd, seconds, state, info in query(conn, processlist_sql(server)):
        if float(seconds or 0) >= older_than and is_suspect(kind, info or "") \
                and not is_victim(state):
            found.append(Blocker(int(id_), user or "", host or "", float(seconds or 0),
                                 state or "", info or ""))
    return found


def _kill_queries(conn, blockers: list[Blocker], account: str) -> list[int]:
    killed = []
    for b in blockers:
        try:
            query(conn, f"KILL QUERY {int(b.id)}")
            killed.append(b.id)
        except Exception as e:
            if error_code(e) == ER_NO_SUCH_THREAD:
                continue  # it ended meanwhile
            if error_code(e) == ER_KILL_DENIED:
                user, _, host = account.rpartition("@")
                raise TargetError(f"kill_long_queries: not allowed to kill {b.describe()}; run: "
                                  f"GRANT CONNECTION ADMIN ON *.* TO '{user}'@'{host}' (MySQL: "
                                  f"CONNECTION_ADMIN)") from None
            raise
    return killed


def _wait_gone(conn, ids: list[int], deadline: float) -> None:
    """Give killed statements a moment to roll back, so the next lock does not wait for them."""
    while ids and time.monotonic() < deadline:
        left = query(conn, "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO IS NOT NULL "
                           f"AND ID IN ({', '.join(str(int(i)) for i in ids)})")
        if not left:
            return
        time.sleep(0.05)


def _release(conn, statements, *, strict: bool = False) -> list[str]:
    """Run the release statements; collect (strict) or swallow the errors."""
    problems = []
    for stmt in statements:
        try:
            query(conn, stmt)
        except Exception as e:
            if strict:
                problems.append(_release_problem(stmt, e))
    return problems


def _release_problem(stmt: str, error: Exception) -> str:
    if error_code(error) == ER_BACKUP_NOT_RUNNING:
        return f"{stmt}: no backup stage was active (the lock had been lost)"
    return f"{stmt} failed: {error_text(error)}"


class _PreparedRelease:
    """The release statement, written by the core as soon as thaw comes (``Hold.release``:
    back to back with the other targets' releases, before any thaw thread wakes); thaw
    then reads its reply. On a multi-statement session the session check goes in the same
    packet. Only for a single statement, on a session that can write a query without
    reading its reply (see _lock_together)."""

    CHECK = "SELECT CONNECTION_ID()"

    def __init__(self, conn, stmt: str):
        self.conn, self.stmt, self.sent = conn, stmt, False
        self.checks = bool(getattr(conn, "client_flag", 0)
                           & driver().constants.CLIENT.MULTI_STATEMENTS)

    @classmethod
    def of(cls, conn, statements: tuple[str, ...]) -> "_PreparedRelease | None":
        usable = len(statements) == 1 and hasattr(conn, "_execute_command")
        return cls(conn, statements[0]) if usable else None

    def send(self) -> None:
        packet = f"{self.stmt};{self.CHECK}" if self.checks else self.stmt
        self.conn._execute_command(driver().constants.COMMAND.COM_QUERY, packet)
        self.sent = True

    def finish(self) -> tuple[list[str], Any]:
        """Finish the release: read the reply (or, if it was never written, run it). Returns
        its problems, and the session id the check read with it (None: not read)."""
        if not self.sent:
            return _release(self.conn, (self.stmt,), strict=True), None
        try:
            self.conn.next_result()
        except Exception as e:  # the server ran no check after a failed statement
            return [_release_problem(self.stmt, e)], None
        if not self.checks:
            return [], None
        try:
            self.conn.next_result()
            return [], self.conn._result.rows[0][0]
        except Exception:  # the caller's own check finds out what went wrong
            return [], None


def _kill_session(target: Target, s: Settings, thread_id: int) -> None:
    """Kill the holder's own session from a second connection: after a client-side timeout
    the server may still have our lock request queued (writers queue behind it)."""
    try:
        other = connect(target, s)
    except TargetError:
        return
    try:
        query(other, f"KILL CONNECTION {int(thread_id)}")
    except Exception:
        pass  # already gone
    finally:
        close(other)


class _Busy(Exception):
    """One lock attempt failed for a reason worth retrying; nothing is held."""


@dataclass
class _Locked:
    """What a lock attempt that worked returns."""

    seconds: float                    # from writing the blocking statement to the last reply
    locked_at: float                  # wall clock, at the blocking statement's reply
    rows: list[list[dict[str, Any]]]  # each coordinates statement's rows, read under the lock


def _attempt(target: Target, s: Settings, conn, server: Server, plan: Plan,
             reads: tuple[str, ...], thread_id: int, account: str,
             killed: list[int]) -> _Locked:
    """One attempt: precheck, lock, and the coordinates statements *reads* under it; or
    raises _Busy / TargetError with nothing held. Appends the ids of statements it killed
    to *killed*."""
    if plan.precheck:
        blockers = _running(conn, server, plan.precheck, s.long_query_threshold)
        if blockers and not s.kill_long_queries:
            raise _Busy(f"{blockers[0].describe()} would make writers queue behind "
                        f"{plan.lock[-1]}" + (f" (and {len(blockers) - 1} more)"
                                               if len(blockers) > 1 else ""))
        if blockers:
            ids = _kill_queries(conn, blockers, account)
            killed += ids
            _wait_gone(conn, ids, time.monotonic() + s.lock_wait_timeout)
    started, locked_at, rows = time.monotonic(), time.time(), []
    pymysql = driver()
    for i, stmt in enumerate(plan.lock):
        try:
            if i == plan.blocks_from:
                # prepared: the statement that blocks writers goes out with the others', and
                # (when it is the last) with the coordinates reads
                last = i == len(plan.lock) - 1
                started, locked_at, rows = _lock_together(target, conn, stmt,
                                                          reads if last else ())
            else:
                query(conn, stmt)
        except pymysql.err.MySQLError as e:
            code = error_code(e)
            if code in CR_CONNECTION_LOST or not conn.open:
                # The client gave up (read timeout) or the session died: the server may still
                # have our request queued, with writers behind it. Kill the session.
                _kill_session(target, s, thread_id)
                raise TargetError(f"{stmt} did not complete within {target.timeout:g} s and "
                                  f"the connection was dropped ({error_text(e)}); the holder's "
                                  f"session {thread_id} was killed so no lock request is left "
                                  f"queued. Retry later") from None
            _release(conn, plan.release)  # undo earlier stages / locks of this attempt
            if code in TIMEOUT_CODES:
                suspects = _running(conn, server, plan.suspects, 0.0)
                if s.kill_long_queries:
                    old = [b for b in suspects if b.seconds >= s.long_query_threshold]
                    ids = _kill_queries(conn, old, account)
                    killed += ids
                    _wait_gone(conn, ids, time.monotonic() + s.lock_wait_timeout)
                behind = f" behind {suspects[0].describe()}" if suspects else ""
                raise _Busy(f"{stmt} timed out after lock_wait_timeout = "
                            f"{s.lock_wait_timeout} s{behind}") from None
            if code in DENIED_CODES:
                raise TargetError(f"{stmt} was refused: {error_text(e)}; run `quiesce check` for "
                                  f"the GRANT to run") from None
            raise TargetError(f"{stmt} failed: {error_text(e)}") from None
    if len(rows) < len(reads):  # not read with the lock: read them now, under it
        rows = [query_dicts(conn, read) for read in reads]
    return _Locked(time.monotonic() - started, locked_at, rows)


def _lock_together(target: Target, conn, stmt: str, reads: tuple[str, ...]
                   ) -> tuple[float, float, list[list[dict[str, Any]]]]:
    """Run *stmt*, then *reads*, through the lock gate: when *stmt* was written
    (time.monotonic()), when its reply came (time.time()), and each read's rows (none if
    the session cannot carry them in the lock's packet).

    The thread that opens the gate writes every target's statement back to back, so all
    servers get theirs within a millisecond (woken one after another, 32 threads would
    each need the interpreter lock first, and the last would write 10-20 ms after the
    first), then reads every reply in turn. On a session opened with multi-statements
    (``connect(..., multi_statements=True)``) the reads go in the same packet, so each
    server runs them right after its lock without another round trip. PyMySQL has no
    public call that writes a query without reading its reply: ``_execute_command`` is
    the first half of its ``query()`` (unchanged since PyMySQL 0.x; ``next_result()``,
    which reads one result into ``_result``, is the second). Without it the gate only
    lines the threads up.
    """
    write_query = getattr(conn, "_execute_command", None)
    if write_query is None:  # no rows: the caller reads them
        target.lock_gate()
        written = time.monotonic()
        query(conn, stmt)
        return written, time.time(), []
    if not getattr(conn, "client_flag", 0) & driver().constants.CLIENT.MULTI_STATEMENTS:
        reads = ()
    written: list[float] = []

    def write() -> None:
        written.append(time.monotonic())
        write_query(driver().constants.COMMAND.COM_QUERY, ";".join((stmt, *reads)))

    def receive() -> tuple[float, list[list[dict[str, Any]]]]:
        conn.next_result()  # the lock's reply: OK, or its error raised here (and the
        replied = time.time()  # server runs none of the reads after an error)
        rows = []
        for _ in reads:
            conn.next_result()
            result = conn._result
            names = [d[0] for d in result.description or ()]
            rows.append([dict(zip(names, row)) for row in result.rows or ()])
        return replied, rows

    replied, rows = target.lock_gate(write, receive)
    return written[0], replied, rows


def _acquire(target: Target, s: Settings, conn, server: Server, plan: Plan,
             reads: tuple[str, ...], thread_id: int, account: str
             ) -> tuple[dict[str, Any], _Locked]:
    """Attempts with pauses, within the call's budget less the timeout its connect took
    (3 × the target's timeout in all)."""
    deadline = time.monotonic() + target.call_budget - target.timeout
    attempts = s.lock_retries + 1
    killed: list[int] = []
    reason = ""
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            if time.monotonic() + s.lock_retry_pause + s.lock_wait_timeout > deadline:
                attempt -= 1
                break
            time.sleep(s.lock_retry_pause)
        try:
            locked = _attempt(target, s, conn, server, plan, reads, thread_id, account, killed)
        except _Busy as e:
            reason = str(e)
            continue
        return {"attempts": attempt, "lock_seconds": round(locked.seconds, 3),
                "killed_queries": killed}, locked
    advice = ("wait for it to finish or kill it, or set kill_long_queries = true"
              if not s.kill_long_queries else "retry later")
    raise TargetError(f"could not quiesce with {plan.strategy} after {attempt} attempt(s): "
                      f"{reason}; nothing is held. {advice[0].upper()}{advice[1:]}")


def _identity(conn) -> dict[str, Any]:
    """Which server this is, for the coordinates file: read before the lock, not under it."""
    hostname, server_id = query(conn, "SELECT @@hostname, @@server_id")[0]
    return {"hostname": hostname, "server_id": int(server_id)}


def _coordinates_reads(plan: Plan, info: dict) -> tuple[str, ...]:
    """The plan's coordinates statements to run: the binary log's status only if it is on
    (without it the account may lack the privilege the statement needs)."""
    return tuple(stmt for stmt in plan.coordinates
                 if info["log_bin"] or stmt.startswith("SELECT"))


def _coordinates(conn, server: Server, plan: Plan, s: Settings, info: dict,
                 identity: dict[str, Any], reads: tuple[str, ...],
                 rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The binary log's position (and GTIDs) the snapshot corresponds to, from the *rows*
    each of *reads* returned under the lock."""
    coords: dict[str, Any] = {
        "server_version": info["version"], "flavour": server.flavour, **identity,
        "strategy": plan.strategy, "exact": plan.exact,
        "taken_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "binlog": None, "gtid": None}
    for stmt, result in zip(reads, rows):
        first = next(iter(result[0].values())) if result else None
        if stmt.startswith("SELECT LOCAL"):
            local = json.loads(first)
            if local.get("binary_log_file"):
                coords["binlog"] = {"file": local["binary_log_file"],
                                    "position": int(local["binary_log_position"])}
            coords["gtid"] = {"gtid_executed": local.get("gtid_executed", "")}
        elif stmt.startswith("SELECT @@GLOBAL.gtid_binlog_pos"):
            coords["gtid"] = {"gtid_binlog_pos": first or ""}
        elif result:
            coords["binlog"] = {"file": result[0]["File"], "position": int(result[0]["Position"])}
            if "Executed_Gtid_Set" in result[0]:
                coords["gtid"] = {"gtid_executed": result[0]["Executed_Gtid_Set"] or ""}
    if s.stop_replica_sql_thread:
        coords["replica"] = _replica_status(conn, server)
    return coords


def _coordinates_path(s: Settings, info: dict) -> str | None:
    if s.coordinates_file is False:
        return None
    if isinstance(s.coordinates_file, str):
        return s.coordinates_file
    return os.path.join(info["datadir"], COORDINATES_NAME)


def _write_coordinates(path: str, coords: dict[str, Any]) -> None:
    """Atomically and durably: the snapshot must carry a complete file or the old one."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    data = (json.dumps(coords, indent=2, sort_keys=True) + "\n").encode()
    try:  # the directory belongs to the database's user: never follow what it planted
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _restart_replica(target: Target, s: Settings, conn, stmt: str) -> str | None:
    """START the SQL thread we stopped: on *conn* if it is usable, else on a new session.
    Returns a problem to report, or None."""
    if conn is not None and conn.open:
        try:
            query(conn, stmt)
            return None
        except Exception:
            pass  # the session is gone or refused: try a fresh one
    try:
        other = connect(target, s)
    except TargetError as e:
        return f"{stmt} could not be run ({e}); run it by hand"
    try:
        query(other, stmt)
        return None
    except Exception as e:
        return f"{stmt} failed: {error_text(e)}; run it by hand"
    finally:
        close(other)


# ---------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------

def _one_line(hook):
    """A driver error that escaped the specific handling becomes a one-line TargetError."""
    @functools.wraps(hook)
    def wrapper(target: Target, *args, **kwargs):
        try:
            return hook(target, *args, **kwargs)
        except TargetError:
            raise
        except Exception as e:
            if not type(e).__module__.startswith("pymysql"):
                raise
            code = error_code(e)
            raise TargetError(f"{hook.__name__} failed: {error_text(e)}"
                              + (f" (server error {code})" if code else "")) from None
    return wrapper


@hookimpl
def validate(target: Target) -> None:
    settings(target)


@hookimpl
@_one_line
def check(target: Target) -> dict[str, Any]:
    s = settings(target)
    conn = connect(target, s)
    try:
        server, info = server_info(conn)
        plan = _make_plan(conn, server, s)
        facts: dict[str, Any] = {
            "flavour": server.flavour, "version": info["version"], "strategy": plan.strategy,
            "locks": list(plan.lock), "exact_coordinates": plan.exact, "account": info["account"],
            "read_only": info["read_only"], "log_bin": info["log_bin"]}
        if "super_read_only" in info:
            facts["super_read_only"] = info["super_read_only"]
        _check_privileges(conn, server, plan, info, s)
        try:
            replica = _replica_status(conn, server)
            facts["replica"] = replica if replica else False
        except Exception as e:
            if s.stop_replica_sql_thread:
                raise TargetError(f"{replica_sql(server, 'status')} failed: "
                                  f"{error_text(e)}") from None
            facts["replica"] = f"unknown ({error_text(e)})"
        if s.stop_replica_sql_thread and not facts["replica"]:
            facts["replica_note"] = "stop_replica_sql_thread is set but this server is no replica"
        path = _coordinates_path(s, info)
        if path is not None:
            directory = os.path.dirname(path)
            if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
                raise TargetError(f"cannot write the coordinates file {path}: {directory} is not a "
                                  f"writable directory here; set coordinates_file to a path on "
                                  f"the database's volume, or to false")
            facts["coordinates_file"] = path
        return facts
    finally:
        close(conn)


@hookimpl
@_one_line
def flush(target: Target) -> dict[str, Any] | None:
    """``FLUSH LOCAL TABLES`` ahead of FTWRL, so it has little left to close; skipped when a
    long statement would make it wait. BACKUP STAGE and LIFB alone need nothing."""
    s = settings(target)
    conn = connect(target, s)
    try:
        server, _info = server_info(conn)
        plan = _make_plan(conn, server, s)
        if not plan.ftwrl:
            return None
        for stmt in session_setup_sql(server, lock_wait_timeout=s.lock_wait_timeout,
                                      statement_timeout=target.timeout, idle_deadline=60):
            query(conn, stmt)
        blockers = _running(conn, server, plan.precheck or "all", s.long_query_threshold)
        if blockers:
            return {"flush_tables": f"skipped: {blockers[0].describe()}"}
        started = time.monotonic()
        try:
            query(conn, "FLUSH LOCAL TABLES")  # LOCAL: not written to the binary log
        except Exception as e:
            if error_code(e) in TIMEOUT_CODES:
                return {"flush_tables": "skipped: lock wait timeout"}
            raise TargetError(f"FLUSH LOCAL TABLES failed: {error_text(e)}") from None
        return {"flush_tables": "done", "seconds": round(time.monotonic() - started, 3)}
    finally:
        close(conn)


@hookimpl
@_one_line
def quiesce(target: Target) -> Hold:
    s = settings(target)
    conn = connect(target, s, multi_statements=True)  # the lock and its reads in one packet
    replica_start = None
    try:
        server, info = server_info(conn)
        plan = _make_plan(conn, server, s)
        _check_privileges(conn, server, plan, info, s)
        path = _coordinates_path(s, info)
        reads = _coordinates_reads(plan, info)
        idle_deadline = math.ceil(target.max_hold + target.timeout)
        for stmt in session_setup_sql(server, lock_wait_timeout=s.lock_wait_timeout,
                                      statement_timeout=target.timeout,
                                      idle_deadline=idle_deadline):
            query(conn, stmt)
        identity = _identity(conn)
        if s.stop_replica_sql_thread:
            status = _replica_status(conn, server)
            if status and str(status.get("sql_running", "")).lower() == "yes":
                # set first: a STOP that times out may still take effect on the server
                replica_start = replica_sql(server, "start")
                query(conn, replica_sql(server, "stop"))
        try:
            got, locked = _acquire(target, s, conn, server, plan, reads, info["thread_id"],
                                   info["account"])
            coords = _coordinates(conn, server, plan, s, info, identity, reads, locked.rows)
            if path is not None:
                try:
                    _write_coordinates(path, coords)
                except OSError as e:
                    raise TargetError(f"cannot write the coordinates file {path}: {e}; the lock "
                                      f"was released. Set coordinates_file to a writable path on "
                                      f"the database's volume, or to false") from None
        except BaseException:
            if conn.open:
                _release(conn, plan.release)
            raise
    except BaseException:
        if replica_start:
            _restart_replica(target, s, conn, replica_start)
        close(conn)
        raise
    facts = {"flavour": server.flavour, "version": info["version"], "strategy": plan.strategy,
             "locks": list(plan.lock), "release_sql": list(plan.release),
             "thread_id": info["thread_id"], "server_deadline_s": idle_deadline,
             "coordinates": coords, "coordinates_file": path,
             "replica_sql_thread_stopped": bool(replica_start),
             "replica_start_sql": replica_start, **got}
    return Hold(session=conn, facts=facts, locked_at=locked.locked_at,
                release=_PreparedRelease.of(conn, plan.release))


@hookimpl
@_one_line
def thaw(target: Target, hold: Hold) -> dict[str, Any] | None:
    """Release from the hold's own session and facts only: the settings are read just for a
    fresh connection (to start a stopped SQL thread) and never stand in the way of a release."""
    facts = hold.facts or {}
    conn = hold.session
    restart = facts.get("replica_start_sql") if facts.get("replica_sql_thread_stopped") else None

    def start_replica(usable) -> str | None:
        try:
            s = settings(target)
        except Exception as e:
            return f"{restart} was not run: {e}; run it by hand"
        return _restart_replica(target, s, usable, restart)

    if conn is None:
        # The holder died: its session, and every lock in it, died too. What the server keeps
        # by itself is a replica SQL thread we stopped.
        if restart:
            problem = start_replica(None)
            if problem:
                raise TargetError(problem)
            return {"replica_sql_thread": "started"}
        return None
    if conn in _RELEASED:
        return None
    thread_id = facts.get("thread_id")
    # The release first, so writers wait for nothing else; then whether it was still the
    # holder's session. Plain queries: PyMySQL never reconnects here (and nothing here
    # calls ping()), so on a lost session the release fails and the check says why.
    prepared = hold.release
    released, now = prepared.finish() if isinstance(prepared, _PreparedRelease) \
        else (_release(conn, facts.get("release_sql", ()), strict=True), None)
    broken: list[str] = []
    try:
        if now is None:
            now = query(conn, _PreparedRelease.CHECK)[0][0]
        if int(now) != thread_id:
            broken.append(f"the holder's session changed from {thread_id} to {now}: a reconnect "
                          f"happened and the new session held no lock")
    except Exception as e:
        broken.append(f"the holder's session {thread_id} was lost before thaw ({error_text(e)}); "
                      f"it was killed, the server restarted, or wait_timeout = "
                      f"{facts.get('server_deadline_s')} s passed, and its locks went with it")
    broken = broken or released
    replica_problem = start_replica(None if broken else conn) if restart else None
    close(conn)
    _RELEASED.add(conn)
    if broken:
        raise HoldBroken(f"{facts.get('strategy', 'the lock')} did not cover the whole window: "
                         f"{'; '.join(broken + ([replica_problem] if replica_problem else []))}; "
                         f"the snapshot is only crash-consistent")
    if replica_problem:
        raise TargetError(replica_problem)
    return {"released": list(facts.get("release_sql", ())),
            **({"replica_sql_thread": "started"} if restart else {})}
