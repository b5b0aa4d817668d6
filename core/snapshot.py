"""The snapshot step of a rehearsal: what stands in for the host's disk snapshot."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

CP = "/bin/cp"


@dataclass
class SnapshotStep:
    """One of: run *command* (with /bin/sh), copy *copies* (source -> destination), or wait."""

    command: str | None = None
    copies: list[tuple[str, str]] = field(default_factory=list)
    wait: float = 0.0

    def describe(self) -> str:
        if self.command:
            return f"command: {self.command}"
        if self.copies:
            return "copy " + ", ".join(f"{s} -> {d}" for s, d in self.copies)
        return f"wait {self.wait:g} s"

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        error = None
        try:
            if self.command:
                proc = subprocess.run(["/bin/sh", "-c", self.command], stdin=subprocess.DEVNULL,
                                      capture_output=True, text=True)
                if proc.returncode:
                    error = (f"snapshot command exited {proc.returncode}: "
                             f"{(proc.stderr or proc.stdout).strip()[-300:]}")
            for source, dest in self.copies:
                # Sparse and attribute-preserving, like a block snapshot of the same data.
                args = [CP, "-a", "--sparse=always", "--reflink=auto", source, dest]
                if os.path.isdir(source) and os.path.isdir(dest):
                    args[-2:] = [source.rstrip("/") + "/.", dest]
                proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True)
                if proc.returncode:
                    error = f"copy of {source} failed: {proc.stderr.strip()}"
                    break
            if self.wait:
                time.sleep(self.wait)
        except OSError as e:
            error = f"snapshot step failed: {e}"
        return {"ok": error is None, "step": self.describe(),
                "duration": round(time.monotonic() - started, 4), "error": error}
