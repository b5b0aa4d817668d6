"""A throwaway real mongod for the mongodb adapter's tests, when one is on PATH.

No MongoDB server can be installed from the registries this project reaches, so on most
machines here :func:`mongod_binary` finds nothing and the real-server tests skip with
:data:`NO_MONGOD` as the reason (even in CI: docs/architecture.md, "Tests", says why). Where a
``mongod`` exists, :class:`Mongod` starts one in a temporary directory on a free loopback
port, as a one-member replica set (so ``hello`` reports a primary), and always stops it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NO_MONGOD = ("no mongod on PATH: real-server MongoDB tests need a mongod binary, and none "
             "can be installed from the registries this project reaches; the wire-level "
             "tests in this module cover the protocol instead")


def mongod_binary() -> str | None:
    return os.environ.get("QUIESCE_MONGOD") or shutil.which("mongod")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: get SIGKILL if the test process dies, so no mongod outlives it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Mongod:
    def __init__(self, *, auth: bool = False, replica_set: str | None = "rs0"):
        self.binary = mongod_binary()
        assert self.binary, NO_MONGOD
        self.dir = Path(tempfile.mkdtemp(prefix="quiesce-mongod-"))
        (self.dir / "data").mkdir()
        self.port = free_port()
        self.auth, self.replica_set = auth, replica_set
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self, timeout: float = 60) -> "Mongod":
        cmd = [self.binary, "--dbpath", str(self.dir / "data"), "--port", str(self.port),
               "--bind_ip", "127.0.0.1", "--logpath", str(self.dir / "mongod.log"),
               "--setParameter", "enableTestCommands=1"]
        if self.replica_set:
            cmd += ["--replSet", self.replica_set]
        if self.auth:
            cmd += ["--auth"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        import pymongo
        deadline = time.monotonic() + timeout
        client = pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=1000)
        try:
            while True:
                try:
                    client.admin.command("ping")
                    break
                except pymongo.errors.PyMongoError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"mongod did not start: {self.log_tail()}")
                    time.sleep(0.2)
            if self.replica_set:
                try:
                    client.admin.command("replSetInitiate", {
                        "_id": self.replica_set,
                        "members": [{"_id": 0, "host": f"127.0.0.1:{self.port}"}]})
                except pymongo.errors.OperationFailure as e:
                    if "already initialized" not in str(e):
                        raise
                while not client.admin.command("hello").get("isWritablePrimary"):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"mongod never became primary: {self.log_tail()}")
                    time.sleep(0.2)
        finally:
            client.close()
        return self

    def client(self, **kwargs):
        import pymongo
        kwargs.setdefault("serverSelectionTimeoutMS", 5000)
        return pymongo.MongoClient(self.uri, **kwargs)

    def unlock_all(self) -> None:
        """Release every fsync lock, whoever took it (test cleanup only)."""
        with self.client() as client:
            while client.admin.command({"currentOp": 1, "$ownOps": True}).get("fsyncLock"):
                client.admin.command("fsyncUnlock")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.dir / "mongod.log").read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
