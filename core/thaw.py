"""The thaw path, kept lean: standard library only, runnable as a file.

The post-script runs ``python -I -S -B <this file> --config FILE`` so that releasing the
databases costs one interpreter start and one round trip to the holder, without
importing pluggy, click or any driver. Only when no holder is alive and something is
still recorded as held does it hand over to the full CLI (``quiesce thaw``), which
loads the adapters to release server-kept state.

Nothing here writes to a disk filesystem: the runtime directory is on tmpfs and the
report goes to stdout (invariant 2 in docs/architecture.md).
"""

from __future__ import annotations

import os
import sys
import time

if not __package__:
    # Run as a file (``python -I -S -B .../thaw.py``). -I leaves this file's directory off
    # sys.path and -S skips site-packages, where the installed package (or the editable
    # install's finder that maps core/ to quiesce) lives: ``import quiesce`` would fail.
    # So make this directory the package ``quiesce`` by hand, as an empty package whose
    # __path__ is here: runtime.py and report.py (standard library only) then import as
    # quiesce.runtime and quiesce.report, and quiesce/__init__.py (pluggy) never runs.
    import types
    _package = types.ModuleType("quiesce")
    _package.__path__ = [os.path.dirname(os.path.abspath(__file__))]
    sys.modules.setdefault("quiesce", _package)

from quiesce import report as reports  # noqa: E402  (after the package is in place)
from quiesce.runtime import (FIFO_NAME, Unresponsive, UntrustedPeer,  # noqa: E402
                             acknowledge, config_path, freeze_in_progress, note_thaw_request,
                             read_state, request, runtime_dir_of, unsafe_runtime_dir)


def thaw_via_holder(runtime_dir: str) -> tuple[dict | None, bool]:
    """Release through the holder, or from the state file alone.

    Returns ``(report, needs_recovery)``: when *needs_recovery* is true, targets are still
    recorded as held and no holder is alive, so the adapters must release them.
    """
    try:
        report = request(runtime_dir, "thaw")
    except Unresponsive as e:
        return reports.unresponsive(e, runtime_dir), False
    if report is not None:
        return report, False
    reason = unsafe_runtime_dir(runtime_dir)
    if reason:  # what is in it could have been put there by someone else
        raise UntrustedPeer(f"refusing runtime_dir {runtime_dir}: {reason}")
    try:  # no holder reads it any more: never let lines pile up in it
        os.unlink(os.path.join(runtime_dir, FIFO_NAME))
    except OSError:
        pass
    note_thaw_request(runtime_dir)
    if freeze_in_progress(runtime_dir):
        return {"ok": False, "action": "freeze-in-progress", "outcomes": [],
                "message": "quiesce freeze was still starting (or its holder did not answer) "
                           "when thaw came: it will release every target as soon as it sees "
                           "this thaw request; the snapshot was not covered"}, False
    state = read_state(runtime_dir)
    report, needs_recovery = reports.from_state(state, runtime_dir)
    if needs_recovery:
        return None, True
    if state and report.get("action") == "reported":
        acknowledge(runtime_dir, state)
    return report, False


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    import argparse  # after the clock starts: it is part of what we measure

    parser = argparse.ArgumentParser(prog="quiesce thaw", description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config")
    parser.add_argument("--json", action="store_true")
    args, rest = parser.parse_known_args(argv)
    cfg = config_path(args.config)
    runtime_dir = runtime_dir_of(cfg)
    report, needs_recovery = None, True  # the full CLI says what is wrong with the config
    if runtime_dir is not None:
        try:
            report, needs_recovery = thaw_via_holder(runtime_dir)
        except UntrustedPeer as e:
            sys.stderr.write(f"quiesce thaw: {e}\n")
            return 2
        except (OSError, ValueError) as e:
            sys.stderr.write(f"quiesce thaw: cannot reach the holder in {runtime_dir}: {e}\n")
    if needs_recovery:
        # The full CLI loads the adapters and releases what the server keeps by itself.
        cmd = [sys.executable, "-B", "-P", "-m", "quiesce", "--config", cfg, "thaw"]
        cmd += ["--json"] if args.json else []
        os.execv(sys.executable, cmd + rest)
    reports.emit(report, as_json=args.json, started=started)
    return reports.exit_code(report)


if __name__ == "__main__":
    sys.exit(main())
