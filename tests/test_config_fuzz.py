"""Property-based fuzz of the config reader and the CLI (issue 12): whatever bytes the
config file holds, quiesce answers with one line naming the file (and the key, where the
bytes belong to one) and exit 2, or accepts the file; never a traceback."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quiesce import ConfigError
from quiesce.config import load
from quiesce.plugins import load_adapters

from .support.helpers import run

ADAPTERS = load_adapters(load_entrypoints=False)
_WORK = tempfile.TemporaryDirectory(prefix="quiesce-fuzz-")  # removed with the module
#: The path settings of a config, with the last part of the key an error names.
PATH_KEYS = ("runtime_dir", "log_file", "targets.app.path")


def config_bytes(directory: Path, **values: bytes) -> bytes:
    """A valid config under *directory*, with some values replaced by raw TOML bytes."""
    valid = {"runtime_dir": str(directory / "run"), "log_file": str(directory / "q.log"),
             "targets.app.path": str(directory / "app.db")}
    v = {key: values.get(key, json.dumps(value).encode()) for key, value in valid.items()}
    return (b"max_hold = 30\nruntime_dir = " + v["runtime_dir"] + b"\nlog_file = "
            + v["log_file"] + b"\n[targets.app]\nkind = \"sqlite\"\npath = "
            + v["targets.app.path"] + b"\n")


def not_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


#: TOML values no path setting may have: a NUL (escaped or raw), bytes that are not
#: UTF-8, a relative or empty path, a control character, the wrong type. On one line, so
#: the error can name the key that line sets.
BAD_VALUES = st.one_of(
    st.tuples(st.text(max_size=10), st.text(max_size=10)).map(
        lambda parts: json.dumps("/" + parts[0] + "\0" + parts[1]).encode()),
    st.binary(min_size=1, max_size=10).filter(lambda b: b"\n" not in b).map(
        lambda b: b'"/x/' + b + b'"'),
    st.binary(min_size=1, max_size=10).filter(lambda b: not_utf8(b) and b"\n" not in b).map(
        lambda b: b'"/x/' + b + b'"'),
    st.sampled_from([b'"relative/path"', b'""', b"5", b"[1]", b"{a = 1}", b'"/x/\x01"',
                     b"'/x/\x00'", b'"/x/\\u0000"', b'"\\u0000"']),
)
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def write(raw: bytes) -> Path:
    directory = Path(tempfile.mkdtemp(dir=_WORK.name))
    path = directory / "quiesce.toml"
    path.write_bytes(raw)
    path.chmod(0o600)
    return path


def load_or_error(raw: bytes) -> tuple[Path, ConfigError | None]:
    """Load *raw* as a config; anything but a clean load or a ConfigError fails the test."""
    path = write(raw)
    try:
        load(str(path), ADAPTERS)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{path}: "), repr(str(e))
        return path, e
    return path, None


@FUZZ
@given(key=st.sampled_from(PATH_KEYS), value=BAD_VALUES)
def test_a_bad_path_setting_is_one_line_naming_file_and_key(key, value):
    directory = Path(tempfile.mkdtemp(dir=_WORK.name))
    raw = config_bytes(directory, **{key: value})
    path, error = load_or_error(raw)
    if error is None:  # some generated values are valid paths after all
        assert not not_utf8(raw) and b"\0" not in raw and b"\\u0000" not in raw
        return
    assert error.key is not None and error.key.endswith(key.rsplit(".", 1)[-1]), str(error)


@FUZZ
@given(raw=st.one_of(
    st.binary(max_size=400),
    st.tuples(st.integers(0, 300), st.binary(min_size=1, max_size=8)).map(
        lambda cut: config_bytes(Path("/nonexistent/fuzz"))[:cut[0]] + cut[1]
        + config_bytes(Path("/nonexistent/fuzz"))[cut[0] + len(cut[1]):]),
))
def test_any_bytes_load_or_give_one_config_error(raw):
    load_or_error(raw)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=st.sampled_from(["check", "freeze", "thaw"]),
       key=st.sampled_from(PATH_KEYS), value=BAD_VALUES)
def test_cli_answers_a_bad_config_with_one_line_and_exit_2(command, key, value):
    directory = Path(tempfile.mkdtemp(dir=_WORK.name))
    raw = config_bytes(directory, **{key: value})
    path, error = load_or_error(raw)
    if error is None:
        return  # a valid config: the other tests cover what the commands then do
    proc = run(path, command)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert (proc.returncode, proc.stderr) == (2, f"quiesce: error: {error}\n")


@pytest.mark.parametrize("raw, expected", [
    (b"max_hold = 30\nruntime_dir = \"/run/\xff\"\n", r"not UTF-8 text: byte 0xff on line 2"),
    (b'runtime_dir = "/run/q\\u0000"\n', r"runtime_dir: may not contain a NUL"),
    (b'log_file = "/var/log/\x00"\n', r"log_file: not valid TOML: Illegal character"),
    (b'[targets.a]\nkind = "sqlite"\npath = "/x\\u0000.db"\n',
     r"targets.a.path: may not contain a NUL"),
    (b'"a\\nb\\u0000" = 1\n', ": a\\nb\\x00: a key may not contain a NUL"),
    (b"a = " + b"[" * 3000 + b"]" * 3000, "nested too deeply"),
])
def test_examples_of_bytes_that_crashed_the_reader(raw, expected):
    path, error = load_or_error(raw)
    assert error is not None and expected in str(error), str(error)
