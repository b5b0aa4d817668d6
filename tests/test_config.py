"""Config loading: every mistake gets one clear message naming file, target and key."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from quiesce import ConfigError, Target
from quiesce.config import load, parse
from quiesce.plugins import load_adapters

from .support.helpers import QUIESCE, make_sqlite, run, wait_until, write_config


@pytest.fixture
def adapters():
    return load_adapters(load_entrypoints=False)


def test_valid_config_loads_with_defaults_and_overrides(tmp_path, adapters):
    db = make_sqlite(tmp_path / "app.db")
    path = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(db), "timeout": 3}},
                        max_hold=30)
    config = load(str(path), adapters)
    [target] = config.targets
    assert (target.name, target.kind, target.timeout, target.max_hold) == ("app", "sqlite", 3.0, 30.0)
    assert config.runtime_dir == str(tmp_path / "run")


@pytest.mark.parametrize("text, expected", [
    ("max_hold = [", "not valid TOML"),
    ("[targets.a]\nkind = 'nosuchdb'\n", "unknown kind 'nosuchdb'; known kinds: "),
    ("[targets.a]\npath = '/x.db'\n", "targets.a.kind: missing required key 'kind'"),
    ("[targets.a]\nkind = 'sqlite'\n", "targets.a.path: missing required key 'path'"),
    ("[targets.a]\nkind = 'sqlite'\npath = '/x.db'\npaht = 1\n", "targets.a.paht: unknown key 'paht' for kind 'sqlite'; did you mean `path`?"),
    ("[targets.a]\nkind = 'sqlite'\npaht = '/x.db'\n", "targets.a.paht: unknown key 'paht' for kind 'sqlite'; did you mean `path`?"),
    ("[targets.a]\nkind = 'sqlite'\npath = 'rel.db'\n", "targets.a.path: must be an absolute path"),
    ("[targets.a]\nkind = 'sqlite'\npath = 5\n", "targets.a.path: expected str, got 5"),
    ("max_hold = -1\n[targets.a]\nkind = 'sqlite'\npath = '/x.db'\n", "max_hold: expected a number"),
    ("max_hold = nan\n[targets.a]\nkind = 'sqlite'\npath = '/x.db'\n", "max_hold: expected a number"),
    ("timeout = inf\n[targets.a]\nkind = 'sqlite'\npath = '/x.db'\n", "timeout: expected a number"),
    ("colour = 'red'\n[targets.a]\nkind = 'sqlite'\npath = '/x.db'\n", "colour: unknown key"),
    ("max_hodl = 9\n[targets.a]\nkind = 'sqlite'\npath = '/x.db'\n",
     "max_hodl: unknown key 'max_hodl'; did you mean `max_hold`?"),
    ("max_hold = 10\n", "no targets configured"),
    ("[targets.'a b']\nkind = 'sqlite'\n", "targets.a b: a target name may hold"),
])
def test_config_errors_name_file_target_and_key(tmp_path, adapters, text, expected):
    path = tmp_path / "q.toml"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        load(str(path), adapters)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_world_readable_config_is_refused_with_the_fix(tmp_path, adapters):
    path = write_config(tmp_path, {"app": {"kind": "sqlite", "path": "/x.db"}})
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=rf"mode 0644 .* run: chmod 600 {path}"):
        load(str(path), adapters)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a file to another user")
def test_config_owned_by_another_user_is_refused(tmp_path, adapters):
    path = write_config(tmp_path, {"app": {"kind": "sqlite", "path": "/x.db"}})
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        load(str(path), adapters)


def test_secret_file_must_be_private(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    target = Target("db", "redis", {"password_file": str(secret)}, config_file="/etc/q.toml")
    secret.chmod(0o640)
    with pytest.raises(ConfigError, match=r"/etc/q.toml: targets.db.password_file: refusing "
                                          r"password_file /\S+: mode 0640"):
        target.secret("password_file")
    secret.chmod(0o600)
    assert target.secret("password_file") == "s3cret"


def test_a_secret_put_where_its_file_belongs_is_refused_without_echoing_it():
    target = Target("db", "redis", {"password_file": "hunter2"}, config_file="/etc/q.toml")
    with pytest.raises(ConfigError) as info:
        target.secret("password_file")
    assert "hunter2" not in str(info.value)
    assert "must be the absolute path of a file" in str(info.value)


def test_missing_secret_file_is_named(tmp_path):
    target = Target("db", "redis", {"password_file": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="password_file /.*nope does not exist"):
        target.secret("password_file")


def test_cli_reports_config_errors_in_one_line_with_exit_2(tmp_path):
    path = write_config(tmp_path, {"app": {"kind": "sqlite"}})
    proc = run(path, "check")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"quiesce: error: {path}: targets.app.path: missing required key 'path' for kind 'sqlite'"]
    assert "Traceback" not in proc.stderr


def test_cli_refuses_a_missing_config_file(tmp_path):
    proc = run(tmp_path / "absent.toml", "check")
    assert proc.returncode == 2
    assert "config file" in proc.stderr and "does not exist" in proc.stderr


def test_parse_keeps_target_order(tmp_path):
    text = "".join(f"[targets.t{i}]\nkind = 'sqlite'\n" for i in (3, 1, 2))
    assert [t.name for t in parse("q.toml", text).targets] == ["t3", "t1", "t2"]


def _example_blocks(text: str) -> dict[str, str]:
    """Each commented-out ``# [targets.NAME]`` block of the example, uncommented."""
    blocks, current = {}, None
    for line in text.splitlines():
        if line.startswith("# [targets."):
            current = line[2:]
            blocks[current] = [current]
        elif current and line.startswith("# "):
            blocks[current].append(line[2:])
        else:
            current = None
    return {name: "\n".join(lines) + "\n" for name, lines in blocks.items()}


def test_example_config_has_a_commented_example_of_every_bundled_kind_that_validates(
        tmp_path, adapters):
    from quiesce.config import EXAMPLE, validate_targets
    from quiesce.plugins import DEFAULT_ADAPTERS
    active = parse("example", EXAMPLE)
    assert [t.kind for t in active.targets] == ["sqlite"]  # the rest stay commented out
    head = EXAMPLE.split("\n[targets.")[0] + "\n"  # the global settings
    kinds = set()
    for block in _example_blocks(EXAMPLE).values():
        config = parse("example", head + block)
        validate_targets(config, adapters)  # raises on any key the adapter does not accept
        kinds.update(t.kind for t in config.targets)
    assert kinds | {"sqlite"} == set(DEFAULT_ADAPTERS)


def test_cli_example_config_prints_the_example():
    from quiesce.config import EXAMPLE
    assert run(None, "example-config").stdout == EXAMPLE


def test_a_missing_config_says_how_to_create_one(tmp_path):
    path = tmp_path / "quiesce.toml"
    proc = run(path, "check")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"quiesce: error: {path}: the config file does not exist; create one with: quiesce "
        f"example-config > {path} && chmod 600 {path}")


@pytest.mark.root
def test_a_config_the_user_cannot_read_is_a_config_error_exit_2():
    """Root's 0600 file in a readable directory, read by another user (PermissionError)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root")
        pytest.skip("needs root to run quiesce as another user")
    directory = tempfile.mkdtemp(prefix="quiesce-cfg-")  # not under root's private tmp dir
    try:
        os.chmod(directory, 0o755)
        path = write_config(Path(directory), {"app": {"kind": "sqlite", "path": "/x.db"}})
        proc = subprocess.run(QUIESCE + ["--config", str(path), "check"], user=65534,
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(directory)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"quiesce: error: {path}: cannot read the config file: "
                                   f"permission denied (run quiesce as root or as the "
                                   f"file's owner)")


# ------------------------------------------------------------------ quiesce.log


def test_buffered_log_records_are_written_in_the_order_they_were_made(tmp_path):
    """Threads of the holder log concurrently; the file must read in time order."""
    import logging
    from quiesce import logs
    log_file = tmp_path / "q.log"
    write_out = logs.buffer_until_released(str(log_file))
    logger = logging.getLogger("quiesce.test")
    for created, text in ((30.0, "third"), (10.0, "first"), (20.0, "second")):
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, text, (), None)
        record.created = created
        logger.handle(record)
    write_out()
    assert [line.rsplit(" ", 1)[-1] for line in log_file.read_text().splitlines()] == [
        "first", "second", "third"]


def test_a_failed_phase_is_logged_as_a_warning_not_info(tmp_path):
    config = write_config(tmp_path, {"app": {"kind": "sqlite", "path": str(tmp_path / "no.db")}})
    proc = run(config, "check")
    assert proc.returncode == 1
    log = (tmp_path / "log" / "quiesce.log").read_text()
    assert " WARNING quiesce.phases: check app (sqlite): failed in " in log
    assert " WARNING quiesce.cli: check: not ready: app failed the check" in log
    assert "WARNING" not in proc.stderr  # the report says it once, not the console again


def test_a_cycles_log_lines_are_in_time_order(tmp_path):
    """freeze, then thaw through the holder: the holder writes its lines after the
    release, so the commands must not have written later ones before them."""
    from datetime import datetime
    config = write_config(tmp_path, {"app": {"kind": "sqlite",
                                             "path": str(make_sqlite(tmp_path / "a.db"))}})
    try:
        assert run(config, "freeze").returncode == 0
    finally:
        assert run(config, "thaw").returncode == 0
    log = tmp_path / "log" / "quiesce.log"
    assert wait_until(lambda: "released by thaw" in log.read_text(), timeout=10)
    lines = log.read_text().splitlines()
    times = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") for line in lines]
    assert times == sorted(times), "\n".join(lines)
    assert any("quiesce app (sqlite): ok" in line for line in lines)
