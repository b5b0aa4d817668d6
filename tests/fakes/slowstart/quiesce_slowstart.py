"""A third-party adapter that is slow to import, as one that imports a big driver from a
cold page cache can be. It makes `quiesce freeze` slow to start, before any holder exists.

The import sleeps QUIESCE_TEST_IMPORT_DELAY seconds (default 0). It serves kind
``slowstart``, which no test config uses.
"""

import os
import time

from quiesce import hookimpl

time.sleep(float(os.environ.get("QUIESCE_TEST_IMPORT_DELAY", "0")))


class SlowStart:
    @hookimpl
    def check(self, target):
        return {}


slowstart = SlowStart()
