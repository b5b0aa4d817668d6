"""MySQL and MariaDB: a target's settings, and sessions with the server.

:func:`settings` reads and checks every setting (validate calls it; so does every hook).
:func:`connect` opens a session where the ``mysql`` client would connect
(:mod:`quiesce.adapters.mysql_options`), and the small helpers below run statements and
read the server's identity. The server error codes the adapter acts on are named here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from quiesce import Target, TargetError, import_driver
from quiesce.adapters import mysql_options
from quiesce.adapters.mysql_strategies import STRATEGIES, Server, parse_server

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
TIMEOUT_CODES = (ER_LOCK_WAIT_TIMEOUT, ER_STATEMENT_TIMEOUT, ER_QUERY_TIMEOUT)
DENIED_CODES = (ER_SPECIFIC_ACCESS_DENIED, ER_DBACCESS_DENIED, ER_TABLEACCESS_DENIED, 1045)


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


def settings(target: Target) -> Settings:
    """Every setting, read and checked (validate calls this; so does every hook)."""
    for forbidden in ("password", "passwd"):
        if target.is_set(forbidden):
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
    if s.coordinates_file is True and target.is_set("coordinates_file"):
        raise target.error("coordinates_file", "give a path, or false to write none; leave it out "
                                               "for <datadir>/" + COORDINATES_NAME)
    return s



def driver():
    return import_driver("pymysql", "mysql")


def error_code(error: BaseException) -> int | None:
    args = getattr(error, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def error_text(error: BaseException) -> str:
    args = getattr(error, "args", ())
    return str(args[1]) if len(args) > 1 else str(error)


def client_defaults(s: Settings) -> dict[str, Any]:
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


def connect(target: Target, s: Settings, *, read_timeout: float | None = None,
            multi_statements: bool = False):
    """A new session (never a reconnect: PyMySQL's query() does not reconnect).

    *multi_statements* lets one packet carry several statements (quiesce's lock and the
    coordinates reads under it); every statement this module sends is its own text."""
    pymysql = driver()
    kw: dict[str, Any] = dict(connect_timeout=target.timeout,
                              read_timeout=read_timeout or target.timeout,
                              write_timeout=target.timeout, autocommit=True, charset="utf8mb4",
                              program_name="quiesce")
    if multi_statements:
        kw["client_flag"] = pymysql.constants.CLIENT.MULTI_STATEMENTS
    if s.option_file:
        kw.update(read_default_file=s.option_file, read_default_group=s.option_group)
    else:
        kw.update(client_defaults(s))
    for key in ("unix_socket", "host", "port", "user"):
        if getattr(s, key) is not None:
            kw[key] = getattr(s, key)
    if _over_socket(s, kw):
        # A local socket is private already, and the mysql client never uses TLS on one.
        # PyMySQL's default ("preferred") would build a TLS context for every session,
        # loading the system's CA store: about 20 ms of CPU each, under the interpreter
        # lock, so 32 targets' sessions queued for most of a second (benchmarks/RESULTS.md).
        kw["ssl_disabled"] = True
    where = s.where if s.option_file or s.unix_socket or s.host \
        else (f"socket {kw['unix_socket']}" if "unix_socket" in kw
              else f"{kw.get('host', 'localhost')}:{kw.get('port', 3306)}")
    try:
        return pymysql.connect(**kw)
    except pymysql.err.MySQLError as e:
        source = "the option file" if s.option_file else "the client's option files"
        raise TargetError(f"cannot connect to {where}: {error_text(e)}; check the connection "
                          f"settings and the credentials in {source}") from None
    except OSError as e:
        raise TargetError(f"cannot connect to {where}: {e}") from None
    except Exception as e:  # configparser quotes the offending line: it may be a password
        raise TargetError(f"cannot read option_file {s.option_file}: not a valid MySQL option "
                          f"file ({type(e).__name__}); it needs a [{s.option_group}] section "
                          f"header") from None


def _over_socket(s: Settings, kw: dict[str, Any]) -> bool:
    """Whether PyMySQL will connect through a unix socket (it does whenever one is named)."""
    if "unix_socket" in kw:
        return True
    if s.option_file and s.host is None:
        return "socket" in mysql_options.read((s.option_file,), (s.option_group,))
    return False


def query(conn, sql: str) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(sql)
        return list(cur.fetchall())


def query_dicts(conn, sql: str) -> list[dict[str, Any]]:
    with conn.cursor() as cur:
        cur.execute(sql)
        names = [d[0] for d in cur.description or ()]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def server_info(conn) -> tuple[Server, dict[str, Any]]:
    version, comment, thread_id, user, datadir, log_bin, read_only = query(
        conn, "SELECT VERSION(), @@version_comment, CONNECTION_ID(), CURRENT_USER(), "
              "@@datadir, @@GLOBAL.log_bin, @@GLOBAL.read_only")[0]
    server = parse_server(version, comment or "")
    info = {"version": version, "version_comment": comment, "thread_id": int(thread_id),
            "account": user, "datadir": datadir, "log_bin": bool(int(log_bin)),
            "read_only": bool(int(read_only))}
    if not server.mariadb:
        try:
            row = query(conn, "SELECT @@GLOBAL.super_read_only")[0]
            info["super_read_only"] = bool(int(row[0]))
        except Exception:
            pass  # 5.6 and older
    return server, info


def nontransactional_tables(conn, limit: int = 5) -> list[str]:
    """User tables FLUSH TABLES WITH READ LOCK must protect under LOCK INSTANCE FOR BACKUP."""
    rows = query(conn, "SELECT CONCAT(TABLE_SCHEMA, '.', TABLE_NAME, ' (', ENGINE, ')') "
                       "FROM information_schema.TABLES WHERE TABLE_TYPE = 'BASE TABLE' "
                       "AND ENGINE NOT IN ('InnoDB', 'MEMORY', 'BLACKHOLE', 'PERFORMANCE_SCHEMA', "
                       "'TempTable') AND TABLE_SCHEMA NOT IN ('mysql', 'sys', "
                       f"'information_schema', 'performance_schema') LIMIT {int(limit)}")
    return [r[0] for r in rows]


def close(conn) -> None:
    """Close without raising (PyMySQL raises on a second close)."""
    try:
        conn.close()
    except Exception:
        pass
