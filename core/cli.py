"""The command line: ``quiesce adapters | check | freeze | thaw | status``."""

from __future__ import annotations

import functools
import json
import sys
import time
import traceback

import click

from . import thaw as lean
from .errors import QuiesceError

EXIT_CODES = """\b
Exit codes:
  0  success (freeze: every target held; thaw: every hold covered the window)
  1  a target failed, or a hold did not cover the whole window (see the output)
  2  usage or config error (the message names the file, target and key)
  3  freeze refused: another freeze is still holding (run `quiesce thaw`)"""


class Context:
    def __init__(self, config: str | None, verbose: bool):
        self.config_path = lean.config_path(config)
        self.verbose = verbose

    @functools.cached_property
    def adapters(self):
        from .plugins import load_adapters
        adapters = load_adapters()
        for warning in adapters.warnings:
            click.echo(f"quiesce: warning: {warning}", err=True)
        return adapters

    @functools.cached_property
    def config(self):
        from . import config, logs
        loaded = config.load(self.config_path, self.adapters)
        logs.setup(loaded.log_file, verbose=self.verbose)
        return loaded


def command(fn):
    """Turn QuiesceErrors into one line and their exit code (a traceback with -v)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx: Context = click.get_current_context().obj
        try:
            return fn(*args, **kwargs)
        except QuiesceError as e:
            if ctx.verbose:
                traceback.print_exc()
            click.echo(f"quiesce: error: {e}", err=True)
            sys.exit(e.exit_code)
    return wrapper


def emit(report: dict, as_json: bool, started: float) -> None:
    lean.emit(report, as_json=as_json, started=started)
    sys.exit(lean.report_exit_code(report))


json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")


@click.group(epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", metavar="FILE", envvar=lean.ENV_CONFIG,
              help=f"Config file [default: {lean.DEFAULT_CONFIG}; env: {lean.ENV_CONFIG}].")
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
      quiesce thaw     release every target in reverse order and report
                       whether each one stayed quiesced the whole time

    Targets are described in one TOML file (see `quiesce example-config`).
    """
    ctx.obj = Context(config, verbose)


@cli.command()
@json_option
@click.pass_obj
@command
def adapters(obj: Context, as_json: bool) -> None:
    """List the adapters: kind, distribution, version, hooks."""
    infos = obj.adapters.info()
    if as_json:
        click.echo(json.dumps([i.as_dict() for i in infos], indent=2))
        return
    for i in infos:
        origin = "bundled" if i.bundled else f"{i.distribution} {i.version}"
        click.echo(f"{i.kind:<12} {origin:<24} {', '.join(i.hooks)}")


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
    config = obj.config
    outcomes = [o.as_dict() for o, _ in run_phase(obj.adapters, "check", config.targets)]
    ok = all(o["status"] == "ok" for o in outcomes)
    failed = [o["target"] for o in outcomes if o["status"] != "ok"]
    message = (f"{len(outcomes)} target(s) ready to freeze" if ok
               else f"not ready: {', '.join(failed)} failed the check")
    emit({"ok": ok, "action": "check", "message": message, "outcomes": outcomes},
         as_json, started)


@cli.command()
@json_option
@click.pass_obj
@command
def freeze(obj: Context, as_json: bool) -> None:
    """Check, flush and quiesce every target; hold them until thaw.

    Returns once every target is quiesced and held by a detached holder process, or
    after releasing everything when any target fails (exit 1, naming it).
    """
    from .holder import start
    started = time.monotonic()
    report = start(obj.config, obj.adapters)
    emit(report, as_json, started)


@cli.command()
@json_option
@click.pass_obj
@command
def thaw(obj: Context, as_json: bool) -> None:
    """Release every target in reverse order; report any hold that broke.

    Works with no holder alive (it crashed, was killed, or its watchdog fired): server-kept
    states are released from the record on tmpfs. A second thaw is a no-op that says so.
    """
    started = time.monotonic()
    report, needs_recovery = lean.thaw_via_holder(lean.runtime_dir_of(obj.config_path))
    if needs_recovery:
        from .holder import recover
        report = recover(obj.config, obj.adapters)
    emit(report, as_json, started)


@cli.command()
@json_option
@click.pass_obj
@command
def status(obj: Context, as_json: bool) -> None:
    """Show whether anything is held, since when, and the watchdog deadline."""
    started = time.monotonic()
    runtime_dir = lean.runtime_dir_of(obj.config_path)
    state = lean.request(runtime_dir, "status", timeout=5.0) or lean.read_state(runtime_dir)
    if state is None:
        report = {"ok": True, "held": False, "message": "nothing held; no freeze recorded"}
    else:
        held = [t["name"] for t in state.get("targets", ()) if t["status"] in {"held", "quiescing"}]
        alive = state.get("alive", False)
        fmt = lambda ts: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"
        if held and alive:
            message = (f"holding {', '.join(held)} since {fmt(state.get('held_since'))} "
                       f"(holder pid {state['holder_pid']}); watchdog at {fmt(state.get('deadline'))}")
        elif held:
            message = (f"{', '.join(held)} recorded as held but the holder is gone; "
                       f"run `quiesce thaw` to release them")
        else:
            message = (f"nothing held; last released by {state.get('released_by')} at "
                       f"{fmt(state.get('released_at'))}")
        report = {"ok": not (held and not alive), "held": bool(held), "message": message,
                  "state": state}
    emit(report, as_json, started)


def main() -> None:
    cli(prog_name="quiesce")
