"""A third-party snapshot host, written only against quiesce's public host API.

Its "agent" runs ``sh pre.sh`` before the snapshot and ``sh post.sh`` after, from a
script directory; it is present when the file named by $FAKEHOST_AGENT exists.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from quiesce.hosts import (DoctorContext, Finding, Host, HostFile, HostOptions, InstallSettings,
                           Rehearsal, Verdict, option)
from quiesce.hosts import shell
from quiesce.hosts.rehearsal import Timeline, freeze_and_snapshot, holds, new_report


@dataclass
class FakeOptions(HostOptions):
    script_dir: str = option("/etc/fakehost", "Where the agent looks for pre.sh and post.sh.",
                             metavar="DIR")
    skip_post: bool = option(False, "Rehearse an agent that never runs post.sh.",
                             verbs=("rehearse",))


class FakeHost(Host):
    name = "fakehost"
    description = "A fake third-party host (tests)"
    Options = FakeOptions

    @classmethod
    def agent(cls) -> str | None:
        path = os.environ.get("FAKEHOST_AGENT", "")
        return path if path and os.path.exists(path) else None

    def scripts(self) -> tuple[str, str]:
        return f"{self.options.script_dir}/pre.sh", f"{self.options.script_dir}/post.sh"

    def render(self, settings: InstallSettings) -> list[HostFile]:
        pre, post = self.scripts()
        head = shell.header("fakehost", settings, "The fake agent runs `sh <this file>`.")
        return [HostFile(pre, "#!/bin/sh\n" + head + shell.freeze(settings, "fake-pre.log"),
                         0o700, shell=True),
                HostFile(post, "#!/bin/sh\n" + head + shell.thaw(settings, "fake-post.log"),
                         0o700, shell=True)]

    def predict(self) -> Verdict:
        for script in self.scripts():
            if not os.path.isfile(self.path(script)):
                return Verdict(1, "ScriptMissing", f"{script} does not exist")
        return Verdict(0, "Ready", "the agent will run pre.sh and post.sh")

    def host_checks(self, context: DoctorContext) -> list[Finding]:
        return [Finding("fake agent present", self.agent() is not None,
                        self.agent() or "set FAKEHOST_AGENT to an existing file")]

    def rehearse(self, rehearsal: Rehearsal) -> dict:
        event = Timeline(rehearsal.on_event)
        report = new_report(self.name, event)
        verdict = self.predict()
        event(f"validation: {verdict.code} {verdict.name}")
        pre, post = (self.path(s) for s in self.scripts())
        pre_status = subprocess.run(["sh", pre], stdin=subprocess.DEVNULL).returncode \
            if verdict.ok else None
        event(f"pre.sh exited {pre_status}")
        failed = freeze_and_snapshot(rehearsal.snapshot, rehearsal.freeze_mounts,
                                     rehearsal.allow_root_freeze, rehearsal.freeze_deadline,
                                     report, event)
        post_status = None
        if verdict.ok and not self.options.skip_post:
            post_status = subprocess.run(["sh", post], stdin=subprocess.DEVNULL).returncode
        event(f"post.sh exited {post_status}")
        report["holds"] = holds(rehearsal.runtime_dir, report["started_at"])
        ok = pre_status == 0 and post_status == 0 and failed is None
        report.update(code=0 if ok else 1, consistency="application" if ok else "file-system",
                      health_code=None, health_name=None, message="done")
        return report
