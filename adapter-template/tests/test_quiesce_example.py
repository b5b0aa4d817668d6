"""The adapter against quiesce's conformance kit, plus what is special about it.

Renaming? Change KIND, DISTRIBUTION and the module imported below (README.md, "Rename
checklist"). The kit needs a harness: a running instance of the application, a target
pointing at it, and an independent client that writes.
"""

from __future__ import annotations

import importlib.metadata
import json
import socket
import subprocess
import sys
import time

import pytest

from quiesce import ConfigError, Hold, HoldBroken, Target, TargetError
from quiesce.testing import AdapterContract, BaseHarness

import quiesce_example as adapter
from quiesce_example import kv, kvd

KIND = "example"
DISTRIBUTION = "quiesce-example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """kvd on a free port with its data file in tmp_path; stopped afterwards."""
    process = kvd.Process(str(tmp_path / "data.log")).start()
    yield process
    process.stop()


class Harness(BaseHarness):
    """What the conformance kit needs (see quiesce.testing.Harness)."""

    kind = KIND

    def __init__(self, server: kvd.Process):
        self.server = server

    def target(self, **overrides) -> Target:
        return Target("kv", KIND, {"address": self.server.address, **overrides}, timeout=2.0,
                      max_hold=60.0)

    def write(self, timeout: float) -> bool:
        # An independent client, not the adapter: did one write commit within timeout?
        try:
            with kv.Client(self.server.address, timeout=timeout) as client:
                client.request("put", key="probe", value=time.time())
            return True
        except TimeoutError:
            return False  # still waiting behind a pause

    def break_hold(self, hold: Hold) -> None:
        # Real life: the server restarts while the snapshot runs, and its pause is gone.
        self.server.restart()

    def unreachable_target(self) -> Target:
        return Target("nowhere", KIND, {"address": f"127.0.0.1:{free_port()}"}, timeout=1.0)


class TestContract(AdapterContract):
    @pytest.fixture
    def harness(self, server):
        return Harness(server)


def test_discovered_through_its_entry_point():
    proc = subprocess.run([sys.executable, "-m", "quiesce", "adapters", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [listed] = [a for a in json.loads(proc.stdout) if a["kind"] == KIND]
    keys = ("kind", "distribution", "version", "bundled", "hooks")  # quiesce may add more
    assert {key: listed[key] for key in keys} == {"kind": KIND, "distribution": DISTRIBUTION,
                      "version": importlib.metadata.version(DISTRIBUTION), "bundled": False,
                      "hooks": ["validate", "check", "flush", "quiesce", "thaw"]}


def test_validate_names_the_bad_setting():
    with pytest.raises(ConfigError) as info:
        adapter.validate(Target("kv", KIND, {"address": "localhost"}))
    assert str(info.value) == "targets.kv.address: expected host:port, got 'localhost'"


def test_writes_wait_for_the_pause_and_commit_after_thaw(server):
    target = Harness(server).target()
    hold = adapter.quiesce(target)
    with kv.Client(server.address, timeout=5) as writer:
        writer.send("put", key="k", value="during")
        time.sleep(0.3)
        with kv.Client(server.address, timeout=1) as reader:
            assert reader.request("get", key="k")["value"] is None, "the write went through"
        assert adapter.thaw(target, hold) == {"resumed": True}
        assert writer.receive()["seq"] >= 1
    server.restart()  # and it is on disk
    with kv.Client(server.address, timeout=1) as reader:
        assert reader.request("get", key="k")["value"] == "during"


def test_a_second_quiesce_fails_while_the_first_holds(server):
    target = Harness(server).target()
    hold = adapter.quiesce(target)
    try:
        with pytest.raises(TargetError, match="already paused"):
            adapter.quiesce(target)
        with pytest.raises(TargetError, match="already paused"):
            adapter.check(target)
    finally:
        adapter.thaw(target, hold)


def test_thaw_after_the_deadline_reports_a_broken_hold(server):
    target = Target("kv", KIND, {"address": server.address}, timeout=2.0, max_hold=0.3)
    hold = adapter.quiesce(target)
    time.sleep(0.5)
    assert Harness(server).write(timeout=1.0), "the server did not end the pause at its deadline"
    with pytest.raises(HoldBroken, match="ended at its deadline"):
        adapter.thaw(target, hold)
