"""Where the `mysql` client would connect: its default option files and the server's socket.

A target with only ``kind = "mysql"`` must work wherever ``mysql -e 'select 1'`` works for
the same user, so this reads what the client reads, in its order, with its rules:

* the files ``/etc/my.cnf``, ``/etc/mysql/my.cnf`` and ``~/.my.cnf`` (later values win),
  following ``!include FILE`` and ``!includedir DIR`` (its ``*.cnf`` files, sorted);
* the groups ``[client]``, ``[client-server]`` and ``[client-mariadb]``;
* ``#`` and ``;`` comments, quoted values with backslash escapes, ``-`` and ``_`` alike in
  names, the ``loose-`` prefix; a world-writable file is ignored, as the client ignores it;
* for ``localhost`` (or no host) the server's unix socket: the files' ``socket``, else the
  first that exists of the distributions' compiled-in defaults.

``~/.mylogin.cnf`` (MySQL's obfuscated login-path file) is not read: its AES key sits in
the file itself, so it protects nothing a 0600 option file does not, reading it would add
a cipher library to quiesce's dependencies, and MariaDB's client does not read it either.

Nothing here ever quotes a line of an option file: it may hold a password.
"""

from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger(__name__)

#: The client's default option files, in the order it reads them.
DEFAULT_FILES = ("/etc/my.cnf", "/etc/mysql/my.cnf", "~/.my.cnf")
#: The groups a MariaDB or MySQL client reads for its connection.
GROUPS = ("client", "client-server", "client-mariadb")
#: Compiled-in socket paths: Debian/Ubuntu (MariaDB and MySQL), RHEL/Fedora, upstream.
DEFAULT_SOCKETS = ("/run/mysqld/mysqld.sock", "/var/run/mysqld/mysqld.sock",
                   "/var/lib/mysql/mysql.sock", "/tmp/mysql.sock")
#: The connection options quiesce takes from the files.
KEYS = ("user", "password", "host", "port", "socket")
_MAX_DEPTH = 10
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "s": " ", "\\": "\\", "'": "'",
            '"': '"'}


def read(files: tuple[str, ...] | None = None, groups: tuple[str, ...] = GROUPS) -> dict[str, str]:
    """The connection options of the default option files (or *files*), merged."""
    values: dict[str, str] = {}
    for path in DEFAULT_FILES if files is None else files:
        _read_file(os.path.expanduser(path), set(groups), values, depth=0)
    return values


def default_socket(candidates: tuple[str, ...] | None = None) -> str | None:
    """The first compiled-in default socket that exists, as the client would try it."""
    for path in DEFAULT_SOCKETS if candidates is None else candidates:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return path
        except OSError:
            continue
    return None


def _read_file(path: str, groups: set[str], values: dict[str, str], depth: int) -> None:
    try:
        st = os.stat(path)
        if st.st_mode & stat.S_IWOTH:
            log.warning("ignoring world-writable option file %s, as the mysql client does", path)
            return
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:  # missing or unreadable: the client goes on without it
        log.debug("option file %s not read: %s", path, e.strerror)
        return
    group = None
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("!"):
            _include(path, line, groups, values, depth)
        elif line.startswith("["):
            group = line[1:line.find("]")].strip().lower() if "]" in line else None
        elif group in groups:
            key, _, value = line.partition("=")
            key = key.strip().lower().replace("_", "-").removeprefix("loose-")
            if key in KEYS:
                try:
                    values[key] = _value(value)
                except ValueError:
                    log.warning("option file %s line %d: unterminated quote; ignored", path,
                                number)


def _include(path: str, line: str, groups: set[str], values: dict[str, str], depth: int) -> None:
    directive, _, argument = line.partition(" ")
    argument = os.path.join(os.path.dirname(path), argument.strip())
    if depth >= _MAX_DEPTH:
        log.warning("option file %s: includes nested too deep; %s ignored", path, argument)
    elif directive == "!include":
        _read_file(argument, groups, values, depth + 1)
    elif directive == "!includedir":
        try:
            names = sorted(n for n in os.listdir(argument) if n.endswith(".cnf"))
        except OSError:
            return
        for name in names:
            _read_file(os.path.join(argument, name), groups, values, depth + 1)


def _value(text: str) -> str:
    """An option's value: quoted (with escapes) or bare up to a ``#`` comment."""
    text = text.strip()
    if text[:1] in {"'", '"'}:
        quote, out, i = text[0], [], 1
        while i < len(text):
            char = text[i]
            if char == "\\" and i + 1 < len(text):
                out.append(_ESCAPES.get(text[i + 1], "\\" + text[i + 1]))
                i += 2
                continue
            if char == quote:
                return "".join(out)
            out.append(char)
            i += 1
        raise ValueError("unterminated quote")
    return text.split("#", 1)[0].rstrip()
