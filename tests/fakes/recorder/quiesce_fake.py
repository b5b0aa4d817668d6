"""A scriptable adapter for the core's tests: records every hook call in a file.

Settings: ``record`` (file to append "<hook> <target>" lines to), ``fail`` (a hook that
raises TargetError), ``sleep`` (a table of hook -> seconds), ``session`` (return a
session-bound hold), ``broken`` (thaw raises HoldBroken).
"""

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

    @hookimpl
    def check(self, target):
        self._act(target, "check")
        return {"checked": True}

    @hookimpl
    def flush(self, target):
        self._act(target, "flush")

    @hookimpl
    def quiesce(self, target):
        self._act(target, "quiesce")
        return Hold(session=object() if target.settings.get("session") else None,
                    facts={"token": target.name})

    @hookimpl
    def thaw(self, target, hold):
        self._act(target, "thaw" if hold.session is not None else "thaw-without-session")
        if target.settings.get("broken"):
            raise HoldBroken(f"{target.name} lost its lock")


recorder = Recorder()
