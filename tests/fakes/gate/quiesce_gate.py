"""A fake adapter whose chosen hook waits until a test opens a gate (creates a file).

Lets a test decide exactly when a freeze gets past a step, instead of guessing with a
sleep. Settings: ``record`` (file to append "<hook> <target>" lines to), ``gate`` (the
file to wait for), ``wait_in`` (the hook that waits), ``max_wait`` (seconds, default 30:
then the hook goes on as if the gate had opened), ``lock_gate`` (quiesce then calls
``target.lock_gate()``, like an adapter whose session is prepared), ``lock_gate_first``
(quiesce passes the gate before it waits: prepared at once, its lock is what is slow).
"""

import os
import time

from quiesce import Hold, hookimpl


class Gate:
    def _act(self, target, hook):
        with open(target.settings["record"], "a") as f:
            f.write(f"{hook} {target.name}\n")
        if hook == target.settings["wait_in"]:
            end = time.monotonic() + target.settings.get("max_wait", 30.0)
            while not os.path.exists(target.settings["gate"]) and time.monotonic() < end:
                time.sleep(0.02)

    @hookimpl
    def validate(self, target):
        target.option("record", str)
        target.option("gate", str)
        target.option("wait_in", str, choices=("check", "flush", "quiesce", "thaw"))
        target.option("max_wait", float, default=30.0)
        target.option("lock_gate", bool, default=False)
        target.option("lock_gate_first", bool, default=False)

    @hookimpl
    def check(self, target):
        self._act(target, "check")
        return {}

    @hookimpl
    def flush(self, target):
        self._act(target, "flush")

    @hookimpl
    def quiesce(self, target):
        if target.settings.get("lock_gate_first"):
            target.lock_gate()
        self._act(target, "quiesce")
        if target.settings.get("lock_gate"):
            target.lock_gate()
        return Hold(facts={"gate": target.settings["gate"]})

    @hookimpl
    def thaw(self, target, hold):
        self._act(target, "thaw")


gate = Gate()
