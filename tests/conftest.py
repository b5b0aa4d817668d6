# Fixture modules: real servers (tests/servers.py) and loop-mounted filesystems (tests/loopfs.py).
pytest_plugins = ["tests.servers", "tests.loopfs"]
