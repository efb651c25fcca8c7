"""The files a mount presents: one raw file per image (``NAME.raw``) and per
readable internal snapshot (``NAME@SNAPSHOT.raw``), opened and validated
before anything is mounted; or, for a backup set's directory, one raw file per
point (``NAME@ID.raw``) and the newest point of each disk (``NAME.raw``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from sparsefs.cli.common import (
    image_stem,
    raw_name,
    usable_in_file_name,
)
from sparsefs.errors import SparsefsError
from sparsefs.extents import SparseSource
from sparsefs.formats import open_source
from sparsefs.formats.qcow2 import Qcow2Image
from sparsefs.options import OpenOptions
from sparsefs.points.check import check_set
from sparsefs.points.set import MANIFEST, BackupSet, Point

log = logging.getLogger("sparsefs")


@dataclass
class MountSet:
    """The files of a mount, by name, and what must be closed afterwards.

    ``damaged`` lists the snapshots left out because they cannot be read, as
    (file name, one-line message naming image and snapshot); a snapshot table
    that cannot be read at all is one entry named ``STEM@*.raw``.
    """

    files: dict[str, SparseSource] = field(default_factory=dict)
    mtime_ns: dict[str, int] = field(default_factory=dict)
    images: list[SparseSource] = field(default_factory=list)
    damaged: list[tuple[str, str]] = field(default_factory=list)
    locks: list[int] = field(default_factory=list)  # held while mounted (a set's readers' lock)

    def close(self) -> None:
        for image in self.images:
            close = getattr(image, "close", None)
            if close is not None:
                close()
        self.images.clear()
        for fd in self.locks:
            os.close(fd)
        self.locks.clear()


MAX_FILE_NAME_BYTES = 255


def snapshot_file_names(stem: str, snapshots: Sequence[tuple[str, str]]) -> list[str]:
    """``STEM@LABEL.raw`` for each (name, id) of an image's snapshots, in table order.

    LABEL is the snapshot's name, or its id when the name cannot serve: not
    usable in a file name (empty, ``/``, control characters, too long), shared
    by several snapshots, or equal to another snapshot's id.  So LABEL is always
    the key ``qemu-img convert -l LABEL`` resolves to this very snapshot (qemu
    looks ids up before names).  A damaged table (duplicate or unusable ids)
    gets ``snapshot-N`` (N the position in the table, from 1) where needed.
    """

    def fits(label: str) -> bool:
        name = f"{stem}@{label}.raw"
        return usable_in_file_name(label) and len(name.encode()) <= MAX_FILE_NAME_BYTES

    names = [name for name, _ in snapshots]
    ids = [snap_id for _, snap_id in snapshots]
    labels = []
    for index, (name, snap_id) in enumerate(snapshots):
        other_ids = ids[:index] + ids[index + 1 :]
        if fits(name) and names.count(name) == 1 and name not in other_ids:
            labels.append(name)
        else:
            labels.append(snap_id)
    out = []
    for index, label in enumerate(labels):
        if not fits(label) or labels.count(label) > 1:
            label = f"snapshot-{index + 1}"
        out.append(f"{stem}@{label}.raw")
    return out


def open_mount_set(
    images: list[str], options: OpenOptions, *, snapshots: bool = True, fmt: str | None = None
) -> MountSet:
    """Open every image (and its snapshots) and name their files.

    Each image is opened through the format registry: as ``fmt`` when given,
    else by its magic.  Only qcow2 images have internal snapshots.

    A damaged snapshot (invalid L1 table, or an unreadable snapshot table)
    costs only itself: it is logged as a one-line warning, listed in
    ``MountSet.damaged``, and the active disk and the other snapshots are
    served.  Without ``snapshots`` the snapshot table is never read.

    Raises:
        SparsefsError: an image cannot be opened, or two files get one name.
    """
    mset = MountSet()
    try:
        for path in images:
            image = open_source(path, fmt, options)
            mset.images.append(image)
            mtime = os.stat(path).st_mtime_ns
            entries: list[tuple[str, SparseSource]] = [(raw_name(path), image)]
            if snapshots and isinstance(image, Qcow2Image):
                problem = image.snapshot_table_problem
                if problem is not None:
                    skipped = f"{image_stem(path)}@*.raw"
                    mset.damaged.append((skipped, f"{problem}; no snapshot is served"))
                names = snapshot_file_names(
                    image_stem(path), [(snap.name, snap.id_str) for snap in image.snapshots]
                )
                for snap, name in zip(image.snapshots, names, strict=True):
                    try:
                        entries.append((name, image.open_snapshot(snap)))
                    except SparsefsError as exc:
                        mset.damaged.append((name, f"{exc}; skipped {name}"))
            for name, source in entries:
                if name in mset.files:
                    raise SparsefsError(
                        f"{path}: its file name {name} is already taken by another image"
                    )
                mset.files[name] = source
                mset.mtime_ns[name] = mtime
    except BaseException:
        mset.close()
        raise
    for _, message in mset.damaged:
        log.warning("%s", message)
    return mset


def is_backup_set(path: str) -> bool:
    """True when ``path`` is a directory holding a backup set's manifest."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def open_set_mount(root: str, options: OpenOptions) -> MountSet:
    """Every point of every disk of the backup set in ``root``, as ``NAME@ID.raw``.

    ``NAME.raw`` is the disk's newest point.  A chain is opened once, at its
    newest readable point, and every point below is that chain's layer (each
    reads as its own point, chain and all).  Damaged points, and the points
    depending on them, are left out with a one-line warning each (as damaged
    snapshots are), ``NAME.raw`` too when the newest point is one of them.

    Raises:
        SparsefsError: the set cannot be read, or a point cannot be opened.
    """
    mset = MountSet()
    try:
        with BackupSet.open(root, reading=True) as bset:
            fd = bset.take_reading()  # no prune changes a file in place while mounted
            if fd >= 0:
                mset.locks.append(fd)
            statuses = check_set(bset)
            for disk in sorted(bset.disks):
                points = bset.disks[disk]
                good = [p for p in points if statuses[(disk, p.id)].status == "ok"]
                for p in points:
                    problem = statuses[(disk, p.id)].problem
                    if problem is not None:
                        name = f"{disk}@{p.id}.raw"
                        mset.damaged.append((name, f"{disk}@{p.id}: {problem}; skipped {name}"))
                for chain in _chains(good):
                    _add_chain(mset, bset, disk, chain, options)
                if points and points[-1] in good:
                    mset.files[f"{disk}.raw"] = mset.files[f"{disk}@{points[-1].id}.raw"]
                    mset.mtime_ns[f"{disk}.raw"] = mset.mtime_ns[f"{disk}@{points[-1].id}.raw"]
    except BaseException:
        mset.close()
        raise
    for _, message in mset.damaged:
        log.warning("%s", message)
    return mset


def _chains(points: list[Point]) -> list[list[Point]]:
    """``points`` (oldest first) cut into chains, each starting at a full point."""
    out: list[list[Point]] = []
    for p in points:
        if p.kind == "full" or not out:
            out.append([])
        out[-1].append(p)
    return out


def _add_chain(
    mset: MountSet, bset: BackupSet, disk: str, chain: list[Point], options: OpenOptions
) -> None:
    """Open ``chain``'s newest point once; its layers are the older points."""
    top = chain[-1]
    image = open_source(bset.path(top.file), top.format, options)
    mset.images.append(image)
    layer: SparseSource | None = image
    for p in reversed(chain):
        path = bset.path(p.file)
        if layer is None or os.path.realpath(str(getattr(layer, "path", ""))) != (
            os.path.realpath(path)
        ):
            raise SparsefsError(f"{path}: its backing chain does not match the set's manifest")
        name = f"{disk}@{p.id}.raw"
        mset.files[name] = layer
        mset.mtime_ns[name] = os.stat(path).st_mtime_ns
        layer = getattr(layer, "backing", None)
