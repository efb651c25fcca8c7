"""A backup set: the manifest of every disk's points, its lock, point names and chains.

Layout of a set in DEST_DIR (file names relative to it)::

    SPARSEFS-SET.json          the manifest (below)
    SPARSEFS-SUMS              one sparsefs1 line per point ("DIGEST  NAME/NAME@ID.raw"),
                               for 'cd DEST_DIR && sparsefs checksum --check SPARSEFS-SUMS'
    .SPARSEFS-SET.lock         flock'ed by every run that changes the set
    .SPARSEFS-SET.readers      flock'ed shared by mounts and restores of the set, for
                               as long as they read; prune changes a point's file in
                               place only when it can lock it exclusively
    NAME/NAME@ID.raw           a full point (sparse raw)
    NAME/NAME@ID.qcow2         a delta point (backing file: the previous point, same
                               directory, relative name, explicit backing format), or a
                               full point written as qcow2 (no backing file)
    NAME/.NAME@ID.blocks       the point's block digests (sparsefs.points.blocks)

The manifest::

    {"format": "sparsefs-set", "version": 1,
     "disks": {"NAME": {"points": [POINT, ...],        # oldest first
                        "retired": [POINT, ...]}}}     # only while a prune folds them

    POINT = {"id": "20261203T190500Z", "time": "2026-12-03T19:05:00Z",
             "kind": "full" | "delta", "file": "NAME/NAME@ID.raw", "format": "raw" | "qcow2",
             "size": virtual bytes, "data_bytes": bytes the point file stores,
             "digest": "sparsefs1:...", "blocks": "NAME/.NAME@ID.blocks",
             "backing": file of the point below, or null, "source": the image's path,
             "changes": "full" | "digest" | "bitmap", "changed_bytes": bytes written}

``retired`` points are no longer points (``list``, ``mount``, ``restore`` and
SPARSEFS-SUMS leave them out), but the oldest kept point of their chain still
reads them: prune is folding them into it (:mod:`sparsefs.points.absorb`).
The chain of a point runs through them.

Ids are the UTC time of the run to the second; a second run in the same
second gets ``-2``, ``-3``, ...  A point is named by its id, a unique prefix of
it, or ``latest``.

Every change of the manifest (and SPARSEFS-SUMS, which follows it) is
atomic: temp file, fsync, rename, fsync of the directory.  A run that changes
the set holds an exclusive ``flock`` on the lock file; readers (list,
restore) need none, since the manifest only ever names complete, verified
points.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from sparsefs.errors import SparsefsError

MANIFEST = "SPARSEFS-SET.json"
SUMS = "SPARSEFS-SUMS"
LOCK = ".SPARSEFS-SET.lock"
READERS = ".SPARSEFS-SET.readers"
FORMAT = "sparsefs-set"
VERSION = 1
LATEST = "latest"
_ID = re.compile(r"^\d{8}T\d{6}Z(-\d+)?$")
# A SPARSEFS-SUMS line of a point: "DIGEST  NAME/NAME@ID.raw|qcow2".
_POINT_LINE = re.compile(r"^\S+  ([^/]+)/\1@\d{8}T\d{6}Z(-\d+)?\.(raw|qcow2)$")


class SetError(SparsefsError):
    """The set cannot be used as asked (one line, naming the file)."""


@dataclass(frozen=True)
class Point:
    """One point of a disk, as the manifest records it (see the module docstring)."""

    id: str
    time: str
    kind: str
    file: str
    format: str
    size: int
    data_bytes: int
    digest: str
    blocks: str
    backing: str | None = None
    source: str | None = None
    changes: str = "full"
    changed_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The manifest's form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Point:
        """Read a manifest entry.

        Raises:
            SetError: a field is missing or of the wrong type.
        """
        try:
            point = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError:
            raise SetError(f"{where}: a point entry lacks fields") from None
        if not isinstance(point.id, str) or not _ID.match(point.id):
            raise SetError(f"{where}: a point has an invalid id {point.id!r}")
        if point.kind not in ("full", "delta") or point.format not in ("raw", "qcow2"):
            raise SetError(f"{where}: point {point.id} has an invalid kind or format")
        if not isinstance(point.size, int) or not isinstance(point.file, str):
            raise SetError(f"{where}: point {point.id} has an invalid size or file")
        return point


def point_id(now: float, taken: set[str]) -> str:
    """The id for a run at ``now`` (seconds since the epoch), unique among ``taken``."""
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def id_time(pid: str) -> str:
    """ISO-8601 UTC of an id: ``20261203T190500Z`` -> ``2026-12-03T19:05:00Z``."""
    return f"{pid[0:4]}-{pid[4:6]}-{pid[6:8]}T{pid[9:11]}:{pid[11:13]}:{pid[13:15]}Z"


def check_disk_name(name: str) -> None:
    """Refuse disk names that cannot stand in the set's file names.

    Raises:
        SetError: empty, ``.``-first, or with ``/``, ``\\``, ``@`` or control characters.
    """
    if (
        not name
        or name.startswith(".")
        or any(c in name for c in "/\\")
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    ):
        raise SetError(f"{name!r}: cannot be a disk name in a backup set")


def fsync_dir(path: str) -> None:
    """fsync a directory (after a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` by ``text``: temp file, fsync, rename, fsync of the directory."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


@dataclass
class BackupSet:
    """A backup set in directory ``root``: open with :meth:`open`, close (or ``with``) after.

    Attributes:
        root: DEST_DIR.
        disks: disk name -> its points, oldest first (the manifest as read).
        retired: disk name -> points a prune is folding into the point above them.
    """

    root: str
    disks: dict[str, list[Point]] = field(default_factory=dict)
    retired: dict[str, list[Point]] = field(default_factory=dict)
    _lock_fd: int = -1
    _readers_fd: int = -1

    @classmethod
    def open(
        cls, root: str, *, lock: bool = False, create: bool = False, reading: bool = False
    ) -> BackupSet:
        """Open the set in ``root``.

        Args:
            root: DEST_DIR (must exist).
            lock: take the set's exclusive lock (every run that changes it);
                refused at once when another run holds it.
            create: a directory without a manifest becomes an empty set (with
                ``lock``, its empty manifest is written at once, before any
                point file exists); else it is refused.
            reading: hold the readers' lock shared until :meth:`close` (or
                :meth:`take_reading`): a prune then never changes a file in
                place while this reads the set.

        Raises:
            SetError: no directory, no set (without ``create``), a damaged
                manifest, a directory holding points but no manifest (a lost
                manifest is never taken for an empty set), or the lock is held.
        """
        if not os.path.isdir(root):
            raise SetError(f"{root}: destination directory does not exist")
        bset = cls(root)
        if reading:
            bset._readers_fd = _share_readers(os.path.join(root, READERS))
        if lock:
            bset._lock_fd = _take_lock(os.path.join(root, LOCK))
            _remove_temporaries(root)
        try:
            path = os.path.join(root, MANIFEST)
            if create and not os.path.exists(path):
                _refuse_lost_manifest(root)
            bset.disks, bset.retired = _read_manifest(path, create)
            if create and lock and not os.path.exists(path):
                bset._save()
        except BaseException:
            bset.close()
            raise
        return bset

    def close(self) -> None:
        """Release the locks; idempotent."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self._readers_fd >= 0:
            os.close(self._readers_fd)
            self._readers_fd = -1

    def take_reading(self) -> int:
        """The readers' lock (a file descriptor, -1: none), now the caller's to close."""
        fd, self._readers_fd = self._readers_fd, -1
        return fd

    def lock_out_readers(self) -> int | None:
        """The readers' lock taken exclusively (a file descriptor to close), or None when
        a mount or a restore is reading the set (or the lock cannot be had)."""
        try:
            fd = os.open(self.path(READERS), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    def __enter__(self) -> BackupSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------

    def path(self, rel: str) -> str:
        """The path of a file named relative to the set."""
        return os.path.join(self.root, rel)

    def points(self, disk: str) -> list[Point]:
        """The points of ``disk``, oldest first.

        Raises:
            SetError: no such disk.
        """
        if disk not in self.disks:
            known = ", ".join(sorted(self.disks)) or "none"
            raise SetError(f"{self.path(MANIFEST)}: no disk named {disk!r} (disks: {known})")
        return self.disks[disk]

    def latest(self, disk: str) -> Point | None:
        """The newest point of ``disk``, or None (no such disk, or no point)."""
        points = self.disks.get(disk)
        return points[-1] if points else None

    def resolve(self, disk: str, name: str = LATEST) -> Point:
        """The point ``name`` names: an id, a unique prefix of one, or ``latest``.

        Raises:
            SetError: no such disk or point, or the prefix is ambiguous.
        """
        points = self.points(disk)
        if not points:
            raise SetError(f"{self.path(MANIFEST)}: disk {disk!r} has no points")
        if name == LATEST:
            return points[-1]
        exact = [p for p in points if p.id == name]
        found = exact or [p for p in points if p.id.startswith(name)]
        if len(found) == 1 and name:
            return found[0]
        what = "matches several points" if found else "names no point"
        raise SetError(f"{self.path(MANIFEST)}: {name!r} {what} of disk {disk!r}")

    def chain(self, disk: str, pid: str) -> list[Point]:
        """The points that point ``pid`` reads, its full point first, itself last.

        Raises:
            SetError: no such point, or its chain does not start with a full point.
        """
        points = self.points(disk)
        if self.retired.get(disk):
            points = sorted(points + self.retired[disk], key=lambda p: id_key(p.id))
        index = next((i for i, p in enumerate(points) if p.id == pid), None)
        if index is None:
            raise SetError(f"{self.path(MANIFEST)}: disk {disk!r} has no point {pid!r}")
        start = index
        while points[start].kind != "full":
            start -= 1
            if start < 0:
                raise SetError(f"{self.path(MANIFEST)}: point {pid} has no full point below it")
        return points[start : index + 1]

    def chain_files(self, disk: str, pid: str) -> list[str]:
        """The files point ``pid`` reads, full point first, as paths (see :meth:`chain`)."""
        return [self.path(p.file) for p in self.chain(disk, pid)]

    # -- changing (hold the lock) --------------------------------------------------

    def add_point(self, disk: str, point: Point) -> None:
        """Record a new (verified, renamed into place) point as ``disk``'s newest, atomically."""
        self._need_lock()
        self.disks.setdefault(disk, []).append(point)
        self._save()

    def remove_points(self, disk: str, ids: list[str], updated: tuple[Point, ...] = ()) -> None:
        """Drop points (retired ones too) from the manifest and record ``updated`` entries
        (by id) in their place, atomically (the files are the caller's to remove)."""
        self._need_lock()
        new = {p.id: p for p in updated}
        keep = [new.get(p.id, p) for p in self.points(disk) if p.id not in ids]
        retired = [p for p in self.retired.pop(disk, []) if p.id not in ids]
        if retired:
            self.retired[disk] = retired
        if keep:
            self.disks[disk] = keep
        else:
            del self.disks[disk]
        self._save()

    def retire(self, disk: str, ids: list[str]) -> None:
        """Make points retired (no longer points; see the module docstring), atomically."""
        self._need_lock()
        moved = [p for p in self.points(disk) if p.id in ids]
        self.disks[disk] = [p for p in self.points(disk) if p.id not in ids]
        self.retired[disk] = sorted(self.retired.get(disk, []) + moved, key=lambda p: id_key(p.id))
        self._save()

    def new_id(self, disk: str, now: float | None = None) -> str:
        """An id for a new point of ``disk`` made now."""
        taken = {p.id for p in self.disks.get(disk, [])}
        return point_id(time.time() if now is None else now, taken)

    def _need_lock(self) -> None:
        if self._lock_fd < 0:
            raise SetError(f"{self.root}: the set must be opened with its lock to change it")

    def _save(self) -> None:
        disks: dict[str, dict[str, Any]] = {
            name: {"points": [p.as_dict() for p in pts]} for name, pts in self.disks.items()
        }
        for name, pts in self.retired.items():
            if pts and name in disks:
                disks[name]["retired"] = [p.as_dict() for p in pts]
        doc = {"format": FORMAT, "version": VERSION, "disks": disks}
        write_atomic(self.path(MANIFEST), json.dumps(doc, indent=2, sort_keys=True) + "\n")
        self._save_sums()

    def _save_sums(self) -> None:
        """Rewrite SPARSEFS-SUMS: every point's line; lines not of a point stay as they are."""
        path = self.path(SUMS)
        kept: list[str] = []
        with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
            kept = [line.rstrip("\n") for line in f if line.strip()]
        kept = [line for line in kept if not _POINT_LINE.match(line)]
        lines = kept + [
            f"{p.digest}  {p.file}" for name in sorted(self.disks) for p in self.disks[name]
        ]
        if lines or os.path.exists(path):
            write_atomic(path, "".join(line + "\n" for line in lines))


_TEMPORARY = re.compile(rf"^({re.escape(MANIFEST)}|{re.escape(SUMS)}|XXH128SUMS)\.tmp-\d+$")


def id_key(pid: str) -> tuple[str, int]:
    """Sort key of a point id: its time, then its same-second suffix (``-2`` < ``-10``)."""
    base, _, n = pid.partition("-")
    return base, int(n) if n.isdigit() else 1


def _refuse_lost_manifest(root: str) -> None:
    """Raise when a directory without a manifest holds point files (the manifest was lost)."""
    for name in os.listdir(root):
        sub = os.path.join(root, name)
        if not os.path.isdir(sub) or name.startswith("."):
            continue
        pattern = re.compile(rf"^{re.escape(name)}@\d{{8}}T\d{{6}}Z(-\d+)?\.(raw|qcow2)$")
        if any(pattern.match(entry) for entry in os.listdir(sub)):
            raise SetError(
                f"{os.path.join(root, MANIFEST)}: is missing, yet {sub} holds points; put the "
                "manifest back (or move the points away) before the next run"
            )


def _remove_temporaries(root: str) -> None:
    """Remove the temporary manifest files a killed run left (only our names; lock held)."""
    for name in os.listdir(root):
        if _TEMPORARY.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(root, name))


def _share_readers(path: str) -> int:
    """The readers' lock held shared (waits for a prune folding points in place), or -1
    where it cannot be had (a read-only set: nothing can change it then)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return -1
    return fd


def _take_lock(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise SetError(f"{path}: another sparsefs run is changing this backup set") from None
        raise SetError(f"{path}: cannot lock the backup set: {exc.strerror}") from None
    return fd


Disks = dict[str, list[Point]]


def _read_manifest(path: str, create: bool) -> tuple[Disks, Disks]:
    """The manifest's points and retired points, by disk."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if create:
            return {}, {}
        raise SetError(f"{path}: no backup set here (no manifest)") from None
    except OSError as exc:
        raise SetError(f"{path}: cannot read the manifest: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except ValueError:
        raise SetError(f"{path}: the manifest is damaged (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SetError(f"{path}: not a sparsefs backup set manifest")
    if doc.get("version") != VERSION:
        raise SetError(f"{path}: manifest version {doc.get('version')!r} is not supported")
    disks: dict[str, list[Point]] = {}
    retired: dict[str, list[Point]] = {}
    raw_disks = doc.get("disks")
    if not isinstance(raw_disks, dict):
        raise SetError(f"{path}: the manifest is damaged (no disks)")
    for name, entry in raw_disks.items():
        check_disk_name(name)
        raw_points = entry.get("points") if isinstance(entry, dict) else None
        if not isinstance(raw_points, list):
            raise SetError(f"{path}: the manifest is damaged (disk {name!r} has no points)")
        disks[name] = [Point.from_dict(p if isinstance(p, dict) else {}, path) for p in raw_points]
        raw_retired = entry.get("retired", [])
        if not isinstance(raw_retired, list):
            raise SetError(f"{path}: the manifest is damaged (disk {name!r}: retired points)")
        if raw_retired:
            retired[name] = [
                Point.from_dict(p if isinstance(p, dict) else {}, path) for p in raw_retired
            ]
    return disks, retired
