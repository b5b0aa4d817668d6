"""kvd: a tiny file-backed key-value server, the application this adapter quiesces.

It exists so the template has something real to freeze: a server process with its own
data file, clients that write to it, and a way to pause those writes for a snapshot.
When you turn the template into an adapter for your application, delete this module and
``kv.py`` (its client), and point the adapter (``__init__.py``) and its tests at the real
thing.

Run it::

    python -m quiesce_example.kvd --data /var/lib/kvd/data.log --port 7379

Storage: one append-only file of JSON lines, ``{"k": key, "v": value}``, replayed at start
(a torn last line from a crash is cut off). A ``put`` is written to the file before it is
acknowledged, so it survives the server being killed; it reaches stable storage (fsync)
at the next ``sync``, at ``pause``, and at shutdown, like Redis' ``appendfsync no``.

Protocol: one JSON object per line each way over TCP; every reply has ``"ok"``::

    {"op": "ping"}                        {"ok": true, "server_id": ..., "paused": false, ...}
    {"op": "put", "key": k, "value": v}   {"ok": true, "seq": n}   (waits while paused)
    {"op": "get", "key": k}               {"ok": true, "value": v or null}
    {"op": "sync"}                        {"ok": true, "synced_bytes": n}
    {"op": "pause", "seconds": s}         {"ok": true, "token": t, "deadline": unix time, ...}
    {"op": "resume", "token": t}          {"ok": true, "resumed": true}
                                          {"ok": true, "resumed": false, "reason": "deadline"
                                           | "resumed" | "unknown"}
    anything wrong                        {"ok": false, "error": "..."}

A pause is kept by the server, not by the connection that asked for it: it lasts until
``resume`` with its token or until its deadline, whichever comes first, and only one
pause exists at a time. Writes wait while paused; reads go on. ``pause`` waits for the
write in progress, then fsyncs the file, so everything acknowledged is on disk when it
returns. A restart forgets every pause (the ``server_id`` changes), which is how a client
can tell that a pause it took did not last.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from .kv import parse_address

PROTOCOL_VERSION = "1"
MAX_PAUSE = 3600.0  # seconds: a longer pause is refused
ENDED_KEPT = 256    # how many ended pauses the server remembers, for resume's answer


# -- the server ------------------------------------------------------------------------

class Store:
    """The data, the append-only file, and the pause: one lock guards them all."""

    def __init__(self, path: str):
        self.path = path
        self.data: dict[str, Any] = {}
        self.seq = 0
        self.lock = threading.Condition()
        self.server_id = uuid.uuid4().hex
        self.pause: dict[str, Any] | None = None  # {"token": ..., "deadline": ...}
        self.ended: OrderedDict[str, str] = OrderedDict()  # token -> "deadline" | "resumed"
        self._replay()
        self.file = open(path, "ab")
        self.unsynced = 0

    def _replay(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb+") as f:
            content = f.read()
            complete = content.rfind(b"\n") + 1
            if complete < len(content):  # a torn last record from a crash: cut it off
                f.truncate(complete)
        for line in content[:complete].splitlines():
            record = json.loads(line)
            self.data[record["k"]] = record["v"]
            self.seq += 1

    # Every method below runs with self.lock held.

    def _end_pause(self, how: str) -> None:
        self.ended[self.pause["token"]] = how
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)
        self.pause = None
        self.lock.notify_all()

    def _expire(self) -> None:
        if self.pause is not None and time.time() >= self.pause["deadline"]:
            self._end_pause("deadline")

    def _sync(self) -> int:
        synced, self.unsynced = self.unsynced, 0
        self.file.flush()
        os.fsync(self.file.fileno())
        return synced

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        with self.lock:
            self._expire()
            if op == "ping":
                return {"ok": True, "server_id": self.server_id, "version": PROTOCOL_VERSION,
                        "records": self.seq, "paused": self.pause is not None,
                        "pause_deadline": self.pause["deadline"] if self.pause else None}
            if op == "get":
                return {"ok": True, "value": self.data.get(str(request.get("key")))}
            if op == "put":
                if not isinstance(request.get("key"), str):
                    return {"ok": False, "error": "put needs a string key"}
                while self.pause is not None:  # writes wait for resume or the deadline
                    self.lock.wait(timeout=max(0.0, self.pause["deadline"] - time.time()))
                    self._expire()
                key, value = request["key"], request.get("value")
                line = json.dumps({"k": key, "v": value}).encode() + b"\n"
                self.file.write(line)
                self.file.flush()  # in the OS before the ack: survives a server crash
                self.unsynced += len(line)
                self.data[key] = value
                self.seq += 1
                return {"ok": True, "seq": self.seq}
            if op == "sync":
                return {"ok": True, "synced_bytes": self._sync()}
            if op == "pause":
                seconds = request.get("seconds")
                if not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_PAUSE:
                    return {"ok": False, "error": f"seconds must be a number in (0, {MAX_PAUSE:g}]"}
                if self.pause is not None:
                    until = time.strftime("%H:%M:%S", time.localtime(self.pause["deadline"]))
                    return {"ok": False, "error": f"writes are already paused (until {until})"}
                synced = self._sync()  # no put is in progress: they run under this lock
                self.pause = {"token": uuid.uuid4().hex, "deadline": time.time() + seconds}
                return {"ok": True, "token": self.pause["token"],
                        "deadline": self.pause["deadline"], "server_id": self.server_id,
                        "synced_bytes": synced}
            if op == "resume":
                token = request.get("token")
                if self.pause is not None and self.pause["token"] == token:
                    self._end_pause("resumed")
                    return {"ok": True, "resumed": True}
                return {"ok": True, "resumed": False, "reason": self.ended.get(token, "unknown")}
            return {"ok": False, "error": f"unknown op {op!r}"}

    def close(self) -> None:
        with self.lock:
            self._sync()
            self.file.close()


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            try:
                request = json.loads(line)
                reply = self.server.store.handle(request if isinstance(request, dict) else {})
            except ValueError as e:
                reply = {"ok": False, "error": f"not a JSON request: {e}"}
            try:
                self.wfile.write(json.dumps(reply).encode() + b"\n")
            except OSError:
                return  # the client gave up (a write it stopped waiting for still counts)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, store: Store, host: str, port: int):
        self.store = store
        super().__init__((host, port), _Handler)


def serve(data: str, host: str = "127.0.0.1", port: int = 7379) -> None:
    """Serve until SIGTERM or SIGINT; the data file is fsynced on the way out."""
    store = Store(data)
    server = Server(store, host, port)

    def stop(signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(f"kvd listening on {host}:{port} server_id {store.server_id}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        store.close()


# -- a server process, for tests and demonstrations -------------------------------------

class Process:
    """``kvd`` in a child process on a free port: ``start``, ``restart``, ``stop``."""

    def __init__(self, data: str, port: int = 0):
        self.data, self.port = data, port
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> Process:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quiesce_example.kvd", "--data", self.data,
             "--port", str(self.port)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True)
        line = self.proc.stdout.readline()  # "kvd listening on HOST:PORT server_id ID"
        if not line.startswith("kvd listening on "):
            self.stop()
            raise RuntimeError(f"kvd did not start: {line!r}")
        self.address = line.split()[3]
        self.port = parse_address(self.address)[1]  # a restart keeps the address
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc.stdout.close()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quiesce_example.kvd",
                                     description="A tiny file-backed key-value server.")
    parser.add_argument("--data", required=True, help="the append-only data file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7379, help="0 picks a free port")
    args = parser.parse_args(argv)
    serve(args.data, args.host, args.port)


if __name__ == "__main__":
    main()
