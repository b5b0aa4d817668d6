"""What every ``quiesce`` command shares: its :class:`Context`, one-line errors with their
exit codes (:func:`command`), and ending in a report (:func:`emit`)."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import traceback
from datetime import datetime

import click

from . import report as reports, runtime
from .errors import QuiesceError


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


class StampedLines:
    """A text stream whose every line starts with the time it was written (ISO 8601, in
    milliseconds, with the UTC offset): for a script's log file, without a shell loop that
    stamps the lines after the command has ended."""

    def __init__(self, stream):
        self.stream, self.at_line_start = stream, True

    def write(self, text: str) -> int:
        stamp = datetime.now().astimezone().isoformat(timespec="milliseconds") + " "
        out = []
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:
                out.append(stamp)
            out.append(piece)
            self.at_line_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def __getattr__(self, name: str):  # flush, fileno, isatty ...: the stream's own
        return getattr(self.stream, name)


def stamp_output() -> None:
    """From now on, every line on stdout and stderr starts with the time it was written."""
    sys.stdout, sys.stderr = StampedLines(sys.stdout), StampedLines(sys.stderr)


stamp_option = click.option(
    "--stamp", is_flag=True,
    help="Start every output line with the time it was written (ISO 8601, milliseconds): "
         "for a log file. The generated host scripts use it.")


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
        sys.stdout.flush()
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
