"""The Azure Backup extension's own rules for the files it reads, in the order it applies
them: the plugin host conf, the plugin JSON (with its defaults and type quirks), then the
scripts. Each failure is the extension's status code (:data:`CODES`).

Every rule follows the extension's source (ScriptRunner.py, PluginHost.py, handle.py),
not its documentation where the two differ; see docs/azure.md. *path* maps a path on the
machine to where it is under the host's root; *owner* is the owner the extension demands.
"""

from __future__ import annotations

import configparser
import json
import os
import pwd
from dataclasses import dataclass, field
from typing import Any, Callable

from . import Verdict

CONFIG_JSON = "/etc/azure/VMSnapshotScriptPluginConfig.json"
HOST_CONF = "/etc/azure/VMSnapshotPluginHost.conf"
WORKLOAD_CONF = "/etc/azure/workload.conf"
MAX_TIMEOUT = 1800
WORKLOADS = ("oracle", "mysql", "mariadb", "postgres")
#: The plugin host conf the extension ships in its own directory (main/).
SHIPPED_HOST_CONF = """[pre_post]
timeoutInSeconds: 1800
numberOfPlugins: 1
pluginName0: ScriptRunner
pluginPath0: /etc/azure
pluginConfigPath0: /etc/azure/VMSnapshotScriptPluginConfig.json
"""

CODES = {
    0: "Success", 300: "FailedPrepostPreScriptFailed", 301: "FailedPrepostPostScriptFailed",
    302: "FailedPrepostPreScriptNotFound", 303: "FailedPrepostPostScriptNotFound",
    304: "FailedPrepostPluginhostConfigParsing", 305: "FailedPrepostPluginConfigParsing",
    306: "FailedPrepostPreScriptPermissionError", 307: "FailedPrepostPostScriptPermissionError",
    308: "FailedPrepostPreScriptTimeout", 309: "FailedPrepostPostScriptTimeout",
    313: "FailedPrepostPluginhostConfigNotFound",
    314: "FailedPrepostPluginhostConfigPermissionError",
    316: "FailedPrepostPluginConfigNotFound", 317: "FailedPrepostPluginConfigPermissionError",
    310: "FailedPrepostPluginhostPreTimeout", 311: "FailedPrepostPluginhostPostTimeout",
    121: "FailedRetryableFsFreezeFailed", 2: "error",
}
#: Validation failures after which the host takes a file-system consistent backup and
#: records no health code (the JSON framework is simply not in effect).
NOT_CONFIGURED = {304, 305, 313, 314, 316}


def _digits(st: os.stat_result) -> str:
    return oct(st.st_mode)[-3:]  # the host's own test: last three octal digits


def _owner(st: os.stat_result) -> str:
    try:
        return pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        return str(st.st_uid)


@dataclass
class PluginConfig:
    """The JSON as the host reads it (with its defaults and quirks)."""

    pre: str
    post: str
    pre_params: list[str] = field(default_factory=list)
    post_params: list[str] = field(default_factory=list)
    timeout: float = 10
    poll: int = 3
    pre_retries: int = 0
    post_retries: int = 0
    continue_on_failure: Any = True
    fs_freeze: Any = True

    @property
    def freeze_enabled(self) -> bool:
        return not (self.fs_freeze == False)  # noqa: E712 - the host compares == False


def verdict(code: int, message: str) -> Verdict:
    return Verdict(code, CODES.get(code, "error"), message)


def read_plugin_config(data: dict, plugin_config_path: str,
                       max_timeout: float) -> Verdict | PluginConfig:
    """The JSON's keys as the host reads them, with its defaults and its type quirks."""
    # The host reads timeoutInSeconds first; a bool is a number to its min() (True = 1).
    timeout = data.get("timeoutInSeconds", 10)
    if not isinstance(timeout, (int, float)):
        return verdict(304, f"timeoutInSeconds is {timeout!r}; the host needs a number")
    try:
        config = PluginConfig(pre=str(data["preScriptLocation"]),
                              post=str(data["postScriptLocation"]))
    except KeyError as e:
        return verdict(305, f"{plugin_config_path} lacks the mandatory key {e}")
    config.timeout = min(timeout, max_timeout)
    if "ScriptsExecutionPollTimeSeconds" in data:
        try:
            poll = int(data["ScriptsExecutionPollTimeSeconds"])
        except ValueError:  # caught by the host's get_config
            return verdict(305, "ScriptsExecutionPollTimeSeconds is not a number")
        except TypeError:  # not caught there: PluginHost turns it into 304
            return verdict(304, "ScriptsExecutionPollTimeSeconds has the wrong JSON type")
        if 1 <= poll <= 5:
            config.poll = poll  # out of range is silently ignored by the host
    try:  # each element str()-ed; a bare string is iterated per character, as by the host
        config.pre_params = [str(p) for p in data.get("preScriptParams", [])]
        config.post_params = [str(p) for p in data.get("postScriptParams", [])]
    except TypeError:
        return verdict(304, "preScriptParams/postScriptParams must be JSON arrays")
    # Wrong types here pass validation and break the host only when a script fails;
    # they are kept as they are so the rehearsal can show exactly that (see quirks()).
    config.pre_retries = data.get("preScriptNoOfRetries", 0)
    config.post_retries = data.get("postScriptNoOfRetries", 0)
    config.continue_on_failure = data.get("continueBackupOnFailure", True)
    config.fs_freeze = data.get("fsFreezeEnabled", True)
    return config


def host_conf(path: Callable[[str], str], owner: str,
              extension_dir: str | None) -> Verdict | tuple[str, float]:
    """VMSnapshotPluginHost.conf: where the plugin JSON is, and the longest timeout."""
    host_conf = path(HOST_CONF)
    if not os.path.isfile(host_conf):
        host_conf = os.path.join(extension_dir, "main", "VMSnapshotPluginHost.conf") \
            if extension_dir else None
    if host_conf is None:  # doctor: the extension ships a valid one in its directory
        return CONFIG_JSON, MAX_TIMEOUT
    if not os.path.isfile(host_conf):
        return verdict(313, f"neither {HOST_CONF} nor the extension's own "
                            f"main/VMSnapshotPluginHost.conf exists")
    st = os.stat(host_conf)
    perm = _digits(st)
    if perm[1] not in "04" or perm[2] not in "04" or _owner(st) != owner:
        return verdict(314, f"{host_conf} has mode {perm} owner {_owner(st)}; the host "
                            f"wants no group/other write and owner {owner}")
    try:
        parser = configparser.ConfigParser()
        parser.read(host_conf)
        section = parser["pre_post"]
        if int(section.get("numberOfPlugins", "0")) != 1 or \
                section.get("pluginName0") != "ScriptRunner":
            return verdict(304, f"{host_conf} loads plugins other than one ScriptRunner; "
                                f"quiesce cannot predict what they do")
        return section["pluginConfigPath0"], min(int(section["timeoutInSeconds"]), MAX_TIMEOUT)
    except (KeyError, ValueError, configparser.Error) as e:
        return verdict(304, f"{host_conf} cannot be parsed: {e}")


def plugin_json(path: Callable[[str], str], owner: str, plugin_config_path: str) -> Verdict | dict:
    """The plugin JSON, if the host would read it: present, owned and moded as it demands."""
    json_path = path(plugin_config_path)
    if not os.path.isfile(json_path):
        return verdict(316, f"{plugin_config_path} does not exist: pre/post scripts are "
                            f"not configured; run `quiesce install azure`")
    st = os.stat(json_path)
    perm = _digits(st)
    if int(perm[0]) % 2 == 1 or perm[1] != "0" or perm[2] != "0" or _owner(st) != owner:
        return verdict(317, f"{plugin_config_path} has mode {perm} owner {_owner(st)}; the "
                            f"host wants owner {owner}, no owner-execute and no "
                            f"group/other bits (chmod 600)")
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:  # bad JSON, a BOM, trailing commas
        return verdict(305, f"{plugin_config_path} is not valid JSON for the host: {e}")
    if not isinstance(data, dict):
        return verdict(304, f"{plugin_config_path} must hold a JSON object")
    return data


def scripts_verdict(path: Callable[[str], str], owner: str, config: PluginConfig) -> Verdict:
    """Both scripts present, owned and moded as the host demands."""
    for script, missing, denied in ((config.pre, 302, 306), (config.post, 303, 307)):
        file = path(script)
        if not os.path.isfile(file):
            return verdict(missing, f"{script} does not exist")
        st = os.stat(file)
        perm = _digits(st)
        if perm[1] != "0" or perm[2] != "0" or _owner(st) != owner:
            return verdict(denied, f"{script} has mode {perm} owner {_owner(st)}; the host "
                                   f"wants owner {owner} and no group/other bits (chmod 700)")
    return verdict(0, f"the host will run the pre- and post-script (timeout "
                      f"{config.timeout:g} s, poll every {config.poll} s)")


def quirks(config: PluginConfig) -> list[str]:
    """Values the host accepts but mishandles."""
    found = []
    if not isinstance(config.continue_on_failure, int):  # bool is an int: True & 0 works
        found.append(f"continueBackupOnFailure is {config.continue_on_failure!r}, not a JSON "
                     f"boolean: the host crashes (code 2, no post-script) when a script fails")
    for key, value in (("preScriptNoOfRetries", config.pre_retries),
                       ("postScriptNoOfRetries", config.post_retries)):
        if isinstance(value, bool) or not isinstance(value, int):
            found.append(f"{key} is {value!r}, not an integer: when the script fails the "
                         f"host's worker dies and it waits 1800 s (code 310/311)")
    if not isinstance(config.fs_freeze, bool):
        found.append(f"fsFreezeEnabled is {config.fs_freeze!r}, not a JSON boolean: the host "
                     f"treats anything but false as true")
    return found


def workload_conflict(path: Callable[[str], str]) -> str | None:
    """workload.conf naming a workload: the host then ignores our JSON entirely."""
    try:
        parser = configparser.ConfigParser()
        parser.read(path(WORKLOAD_CONF))
        workload = parser.get("workload", "workload_name", fallback="").strip()
    except configparser.Error:
        return None
    if workload not in WORKLOADS:
        return None
    return (f"{WORKLOAD_CONF} sets workload_name = {workload}: the host then runs its own "
            f"'enhanced' {workload} scripts and ignores {CONFIG_JSON} entirely. Remove or "
            f"empty workload_name to let quiesce's scripts run")
