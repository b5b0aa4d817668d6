import importlib.util

# Fixture modules: real servers (tests/servers.py) and loop-mounted filesystems (tests/loopfs.py).
pytest_plugins = [m for m in ("tests.servers", "tests.loopfs") if importlib.util.find_spec(m)]
