"""AWS Data Lifecycle Manager pre/post scripts: an SSM Command document DLM runs.

Every rule follows the AWS EBS User Guide, "Automate application-consistent snapshots
with Data Lifecycle Manager" (with its MySQL/PostgreSQL SSM document templates) and the
DLM API reference, "Script"; docs/hosts/aws-dlm.md lists each with its source.

What quiesce installs: the document (YAML) on this instance, and prints the command that
creates it and the policy's ``Scripts`` block. quiesce contacts no cloud API itself.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ConfigError
from . import (DoctorContext, Finding, Host, HostFile, HostOptions, InstallSettings, Rehearsal,
               Verdict, option, under)
from .rehearsal import Timeline, conclude, new_report, run_script, snapshot_callback, validation
from .shell import append_report, freeze_command, header, q, signal_thaw, thaw_report

DOCUMENT = "/etc/quiesce/aws-dlm-ssm-document.yaml"
DOCUMENT_NAME = "quiesce-dlm"
COMMANDS = ("pre-script", "post-script", "dry-run")
EXECUTION_ID = (r"^(None|[a-fA-F0-9]{8}-[a-fA-F0-9]{4}-[a-fA-F0-9]{4}-[a-fA-F0-9]{4}"
                r"-[a-fA-F0-9]{12})$")
MIN_TIMEOUT, MAX_TIMEOUT = 10, 120   # ExecutionTimeout, seconds, per script
MAX_RETRIES = 3                      # MaximumRetryCount 0-3
TAG = "Key=DLMScriptsAccess,Value=true"
SSM_AGENT = ("/usr/bin/amazon-ssm-agent", "/snap/amazon-ssm-agent/current/amazon-ssm-agent")
CODES = {201: "pre-script failed", 202: "post-script failed",
         203: "released (max_hold) before the post-script", 204: "pre-script while frozen",
         205: "post-script while nothing is frozen", 206: "not ready (config or a database)"}


# -- rendered files ---------------------------------------------------------------------

EXIT_CODES = ("Exit codes: 201 pre-script failed, 202 post-script failed, 203 released (max_hold)\n"
              "before the post-script, 204 pre-script while frozen, 205 post-script while\n"
              "nothing is frozen, 206 not ready (config or a database unreachable).")


def render_script(settings: Any) -> str:
    """The runCommand: quiesce's outcomes mapped to the templates' codes 201-206."""
    log = q(settings.log_dir + "/aws-dlm.log")
    quiesce = f"{q(settings.python)} -B -P -m quiesce --config {q(settings.config)}"
    return (
        "#!/bin/sh\n" + header("AWS Data Lifecycle Manager", settings, EXIT_CODES) +
        "umask 077\n"
        "case '{{ command }}' in\n"
        "dry-run)\n"
        f"    {quiesce} check </dev/null >>{log} 2>&1 || exit 206 ;;\n"
        "pre-script)\n"
        f"    {freeze_command(settings)} </dev/null >>{log} 2>&1\n"
        "    case $? in 0) ;; 2) exit 206 ;; 3) exit 204 ;; *) exit 201 ;; esac ;;\n"
        "post-script)\n"
        # nothing is written to a disk before the holder is told
        f"    {signal_thaw(settings)}\n"
        + "".join(f"    {line}\n" for line in thaw_report(settings, as_json=True).split("\n")) +
        f"    {append_report(settings.log_dir + '/aws-dlm.log', 'executionId {{ executionId }}: ')}\n"
        "    case \"$report\" in\n"
        "    *'\"action\": \"nothing-held\"'*) exit 205 ;;\n"
        # released by the watchdog: the holder says so, or only its record does
        "    *'\"released_by\": \"watchdog\"'* | *'\"action\": \"reported\"'*) exit 203 ;;\n"
        "    esac\n"
        "    [ \"$status\" -eq 0 ] || exit 202 ;;\n"
        "*)\n"
        "    echo 'unknown command {{ command }}' >&2\n"
        "    exit 1 ;;\n"
        "esac\n")


def render_document(settings: Any) -> HostFile:
    """The SSM Command document (schema 2.2) with DLM's required parameters."""
    body = "".join(f"      {line}\n" if line else "\n"
                   for line in render_script(settings).rstrip("\n").split("\n"))
    text = ("schemaVersion: '2.2'\n"
            "description: quiesce pre/post scripts for Amazon Data Lifecycle Manager\n"
            "parameters:\n"
            "  executionId:\n"
            "    type: String\n"
            "    default: None\n"
            "    description: (Required) The identifier of a pre and/or post execution\n"
            f"    allowedPattern: '{EXECUTION_ID}'\n"
            "  command:\n"
            "    type: String\n"
            "    default: dry-run\n"
            "    description: (Required) pre-script, post-script or dry-run\n"
            "    allowedValues:\n"
            + "".join(f"    - {c}\n" for c in COMMANDS) +
            "mainSteps:\n"
            "- action: aws:runShellScript\n"
            "  name: run_pre_post_scripts\n"
            "  description: Hold the databases quiesced across the snapshot with quiesce\n"
            "  precondition:\n"
            "    StringEquals:\n"
            "    - platformType\n"
            "    - Linux\n"
            "  inputs:\n"
            "    runCommand:\n"
            "    - |\n"
            f"{body}")
    return HostFile(DOCUMENT, text, 0o600)


def execution_timeout(freeze_budget: float) -> int:
    """Seconds for ExecutionTimeout: the freeze plus a margin, within DLM's 10-120."""
    return max(MIN_TIMEOUT, min(MAX_TIMEOUT, math.ceil(freeze_budget) + 5))


def create_document_command(path: str = DOCUMENT, name: str = DOCUMENT_NAME) -> str:
    return (f"aws ssm create-document --name {q(name)} --document-type Command "
            f"--document-format YAML --content {q('file://' + path)} --tags {TAG}")


def scripts_block(freeze_budget: float, *, name: str = DOCUMENT_NAME, retries: int = 0,
                  crash_consistent_on_failure: bool = True, timeout: int | None = None) -> str:
    """The ``Scripts`` entry of the policy's CreateRule (JSON, as the guide shows it)."""
    block = [{"Stages": ["PRE", "POST"], "ExecutionHandlerService": "AWS_SYSTEMS_MANAGER",
              "ExecutionHandler": name,
              "ExecuteOperationOnScriptFailure": crash_consistent_on_failure,
              "ExecutionTimeout": timeout or execution_timeout(freeze_budget),
              "MaximumRetryCount": retries}]
    return '"Scripts": ' + json.dumps(block, indent=4)


# -- SSM running the document, DLM driving it --------------------------------------------


class InvalidParameters(ValueError):
    """SSM refuses the command before it reaches the instance."""


def interpolate(script: str, command: str, execution_id: str = "None") -> str:
    """SSM's ``{{ name }}`` substitution, after checking allowedValues/allowedPattern."""
    if command not in COMMANDS:
        raise InvalidParameters(f"command {command!r} is not one of {', '.join(COMMANDS)}")
    if not re.match(EXECUTION_ID, execution_id):
        raise InvalidParameters(f"executionId {execution_id!r} does not match {EXECUTION_ID}")
    values = {"command": command, "executionId": execution_id}
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: values.get(m.group(1), m.group(0)), script)


@dataclass
class Attempt:
    command: str
    code: int | None
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.timed_out


@dataclass
class DlmRun:
    attempts: list[Attempt] = field(default_factory=list)
    snapshot: str = "none"    # application-consistent | crash-consistent | none
    post_ok: bool = False


class DlmEmulator:
    """DLM calling SSM with the document's script, on this instance.

    *timeout* is ExecutionTimeout (10-120 s in DLM; any value here so tests run fast);
    at it the attempt fails and the command is cancelled (SIGTERM, then SIGKILL).
    """

    def __init__(self, script: str, *, timeout: float = MIN_TIMEOUT, retries: int = 0,
                 crash_consistent_on_failure: bool = True, kill_grace: float = 5.0,
                 event: Callable[[str], None] = lambda text: None):
        if not 0 <= retries <= MAX_RETRIES:
            raise ValueError(f"MaximumRetryCount must be 0-{MAX_RETRIES}, not {retries}")
        self.script, self.timeout, self.retries = script, timeout, retries
        self.crash_consistent = crash_consistent_on_failure
        self.kill = ((signal.SIGTERM, kill_grace), (signal.SIGKILL, kill_grace))
        self.event = event

    def send(self, command: str, execution_id: str = "None") -> Attempt:
        """One SendCommand: the interpolated script under ``sh``, timed by DLM."""
        text = interpolate(self.script, command, execution_id)
        with tempfile.TemporaryDirectory(prefix="quiesce-ssm-") as tmp:
            path = os.path.join(tmp, "_script.sh")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            self.event(f"ssm: {command} executionId {execution_id}")
            run = run_script(["/bin/sh", path], timeout=self.timeout, kill=self.kill,
                             pipe_grace=0.5)
        self.event(f"ssm: {command} exit {run.returncode} {CODES.get(run.returncode, '')}".rstrip()
                   + (" (timed out, cancelled)" if run.timed_out else ""))
        return Attempt(command, run.returncode, run.timed_out)

    def _with_retries(self, command: str, execution_id: str, result: DlmRun) -> bool:
        for _ in range(1 + self.retries):
            attempt = self.send(command, execution_id)
            result.attempts.append(attempt)
            if attempt.ok:
                return True
        return False

    def run(self, execution_id: str = "None", *,
            snapshot: Callable[[], None] = lambda: None) -> DlmRun:
        """pre-script (retried), the snapshot, post-script (retried) only after a good pre."""
        result = DlmRun()
        if self._with_retries("pre-script", execution_id, result):
            snapshot()
            result.snapshot = "application-consistent"
            result.post_ok = self._with_retries("post-script", execution_id, result)
        elif self.crash_consistent:
            snapshot()
            result.snapshot = "crash-consistent"
        return result


# -- doctor -----------------------------------------------------------------------------


def check_ssm_agent(root: str = "/") -> Finding:
    found = [p for p in SSM_AGENT if os.path.isfile(under(root, p))]
    if not found:
        return Finding("ssm agent", False, "amazon-ssm-agent is not installed: DLM cannot run "
                                         "the document; install and start it")
    return Finding("ssm agent", True, found[0])


def check_timeout(freeze_budget: float, timeout: int) -> Finding:
    if not MIN_TIMEOUT <= timeout <= MAX_TIMEOUT:
        return Finding("timeout", False, f"ExecutionTimeout {timeout} s is outside DLM's "
                                       f"{MIN_TIMEOUT}-{MAX_TIMEOUT} s")
    ok = freeze_budget < timeout
    return Finding("timeout", ok, f"quiesce freeze may take {freeze_budget:g} s; DLM fails a "
                                f"script after ExecutionTimeout {timeout} s"
                 + ("" if ok else ": lower the targets' timeouts (DLM allows at most "
                                  f"{MAX_TIMEOUT} s)"))


def check_max_hold(max_hold: float, timeout: int) -> Finding:
    """DLM runs post right after it initiates the snapshot; a hold only has to outlast the
    post-script's own window. Longer holds keep writers waiting if a post never comes."""
    limit = 2 * timeout * (1 + MAX_RETRIES)
    ok = max_hold <= limit
    return Finding("max_hold", True, f"max_hold {max_hold:g} s"
                 + ("" if ok else f" is far above what DLM needs (post runs within "
                                  f"{limit} s of the pre-script); writers wait that long "
                                  f"if the post-script is lost"), warning=not ok)


def check_document(root: str, settings: Any) -> Finding:
    expected = render_document(settings)
    try:
        with open(under(root, expected.path), encoding="utf-8") as f:
            same = f.read() == expected.content
    except OSError:
        return Finding("document", False, f"{expected.path} is missing: run `quiesce install "
                                        f"aws-dlm`")
    return Finding("document", same, f"{expected.path} matches the config" if same else
                 f"{expected.path} differs from the config: run `quiesce install aws-dlm "
                 f"--force`, then `aws ssm update-document` with it")


# -- the host ---------------------------------------------------------------------------

VERDICTS = {0: "DocumentReady", 1: "DocumentMissing", 2: "DocumentStale"}


@dataclass
class AwsDlmOptions(HostOptions):
    execution_timeout: int = option(0, "ExecutionTimeout of the policy's Scripts, 10-120 s "
                                       "[default, 0: quiesce freeze's budget plus 5 s].",
                                    verbs=("install", "doctor", "rehearse"), metavar="SECONDS")
    retries: int = option(0, "MaximumRetryCount of the policy's Scripts (0-3).",
                          verbs=("install", "rehearse"), metavar="N")
    document_name: str = option(DOCUMENT_NAME, "The SSM document's name.",
                                verbs=("install",), metavar="NAME")
    kill_grace: float = option(5.0, "Seconds SSM waits after SIGTERM before SIGKILL when it "
                                    "cancels a script at the timeout.",
                               verbs=("rehearse",), metavar="SECONDS")


class AwsDlmHost(Host):
    name = "aws-dlm"
    description = ("AWS Data Lifecycle Manager pre/post scripts: an SSM Command document "
                   "(quiesce contacts no AWS API)")
    Options = AwsDlmOptions
    agent_paths = SSM_AGENT
    options: AwsDlmOptions

    def timeout(self, freeze_budget: float) -> int:
        return self.options.execution_timeout or execution_timeout(freeze_budget)

    def render(self, settings: InstallSettings) -> list[HostFile]:
        return [render_document(settings)]

    def install(self, settings: InstallSettings, *, force: bool = False) -> list[str]:
        """The document on this instance, then what to run where the AWS credentials are."""
        if not 0 <= self.options.retries <= MAX_RETRIES:
            raise ConfigError(f"--retries must be 0-{MAX_RETRIES} (DLM's MaximumRetryCount)")
        timeout = self.timeout(settings.freeze_timeout)
        if not MIN_TIMEOUT <= timeout <= MAX_TIMEOUT:
            raise ConfigError(f"--execution-timeout must be {MIN_TIMEOUT}-{MAX_TIMEOUT} s "
                              f"(DLM's ExecutionTimeout), not {timeout}")
        actions = super().install(settings, force=force) or [
            "nothing to change: every file is in place"]
        check = check_timeout(settings.freeze_timeout, timeout)
        if not check.ok:  # the worst case; `quiesce doctor aws-dlm` keeps saying so
            actions.append(f"WARNING: {check.message}")
        name = self.options.document_name
        actions += ["NEXT: create the SSM document (where your AWS credentials are):",
                    create_document_command(self.path(DOCUMENT), name),
                    "NEXT: add this to the CreateRule of the DLM policy for this instance:",
                    scripts_block(settings.freeze_timeout, name=name, timeout=timeout,
                                  retries=self.options.retries)]
        return actions

    def _installed(self) -> InstallSettings | None:
        from ..install import Installer
        settings = Installer(self).manifest().get("settings")
        return InstallSettings(**settings) if settings else None

    def predict(self) -> Verdict:
        settings = self._installed()
        if settings is None or not os.path.isfile(self.path(DOCUMENT)):
            return Verdict(1, VERDICTS[1], f"{DOCUMENT} is missing: run `quiesce install aws-dlm`")
        found = check_document(self.root, settings)
        if not found.ok:
            return Verdict(2, VERDICTS[2], found.message)
        return Verdict(0, VERDICTS[0], f"{DOCUMENT} maps quiesce's outcomes to DLM's codes; "
                                       f"SSM runs it with dry-run, pre-script and post-script")

    def host_checks(self, context: DoctorContext) -> list[Finding]:
        from ..holder import freeze_budget
        findings = [check_ssm_agent(self.root)]
        if context.config is not None:
            budget = freeze_budget(context.config)
            findings += [check_timeout(budget, self.timeout(budget)),
                         check_max_hold(context.config.max_hold, self.timeout(budget))]
        return findings

    def rehearse(self, rehearsal: Rehearsal) -> dict[str, Any]:
        """SSM running the installed document: dry-run, then DLM's pre-script, the snapshot
        and the post-script (only after a successful pre-script), each under its timeout."""
        event = Timeline(rehearsal.on_event)
        report = new_report(self.name, event)
        verdict = self.predict()
        validation(report, event, verdict)
        if verdict.code == 1:
            return conclude(report, event, rehearsal.runtime_dir, host_ok=False,
                            host_says="no document", failure=verdict.message)
        with open(self.path(DOCUMENT), encoding="utf-8") as f:
            script = script_of(f.read())
        settings = self._installed()
        dlm = DlmEmulator(script, timeout=self.timeout(settings.freeze_timeout),
                          retries=self.options.retries, kill_grace=self.options.kill_grace,
                          event=event)
        dry = dlm.send("dry-run")
        execution_id = str(uuid.uuid4())
        result = dlm.run(execution_id, snapshot=snapshot_callback(rehearsal, report, event))
        report["attempts"] = [{"command": a.command, "code": a.code, "timed_out": a.timed_out}
                              for a in result.attempts]
        ok = dry.ok and result.snapshot == "application-consistent" and result.post_ok
        failed = next((a for a in result.attempts if not a.ok), None)
        says = "succeeded" if ok else (f"{failed.command} failed: exit {failed.code}" if failed
                                       else f"dry-run failed: exit {dry.code}")
        event(f"DLM: {result.snapshot} snapshot, scripts {says}")
        return conclude(report, event, rehearsal.runtime_dir, host_ok=ok, host_says=says,
                        failure=None if ok else says)


def script_of(document: str) -> str:
    """The runCommand of a document render_document wrote (SSM runs it as a file)."""
    body = document.split("    runCommand:\n    - |\n", 1)[1]
    return "".join(line[6:] + "\n" for line in body.rstrip("\n").split("\n"))
