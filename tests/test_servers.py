"""The throwaway test servers of tests/support/servers.py really start, serve, restore and stop."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.servers import (
    MariaDBServer, Pg15Server, RedisServer, ServerError, ServerFactory, TEST_USER, free_port,
    skip_or_fail,
)

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parent.parent


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _process_tree(pid: int) -> list[int]:
    """pid and its descendants, read from /proc."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    tree, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            tree.append(child)
            todo.append(child)
    return tree


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _assert_stopped(server, pids: list[int]) -> None:
    assert not server.running and server.pid is None
    assert not [pid for pid in pids if _alive(pid)], "server processes survived stop()"
    assert not _port_open(server.port)


def _owner(pid: int) -> int:
    return os.stat(f"/proc/{pid}").st_uid


# ------------------------------------------------------------------------------ PostgreSQL


@pytest.mark.parametrize("fixture, major", [("pg15", 15), ("pg18", 18)])
def test_postgres_roundtrip(request, fixture, major):
    server = request.getfixturevalue(fixture)
    assert server.version == major
    assert server.sql("SHOW server_version_num")[0][0].startswith(str(major))
    assert server.sql("SHOW wal_level") == [("replica",)]
    assert server.sql("SHOW fsync") == [("on",)]
    table = f"t_{fixture}"
    server.sql(f"CREATE TABLE IF NOT EXISTS {table} (id int PRIMARY KEY, v text)")
    server.sql(f"INSERT INTO {table} VALUES (%s, %s) ON CONFLICT DO NOTHING", (1, "one"))
    with server.connect() as conn:
        assert conn.autocommit
        assert conn.execute(f"SELECT v FROM {table} WHERE id = 1").fetchone() == ("one",)
    # the unix socket works too
    with server.connect(host=str(server.socket_dir)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (server.superuser,)
    if os.geteuid() == 0:
        assert _owner(server.pid) == __import__("pwd").getpwnam(TEST_USER).pw_uid


def test_postgres_password_roles(pg15):
    import psycopg

    pg15.sql("DROP ROLE IF EXISTS app")
    pg15.sql("CREATE ROLE app LOGIN PASSWORD 'app-secret'")
    with pg15.connect(user="app", password="app-secret") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        pg15.connect(user="app", password="wrong")
    pg15.sql("DROP ROLE app")


def test_postgres_settings_restart_and_restore(make_pg15, server_tmp_path):
    archive = server_tmp_path / "archive"
    archive.mkdir()
    server = make_pg15(settings={"idle_session_timeout": "5min", "archive_mode": "on",
                                 "archive_command": f"cp %p {archive}/%f"})
    server.chown(archive)
    assert server.sql("SHOW idle_session_timeout") == [("5min",)]
    assert server.sql("SHOW archive_mode") == [("on",)]
    server.sql("CREATE TABLE t (id int)")
    server.sql("INSERT INTO t SELECT generate_series(1, 100)")
    server.sql("SELECT pg_switch_wal()")

    # stop / start on the same directory and port
    port = server.port
    server.stop()
    assert not server.running
    server.start()
    assert server.port == port and server.sql("SELECT count(*) FROM t") == [(100,)]

    # crash, copy the files, recover the copy in a fresh server
    server.sql("INSERT INTO t SELECT generate_series(101, 150)")
    server.kill()
    copy = server_tmp_path / "copy"
    shutil.copytree(server.datadir, copy, symlinks=True)
    restored = make_pg15.from_datadir(copy)
    assert restored.datadir == copy and restored.port != port
    assert restored.sql("SELECT count(*) FROM t") == [(150,)]
    assert "database system was interrupted" in restored.log_tail(200)
    amcheck = subprocess.run(
        [str(restored.bin("pg_amcheck")), "-h", str(restored.socket_dir), "-p", str(restored.port),
         "-U", restored.superuser, "--install-missing", "--all"],
        capture_output=True, text=True)
    assert amcheck.returncode == 0, amcheck.stdout + amcheck.stderr
    assert any(archive.iterdir()), "archive_command archived nothing"


def test_postgres_restore_while_original_runs(make_pg18, server_tmp_path):
    """A copy taken from a running server (postmaster.pid included) starts next to it."""
    server = make_pg18()
    server.sql("CREATE TABLE t AS SELECT 1 AS x")
    server.sql("CHECKPOINT")
    copy = server_tmp_path / "copy"
    shutil.copytree(server.datadir, copy, symlinks=True)
    restored = make_pg18.from_datadir(copy)
    assert restored.sql("SELECT x FROM t") == [(1,)]
    assert server.sql("SELECT x FROM t") == [(1,)]
    with pytest.raises(ServerError, match="running in"):
        make_pg18.from_datadir(server.datadir)


def test_postgres_data_on_caller_directory(make_pg15, server_tmp_path):
    data = server_tmp_path / "volume" / "pgdata"
    server = make_pg15(datadir=data)
    assert server.datadir == data and (data / "PG_VERSION").exists()
    assert not (data / "pg15.log").exists() and server.log_path.parent == server.workdir
    assert server.sql("SELECT 1") == [(1,)]


# -------------------------------------------------------------------------------- MariaDB


def test_mariadb_roundtrip(mariadb):
    assert mariadb.version[:2] == (10, 11)
    assert mariadb.sql("SELECT @@log_bin, @@bind_address") == [(1, "127.0.0.1")]
    status = mariadb.sql("SHOW MASTER STATUS")
    assert status and status[0][0].startswith("binlog.")
    mariadb.sql("CREATE DATABASE IF NOT EXISTS app")
    mariadb.sql("CREATE TABLE IF NOT EXISTS app.t (id int PRIMARY KEY, v text) ENGINE=InnoDB")
    mariadb.sql("REPLACE INTO app.t VALUES (%s, %s)", (1, "one"), database="app")
    with mariadb.connect(database="app", via_socket=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT v FROM t WHERE id = 1")
        assert cur.fetchone() == ("one",)
    mariadb.sql("CREATE OR REPLACE USER 'app'@'127.0.0.1' IDENTIFIED BY 'app-secret'")
    mariadb.sql("GRANT SELECT ON app.* TO 'app'@'127.0.0.1'")
    with mariadb.connect(user="app", password="app-secret", database="app") as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM t")
        assert cur.fetchone() == (1,)


def test_mariadb_crash_copy_restore(make_mariadb, tmp_path):
    server = make_mariadb(options={"innodb_buffer_pool_size": "24M"})
    assert server.sql("SELECT @@innodb_buffer_pool_size") == [(24 * 1024 * 1024,)]
    server.sql("CREATE DATABASE app")
    server.sql("CREATE TABLE app.t (id int PRIMARY KEY) ENGINE=InnoDB")
    server.sql("INSERT INTO t SELECT seq FROM seq_1_to_500", database="app")
    server.kill()
    copy = tmp_path / "copy"
    shutil.copytree(server.datadir, copy)
    restored = make_mariadb.from_datadir(copy)
    assert restored.sql("SELECT count(*) FROM app.t") == [(500,)]
    assert restored.sql("CHECK TABLE app.t")[-1][-1] == "OK"
    # the original directory still restarts too
    server.start()
    assert server.sql("SELECT count(*) FROM app.t") == [(500,)]


# ---------------------------------------------------------------------------------- Redis


def test_redis_roundtrip(redis_server):
    assert redis_server.version[:2] == (7, 0)
    client = redis_server.client()
    client.set("k", "v")
    assert client.get("k") == b"v"
    assert client.config_get("appendonly") == {"appendonly": "no"}
    assert client.config_get("dir") == {"dir": str(redis_server.dir)}


def test_valkey_is_the_wheels_valkey_8(make_valkey):
    server = make_valkey(persistence="none")
    assert server.binary.name == "valkey-server" and server.version[:1] == (8,)
    info = server.client().info("server")
    assert info["server_name"] == "valkey" and info["valkey_version"].startswith("8.")


@pytest.mark.parametrize("persistence, survives", [("rdb", True), ("aof", True), ("none", False)])
def test_redis_persistence_modes(make_redis_family, tmp_path, persistence, survives):
    server = make_redis_family(persistence=persistence, datadir=tmp_path / "data")
    client = server.client()
    expected_aof = "yes" if persistence == "aof" else "no"
    assert client.config_get("appendonly") == {"appendonly": expected_aof}
    client.set("key", "value")
    if persistence == "rdb":
        client.save()
    server.stop()  # SIGTERM: final save / AOF fsync where configured
    assert not list((tmp_path / "data").glob("*.log")), "log must not go to the data directory"
    copy = tmp_path / "copy"
    shutil.copytree(server.dir, copy)
    restored = make_redis_family.from_datadir(copy, persistence=persistence)
    assert restored.client().get("key") == (b"value" if survives else None)


def test_redis_password_and_acl_users(make_redis):
    import redis

    server = make_redis(persistence="none", password="topsecret",
                        users=["alice on >alice-pw ~app:* +@all"])
    with pytest.raises(redis.AuthenticationError):
        server.client(password=None).ping()
    assert server.client().ping()
    alice = server.client(username="alice", password="alice-pw")
    alice.set("app:1", "x")
    with pytest.raises(redis.exceptions.NoPermissionError):
        alice.set("other", "x")


# ----------------------------------------------------------------------- process lifecycle


@pytest.mark.parametrize("factory", ["make_pg15", "make_pg18", "make_mariadb", "make_redis",
                                     "make_valkey"])
def test_stop_really_stops(request, factory):
    server = request.getfixturevalue(factory)()
    pids = _process_tree(server.pid)
    assert len(pids) >= 1 and _port_open(server.port)
    server.stop()
    _assert_stopped(server, pids)
    server.start()
    pids = _process_tree(server.pid)
    server.kill()
    _assert_stopped(server, pids)


def test_postgres_immediate_stop(make_pg15):
    server = make_pg15()
    pids = _process_tree(server.pid)
    assert len(pids) > 3  # postmaster and its auxiliary processes
    server.stop(mode="immediate")
    _assert_stopped(server, pids)


def test_factory_cleanup_removes_servers_and_directories():
    factory = ServerFactory(RedisServer)
    server = factory(persistence="none")
    pid, workdir = server.pid, server.workdir
    factory.cleanup()
    assert not _alive(pid) and not workdir.exists()


def test_port_taken_by_someone_else_is_retried():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = Pg15Server(start_timeout=30)
        try:
            server.port = squatter.getsockname()[1]  # as if taken after free_port() chose it
            server._initialize()
            server.start()
            assert server.port != squatter.getsockname()[1]
            assert server.sql("SELECT 1") == [(1,)]
        finally:
            server.cleanup()


def test_start_failure_reports_log_tail():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        with pytest.raises(ServerError) as info:
            RedisServer.create(port=squatter.getsockname()[1], persistence="none")
    assert "exited with status" in str(info.value)
    assert "Address already in use" in str(info.value)


_ORPHAN_SCRIPT = """
import os, signal, sys
from tests.support.servers import RedisServer
server = RedisServer.create(persistence="none")
print(server.pid, server.workdir, flush=True)
if sys.argv[1] == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_server_dies_with_the_test_process(how):
    """atexit stops servers left running; if the test process is SIGKILLed the kernel does."""
    if RedisServer.missing():
        skip_or_fail(RedisServer.missing())
    proc = subprocess.run([sys.executable, "-c", _ORPHAN_SCRIPT, how], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    pid, workdir = proc.stdout.split()
    deadline = time.monotonic() + 10
    while _alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(int(pid))
    if how == "exit":
        assert not Path(workdir).exists()
    shutil.rmtree(workdir, ignore_errors=True)


def test_missing_binary_skips_or_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        skip_or_fail("no such server")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        skip_or_fail("no such server")


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
