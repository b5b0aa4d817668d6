"""Prepare every target, then lock them together: the quiesce phase's lock gate.

A quiesce hook does slow things before its lock (connect, check privileges, set session
variables). Locked as each target became ready, the first target's writers would wait for
the slowest preparation. So an adapter calls ``target.lock_gate()`` right before its lock
statement, with its session prepared, and the gate holds it there until every target of
the phase is prepared too: every lock statement then goes out at the same moment.

The gate must never hold a lock back for long, nor deadlock a phase:

- a target whose quiesce call ends without reaching the gate (it failed, or its adapter
  never calls the gate: a third-party one, the template) counts as arrived;
- a waiter waits at most its target's ``timeout``; the first one to run out opens the gate
  for all (a preparation that overruns delays the others by that much, then they lock);
- the phase opens the gate when it ends, so a call it abandoned never waits on it.

An adapter whose lock statement can be written without waiting for its reply passes that
write as ``target.lock_gate(send)``: the thread that opens the gate then calls every waiting
target's ``send`` back to back, so the statements leave within microseconds of each other
(woken one by one, 32 threads would each need the interpreter lock first: milliseconds of
spread). With ``receive`` as well (``target.lock_gate(send, receive)``), the same thread then
calls every target's ``receive`` in turn, reading the replies that all servers worked on at
once, and ``lock_gate`` returns what it returned: 32 threads woken to read one reply each
took 6 ms on two CPUs, one thread reading all 32 about 1 ms (benchmarks/RESULTS.md). Errors
of ``send`` and ``receive`` are raised in their own target's thread, from ``lock_gate``.
Like every wait of an adapter, ``receive`` must be bounded (the driver's read timeout).

Outside a quiesce phase (no gate attached) ``target.lock_gate()`` returns at once, after
calling ``send`` and ``receive`` if they were given.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .target import Target

log = logging.getLogger(__name__)


class LockGate:
    """A one-shot barrier across the targets of one quiesce phase."""

    def __init__(self, targets: list[Target]):
        self._waiting_for = {t.name for t in targets}
        self._guard = threading.Lock()
        self._open = threading.Event()
        #: what to do on opening, per target: write the lock statement, read its reply
        self._pending: dict[str, tuple[Callable[[], None], Callable[[], Any] | None]] = {}
        self._replies: dict[str, Any] = {}               # what each receive returned
        self._errors: dict[str, BaseException] = {}      # what a send or receive raised
        if not self._waiting_for:
            self._open.set()

    def arrive(self, target: Target) -> None:
        """*target* will not wait (its call ended); open the gate if it was the last."""
        with self._guard:
            self._waiting_for.discard(target.name)
            if not self._waiting_for and not self._open.is_set():
                self._open_locked()

    def wait(self, target: Target, send: Callable[[], None] | None = None,
             receive: Callable[[], Any] | None = None) -> tuple[bool, Any]:
        """*target* is prepared: wait for the others. Returns whether they all were
        prepared, and what *receive* returned.

        *send* and *receive*, if given, are called when the gate opens, with the other
        targets' (see the module's docstring); what they raised is raised here."""
        with self._guard:
            late = self._open.is_set()
            if not late:
                if send is not None:
                    self._pending[target.name] = (send, receive)
                self._waiting_for.discard(target.name)
                if not self._waiting_for:
                    self._open_locked()
        if late:  # opened without it (someone ran out of time): lock now, alone
            return False, _lock_alone(send, receive)
        prepared = self._open.wait(target.timeout)
        if not prepared:
            with self._guard:  # the first to run out opens it: the others lock now too
                if not self._open.is_set():
                    log.warning("%s was not prepared within %s's timeout (%g s); the other "
                                "targets lock without waiting for it",
                                ", ".join(sorted(self._waiting_for)), target.name,
                                target.timeout)
                    self._open_locked()
        error = self._errors.pop(target.name, None)
        if error is not None:
            raise error
        if send is None:  # it had nothing for the gate to write: its lock is its own
            return prepared, _lock_alone(None, receive)
        return prepared, self._replies.pop(target.name, None)

    def _open_locked(self) -> None:
        """Write every waiting target's lock statement, back to back, then read every reply
        in turn, then wake them all."""
        sent = []
        for name, (send, receive) in self._pending.items():
            try:
                send()
                sent.append((name, receive))
            except BaseException as e:  # raised in its own target's thread
                self._errors[name] = e
        for name, receive in sent:
            if receive is not None:
                try:
                    self._replies[name] = receive()
                except BaseException as e:
                    self._errors[name] = e
        self._pending.clear()
        self._open.set()

    def open(self) -> None:
        with self._guard:
            if not self._open.is_set():
                self._open_locked()

    @contextmanager
    def attached(self, targets: list[Target]) -> Iterator[LockGate]:
        """Give *targets* this gate for the length of the block; open it at the end."""
        for target in targets:
            target._gate = self
        try:
            yield self
        finally:
            self.open()
            for target in targets:
                target._gate = None


def _lock_alone(send: Callable[[], None] | None, receive: Callable[[], Any] | None) -> Any:
    if send is not None:
        send()
    return receive() if receive is not None else None
