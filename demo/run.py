"""`make demo`: one whole Azure backup cycle on an embedded SQLite database.

No root and no server needed. In a temporary directory it creates a database with a
writer committing as fast as it can, installs the Azure Backup files under a staging
root, rehearses a backup with a copy of the data directory as the snapshot, then opens
the copy, checks its integrity and that every write committed before the freeze is in
it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUIESCE = [sys.executable, "-m", "quiesce"]

WRITER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
log = open(sys.argv[2], "a", buffering=1)
while True:
    cur = conn.execute("INSERT INTO writes (at) VALUES (?)", (time.time(),))
    log.write(f"{cur.lastrowid} {time.time()}\\n")
    time.sleep(0.002)
"""


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def quiesce(config: Path, *args: str, show: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(QUIESCE + ["--config", str(config), *args], text=True,
                          capture_output=True)
    if show:
        print((proc.stdout + proc.stderr).rstrip())
    return proc


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="quiesce-demo-") as tmp:
        base = Path(tmp)
        data, snapshot, root, logs = (base / d for d in ("data", "snapshot", "root", "log"))
        data.mkdir()
        snapshot.mkdir()
        db = data / "app.db"
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE writes (id INTEGER PRIMARY KEY, at REAL)")
        conn.commit()
        conn.close()
        # tmpfs for the runtime directory where there is one, as on a real machine (/run).
        shm = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else base
        runtime = Path(tempfile.mkdtemp(prefix="quiesce-demo-run-", dir=shm))
        config = base / "quiesce.toml"
        config.write_text(f'max_hold = 120\nruntime_dir = "{runtime}/run"\n'
                          f'log_file = "{logs}/quiesce.log"\n\n'
                          f'[targets.app]\nkind = "sqlite"\npath = "{db}"\n')
        config.chmod(0o600)
        print(f"demo directory: {base}\nconfig ({config}):\n{config.read_text()}")

        commits = base / "commits.log"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(commits)])
        try:
            time.sleep(0.5)
            step("quiesce install azure (staged under the demo root)")
            quiesce(config, "install", "azure", "--root", str(root), "--log-dir", str(logs))
            step("quiesce doctor azure: what the host will report")
            quiesce(config, "doctor", "azure", "--root", str(root))
            step("quiesce rehearse azure: the host's part, with a copy of the data as snapshot")
            rehearsal = quiesce(config, "rehearse", "azure", "--root", str(root), "--json",
                                "--copy", str(data), str(snapshot), show=False)
            report = json.loads(rehearsal.stdout)
            for event in report["timeline"]:
                print(f"{event['t']:+8.3f}s  {event['event']}")
            for hold in report["holds"]:
                print(f"held: {hold['target']} ({hold['kind']}) for {hold['seconds']:.3f} s, "
                      f"released by {hold['released_by']}: {hold['status']}")
        finally:
            writer.kill()
            writer.wait()

        step("checking the snapshot")
        state = json.loads((runtime / "run" / "state.json").read_text())
        held_since = state["held_since"]
        committed = [line.split() for line in commits.read_text().splitlines()]
        before = [int(i) for i, at in committed if float(at) < held_since]
        copy = sqlite3.connect(snapshot / "app.db")
        integrity = copy.execute("PRAGMA integrity_check").fetchone()[0]
        ids = {row[0] for row in copy.execute("SELECT id FROM writes")}
        after = [int(i) for i, at in committed if float(at) > state["released_at"]]
        missing = [i for i in before if i not in ids]
        print(f"integrity_check: {integrity}")
        print(f"writes committed before the freeze: {len(before)}, in the snapshot: "
              f"{len(before) - len(missing)}, missing: {len(missing)}")
        print(f"the snapshot holds {len(ids)} writes; the writer waited while the database was "
              f"held and committed {len(after)} more after thaw")
        ok = integrity == "ok" and not missing and report["code"] == 0
        print(f"\nhost result: {report['code']} {report['message']}")
        print("demo passed" if ok else "demo FAILED")
        subprocess.run(["rm", "-rf", str(runtime)])
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
