"""The ``quiesce`` command: the freeze/thaw cycle, the snapshot hosts, and restore help."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
import traceback

import click

from . import thaw as lean
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
        self.config_path = os.path.abspath(lean.config_path(config))
        self.verbose = verbose
        #: Set by commands that may run while disks are frozen (thaw): log to memory until
        #: the targets are released, then call write_log().
        self.buffer_logs = False
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
        from . import config, logs
        loaded = config.load(self.config_path, self.adapters)
        if not self.buffer_logs:
            logs.setup(loaded.log_file, verbose=self.verbose)
        else:
            self.write_log = logs.buffer_until_released(loaded.log_file, verbose=self.verbose,
                                                        console=True)
        return loaded

    def runtime_dir(self) -> str:
        """From the config file without loading adapters; the full check if that fails."""
        return lean.runtime_dir_of(self.config_path) or self.config.runtime_dir


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
    lean.emit(report, as_json=as_json, started=started)
    code = lean.report_exit_code(report)
    if fast_exit:
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


#: Results the holder logs itself ("quiesce …: ok", "released by thaw: …"). It writes its
#: lines only after the release, so a line logged here would land before earlier ones.
HOLDER_LOGGED = {"frozen", "thawed"}

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
    config = obj.config
    outcomes = [o.as_dict() for o, _ in run_phase(obj.adapters, "check", config.targets)]
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

    Returns once every target is quiesced and held by a detached holder process, or
    after releasing everything when any target fails (exit 1, naming it).
    """
    from .holder import prepare_runtime_dir, start, take_lock
    started, started_at = time.monotonic(), time.time()
    # The lock first, before adapters load: a thaw that comes meanwhile sees a freeze
    # is starting, leaves a note, and this freeze releases everything when it sees it.
    runtime_dir = lean.runtime_dir_of(obj.config_path)
    lock_fd = None
    if runtime_dir:  # unreadable or relative: the config check below says what is wrong
        prepare_runtime_dir(runtime_dir)
        lock_fd = take_lock(runtime_dir)
    if runtime_dir and obj.config.runtime_dir != runtime_dir:
        raise QuiesceError(f"runtime_dir changed while loading {obj.config_path}")
    report = start(obj.config, obj.adapters, lock_fd=lock_fd, started=started_at,
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
@click.option("--orphaned", is_flag=True, hidden=True,
              help="Run by the stand-in watchdog: act only if no holder is alive.")
@click.pass_obj
@command
def thaw(obj: Context, as_json: bool, orphaned: bool) -> None:
    """Release every target in reverse order; report any hold that broke.

    Works with no holder alive (it crashed, was killed, or its watchdog fired): server-kept
    states are released from the record on tmpfs. A second thaw is a no-op that says so.
    """
    started = time.monotonic()
    obj.buffer_logs = True  # disks may still be frozen
    if orphaned:
        from .errors import BusyError
        from .holder import recover
        try:
            report = recover(obj.config, obj.adapters, orphaned=True)
        except BusyError:
            return  # the holder is alive: its own watchdog is in charge
    else:
        report = release_all(obj)
    obj.write_log()
    emit(report, as_json, started, fast_exit=True)


def release_all(obj: Context) -> dict:
    """Thaw through the holder, or, with none alive, release what is recorded as held."""
    report, needs_recovery = lean.thaw_via_holder(obj.runtime_dir())
    if needs_recovery:
        from .holder import recover
        report = recover(obj.config, obj.adapters)
    return report


@cli.command()
@json_option
@click.pass_obj
@command
def status(obj: Context, as_json: bool) -> None:
    """Show whether anything is held, since when, and the watchdog deadline."""
    started = time.monotonic()
    runtime_dir = obj.runtime_dir()
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

def _complete_host(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion: the bundled hosts and those of installed plugins."""
    import importlib.metadata
    from .hosts import DEFAULT_HOSTS, ENTRY_POINT_GROUP
    names = set(DEFAULT_HOSTS) | {ep.name for ep in
                                  importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(name for name in names if name.startswith(incomplete))


host_argument = click.argument("host", default="azure", metavar="HOST",
                               shell_complete=_complete_host)
root_option = click.option("--root", default="/", show_default=True, metavar="DIR",
                           help="Treat DIR as / for the host's files (staging and tests).")


def _host(name: str, root: str):
    from .hosts import get_host
    return get_host(name, root)


@cli.command()
@host_argument
@root_option
@click.option("--log-dir", default=DEFAULT_LOG_DIR, show_default=True,
              help="Where the generated scripts write their output.")
@click.option("--force", is_flag=True, help="Replace files quiesce did not write (backed up first).")
@json_option
@click.pass_obj
@command
def install(obj: Context, host: str, root: str, log_dir: str, force: bool, as_json: bool) -> None:
    """Write the snapshot host's config and scripts for this machine's config.

    \b
    For azure: /etc/azure/VMSnapshotScriptPluginConfig.json (0600) and a pre- and
    post-script (0700) that run `quiesce freeze` / `quiesce thaw` with --config.
    Files quiesce did not write are never replaced without --force.
    """
    from .install import Installer, settings_for
    started = time.monotonic()
    target_host = _host(host, root)
    actions = Installer(target_host).install(settings_for(obj.config, log_dir=log_dir), force=force)
    warnings = target_host.conflicts()
    message = "\n".join(actions + [f"WARNING: {w}" for w in warnings])
    emit({"ok": not warnings, "action": "install", "message": message, "outcomes": []},
         as_json, started)


@cli.command()
@host_argument
@root_option
@click.option("--force", is_flag=True, help="Remove files even if they changed since install.")
@json_option
@click.pass_obj
@command
def uninstall(obj: Context, host: str, root: str, force: bool, as_json: bool) -> None:
    """Remove what `quiesce install` wrote, restoring any file it had backed up."""
    from .install import Installer
    started = time.monotonic()
    actions = Installer(_host(host, root)).uninstall(force=force)
    emit({"ok": True, "action": "uninstall", "message": "\n".join(actions), "outcomes": []},
         as_json, started)


@cli.command()
@host_argument
@root_option
@json_option
@click.pass_obj
@command
def doctor(obj: Context, host: str, root: str, as_json: bool) -> None:
    """Predict what the host will report for the next backup, and why.

    Validates the installed files in the host's own order and prints the host's code for
    the first failure, then checks the scripts, interpreter, config and every target.
    Exit 0 only when the next backup would be application-consistent.
    """
    from .install import Installer, doctor_checks
    from .phases import run_phase
    target_host = _host(host, root)
    verdict = target_host.validate()
    config, config_error, outcomes = None, None, None
    try:
        config = obj.config
        outcomes = [o.as_dict() for o, _ in run_phase(obj.adapters, "check", config.targets)]
    except QuiesceError as e:
        config_error = str(e)
    findings = [{"check": f"{host} host validation", "ok": verdict.ok, "warning": False,
                 "message": f"{verdict.code} {verdict.name}: {verdict.message}"}]
    findings += [{"check": "no conflicting host setup", "ok": False, "warning": False,
                  "message": c} for c in target_host.conflicts()]
    findings += doctor_checks(target_host, Installer(target_host), config, config_error, outcomes)
    ok = all(f["ok"] for f in findings)
    if as_json:
        click.echo(json.dumps({"ok": ok, "host_code": verdict.code, "host_name": verdict.name,
                               "findings": findings}, indent=2))
    else:
        for f in findings:
            mark = "ok  " if f["ok"] and not f["warning"] else ("warn" if f["ok"] else "FAIL")
            click.echo(f"{mark}  {f['check']}: {f['message']}")
        warned = any(f["warning"] for f in findings)
        click.echo("the next backup would NOT be application-consistent (see FAIL above)"
                   if not ok else "the next backup may not be application-consistent (see "
                   "warn above)" if warned else "the next backup would be application-consistent")
    sys.stdout.flush()
    os._exit(0 if ok else 1)  # a target check that overran its limit must not hold us


@cli.command()
@host_argument
@root_option
@click.option("--freeze", "freeze_mounts", multiple=True, metavar="MOUNT",
              help="Freeze this mount point around the snapshot (repeatable). Never / unless "
                   "--allow-root-freeze.")
@click.option("--allow-root-freeze", is_flag=True, help="Allow freezing / (dangerous).")
@click.option("--freeze-deadline", default=60.0, show_default=True, metavar="SECONDS",
              help="An independent process thaws after this long, as the host's safefreeze does.")
@click.option("--snapshot-command", metavar="CMD", help="Snapshot by running CMD with /bin/sh.")
@click.option("--copy", "copies", multiple=True, nargs=2, metavar="SRC DEST",
              help="Snapshot by copying SRC to DEST (sparse; repeatable).")
@click.option("--wait", "wait_seconds", default=None, type=float, metavar="SECONDS",
              help="Snapshot by waiting (the default: 1 s).")
@json_option
@click.pass_obj
@command
def rehearse(obj: Context, host: str, root: str, freeze_mounts, allow_root_freeze: bool,
             freeze_deadline: float, snapshot_command, copies, wait_seconds, as_json: bool) -> None:
    """Play the snapshot host's part and report what it would report.

    Validates the installed files as the host does, runs the pre-script the way the host
    runs it, freezes the named mounts, takes the snapshot step, thaws, runs the
    post-script, and prints a timeline and the host's result code. Exit 0 only for an
    application-consistent result.
    """
    from .snapshot import SnapshotStep
    if sum(bool(x) for x in (snapshot_command, copies, wait_seconds is not None)) > 1:
        raise click.UsageError("choose one of --snapshot-command, --copy and --wait")
    step = SnapshotStep(command=snapshot_command, copies=list(copies),
                        wait=wait_seconds if wait_seconds is not None else (0 if snapshot_command
                                                                           or copies else 1.0))
    printer = None if as_json else (lambda t, text: click.echo(f"{t:+9.3f}s  {text}"))
    report = _host(host, root).rehearse(snapshot=step, freeze_mounts=list(freeze_mounts),
                                        allow_root_freeze=allow_root_freeze,
                                        freeze_deadline=freeze_deadline, on_event=printer)
    report["holds"] = _holds(obj.config_path, since=report["started_at"])
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


def _holds(config_path: str, since: float) -> list[dict]:
    """How long each target was held in this rehearsal, from the holder's record."""
    state = lean.read_state(lean.runtime_dir_of(config_path) or "/nonexistent") or {}
    if not state.get("held_since") or not state.get("released_at") \
            or state.get("started_at", 0) < since:
        return []  # no freeze ran in this rehearsal
    seconds = state["released_at"] - state["held_since"]
    statuses = {o["target"]: o["status"] for o in state.get("outcomes", ())}
    return [{"target": t["name"], "kind": t["kind"], "seconds": round(seconds, 4),
             "released_by": state.get("released_by"), "status": statuses.get(t["name"], t["status"])}
            for t in state.get("targets", ())]


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
    freeze_report = start(obj.config, obj.adapters)
    if not freeze_report["ok"]:
        emit(freeze_report, as_json, started)
    try:
        proc = subprocess.run(list(snapshot_command), stdin=subprocess.DEVNULL)
        command_status = proc.returncode
    except OSError as e:
        click.echo(f"quiesce: error: cannot run {snapshot_command[0]}: {e}", err=True)
        command_status = 127
    finally:
        report = release_all(obj)
    report["command_status"] = command_status
    if command_status:  # the snapshot failed, whatever the holds did
        report["ok"] = False
        report["message"] = (f"{report.get('message', '')}; the snapshot command "
                             f"{snapshot_command[0]} exited with status {command_status}")
    lean.emit(report, as_json=as_json, started=started)
    sys.exit(command_status or lean.report_exit_code(report))


@cli.command("restore-prepare")
@click.argument("kind", type=click.Choice(["postgresql"]))
@click.option("--datadir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The restored data directory (server not started).")
@click.option("--label", "label_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The .backup_label file thaw wrote to label_dir.")
@click.option("--tablespace-map", type=click.Path(exists=True, dir_okay=False),
              help="The .tablespace_map file, if the backup has tablespaces.")
@click.option("--wal-source", type=click.Path(exists=True, file_okay=False),
              help="A WAL archive directory; adds recovery.signal and a restore_command.")
@click.option("--stop-lsn", help="The backup's stop LSN, if no history file or note has it.")
@click.option("--force", is_flag=True, help="Replace an existing backup_label/recovery.signal.")
@json_option
@click.pass_obj
@command
def restore_prepare(obj: Context, kind: str, datadir: str, label_file: str, tablespace_map,
                    wal_source, stop_lsn, force: bool, as_json: bool) -> None:
    """Make a restored copy start from a backup-mode snapshot.

    Installs the backup label next to the data, with recovery.signal when a WAL
    archive is given. Refuses, with the reason, when the WAL the backup needs is not
    there: a label without its WAL makes the server refuse to start.
    """
    from .adapters.postgresql import restore_prepare as prepare
    started = time.monotonic()
    result = prepare(datadir, label_file, tablespace_map, wal_source=wal_source, force=force,
                     stop_lsn=stop_lsn)
    emit({"ok": True, "action": "restore-prepare", "outcomes": [],
          "message": "\n".join(f"{k}: {v}" for k, v in result.items()), "result": result},
         as_json, started)
