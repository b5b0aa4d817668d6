"""MySQL and MariaDB strategies: what to run for a given server, with no I/O.

Which lock (``choose_strategy``, ``lock_plan``), which statements set up the holder's
session, read the binary-log coordinates or stop a replica, which running statements would
make writers queue behind the lock (``is_suspect``, ``is_victim``) and which privileges the
account needs (``required_privileges`` … ``grant_statements``) follow from the server's
flavour and version alone. Kept pure so the MySQL-only paths are tested without a MySQL
server; :mod:`quiesce.adapters.mysql` runs what they return.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quiesce import TargetError

STRATEGIES = ("auto", "backup_stage", "instance_lock", "ftwrl")


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
    #: The first statement of ``lock`` that makes writers wait: the lock gate sits right
    #: before it, so the statements before it (which block no writer) are not on the path
    #: of the locks taken together.
    blocks_from: int = 0

    @property
    def ftwrl(self) -> bool:
        return "FLUSH TABLES WITH READ LOCK" in self.lock


def lock_plan(server: Server, strategy: str, *, ftwrl_too: bool = False) -> Plan:
    """What the holder session runs for *strategy* on *server*."""
    # MariaDB's FTWRL does not wait for readers ("FLUSH TABLES no longer waits for tables in
    # use"); MySQL's closes every table and waits for long SELECTs too.
    ftwrl_waits_for = "writes" if server.mariadb else "all"
    if strategy == "backup_stage":
        # MariaDB's own sequence for storage snapshots: START (blocks no writer: it is the
        # stage a backup tool copies under for hours), then BLOCK_COMMIT, which runs the
        # FLUSH and BLOCK_DDL stages on its way. BLOCK_DDL waits only for statements writing
        # to non-transactional tables (and a running ALTER is itself paused); long InnoDB
        # writes do not hold it up, so no precheck: a refusal would be a false alarm.
        # Bounded by lock_wait_timeout.
        return Plan(strategy, ("BACKUP STAGE START", "BACKUP STAGE BLOCK_COMMIT"),
                    ("BACKUP STAGE END",), coordinates_sql(server, True), True, None, "writes",
                    blocks_from=1)
    if strategy == "instance_lock":
        lock: tuple[str, ...] = ("LOCK INSTANCE FOR BACKUP",)
        release: tuple[str, ...] = ("UNLOCK INSTANCE",)
        if ftwrl_too:
            lock += ("FLUSH TABLES WITH READ LOCK",)
            release = ("UNLOCK TABLES",) + release
            return Plan(strategy, lock, release, coordinates_sql(server, True), True,
                        ftwrl_waits_for, ftwrl_waits_for, blocks_from=1)
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


