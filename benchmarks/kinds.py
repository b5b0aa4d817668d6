"""The databases under test: how to start N targets of a kind, how the writer reaches
them, how quiesce is configured for them, and how the baseline script is called.

Servers come from tests/support/servers.py (throwaway, loopback or unix socket only, temporary
directories, always stopped). What a "target" is, per kind, and why:

* SQLite: N database files (WAL) in one directory; one target each. This is what a
  machine with several applications looks like.
* Redis: N servers. CLIENT PAUSE is server-wide, so N databases of one server would be
  one pause taken N times, not N targets.
* MariaDB: N servers. BACKUP STAGE and FLUSH TABLES WITH READ LOCK are server-wide, so N
  databases of one server are one target; a second BACKUP STAGE on the same server waits
  for the first.
* PostgreSQL: N clusters (servers). CHECKPOINT and the backup API act on a whole cluster;
  quiesce's targets are clusters, not databases.

N servers of a kind start from one initialised data directory, copied: much faster than
N initialisations, and the servers are identical.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import servers  # noqa: E402  (the repo root must be on sys.path first)

BASELINE_DIR = Path(__file__).resolve().parent / "baseline"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Variant:
    """One way of quiescing a kind: quiesce with some settings, or the baseline script."""

    def __init__(self, tool: str, name: str, *, blocks_writers: bool, settings: dict | None = None,
                 label: str | None = None):
        self.tool = tool                  # "quiesce" or "baseline"
        self.name = name                  # short id, unique per kind
        self.blocks_writers = blocks_writers
        self.settings = settings or {}    # extra target settings (quiesce)
        self.label = label or name


class Kind:
    name = ""
    label = ""
    baseline_script = ""
    #: Where the baseline's per-target clients are documented, for RESULTS.md.
    baseline_does = ""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.count = 0
        self._dirs: list[Path] = []
        self.servers: list[Any] = []

    # what every kind provides
    @classmethod
    def missing(cls) -> str | None:
        return None

    def start(self, count: int) -> None:
        raise NotImplementedError

    def variants(self) -> list[Variant]:
        raise NotImplementedError

    def writer_targets(self, n: int) -> list[dict]:
        raise NotImplementedError

    def quiesce_target(self, i: int) -> dict[str, Any]:
        raise NotImplementedError

    def baseline_args(self, n: int) -> list[str]:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def script_path(self) -> str:
        """Extra PATH entries for the baseline's client binary."""
        return ""

    def quiesce_toml(self, n: int, variant: Variant) -> str:
        lines = []
        for i in range(n):
            lines.append(f"[targets.{self.name}{i + 1:02d}]")
            settings = {"kind": self.adapter_kind(), **self.quiesce_target(i), **variant.settings}
            for key, value in settings.items():
                if isinstance(value, bool):
                    lines.append(f"{key} = {'true' if value else 'false'}")
                elif isinstance(value, (int, float)):
                    lines.append(f"{key} = {value}")
                else:
                    lines.append(f"{key} = {_toml_str(str(value))}")
            lines.append("")
        return "\n".join(lines)

    def adapter_kind(self) -> str:
        return self.name

    def cleanup(self) -> None:
        errors = []
        for server in reversed(self.servers):
            try:
                server.cleanup()
            except Exception as e:  # keep stopping the others
                errors.append(f"{server!r}: {e}")
        self.servers.clear()
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._dirs.clear()
        if errors:
            raise RuntimeError("could not stop every server:\n" + "\n".join(errors))

    def _clone(self, cls, count: int, prepare, **kwargs) -> None:
        """Start *count* servers of *cls*: one initialised and prepared, the rest copies."""
        first = cls.create(**kwargs)
        self.servers.append(first)
        prepare(first)
        if count == 1:
            return
        first.stop()
        for _ in range(count - 1):
            root = Path(tempfile.mkdtemp(prefix=f"quiesce-bench-{cls.name}-"))
            os.chmod(root, 0o711)  # PostgreSQL runs as an unprivileged user
            self._dirs.append(root)
            shutil.copytree(first.datadir, root / "data", symlinks=True)
            self.servers.append(cls.from_datadir(root / "data", **kwargs))
        first.start()


class SQLite(Kind):
    name = "sqlite"
    label = "SQLite"
    baseline_script = "sqlite.sh"
    baseline_does = "a `sqlite3` shell per database holding `BEGIN IMMEDIATE`; `ROLLBACK` at post"

    @classmethod
    def missing(cls) -> str | None:
        return _which("sqlite3")

    def start(self, count: int) -> None:
        self.count = count
        self.dir = self.workdir / "sqlite"
        self.dir.mkdir()
        self.paths = []
        for i in range(count):
            path = self.dir / f"db{i + 1:02d}.db"
            conn = sqlite3.connect(path)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE writes (id INTEGER PRIMARY KEY, at REAL)")
            conn.commit()
            conn.close()
            self.paths.append(str(path))

    def variants(self) -> list[Variant]:
        return [Variant("quiesce", "quiesce", blocks_writers=True),
                Variant("baseline", "baseline", blocks_writers=True)]

    def writer_targets(self, n: int) -> list[dict]:
        return [{"path": p} for p in self.paths[:n]]

    def quiesce_target(self, i: int) -> dict[str, Any]:
        return {"path": self.paths[i]}

    def baseline_args(self, n: int) -> list[str]:
        return self.paths[:n]

    def version(self) -> str:
        return f"SQLite {sqlite3.sqlite_version} (Python's sqlite3; the baseline's sqlite3 CLI: " \
               f"{_cli_version(['sqlite3', '-version'])})"


class Redis(Kind):
    name = "redis"
    label = "Redis"
    baseline_script = "redis.sh"
    baseline_does = "a `redis-cli` per server: `CLIENT PAUSE <max_hold> WRITE`; `CLIENT UNPAUSE` at post"

    @classmethod
    def missing(cls) -> str | None:
        return servers.RedisServer.missing() or _which("redis-cli")

    def start(self, count: int) -> None:
        self.count = count
        for _ in range(count):
            # AOF (appendfsync everysec), no RDB save points: the durable setup most
            # deployments that care about backups use. With RDB save points quiesce also
            # saves under the pause (the baseline does not), which is a different job.
            self.servers.append(servers.RedisServer.create(persistence="aof"))

    def variants(self) -> list[Variant]:
        return [Variant("quiesce", "quiesce", blocks_writers=True),
                Variant("baseline", "baseline", blocks_writers=True)]

    def writer_targets(self, n: int) -> list[dict]:
        return [{"socket": str(s.socket)} for s in self.servers[:n]]

    def quiesce_target(self, i: int) -> dict[str, Any]:
        return {"url": f"unix://{self.servers[i].socket}"}

    def baseline_args(self, n: int) -> list[str]:
        return [str(s.socket) for s in self.servers[:n]]

    def version(self) -> str:
        return self.servers[0].version_string if self.servers else "?"


class MariaDB(Kind):
    name = "mariadb"
    label = "MariaDB"
    baseline_script = "mariadb.sh"
    baseline_does = ("a `mariadb` client per server holding `FLUSH TABLES WITH READ LOCK`; "
                     "`UNLOCK TABLES` at post")
    #: Commits without an fsync each (the binary log and redo log are still written), so
    #: the writer commits every ~0.2 ms and a release shows within that. With an fsync per
    #: commit the writer's resolution would be the disk's flush time.
    OPTIONS = {"innodb-flush-log-at-trx-commit": 2, "sync-binlog": 0}

    @classmethod
    def missing(cls) -> str | None:
        return servers.MariaDBServer.missing() or _which("mariadb")

    def start(self, count: int) -> None:
        self.count = count

        def prepare(server):
            server.sql("CREATE DATABASE bench")
            server.sql("CREATE TABLE bench.writes (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
                       "at DOUBLE) ENGINE=InnoDB")
            server.sql("CREATE TABLE bench.stall (id INT PRIMARY KEY, v BIGINT) ENGINE=InnoDB")
            server.sql("INSERT INTO bench.stall VALUES (1, 0)")
        self._clone(servers.MariaDBServer, count, prepare, options=self.OPTIONS)

    def adapter_kind(self) -> str:
        return "mysql"

    def variants(self) -> list[Variant]:
        return [Variant("quiesce", "quiesce", blocks_writers=True,
                        label="quiesce (auto: BACKUP STAGE)"),
                Variant("baseline", "baseline", blocks_writers=True)]

    def writer_targets(self, n: int) -> list[dict]:
        return [{"socket": str(s.socket), "database": "bench"} for s in self.servers[:n]]

    def quiesce_target(self, i: int) -> dict[str, Any]:
        # root over the socket: unix_socket authentication, no password anywhere.
        return {"unix_socket": str(self.servers[i].socket), "user": "root"}

    def baseline_args(self, n: int) -> list[str]:
        return [str(s.socket) for s in self.servers[:n]]

    def version(self) -> str:
        return self.servers[0].version_string if self.servers else "?"


class PostgreSQL(Kind):
    name = "postgresql"
    label = "PostgreSQL"
    baseline_script = "postgresql.sh"
    baseline_does = ("a `psql` per cluster: `pg_backup_start(fast => true)`; `pg_backup_stop()` "
                     "in the same session at post, its label saved")
    #: Commits without waiting for the WAL flush, so the writer commits every ~0.1 ms.
    SETTINGS = {"synchronous_commit": "off"}

    @classmethod
    def missing(cls) -> str | None:
        return servers.Pg15Server.missing()

    def start(self, count: int) -> None:
        self.count = count
        self.label_dir = self.workdir / "pg-labels"
        self.label_dir.mkdir()

        def prepare(server):
            server.sql("CREATE TABLE writes (id BIGSERIAL PRIMARY KEY, at DOUBLE PRECISION)")
        self._clone(servers.Pg15Server, count, prepare, settings=self.SETTINGS)

    def variants(self) -> list[Variant]:
        return [Variant("quiesce", "quiesce-checkpoint", blocks_writers=False,
                        label="quiesce (mode checkpoint)"),
                Variant("quiesce", "quiesce-backup", blocks_writers=False,
                        settings={"mode": "backup", "label_dir": str(self.label_dir)},
                        label="quiesce (mode backup)"),
                Variant("baseline", "baseline", blocks_writers=False)]

    def writer_targets(self, n: int) -> list[dict]:
        return [{"host": str(s.socket_dir), "port": s.port, "user": s.superuser,
                 "dbname": "postgres"} for s in self.servers[:n]]

    def quiesce_target(self, i: int) -> dict[str, Any]:
        s = self.servers[i]
        return {"host": str(s.socket_dir), "port": s.port, "user": s.superuser,
                "dbname": "postgres"}

    def baseline_args(self, n: int) -> list[str]:
        return [f"{s.socket_dir}:{s.port}" for s in self.servers[:n]]

    def script_path(self) -> str:
        # The cluster's own psql, not Debian's /usr/bin/psql (a Perl wrapper that adds
        # ~40 ms to every start): the baseline gets the fastest client there is.
        return str(self.servers[0].bindir) if self.servers else ""

    def version(self) -> str:
        return self.servers[0].version_string if self.servers else "?"


KINDS = {k.name: k for k in (SQLite, Redis, MariaDB, PostgreSQL)}


def _which(binary: str) -> str | None:
    return None if shutil.which(binary) else f"{binary} is not installed"


def _cli_version(argv: list[str]) -> str:
    import subprocess
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "not installed"
    return out.split()[0] if out else "?"
