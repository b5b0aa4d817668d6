"""Logging an operator can follow, and that never touches a frozen disk.

Commands log to the configured file. The holder buffers its records in memory and writes
them only after the targets are released (DESIGN.md invariant 2): while it holds, the
host may have frozen every filesystem, and a write there would block it for good.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
_LOGGER = "quiesce"


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


def setup(log_file: str | None, *, verbose: bool = False, stderr: bool = True) -> None:
    """Log to *log_file* (INFO, or DEBUG with --verbose) and warnings to stderr."""
    logger = logging.getLogger(_LOGGER)
    logger.handlers.clear()
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if log_file and (handler := _file_handler(log_file)):
        logger.addHandler(handler)
    if stderr:
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.DEBUG if verbose else logging.WARNING)
        console.setFormatter(logging.Formatter("quiesce: %(levelname)s: %(message)s"))
        logger.addHandler(console)


def buffer_until_released(log_file: str | None) -> logging.handlers.MemoryHandler:
    """Switch this process (the holder) to in-memory logging; flush() writes it out."""
    logger = logging.getLogger(_LOGGER)
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    target = _file_handler(log_file) if log_file else None
    # flushLevel above CRITICAL: nothing reaches the disk until we flush on purpose.
    memory = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1,
                                            target=target, flushOnClose=True)
    logger.addHandler(memory)
    return memory
