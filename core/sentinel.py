"""The holder's stand-in watchdog, run as ``python -I -S -B sentinel.py GRACE CONFIG PID``.

It belongs to one holder (PID), which starts it before anything is quiesced. It reads
that holder's deadline (wall time, one line each time it changes) from its stdin, a
pipe only the holder writes, and learns of the holder's end by EOF. Then, and only if
a deadline was set (something may be quiesced), it sleeps until GRACE seconds after the
deadline and runs ``quiesce thaw --orphaned PID``, which acts only on that holder's
record and only when no other holder has the lock. A holder that ends normally kills it.

Standard library only, and it imports nothing of quiesce: it must start in milliseconds
and keep working whatever state the holder died in.
"""

import os
import sys
import time


def main() -> int:
    grace, config, pid = float(sys.argv[1]), sys.argv[2], sys.argv[3]
    deadline = None
    for line in sys.stdin:
        try:
            deadline = float(line)
        except ValueError:
            pass
    if deadline is None:
        return 0  # the holder ended before it quiesced anything
    time.sleep(max(0.0, deadline + grace - time.time()))
    os.execv(sys.executable, [sys.executable, "-B", "-P", "-m", "quiesce", "--config", config,
                              "thaw", "--orphaned", pid])


if __name__ == "__main__":
    sys.exit(main())
