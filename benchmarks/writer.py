"""The independent writer: commits small writes as fast as it can and records when each one
completed.

Run as its own process by the harness (never imported by it), so nothing the harness or
quiesce does can pause it except the database itself:

    python writer.py SPEC_JSON RECORD_PREFIX

SPEC_JSON names the kind and its targets. With several targets the writer commits to them
in turn (round robin); a commit that blocks holds the whole writer, exactly like an
application thread that waits for its database. Each commit's completion time is
``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process on the machine)
and goes to RECORD_PREFIX.t (float64) with the target's index in RECORD_PREFIX.i (uint16),
appended in chunks and flushed when the writer is told to stop (SIGTERM).

It prints ``ready`` on stdout once it has committed to every target, then nothing more.

SQLite has no lock queue: a writer that finds the database locked gets SQLITE_BUSY, and
SQLite's own busy handler sleeps 1, 2, 5, ... up to 100 ms between attempts, which would
hide the release by up to 100 ms. This writer retries every 0.2 ms instead, so it sees a
release within a fraction of a millisecond. The server databases queue a blocked writer and
wake it the moment the lock goes.
"""

from __future__ import annotations

import array
import json
import signal
import sys
import time

CHUNK = 4096


def sqlite_committer(target: dict):
    import sqlite3

    # timeout=0: SQLITE_BUSY at once, retried below (see the module docstring).
    conn = sqlite3.connect(target["path"], timeout=0, isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")
    sql = "INSERT INTO writes (at) VALUES (?)"

    def commit(now=time.monotonic, sleep=time.sleep, busy=sqlite3.OperationalError):
        while True:
            try:
                conn.execute(sql, (now(),))
                return
            except busy as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                sleep(0.0002)
    return commit


def mariadb_committer(target: dict):
    import pymysql

    conn = pymysql.connect(unix_socket=target["socket"], user="root", database=target["database"],
                           autocommit=True)
    cur = conn.cursor()
    sql = "INSERT INTO writes (at) VALUES (%s)"

    def commit(now=time.monotonic):
        cur.execute(sql, (now(),))
    return commit


def postgresql_committer(target: dict):
    import psycopg

    conn = psycopg.connect(host=target["host"], port=target["port"], user=target["user"],
                           dbname=target["dbname"], autocommit=True)
    sql = "INSERT INTO writes (at) VALUES (%s)"

    def commit(now=time.monotonic):
        conn.execute(sql, (now(),), prepare=True)
    return commit


def redis_committer(target: dict):
    import redis

    client = redis.Redis(unix_socket_path=target["socket"], socket_timeout=None)

    def commit():
        client.incr("bench:writes")
    return commit


COMMITTERS = {"sqlite": sqlite_committer, "mariadb": mariadb_committer,
              "postgresql": postgresql_committer, "redis": redis_committer}


def main() -> int:
    spec = json.loads(sys.argv[1])
    prefix = sys.argv[2]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    commits = [COMMITTERS[spec["kind"]](t) for t in spec["targets"]]
    n = len(commits)
    times = array.array("d")
    which = array.array("H")
    with open(prefix + ".t", "wb") as tf, open(prefix + ".i", "wb") as wf:
        def flush():
            times.tofile(tf)
            which.tofile(wf)
            del times[:], which[:]
            tf.flush()
            wf.flush()

        now = time.monotonic
        for i, commit in enumerate(commits):
            commit()
            times.append(now())
            which.append(i)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        i = 0
        while not stop:
            commits[i]()
            times.append(now())
            which.append(i)
            i = i + 1 if i + 1 < n else 0
            if len(times) >= CHUNK:
                flush()
        flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
