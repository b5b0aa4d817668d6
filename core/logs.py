"""Logging an operator can follow, and that never touches a frozen disk.

Commands log to the configured file. The holder, and `thaw` when it must release targets
itself, keep their records in memory and open the file only after the targets are
released (invariant 2 in docs/architecture.md): until then the host may have frozen every filesystem,
and even creating a log file there would block for good.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import Callable

FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
_LOGGER = "quiesce"
#: ``extra=`` for a record whose content the command's report prints: the log file gets
#: it at its level, the console leaves it to the report.
IN_REPORT = {"in_report": True}


def _file_handler(log_file: str) -> logging.Handler | None:
    try:
        os.makedirs(os.path.dirname(log_file), mode=0o700, exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.close(fd)
        handler = logging.FileHandler(log_file, delay=True, encoding="utf-8")
    except OSError as e:
        sys.stderr.write(f"quiesce: warning: cannot write log file {log_file}: {e}\n")
        return None
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def _reset(verbose: bool) -> logging.Logger:
    logger = logging.getLogger(_LOGGER)
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    return logger


def _console(verbose: bool) -> logging.Handler:
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("quiesce: %(levelname)s: %(message)s"))
    console.addFilter(lambda record: not getattr(record, "in_report", False))
    return console


def setup(log_file: str | None, *, verbose: bool = False) -> None:
    """Log to *log_file* (INFO, or DEBUG with --verbose) and warnings to stderr."""
    logger = _reset(verbose)
    if log_file and (handler := _file_handler(log_file)):
        logger.addHandler(handler)
    logger.addHandler(_console(verbose))


def buffer_until_released(log_file: str | None, *, verbose: bool = False,
                          console: bool = False) -> Callable[[], None]:
    """Keep log records in memory; the returned function writes them out (call it once
    every target is released, and again before exiting)."""
    logger = _reset(verbose)
    # flushLevel above CRITICAL: nothing reaches the disk until we flush on purpose.
    memory = logging.handlers.MemoryHandler(capacity=1_000_000,
                                            flushLevel=logging.CRITICAL + 1, target=None)
    logger.addHandler(memory)
    if console:
        logger.addHandler(_console(verbose))

    def write_out() -> None:
        if memory.target is None and log_file:
            memory.setTarget(_file_handler(log_file))
        with memory.lock:  # threads log concurrently: write in the order things happened
            memory.buffer.sort(key=lambda record: record.created)
        memory.flush()
        if memory.target is not None:
            memory.target.flush()
    return write_out
