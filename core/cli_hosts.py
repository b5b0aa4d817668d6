"""`quiesce hosts` and `quiesce VERB HOST [OPTIONS]`: install, uninstall, doctor and
rehearse for the snapshot hosts.

Each verb is a group with one subcommand per host, built on demand, so a host's own
options (from its typed Options) appear in its --help and nothing loads third-party hosts
until a host command runs. :mod:`quiesce.cli` registers :data:`COMMANDS` on the main group.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time

import click

from . import runtime
from .cli_base import Context, command, emit, json_option
from .errors import QuiesceError

DEFAULT_LOG_DIR = "/var/log/quiesce"

root_option = click.option("--root", default="/", show_default=True, metavar="DIR",
                           help="Treat DIR as / for the host's files (staging and tests).")


@functools.cache
def _load_hosts() -> dict:
    from .hosts import load_hosts
    hosts, warnings = load_hosts()
    for warning in warnings:
        click.echo(f"quiesce: warning: {warning}", err=True)
    return hosts


def _host_option(f) -> click.Option:
    """The click option for one field of a host's Options."""
    flag = "--" + f.name.replace("_", "-")
    meta = f.metadata
    if isinstance(f.default, bool):
        return click.Option([flag], is_flag=True, default=f.default, help=meta["help"])
    if f.default_factory is not dataclasses.MISSING:
        return click.Option([flag], multiple=True, metavar=meta["metavar"], help=meta["help"])
    kind = str if f.default is None else type(f.default)
    return click.Option([flag], type=kind, default=f.default, show_default=bool(f.default),
                        metavar=meta["metavar"], help=meta["help"])


def _with_options(info, verb: str, kwargs: dict):
    """The host's typed Options from the generated CLI options; the rest stay in kwargs."""
    from .hosts import options_fields
    values = {}
    for f in options_fields(info.cls.Options, verb):
        value = kwargs.pop(f.name)
        values[f.name] = list(value) if isinstance(value, tuple) else value
    return info.cls.Options(**values)


class HostCommands(click.Group):
    """A verb's group: one subcommand per known host, with the verb's common options."""

    def __init__(self, verb: str, run, common: list, **kwargs):
        super().__init__(**kwargs)
        self.verb, self.run, self.common = verb, run, common

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_load_hosts())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from .hosts import options_fields
        info = _load_hosts().get(name)
        if info is None:
            return None

        @click.pass_obj
        @command
        def callback(obj: Context, **kwargs):
            options = _with_options(info, self.verb, kwargs)
            root = kwargs.pop("root")
            return self.run(obj, info.cls(root, options), **kwargs)

        cmd = click.Command(name, callback=callback, help=f"{info.cls.description}.",
                            params=[_host_option(f) for f in options_fields(info.cls.Options,
                                                                            self.verb)])
        for decorate in reversed(self.common):
            cmd = decorate(cmd)
        return cmd

    def resolve_command(self, ctx, args):
        name = args[0] if args else None
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            raise click.UsageError(f"unknown host {name!r}; known hosts: "
                                   f"{', '.join(self.list_commands(ctx))} (see: quiesce hosts)")
        return super().resolve_command(ctx, args)


def host_verb(verb: str, common: list, **kwargs):
    """Declare `quiesce VERB HOST` (a group, for COMMANDS): the function runs with the host
    built and its options."""
    def decorate(run):
        return HostCommands(verb, run, [root_option, *common], name=verb, help=run.__doc__,
                            epilog="Run `quiesce hosts` for the known hosts; "
                                   f"`quiesce {verb} HOST --help` for a host's options.",
                            **kwargs)
    return decorate


@click.command()
@json_option
@click.pass_obj
@command
def hosts(obj: Context, as_json: bool) -> None:
    """List the snapshot hosts and whether each one's agent is on this machine."""
    infos = [info.as_dict() for _, info in sorted(_load_hosts().items())]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    for i in infos:
        origin = "bundled" if i["bundled"] else f"{i['distribution']} {i['version']}"
        agent = f"agent: {i['agent']}" if i["agent_present"] else "agent: not present"
        click.echo(f"{i['name']:<10} {origin:<20} {agent}\n           {i['description']}")


@host_verb("install", [
    click.option("--log-dir", default=DEFAULT_LOG_DIR, show_default=True,
                 help="Where the generated scripts write their output."),
    click.option("--force", is_flag=True,
                 help="Replace files quiesce did not write (backed up first)."),
    json_option])
def install(obj: Context, host, log_dir: str, force: bool, as_json: bool) -> None:
    """Write a snapshot host's files (config, scripts, hooks) for this machine's config.

    \b
    For azure: /etc/azure/VMSnapshotScriptPluginConfig.json (0600) and a pre- and
    post-script (0700) that run `quiesce freeze` / `quiesce thaw` with --config.
    For qemu-ga: a hook in the agent's fsfreeze-hook.d (see --enable-hook).
    For vmware: /etc/vmware-tools/backupScripts.d/50-quiesce (freeze, thaw,
    freezeFail). For veeam: the job's two scripts in --output DIR.
    For gcp: /etc/google/snapshots/pre.sh and post.sh, and [Snapshots] merged
    into /etc/default/instance_configs.cfg (uninstall undoes it).
    For aws-dlm: the SSM document in /etc/quiesce; prints the create-document
    command and the DLM policy's Scripts block (quiesce calls no AWS API).
    For every host: /etc/tmpfiles.d/quiesce.conf (runtime_dir at boot) and
    /etc/logrotate.d/quiesce. Files already in place are left alone; files
    quiesce did not write are never replaced without --force.
    """
    from . import sysfiles
    from .install import settings_for
    started = time.monotonic()
    obj.start_logging()
    actions = host.install(settings_for(obj.config, log_dir=log_dir), force=force)
    warnings = host.conflicts()
    hint = sysfiles.metrics_hint(obj.config)
    message = "\n".join((actions or ["nothing to change: every file is in place"])
                        + [f"WARNING: {w}" for w in warnings] + ([hint] if hint else []))
    emit({"ok": not warnings, "action": "install", "changed": bool(actions), "message": message,
          "outcomes": []}, as_json, started)


@host_verb("uninstall", [
    click.option("--force", is_flag=True, help="Remove files even if they changed since install."),
    json_option])
def uninstall(obj: Context, host, force: bool, as_json: bool) -> None:
    """Remove what `quiesce install` wrote, restoring any file it had backed up."""
    started = time.monotonic()
    actions = host.uninstall(force=force)
    emit({"ok": True, "action": "uninstall", "message": "\n".join(actions), "outcomes": []},
         as_json, started)


def _doctor_context(obj: Context):
    from .hosts import DoctorContext
    from .phases import run_phase
    try:
        obj.start_logging()
        config = obj.config
        outcomes = [o.as_dict() for o, _ in run_phase(obj.adapters, "check", config.targets)]
        return DoctorContext(config, None, outcomes)
    except QuiesceError as e:
        return DoctorContext(None, str(e))


def _doctor_one(host, context) -> dict:
    verdict, findings = host.doctor(context)
    findings = [f.as_dict() for f in findings]
    return {"host": host.name, "ok": all(f["ok"] for f in findings), "host_code": verdict.code,
            "host_name": verdict.name, "findings": findings}


def _print_findings(findings: list[dict]) -> None:
    for f in findings:
        mark = "ok  " if f["ok"] and not f["warning"] else ("warn" if f["ok"] else "FAIL")
        click.echo(f"{mark}  {f['check']}: {f['message']}")


def _verdict(report: dict) -> str:
    """doctor's last line: a FAIL says NOT, a warning says "may not"."""
    if not report["ok"]:
        return "would NOT be application-consistent (see FAIL above)"
    if any(f["warning"] for f in report["findings"]):
        return "may not be application-consistent (see warn above)"
    return "would be application-consistent"


@host_verb("doctor", [json_option], invoke_without_command=True)
def doctor(obj: Context, host, as_json: bool) -> None:
    """Predict what the host will report for the next backup, and why.

    Checks the installed files by the host's own rules and prints the host's code for
    the first failure, then checks the scripts, interpreter, config and every target.
    Without HOST, checks every host whose agent is on this machine.
    Exit 0 only when the next backup would be application-consistent.
    """
    report = _doctor_one(host, _doctor_context(obj))
    if as_json:
        click.echo(json.dumps({k: v for k, v in report.items() if k != "host"}, indent=2))
    else:
        _print_findings(report["findings"])
        click.echo(f"the next backup {_verdict(report)}")
    sys.stdout.flush()
    os._exit(0 if report["ok"] else 1)  # a target check that overran its limit must not hold us


@click.command()
@root_option
@json_option
@click.pass_context
def _doctor_all(ctx: click.Context, root: str, as_json: bool) -> None:
    """`quiesce doctor` with no host: every host whose agent is present."""
    if ctx.invoked_subcommand is not None:
        return
    obj: Context = ctx.obj
    present = [info for _, info in sorted(_load_hosts().items()) if info.agent()]
    context = _doctor_context(obj) if present else None
    reports = [_doctor_one(info.cls(root), context) for info in present]
    ok = bool(reports) and all(r["ok"] for r in reports)
    if as_json:
        click.echo(json.dumps({"ok": ok, "hosts": reports}, indent=2))
    elif not reports:
        click.echo("no snapshot host's agent is present on this machine (see: quiesce hosts); "
                   "name a host to check its files anyway: quiesce doctor HOST")
    for r in [] if as_json else reports:
        click.echo(f"== {r['host']}")
        _print_findings(r["findings"])
        click.echo(f"{r['host']}: the next backup {_verdict(r)}")
    sys.stdout.flush()
    os._exit(0 if ok else 1)


doctor.callback, doctor.params = _doctor_all.callback, _doctor_all.params


@host_verb("rehearse", [
    click.option("--freeze", "freeze_mounts", multiple=True, metavar="MOUNT",
                 help="Freeze this mount point around the snapshot (repeatable). Never / unless "
                      "--allow-root-freeze."),
    click.option("--allow-root-freeze", is_flag=True, help="Allow freezing / (dangerous)."),
    click.option("--freeze-deadline", default=60.0, show_default=True, metavar="SECONDS",
                 help="An independent process thaws after this long, as the host's own "
                      "safeguard does."),
    click.option("--snapshot-command", metavar="CMD", help="Snapshot by running CMD with /bin/sh."),
    click.option("--copy", "copies", multiple=True, nargs=2, metavar="SRC DEST",
                 help="Snapshot by copying SRC to DEST (sparse; repeatable)."),
    click.option("--wait", "wait_seconds", default=None, type=float, metavar="SECONDS",
                 help="Snapshot by waiting (the default: 1 s)."),
    click.option("--poll-interval", type=click.FloatRange(0, min_open=True), metavar="SECONDS",
                 help="Look at a running script this often instead of at the host's own poll "
                      "(faster; the host's timeouts keep their length, but holds end sooner "
                      "than on the real host)."),
    json_option])
def rehearse(obj: Context, host, freeze_mounts, allow_root_freeze: bool, freeze_deadline: float,
             snapshot_command, copies, wait_seconds, poll_interval, as_json: bool) -> None:
    """Play the snapshot host's part and report what it would report.

    Checks the installed files as the host does, runs quiesce's scripts or hooks the way
    the host runs them, freezes the named mounts, takes the snapshot step, thaws, and
    prints a timeline and the host's result. Exit 0 only for an application-consistent
    result.
    """
    from .hosts import Rehearsal
    from .hosts.rehearsal import holds
    from .snapshot import SnapshotStep
    if sum(bool(x) for x in (snapshot_command, copies, wait_seconds is not None)) > 1:
        raise click.UsageError("choose one of --snapshot-command, --copy and --wait")
    step = SnapshotStep(command=snapshot_command, copies=list(copies),
                        wait=wait_seconds if wait_seconds is not None else (0 if snapshot_command
                                                                           or copies else 1.0))
    printer = None if as_json else (lambda t, text: click.echo(f"{t:+9.3f}s  {text}"))
    runtime_dir = runtime.runtime_dir_of(obj.config_path)
    report = host.rehearse(Rehearsal(snapshot=step, freeze_mounts=list(freeze_mounts),
                                     allow_root_freeze=allow_root_freeze,
                                     freeze_deadline=freeze_deadline, on_event=printer,
                                     runtime_dir=runtime_dir, poll_interval=poll_interval))
    report.setdefault("holds", holds(runtime_dir, since=report["started_at"]))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for hold in report["holds"]:
            click.echo(f"held: {hold['target']} ({hold['kind']}) {hold['seconds']:.3f} s, "
                       f"released by {hold['released_by']}: {hold['status']}")
        if report.get("note"):
            click.echo(f"note: {report['note']}")
        health = f" (health {report['health_code']} {report['health_name']})" \
            if report.get("health_code") else ""
        click.echo(f"host result: {report['code']} {report['consistency']}-consistent{health}")
    sys.exit(0 if report["code"] == 0 else 1)


COMMANDS = [hosts, install, uninstall, doctor, rehearse]
