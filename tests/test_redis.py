"""The Redis adapter against real Redis 7.0 servers started by tests/support/servers.py (and, where
Valkey 8 behaves differently, against Valkey).

Every hold is checked from outside: a writer on another connection must block during the
hold and go on after thaw (or after the server-side deadline), readers must not block, and
the files on disk during the hold must restore into a fresh server with every write made
before the pause.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

import quiesce
from quiesce import Hold, HoldBroken, TargetError
from quiesce.plugins import load_adapters

from .support.helpers import run, wait_until, write_config
from .support.servers import free_port, skip_or_fail


@pytest.fixture(scope="module")
def adapters():
    return load_adapters(load_entrypoints=False)


def target_for(server, *, unix: bool = False, timeout: float = 5, max_hold: float = 30,
               **settings) -> quiesce.Target:
    url = f"unix://{server.socket}" if unix else f"redis://{server.host}:{server.port}"
    settings.setdefault("url", url)
    return quiesce.Target(name="cache", kind="redis", settings=settings, timeout=timeout,
                          max_hold=max_hold)


def freeze(adapters, target) -> tuple[dict, dict | None, Hold]:
    adapters.call("validate", target)
    assert target.unknown_keys() == []
    facts = adapters.call("check", target)
    flushed = adapters.call("flush", target)
    hold = adapters.call("quiesce", target)
    return facts, flushed, hold


class Writer(threading.Thread):
    """SET from another connection; ``done`` tells whether Redis let it through."""

    def __init__(self, server, key: str, value: str = "x"):
        super().__init__(daemon=True)
        self.client = server.client(socket_timeout=30)
        self.key, self.value = key, value
        self.done = threading.Event()
        self.error: Exception | None = None

    def run(self):
        try:
            self.client.set(self.key, self.value)
        except Exception as e:  # reported by the test
            self.error = e
        finally:
            self.done.set()
            self.client.close()

    def blocked(self, seconds: float = 0.5) -> bool:
        return not self.done.wait(seconds)


def writer(server, key: str) -> Writer:
    w = Writer(server, key)
    w.start()
    return w


def writable(server, timeout: float = 0.5) -> bool:
    """Can another client write right now? (A timed-out SET runs later: key is a probe.)"""
    import redis

    client = server.client(socket_timeout=timeout)
    try:
        client.set("probe", "x")
        return True
    except redis.TimeoutError:
        return False
    finally:
        client.close()


def persistence_info(server) -> dict:
    return server.client().info("persistence")


# ----------------------------------------------------------------------- validate


@pytest.mark.parametrize("url, message", [
    ("redis://:s3cret@127.0.0.1:6379", "contains a password"),
    ("redis://app:s3cret@127.0.0.1:6379", "contains a password"),
    ("redis://127.0.0.1:6379?password=s3cret", "unsupported URL parameter"),
    ("http://127.0.0.1:6379", "must start with redis://"),
    ("unix://relative.sock", "absolute socket path"),
])
def test_validate_refuses_bad_urls_without_echoing_secrets(adapters, url, message):
    target = quiesce.Target(name="cache", kind="redis", settings={"url": url})
    with pytest.raises(quiesce.ConfigError, match=message) as e:
        adapters.call("validate", target)
    assert "s3cret" not in str(e.value)


def test_validate_settings(adapters, tmp_path):
    loose = tmp_path / "pw"
    loose.write_text("pw\n")
    loose.chmod(0o644)
    bad = [({"password_file": str(loose)}, "chmod 600"),
           ({"ssl_ca_certs": str(loose)}, "need a rediss:// url"),
           ({"mode": "all"}, "expected one of"),
           ({"aof_rewrite": "yes"}, "expected bool")]
    for settings, message in bad:
        target = quiesce.Target(name="c", kind="redis", settings=settings)
        with pytest.raises(quiesce.ConfigError, match=message):
            adapters.call("validate", target)
    target = quiesce.Target(name="c", kind="redis", settings={"db": 0})
    adapters.call("validate", target)
    assert target.unknown_keys() == ["db"]


# -------------------------------------------------- the hold, per persistence configuration


@pytest.mark.server
@pytest.mark.parametrize("persistence", ["rdb", "aof"])
def test_hold_blocks_writers_serves_readers_and_disk_has_every_write(
        adapters, make_redis, tmp_path, persistence):
    server = make_redis(persistence=persistence, datadir=tmp_path / "data")
    client = server.client()
    client.mset({f"before-flush:{i}": i for i in range(100)})
    target = target_for(server, unix=persistence == "aof")
    adapters.call("validate", target)
    facts = adapters.call("check", target)
    assert facts["redis_version"].startswith("7.0.") and facts["mode"] == "pause"
    assert "warnings" not in facts
    flushed = adapters.call("flush", target)
    # written after flush's save, before the pause: must still be on disk at snapshot time
    client.mset({f"after-flush:{i}": i for i in range(100)})
    hold = adapters.call("quiesce", target)
    try:
        assert hold.session is None and hold.facts["pause_ms"] == 30000
        json.dumps(hold.facts)  # stored on tmpfs by the core
        w = writer(server, "during-hold")
        assert w.blocked(), "a SET went through during the hold"
        reader = server.client(socket_timeout=2)
        assert reader.get("before-flush:7") == b"7" and reader.dbsize() == 200
        reader.close()
        assert persistence_info(server)["rdb_bgsave_in_progress"] == 0
        shutil.copytree(server.dir, tmp_path / "copy")  # what a snapshot now would hold
    finally:
        thawed = adapters.call("thaw", target, hold=hold)
    assert w.done.wait(5) and w.error is None
    assert client.get("during-hold") == b"x"
    assert thawed["pause_left_ms"] > 25000

    if persistence == "rdb":
        assert flushed["bgsave"]["seconds"] < 5
        assert isinstance(hold.facts["final_bgsave"], dict), hold.facts  # dirty after flush
        assert facts["aof"] == "off" and facts["rdb_save_points"] != "off"
    else:
        assert flushed is None and hold.facts["final_bgsave"] == "not needed"
        assert facts["aof"] == "on, appendfsync everysec"
    restored = make_redis.from_datadir(tmp_path / "copy", persistence=persistence).client()
    assert restored.dbsize() == 200
    assert restored.get("after-flush:99") == b"99" and restored.get("during-hold") is None


@pytest.mark.server
def test_no_persistence_warns_loudly_and_still_pauses(adapters, make_redis):
    server = make_redis(persistence="none")
    target = target_for(server)
    facts, flushed, hold = freeze(adapters, target)
    try:
        assert any(w.startswith("NOTHING ON DISK") for w in facts["warnings"]), facts
        assert any(w.startswith("NOTHING ON DISK") for w in flushed["warnings"])
        assert persistence_info(server)["rdb_saves"] == 0, "flush saved though RDB is off"
        w = writer(server, "k")
        assert w.blocked()
    finally:
        adapters.call("thaw", target, hold=hold)
    assert w.done.wait(5)


@pytest.mark.server
def test_pause_ends_by_itself_at_max_hold_and_thaw_reports_it(adapters, make_redis):
    server = make_redis(persistence="rdb")
    target = target_for(server, max_hold=1.5)
    _, _, hold = freeze(adapters, target)
    started = time.monotonic()
    w = writer(server, "k")
    assert w.blocked(0.5)
    assert w.done.wait(10), "Redis did not end the pause by itself"
    assert 1.0 < time.monotonic() - started < 5
    with pytest.raises(HoldBroken, match="the pause ended by itself at .*, before thaw: the "
                                         "snapshot may contain writes made after the freeze"):
        adapters.call("thaw", target, hold=hold)


@pytest.mark.server
def test_thaw_without_holder_releases_the_pause(adapters, make_redis):
    server = make_redis(persistence="aof")
    target = target_for(server)
    _, _, hold = freeze(adapters, target)
    facts = json.loads(json.dumps(hold.facts))  # what a crashed holder left on tmpfs
    w = writer(server, "k")
    assert w.blocked()
    fresh = load_adapters(load_entrypoints=False)  # as in a new `quiesce thaw` process
    result = fresh.call("thaw", target, hold=Hold(session=None, facts=facts))
    assert w.done.wait(5) and w.error is None
    assert result["pause_left_ms"] > 0
    fresh.call("thaw", target, hold=Hold(session=None, facts=facts))  # twice: harmless
    # a crash before the facts were recorded: thaw still releases
    adapters.call("quiesce", target)
    assert not writable(server)
    assert fresh.call("thaw", target, hold=Hold()) is not None
    assert writable(server)


@pytest.mark.server
def test_thaw_after_a_redis_restart_reports_the_lost_pause(adapters, make_redis):
    server = make_redis(persistence="aof")
    target = target_for(server)
    _, _, hold = freeze(adapters, target)
    server.restart()  # a shutdown is not a write: it goes through the pause
    with pytest.raises(HoldBroken, match="restarted during the hold"):
        adapters.call("thaw", target, hold=hold)


@pytest.mark.server
def test_an_early_unpause_by_another_client_is_reported_on_valkey(adapters, make_valkey):
    """Valkey 8 reports pause state (INFO clients: paused_actions), so thaw can tell that
    someone else's CLIENT UNPAUSE ended the hold early; Redis 7.0 cannot say."""
    server = make_valkey(persistence="none")
    target = target_for(server)
    _, _, hold = freeze(adapters, target)
    assert not writable(server)
    server.client().execute_command("CLIENT", "UNPAUSE")  # someone else ends the pause
    with pytest.raises(HoldBroken, match="had already ended before thaw"):
        adapters.call("thaw", target, hold=hold)


@pytest.mark.server
def test_a_pause_still_held_at_thaw_is_ok_on_valkey(adapters, make_valkey):
    server = make_valkey(persistence="rdb")
    target = target_for(server)
    facts, _, hold = freeze(adapters, target)
    assert facts["valkey_version"].startswith("8.")
    assert not writable(server)
    assert adapters.call("thaw", target, hold=hold)["pause_left_ms"] > 0
    assert writable(server)


@pytest.mark.server
def test_flush_only_mode_saves_but_does_not_pause(adapters, make_redis):
    server = make_redis(persistence="rdb")
    server.client().set("k", "v")
    target = target_for(server, mode="flush-only")
    facts, flushed, hold = freeze(adapters, target)
    assert facts["mode"] == "flush-only" and flushed["bgsave"]
    assert persistence_info(server)["rdb_changes_since_last_save"] == 0
    assert hold is None and writable(server)
    assert adapters.call("thaw", target, hold=Hold()) is None


# ------------------------------------------------------------------------------- saves


@pytest.mark.server
def test_failed_background_save_refuses_flush_and_quiesce(adapters, make_redis, tmp_path):
    # stop-writes-on-bgsave-error no: Redis itself keeps accepting writes after a failed
    # save, so only the adapter stands between a stale RDB and the snapshot
    server = make_redis(persistence="rdb", settings={"enable-protected-configs": "yes",
                                                     "stop-writes-on-bgsave-error": "no"})
    client = server.client()
    gone = tmp_path / "gone"
    gone.mkdir()
    client.config_set("dir", str(gone))
    gone.rmdir()  # root ignores modes; a removed directory stops even root's save
    try:
        client.set("k", "v")
        target = target_for(server)
        adapters.call("validate", target)
        with pytest.raises(TargetError, match="background save .* failed"):
            adapters.call("flush", target)
        assert persistence_info(server)["rdb_bgsave_in_progress"] == 0
        # quiesce's final save fails the same way and leaves no pause behind
        with pytest.raises(TargetError, match="failed.*writers were released"):
            adapters.call("quiesce", target)
        assert writable(server)
        assert any("last background save failed" in w
                   for w in adapters.call("check", target)["warnings"])
    finally:
        client.config_set("dir", str(server.dir))
    assert adapters.call("flush", target)["bgsave"]


@pytest.mark.server
def test_flush_waits_for_a_running_save_and_leaves_none_running(adapters, make_redis):
    server = make_redis(persistence="rdb")
    client = server.client()
    client.mset({f"k{i}": i for i in range(40)})
    client.config_set("rdb-key-save-delay", 25000)  # 40 keys x 25 ms: a 1 s save
    before = persistence_info(server)["rdb_saves"]
    client.bgsave(schedule=False)
    target = target_for(server)
    adapters.call("validate", target)
    flushed = adapters.call("flush", target)
    info = persistence_info(server)
    assert info["rdb_bgsave_in_progress"] == 0 and info["rdb_last_bgsave_status"] == "ok"
    assert info["rdb_saves"] == before + 2, "flush did not wait for the running save first"
    assert flushed["bgsave"]["seconds"] > 1.0
    # a save longer than the timeout: refused, named, and the reason is given
    short = target_for(server, timeout=0.5)
    adapters.call("validate", short)
    with pytest.raises(TargetError, match="background save still running .* after 0.5 s"):
        adapters.call("flush", short)


@pytest.mark.server
def test_quiesce_waits_for_a_save_started_after_flush(adapters, make_redis):
    server = make_redis(persistence="aof")  # AOF only: no save of its own is needed
    client = server.client()
    client.mset({f"k{i}": i for i in range(40)})
    target = target_for(server)
    adapters.call("validate", target)
    adapters.call("flush", target)
    client.config_set("rdb-key-save-delay", 25000)  # someone's 1 s BGSAVE
    client.bgsave(schedule=False)
    hold = adapters.call("quiesce", target)
    try:
        # nothing may write to the data directory once the disks freeze
        assert persistence_info(server)["rdb_bgsave_in_progress"] == 0
        assert hold.facts["final_bgsave"] == "not needed"
    finally:
        adapters.call("thaw", target, hold=hold)


@pytest.mark.server
def test_aof_rewrite_only_when_configured(adapters, make_redis):
    server = make_redis(persistence="aof")
    server.client().mset({f"k{i}": i for i in range(40)})
    plain = target_for(server)
    adapters.call("validate", plain)
    assert adapters.call("flush", plain) is None
    assert persistence_info(server)["aof_rewrites"] == 0
    rewrite = target_for(server, aof_rewrite=True)
    adapters.call("validate", rewrite)
    assert adapters.call("flush", rewrite)["aof_rewrite_seconds"] >= 0
    info = persistence_info(server)
    assert info["aof_rewrites"] == 1 and info["aof_rewrite_in_progress"] == 0


@pytest.mark.server
def test_quiesce_that_cannot_finish_its_final_save_releases_writers(adapters, make_redis):
    server = make_redis(persistence="rdb")
    client = server.client()
    client.mset({f"k{i}": i for i in range(40)})
    target = target_for(server, timeout=0.5)
    adapters.call("validate", target)
    adapters.call("flush", target)
    client.config_set("rdb-key-save-delay", 100000)  # a 4 s save
    client.set("dirty", "1")
    with pytest.raises(TargetError, match="still running.*writers were released"):
        adapters.call("quiesce", target)
    assert writable(server)
    client.config_set("rdb-key-save-delay", 0)


# ------------------------------------------------------------------- ACL, auth, TLS, cluster


@pytest.mark.server
def test_missing_acl_permission_names_the_acl_line_that_works(adapters, make_redis_family,
                                                              tmp_path):
    server = make_redis_family(persistence="rdb", users=[
        "backup on >backup-pw +info +config|get +multi +discard",
        "bare on >bare-pw"])
    password_file = tmp_path / "backup.pw"
    password_file.write_text("backup-pw\n")
    password_file.chmod(0o600)
    target = target_for(server, username="backup", password_file=str(password_file))
    adapters.call("validate", target)
    line = ("ACL SETUSER backup +info +config|get +bgsave +client|pause +client|unpause "
            "+multi +discard")
    with pytest.raises(TargetError, match="may not run BGSAVE, CLIENT PAUSE, CLIENT UNPAUSE") as e:
        adapters.call("check", target)
    assert line in str(e.value) and "backup-pw" not in str(e.value)
    assert persistence_info(server)["rdb_saves"] == 0, "the probe ran BGSAVE"
    assert writable(server), "the probe left a pause"

    # a user with no permission at all gets the same line (for its name)
    (tmp_path / "bare.pw").write_text("bare-pw")
    (tmp_path / "bare.pw").chmod(0o600)
    bare = target_for(server, username="bare", password_file=str(tmp_path / "bare.pw"))
    adapters.call("validate", bare)
    with pytest.raises(TargetError, match=r"grant it with: ACL SETUSER bare \+info"):
        adapters.call("check", bare)

    # the suggested line is enough for the whole cycle, and check's probe runs nothing
    server.client().execute_command(*line.split())
    adapters.call("check", target)
    assert persistence_info(server)["rdb_saves"] == 0 and writable(server)
    _, _, hold = freeze(adapters, target)
    w = writer(server, "k")
    assert w.blocked()
    adapters.call("thaw", target, hold=hold)
    assert w.done.wait(5)


@pytest.mark.server
def test_wrong_password_is_a_clear_error(adapters, make_redis, tmp_path):
    server = make_redis(persistence="none", password="right")
    secret = tmp_path / "pw"
    secret.write_text("hunter2-wrong\n")
    secret.chmod(0o600)
    target = target_for(server, password_file=str(secret))
    adapters.call("validate", target)
    with pytest.raises(TargetError, match="refused user 'default'.*check username and "
                                          "password_file") as e:
        adapters.call("check", target)
    assert "hunter2" not in str(e.value)
    secret.write_text("right\n")
    assert adapters.call("check", target)["redis_version"]


@pytest.mark.server
def test_unreachable_server_fails_within_timeout(adapters, make_redis):
    server = make_redis(persistence="none")
    target = target_for(server, timeout=1)
    server.stop()
    adapters.call("validate", target)
    started = time.monotonic()
    with pytest.raises(TargetError, match="cannot connect to Redis at redis://"):
        adapters.call("check", target)
    with pytest.raises(TargetError, match="cannot connect"):
        adapters.call("thaw", target, hold=Hold(facts={"pause_deadline_ms": 0}))
    assert time.monotonic() - started < 5


@pytest.mark.server
def test_tls_connection_with_ca_file(adapters, make_redis, tmp_path):
    if shutil.which("openssl") is None:
        skip_or_fail("openssl is not installed (needed to make the test certificates)")

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=quiesce test CA")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    tls_port = free_port()
    server = make_redis(persistence="aof", settings={
        "tls-port": tls_port, "tls-cert-file": tmp_path / "server.crt",
        "tls-key-file": tmp_path / "server.key", "tls-ca-cert-file": tmp_path / "ca.crt",
        "tls-auth-clients": "no"})
    target = target_for(server, url=f"rediss://127.0.0.1:{tls_port}",
                        ssl_ca_certs=str(tmp_path / "ca.crt"))
    _, _, hold = freeze(adapters, target)
    assert not writable(server)
    adapters.call("thaw", target, hold=hold)
    assert writable(server)
    # without the CA the server's certificate is refused
    untrusted = target_for(server, url=f"rediss://127.0.0.1:{tls_port}")
    adapters.call("validate", untrusted)
    with pytest.raises(TargetError, match="cannot connect"):
        adapters.call("check", untrusted)


@pytest.mark.server
def test_cluster_node_is_reported_as_one_target(adapters, make_redis):
    server = make_redis(persistence="none", settings={"cluster-enabled": "yes",
                                                      "cluster-port": free_port()})
    target = target_for(server)
    adapters.call("validate", target)
    facts = adapters.call("check", target)
    assert any(w.startswith("cluster mode: this target covers only this node")
               for w in facts["warnings"])


# ------------------------------------------------------------------------------------ CLI


@pytest.mark.server
def test_cli_freeze_holds_across_holder_death_and_thaw_releases(make_redis, tmp_path):
    server = make_redis(persistence="aof")
    config = write_config(tmp_path, {"cache": {
        "kind": "redis", "url": f"redis://{server.host}:{server.port}"}},
        max_hold=30, timeout=5)
    try:
        proc = run(config, "freeze", "--json", check_json=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert [(o["phase"], o["status"]) for o in proc.report["outcomes"]] == [
            ("check", "ok"), ("flush", "ok"), ("quiesce", "ok")]
        assert not writable(server)
        # the pause is kept by Redis, not by the holder's connection
        os.kill(proc.report["holder_pid"], signal.SIGKILL)
        time.sleep(0.3)
        assert not writable(server)
        thaw = run(config, "thaw", "--json", check_json=True)
        assert thaw.returncode == 0, thaw.stdout + thaw.stderr
        assert [(o["target"], o["phase"], o["status"]) for o in thaw.report["outcomes"]] == [
            ("cache", "thaw", "ok")]
        assert wait_until(lambda: writable(server), timeout=5)
    finally:
        run(config, "thaw")


@pytest.mark.server
def test_a_target_with_only_a_kind_uses_the_socket_the_servers_config_names(
        adapters, make_redis, tmp_path, monkeypatch):
    """Debian's redis.conf with `unixsocket` uncommented: quiesce connects through it."""
    from quiesce.adapters import redis_connection
    server = make_redis(persistence="rdb")
    conf = tmp_path / "redis.conf"
    conf.write_text(f"# unixsocket /run/redis/redis-server.sock\nport 0\n"
                    f"unixsocket {server.socket}\nunixsocketperm 700\n")
    monkeypatch.setattr(redis_connection, "SERVER_CONFIGS", (str(tmp_path / "absent.conf"), str(conf)))
    target = quiesce.Target(name="cache", kind="redis", settings={}, timeout=5, max_hold=30)
    _, _, hold = freeze(adapters, target)
    try:
        assert not writable(server)
    finally:
        adapters.call("thaw", target, hold=hold)
    assert writable(server)
    # With the socket commented out (the stock file), it is redis-cli's default.
    conf.write_text("# unixsocket /run/redis/redis-server.sock\nport 6379\n")
    assert redis_connection.default_url() == redis_connection.DEFAULT_URL


# ----------------------------------------------------------------------- fast release


def connections_received(server) -> int:
    client = server.client()
    try:  # this probe's own connection is counted too: subtract it
        return int(client.info("stats")["total_connections_received"]) - 1
    finally:
        client.close()


@pytest.mark.server
def test_the_release_is_written_on_the_connection_quiesce_kept(adapters, make_redis):
    """quiesce keeps its connection for the release: the core writes the release on it
    (``Hold.release.send()``, back to back for every target) and writers go at once; thaw
    then only reads the replies. No connection is opened for the release."""
    server = make_redis(persistence="aof")
    target = target_for(server, unix=True)
    _, _, hold = freeze(adapters, target)
    assert hold.release is not None and not hold.session_bound
    w = writer(server, "during")
    assert w.blocked(), "a writer got through the pause"
    before = connections_received(server)
    hold.release.send()
    assert w.done.wait(5) and w.error is None, "the written release did not free the writer"
    facts = adapters.call("thaw", target, hold=hold)
    assert facts["pause_left_ms"] > 0
    assert connections_received(server) - 1 == before, "thaw connected anew"  # -1: the probe


@pytest.mark.server
def test_a_kept_connection_the_server_closed_is_replaced_for_the_release(adapters, make_redis):
    """Redis's `timeout` (or a CLIENT KILL) may close the idle connection during the hold:
    the release is then made on a new one, and thaw still reports the hold as it was."""
    server = make_redis(persistence="aof")
    target = target_for(server, unix=True)
    _, _, hold = freeze(adapters, target)
    admin = server.client()
    try:
        assert admin.client_kill_filter(_type="normal", skipme=True) == 1  # the kept one
    finally:
        admin.close()
    import redis
    try:  # as the core does: a failed write is for thaw to find out
        hold.release.send()
    except redis.ConnectionError:
        pass
    assert not writable(server), "killing the connection ended the pause"
    facts = adapters.call("thaw", target, hold=hold)
    assert facts["pause_left_ms"] > 0
    assert writable(server)
