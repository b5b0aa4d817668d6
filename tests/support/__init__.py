"""What the tests stand on, apart from the tests themselves.

servers: throwaway PostgreSQL, MariaDB, Redis and Valkey servers (fixtures);
loopfs: loop-mounted filesystems to freeze (fixture);
markers: the check that keeps the `root` and `server` markers true;
helpers: running the CLI, configs, SQLite files, waiting;
azurekit, qgakit: staged roots for the Azure and qemu-ga host tests;
mongodb_server, mongodb_wire: a real mongod where one exists, and scripted wire peers.

tests/conftest.py loads the fixture modules; the benchmarks import servers and loopfs.
"""
