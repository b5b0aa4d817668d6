"""MongoDB: a target's settings, the client, and the driver's errors in one line.

:func:`settings` reads and checks every setting (validate calls it; so does every hook).
:func:`connected` opens a client for exactly the configured server, every wait bounded by
the target's timeout; :func:`run` runs an admin command and turns a driver error into a
one-line :class:`~quiesce.TargetError` that says what to do (:func:`translate`). Nothing
here ever prints the URI: it may hold a password.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from quiesce import Target, TargetError, import_driver

MODES = ("journal", "lock")
UNAUTHORIZED = 13
COMMAND_NOT_FOUND = 59
APPNAME = "quiesce"
#: Without uri or uri_file: where mongosh connects with no options (a stock mongod.conf
#: binds 127.0.0.1:27017).
DEFAULT_URI = "mongodb://127.0.0.1:27017/"


# -- settings ------------------------------------------------------------------------


def uri_hosts(uri: str) -> str:
    """The host list of a MongoDB URI, without scheme, credentials or options."""
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    rest = rest.rsplit("@", 1)[-1]  # credentials first: an unescaped '/' may be in them
    return re.split(r"[/?]", rest, maxsplit=1)[0]


def scrub(text: str) -> str:
    """Remove credentials from anything that may quote a URI."""
    return re.sub(r"(mongodb(?:\+srv)?://)\S*@", r"\1***@", text)


def _check_uri(target: Target, key: str, uri: str, *, inline: bool) -> None:
    if not uri.startswith("mongodb://"):
        hint = (" mongodb+srv:// names a whole cluster; the fsync lock is per server, so "
                "name the one mongod (or mongos) with mongodb://host:port"
                if uri.startswith("mongodb+srv://") else "")
        raise target.error(key, f"expected a mongodb://host:port URI.{hint}")
    if inline and re.match(r"mongodb://[^@/]*:[^@/]*@", uri):
        raise target.error(key, "this URI holds a password: put it in a file readable only "
                                "by root (chmod 600) and name that file with uri_file instead")
    hosts = uri_hosts(uri)
    if not hosts or "," in hosts:
        raise target.error(key, f"name exactly one host:port (got {hosts or 'none'!r}): the "
                                f"fsync lock is per server, and quiesce talks to that server "
                                f"directly (directConnection)")


@dataclass(frozen=True)
class Settings:
    """A target's settings, read and checked."""

    mode: str
    allow_primary: bool
    stop_balancer: bool
    uri: str                # may hold a password (from uri_file): never print it
    tls: dict[str, Any]     # MongoClient's TLS keyword arguments (may hold a key's password)
    where: str              # "MongoDB host:port (target NAME)", for messages

    def __repr__(self) -> str:  # never show the URI or the key's password
        return f"Settings(mode={self.mode!r}, where={self.where!r})"


def settings(target: Target) -> Settings:
    """Read (and check) every setting. Used by validate and again by each hook."""
    uri = target.option("uri", str, default=None)
    uri_file = target.private_file("uri_file", default=None)
    if uri is not None and uri_file is not None:
        raise target.error("uri_file", "set one of uri_file (a 0600 file holding the URI, for "
                                       "URIs with a password) or uri, not both")
    if uri is not None:
        _check_uri(target, "uri", uri, inline=True)
    elif uri_file is not None:
        uri = target.secret("uri_file")
        _check_uri(target, "uri_file", uri, inline=False)
    uri = uri if uri is not None else DEFAULT_URI
    mode = target.option("mode", str, default="journal", choices=MODES)
    allow_primary = target.option("allow_primary", bool, default=False)
    stop_balancer = target.option("stop_balancer", bool, default=False)
    return Settings(mode, allow_primary, stop_balancer, uri, _tls(target),
                    f"MongoDB {uri_hosts(uri)} (target {target.name})")


def _tls(target: Target) -> dict[str, Any]:
    tls: dict[str, Any] = {}
    enabled = target.option("tls", bool, default=None)
    if enabled is not None:
        tls["tls"] = enabled
    ca = target.option("tls_ca_file", str, default=None)
    if ca is not None and not os.path.isfile(ca):
        raise target.error("tls_ca_file", f"{ca} does not exist")
    key_file = target.private_file("tls_certificate_key_file", default=None)  # a private key
    for option, value in (("tlsCAFile", ca), ("tlsCertificateKeyFile", key_file)):
        if value is not None:
            tls[option] = value
    password = target.secret("tls_certificate_key_file_password_file", default=None)
    if password is not None:
        tls["tlsCertificateKeyFilePassword"] = password
    return tls


def endpoint(target: Target) -> str:
    return settings(target).where


# -- connection ------------------------------------------------------------------------


def driver():
    return import_driver("pymongo", "mongodb", "errors")


def open_client(target: Target):
    """A client for exactly the configured server; every wait bounded by target.timeout."""
    pymongo = driver()
    ms = max(1, int(target.timeout * 1000))
    kwargs: dict[str, Any] = {
        "directConnection": True,  # the lock is per server: never let a URI pick another
        "appname": APPNAME,
        "serverSelectionTimeoutMS": ms, "connectTimeoutMS": ms, "socketTimeoutMS": ms,
        "retryWrites": False, "retryReads": False,  # nothing is ever sent twice
    }
    if pymongo.version_tuple >= (4, 7):
        kwargs["serverMonitoringMode"] = "poll"  # short-lived client: no streaming monitor
    s = settings(target)
    try:
        return pymongo.MongoClient(s.uri, **kwargs, **s.tls)
    except (pymongo.errors.PyMongoError, ValueError) as e:  # ValueError: a malformed URI
        raise TargetError(f"cannot use the URI of target {target.name}: {scrub(str(e))}; "
                          f"fix uri/uri_file or the tls_* settings") from None


@contextmanager
def connected(target: Target) -> Iterator[Any]:
    client = open_client(target)
    try:
        yield client
    finally:
        client.close()


def reason(error: Exception) -> str:
    """The useful part of a driver error, without the topology dump or credentials."""
    pymongo = driver()
    if isinstance(error, pymongo.errors.OperationFailure):
        details = error.details or {}
        text = f"{details.get('errmsg') or error} (code {error.code})"
    else:
        text = str(error).split(", Timeout: ")[0].split(", Topology Description")[0]
    return scrub(text)


def translate(target: Target, doing: str, error: Exception) -> TargetError:
    """A driver error as a one-line TargetError that says what to do."""
    errors = driver().errors
    where = endpoint(target)
    if isinstance(error, errors.ServerSelectionTimeoutError):
        return TargetError(f"cannot reach {where} within {target.timeout:g} s while {doing}: "
                           f"{reason(error)}; check that it runs and the uri/tls settings")
    if isinstance(error, errors.NetworkTimeout):
        return TargetError(f"no reply from {where} within {target.timeout:g} s while {doing} "
                           f"({reason(error)}); raise the target's timeout or find what "
                           f"stalls the server")
    if isinstance(error, errors.ConnectionFailure):
        return TargetError(f"lost the connection to {where} while {doing}: {reason(error)}")
    if isinstance(error, errors.OperationFailure) and error.code == UNAUTHORIZED:
        return TargetError(f"not authorized for {doing} on {where}; run `quiesce check` for "
                           f"the role to create")
    return TargetError(f"{doing} failed on {where}: {reason(error)}")


def run(target: Target, client, doing: str, command: dict) -> dict:
    """Run an admin command; driver errors become one-line TargetErrors."""
    try:
        return client.admin.command(command)
    except driver().errors.PyMongoError as e:
        raise translate(target, doing, e) from None


def cmd(name: str, **args: Any) -> dict:
    return {name: 1, **args}  # dicts keep order: the command name goes first
