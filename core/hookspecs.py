"""The adapter contract: five hooks called once per target, and one for CLI commands.

Lifecycle for every configured target (``quiesce freeze`` … ``quiesce thaw``)::

    validate ─▶ check ─▶ flush ─▶ quiesce ─▶ [snapshot] ─▶ thaw
                  │         │         │                     ▲
                  └─ error ─┴─ error ─┴─ error: the others stay │
                     held (hold-others) or are thawed ─────────┘

Each target names its *kind*; the core calls only the adapter registered under that kind
(bundled adapters under their kind name, third-party adapters under their entry-point
name), so an implementation never has to check ``target.kind``. All hooks are
``firstresult``: one adapter answers for its kind.

Phases run for all targets together: every ``check``, then every ``flush``, then every
``quiesce``, concurrently across targets, so no target waits quiesced while another one
flushes. ``thaw`` runs for every held target at once. An exception raised by any hook becomes a
failed outcome for that target only; raise :class:`quiesce.TargetError` with a message
that says what was wrong and what to do.

``register_commands`` is different: it is called once, with the ``quiesce`` command group,
so an adapter can add its own commands (PostgreSQL adds ``restore-prepare``).
"""

from __future__ import annotations

from typing import Any

import pluggy

from .target import Hold, Target

PROJECT = "quiesce"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec(firstresult=True)
def validate(target: Target) -> None:
    """Check *target*'s settings without touching the database.

    Called when the config is loaded, by every command, before anything connects. Read
    every setting your adapter understands through ``target.option`` /
    ``target.secret`` / ``target.private_file``; keys you did not read are reported to
    the operator as unknown. Raise ``target.error(key, message)`` for a bad value.

    Example::

        @hookimpl
        def validate(target):
            target.option("path", str)
            target.option("busy_timeout", float, default=5.0)
    """


@hookspec(firstresult=True)
def check(target: Target) -> dict[str, Any] | None:
    """Preflight: connect, read the version, verify privileges. Takes no lock.

    Called by ``quiesce check`` and at the start of ``quiesce freeze``. A missing
    privilege must raise :class:`quiesce.TargetError` naming the GRANT to run.

    :returns: facts for the operator (``{"version": "15.18", "role": "backup"}``),
        JSON-serialisable, or ``None``.
    """


@hookspec(firstresult=True)
def flush(target: Target) -> dict[str, Any] | None:
    """Do cheap work that shortens the coming hold: CHECKPOINT, BGSAVE, FLUSH TABLES.

    Called after every target passed ``check`` and before any target is quiesced. Must
    not leave anything locked.

    :returns: facts for the operator, or ``None``.
    """


@hookspec(firstresult=True)
def quiesce(target: Target) -> Hold | None:
    """Make *target* safe to snapshot and return what must be held until thaw.

    Every wait for a lock is bounded by ``target.timeout``; if the lock cannot be had,
    leave nothing behind and raise :class:`quiesce.TargetError`. Keep session-bound state
    (a transaction, a global read lock, a backup started in this session) in
    ``Hold.session``: the holder process keeps it open until ``thaw``. Server-kept state
    goes in ``Hold.facts`` so a ``thaw`` after a crash can still release it. Set any
    server-side deadline from ``target.max_hold``. Call ``target.lock_gate()`` right
    before the lock statement, once the session is prepared: every target then locks at
    the same moment (:mod:`quiesce.lockgate`).

    :returns: a :class:`quiesce.Hold`, or ``None`` when nothing needs holding.
    """


@hookspec(firstresult=True)
def thaw(target: Target, hold: Hold) -> dict[str, Any] | None:
    """Release *target*. Must be safe to call more than once and after a crash.

    *hold* is what ``quiesce`` returned. After the holder died (or its watchdog fired)
    ``hold.session`` is ``None`` and only ``hold.facts`` survive: release whatever the
    server keeps by itself and do nothing else. Raise :class:`quiesce.HoldBroken`,
    after releasing, when the target was not held for the whole window (session lost,
    lock gone, server-side deadline passed).

    :returns: facts for the operator (a stop LSN, a label file path), or ``None``.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add this adapter's own commands to the ``quiesce`` command line.

    *cli* is a :class:`click.Group`; add commands with ``@cli.command(...)``. Called, for
    every adapter, only when the command line names a command the core does not have (or
    lists them all in ``--help``), so a core command never pays for it. Import heavy
    modules inside the command, not here. ``quiesce.cli`` offers ``command`` (one-line
    errors and their exit codes), ``json_option`` and ``emit_result`` so an adapter's
    command reports like the core's.

    Example::

        @hookimpl
        def register_commands(cli):
            @cli.command("example-stats")
            @click.argument("address")
            def stats(address):
                "Print the server's statistics."
                click.echo(kv.Client(address, timeout=5).request("ping"))
    """
