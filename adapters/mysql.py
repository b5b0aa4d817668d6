"""MySQL and MariaDB: the lightest global lock that makes the snapshot consistent, held in
the holder's session, with bounded waits and the binary-log coordinates in the snapshot.

Strategies (``strategy``; ``auto`` picks from ``VERSION()`` / ``@@version_comment``):

backup_stage   MariaDB 10.4.1+. ``BACKUP STAGE START``, ``FLUSH``, ``BLOCK_DDL``,
               ``BLOCK_COMMIT`` held; ``BACKUP STAGE END`` at thaw. Non-transactional
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

The SQL for a given flavour, version and strategy is computed by pure functions
(:func:`choose_strategy`, :func:`lock_plan`, :func:`replica_sql`, :func:`coordinates_sql`,
:func:`required_privileges`), so the MySQL-only paths are tested without a MySQL server.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from quiesce import Hold, HoldBroken, MissingDriverError, Target, TargetError, hookimpl
from quiesce.adapters import mysql_options

STRATEGIES = ("auto", "backup_stage", "instance_lock", "ftwrl")
COORDINATES_NAME = "quiesce-coordinates.json"

# Server error codes we act on.
ER_LOCK_WAIT_TIMEOUT = 1205
ER_STATEMENT_TIMEOUT = 1969          # MariaDB max_statement_time
ER_QUERY_TIMEOUT = 3024              # MySQL max_execution_time
ER_NO_SUCH_THREAD = 1094
ER_KILL_DENIED = 1095
ER_SPECIFIC_ACCESS_DENIED = 1227
ER_DBACCESS_DENIED = 1044
ER_TABLEACCESS_DENIED = 1142
ER_BACKUP_NOT_RUNNING = 4211         # MariaDB: BACKUP STAGE END without START
CR_CONNECTION_LOST = (2006, 2013, 2055)
_TIMEOUT_CODES = (ER_LOCK_WAIT_TIMEOUT, ER_STATEMENT_TIMEOUT, ER_QUERY_TIMEOUT)
_DENIED_CODES = (ER_SPECIFIC_ACCESS_DENIED, ER_DBACCESS_DENIED, ER_TABLEACCESS_DENIED, 1045)

# Connections this module released in thaw: a second thaw is then a no-op, not a "lost
# session". Weak, so a closed connection is not kept alive by it.
_RELEASED: "weakref.WeakSet[Any]" = weakref.WeakSet()


# ---------------------------------------------------------------------------------------
# Pure part: what to run for a given server. No I/O below this line until "Settings".
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Server:
    flavour: str                    # "mariadb" or "mysql" (Percona Server counts as mysql)
    version: tuple[int, int, int]
    version_string: str

    @property
    def mariadb(self) -> bool:
        return self.flavour == "mariadb"

    @property
    def label(self) -> str:
        name = "MariaDB" if self.mariadb else "MySQL"
        return f"{name} {'.'.join(map(str, self.version))}"


def parse_server(version: str, comment: str = "") -> Server:
    """Flavour and version from ``SELECT VERSION(), @@version_comment``."""
    text = version
    if text.startswith("5.5.5-") and "mariadb" in text.lower():
        text = text[len("5.5.5-"):]  # the replication-compatibility prefix of MariaDB 10
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    if not m:
        raise TargetError(f"cannot parse the server version {version!r}")
    flavour = "mariadb" if "mariadb" in f"{version} {comment}".lower() else "mysql"
    return Server(flavour, (int(m[1]), int(m[2]), int(m[3])), version)


def choose_strategy(requested: str, server: Server) -> str:
    """The strategy to use; ``auto`` picks the lightest one that gives a consistent snapshot."""
    stage_ok = server.mariadb and server.version >= (10, 4, 1)
    lifb_ok = not server.mariadb and server.version >= (8, 0, 0)
    if requested == "auto":
        return "backup_stage" if stage_ok else "instance_lock" if lifb_ok else "ftwrl"
    if requested == "backup_stage" and not stage_ok:
        raise TargetError(f"strategy 'backup_stage' needs MariaDB 10.4.1 or later, and this "
                          f"server is {server.label}; set strategy = \"auto\"")
    if requested == "instance_lock" and not lifb_ok:
        raise TargetError(f"strategy 'instance_lock' (LOCK INSTANCE FOR BACKUP) needs MySQL 8.0 "
                          f"or later, and this server is {server.label}; set strategy = \"auto\"")
    return requested


def binlog_status_sql(server: Server) -> str:
    """``SHOW BINARY LOG STATUS`` from MySQL 8.2 (``SHOW MASTER STATUS`` is gone in 8.4)."""
    if not server.mariadb and server.version >= (8, 2, 0):
        return "SHOW BINARY LOG STATUS"
    return "SHOW MASTER STATUS"


def coordinates_sql(server: Server, exact: bool) -> tuple[str, ...]:
    """Statements whose results are the coordinates, for a plan that blocks commits or not."""
    if server.mariadb:
        return (binlog_status_sql(server), "SELECT @@GLOBAL.gtid_binlog_pos")
    if not exact:  # LIFB alone: one consistent read of binlog position and GTID set
        return ("SELECT LOCAL FROM performance_schema.log_status",)
    return (binlog_status_sql(server),)


def replica_sql(server: Server, action: str) -> str:
    """``STOP``/``START`` the SQL thread or ``SHOW`` the status, in this version's words."""
    new = server.version >= ((10, 5, 1) if server.mariadb else (8, 0, 22))
    word = "REPLICA" if new else "SLAVE"
    return {"stop": f"STOP {word} SQL_THREAD", "start": f"START {word} SQL_THREAD",
            "status": f"SHOW {word} STATUS"}[action]


@dataclass(frozen=True)
class Plan:
    strategy: str
    lock: tuple[str, ...]           # run in order in the holder session
    release: tuple[str, ...]        # run at thaw and after a failed attempt
    coordinates: tuple[str, ...]
    exact: bool                     # commits are blocked: coordinates are the snapshot's
    #: Which running statements make writers queue behind the pending lock, checked before
    #: every attempt ("all", "writes", or None when writers never queue behind it).
    precheck: str | None
    #: Which running statements to name (and kill, if allowed) when the lock timed out.
    suspects: str

    @property
    def ftwrl(self) -> bool:
        return "FLUSH TABLES WITH READ LOCK" in self.lock


def lock_plan(server: Server, strategy: str, *, ftwrl_too: bool = False) -> Plan:
    """What the holder session runs for *strategy* on *server*."""
    # MariaDB's FTWRL does not wait for readers ("FLUSH TABLES no longer waits for tables in
    # use"); MySQL's closes every table and waits for long SELECTs too.
    ftwrl_waits_for = "writes" if server.mariadb else "all"
    if strategy == "backup_stage":
        # BLOCK_DDL waits only for statements writing to non-transactional tables (and a
        # running ALTER is itself paused); long InnoDB writes do not hold it up, so no
        # precheck: a refusal would be a false alarm. Bounded by lock_wait_timeout.
        return Plan(strategy, ("BACKUP STAGE START", "BACKUP STAGE FLUSH", "BACKUP STAGE BLOCK_DDL",
                               "BACKUP STAGE BLOCK_COMMIT"), ("BACKUP STAGE END",),
                    coordinates_sql(server, True), True, None, "writes")
    if strategy == "instance_lock":
        lock: tuple[str, ...] = ("LOCK INSTANCE FOR BACKUP",)
        release: tuple[str, ...] = ("UNLOCK INSTANCE",)
        if ftwrl_too:
            lock += ("FLUSH TABLES WITH READ LOCK",)
            release = ("UNLOCK TABLES",) + release
            return Plan(strategy, lock, release, coordinates_sql(server, True), True,
                        ftwrl_waits_for, ftwrl_waits_for)
        # LIFB waits only for running DDL, and only new DDL queues behind it.
        return Plan(strategy, lock, release, coordinates_sql(server, False), False, None, "ddl")
    if strategy == "ftwrl":
        return Plan(strategy, ("FLUSH TABLES WITH READ LOCK",), ("UNLOCK TABLES",),
                    coordinates_sql(server, True), True, ftwrl_waits_for, ftwrl_waits_for)
    raise ValueError(f"unknown strategy {strategy!r}")


def session_setup_sql(server: Server, *, lock_wait_timeout: int, statement_timeout: float,
                      idle_deadline: int) -> tuple[str, ...]:
    """Session variables of the holder: bounded lock waits and a server-side dead-man switch."""
    sql = [f"SET SESSION lock_wait_timeout = {int(lock_wait_timeout)}",
           # The server closes the holder's session, and so releases its locks, if the holder
           # stays silent this long (it is idle while holding): a backstop for a wedged holder.
           f"SET SESSION wait_timeout = {int(idle_deadline)}"]
    if server.mariadb:
        sql.append(f"SET SESSION max_statement_time = {statement_timeout:g}")
    return tuple(sql)


def processlist_sql(server: Server) -> str:
    """Other sessions' running statements, longest first (needs PROCESS to see them all)."""
    seconds = "TIME_MS / 1000" if server.mariadb else "TIME"
    return ("SELECT ID, USER, HOST, COMMAND, " + seconds + " AS SECONDS, STATE, LEFT(INFO, 200) "
            "FROM information_schema.PROCESSLIST "
            "WHERE ID <> CONNECTION_ID() AND INFO IS NOT NULL AND USER <> 'system user' "
            "AND COMMAND NOT IN ('Sleep', 'Daemon', 'Binlog Dump', 'Binlog Dump GTID', 'Killed', "
            "'Connect', 'Slave_IO', 'Slave_SQL', 'Slave_worker') "
            "ORDER BY SECONDS DESC")


_READS = {"SELECT", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "HELP", "WITH", "VALUES", "TABLE"}
_DDL = {"ALTER", "CREATE", "DROP", "RENAME", "TRUNCATE", "OPTIMIZE", "REPAIR", "ANALYZE"}
_COMMENT = re.compile(r"\s*(?:/\*(?!!).*?\*/|(?:--\s|#)[^\n]*(?:\n|$)|\()", re.S)


def first_keyword(sql: str) -> str:
    """The statement's first keyword, past comments and opening parentheses."""
    pos = 0
    while True:
        m = _COMMENT.match(sql, pos)
        if not m or m.end() == pos:
            break
        pos = m.end()
    m = re.match(r"\s*(?:/\*!\d*\s*)?([A-Za-z]+)", sql[pos:])
    return m[1].upper() if m else ""


#: States of statements that are queued behind a backup lock (ours, or another tool's): they
#: are its victims, never the blocker, so they are neither refused on nor killed.
_VICTIM_STATES = ("waiting for backup lock", "waiting for global read lock",
                  "waiting for commit lock")


def is_victim(state: str | None) -> bool:
    return (state or "").lower().startswith(_VICTIM_STATES)


def is_suspect(kind: str, sql: str) -> bool:
    """Whether a running statement of this text can hold up a lock of *kind*."""
    if kind == "all":
        return True
    keyword = first_keyword(sql)
    if kind == "ddl":
        return keyword in _DDL
    return keyword not in _READS  # "writes": DML, DDL, CALL, LOAD, ... anything not a read


@dataclass(frozen=True)
class Need:
    """A privilege the plan needs: satisfied by any of *any_of* on *scope*."""

    any_of: tuple[str, ...]
    grant: str
    why: str
    scope: str = "*.*"


def required_privileges(server: Server, plan: Plan, *, binlog: bool, kill: bool,
                        replica: bool) -> list[Need]:
    """The privileges *plan* needs on *server*, with the one to GRANT for each."""
    m, v = server.mariadb, server.version
    needs = []
    if plan.strategy == "instance_lock":
        needs.append(Need(("BACKUP_ADMIN",), "BACKUP_ADMIN", "LOCK INSTANCE FOR BACKUP"))
        if not plan.exact:
            needs.append(Need(("SELECT",), "SELECT", "reading the coordinates",
                              "performance_schema.log_status"))
    if plan.strategy == "backup_stage":
        needs.append(Need(("RELOAD",), "RELOAD", "BACKUP STAGE"))
    if plan.ftwrl:
        flush = ("RELOAD", "FLUSH_TABLES") if not m and v >= (8, 0, 0) else ("RELOAD",)
        needs.append(Need(flush, "RELOAD", "FLUSH TABLES WITH READ LOCK"))
    needs.append(Need(("PROCESS",), "PROCESS", "seeing other sessions' long-running statements"))
    if binlog and plan.exact:
        if m and v >= (10, 5, 2):
            needs.append(Need(("BINLOG MONITOR", "REPLICATION CLIENT", "SUPER"), "BINLOG MONITOR",
                              binlog_status_sql(server)))
        else:
            needs.append(Need(("REPLICATION CLIENT", "SUPER"), "REPLICATION CLIENT",
                              binlog_status_sql(server)))
    if kill:
        if m and v >= (10, 5, 2):
            needs.append(Need(("CONNECTION ADMIN", "SUPER"), "CONNECTION ADMIN",
                              "kill_long_queries"))
        elif not m and v >= (8, 0, 0):
            needs.append(Need(("CONNECTION_ADMIN", "SUPER"), "CONNECTION_ADMIN",
                              "kill_long_queries"))
        else:
            needs.append(Need(("SUPER",), "SUPER", "kill_long_queries"))
    if replica:
        if m and v >= (10, 5, 2):
            needs.append(Need(("REPLICATION SLAVE ADMIN", "SUPER"), "REPLICATION SLAVE ADMIN",
                              "stop_replica_sql_thread"))
            if v >= (10, 5, 9):
                # REPLICA MONITOR is an alias; SHOW GRANTS says SLAVE MONITOR [V 10.11]
                needs.append(Need(("SLAVE MONITOR", "REPLICA MONITOR", "SUPER"),
                                  "SLAVE MONITOR", replica_sql(server, "status")))
        elif not m and v >= (8, 0, 0):
            needs.append(Need(("REPLICATION_SLAVE_ADMIN", "SUPER"), "REPLICATION_SLAVE_ADMIN",
                              "stop_replica_sql_thread"))
            needs.append(Need(("REPLICATION CLIENT", "SUPER"), "REPLICATION CLIENT",
                              replica_sql(server, "status")))
        else:
            needs.append(Need(("SUPER",), "SUPER", "stop_replica_sql_thread"))
    return needs


_GRANT = re.compile(r"^GRANT\s+(.+?)\s+ON\s+(?:(?:TABLE|FUNCTION|PROCEDURE)\s+)?(\S+)\s+TO\s", re.I)


def parse_grants(lines: list[str]) -> dict[str, set[str]]:
    """``SHOW GRANTS`` lines → {scope: privileges}, scope like ``*.*`` or ``db.table``."""
    grants: dict[str, set[str]] = {}
    for line in lines:
        m = _GRANT.match(line.strip())
        if not m:
            continue  # role grants ("GRANT `role` TO ..."), PROXY, etc.
        scope = m[2].replace("`", "").replace('"', "").lower()
        privs = grants.setdefault(scope, set())
        for priv in re.split(r",\s*", m[1]):
            priv = re.sub(r"\s*\(.*\)$", "", priv.strip()).upper()  # column list
            privs.add("ALL" if priv in {"ALL", "ALL PRIVILEGES"} else re.sub(r"\s+", " ", priv))
    return grants


def missing_privileges(needs: list[Need], grants: dict[str, set[str]]) -> list[Need]:
    missing = []
    for need in needs:
        db = need.scope.split(".")[0]
        held = (grants.get("*.*", set()) | grants.get(f"{db}.*", set())
                | grants.get(need.scope, set()))
        if "ALL" not in held and not held.intersection(need.any_of):
            missing.append(need)
    return missing


def grant_statements(missing: list[Need], account: str) -> list[str]:
    """One GRANT per scope, for the account ``CURRENT_USER()`` returned (``user@host``)."""
    user, _, host = account.rpartition("@")
    who = f"'{user}'@'{host}'"
    by_scope: dict[str, list[str]] = {}
    for need in missing:
        if need.grant not in by_scope.setdefault(need.scope, []):
            by_scope[need.scope].append(need.grant)
    return [f"GRANT {', '.join(privs)} ON {scope} TO {who}" for scope, privs in by_scope.items()]


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    strategy: str
    option_file: str | None
    option_group: str
    unix_socket: str | None
    host: str | None
    port: int | None
    user: str | None
    lock_wait_timeout: int
    long_query_threshold: float
    kill_long_queries: bool
    lock_retries: int
    lock_retry_pause: float
    coordinates_file: str | bool          # a path, True (<datadir>/quiesce-coordinates.json), False
    stop_replica_sql_thread: bool
    exact_coordinates: bool

    @property
    def where(self) -> str:
        if self.unix_socket:
            return f"socket {self.unix_socket}"
        if self.host:
            return f"{self.host}:{self.port or 3306}"
        if self.option_file:
            return f"the server named in {self.option_file} [{self.option_group}]"
        return "localhost:3306"


def _settings(target: Target) -> Settings:
    """Every setting, read and checked (validate calls this; so does every hook)."""
    for forbidden in ("password", "passwd"):
        if forbidden in target.settings:
            raise target.error(forbidden, "never put a password in the config: put it in a MySQL "
                                          "option file (mode 0600) and name it with option_file")
    default_lwt = 2 if target.timeout >= 3 else 1
    s = Settings(
        strategy=target.option("strategy", str, default="auto", choices=STRATEGIES),
        option_file=target.private_file("option_file", default=None),
        option_group=target.option("option_group", str, default="client"),
        unix_socket=target.option("unix_socket", str, default=None),
        host=target.option("host", str, default=None),
        port=target.option("port", int, default=None),
        user=target.option("user", str, default=None),
        lock_wait_timeout=target.option("lock_wait_timeout", int, default=default_lwt),
        long_query_threshold=target.option("long_query_threshold", float, default=1.0),
        kill_long_queries=target.option("kill_long_queries", bool, default=False),
        lock_retries=target.option("lock_retries", int, default=2),
        lock_retry_pause=target.option("lock_retry_pause", float, default=1.0),
        coordinates_file=target.option("coordinates_file", (str, bool), default=True),
        stop_replica_sql_thread=target.option("stop_replica_sql_thread", bool, default=False),
        exact_coordinates=target.option("exact_coordinates", bool, default=False),
    )
    if s.port is not None and not 0 < s.port < 65536:
        raise target.error("port", f"must be between 1 and 65535, got {s.port}")
    if s.unix_socket is not None and not os.path.isabs(s.unix_socket):
        raise target.error("unix_socket", f"must be an absolute path, got {s.unix_socket!r}")
    if not 1 <= s.lock_wait_timeout <= target.timeout:
        raise target.error("lock_wait_timeout",
                           f"must be at least 1 and at most the target's timeout "
                           f"({target.timeout:g} s), got {s.lock_wait_timeout}")
    if s.long_query_threshold < 0:
        raise target.error("long_query_threshold", "must be 0 or more seconds")
    if not 0 <= s.lock_retries <= 100:
        raise target.error("lock_retries", "must be between 0 and 100")
    if s.lock_retry_pause < 0:
        raise target.error("lock_retry_pause", "must be 0 or more seconds")
    if isinstance(s.coordinates_file, str) and not os.path.isabs(s.coordinates_file):
        raise target.error("coordinates_file", f"must be an absolute path (or false), "
                                               f"got {s.coordinates_file!r}")
    if s.coordinates_file is True and "coordinates_file" in target.settings:
        raise target.error("coordinates_file", "give a path, or false to write none; leave it out "
                                               "for <datadir>/" + COORDINATES_NAME)
    return s


# ---------------------------------------------------------------------------------------
# The database side
# ---------------------------------------------------------------------------------------

def _driver():
    try:
        import pymysql
    except ImportError:
        raise MissingDriverError("pymysql", "mysql") from None
    return pymysql


def _code(error: BaseException) -> int | None:
    args = getattr(error, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _msg(error: BaseException) -> str:
    args = getattr(error, "args", ())
    return str(args[1]) if len(args) > 1 else str(error)


def _client_defaults(s: Settings) -> dict[str, Any]:
    """Connect where the `mysql` client would: its option files, and for localhost the
    server's socket (PyMySQL alone takes TCP to localhost:3306, where root's socket
    authentication does not apply)."""
    found = mysql_options.read()
    kw: dict[str, Any] = {key: found[key] for key in ("user", "password", "host")
                          if key in found}
    if found.get("port", "").isdigit():
        kw["port"] = int(found["port"])
    if (s.host or kw.get("host") or "localhost") == "localhost":
        socket = found.get("socket") or mysql_options.default_socket()
        if socket:
            kw["unix_socket"] = socket
    return kw


def _connect(target: Target, s: Settings, *, read_timeout: float | None = None):
    """A new session (never a reconnect: PyMySQL's query() does not reconnect)."""
    pymysql = _driver()
    kw: dict[str, Any] = dict(connect_timeout=target.timeout,
                              read_timeout=read_timeout or target.timeout,
                              write_timeout=target.timeout, autocommit=True, charset="utf8mb4",
                              program_name="quiesce")
    if s.option_file:
        kw.update(read_default_file=s.option_file, read_default_group=s.option_group)
    else:
        kw.update(_client_defaults(s))
    for key in ("unix_socket", "host", "port", "user"):
        if getattr(s, key) is not None:
            kw[key] = getattr(s, key)
    where = s.where if s.option_file or s.unix_socket or s.host \
        else (f"socket {kw['unix_socket']}" if "unix_socket" in kw
              else f"{kw.get('host', 'localhost')}:{kw.get('port', 3306)}")
    try:
        return pymysql.connect(**kw)
    except pymysql.err.MySQLError as e:
        source = "the option file" if s.option_file else "the client's option files"
        raise TargetError(f"cannot connect to {where}: {_msg(e)}; check the connection "
                          f"settings and the credentials in {source}") from None
    except OSError as e:
        raise TargetError(f"cannot connect to {where}: {e}") from None
    except Exception as e:  # configparser quotes the offending line: it may be a password
        raise TargetError(f"cannot read option_file {s.option_file}: not a valid MySQL option "
                          f"file ({type(e).__name__}); it needs a [{s.option_group}] section "
                          f"header") from None


def _rows(conn, sql: str) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(sql)
        return list(cur.fetchall())


def _dicts(conn, sql: str) -> list[dict[str, Any]]:
    with conn.cursor() as cur:
        cur.execute(sql)
        names = [d[0] for d in cur.description or ()]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def _server(conn) -> tuple[Server, dict[str, Any]]:
    version, comment, thread_id, user, datadir, log_bin, read_only = _rows(
        conn, "SELECT VERSION(), @@version_comment, CONNECTION_ID(), CURRENT_USER(), "
              "@@datadir, @@GLOBAL.log_bin, @@GLOBAL.read_only")[0]
    server = parse_server(version, comment or "")
    info = {"version": version, "version_comment": comment, "thread_id": int(thread_id),
            "account": user, "datadir": datadir, "log_bin": bool(int(log_bin)),
            "read_only": bool(int(read_only))}
    if not server.mariadb:
        try:
            row = _rows(conn, "SELECT @@GLOBAL.super_read_only")[0]
            info["super_read_only"] = bool(int(row[0]))
        except Exception:
            pass  # 5.6 and older
    return server, info


def _nontransactional_tables(conn, limit: int = 5) -> list[str]:
    """User tables FLUSH TABLES WITH READ LOCK must protect under LOCK INSTANCE FOR BACKUP."""
    rows = _rows(conn, "SELECT CONCAT(TABLE_SCHEMA, '.', TABLE_NAME, ' (', ENGINE, ')') "
                       "FROM information_schema.TABLES WHERE TABLE_TYPE = 'BASE TABLE' "
                       "AND ENGINE NOT IN ('InnoDB', 'MEMORY', 'BLACKHOLE', 'PERFORMANCE_SCHEMA', "
                       "'TempTable') AND TABLE_SCHEMA NOT IN ('mysql', 'sys', "
                       f"'information_schema', 'performance_schema') LIMIT {int(limit)}")
    return [r[0] for r in rows]


def _make_plan(conn, server: Server, s: Settings) -> Plan:
    strategy = choose_strategy(s.strategy, server)
    ftwrl_too = strategy == "instance_lock" and (s.exact_coordinates
                                                 or bool(_nontransactional_tables(conn)))
    return lock_plan(server, strategy, ftwrl_too=ftwrl_too)


def _check_privileges(conn, server: Server, plan: Plan, info: dict, s: Settings) -> None:
    grants = parse_grants([r[0] for r in _rows(conn, "SHOW GRANTS")])
    needs = required_privileges(server, plan, binlog=info["log_bin"], kill=s.kill_long_queries,
                                replica=s.stop_replica_sql_thread)
    missing = missing_privileges(needs, grants)
    if missing:
        what = ", ".join(f"{n.grant} (for {n.why})" for n in missing)
        raise TargetError(f"the account {info['account']} lacks {what} for strategy "
                          f"{plan.strategy!r} on {server.label}; run: "
                          + "; ".join(grant_statements(missing, info["account"])))


def _replica_status(conn, server: Server) -> dict[str, Any] | None:
    rows = _dicts(conn, replica_sql(server, "status"))
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
        status["gtid_slave_pos"] = _rows(conn, "SELECT @@GLOBAL.gtid_slave_pos")[0][0]
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
    for id_, user, host, _cmd, seconds, state, info in _rows(conn, processlist_sql(server)):
        if float(seconds or 0) >= older_than and is_suspect(kind, info or "") \
                and not is_victim(state):
            found.append(Blocker(int(id_), user or "", host or "", float(seconds or 0),
                                 state or "", info or ""))
    return found


def _kill_queries(conn, blockers: list[Blocker], account: str) -> list[int]:
    killed = []
    for b in blockers:
        try:
            _rows(conn, f"KILL QUERY {int(b.id)}")
            killed.append(b.id)
        except Exception as e:
            if _code(e) == ER_NO_SUCH_THREAD:
                continue  # it ended meanwhile
            if _code(e) == ER_KILL_DENIED:
                user, _, host = account.rpartition("@")
                raise TargetError(f"kill_long_queries: not allowed to kill {b.describe()}; run: "
                                  f"GRANT CONNECTION ADMIN ON *.* TO '{user}'@'{host}' (MySQL: "
                                  f"CONNECTION_ADMIN)") from None
            raise
    return killed


def _wait_gone(conn, ids: list[int], deadline: float) -> None:
    """Give killed statements a moment to roll back, so the next lock does not wait for them."""
    while ids and time.monotonic() < deadline:
        left = _rows(conn, "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO IS NOT NULL "
                           f"AND ID IN ({', '.join(str(int(i)) for i in ids)})")
        if not left:
            return
        time.sleep(0.05)


def _release(conn, statements, *, strict: bool = False) -> list[str]:
    """Run the release statements; collect (strict) or swallow the errors."""
    problems = []
    for stmt in statements:
        try:
            _rows(conn, stmt)
        except Exception as e:
            if not strict:
                continue
            if _code(e) == ER_BACKUP_NOT_RUNNING:
                problems.append(f"{stmt}: no backup stage was active (the lock had been lost)")
            else:
                problems.append(f"{stmt} failed: {_msg(e)}")
    return problems


def _kill_session(target: Target, s: Settings, thread_id: int) -> None:
    """Kill the holder's own session from a second connection: after a client-side timeout
    the server may still have our lock request queued (writers queue behind it)."""
    try:
        other = _connect(target, s)
    except TargetError:
        return
    try:
        _rows(other, f"KILL CONNECTION {int(thread_id)}")
    except Exception:
        pass  # already gone
    finally:
        _close(other)


class _Busy(Exception):
    """One lock attempt failed for a reason worth retrying; nothing is held."""


def _attempt(target: Target, s: Settings, conn, server: Server, plan: Plan,
             thread_id: int, account: str, killed: list[int]) -> float:
    """One attempt: precheck, lock. Returns the seconds the lock took, or raises _Busy /
    TargetError with nothing held. Appends the ids of statements it killed to *killed*."""
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
    started = time.monotonic()
    pymysql = _driver()
    for stmt in plan.lock:
        try:
            _rows(conn, stmt)
        except pymysql.err.MySQLError as e:
            code = _code(e)
            if code in CR_CONNECTION_LOST or not conn.open:
                # The client gave up (read timeout) or the session died: the server may still
                # have our request queued, with writers behind it. Kill the session.
                _kill_session(target, s, thread_id)
                raise TargetError(f"{stmt} did not complete within {target.timeout:g} s and "
                                  f"the connection was dropped ({_msg(e)}); the holder's session "
                                  f"{thread_id} was killed so no lock request is left queued. "
                                  f"Retry later") from None
            _release(conn, plan.release)  # undo earlier stages / locks of this attempt
            if code in _TIMEOUT_CODES:
                suspects = _running(conn, server, plan.suspects, 0.0)
                if s.kill_long_queries:
                    old = [b for b in suspects if b.seconds >= s.long_query_threshold]
                    ids = _kill_queries(conn, old, account)
                    killed += ids
                    _wait_gone(conn, ids, time.monotonic() + s.lock_wait_timeout)
                behind = f" behind {suspects[0].describe()}" if suspects else ""
                raise _Busy(f"{stmt} timed out after lock_wait_timeout = "
                            f"{s.lock_wait_timeout} s{behind}") from None
            if code in _DENIED_CODES:
                raise TargetError(f"{stmt} was refused: {_msg(e)}; run `quiesce check` for "
                                  f"the GRANT to run") from None
            raise TargetError(f"{stmt} failed: {_msg(e)}") from None
    return time.monotonic() - started


def _acquire(target: Target, s: Settings, conn, server: Server, plan: Plan,
             thread_id: int, account: str) -> dict[str, Any]:
    """Attempts with pauses, within a budget of 3 × the target's timeout in all."""
    deadline = time.monotonic() + 3 * target.timeout
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
            seconds = _attempt(target, s, conn, server, plan, thread_id, account, killed)
        except _Busy as e:
            reason = str(e)
            continue
        return {"attempts": attempt, "lock_seconds": round(seconds, 3),
                "killed_queries": killed}
    advice = ("wait for it to finish or kill it, or set kill_long_queries = true"
              if not s.kill_long_queries else "retry later")
    raise TargetError(f"could not quiesce with {plan.strategy} after {attempt} attempt(s): "
                      f"{reason}; nothing is held. {advice[0].upper()}{advice[1:]}")


def _coordinates(conn, server: Server, plan: Plan, info: dict, s: Settings) -> dict[str, Any]:
    coords: dict[str, Any] = {
        "server_version": info["version"], "flavour": server.flavour,
        "hostname": _rows(conn, "SELECT @@hostname")[0][0],
        "server_id": int(_rows(conn, "SELECT @@server_id")[0][0]),
        "strategy": plan.strategy, "exact": plan.exact,
        "taken_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "binlog": None, "gtid": None}
    for stmt in plan.coordinates:
        if stmt.startswith("SELECT LOCAL"):
            local = json.loads(_rows(conn, stmt)[0][0])
            if local.get("binary_log_file"):
                coords["binlog"] = {"file": local["binary_log_file"],
                                    "position": int(local["binary_log_position"])}
            coords["gtid"] = {"gtid_executed": local.get("gtid_executed", "")}
        elif stmt.startswith("SELECT @@GLOBAL.gtid_binlog_pos"):
            coords["gtid"] = {"gtid_binlog_pos": _rows(conn, stmt)[0][0] or ""}
        elif info["log_bin"]:
            rows = _dicts(conn, stmt)
            if rows:
                coords["binlog"] = {"file": rows[0]["File"], "position": int(rows[0]["Position"])}
                if "Executed_Gtid_Set" in rows[0]:
                    coords["gtid"] = {"gtid_executed": rows[0]["Executed_Gtid_Set"] or ""}
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


def _close(conn) -> None:
    """Close without raising (PyMySQL raises on a second close)."""
    try:
        conn.close()
    except Exception:
        pass


def _restart_replica(target: Target, s: Settings, conn, stmt: str) -> str | None:
    """START the SQL thread we stopped: on *conn* if it is usable, else on a new session.
    Returns a problem to report, or None."""
    if conn is not None and conn.open:
        try:
            _rows(conn, stmt)
            return None
        except Exception:
            pass  # the session is gone or refused: try a fresh one
    try:
        other = _connect(target, s)
    except TargetError as e:
        return f"{stmt} could not be run ({e}); run it by hand"
    try:
        _rows(other, stmt)
        return None
    except Exception as e:
        return f"{stmt} failed: {_msg(e)}; run it by hand"
    finally:
        _close(other)


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
            code = _code(e)
            raise TargetError(f"{hook.__name__} failed: {_msg(e)}"
                              + (f" (server error {code})" if code else "")) from None
    return wrapper


@hookimpl
def validate(target: Target) -> None:
    _settings(target)


@hookimpl
@_one_line
def check(target: Target) -> dict[str, Any]:
    s = _settings(target)
    conn = _connect(target, s)
    try:
        server, info = _server(conn)
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
                raise TargetError(f"{replica_sql(server, 'status')} failed: {_msg(e)}") from None
            facts["replica"] = f"unknown ({_msg(e)})"
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
        _close(conn)


@hookimpl
@_one_line
def flush(target: Target) -> dict[str, Any] | None:
    """``FLUSH LOCAL TABLES`` ahead of FTWRL, so it has little left to close; skipped when a
    long statement would make it wait. BACKUP STAGE and LIFB alone need nothing."""
    s = _settings(target)
    conn = _connect(target, s)
    try:
        server, _info = _server(conn)
        plan = _make_plan(conn, server, s)
        if not plan.ftwrl:
            return None
        for stmt in session_setup_sql(server, lock_wait_timeout=s.lock_wait_timeout,
                                      statement_timeout=target.timeout, idle_deadline=60):
            _rows(conn, stmt)
        blockers = _running(conn, server, plan.precheck or "all", s.long_query_threshold)
        if blockers:
            return {"flush_tables": f"skipped: {blockers[0].describe()}"}
        started = time.monotonic()
        try:
            _rows(conn, "FLUSH LOCAL TABLES")  # LOCAL: not written to the binary log
        except Exception as e:
            if _code(e) in _TIMEOUT_CODES:
                return {"flush_tables": "skipped: lock wait timeout"}
            raise TargetError(f"FLUSH LOCAL TABLES failed: {_msg(e)}") from None
        return {"flush_tables": "done", "seconds": round(time.monotonic() - started, 3)}
    finally:
        _close(conn)


@hookimpl
@_one_line
def quiesce(target: Target) -> Hold:
    s = _settings(target)
    conn = _connect(target, s)
    replica_start = None
    try:
        server, info = _server(conn)
        plan = _make_plan(conn, server, s)
        _check_privileges(conn, server, plan, info, s)
        path = _coordinates_path(s, info)
        idle_deadline = math.ceil(target.max_hold + target.timeout)
        for stmt in session_setup_sql(server, lock_wait_timeout=s.lock_wait_timeout,
                                      statement_timeout=target.timeout,
                                      idle_deadline=idle_deadline):
            _rows(conn, stmt)
        if s.stop_replica_sql_thread:
            status = _replica_status(conn, server)
            if status and str(status.get("sql_running", "")).lower() == "yes":
                # set first: a STOP that times out may still take effect on the server
                replica_start = replica_sql(server, "start")
                _rows(conn, replica_sql(server, "stop"))
        try:
            got = _acquire(target, s, conn, server, plan, info["thread_id"], info["account"])
            coords = _coordinates(conn, server, plan, info, s)
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
        _close(conn)
        raise
    facts = {"flavour": server.flavour, "version": info["version"], "strategy": plan.strategy,
             "locks": list(plan.lock), "release_sql": list(plan.release),
             "thread_id": info["thread_id"], "server_deadline_s": idle_deadline,
             "coordinates": coords, "coordinates_file": path,
             "replica_sql_thread_stopped": bool(replica_start),
             "replica_start_sql": replica_start, **got}
    return Hold(session=conn, facts=facts)


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
            s = _settings(target)
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
    broken: list[str] = []
    try:
        # A plain query: PyMySQL never reconnects here (and nothing here calls ping()).
        now = _rows(conn, "SELECT CONNECTION_ID()")[0][0]
        if int(now) != thread_id:
            broken.append(f"the holder's session changed from {thread_id} to {now}: a reconnect "
                          f"happened and the new session held no lock")
    except Exception as e:
        broken.append(f"the holder's session {thread_id} was lost before thaw ({_msg(e)}); "
                      f"it was killed, the server restarted, or wait_timeout = "
                      f"{facts.get('server_deadline_s')} s passed, and its locks went with it")
    if not broken:
        broken += _release(conn, facts.get("release_sql", ()), strict=True)
    replica_problem = start_replica(None if broken else conn) if restart else None
    _close(conn)
    _RELEASED.add(conn)
    if broken:
        raise HoldBroken(f"{facts.get('strategy', 'the lock')} did not cover the whole window: "
                         f"{'; '.join(broken + ([replica_problem] if replica_problem else []))}; "
                         f"the snapshot is only crash-consistent")
    if replica_problem:
        raise TargetError(replica_problem)
    return {"released": list(facts.get("release_sql", ())),
            **({"replica_sql_thread": "started"} if restart else {})}
