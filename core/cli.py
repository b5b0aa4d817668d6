"""The ``quiesce`` command: the freeze/thaw cycle, the snapshot hosts (their commands are in
:mod:`quiesce.cli_hosts`), and the commands adapters add (``register_commands``).

``command``, ``json_option`` and ``emit_result`` are public here for adapters' commands."""

from __future__ import annotations

import json
import sys
import time

import click

from . import cli_hosts, publish, report as reports, runtime
from .cli_base import (Context, command, emit, emit_result, error_object, json_option,
                       stamp_option, stamp_output)
from .errors import QuiesceError

__all__ = ["cli", "main", "command", "emit_result", "json_option"]

EXIT_CODES = """\b
Exit codes:
  0  success (freeze: every target held; thaw: every hold covered the window)
  1  a target failed, or a hold did not cover the whole window (see the output)
  2  usage or config error (the message names the file, target and key)
  3  another quiesce is holding: freeze refused (run `quiesce thaw`), or a
     holder that does not answer"""


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


for host_command in cli_hosts.COMMANDS:  # hosts, install, uninstall, doctor, rehearse
    cli.add_command(host_command)


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
@stamp_option
@click.pass_obj
@command
def freeze(obj: Context, as_json: bool, stamp: bool) -> None:
    """Check, flush and quiesce every target; hold them until thaw.

    Returns once every target is quiesced and held by a detached holder process. When
    a target fails it exits 1 naming it; the others stay held for the snapshot and are
    named as consistent (on_target_failure = "hold-others", the default), or everything
    is released at once ("release-all").
    """
    from .holder import prepare_runtime_dir, start, take_lock
    started, started_at = time.monotonic(), time.time()
    if stamp:
        stamp_output()
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
