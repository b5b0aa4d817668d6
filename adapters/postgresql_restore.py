"""PostgreSQL backup labels: written at thaw, installed into a restored copy.

A backup-mode thaw (:mod:`quiesce.adapters.postgresql`) ends the backup and gets its label
back; :func:`write_label_files` keeps it in ``label_dir`` with a restore note. The label
is usable only with all the WAL from the backup's start through its end, which the
snapshot does not hold (the end is written after it). :func:`restore_prepare` installs a
label into a restored, not yet started data directory, after following the WAL record
chain from start to end as recovery will (:class:`_WalReader`): a label without its WAL
makes the server refuse to start. ``quiesce restore-prepare postgresql`` (registered by the
adapter's ``register_commands``, defined here) is its command line.

Standard library only: restoring needs no driver and no server.
"""

from __future__ import annotations

import mmap
import os
import re
import shlex
import struct
import time
from dataclasses import dataclass
from typing import Any

from quiesce import TargetError

# ---------------------------------------------------------------------------- at thaw

def safe_name(text: str) -> str:
    """*text* usable in a file name and a backup label."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "target"


def write_label_files(name: str, facts: dict[str, Any], label_dir: str, wait_for_archive: bool,
                      lsn: str, labelfile: bytes, spcmapfile: bytes) -> dict[str, Any]:
    """Keep a stopped backup's label and tablespace map byte for byte in *label_dir*, with a
    restore note; *facts* are the hold's (label, start, version). Returns thaw's facts."""
    stamp = facts["started_at"].replace("-", "").replace(":", "")
    base = os.path.join(label_dir, f"{safe_name(name)}-{stamp}")
    for n in range(1, 100):
        candidate = base if n == 1 else f"{base}-{n}"
        if not os.path.exists(candidate + ".backup_label"):
            base = candidate
            break
    label_path, map_path, note_path = (base + ".backup_label", base + ".tablespace_map",
                                       base + ".restore.txt")
    try:
        label = parse_label(labelfile)
        start_file = label.start_file
        stop_file = wal_file_name(label.timeline, lsn_to_int(lsn) // label.segment_size,
                                  label.segment_size)
    except ValueError:
        start_file = stop_file = "?"
    note = _restore_note(name, facts, lsn, start_file, stop_file, label_path, map_path,
                         bool(spcmapfile))
    try:
        for path, data in ((label_path, labelfile), (map_path, spcmapfile),
                           (note_path, note.encode())):
            _write_new(path, data)
        _fsync_dir(label_dir)
    except OSError as e:
        raise TargetError(f"{name}: the backup stopped at {lsn}, but writing its label to "
                          f"{label_dir} failed ({e}); without the label this snapshot can only "
                          f"be restored crash-consistently; fix label_dir") from e
    return {"stop_lsn": lsn, "label_file": label_path, "tablespace_map": map_path,
            "restore_note": note_path, "wal_needed": f"{start_file} through {stop_file}",
            "wait_for_archive": wait_for_archive}


def _write_new(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore_note(name: str, facts: dict, lsn: str, start_file: str, stop_file: str,
                  label_path: str, map_path: str, has_map: bool) -> str:
    map_arg = f" --tablespace-map {map_path}" if has_map else ""
    return f"""\
PostgreSQL backup taken by quiesce for target {name!r}
LABEL: {facts['label']}
SERVER VERSION: {facts['version']}{' (standby)' if facts.get('standby') else ''}
START WAL LOCATION: {facts['start_lsn']} (file {start_file})
STOP WAL LOCATION: {lsn} (file {stop_file})

This label belongs to the disk snapshot taken while the backup ran (started
{facts['started_at']}). It is usable only together with ALL the WAL from
{start_file} through {stop_file}: the end of the backup was written to WAL
after the snapshot, so that WAL is not in the snapshot; it is in the WAL archive.

To restore with the label (point-in-time recovery, or a snapshot that was not atomic):
  1. Restore the snapshot. Do not start PostgreSQL yet.
  2. Run: quiesce restore-prepare postgresql --datadir DATADIR --label {label_path}{map_arg} --wal-source ARCHIVE_DIR
     It checks that the WAL is there, writes backup_label{' and tablespace_map' if has_map else ''}
     byte for byte, creates recovery.signal and sets restore_command.
  3. Start PostgreSQL; it replays WAL to the end of the backup and beyond.

Without that WAL, do NOT install the label: PostgreSQL would refuse to start
("WAL ends before end of online backup"). Start the restored snapshot as it is
instead; if the snapshot was atomic, crash recovery makes it consistent.
"""


# ---------------------------------------------------------------------------- restore

class RestoreRefused(TargetError):
    """restore_prepare will not install the label; the message says why and what to do."""


@dataclass(frozen=True)
class BackupLabel:
    start_lsn: int
    start_file: str
    checkpoint_lsn: int
    timeline: int
    backup_from: str
    label: str
    start_time: str
    segment_size: int


def lsn_to_int(text: str) -> int:
    hi, sep, lo = text.strip().partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def wal_file_name(timeline: int, segno: int, segment_size: int) -> str:
    per_id = 0x100000000 // segment_size
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def parse_label(data: bytes) -> BackupLabel:
    """The fields of a backup_label; the WAL segment size is inferred from its first line."""
    text = data.decode("utf-8", "replace")
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    m = re.fullmatch(r"([0-9A-Fa-f]+/[0-9A-Fa-f]+) \(file ([0-9A-F]{24})\)",
                     fields.get("START WAL LOCATION", "").strip())
    if not m or "START TIMELINE" not in fields or "CHECKPOINT LOCATION" not in fields:
        raise ValueError("it lacks START WAL LOCATION, CHECKPOINT LOCATION or START TIMELINE")
    start, start_file = lsn_to_int(m.group(1)), m.group(2)
    timeline = int(fields["START TIMELINE"])
    if int(start_file[:8], 16) != timeline:
        raise ValueError("its START WAL LOCATION file and START TIMELINE disagree")
    for shift in range(20, 31):  # initdb allows 1 MB … 1 GB, powers of two
        size = 1 << shift
        if wal_file_name(timeline, start // size, size) == start_file:
            break
    else:
        raise ValueError("its START WAL LOCATION does not match its file name")
    return BackupLabel(start, start_file, lsn_to_int(fields["CHECKPOINT LOCATION"]), timeline,
                       fields.get("BACKUP FROM", "primary").strip(), fields.get("LABEL", ""),
                       fields.get("START TIME", ""), size)


def restore_prepare(datadir: str | os.PathLike, label_file: str | os.PathLike,
                    spcmap_file: str | os.PathLike | None = None, *,
                    wal_source: str | os.PathLike | None = None, force: bool = False,
                    stop_lsn: str | None = None) -> dict[str, Any]:
    """Install a backup label into a restored (not yet started) data directory.

    Writes ``backup_label`` (and ``tablespace_map`` when *spcmap_file* is not empty) byte
    for byte, and with *wal_source* creates ``recovery.signal`` and a ``restore_command``
    copying from it. Refuses (:class:`RestoreRefused`) unless every WAL segment from the
    label's START WAL LOCATION through the end of the backup is in *wal_source* or in the
    data directory's ``pg_wal`` and holds the WAL records up to the backup's end. The end
    (stop LSN) comes from *stop_lsn*, else the backup history file in the WAL, else the
    restore note written next to the label. *force* only allows replacing an existing
    ``backup_label``, ``tablespace_map`` or ``recovery.signal``; the WAL check always runs.
    """
    datadir = os.path.abspath(datadir)
    label_file = os.fspath(label_file)
    label_bytes, spcmap_bytes = _read_label(datadir, label_file, spcmap_file)
    try:
        label = parse_label(label_bytes)
    except ValueError as e:
        raise RestoreRefused(f"{label_file} is not a PostgreSQL backup label: {e}") from None
    if wal_source is not None:
        wal_source = os.path.abspath(os.fspath(wal_source))
        if not os.path.isdir(wal_source):
            raise RestoreRefused(f"wal_source {wal_source} is not a directory")
    running = _running_postmaster(datadir)
    if running:
        raise RestoreRefused(f"a server is running on {datadir} (postmaster.pid names pid "
                             f"{running}); restore-prepare is for a restored copy that has not "
                             f"been started")
    outputs = {"backup_label": label_bytes}
    if spcmap_bytes:
        outputs["tablespace_map"] = spcmap_bytes
    if wal_source is not None:
        outputs["recovery.signal"] = b""
    existing = [name for name in outputs if os.path.exists(os.path.join(datadir, name))]
    if existing and not force:
        raise RestoreRefused(f"{datadir} already has {', '.join(existing)}; it was prepared "
                             f"before (or started): pass force to replace")
    wal_dirs = [d for d in (wal_source, os.path.join(datadir, "pg_wal")) if d]
    stop = _stop_lsn(label, label_file, wal_dirs, stop_lsn)
    needed, used = _check_wal(datadir, label, stop, wal_dirs)
    written, restore_command = _install(datadir, outputs, wal_source)
    removed = _remove_stale_pidfile(datadir)
    _fsync_dir(datadir)
    return {"datadir": datadir, "written": written, "restore_command": restore_command,
            "start_lsn": lsn_text(label.start_lsn), "stop_lsn": lsn_text(stop),
            "wal": f"{needed[0]} through {needed[-1]}", "wal_from": sorted(used),
            "removed_stale_postmaster_pid": removed,
            "standby_signal": os.path.exists(os.path.join(datadir, "standby.signal"))}


def _read_label(datadir: str, label_file: str,
                spcmap_file: str | os.PathLike | None) -> tuple[bytes, bytes]:
    """The label's and the tablespace map's bytes, from a real data directory."""
    if not os.path.isfile(os.path.join(datadir, "PG_VERSION")):
        raise RestoreRefused(f"{datadir} is not a PostgreSQL data directory (no PG_VERSION)")
    try:
        with open(label_file, "rb") as f:
            label_bytes = f.read()
        spcmap_bytes = b""
        if spcmap_file is not None:
            with open(os.fspath(spcmap_file), "rb") as f:
                spcmap_bytes = f.read()
    except OSError as e:
        raise RestoreRefused(f"cannot read the backup label: {e}") from None
    return label_bytes, spcmap_bytes


def _check_wal(datadir: str, label: BackupLabel, stop: int,
               wal_dirs: list[str]) -> tuple[list[str], set[str]]:
    """The WAL segment names the backup needs, and the files that held them; refuses
    unless every one is there and the record chain reaches the backup's end."""
    if stop < label.start_lsn:
        raise RestoreRefused(f"the stop LSN {lsn_text(stop)} lies before the label's start "
                             f"{lsn_text(label.start_lsn)}: they belong to different backups")
    first, last = label.start_lsn // label.segment_size, (stop - 1) // label.segment_size
    needed = [wal_file_name(label.timeline, s, label.segment_size) for s in range(first, last + 1)]
    where = " nor ".join(wal_dirs)
    missing = [n for n in needed if not any(os.path.isfile(os.path.join(d, n)) for d in wal_dirs)]
    if missing:
        raise RestoreRefused(
            f"the WAL this backup needs is not available: {len(missing)} of the {len(needed)} "
            f"segment(s) {needed[0]} through {needed[-1]} are in neither {where} (first "
            f"missing: {missing[0]}); supply the WAL archive as wal_source, or restore the "
            f"snapshot without the label")
    try:
        sysid = _system_identifier(datadir)
    except OSError as e:
        raise RestoreRefused(f"cannot read {datadir}/global/pg_control: {e}") from None
    reader = _WalReader(wal_dirs, label.timeline, label.segment_size, sysid)
    return needed, reader.verify(label, stop)


def _install(datadir: str, outputs: dict[str, bytes],
             wal_source: str | None) -> tuple[list[str], str | None]:
    """Write the checked files into *datadir*; with *wal_source*, a restore_command too."""
    written = []
    for name, data in outputs.items():
        _replace_file(os.path.join(datadir, name), data)
        written.append(os.path.join(datadir, name))
    restore_command = None
    if wal_source is not None:
        restore_command = _restore_command(wal_source)
        with open(os.path.join(datadir, "postgresql.auto.conf"), "a", encoding="utf-8") as f:
            _give_to_dir_owner(f.fileno(), datadir)
            f.write(f"# added by quiesce restore-prepare\nrestore_command = "
                    f"'{_guc_escape(restore_command)}'\n")
            f.flush()
            os.fsync(f.fileno())
    return written, restore_command


def _stop_lsn(label: BackupLabel, label_file: str, wal_dirs: list[str],
              explicit: str | None) -> int:
    if explicit is not None:
        try:
            return lsn_to_int(explicit)
        except ValueError:
            raise RestoreRefused(f"stop_lsn {explicit!r} is not an LSN like 0/2000100") from None
    # A primary writes a backup history file into the WAL stream when the backup stops.
    history = f"{label.start_file}.{label.start_lsn % label.segment_size:08X}.backup"
    candidates = [os.path.join(d, history) for d in wal_dirs]
    base = label_file[:-len(".backup_label")] if label_file.endswith(".backup_label") else label_file
    candidates.append(base + ".restore.txt")
    for path in candidates:
        try:
            with open(path, "rb") as f:
                text = f.read(65536).decode("utf-8", "replace")
        except OSError:
            continue
        fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
        start = re.match(r"\s*([0-9A-Fa-f]+/[0-9A-Fa-f]+)", fields.get("START WAL LOCATION", ""))
        stop = re.match(r"\s*([0-9A-Fa-f]+/[0-9A-Fa-f]+)", fields.get("STOP WAL LOCATION", ""))
        if (start and stop and lsn_to_int(start.group(1)) == label.start_lsn
                and fields.get("LABEL", "").strip() == label.label.strip()):
            return lsn_to_int(stop.group(1))
    raise RestoreRefused(
        f"cannot tell where the backup ended: no backup history file {history} in "
        f"{' or '.join(wal_dirs)} and no restore note {base}.restore.txt; pass the stop LSN "
        f"(reported by quiesce thaw) explicitly")


def _system_identifier(datadir: str) -> int:
    with open(os.path.join(datadir, "global", "pg_control"), "rb") as f:
        return struct.unpack("=Q", f.read(8))[0]  # ControlFileData starts with it, in every version


def _running_postmaster(datadir: str) -> int | None:
    """The pid of a server that really runs on *datadir*, per its postmaster.pid."""
    try:
        with open(os.path.join(datadir, "postmaster.pid"), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        pid = int(lines[0])
        named = lines[1] if len(lines) > 1 else ""
    except (OSError, ValueError, IndexError):
        return None
    if os.path.realpath(named) != os.path.realpath(datadir):
        return None  # a copy: the file describes the server the snapshot was taken from
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            comm = f.read().strip()
    except OSError:
        return None
    return pid if comm.startswith(("postgres", "postmaster")) else None


def _remove_stale_pidfile(datadir: str) -> bool:
    """A restored snapshot carries the original server's postmaster.pid; it would make a
    server on the copy refuse to start while a process with that pid runs on this host."""
    path = os.path.join(datadir, "postmaster.pid")
    if os.path.exists(path) and not _running_postmaster(datadir):
        os.unlink(path)
        return True
    return False


def _replace_file(path: str, data: bytes) -> None:
    """Write *path* atomically, owned like its directory (the server must read it)."""
    tmp = path + ".quiesce-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _give_to_dir_owner(fd, os.path.dirname(path))
        _write_all(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _give_to_dir_owner(fd: int, directory: str) -> None:
    st = os.stat(directory)
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
        os.fchown(fd, st.st_uid, st.st_gid)


def _restore_command(wal_source: str) -> str:
    return f"cp {shlex.quote(os.path.join(wal_source, ''))}%f \"%p\""


def _guc_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "''")


class _WalGap(Exception):
    pass


# XLogPageHeaderData: magic u16, info u16, tli u32, pageaddr u64, rem_len u32 (+pad) = 24;
# the long header of a segment's first page adds sysid u64, seg_size u32, blcksz u32 = 40.
_PAGE = struct.Struct("=HHIQI")
_LONG = struct.Struct("=QII")
_SHORT_PHD, _LONG_PHD = 24, 40
_XLP_LONG_HEADER = 0x0002
# XLogRecord: tot_len u32, xid u32, prev u64, info u8, rmid u8, pad 2, crc u32 = 24 bytes.
_RECORD = struct.Struct("=IIQBBxxI")
_RM_XLOG_ID, _XLOG_SWITCH, _XLOG_BACKUP_END = 0, 0x40, 0x50


class _WalReader:
    """Follow the WAL record chain from a backup's start to its end, as recovery will.

    Checks each segment's long page header (this cluster's system identifier, the segment's
    own address and timeline), every page header crossed (a recycled or never-written page
    carries another address), each record's back-link, and finally the end-of-backup record
    (with its CRC) on a primary. A segment name that merely exists proves nothing: the
    snapshot's pg_wal holds the segment that was being written, and recycled segments
    renamed to future names.
    """

    def __init__(self, dirs: list[str], timeline: int, segment_size: int, sysid: int):
        self.dirs, self.timeline, self.segsize, self.sysid = dirs, timeline, segment_size, sysid
        self.blcksz = 8192
        self._cache: dict[int, tuple[mmap.mmap, str]] = {}
        self.used: set[str] = set()

    def _segment(self, segno: int) -> mmap.mmap:
        if segno in self._cache:
            return self._cache[segno][0]
        name = wal_file_name(self.timeline, segno, self.segsize)
        problems = []
        for d in self.dirs:
            path = os.path.join(d, name)
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size != self.segsize:
                        problems.append(f"{path}: {size} bytes, not a {self.segsize}-byte "
                                        f"WAL segment")
                        continue
                    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except FileNotFoundError:
                continue
            except OSError as e:
                problems.append(f"{path}: {e.strerror}")
                continue
            problem = self._check_segment(data, segno)
            if problem:
                problems.append(f"{path}: {problem}")
                continue
            self._cache = {k: v for k, v in self._cache.items() if k >= segno - 1}
            self._cache[segno] = (data, path)
            self.used.add(path)
            return data
        raise _WalGap(f"segment {name} is " + ("; ".join(problems) if problems else
                                               f"in neither {' nor '.join(self.dirs)}"))

    def _check_segment(self, data, segno: int) -> str | None:
        _magic, info, tli, pageaddr, _rem = _PAGE.unpack_from(data, 0)
        sysid, segsize, blcksz = _LONG.unpack_from(data, _SHORT_PHD)
        if not info & _XLP_LONG_HEADER or pageaddr != segno * self.segsize:
            return "a recycled or never-written segment (its header names another address)"
        if sysid != self.sysid:
            return "WAL of another cluster (its system identifier differs from pg_control's)"
        if segsize != self.segsize or blcksz not in (1024, 2048, 4096, 8192, 16384, 32768, 65536):
            return "an unexpected segment or page size in its header"
        if tli != self.timeline:
            return f"timeline {tli}, not {self.timeline}"
        self.blcksz = blcksz
        return None

    def _payload_start(self, pos: int) -> int:
        """*pos* moved past a page header if it sits on a page boundary (checking it)."""
        if pos % self.blcksz:
            return pos
        data = self._segment(pos // self.segsize)
        magic, info, tli, pageaddr, _rem = _PAGE.unpack_from(data, pos % self.segsize)
        if pageaddr != pos:
            raise _WalGap(f"the WAL ends at {lsn_text(pos)}: the page there was not written "
                          f"(segment {wal_file_name(self.timeline, pos // self.segsize, self.segsize)} "
                          f"is incomplete)")
        return pos + (_LONG_PHD if pos % self.segsize == 0 else _SHORT_PHD)

    def _read(self, pos: int, n: int, *, keep: bool) -> tuple[bytes, int]:
        """*n* record bytes from *pos*, skipping page headers; returns (bytes, end LSN)."""
        out = []
        while n:
            pos = self._payload_start(pos)
            take = min(n, self.blcksz - pos % self.blcksz)
            if keep:
                off = pos % self.segsize
                out.append(self._segment(pos // self.segsize)[off:off + take])
            pos += take
            n -= take
        return b"".join(out), pos

    def verify(self, label: BackupLabel, stop: int) -> set[str]:
        try:
            self._walk(label, stop)
        except _WalGap as e:
            raise RestoreRefused(
                f"the WAL this backup needs is not available: {e}; the backup needs WAL from "
                f"{lsn_text(label.start_lsn)} through {lsn_text(stop)}; supply the WAL archive "
                f"as wal_source, or restore the snapshot without the label") from None
        return self.used

    def _walk(self, label: BackupLabel, stop: int) -> None:
        self._segment(label.start_lsn // self.segsize)  # learns the page size
        pos, prev = label.start_lsn, None
        while True:
            pos = self._payload_start(pos)
            head, _ = self._read(pos, _RECORD.size, keep=True)
            tot_len, _xid, xl_prev, info, rmid, _crc = _RECORD.unpack(head)
            if tot_len < _RECORD.size or (prev is not None and xl_prev != prev):
                raise _WalGap(f"the WAL ends at {lsn_text(pos)} in "
                              f"{self._cache[pos // self.segsize][1]} (no valid record there)")
            is_end = rmid == _RM_XLOG_ID and info & 0xF0 == _XLOG_BACKUP_END
            record, end = self._read(pos, tot_len, keep=is_end)
            aligned = (end + 7) & ~7
            if label.backup_from == "standby":
                if aligned >= stop:  # a standby writes no end record; it ends at stop
                    return
            elif (is_end and aligned == stop and _crc32c_record(record)
                  and record[-8:] == struct.pack("=Q", label.start_lsn)):
                return
            if aligned > stop:
                raise _WalGap(f"no end-of-backup record at {lsn_text(stop)}: the WAL found "
                              f"does not belong to this backup")
            prev = pos
            if rmid == _RM_XLOG_ID and info & 0xF0 == _XLOG_SWITCH:
                pos = (pos // self.segsize + 1) * self.segsize
            else:
                pos = aligned


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def _crc32c_record(record: bytes) -> bool:
    """A WAL record's CRC-32C: over the data after the header, then the header up to xl_crc."""
    crc = 0xFFFFFFFF
    for byte in record[_RECORD.size:] + record[:20]:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF == struct.unpack_from("=I", record, 20)[0]


# ---------------------------------------------------------------------------- command

def add_restore_prepare(cli: Any) -> None:
    """Add ``quiesce restore-prepare postgresql`` to the command group *cli*.

    The kind stays an argument (the command predates adapters' own commands, and scripts
    spell it so); PostgreSQL is its only choice."""
    import click

    from quiesce.cli import command, emit_result, json_option

    @cli.command("restore-prepare")
    @click.argument("kind", type=click.Choice(["postgresql"]))
    @click.option("--datadir", required=True, type=click.Path(exists=True, file_okay=False),
                  help="The restored data directory (server not started).")
    @click.option("--label", "label_file", required=True,
                  type=click.Path(exists=True, dir_okay=False),
                  help="The .backup_label file thaw wrote to label_dir.")
    @click.option("--tablespace-map", type=click.Path(exists=True, dir_okay=False),
                  help="The .tablespace_map file, if the backup has tablespaces.")
    @click.option("--wal-source", type=click.Path(exists=True, file_okay=False),
                  help="A WAL archive directory; adds recovery.signal and a restore_command.")
    @click.option("--stop-lsn", help="The backup's stop LSN, if no history file or note has it.")
    @click.option("--force", is_flag=True, help="Replace an existing backup_label/recovery.signal.")
    @json_option
    @command
    def restore_prepare_command(kind: str, datadir: str, label_file: str, tablespace_map,
                                wal_source, stop_lsn, force: bool, as_json: bool) -> None:
        """Make a restored copy start from a backup-mode snapshot.

        Installs the backup label next to the data, with recovery.signal when a WAL
        archive is given. Refuses, with the reason, when the WAL the backup needs is not
        there: a label without its WAL makes the server refuse to start.
        """
        started = time.monotonic()
        result = restore_prepare(datadir, label_file, tablespace_map, wal_source=wal_source,
                                 force=force, stop_lsn=stop_lsn)
        emit_result("restore-prepare", result, as_json, started)
