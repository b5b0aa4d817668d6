"""The ``quiesce`` command: the freeze/thaw cycle, the snapshot hosts, and the commands
adapters add (``register_commands``)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
import time
import traceback

import click

from . import publish, report as reports, runtime
from .errors import QuiesceError

DEFAULT_LOG_DIR = "/var/log/quiesce"

EXIT_CODES = """\b
Exit codes:
  0  success (freeze: every target held; thaw: every hold covered the window)
  1  a target failed, or a hold did not cover the whole window (see the output)
  2  usage or config error (the message names the file, target and key)
  3  another quiesce is holding: freeze refused (run `quiesce thaw`), or a
     holder that does not answer"""


class Context:
    def __init__(self, config: str | None, verbose: bool):
        # Absolute: the holder and its sentinel run from another directory.
        self.config_path = os.path.abspath(runtime.config_path(config))
        self.verbose = verbose
        #: After start_logging(until_released=True): writes the records out.
        self.write_log = lambda: None

    @functools.cached_property
    def adapters(self):
        from .plugins import load_adapters
        adapters = load_adapters()
        for warning in adapters.warnings:
            click.echo(f"quiesce: warning: {warning}", err=True)
        return adapters

    @functools.cached_property
    def config(self):
        from . import config
        return config.load(self.config_path, self.adapters)

    def start_logging(self, *, until_released: bool = False) -> None:
        """Log to the config's log file from now on (this loads the config).

        *until_released*: for a command that may run while the host holds the disks
        frozen (thaw): keep the records in memory until write_log() is called, once the
        targets are released.
        """
        from . import logs
        if until_released:
            self.write_log = logs.buffer_until_released(self.config.log_file,
                                                        verbose=self.verbose, console=True)
        else:
            logs.setup(self.config.log_file, verbose=self.verbose)

    def runtime_dir(self) -> str:
        """From the config file without loading adapters; the full check if that fails."""
        return runtime.runtime_dir_of(self.config_path) or self.config.runtime_dir


def command(fn):
    """Turn QuiesceErrors into one line and their exit code (a traceback with -v)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx: Context = click.get_current_context().obj
        as_json = kwargs.get("as_json", False)
        try:
            return fn(*args, **kwargs)
        except QuiesceError as e:
            fail(ctx, str(e), e.exit_code, as_json=as_json, error=e)
        except OSError as e:  # permissions, a missing directory: one line, not a traceback
            where = f": {e.filename}" if e.filename else ""
            hint = "; run quiesce as root" if isinstance(e, PermissionError) else ""
            fail(ctx, f"{e.strerror or e}{where}{hint}", 1, as_json=as_json, error=e)
    return wrapper


def error_object(message: str, error: BaseException | None = None) -> dict:
    """What --json prints for an error: its kind, and for a config error where it is."""
    name = type(error).__name__ if error is not None else "UsageError"
    kind = re.sub(r"(?<!^)(?=[A-Z])", "_", name.removesuffix("Error") or name).lower()
    key = getattr(error, "key", None) or None
    target = None
    if key and key.startswith("targets."):
        target, _, key = key.removeprefix("targets.").partition(".")
    return {"ok": False, "error": {"kind": kind, "file": getattr(error, "file", None),
                                   "target": target, "key": key or None, "message": message}}


def fail(ctx: Context | None, message: str, code: int, *, as_json: bool = False,
         error: BaseException | None = None) -> None:
    if ctx is not None and ctx.verbose:
        traceback.print_exc()
    if as_json:
        click.echo(json.dumps(error_object(message, error), indent=2))
    click.echo(f"quiesce: error: {message}", err=True)
    sys.exit(code)


def emit(report: dict, as_json: bool, started: float, *, fast_exit: bool = False) -> None:
    """Print the report and exit with its code.

    *fast_exit* skips the interpreter's teardown: after freeze the host waits for the
    pre-script's exit while the databases are already held, and after a hook call that
    overran its limit, joining the abandoned thread could take forever.
    """
    import logging
    from .logs import IN_REPORT
    if report.get("action") not in HOLDER_LOGGED:
        level = logging.INFO if report.get("ok", True) else logging.WARNING
        logging.getLogger("quiesce.cli").log(level, "%s: %s", report.get("action", "report"),
                                             report.get("message", ""), extra=IN_REPORT)
    reports.emit(report, as_json=as_json, started=started)
    code = reports.exit_code(report)
    if fast_exit:
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


#: Results the holder logs itself ("quiesce …: ok", "released by thaw: …"). It writes its
#: lines only after the release, so a line logged here would land before earlier ones.
HOLDER_LOGGED = {"frozen", "thawed"}

json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")


def emit_result(action: str, result: dict, as_json: bool, started: float) -> None:
    """Report an adapter command's successful *result* like the core's commands, and exit 0:
    one ``key: value`` line each, or with --json the report with the result in it."""
    emit({"ok": True, "action": action, "outcomes": [],
          "message": "\n".join(f"{k}: {v}" for k, v in result.items()), "result": result},
         as_json, started)


class CoreAndAdapterCommands(click.Group):
    """The core's commands, plus those adapters add through ``register_commands``.

    Adapters are loaded for that only when a name is not a core command, or to complete a
    command name: ``--help`` lists the core's commands only, so it imports no adapter and
    no driver, and a broken third-party adapter never hides the core's commands. The man
    page lists them all (:meth:`all_commands`)."""

    def _adapter_commands(self, ctx: click.Context) -> dict[str, click.Command]:
        meta = ctx.find_root().meta  # per invocation: tests run the CLI with other envs
        if "quiesce.adapter_commands" not in meta:
            from .plugins import load_adapters
            scratch = click.Group()
            try:
                adapters = load_adapters()
            except QuiesceError as e:  # a conflict: the core's commands still work
                click.echo(f"quiesce: warning: {e}", err=True)
            else:
                adapters.register_commands(scratch)
                for warning in adapters.warnings:
                    click.echo(f"quiesce: warning: {warning}", err=True)
            meta["quiesce.adapter_commands"] = {name: cmd for name, cmd in scratch.commands.items()
                                                if name not in self.commands}
        return meta["quiesce.adapter_commands"]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or self._adapter_commands(ctx).get(name)

    def all_commands(self, ctx: click.Context) -> list[str]:
        """The core's commands and the adapters' (loading the adapters)."""
        return sorted({*self.list_commands(ctx), *self._adapter_commands(ctx)})

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list:
        from click.shell_completion import CompletionItem
        return super().shell_complete(ctx, incomplete) + [
            CompletionItem(name) for name in sorted(self._adapter_commands(ctx))
            if name.startswith(incomplete)]


@click.group(cls=CoreAndAdapterCommands, epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", metavar="FILE", envvar=runtime.ENV_CONFIG,
              help=f"Config file [default: {runtime.DEFAULT_CONFIG}; env: {runtime.ENV_CONFIG}].")
@click.option("-v", "--verbose", is_flag=True, help="Log debug details; tracebacks on errors.")
@click.version_option(package_name="quiesce")
@click.pass_context
def cli(ctx: click.Context, config: str | None, verbose: bool) -> None:
    """Hold databases quiesced across a disk snapshot, and release them after.

    \b
    Typical cycle, run by a snapshot host's pre- and post-script:
      quiesce check    preflight every target; takes no lock
      quiesce freeze   check, flush and quiesce every target, then return
                       while a detached holder keeps them quiesced
      (the host snapshots the disks)
      quiesce thaw     release every target (all at once) and report
                       whether each one stayed quiesced the whole time

    Targets are described in one TOML file (see `quiesce example-config`).
    Adapters may add commands of their own (see each adapter's documentation).
    """
    ctx.obj = Context(config, verbose)


@cli.command()
@json_option
@click.pass_obj
@command
def adapters(obj: Context, as_json: bool) -> None:
    """List the adapters: kind, origin, driver (installed or not), hooks."""
    infos = obj.adapters.info()
    if as_json:
        click.echo(json.dumps([i.as_dict() for i in infos], indent=2))
        return
    for i in infos:
        origin = "bundled" if i.bundled else f"{i.distribution} {i.version}"
        driver = "" if i.driver is None else (f"{i.driver} {i.driver_version}" if i.driver_version
                                              else f"{i.driver} NOT INSTALLED")
        click.echo(f"{i.kind:<12} {origin:<24} {driver:<26} {', '.join(i.hooks)}")


@cli.command("example-config")
def example_config() -> None:
    """Print a commented example config file."""
    from .config import EXAMPLE
    click.echo(EXAMPLE, nl=False)


@cli.command()
@json_option
@click.pass_obj
@command
def check(obj: Context, as_json: bool) -> None:
    """Validate the config and run every target's preflight. Takes no lock."""
    from .phases import run_phase
    started = time.monotonic()
    obj.start_logging()
    outcomes = [o.as_dict() for o, _ in run_phase(obj.adapters, "check", obj.config.targets)]
    ok = all(o["status"] == "ok" for o in outcomes)
    failed = [o["target"] for o in outcomes if o["status"] != "ok"]
    message = (f"{len(outcomes)} target(s) ready to freeze" if ok
               else f"not ready: {', '.join(failed)} failed the check")
    emit({"ok": ok, "action": "check", "message": message, "outcomes": outcomes},
         as_json, started, fast_exit=True)


@cli.command()
@json_option
@click.pass_obj
@command
def freeze(obj: Context, as_json: bool) -> None:
    """Check, flush and quiesce every target; hold them until thaw.

    Returns once every target is quiesced and held by a detached holder process. When
    a target fails it exits 1 naming it; the others stay held for the snapshot and are
    named as consistent (on_target_failure = "hold-others", the default), or everything
    is released at once ("release-all").
    """
    from .holder import prepare_runtime_dir, start, take_lock
    started, started_at = time.monotonic(), time.time()
    # The lock first, before adapters load: a thaw that comes meanwhile sees a freeze
    # is starting, leaves a note, and this freeze releases everything when it sees it.
    runtime_dir = runtime.runtime_dir_of(obj.config_path)
    lock = None
    if runtime_dir:  # unreadable or relative: the config check below says what is wrong
        prepare_runtime_dir(runtime_dir)
        lock = take_lock(runtime_dir, supersede=True)
        # This cycle's record from the start: if the config is refused below, thaw must
        # not present an earlier cycle's record as this one's.
        runtime.write_state(runtime_dir, runtime.starting_state(started_at))
    obj.start_logging()
    if runtime_dir and obj.config.runtime_dir != runtime_dir:
        raise QuiesceError(f"runtime_dir changed while loading {obj.config_path}")
    report = start(obj.config, obj.adapters, lock=lock, started=started_at,
                   on_progress=None if as_json else progress_printer(len(obj.config.targets)))
    emit(report, as_json, started, fast_exit=True)


def progress_printer(count: int):
    """On a terminal, one line per target as each phase ends (a slow target shows which
    phase it is in); None when stderr is not a terminal (scripts, the host's log)."""
    if not sys.stderr.isatty():
        return None
    phases = iter(("check", "flush", "quiesce"))
    click.echo(f"freezing {count} target(s): {next(phases)}...", err=True)

    def show(outcomes: list[dict]) -> None:
        for o in outcomes:
            mark = "ok" if o["status"] == "ok" else o["status"].upper()
            click.echo(f"  {o['phase']:<8} {o['target']} ({o['kind']}): {mark} in "
                       f"{o['duration'] * 1000:.1f} ms", err=True)
        if all(o["status"] == "ok" for o in outcomes):
            following = next(phases, None)
            if following:
                click.echo(f"{following}...", err=True)
    return show


@cli.command()
@json_option
@click.option("--orphaned", type=int, metavar="PID", hidden=True,
              help="Run by the stand-in watchdog of holder PID: act only on its record.")
@click.pass_obj
@command
def thaw(obj: Context, as_json: bool, orphaned: int | None) -> None:
    """Release every target, all at once; report any hold that broke.

    Works with no holder alive (it crashed, was killed, or its watchdog fired): server-kept
    states are released from the record on tmpfs. A second thaw is a no-op that says so.
    A holder that does not answer is given up on within its release budget plus 5 s:
    exit 3, naming its pid.
    """
    started = time.monotonic()
    if orphaned is not None:
        from .errors import BusyError
        obj.start_logging(until_released=True)  # disks may still be frozen
        try:
            report = recover(obj, orphaned_by=orphaned)
        except BusyError:
            return  # the holder is alive: its own watchdog is in charge
    else:
        report, needs_recovery = thaw_via_holder(obj)
        if needs_recovery:
            obj.start_logging(until_released=True)  # disks may still be frozen
            report = recover(obj)
    if report.get("action") == "recovered":  # no holder: the cycle ends here
        publish.cycle_finished(obj.config, runtime.read_state(obj.config.runtime_dir))
    obj.write_log()
    emit(report, as_json, started, fast_exit=True)


def thaw_via_holder(obj: Context) -> tuple[dict, bool]:
    """Thaw through the holder (the lean client's way); second item: recovery is needed."""
    from .errors import ConfigError
    from .thaw import thaw_via_holder as lean_thaw
    try:
        report, needs_recovery = lean_thaw(obj.runtime_dir())
    except runtime.UntrustedPeer as e:  # exit 2, as the lean client does
        raise ConfigError(str(e)) from None
    if not needs_recovery and report.get("action") == "nothing-held":
        # Nothing to release, so a broken config is the news (ConfigError, exit 2). Not
        # start_logging(): that would open the log file, on a disk that may be frozen.
        from .config import load
        load(obj.config_path, obj.adapters)
    return report, needs_recovery


def recover(obj: Context, *, orphaned_by: int | None = None) -> dict:
    """No holder is alive: under the single-holder lock, release what is recorded as held."""
    from .holder import prepare_runtime_dir, take_lock
    from .orchestrator import recover as release_recorded
    prepare_runtime_dir(obj.config.runtime_dir)
    lock = take_lock(obj.config.runtime_dir)  # BusyError: a holder lives but did not answer
    try:
        return release_recorded(obj.config, obj.adapters, orphaned_by=orphaned_by)
    finally:
        lock.close()


@cli.command()
@json_option
@click.pass_obj
@command
def status(obj: Context, as_json: bool) -> None:
    """Show whether anything is held, since when, and the watchdog deadline."""
    started = time.monotonic()
    runtime_dir = obj.runtime_dir()
    try:
        state = runtime.request(runtime_dir, "status") or runtime.read_state(runtime_dir)
    except runtime.Unresponsive as e:
        emit(reports.unresponsive(e, runtime_dir), as_json, started)
    report = reports.status(state)
    if state is not None:
        report["last_cycle"] = (None if report["held"] or state.get("corrupt")
                                else publish.summarize(state))
    emit(report, as_json, started)


def main() -> None:
    try:
        code = cli.main(prog_name="quiesce", standalone_mode=False)
    except click.ClickException as e:  # usage errors: as JSON too when --json was asked for
        if "--json" in sys.argv[1:]:
            click.echo(json.dumps(error_object(e.format_message()), indent=2))
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(code or 0)


# -- snapshot hosts -----------------------------------------------------------------------
# `quiesce VERB HOST [OPTIONS]`: each verb is a group with one subcommand per host, built
# on demand, so a host's own options (from its typed Options) appear in its --help and
# nothing loads third-party hosts until a host command runs.

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
    """Declare `quiesce VERB HOST`: the function runs with the host built and its options."""
    def decorate(run):
        group = HostCommands(verb, run, [root_option, *common], name=verb, help=run.__doc__,
                             epilog="Run `quiesce hosts` for the known hosts; "
                                    f"`quiesce {verb} HOST --help` for a host's options.",
                             **kwargs)
        cli.add_command(group)
        return group
    return decorate


@cli.command()
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


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("snapshot_command", nargs=-1, required=True, type=click.UNPROCESSED)
@json_option
@click.pass_obj
@command
def exec_(obj: Context, snapshot_command: tuple[str, ...], as_json: bool) -> None:
    """Freeze, run a snapshot command, thaw: for self-managed snapshots.

    \b
    Example:  quiesce exec -- lvcreate -s -n snap -L 1G vg/data
    The command runs only once every target is held; thaw runs however it ends. Exits
    with the command's status if it failed, else 1 if a hold broke, else 0.
    """
    import subprocess
    from .holder import start
    started = time.monotonic()
    obj.start_logging()
    freeze_report = start(obj.config, obj.adapters)
    if not freeze_report["ok"] and freeze_report["action"] != "partly-frozen":
        emit(freeze_report, as_json, started)
    try:
        proc = subprocess.run(list(snapshot_command), stdin=subprocess.DEVNULL)
        command_status = proc.returncode
    except OSError as e:
        click.echo(f"quiesce: error: cannot run {snapshot_command[0]}: {e}", err=True)
        command_status = 127
    finally:
        report, needs_recovery = thaw_via_holder(obj)
        if needs_recovery:
            report = recover(obj)
    report["command_status"] = command_status
    if command_status:  # the snapshot failed, whatever the holds did
        report["ok"] = False
        report["message"] = (f"{report.get('message', '')}; the snapshot command "
                             f"{snapshot_command[0]} exited with status {command_status}")
    reports.emit(report, as_json=as_json, started=started)
    sys.exit(command_status or reports.exit_code(report))
