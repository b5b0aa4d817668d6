"""What every adapter does with its database driver: import it, and word its errors.

Adapters import their driver inside the hooks, never at module level: quiesce imports every
adapter to list them, and importing a driver costs 150-200 ms. :func:`import_driver` turns
a missing driver into one line naming the extra to install. Driver exceptions span several
lines (libpq adds a ``DETAIL:`` and a ``HINT:``) and the core reports errors on one line:
:func:`one_line` folds one, and :func:`translated` turns any driver error raised in a block
into a :class:`~quiesce.TargetError` that says which step failed where.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

from .errors import MissingDriverError, TargetError


def import_driver(module: str, extra: str, *submodules: str) -> ModuleType:
    """Import *module* (and its *submodules*, e.g. ``"errors"``), or raise
    :class:`~quiesce.MissingDriverError` naming ``quiesce[extra]``."""
    try:
        for sub in submodules:
            importlib.import_module(f"{module}.{sub}")
        return importlib.import_module(module)
    except ImportError:
        raise MissingDriverError(module, extra) from None


def one_line(error: BaseException) -> str:
    """*error*'s message with its line breaks and runs of spaces folded; its type's name
    when it has no message (a bare ``TimeoutError()``)."""
    return " ".join(str(error).split()) or type(error).__name__


@contextmanager
def translated(errors: type[BaseException] | tuple[type[BaseException], ...],
               doing: str, *, advice: str = "",
               error: type[TargetError] = TargetError) -> Iterator[None]:
    """Raise ``error(f"{doing}: {one line}{advice}")`` for any of *errors* in the block.

    *doing* names the step and the endpoint ("CHECKPOINT on host=db1 port=5432 failed");
    *advice* ("; check …") says what to do. Our own errors pass through untouched.
    """
    try:
        yield
    except TargetError:
        raise
    except errors as e:
        raise error(f"{doing}: {one_line(e)}{advice}") from e
