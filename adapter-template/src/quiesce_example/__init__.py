"""quiesce adapter for kvd, the demonstration key-value server that ships with this template.

This module is the adapter: quiesce finds it through the entry point in pyproject.toml
(group ``quiesce.adapters``, name = the kind, ``example``) and calls the hooks below for
every target of that kind. ``kv.py`` is the application it quiesces; replace it with
yours (see README.md, "Make it yours").

What each hook does for kvd:

validate  reads the settings (``address``); touches nothing.
check     connects and asks ``ping``: the server answers, and no pause is active. No lock.
flush     ``sync``: fsyncs the data file, so the pause later has little left to write.
quiesce   ``pause`` for ``max_hold`` seconds: writes wait, reads go on, everything
          acknowledged is on disk. The pause is kept by the server (a token and a
          deadline), so the hold is ``Hold.facts`` only and survives the holder's death.
thaw      ``resume`` with the token. A second thaw finds the pause already resumed and
          does nothing. A pause that ended early (deadline passed, server restarted) is
          reported as ``HoldBroken``: the snapshot was not covered the whole time.

Settings of a target (``[targets.NAME]`` in the quiesce config)::

    kind = "example"
    address = "127.0.0.1:7379"    # host:port of kvd (required)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from quiesce import Hold, HoldBroken, Target, TargetError, hookimpl

from . import kv

# A real adapter imports its database driver lazily, inside the hooks (importing the
# adapter must stay cheap: quiesce imports every adapter to list them), with
# quiesce.import_driver("driver_module", "your-extra"): a missing driver becomes one line
# saying what to install. List the driver in your package's dependencies.


@dataclass(frozen=True)
class Settings:
    """A target's settings, read and checked: the one place that knows them."""

    address: str

    @property
    def where(self) -> str:
        """The endpoint, for messages (never put a secret here)."""
        return f"kvd at {self.address}"


def settings(target: Target) -> Settings:
    """Read (and check) every setting. Called by validate and again by each hook, so no
    hook reads target.settings itself."""
    # Read every setting through target.option / target.secret / target.private_file:
    # a key nobody read is reported to the operator as unknown.
    address = target.option("address", str)
    try:
        kv.parse_address(address)
    except ValueError as e:
        raise target.error("address", str(e)) from None
    return Settings(address)


@hookimpl
def validate(target: Target) -> None:
    settings(target)  # never connect here


def _connect(target: Target, s: Settings) -> kv.Client:
    try:
        return kv.Client(s.address, timeout=target.timeout)
    except OSError as e:
        # Errors are one line that says what was wrong and what to do; the core adds the
        # target's name when it reports them.
        raise TargetError(f"cannot connect to {s.where} within {target.timeout:g} s "
                          f"({e}); check that kvd runs and targets.{target.name}.address") \
            from None


def _request(target: Target, s: Settings, client: kv.Client, op: str,
             **fields: Any) -> dict[str, Any]:
    """One request; every failure becomes a TargetError (never a bare driver error)."""
    try:
        return client.request(op, **fields)
    except kv.KVError as e:
        raise TargetError(f"{s.where} refused {op}: {e}") from None
    except (OSError, ValueError) as e:  # timeouts are OSErrors: every wait is bounded
        raise TargetError(f"{s.where} did not answer {op} within "
                          f"{target.timeout:g} s ({type(e).__name__}: {e})") from None


def _clock(deadline: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(deadline))


@hookimpl
def check(target: Target) -> dict[str, Any]:
    s = settings(target)
    # Preflight only: connect, version, privileges. Take no lock, change nothing.
    with _connect(target, s) as client:
        info = _request(target, s, client, "ping")
    if info["paused"]:
        raise TargetError(f"writes on {s.where} are already paused until "
                          f"{_clock(info['pause_deadline'])} (another backup, or a pause left "
                          f"by a freeze that crashed); retry after that")
    return {"server_id": info["server_id"], "protocol": info["version"],
            "records": info["records"]}


@hookimpl
def flush(target: Target) -> dict[str, Any]:
    s = settings(target)
    # Cheap work that shortens the hold. Must leave nothing locked.
    with _connect(target, s) as client:
        return {"synced_bytes": _request(target, s, client, "sync")["synced_bytes"]}


@hookimpl
def quiesce(target: Target) -> Hold:
    s = settings(target)
    # Make the target safe to snapshot. Bound every wait by target.timeout and set any
    # server-side deadline from target.max_hold, so nothing outlives the hold's limit.
    with _connect(target, s) as client:
        pause = _request(target, s, client, "pause", seconds=target.max_hold)
    # The server keeps the pause, so nothing goes in Hold.session: the facts are enough
    # for a thaw from another process after a crash. Never put a secret in the facts.
    return Hold(facts={"token": pause["token"], "server_id": pause["server_id"],
                       "deadline": pause["deadline"]})


@hookimpl
def thaw(target: Target, hold: Hold) -> dict[str, Any] | None:
    s = settings(target)
    # Called by the holder after the snapshot, by a `quiesce thaw` after a crash with
    # hold.session None and only the facts, and possibly more than once: be idempotent,
    # and release only what this hold took.
    token = hold.facts.get("token")
    if token is None:
        return None  # nothing was paused by us; another client's pause is not ours to end
    with _connect(target, s) as client:
        answer = _request(target, s, client, "resume", token=token)
        if answer["resumed"]:
            return {"resumed": True}
        if answer["reason"] == "resumed":
            return None  # released by an earlier thaw
        if answer["reason"] == "deadline":
            raise HoldBroken(f"the pause on {s.where} ended at its deadline "
                             f"({_clock(hold.facts['deadline'])}) before thaw, so writes went "
                             f"on during the snapshot; raise max_hold")
        server_id = _request(target, s, client, "ping")["server_id"]
    if server_id != hold.facts.get("server_id"):
        raise HoldBroken(f"{s.where} restarted during the hold (its server id "
                         f"changed), so writes were not paused for the whole window")
    raise HoldBroken(f"{s.where} does not know the pause this hold took")
