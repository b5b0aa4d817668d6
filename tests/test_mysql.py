"""The MySQL/MariaDB adapter.

Against the real MariaDB 10.11 started by tests/support/servers.py: every hold is checked from
outside, with writers on their own connections (blocked during the hold, flowing after
thaw), long-running writes that would make a global lock queue, a killed holder session,
a replica, the coordinates file, and missing privileges.

MySQL 8.x cannot be installed here, so its statements (LOCK INSTANCE FOR BACKUP,
SHOW BINARY LOG STATUS, STOP REPLICA, performance_schema.log_status) are covered by the pure
functions that compute the SQL, and by driving the hooks against a scripted connection
that answers like MySQL would and records what the adapter sent.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

import quiesce
from quiesce import ConfigError, Hold, HoldBroken, TargetError
from quiesce.adapters import mysql as my
from quiesce.adapters import mysql_strategies as strategies
from quiesce.adapters import mysql_connection, mysql_options
from quiesce.plugins import load_adapters

from .support.helpers import run, wait_until, write_config

PASSWORD = "qz-pass-7431"
BOUND_SLACK = 1.5     # generous: scheduling and the writer's own round trips


@pytest.fixture(scope="module")
def adapters():
    return load_adapters(load_entrypoints=False)


# ----------------------------------------------------------------------------- real server


@pytest.fixture
def db(mariadb):
    """The shared MariaDB with a schema and two accounts (one lacks RELOAD)."""
    for stmt in (
        "CREATE DATABASE IF NOT EXISTS qmy",
        "CREATE TABLE IF NOT EXISTS qmy.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT NOT NULL "
        "DEFAULT 0) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS qmy.m (id INT AUTO_INCREMENT PRIMARY KEY, v INT NOT NULL "
        "DEFAULT 0) ENGINE=MyISAM",
        "CREATE TABLE IF NOT EXISTS qmy.m2 (id INT AUTO_INCREMENT PRIMARY KEY, v INT NOT NULL "
        "DEFAULT 0) ENGINE=MyISAM",
        "INSERT IGNORE INTO qmy.t (id, v) VALUES (1, 0)",
        "INSERT IGNORE INTO qmy.m (id, v) VALUES (1, 0)",
        f"CREATE USER IF NOT EXISTS 'qz'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}'",
        "GRANT RELOAD, PROCESS, BINLOG MONITOR, CONNECTION ADMIN, SLAVE MONITOR ON *.* "
        "TO 'qz'@'127.0.0.1'",
        f"CREATE USER IF NOT EXISTS 'qz_noreload'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}'",
        "GRANT PROCESS, BINLOG MONITOR ON *.* TO 'qz_noreload'@'127.0.0.1'",
    ):
        mariadb.sql(stmt)
    yield mariadb
    # Nothing of ours may be left running or held: kill stray sessions of the test accounts.
    for (tid,) in mariadb.sql("SELECT ID FROM information_schema.PROCESSLIST WHERE USER IN "
                              "('qz', 'qz_noreload')") or []:
        try:
            mariadb.sql(f"KILL {int(tid)}")
        except Exception:
            pass


def option_file(tmp_path, server, user="qz"):
    path = tmp_path / f"{user}.cnf"
    path.write_text(f"[client]\nuser = {user}\npassword = {PASSWORD}\nhost = 127.0.0.1\n"
                    f"port = {server.port}\n")
    path.chmod(0o600)
    return str(path)


def target_for(server, tmp_path, *, user="qz", timeout=5.0, max_hold=30.0, **settings):
    settings.setdefault("option_file", option_file(tmp_path, server, user))
    settings.setdefault("lock_retry_pause", 0.2)
    return quiesce.Target(name="main", kind="mysql", settings=settings, timeout=timeout,
                          max_hold=max_hold)


def freeze(adapters, target):
    adapters.call("validate", target)
    assert target.unknown_keys() == []
    facts = adapters.call("check", target)
    adapters.call("flush", target)
    return facts, adapters.call("quiesce", target)


class Writer(threading.Thread):
    """One INSERT from its own connection; ``done`` tells whether the server let it through."""

    def __init__(self, server, table="qmy.t"):
        super().__init__(daemon=True)
        self.conn = server.connect(read_timeout=60)
        self.table = table
        self.done = threading.Event()
        self.error: Exception | None = None
        self.start()

    def run(self):
        try:
            with self.conn.cursor() as cur:
                cur.execute(f"INSERT INTO {self.table} (v) VALUES (1)")
        except Exception as e:
            self.error = e
        finally:
            self.done.set()
            self.conn.close()

    def blocked(self, seconds=0.8) -> bool:
        return not self.done.wait(seconds)


class WriteLoop(threading.Thread):
    """INSERTs back to back from its own connection, each one's latency recorded."""

    def __init__(self, server, table="qmy.t"):
        super().__init__(daemon=True)
        self.conn = server.connect(read_timeout=60)
        self.table = table
        self.latencies: list[float] = []
        self.errors: list[Exception] = []
        self._halt = threading.Event()
        self.start()

    def run(self):
        with self.conn.cursor() as cur:
            while not self._halt.is_set():
                started = time.monotonic()
                try:
                    cur.execute(f"INSERT INTO {self.table} (v) VALUES (2)")
                except Exception as e:
                    self.errors.append(e)
                    return
                self.latencies.append(time.monotonic() - started)
                time.sleep(0.02)

    def finish(self) -> float:
        self._halt.set()
        self.join(30)
        assert not self.is_alive(), "the writer is still blocked"
        self.conn.close()
        assert not self.errors, self.errors
        assert len(self.latencies) >= 2
        return max(self.latencies)


def writable(server, table="qmy.t", seconds=2.0) -> bool:
    w = Writer(server, table)
    return w.done.wait(seconds) and w.error is None


class LongQuery(threading.Thread):
    """A long-running statement in its own session (killed at the end of the test)."""

    def __init__(self, server, sql):
        super().__init__(daemon=True)
        self.server = server
        self.conn = server.connect(read_timeout=120)
        self.id = self.conn.thread_id()
        self.sql = sql
        self.error: Exception | None = None
        self.start()

    def run(self):
        try:
            with self.conn.cursor() as cur:
                cur.execute(self.sql)
        except Exception as e:
            self.error = e

    def wait_running(self, seconds):
        assert wait_until(lambda: (self.server.sql(
            "SELECT TIME_MS FROM information_schema.PROCESSLIST WHERE ID = %s", (self.id,))
            or [(0,)])[0][0] >= seconds * 1000, 10, 0.05), "the long query did not start"

    def stop(self):
        if self.is_alive():
            try:
                self.server.sql(f"KILL QUERY {int(self.id)}")
            except Exception:
                pass
        self.join(10)
        if self.conn.open:
            self.conn.close()


@pytest.fixture
def long_query(db):
    started = []

    def start(sql, running_for=1.2):
        q = LongQuery(db, sql)
        started.append(q)
        q.wait_running(running_for)
        return q

    yield start
    for q in started:
        q.stop()


def master_status(server):
    (file, pos, *_), = server.sql("SHOW MASTER STATUS")
    gtid = server.sql("SELECT @@GLOBAL.gtid_binlog_pos")[0][0]
    return file, int(pos), gtid


@pytest.mark.server
@pytest.mark.parametrize("strategy", ["backup_stage", "ftwrl"])
def test_hold_blocks_writers_until_thaw_and_records_coordinates(adapters, db, tmp_path, strategy,
                                                                monkeypatch):
    import pymysql
    sent: list[str] = []  # every statement packet the adapter wrote, to the real server
    write = pymysql.connections.Connection._execute_command
    monkeypatch.setattr(pymysql.connections.Connection, "_execute_command",
                        lambda conn, command, sql: (sent.append(sql), write(conn, command, sql)))
    target = target_for(db, tmp_path, strategy=strategy)
    facts, hold = freeze(adapters, target)
    try:
        # the lock and the coordinates reads went in one packet: no round trip between them
        blocking = "BACKUP STAGE BLOCK_COMMIT" if strategy == "backup_stage" \
            else "FLUSH TABLES WITH READ LOCK"
        assert f"{blocking};SHOW MASTER STATUS;SELECT @@GLOBAL.gtid_binlog_pos" in sent
        assert facts["flavour"] == "mariadb" and facts["strategy"] == strategy
        assert hold.facts["strategy"] == strategy and hold.session is not None
        innodb, myisam = Writer(db, "qmy.t"), Writer(db, "qmy.m2")
        assert innodb.blocked() and myisam.blocked(0.2), "a writer got through during the hold"
        # The coordinates are in the data directory, and they are the server's while held.
        path = os.path.join(str(db.datadir), my.COORDINATES_NAME)
        assert hold.facts["coordinates_file"] == path
        with open(path) as f:
            recorded = json.load(f)
        file, pos, gtid = master_status(db)
        assert recorded["binlog"] == {"file": file, "position": pos}
        assert recorded["gtid"] == {"gtid_binlog_pos": gtid}
        assert recorded["exact"] is True and recorded["strategy"] == strategy
        assert recorded["server_version"] == db.sql("SELECT VERSION()")[0][0]
        assert recorded["taken_at"].endswith("Z")
        assert hold.facts["coordinates"] == recorded
        assert not os.path.exists(path + ".tmp")
    finally:
        hold.release.send()  # as the core does first, for every target at once
        released = adapters.call("thaw", target, hold=hold)
    assert released == {"released": list(hold.facts["release_sql"])}
    [release] = hold.facts["release_sql"]
    # written once, by the core's send(), with the session check in the same packet
    assert sent.count(f"{release};SELECT CONNECTION_ID()") == 1, sent
    assert "SELECT CONNECTION_ID()" not in sent, "the session check took a round trip of its own"
    assert innodb.done.wait(5) and innodb.error is None
    assert myisam.done.wait(5) and myisam.error is None
    assert master_status(db)[1] > pos, "the blocked writes did not commit after thaw"
    assert adapters.call("thaw", target, hold=hold) is None  # idempotent


def client_files(tmp_path, monkeypatch, socket: str) -> None:
    """Default option files as a stock install lays them out, under tmp_path: the test
    never reads this machine's /etc/mysql or its compiled-in socket paths."""
    etc = tmp_path / "etc"
    (etc / "conf.d").mkdir(parents=True)
    (etc / "my.cnf").write_text(f"[mysqld]\nsocket = /nonexistent/server-only.sock\n"
                                f"!includedir {etc}/conf.d/\n")
    (etc / "conf.d" / "50-client.cnf").write_text(
        f"# as Debian's mariadb.conf.d/50-client.cnf\n[client-server]\nsocket = {socket}\n")
    (etc / "conf.d" / "README").write_text("[client]\nsocket = /nonexistent/not-a-cnf\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".my.cnf").write_text("[client]\nloose-user = root   # socket authentication\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(mysql_options, "DEFAULT_FILES", (str(etc / "my.cnf"), "~/.my.cnf"))
    monkeypatch.setattr(mysql_options, "DEFAULT_SOCKETS", ())


@pytest.mark.root
@pytest.mark.server
def test_a_target_with_only_a_kind_connects_like_the_mysql_client(adapters, db, tmp_path,
                                                                   monkeypatch):
    """root on the server's socket with unix_socket authentication, found through the
    client's option files (!includedir, [client-server], ~/.my.cnf): no setting at all."""
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("unix_socket authentication as root needs root")
    client_files(tmp_path, monkeypatch, str(db.socket))
    target = quiesce.Target(name="main", kind="mysql", settings={}, timeout=5.0, max_hold=30.0)
    facts, hold = freeze(adapters, target)
    try:
        assert facts["account"].startswith("root@localhost"), facts
        assert Writer(db, "qmy.t").blocked(), "a writer got through during the hold"
    finally:
        adapters.call("thaw", target, hold=hold)


@pytest.mark.server
def test_a_session_over_a_unix_socket_builds_no_tls_context(db, tmp_path, monkeypatch):
    """PyMySQL's default TLS ("preferred") loads the CA store for every session, about 20 ms
    of CPU each; on a local socket, as for the mysql client, there is no TLS at all. Over
    TCP PyMySQL's default stays."""
    monkeypatch.setattr(mysql_options, "DEFAULT_FILES", ())
    through_file = tmp_path / "socket.cnf"
    through_file.write_text(f"[client]\nuser = root\nsocket = {db.socket}\n")
    through_file.chmod(0o600)
    cases = {"socket setting": ({"unix_socket": str(db.socket), "user": "root"}, False),
             "option file's socket": ({"option_file": str(through_file)}, False),
             "TCP": ({"option_file": option_file(tmp_path, db)}, True)}
    for case, (settings, tls) in cases.items():
        t = quiesce.Target("m", "mysql", settings, timeout=5.0)
        if not tls and os.geteuid() != 0:
            continue  # root@localhost authenticates by the socket peer: only root can
        conn = mysql_connection.connect(t, my.settings(t))
        try:
            assert conn.ssl is tls and hasattr(conn, "ctx") is tls, case
        finally:
            mysql_connection.close(conn)


@pytest.mark.server
def test_without_option_files_or_a_socket_it_is_tcp_to_localhost_as_pymysql(adapters, db, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(mysql_options, "DEFAULT_FILES", ())
    monkeypatch.setattr(mysql_options, "DEFAULT_SOCKETS", (str(db.socket),))
    # The compiled-in default is used when no file names a socket ...
    assert mysql_connection.client_defaults(my.settings(quiesce.Target("m", "mysql", {}))) == {
        "unix_socket": str(db.socket)}
    # ... never for another host, and a target's own setting wins.
    t = quiesce.Target("m", "mysql", {"host": "127.0.0.1", "port": db.port})
    assert mysql_connection.client_defaults(my.settings(t)) == {}
    monkeypatch.setattr(mysql_options, "DEFAULT_SOCKETS", ())
    with pytest.raises(TargetError, match="cannot connect to localhost:1: "):
        adapters.call("check", quiesce.Target("m", "mysql", {"port": 1}, timeout=2.0))


def test_option_files_are_read_with_the_clients_rules(tmp_path):
    from quiesce.adapters import mysql_options
    inc = tmp_path / "inc.cnf"
    inc.write_text("[client]\nport = 3307\n")
    main = tmp_path / "my.cnf"
    main.write_text(f"; comment\n[mysql]\nuser = not-this-group\n[client]\nuser = first\n"
                    f"password = \"p#ss \\\"w\\\\d\"\nsocket=/s.sock # trailing comment\n"
                    f"!include {inc}\n[mysqld]\nport = 1\n")
    later = tmp_path / "later.cnf"
    later.write_text("[CLIENT-MARIADB]\nuser = second\nunknown_key = x\n")
    loose = tmp_path / "loose.cnf"
    loose.write_text("[client]\nhost = from-a-world-writable-file\n")
    loose.chmod(0o666)
    found = mysql_options.read((str(main), str(tmp_path / "missing.cnf"), str(later), str(loose)))
    assert found == {"user": "second", "password": 'p#ss "w\\d', "socket": "/s.sock",
                     "port": "3307"}


@pytest.mark.server
def test_check_reports_server_and_account(adapters, db, tmp_path):
    target = target_for(db, tmp_path)
    adapters.call("validate", target)
    facts = adapters.call("check", target)
    assert facts["strategy"] == "backup_stage"
    assert facts["locks"] == ["BACKUP STAGE START", "BACKUP STAGE BLOCK_COMMIT"]
    assert facts["account"] == "qz@127.0.0.1"
    assert facts["read_only"] is False and facts["log_bin"] is True and facts["replica"] is False
    assert facts["version"].startswith("10.11")


@pytest.mark.server
def test_long_write_makes_ftwrl_give_up_without_blocking_writers(adapters, db, tmp_path, long_query):
    q = long_query("UPDATE qmy.t SET v = v + SLEEP(60) WHERE id = 1")
    target = target_for(db, tmp_path, strategy="ftwrl", long_query_threshold=0.5, lock_retries=1)
    adapters.call("validate", target)
    loop = WriteLoop(db)
    started = time.monotonic()
    with pytest.raises(TargetError) as e:
        adapters.call("quiesce", target)
    took = time.monotonic() - started
    worst = loop.finish()
    message = str(e.value)
    assert f"query {q.id} by root" in message and "UPDATE qmy.t SET v = v + SLEEP(60)" in message
    assert "kill_long_queries" in message and "nothing is held" in message
    assert "after 2 attempt(s)" in message and took < 5
    # The precheck saw it before any lock was requested: writers never waited.
    assert worst < 0.5, f"a writer waited {worst:.2f} s"
    assert writable(db) and writable(db, "qmy.m2")
    assert q.is_alive(), "the long query was killed although kill_long_queries is off"


@pytest.mark.server
def test_unseen_long_write_stalls_writers_at_most_lock_wait_timeout(adapters, db, tmp_path,
                                                                     long_query):
    """The race the precheck cannot close (the long write is younger than the threshold):
    FTWRL queues, writers queue behind it, and lock_wait_timeout ends both."""
    q = long_query("UPDATE qmy.t SET v = v + SLEEP(60) WHERE id = 1", running_for=0.3)
    target = target_for(db, tmp_path, strategy="ftwrl", long_query_threshold=30,
                        lock_wait_timeout=1, lock_retries=0)
    adapters.call("validate", target)
    loop = WriteLoop(db)
    time.sleep(0.2)
    with pytest.raises(TargetError) as e:
        adapters.call("quiesce", target)
    worst = loop.finish()
    message = str(e.value)
    assert "FLUSH TABLES WITH READ LOCK timed out after lock_wait_timeout = 1 s" in message
    assert f"behind query {q.id} by root" in message and "UPDATE qmy.t" in message
    assert 0.5 < worst < 1 + BOUND_SLACK, f"writers waited {worst:.2f} s"
    assert writable(db), "a write did not go through right after the failed attempt"


@pytest.mark.server
def test_backup_stage_ignores_long_innodb_writes_but_bounds_a_myisam_one(adapters, db, tmp_path,
                                                                          long_query):
    # A long InnoDB write does not hold BACKUP STAGE up: no precheck refusal, no wait.
    inno = long_query("UPDATE qmy.t SET v = v + SLEEP(60) WHERE id = 1")
    target = target_for(db, tmp_path, strategy="backup_stage", long_query_threshold=0.5,
                        lock_wait_timeout=1, lock_retries=1, lock_retry_pause=0.5)
    adapters.call("validate", target)
    hold = adapters.call("quiesce", target)
    assert hold.facts["lock_seconds"] < 0.5
    adapters.call("thaw", target, hold=hold)
    inno.stop()
    # A long write to a non-transactional table does: the BLOCK_DDL stage (which BLOCK_COMMIT
    # runs on its way) waits for it, bounded; InnoDB commits still go on meanwhile.
    q = long_query("UPDATE qmy.m SET v = v + SLEEP(60) WHERE id = 1")
    loop_inno, loop_myisam = WriteLoop(db, "qmy.t"), WriteLoop(db, "qmy.m2")
    with pytest.raises(TargetError) as e:
        adapters.call("quiesce", target)
    worst_inno, worst_myisam = loop_inno.finish(), loop_myisam.finish()
    message = str(e.value)
    assert "after 2 attempt(s): BACKUP STAGE BLOCK_COMMIT timed out after lock_wait_timeout = 1 s" \
        in message
    assert f"behind query {q.id} by root" in message and "UPDATE qmy.m SET" in message
    assert worst_inno < 0.5, f"an InnoDB writer waited {worst_inno:.2f} s"
    assert worst_myisam < 1 + BOUND_SLACK, f"a MyISAM writer waited {worst_myisam:.2f} s"
    # The earlier stages of the failed attempt were ended: nothing is left blocking.
    assert writable(db, "qmy.m2") and writable(db, "qmy.t")


@pytest.mark.server
@pytest.mark.parametrize("strategy, table", [("ftwrl", "qmy.t"), ("backup_stage", "qmy.m")])
def test_kill_long_queries_kills_the_blocker_and_quiesces(adapters, db, tmp_path, long_query,
                                                          strategy, table):
    q = long_query(f"UPDATE {table} SET v = v + SLEEP(60) WHERE id = 1")
    target = target_for(db, tmp_path, strategy=strategy, long_query_threshold=0.5,
                        kill_long_queries=True, lock_wait_timeout=1, lock_retries=1)
    adapters.call("validate", target)
    assert "kill_long_queries" not in str(adapters.call("check", target))
    hold = adapters.call("quiesce", target)
    try:
        assert q.id in hold.facts["killed_queries"]
        q.join(5)
        assert not q.is_alive() and q.error is not None and q.error.args[0] == 1317, q.error
        assert Writer(db).blocked(), "a writer got through during the hold"
    finally:
        adapters.call("thaw", target, hold=hold)
    assert writable(db)


@pytest.mark.server
def test_killed_holder_session_releases_the_lock_and_thaw_says_broken(adapters, db, tmp_path):
    target = target_for(db, tmp_path)
    _, hold = freeze(adapters, target)
    w = Writer(db)
    assert w.blocked()
    db.sql(f"KILL {int(hold.facts['thread_id'])}")
    assert w.done.wait(5) and w.error is None, "the lock outlived its session"
    try:  # as the core does: the prepared release first (its error is thaw's to report)
        hold.release.send()
    except Exception:
        pass
    with pytest.raises(HoldBroken) as e:
        adapters.call("thaw", target, hold=hold)
    assert f"session {hold.facts['thread_id']} was lost before thaw" in str(e.value)
    assert "crash-consistent" in str(e.value)
    assert adapters.call("thaw", target, hold=hold) is None
    # A thaw after the holder process died has nothing to release.
    assert adapters.call("thaw", target, hold=Hold(session=None, facts=hold.facts)) is None


@pytest.mark.server
def test_thaw_releases_even_when_the_settings_went_bad_meanwhile(adapters, db, tmp_path):
    target = target_for(db, tmp_path)
    _, hold = freeze(adapters, target)
    w = Writer(db)
    assert w.blocked()
    os.chmod(target.settings["option_file"], 0o644)  # validate would refuse it now
    assert adapters.call("thaw", target, hold=hold) == {"released": ["BACKUP STAGE END"]}
    assert w.done.wait(5) and w.error is None


@pytest.mark.server
def test_server_side_deadline_releases_a_forgotten_hold(adapters, db, tmp_path):
    """wait_timeout on the holder session = max_hold + timeout: if the holder wedges and no
    thaw or watchdog ever comes, the server itself ends the session and its lock."""
    target = target_for(db, tmp_path, timeout=2, max_hold=1)
    adapters.call("validate", target)
    hold = adapters.call("quiesce", target)
    assert hold.facts["server_deadline_s"] == 3
    w = Writer(db)
    assert w.blocked(1.0)
    assert w.done.wait(6) and w.error is None, "the server did not end the forgotten hold"
    with pytest.raises(HoldBroken, match="wait_timeout = 3 s passed"):
        adapters.call("thaw", target, hold=hold)


@pytest.mark.server
def test_account_without_reload_is_told_the_grant_and_nothing_is_held(adapters, db, tmp_path):
    for strategy in ("auto", "ftwrl"):
        target = target_for(db, tmp_path, user="qz_noreload", strategy=strategy)
        adapters.call("validate", target)
        for hook in ("check", "quiesce"):
            with pytest.raises(TargetError) as e:
                adapters.call(hook, target)
            assert "GRANT RELOAD ON *.* TO 'qz_noreload'@'127.0.0.1'" in str(e.value), str(e.value)
    assert writable(db)
    assert not db.sql("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'qz_noreload'")


@pytest.mark.server
def test_kill_long_queries_needs_connection_admin(adapters, db, tmp_path):
    target = target_for(db, tmp_path, user="qz_noreload", kill_long_queries=True)
    adapters.call("validate", target)
    with pytest.raises(TargetError) as e:
        adapters.call("check", target)
    assert "GRANT RELOAD, CONNECTION ADMIN ON *.* TO 'qz_noreload'@'127.0.0.1'" in str(e.value)


@pytest.mark.server
def test_client_read_timeout_kills_our_own_queued_lock_request(db, tmp_path, long_query):
    """If the server does not answer in time, the adapter kills its own session from a second
    connection: a pending FTWRL must not stay queued with writers behind it."""
    long_query("UPDATE qmy.t SET v = v + SLEEP(60) WHERE id = 1")
    target = target_for(db, tmp_path, strategy="ftwrl", long_query_threshold=30, timeout=3)
    s = my.settings(target)
    conn = my.connect(target, s, read_timeout=1, multi_statements=True)  # as quiesce's
    try:
        server, info = my.server_info(conn)
        my.query(conn, "SET SESSION lock_wait_timeout = 60")  # the server would wait a minute
        plan = strategies.lock_plan(server, "ftwrl")
        loop = WriteLoop(db)
        with pytest.raises(TargetError) as e:
            my._attempt(target, s, conn, server, plan, my._coordinates_reads(plan, info),
                        info["thread_id"], info["account"], [])
        # Gone now, not when the server next notices the dropped socket (up to a second).
        queued = db.sql("SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE "
                        "'FLUSH TABLES WITH READ LOCK%%' AND COMMAND <> 'Killed'")
        worst = loop.finish()
    finally:
        my.close(conn)
    assert f"session {info['thread_id']} was killed" in str(e.value)
    assert not queued, "our lock request stayed queued after the client gave up"
    assert worst < 1 + BOUND_SLACK, f"writers waited {worst:.2f} s"
    assert not db.sql("SELECT ID FROM information_schema.PROCESSLIST WHERE ID = %s",
                      (info["thread_id"],))
    assert writable(db)


@pytest.mark.server
def test_unwritable_coordinates_file_releases_and_fails(adapters, db, tmp_path):
    target = target_for(db, tmp_path, coordinates_file=str(tmp_path / "missing" / "c.json"))
    adapters.call("validate", target)
    with pytest.raises(TargetError) as e:
        adapters.call("check", target)
    assert "coordinates_file" in str(e.value)
    with pytest.raises(TargetError) as e:
        adapters.call("quiesce", target)
    assert "cannot write the coordinates file" in str(e.value) and "released" in str(e.value)
    assert writable(db)
    target = target_for(db, tmp_path, coordinates_file=False)
    adapters.call("validate", target)
    hold = adapters.call("quiesce", target)
    assert hold.facts["coordinates_file"] is None and hold.facts["coordinates"]["binlog"]
    adapters.call("thaw", target, hold=hold)


@pytest.mark.server
def test_replica_sql_thread_stopped_during_hold_and_restarted(adapters, db, make_mariadb, tmp_path):
    replica = make_mariadb(options={"server-id": 2})
    gtid = db.sql("SELECT @@GLOBAL.gtid_binlog_pos")[0][0]
    replica.sql(f"SET GLOBAL gtid_slave_pos = '{gtid}'")
    replica.sql(f"CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {db.port}, "
                f"MASTER_USER = 'root', MASTER_PASSWORD = '{db.root_password}', "
                f"MASTER_USE_GTID = slave_pos")
    replica.sql("START SLAVE")

    def sql_running():
        return bool(replica.sql("SELECT 1 FROM information_schema.PROCESSLIST "
                                "WHERE COMMAND = 'Slave_SQL'"))

    assert wait_until(sql_running, 10)
    target = quiesce.Target(name="replica", kind="mysql", timeout=5, max_hold=30, settings={
        "unix_socket": str(replica.socket), "user": "root", "stop_replica_sql_thread": True})
    facts, hold = freeze(adapters, target)
    assert facts["replica"]["source_host"] == "127.0.0.1"
    assert hold.facts["replica_sql_thread_stopped"] is True
    assert hold.facts["replica_start_sql"] == "START REPLICA SQL_THREAD"
    assert hold.facts["coordinates"]["replica"]["sql_running"] == "No"
    assert not sql_running()
    adapters.call("thaw", target, hold=hold)
    assert wait_until(sql_running, 5)
    # The holder died: its lock went with its session, the stopped SQL thread did not.
    hold = adapters.call("quiesce", target)
    assert not sql_running()
    replica.sql(f"KILL {int(hold.facts['thread_id'])}")
    my.close(hold.session)
    assert adapters.call("thaw", target, hold=Hold(session=None, facts=hold.facts)) == {
        "replica_sql_thread": "started"}
    assert wait_until(sql_running, 5)
    # The coordinates file in the data directory does not bother the server at startup.
    assert (replica.datadir / my.COORDINATES_NAME).is_file()
    replica.stop()
    replica.start()
    assert replica.sql("SELECT COUNT(*) FROM mysql.user")[0][0] > 0


def run_json(config, *args):
    proc = run(config, *args, "--json")
    try:
        return proc, json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"quiesce {' '.join(args)} printed no JSON (exit {proc.returncode}):"
                             f"\n{proc.stdout}\n{proc.stderr}") from None


@pytest.mark.server
def test_freeze_and_thaw_through_the_cli(db, tmp_path):
    config = write_config(tmp_path, {"db": {"kind": "mysql", "timeout": 5,
                                            "option_file": option_file(tmp_path, db)}}, max_hold=30)
    try:
        proc, report = run_json(config, "freeze")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        quiesced = [o for o in report["outcomes"] if o["phase"] == "quiesce"][0]
        assert quiesced["facts"]["strategy"] == "backup_stage"
        assert quiesced["facts"]["coordinates"]["binlog"]["file"]
        w = Writer(db)
        assert w.blocked(), "a writer got through while frozen"
        proc, _ = run_json(config, "thaw")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert w.done.wait(5) and w.error is None
        # Killing the holder process releases the lock at once; thaw reports it.
        assert run(config, "freeze").returncode == 0
        w = Writer(db)
        assert w.blocked()
        pid = run_json(config, "status")[1]["state"]["holder_pid"]
        os.kill(int(pid), 9)
        assert w.done.wait(5) and w.error is None, "the lock outlived the holder process"
        assert run(config, "thaw").returncode != 0
    finally:
        run(config, "thaw")


# ---------------------------------------------------------------------------- settings


def test_validate_refuses_passwords_loose_option_files_and_bad_bounds(tmp_path):
    def validate(**settings):
        target = quiesce.Target(name="main", kind="mysql", settings=settings, timeout=5)
        my.validate(target)
        return target

    with pytest.raises(ConfigError, match="never put a password in the config"):
        validate(password="x")
    loose = tmp_path / "my.cnf"
    loose.write_text("[client]\npassword = x\n")
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        validate(option_file=str(loose))
    with pytest.raises(ConfigError, match="at most the target's timeout"):
        validate(lock_wait_timeout=6)
    with pytest.raises(ConfigError, match="expected one of"):
        validate(strategy="lifb")
    with pytest.raises(ConfigError, match="absolute path"):
        validate(coordinates_file="rel.json")
    target = validate(unix_socket="/run/mysqld/mysqld.sock", user="backup")
    assert target.unknown_keys() == []
    assert my.settings(target).lock_wait_timeout == 2


# ------------------------------------------------------------------ pure: SQL per server


MARIA_10_3 = strategies.parse_server("10.3.39-MariaDB-0+deb10u1", "Debian 10")
MARIA_10_4 = strategies.parse_server("10.4.1-MariaDB", "mariadb.org binary distribution")
MARIA_10_11 = strategies.parse_server("10.11.19-MariaDB-0+deb12u1-log", "Debian 12")
MYSQL_5_7 = strategies.parse_server("5.7.44-log", "MySQL Community Server (GPL)")
MYSQL_8_0_21 = strategies.parse_server("8.0.21", "MySQL Community Server - GPL")
MYSQL_8_0 = strategies.parse_server("8.0.36", "MySQL Community Server - GPL")
MYSQL_8_4 = strategies.parse_server("8.4.2", "MySQL Community Server - GPL")


def test_parse_server():
    assert (MARIA_10_11.flavour, MARIA_10_11.version) == ("mariadb", (10, 11, 19))
    assert strategies.parse_server("5.5.5-10.6.12-MariaDB", "").version == (10, 6, 12)
    assert strategies.parse_server("11.4.2-MariaDB", "MariaDB Server").flavour == "mariadb"
    assert (MYSQL_8_4.flavour, MYSQL_8_4.version) == ("mysql", (8, 4, 2))
    percona = strategies.parse_server("8.0.35-27", "Percona Server (GPL), Release 27")
    assert percona.flavour == "mysql" and percona.label == "MySQL 8.0.35"


def test_auto_picks_the_lightest_consistent_lock():
    assert strategies.choose_strategy("auto", MARIA_10_11) == "backup_stage"
    assert strategies.choose_strategy("auto", MARIA_10_4) == "backup_stage"
    assert strategies.choose_strategy("auto", MARIA_10_3) == "ftwrl"
    assert strategies.choose_strategy("auto", MYSQL_8_0) == "instance_lock"
    assert strategies.choose_strategy("auto", MYSQL_8_4) == "instance_lock"
    assert strategies.choose_strategy("auto", MYSQL_5_7) == "ftwrl"
    assert strategies.choose_strategy("ftwrl", MYSQL_8_4) == "ftwrl"
    with pytest.raises(TargetError, match="needs MariaDB 10.4.1 or later.*MySQL 8.4.2"):
        strategies.choose_strategy("backup_stage", MYSQL_8_4)
    with pytest.raises(TargetError, match="needs MySQL 8.0 or later.*MariaDB 10.11.19"):
        strategies.choose_strategy("instance_lock", MARIA_10_11)
    with pytest.raises(TargetError, match="MySQL 5.7.44"):
        strategies.choose_strategy("instance_lock", MYSQL_5_7)


def test_lock_plans_issue_the_exact_sql():
    p = strategies.lock_plan(MARIA_10_11, "backup_stage")
    assert p.lock == ("BACKUP STAGE START", "BACKUP STAGE BLOCK_COMMIT") and p.blocks_from == 1
    assert p.release == ("BACKUP STAGE END",) and p.exact and p.precheck is None
    assert p.coordinates == ("SHOW MASTER STATUS", "SELECT @@GLOBAL.gtid_binlog_pos")
    p = strategies.lock_plan(MARIA_10_11, "ftwrl")
    assert (p.lock, p.release, p.precheck) == (("FLUSH TABLES WITH READ LOCK",), ("UNLOCK TABLES",),
                                               "writes")
    p = strategies.lock_plan(MYSQL_5_7, "ftwrl")
    assert p.precheck == "all" and p.coordinates == ("SHOW MASTER STATUS",)
    p = strategies.lock_plan(MYSQL_8_4, "instance_lock")
    assert (p.lock, p.release) == (("LOCK INSTANCE FOR BACKUP",), ("UNLOCK INSTANCE",))
    assert p.coordinates == ("SELECT LOCAL FROM performance_schema.log_status",)
    assert not p.exact and p.precheck is None and p.suspects == "ddl"
    p = strategies.lock_plan(MYSQL_8_4, "instance_lock", ftwrl_too=True)
    assert p.lock == ("LOCK INSTANCE FOR BACKUP", "FLUSH TABLES WITH READ LOCK")
    assert p.release == ("UNLOCK TABLES", "UNLOCK INSTANCE")
    assert p.coordinates == ("SHOW BINARY LOG STATUS",) and p.exact and p.precheck == "all"
    assert strategies.lock_plan(MYSQL_8_0, "instance_lock", ftwrl_too=True).coordinates == (
        "SHOW MASTER STATUS",)
    assert strategies.binlog_status_sql(strategies.parse_server("8.2.0", "")) == "SHOW BINARY LOG STATUS"
    assert strategies.binlog_status_sql(strategies.parse_server("8.1.0", "")) == "SHOW MASTER STATUS"


def test_replica_statements_per_version():
    assert strategies.replica_sql(MYSQL_8_4, "stop") == "STOP REPLICA SQL_THREAD"
    assert strategies.replica_sql(MYSQL_8_0, "start") == "START REPLICA SQL_THREAD"
    assert strategies.replica_sql(MYSQL_8_0_21, "stop") == "STOP SLAVE SQL_THREAD"
    assert strategies.replica_sql(MYSQL_5_7, "status") == "SHOW SLAVE STATUS"
    assert strategies.replica_sql(MARIA_10_4, "stop") == "STOP SLAVE SQL_THREAD"
    assert strategies.replica_sql(MARIA_10_11, "status") == "SHOW REPLICA STATUS"


def test_session_setup_bounds_every_wait():
    assert strategies.session_setup_sql(MARIA_10_11, lock_wait_timeout=2, statement_timeout=5,
                                idle_deadline=35) == (
        "SET SESSION lock_wait_timeout = 2", "SET SESSION wait_timeout = 35",
        "SET SESSION max_statement_time = 5")
    assert strategies.session_setup_sql(MYSQL_8_4, lock_wait_timeout=2, statement_timeout=5,
                                idle_deadline=35) == (
        "SET SESSION lock_wait_timeout = 2", "SET SESSION wait_timeout = 35")
    assert "TIME_MS / 1000" in strategies.processlist_sql(MARIA_10_11)
    assert "TIME AS SECONDS" in strategies.processlist_sql(MYSQL_8_4)


def test_statements_queued_behind_a_backup_lock_are_victims_not_blockers():
    assert strategies.is_victim("Waiting for backup lock")
    assert strategies.is_victim("Waiting for global read lock") and strategies.is_victim("Waiting for commit lock")
    assert not strategies.is_victim("User sleep") and not strategies.is_victim(None)


@pytest.mark.parametrize("sql, writes, ddl", [
    ("UPDATE t SET v = SLEEP(60)", True, False),
    ("  /* app */ insert into t values (1)", True, False),
    ("SELECT SLEEP(60)", False, False),
    ("(SELECT 1) UNION (SELECT 2)", False, False),
    ("-- report\nSELECT * FROM t", False, False),
    ("ALTER TABLE t ADD COLUMN c INT", True, True),
    ("/*!40101 OPTIMIZE */ TABLE t", True, True),
    ("CALL refresh_all()", True, False),
    ("show processlist", False, False),
])
def test_which_running_statements_hold_a_lock_up(sql, writes, ddl):
    assert strategies.is_suspect("writes", sql) is writes
    assert strategies.is_suspect("ddl", sql) is ddl
    assert strategies.is_suspect("all", sql) is True


def test_privileges_from_show_grants_and_the_grant_to_run():
    grants = strategies.parse_grants([
        "GRANT PROCESS, REPLICATION CLIENT ON *.* TO `bk`@`%`",
        "GRANT BACKUP_ADMIN,CONNECTION_ADMIN ON *.* TO `bk`@`%`",
        "GRANT SELECT ON `performance_schema`.`log_status` TO `bk`@`%`",
        "GRANT `r_backup`@`%` TO `bk`@`%`",
    ])
    plan = strategies.lock_plan(MYSQL_8_4, "instance_lock")
    needs = strategies.required_privileges(MYSQL_8_4, plan, binlog=True, kill=True, replica=False)
    assert strategies.missing_privileges(needs, grants) == []
    plan = strategies.lock_plan(MYSQL_8_4, "instance_lock", ftwrl_too=True)
    needs = strategies.required_privileges(MYSQL_8_4, plan, binlog=True, kill=True, replica=True)
    missing = strategies.missing_privileges(needs, grants)
    assert [n.grant for n in missing] == ["RELOAD", "REPLICATION_SLAVE_ADMIN"]
    assert strategies.grant_statements(missing, "bk@%") == [
        "GRANT RELOAD, REPLICATION_SLAVE_ADMIN ON *.* TO 'bk'@'%'"]
    # FLUSH_TABLES (8.0+) is enough for FTWRL; SUPER covers the replica; ALL covers all.
    assert not strategies.missing_privileges(needs, strategies.parse_grants([
        "GRANT FLUSH_TABLES, PROCESS, SUPER, BACKUP_ADMIN, REPLICATION CLIENT ON *.* TO `x`@`%`"]))
    assert not strategies.missing_privileges(needs, strategies.parse_grants(
        ["GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` WITH GRANT OPTION"]))
    plan = strategies.lock_plan(MYSQL_8_4, "instance_lock")
    missing = strategies.missing_privileges(strategies.required_privileges(
        MYSQL_8_4, plan, binlog=True, kill=False, replica=False), {"*.*": {"PROCESS"}})
    assert strategies.grant_statements(missing, "bk@localhost") == [
        "GRANT BACKUP_ADMIN ON *.* TO 'bk'@'localhost'",
        "GRANT SELECT ON performance_schema.log_status TO 'bk'@'localhost'"]
    # MariaDB names
    plan = strategies.lock_plan(MARIA_10_11, "backup_stage")
    needs = strategies.required_privileges(MARIA_10_11, plan, binlog=True, kill=True, replica=True)
    assert [n.grant for n in strategies.missing_privileges(needs, {"*.*": set()})] == [
        "RELOAD", "PROCESS", "BINLOG MONITOR", "CONNECTION ADMIN", "REPLICATION SLAVE ADMIN",
        "SLAVE MONITOR"]
    plan = strategies.lock_plan(MARIA_10_3, "ftwrl")
    needs = strategies.required_privileges(MARIA_10_3, plan, binlog=False, kill=True, replica=False)
    assert [n.grant for n in strategies.missing_privileges(needs, {"*.*": set()})] == [
        "RELOAD", "PROCESS", "SUPER"]


# --------------------------------------------- MySQL hooks against a scripted connection


class ScriptedMySQL:
    """Answers like a MySQL server would, by statement prefix, and records every statement.

    Only for MySQL, which cannot be installed here; MariaDB is always tested for real."""

    def __init__(self, answers: dict[str, tuple[tuple[str, ...], list[tuple]]], log: list[str]):
        self.answers, self.log, self.open = answers, log, True

    def cursor(self):
        return _Cursor(self)

    def close(self):
        if not self.open:
            raise RuntimeError("Already closed")
        self.open = False


class _Cursor:
    def __init__(self, conn):
        self.conn, self.description, self._rows = conn, None, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, sql):
        self.conn.log.append(sql)
        for prefix, (columns, rows) in self.conn.answers.items():
            if sql.startswith(prefix):
                self.description = [(c,) for c in columns] if columns else None
                self._rows = rows
                return
        self.description, self._rows = None, []  # SET, LOCK, UNLOCK, STOP ...: OK packet

    def fetchall(self):
        return self._rows


def mysql_script(version, *, grants, tables=(), replica=False, thread_id=42):
    answers = {
        "SELECT VERSION()": (("v", "c", "id", "u", "d", "b", "r"),
                             [(version, "MySQL Community Server - GPL", thread_id, "bk@%",
                               "/var/lib/mysql/", 1, 0)]),
        "SELECT @@GLOBAL.super_read_only": (("s",), [(1 if replica else 0,)]),
        "SELECT CONCAT(TABLE_SCHEMA": (("t",), [(t,) for t in tables]),
        "SHOW GRANTS": (("g",), [(g,) for g in grants]),
        "SELECT ID, USER": (("i", "u", "h", "c", "s", "st", "in"), []),
        "SELECT @@hostname, @@server_id": (("h", "s"), [("db1", 7)]),
        "SELECT LOCAL FROM performance_schema.log_status": (("LOCAL",), [(json.dumps(
            {"gtid_executed": "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-77",
             "binary_log_file": "binlog.000003", "binary_log_position": 157}),)]),
        "SHOW BINARY LOG STATUS": (("File", "Position", "Binlog_Do_DB", "Binlog_Ignore_DB",
                                    "Executed_Gtid_Set"), [("binlog.000009", 4711, "", "", "u:1-9")]),
        "SHOW MASTER STATUS": (("File", "Position", "Binlog_Do_DB", "Binlog_Ignore_DB",
                                "Executed_Gtid_Set"), [("binlog.000008", 815, "", "", "u:1-8")]),
        "SELECT CONNECTION_ID()": (("id",), [(thread_id,)]),
    }
    status = ("Source_Host", "Replica_IO_Running", "Replica_SQL_Running", "Relay_Source_Log_File",
              "Exec_Source_Log_Pos", "Seconds_Behind_Source", "Executed_Gtid_Set")
    row = ("primary1", "Yes", "Yes", "binlog.000100", 999, 0, "p:1-100") if replica else None
    for word in ("REPLICA", "SLAVE"):
        answers[f"SHOW {word} STATUS"] = (status, [row] if row else [])
    return answers


@pytest.fixture
def scripted(monkeypatch):
    """Route the adapter's connections to a ScriptedMySQL; returns (set_script, log)."""
    log: list[str] = []
    script: dict = {}
    monkeypatch.setattr(my, "connect", lambda target, s, **kw: ScriptedMySQL(script, log))
    return script, log


def actions(log):
    """What the adapter did, without its reads."""
    reads = ("SELECT", "SHOW")
    return [s for s in log if not s.startswith(reads)]


def test_mysql_84_instance_lock_sql(adapters, scripted, tmp_path):
    script, log = scripted
    script.update(mysql_script("8.4.2", grants=[
        "GRANT PROCESS, REPLICATION CLIENT ON *.* TO `bk`@`%`",
        "GRANT BACKUP_ADMIN ON *.* TO `bk`@`%`",
        "GRANT SELECT ON `performance_schema`.`log_status` TO `bk`@`%`"]))
    path = tmp_path / "coords.json"
    target = quiesce.Target(name="m", kind="mysql", timeout=5, max_hold=30,
                            settings={"coordinates_file": str(path)})
    facts, hold = freeze(adapters, target)
    assert facts["strategy"] == "instance_lock" and facts["super_read_only"] is False
    assert "SHOW GRANTS" in log
    del log[:]
    adapters.call("thaw", target, hold=hold)
    assert actions(log) == ["UNLOCK INSTANCE"]
    assert log[0] == "UNLOCK INSTANCE", "writers waited for a check before the release"
    recorded = json.loads(path.read_text())
    assert recorded["binlog"] == {"file": "binlog.000003", "position": 157}
    assert recorded["gtid"] == {"gtid_executed": "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-77"}
    assert recorded["exact"] is False and recorded["strategy"] == "instance_lock"
    del log[:]
    hold = adapters.call("quiesce", target)
    assert actions(log) == ["SET SESSION lock_wait_timeout = 2", "SET SESSION wait_timeout = 35",
                            "LOCK INSTANCE FOR BACKUP"]
    assert "SELECT LOCAL FROM performance_schema.log_status" in log
    adapters.call("thaw", target, hold=hold)


def test_mysql_80_non_transactional_tables_add_ftwrl_and_replica_stop(adapters, scripted,
                                                                      tmp_path):
    script, log = scripted
    script.update(mysql_script("8.0.36", tables=["app.audit (MyISAM)"], replica=True, grants=[
        "GRANT RELOAD, PROCESS, REPLICATION CLIENT ON *.* TO `bk`@`%`",
        "GRANT BACKUP_ADMIN,REPLICATION_SLAVE_ADMIN ON *.* TO `bk`@`%`"]))
    target = quiesce.Target(name="m", kind="mysql", timeout=5, max_hold=30, settings={
        "coordinates_file": str(tmp_path / "c.json"), "stop_replica_sql_thread": True})
    my.validate(target)
    hold = adapters.call("quiesce", target)
    assert actions(log) == ["SET SESSION lock_wait_timeout = 2", "SET SESSION wait_timeout = 35",
                            "STOP REPLICA SQL_THREAD", "LOCK INSTANCE FOR BACKUP",
                            "FLUSH TABLES WITH READ LOCK"]
    assert "SHOW MASTER STATUS" in log and "SHOW BINARY LOG STATUS" not in log
    coords = hold.facts["coordinates"]
    assert coords["binlog"] == {"file": "binlog.000008", "position": 815} and coords["exact"]
    assert coords["replica"]["exec_source_log_pos"] == 999
    del log[:]
    assert adapters.call("thaw", target, hold=hold) == {
        "released": ["UNLOCK TABLES", "UNLOCK INSTANCE"], "replica_sql_thread": "started"}
    assert actions(log) == ["UNLOCK TABLES", "UNLOCK INSTANCE", "START REPLICA SQL_THREAD"]
    # Without RELOAD the extra FTWRL cannot be had: check names the GRANT.
    script.update(mysql_script("8.0.36", tables=["app.audit (MyISAM)"], replica=True, grants=[
        "GRANT PROCESS, REPLICATION CLIENT ON *.* TO `bk`@`%`",
        "GRANT BACKUP_ADMIN,REPLICATION_SLAVE_ADMIN ON *.* TO `bk`@`%`"]))
    with pytest.raises(TargetError, match=r"GRANT RELOAD ON \*\.\* TO 'bk'@'%'"):
        adapters.call("check", target)


def test_mysql_57_ftwrl_with_old_replica_words(adapters, scripted, tmp_path):
    script, log = scripted
    script.update(mysql_script("5.7.44", replica=True, thread_id=9, grants=[
        "GRANT RELOAD, PROCESS, SUPER, REPLICATION CLIENT ON *.* TO 'bk'@'%'"]))
    target = quiesce.Target(name="m", kind="mysql", timeout=5, max_hold=60, settings={
        "coordinates_file": str(tmp_path / "c.json"), "stop_replica_sql_thread": True})
    my.validate(target)
    hold = adapters.call("quiesce", target)
    assert actions(log) == ["SET SESSION lock_wait_timeout = 2", "SET SESSION wait_timeout = 65",
                            "STOP SLAVE SQL_THREAD", "FLUSH TABLES WITH READ LOCK"]
    assert "SHOW SLAVE STATUS" in log
    del log[:]
    adapters.call("thaw", target, hold=hold)
    assert actions(log) == ["UNLOCK TABLES", "START SLAVE SQL_THREAD"]
    # A changed thread id means a reconnect happened: the new session held nothing.
    hold = adapters.call("quiesce", target)
    script["SELECT CONNECTION_ID()"] = (("id",), [(10,)])
    with pytest.raises(HoldBroken, match="changed from 9 to 10"):
        adapters.call("thaw", target, hold=hold)


def test_a_malformed_option_file_never_echoes_its_lines(tmp_path):
    from quiesce.plugins import load_adapters
    cnf = tmp_path / "my.cnf"
    cnf.write_text("password=Sup3rS3cret\n")  # no [client] header
    cnf.chmod(0o600)
    adapters = load_adapters(load_entrypoints=False)
    target = quiesce.Target("db", "mysql", {"option_file": str(cnf)}, timeout=2)
    adapters.call("validate", target)
    with pytest.raises(quiesce.TargetError) as info:
        adapters.call("check", target)
    assert "Sup3rS3cret" not in str(info.value)
    assert "not a valid MySQL option file" in str(info.value)
