"""The client side of kvd's protocol: what a real adapter gets from its database driver.

kvd itself (the server, the application this adapter quiesces) is ``kvd.py``; this
module is all the adapter imports. Every request waits at most the timeout given to the
``Client``; a server that refuses a request raises :class:`KVError` with its message.
"""

from __future__ import annotations

import json
import socket
from typing import Any


class KVError(Exception):
    """The server refused a request; the message is the server's."""


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` to a pair; ValueError with a reason when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


class Client:
    """One connection; every request waits at most *timeout* seconds for its answer."""

    def __init__(self, address: str, timeout: float):
        self.address = address
        self.sock = socket.create_connection(parse_address(address), timeout=timeout)
        self.file = self.sock.makefile("rwb")

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its answer."""
        self.send(op, **fields)
        return self.receive()

    def send(self, op: str, **fields: Any) -> None:
        self.file.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        self.file.flush()

    def receive(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError(f"kvd at {self.address} closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise KVError(reply.get("error", "refused"))
        return reply

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
