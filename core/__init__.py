"""quiesce: hold databases quiesced across a disk snapshot, release them after.

The public API for adapter authors is what this module exports; everything else is
internal and may change.
"""

import pluggy

from .errors import (AdapterConflictError, AdapterLoadError, BusyError, ConfigError,
                     HoldBroken, MissingDriverError, QuiesceError, TargetError)
from .drivers import import_driver, one_line, translated
from .hookspecs import PROJECT
from .target import Hold, Target

#: Marker for adapter hook implementations: ``@quiesce.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = [
    "AdapterConflictError",
    "AdapterLoadError",
    "BusyError",
    "ConfigError",
    "Hold",
    "HoldBroken",
    "MissingDriverError",
    "QuiesceError",
    "Target",
    "TargetError",
    "hookimpl",
    "import_driver",
    "one_line",
    "translated",
]
