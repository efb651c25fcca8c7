"""Read-only qcow2 images: :class:`Qcow2Image`, a layered image over a qcow2 layer.

:class:`Qcow2Image` is a :class:`~sparsefs.layered.LayeredImage` whose top
layer is a :class:`~sparsefs.formats.qcow2.layer.Qcow2Layer`: reads, extents (lseek,
``st_blocks``, checksums), the map, ``read_nowait`` and ``iter_host_ranges``
come from the one base shared by every format, over the one walk of the
cluster map.  This module adds what only qcow2 has: internal snapshots, the
metadata readahead, :meth:`Qcow2Image.iter_runs` in qcow2's own terms, and
:func:`open_image`.  Opening and validation live in :mod:`sparsefs.formats.qcow2.file`.

All I/O is ``os.pread`` on descriptors opened read-only, so concurrent reads
from several threads are safe; the caches take a lock only to look up and
insert.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from sparsefs.errors import ImageFormatError
from sparsefs.extents import SparseSource
from sparsefs.formats.qcow2 import layout as L
from sparsefs.formats.qcow2.file import MAX_TOTAL_L1_BYTES, Qcow2File
from sparsefs.formats.qcow2.layer import Qcow2Layer
from sparsefs.formats.qcow2.messages import past_end_text, size_text
from sparsefs.formats.qcow2.runs import (
    RUN_COMPRESSED,
    RUN_DATA,
    RUN_ERROR,
    RUN_KIND_NAMES,
    RUN_UNALLOCATED,
    RUN_UNWRITTEN,
    RUN_ZERO,
    Run,
)
from sparsefs.formats.qcow2.snapshots import snapshot_label
from sparsefs.layered import MAX_CHAIN_LENGTH as MAX_CHAIN_LENGTH  # re-exported
from sparsefs.layered import LayeredImage, MapEntry
from sparsefs.options import OpenOptions

__all__ = [
    "MAX_CHAIN_LENGTH",
    "MAX_TOTAL_L1_BYTES",
    "RUN_COMPRESSED",
    "RUN_DATA",
    "RUN_ERROR",
    "RUN_KIND_NAMES",
    "RUN_UNALLOCATED",
    "RUN_UNWRITTEN",
    "RUN_ZERO",
    "MapEntry",
    "Qcow2File",
    "Qcow2Image",
    "Run",
    "backing_name",
    "open_image",
    "past_end_text",
    "size_text",
    "snapshot_label",
]


class Qcow2Image(LayeredImage):
    """A qcow2 image (active state or one internal snapshot) as a SparseSource.

    Offsets are guest offsets in bytes unless named ``host_*``.

    Args:
        qfile: the open file.
        l1: the entries of the L1 table this view reads.
        size: its virtual size in bytes.
        snapshot: the snapshot this view shows, or None for the active state.
        owns_file: :meth:`close` closes ``qfile`` and the backing chain (the
            active image); snapshot views share them and close nothing.
    """

    layer: Qcow2Layer

    def __init__(
        self,
        qfile: Qcow2File,
        l1: list[int],
        size: int,
        snapshot: L.Snapshot | None = None,
        owns_file: bool = True,
    ) -> None:
        super().__init__(Qcow2Layer(qfile, l1, size, owns_file), qfile.backing)
        self.qfile = qfile
        self.snapshot = snapshot

    def close(self) -> None:
        """Close the image file and its chain (the active image; snapshot views share them)."""
        self.layer.close()

    def __enter__(self) -> Qcow2Image:
        return self

    def iter_runs(self, guest_offset: int, guest_end: int) -> Iterator[Run]:
        """Walk the cluster map of this layer over ``[guest_offset, guest_end)``.

        Yields runs in order that together cover the range; a run never
        crosses an L2 table boundary, and a compressed run never crosses a
        cluster boundary.  ``Run.host`` is in qcow2's terms (see :class:`Run`).
        """
        for s, e, kind, host in self.layer.runs(guest_offset, guest_end):
            if kind == RUN_DATA or kind == RUN_UNWRITTEN:  # noqa: SIM109  # two compares beat a tuple build on this hot path
                host = host[1]
            yield Run(s, e, kind, host)

    def advise_metadata(self) -> None:
        """Ask the kernel to read every L2 table of the chain ahead (``POSIX_FADV_WILLNEED``).

        For a full walk that follows (``st_blocks`` at mount): with a cold
        page cache the tables then arrive by parallel readahead instead of
        one synchronous read each.  Only a hint; errors are ignored.
        """
        image: SparseSource | None = self
        while isinstance(image, Qcow2Image):
            qfile = image.qfile
            cs = qfile.cluster_size
            offsets = sorted({e & L.L1E_OFFSET_MASK for e in image.layer._l1} - {0})
            start = end = -1
            for off in [*offsets, -1]:
                if off == end:
                    end += cs
                    continue
                if end > start >= 0:
                    try:
                        os.posix_fadvise(qfile.file.fd, start, end - start, os.POSIX_FADV_WILLNEED)
                    except OSError:
                        return
                start, end = off, off + cs
            image = image.backing

    # -- snapshots -------------------------------------------------------------------

    @property
    def snapshots(self) -> list[L.Snapshot]:
        """The internal snapshots of the image file."""
        return self.qfile.snapshots

    @property
    def snapshot_table_problem(self) -> str | None:
        """Why the image's snapshot table cannot be read at all, or None."""
        return self.qfile.snapshot_table_problem

    def snapshot_problem(self, snap: L.Snapshot) -> str | None:
        """Why ``snap`` cannot be opened (its L1 table is invalid), or None; reads nothing."""
        size = snap.disk_size if snap.disk_size is not None else self.qfile.header.size
        return self.qfile.l1_problem(snap.l1_table_offset, snap.l1_size, size, snapshot_label(snap))

    def open_snapshot(self, snap: L.Snapshot) -> Qcow2Image:
        """A view of ``snap``: its own L1 table and virtual size, same file and chain.

        A damaged snapshot costs only itself: the active image and the other
        snapshots stay readable.

        Raises:
            ImageFormatError: the snapshot's L1 table is invalid.
            UnsupportedFeatureError: loading it would pass the L1 memory bound.
        """
        size = snap.disk_size if snap.disk_size is not None else self.qfile.header.size
        l1 = self.qfile.read_l1(snap.l1_table_offset, snap.l1_size, size, snapshot_label(snap))
        return Qcow2Image(self.qfile, l1, size, snapshot=snap, owns_file=False)


def open_image(
    path: str | os.PathLike[str],
    options: OpenOptions | None = None,
    chain: tuple[str, ...] = (),
) -> Qcow2Image:
    """Open a qcow2 image read-only, validate it, and open its backing chain.

    Raises:
        ImageFormatError: not qcow2, or invalid metadata.
        UnsupportedFeatureError: a feature sparsefs refuses (names it).
        MissingFileError: the image, its backing file or data file is missing.
    """
    options = options or OpenOptions()
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ImageFormatError(f"{path}: is a directory, not an image")
    qfile = Qcow2File(path, options, chain)
    try:
        h = qfile.header
        l1 = qfile.read_l1(h.l1_table_offset, h.l1_size, h.size, "active")
    except BaseException:
        qfile.close()
        raise
    image = Qcow2Image(qfile, l1, h.size)
    if not chain:
        _share_cache_bounds(image)
    return image


def _share_cache_bounds(image: Qcow2Image) -> None:
    """Split the cache bounds of ``options`` between the qcow2 files of a chain.

    ``l2_cache_bytes`` and ``compressed_cache_bytes`` bound what an image
    opened with them holds, its backing chain included: each file of a chain
    of N gets 1/N of each (and at least room for two entries).
    """
    files: list[Qcow2File] = []
    layer: SparseSource | None = image
    while isinstance(layer, Qcow2Image):
        files.append(layer.qfile)
        layer = layer.backing
    if len(files) < 2:
        return
    options = image.qfile.options
    for qfile in files:
        floor = 2 * qfile.cluster_size
        qfile._l2_cache.set_max_cost(max(options.l2_cache_bytes // len(files), floor))
        qfile._compressed_cache.set_max_cost(
            max(options.compressed_cache_bytes // len(files), floor)
        )


def backing_name(path: str | os.PathLike[str]) -> str | None:
    """The backing file name ``path``'s header records (as stored), or None; opens no backing file.

    Raises:
        ImageFormatError: not qcow2, or invalid metadata.
        UnsupportedFeatureError, MissingFileError: as :func:`open_image`.
    """
    image = open_image(path, OpenOptions(backing=False))
    try:
        return image.qfile.backing_name
    finally:
        image.close()
