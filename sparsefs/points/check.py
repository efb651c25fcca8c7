"""File names of points, damage checks, and the removal of what a killed run left behind.

A point is **damaged** when its file is missing, cannot be opened, or does not
match the manifest (virtual size, backing chain); every point that reads it
(the later deltas of its chain) is damaged with it.  These checks read
metadata only; ``sparsefs checksum --check SPARSEFS-SUMS`` reads the data.
A point whose block-digest file is missing or does not match is not damaged
(its data is intact and restorable); the next backup run recomputes the
digests from the point itself.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

from sparsefs.errors import SparsefsError
from sparsefs.formats import open_source
from sparsefs.points.blocks import check_head
from sparsefs.points.set import BackupSet, Point, id_key


def point_file(disk: str, pid: str, fmt: str) -> str:
    """The point's file, relative to the set: ``NAME/NAME@ID.FMT``."""
    return f"{disk}/{disk}@{pid}.{fmt}"


def blocks_file(disk: str, pid: str) -> str:
    """The point's block-digest file, relative to the set: ``NAME/.NAME@ID.blocks``."""
    return f"{disk}/.{disk}@{pid}.blocks"


def partial_file(disk: str, pid: str, fmt: str) -> str:
    """Where a point is written before it is verified: ``NAME/.NAME@ID.FMT.partial-PID``."""
    return f"{disk}/.{disk}@{pid}.{fmt}.partial-{os.getpid()}"


@dataclass(frozen=True)
class Status:
    """What the checks found for one point.

    Attributes:
        status: "ok" or "damaged".
        problem: why it is damaged (one line), or None.
        blocks_problem: why its block-digest file cannot be used, or None.
    """

    status: str
    problem: str | None = None
    blocks_problem: str | None = None


def point_problem(bset: BackupSet, disk: str, point: Point) -> str | None:
    """Why ``point`` or a point below it is damaged, or None (metadata only).

    The point is opened through the registry with its backing chain (one
    open of each file); every layer must be the file and size the manifest
    records for that point of the chain.
    """
    chain = bset.chain(disk, point.id)
    for p in chain:
        if not os.path.isfile(bset.path(p.file)):
            return f"{bset.path(p.file)}: point file is missing"
    path = bset.path(point.file)
    try:
        source = open_source(path, point.format)
    except (SparsefsError, OSError) as exc:
        return f"{path}: cannot be opened: {exc}"
    try:
        layer: object | None = source
        for p in reversed(chain):
            where = bset.path(p.file)
            if layer is None or os.path.realpath(str(getattr(layer, "path", ""))) != (
                os.path.realpath(where)
            ):
                return f"{path}: its backing chain does not match the manifest at {p.file}"
            size = getattr(layer, "size", None)
            if size != p.size:
                return f"{where}: is {size} bytes, the manifest says {p.size}"
            layer = getattr(layer, "backing", None)
        if layer is not None:
            return f"{bset.path(chain[0].file)}: has a backing file, the manifest says none"
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    return None


def check_set(bset: BackupSet) -> dict[tuple[str, str], Status]:
    """The status of every point of every disk: (disk, id) -> :class:`Status`."""
    out: dict[tuple[str, str], Status] = {}
    for disk, points in bset.disks.items():
        broken: str | None = None  # the damaged point the current chain reads
        for point in points:
            if point.kind == "full":
                broken = None
            if broken is not None:
                problem: str | None = f"depends on damaged point {broken}"
            else:
                try:
                    problem = point_problem(bset, disk, point)
                except SparsefsError as exc:
                    problem = str(exc)
                if problem is not None:
                    broken = point.id
            blocks_problem = None
            try:
                check_head(bset.path(point.blocks), point.digest, point.size)
            except SparsefsError as exc:
                blocks_problem = str(exc)
            out[(disk, point.id)] = Status("damaged" if problem else "ok", problem, blocks_problem)
    return out


_STRAY = (
    r"\.{d}@[0-9TZ-]+\.(raw|qcow2)\.partial-\d+",
    r"\.{d}@[0-9TZ-]+\.blocks\.tmp-\d+",
    r"{d}@[0-9TZ-]+\.(raw|qcow2)",
    r"\.{d}@[0-9TZ-]+\.blocks",
)


def remove_strays(bset: BackupSet, disk: str) -> list[str]:
    """Remove what killed runs left in ``DEST_DIR/NAME/``; return the names removed.

    Only names of our own patterns go: partial points, temporary digest
    files, and point or digest files the manifest does not name whose id is
    newer than every recorded point's (a run killed after its rename and
    before its manifest write).  Call with the set's lock held.
    """
    directory = bset.path(disk)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    d = re.escape(disk)
    patterns = [re.compile(f"^{p.format(d=d)}$") for p in _STRAY]
    points = bset.disks.get(disk, [])
    named = points + bset.retired.get(disk, [])
    known = {os.path.basename(p.file) for p in named} | {os.path.basename(p.blocks) for p in named}
    newest = id_key(points[-1].id) if points else None
    removed = []
    for name in sorted(names):
        if name in known or not any(p.match(name) for p in patterns):
            continue
        pid = name.split("@")[-1].split(".")[0]
        unrecorded = not name.startswith(".") or name.endswith(".blocks")
        # A point (or its digests) the manifest does not name: only one newer than
        # every recorded point is a killed run's; older ones are left alone.
        if unrecorded and newest is not None and id_key(pid) <= newest:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
        removed.append(name)
    return removed
