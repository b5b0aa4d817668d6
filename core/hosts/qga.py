"""Talking to a real QEMU guest agent the way a hypervisor does, over a private socket.

The agent speaks QMP-style JSON: one object per command, one object per reply
(``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``). A hypervisor first
sends ``guest-sync`` with a fresh id and discards every reply until the one echoing it,
which flushes anything stale in the channel (qga/main.c, qemu 7.2).

Safety: only ``guest-fsfreeze-freeze-list`` with a non-empty list is ever sent.
``guest-fsfreeze-freeze`` (or the list form without a list) freezes every filesystem,
``/`` included.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

START_TIMEOUT = 10.0


class AgentError(Exception):
    """The agent answered with an error, did not answer in time, or went away."""


class AgentClient:
    def __init__(self, path: str, timeout: float):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""
        #: A reply did not come in time: it may still come, so replies on this
        #: connection no longer match commands. Use a new connection (and guest-sync).
        self.out_of_step = False

    def close(self) -> None:
        self.sock.close()

    def _reply(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                self.out_of_step = True
                raise AgentError(f"no reply within {self.sock.gettimeout():g} s") from None
            if not chunk:
                raise AgentError("the agent closed the connection")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line.lstrip(b"\xff")) if line.strip(b"\xff \r") else self._reply()

    def call(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if command == "guest-fsfreeze-freeze" or (
                command == "guest-fsfreeze-freeze-list" and not (arguments or {}).get("mountpoints")):
            raise AgentError(f"refusing to send {command} without mount points: it would "
                             f"freeze every filesystem, / included")
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        reply = self._reply()
        if "error" in reply:
            raise AgentError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def sync(self) -> int:
        token = random.randrange(1, 2**31)
        self.sock.sendall(json.dumps({"execute": "guest-sync",
                                      "arguments": {"id": token}}).encode() + b"\n")
        while self._reply().get("return") != token:
            pass  # a stale reply from an earlier command
        return token


class PrivateAgent:
    """A qemu-ga of our own: unix socket, state dir, log and an empty config file in a
    temp dir (the machine's own qemu-ga.conf is never read); hook *hook*, or none."""

    def __init__(self, binary: str, hook: str | None):
        self.binary, self.hook = binary, hook
        self.dir = tempfile.mkdtemp(prefix="quiesce-qga-")
        self.socket = os.path.join(self.dir, "qga.sock")
        self.log = os.path.join(self.dir, "qga.log")
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        # -F takes its argument attached (an optional argument to getopt).
        return [self.binary, "-m", "unix-listen", "-p", self.socket, "-t", self.dir,
                "-f", os.path.join(self.dir, "qga.pid"), "-l", self.log,
                *([f"-F{self.hook}"] if self.hook else [])]

    def __enter__(self) -> PrivateAgent:
        conf = os.path.join(self.dir, "qemu-ga.conf")
        open(conf, "w").close()
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd="/", env={**os.environ, "QGA_CONF": conf})
        end = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise AgentError(f"qemu-ga did not start: {self.log_tail()}")
            time.sleep(0.02)
        return self

    def log_tail(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return " | ".join(f.read().strip().splitlines()[-3:]) or "(no log)"
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self, timeout: float) -> AgentClient:
        return AgentClient(self.socket, timeout)
