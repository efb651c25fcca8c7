"""The files a mount presents: one raw file per image (``NAME.raw``) and per
readable internal snapshot (``NAME@SNAPSHOT.raw``), opened and validated
before anything is mounted.
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

    def close(self) -> None:
        for image in self.images:
            close = getattr(image, "close", None)
            if close is not None:
                close()
        self.images.clear()


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
