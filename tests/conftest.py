"""Loads the fixture modules of tests/support: throwaway database servers (servers.py)
and loop-mounted filesystems to freeze (loopfs.py). Their fixtures check that a test using
them carries the `server` or `root` marker (support/markers.py)."""

pytest_plugins = ["tests.support.servers", "tests.support.loopfs"]
