"""The files every host's install writes for the machine itself: tmpfiles.d and logrotate.

* ``/etc/tmpfiles.d/quiesce.conf`` has systemd create the runtime directory on tmpfs at
  boot, owned by root and private, and keeps ``systemd-tmpfiles --clean`` away from it
  (no age field). The holder creates it too, but a directory that exists from boot with
  the right owner cannot be taken first by another user.
* ``/etc/logrotate.d/quiesce`` rotates the scripts' logs and quiesce's own log. Every
  writer opens the file afresh for each cycle, so a plain rename is safe (no copytruncate).

Several hosts may install them; each host's manifest lists them, and uninstall leaves
them while another host's manifest still does.
"""

from __future__ import annotations

import os

from .hosts import Finding, Host, HostFile, InstallSettings

TMPFILES_PATH = "/etc/tmpfiles.d/quiesce.conf"
LOGROTATE_PATH = "/etc/logrotate.d/quiesce"
NODE_EXPORTER_TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"  # Debian's default


def tmpfiles_line(runtime_dir: str) -> str:
    return f"d {runtime_dir} 0700 root root -\n"


def files(settings: InstallSettings) -> list[HostFile]:
    tmpfiles = ("# Written by `quiesce install`: the holder's runtime directory, on tmpfs.\n"
                + tmpfiles_line(settings.runtime_dir))
    logs = [os.path.join(settings.log_dir, "*.log")]
    if settings.log_file and os.path.dirname(settings.log_file) != settings.log_dir:
        logs.append(settings.log_file)  # one file in two stanzas would make logrotate refuse both
    logrotate = (f"# Written by `quiesce install`.\n{' '.join(logs)} {{\n"
                 "    weekly\n    rotate 8\n    compress\n    delaycompress\n    missingok\n"
                 "    notifempty\n    create 0600 root root\n}\n")
    return [HostFile(TMPFILES_PATH, tmpfiles, 0o644), HostFile(LOGROTATE_PATH, logrotate, 0o644)]


def doctor_findings(host: Host, config) -> list[Finding]:
    """Is the runtime directory declared to systemd, and can the metrics be written?"""
    path = host.path(TMPFILES_PATH)
    try:
        with open(path, encoding="utf-8") as f:
            declared = tmpfiles_line(config.runtime_dir).split() in [
                line.split() for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        declared = False
    findings = [Finding("runtime_dir is in tmpfiles.d", True,
                        f"{path} creates {config.runtime_dir} at boot" if declared else
                        f"{path} does not declare {config.runtime_dir}, so it is created only "
                        f"when the first freeze runs; run `quiesce install {host.name}` again",
                        warning=not declared)]
    if config.metrics_dir:
        ok = os.path.isdir(config.metrics_dir) and os.access(config.metrics_dir, os.W_OK)
        findings.append(Finding("metrics_dir is writable", ok, config.metrics_dir if ok else
                                f"{config.metrics_dir} is not a writable directory; the metrics "
                                f"of the next cycle would be lost"))
    return findings


def metrics_hint(config) -> str | None:
    """`install` offers the metrics when node_exporter's textfile directory is there."""
    if config.metrics_dir or not os.path.isdir(NODE_EXPORTER_TEXTFILE_DIR):
        return None
    return (f"hint: node_exporter's textfile directory exists; add metrics_dir = "
            f"\"{NODE_EXPORTER_TEXTFILE_DIR}\" to {config.path} to export quiesce's metrics")
