"""What this machine and the drivers allow: one small operation on each of N targets, three
ways, with the same drivers quiesce uses and the same servers the cycles ran on.

* **N threads** (quiesce's hooks): one thread per target, started beforehand, all waiting
  on one event; each does the operation once when it is set. Timed from the set to the
  last thread's reply: what waking N driver sessions costs when each needs the
  interpreter lock (one CPython interpreter lock; the threads also queue for the CPUs).
* **one thread, in turn**: the same N operations one after another, from one thread.
* **one thread, written together**: every request written first, then every reply read
  (servers only): what the lock gate and ``Hold.release`` do for the statement itself.

The operation: Redis ``PING`` (redis-py), MariaDB ``DO 0`` (PyMySQL), SQLite ``BEGIN
IMMEDIATE`` then ``ROLLBACK`` (sqlite3). No writer runs meanwhile, so these are floors: in
the cycles the writer and the servers' own work share the same two CPUs.
"""

from __future__ import annotations

import sqlite3
import statistics
import threading
import time

REPEATS = {"full": 30, "quick": 3}


class _Redis:
    def __init__(self, server):
        import redis
        self.client = redis.Redis(unix_socket_path=str(server.socket), protocol=2,
                                  single_connection_client=True)

    def once(self):
        self.client.execute_command("PING")

    def write(self):
        self.client.connection.send_command("PING")

    def read(self):
        self.client.connection.read_response()

    def close(self):
        self.client.close()


class _MariaDB:
    def __init__(self, server):
        import pymysql
        self.conn = pymysql.connect(unix_socket=str(server.socket), user="root",
                                    ssl_disabled=True, autocommit=True)
        self.query_command = pymysql.constants.COMMAND.COM_QUERY

    def once(self):
        self.conn.query("DO 0")

    def write(self):
        self.conn._execute_command(self.query_command, "DO 0")  # as mysql._lock_together

    def read(self):
        self.conn.next_result()

    def close(self):
        self.conn.close()


class _SQLite:
    def __init__(self, path):
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def once(self):
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("ROLLBACK")

    def close(self):
        self.conn.close()


def _sessions(kind, n: int) -> list:
    if kind.name == "redis":
        return [_Redis(s) for s in kind.servers[:n]]
    if kind.name == "mariadb":
        return [_MariaDB(s) for s in kind.servers[:n]]
    if kind.name == "sqlite":
        return [_SQLite(p) for p in kind.paths[:n]]
    raise ValueError(kind.name)


def _threads(sessions: list) -> float:
    go = threading.Event()
    done: list[float] = []

    def run(session):
        go.wait()
        session.once()
        done.append(time.monotonic())
    threads = [threading.Thread(target=run, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    time.sleep(0.05)  # every thread is waiting
    start = time.monotonic()
    go.set()
    for t in threads:
        t.join()
    return max(done) - start


def _in_turn(sessions: list) -> float:
    start = time.monotonic()
    for s in sessions:
        s.once()
    return time.monotonic() - start


def _together(sessions: list) -> float:
    start = time.monotonic()
    for s in sessions:
        s.write()
    for s in sessions:
        s.read()
    return time.monotonic() - start


def measure(kind, counts: list[int], mode: str) -> dict:
    """The three figures (median ms) for each count of targets of *kind*."""
    out = {"kind": kind.name, "repeats": REPEATS[mode], "by_targets": {}}
    for n in counts:
        sessions = _sessions(kind, n)
        try:
            ways = {"threads": _threads, "in_turn": _in_turn}
            if hasattr(sessions[0], "write"):
                ways["together"] = _together
            figures = {}
            for name, way in ways.items():
                way(sessions)  # warm
                samples = []
                for _ in range(REPEATS[mode]):
                    samples.append(way(sessions))
                    time.sleep(0.005)
                figures[name] = round(statistics.median(samples) * 1000, 2)
            out["by_targets"][str(n)] = figures
        finally:
            for s in sessions:
                s.close()
    return out
