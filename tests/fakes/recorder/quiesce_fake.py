"""A scriptable adapter for the core's tests: records every hook call in a file.

Settings: ``record`` (file to append "<hook> <target>" lines to), ``fail`` (a hook that
raises TargetError), ``sleep`` (a table of hook -> seconds), ``session`` (return a
session-bound hold), ``broken`` (thaw raises HoldBroken), ``odd_facts`` (quiesce returns
facts JSON cannot carry as they are), ``lock_gate`` (quiesce calls ``target.lock_gate()``
first, so its sleep is a slow lock rather than a slow preparation).
"""

import datetime
import time

from quiesce import Hold, HoldBroken, TargetError, hookimpl


class Recorder:
    def _act(self, target, hook):
        with open(target.settings["record"], "a") as f:
            f.write(f"{hook} {target.name}\n")
        time.sleep(target.settings.get("sleep", {}).get(hook, 0))
        if target.settings.get("fail") == hook:
            raise TargetError(f"{target.name} was told to fail in {hook}")

    @hookimpl
    def validate(self, target):
        target.option("record", str)
        target.option("fail", str, default=None)
        target.option("sleep", dict, default={})
        target.option("session", bool, default=False)
        target.option("broken", bool, default=False)
        target.option("odd_facts", bool, default=False)
        target.option("lock_gate", bool, default=False)

    @hookimpl
    def check(self, target):
        self._act(target, "check")
        return {"checked": True}

    @hookimpl
    def flush(self, target):
        self._act(target, "flush")

    @hookimpl
    def quiesce(self, target):
        if target.settings.get("lock_gate"):
            target.lock_gate()
        self._act(target, "quiesce")
        facts = {"token": target.name}
        if target.settings.get("odd_facts"):
            facts["taken_at"] = datetime.datetime(2026, 11, 26, 12, 0, tzinfo=datetime.timezone.utc)
        return Hold(session=object() if target.settings.get("session") else None, facts=facts)

    @hookimpl
    def thaw(self, target, hold):
        self._act(target, "thaw" if hold.session is not None else "thaw-without-session")
        if target.settings.get("broken"):
            raise HoldBroken(f"{target.name} lost its lock")


recorder = Recorder()
