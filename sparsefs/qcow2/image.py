"""Read-only qcow2 images: the read path over the cluster map, extents, map.

:class:`Qcow2Image` is a :class:`~sparsefs.extents.SparseSource`.  Everything
it serves comes from one walk, :meth:`Qcow2Image.iter_runs`, which yields the
runs of the decoded L2 tables (:mod:`sparsefs.qcow2.clustermap`).  Reads, the
extent map, lseek and checksums all go through it; nothing else decodes an L2
entry.  Opening and validation live in :mod:`sparsefs.qcow2.header`.

All I/O is ``os.pread`` on descriptors opened read-only, so concurrent reads
from several threads are safe; the caches take a lock only to look up and
insert.
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Iterator
from typing import Any, cast

from sparsefs.errors import ImageFormatError, ImageReadError
from sparsefs.extents import Extent, SparseSource, coalesce
from sparsefs.hostmap import HOLE
from sparsefs.layered import MAX_CHAIN_LENGTH as MAX_CHAIN_LENGTH  # re-exported
from sparsefs.layered import MapEntry
from sparsefs.layered import map_continues as _map_continues
from sparsefs.qcow2 import layout as L
from sparsefs.qcow2.clustermap import (
    _ZERO_KINDS,
    RUN_COMPRESSED,
    RUN_DATA,
    RUN_ERROR,
    RUN_KIND_NAMES,
    RUN_UNALLOCATED,
    RUN_UNWRITTEN,
    RUN_ZERO,
    Run,
)
from sparsefs.qcow2.header import MAX_TOTAL_L1_BYTES, Qcow2File
from sparsefs.qcow2.messages import past_end_text, size_text
from sparsefs.qcow2.options import (
    DEFAULT_COMPRESSED_CACHE_BYTES,
    DEFAULT_L2_CACHE_BYTES,
    OpenOptions,
)
from sparsefs.qcow2.snapshots import snapshot_label
from sparsefs.raw import RawFile

__all__ = [
    "DEFAULT_COMPRESSED_CACHE_BYTES",
    "DEFAULT_L2_CACHE_BYTES",
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
    "OpenOptions",
    "Qcow2File",
    "Qcow2Image",
    "Run",
    "open_image",
    "open_source",
    "past_end_text",
    "size_text",
    "snapshot_label",
]

# Cleared when preadv(RWF_NOWAIT) is refused (EOPNOTSUPP): then read_nowait gives up.
_nowait_ok = [hasattr(os, "RWF_NOWAIT")]
# Shared zeros that read_nowait answers holes with (read-only views of it).
_ZEROS = bytes(4 * 1024 * 1024)
_ZEROS_VIEW = memoryview(_ZEROS)


class Qcow2Image:
    """A qcow2 image (active state or one internal snapshot) as a SparseSource.

    Offsets are guest offsets in bytes unless named ``host_*``.
    """

    def __init__(
        self,
        qfile: Qcow2File,
        l1: list[int],
        size: int,
        snapshot: L.Snapshot | None = None,
        owns_file: bool = True,
    ) -> None:
        self.qfile = qfile
        self.path = qfile.path
        self._l1 = l1
        self._size = size
        self.snapshot = snapshot
        self._owns_file = owns_file
        self._table_shift = qfile.table_shift
        self._table_span = 1 << qfile.table_shift
        self._l1_allocated = [i for i, e in enumerate(l1) if e & L.L1E_OFFSET_MASK]
        self._backing = qfile.backing

    # -- SparseSource ----------------------------------------------------------------

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return self._size

    @property
    def backing(self) -> SparseSource | None:
        """The backing layer, or None."""
        return self._backing

    def close(self) -> None:
        """Close the image file (for the active image) and its chain."""
        if self._owns_file:
            self.qfile.close()

    def __enter__(self) -> Qcow2Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def iter_runs(self, guest_offset: int, guest_end: int) -> Iterator[Run]:
        """Walk the cluster map of this layer over ``[guest_offset, guest_end)``.

        Yields runs in order that together cover the range; a run never
        crosses an L2 table boundary, and a compressed run never crosses a
        cluster boundary.
        """
        for s, e, kind, host in self._runs(guest_offset, guest_end):
            yield Run(s, e, kind, host)

    def _runs(self, guest_offset: int, guest_end: int) -> Iterator[tuple[int, int, int, Any]]:
        """:meth:`iter_runs` as ``(guest_offset, guest_end, kind, host)`` tuples.

        The one walk of the cluster map; the hot paths (reads from memory,
        the extent map behind lseek) take the tuples, which cost less than
        :class:`Run` objects.
        """
        guest_end = min(guest_end, self._size)
        pos = guest_offset
        shift = self._table_shift
        span = self._table_span
        l1 = self._l1
        qfile = self.qfile
        while pos < guest_end:
            l1_index = pos >> shift
            table_base = l1_index << shift
            entry = l1[l1_index]
            if not entry & L.L1E_OFFSET_MASK:
                # Jump over all unallocated L1 entries at once.
                nxt = bisect.bisect_right(self._l1_allocated, l1_index)
                stop = (
                    self._l1_allocated[nxt] << shift if nxt < len(self._l1_allocated) else guest_end
                )
                stop = min(stop, guest_end)
                yield (pos, stop, RUN_UNALLOCATED, None)
                pos = stop
                continue
            runs = qfile.table_runs(entry)
            stop = min(table_base + span, guest_end)
            rel = pos - table_base
            i = bisect.bisect_right(runs.starts, rel) - 1
            starts, ends, kinds, hosts = runs.starts, runs.ends, runs.kinds, runs.hosts
            n = len(starts)
            while i < n:
                run_start = table_base + starts[i]
                if run_start >= stop:
                    break
                s = max(pos, run_start)
                e = min(table_base + ends[i], stop)
                kind = kinds[i]
                host = hosts[i]
                if kind == RUN_DATA or kind == RUN_UNWRITTEN:  # noqa: SIM109 (hot path)
                    host = host + (s - run_start)
                yield (s, e, kind, host)
                i += 1
            pos = stop

    def read(self, guest_offset: int, length: int) -> bytes:
        """Guest bytes ``[guest_offset, guest_offset + length)``, shortened at the end.

        Raises:
            ImageReadError: a part of the range cannot be read.
        """
        end = min(guest_offset + length, self._size)
        if guest_offset >= end:
            return b""
        parts: list[bytes] = []
        qfile = self.qfile
        cmask = qfile.cluster_size - 1
        for run in self.iter_runs(guest_offset, end):
            s, e, kind = run.guest_offset, run.guest_end, run.kind
            n = e - s
            if kind == RUN_DATA:
                parts.append(qfile.data.pread(cast(int, run.host), n))
            elif kind == RUN_ZERO or kind == RUN_UNWRITTEN:  # noqa: SIM109 (hot path)
                parts.append(bytes(n))
            elif kind == RUN_UNALLOCATED:
                parts.append(self._read_below(s, n))
            elif kind == RUN_COMPRESSED:
                cluster = qfile.decompress(cast(tuple[int, int], run.host))
                base = s & ~cmask
                parts.append(cluster[s - base : e - base])
            else:
                raise ImageReadError(str(run.host))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def advise_metadata(self) -> None:
        """Ask the kernel to read every L2 table of the chain ahead (``POSIX_FADV_WILLNEED``).

        For a full walk that follows (``st_blocks`` at mount): with a cold
        page cache the tables then arrive by parallel readahead instead of
        one synchronous read each.  Only a hint; errors are ignored.
        """
        layer: SparseSource | None = self
        while isinstance(layer, Qcow2Image):
            qfile = layer.qfile
            cs = qfile.cluster_size
            offsets = sorted({e & L.L1E_OFFSET_MASK for e in layer._l1} - {0})
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
            layer = layer._backing

    def read_nowait(self, guest_offset: int, length: int) -> bytes | bytearray | memoryview | None:
        """Like :meth:`read`, from memory only: the page cache, the caches, zeros.

        Returns the guest bytes ``[guest_offset, guest_offset + length)``
        (shortened at the end), or None when a part would have to wait or
        fail: host data not in the page cache (``preadv`` with
        ``RWF_NOWAIT``), a compressed cluster not in the cache, a raw backing
        file, an external data file, a broken range.  The caller then uses
        :meth:`read` in a thread, which also reports the errors.  For the FUSE
        layer: answering from the event loop costs less than a thread hop
        when the bytes are in memory.  A range that is all holes comes back
        as a read-only view of a shared zero buffer (no allocation).  Never
        raises.
        """
        end = min(guest_offset + length, self._size)
        if guest_offset >= end:
            return b""
        backing = self._backing
        reads_zeros = True
        for s, _, kind, _ in self._runs(guest_offset, end):
            if kind in _ZERO_KINDS or (
                kind == RUN_UNALLOCATED and (backing is None or s >= backing.size)
            ):
                continue
            reads_zeros = False
            break
        if reads_zeros and end - guest_offset <= len(_ZEROS):
            return _ZEROS_VIEW[: end - guest_offset]
        qfile = self.qfile
        if qfile.external_data or not _nowait_ok[0]:
            return None
        out = bytearray(end - guest_offset)
        if reads_zeros:
            return out
        with memoryview(out) as view:
            if not self._read_nowait_into(view, guest_offset, end):
                return None
        return out

    def _read_nowait_into(self, view: memoryview, guest_offset: int, end: int) -> bool:
        """Fill ``view`` (zeroed, for guest bytes from ``guest_offset``) without blocking."""
        qfile = self.qfile
        if qfile.external_data:
            return False
        fd = qfile.file.fd
        cmask = qfile.cluster_size - 1
        for s, e, kind, host in self._runs(guest_offset, end):
            if kind in _ZERO_KINDS:
                continue
            part = view[s - guest_offset : e - guest_offset]
            if kind == RUN_DATA:
                try:
                    got = os.preadv(fd, [part], host, os.RWF_NOWAIT)
                except OSError as exc:
                    if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                        _nowait_ok[0] = False  # the filesystem cannot: stop trying
                    return False
                if got != e - s:
                    return False
            elif kind == RUN_UNALLOCATED:
                backing = self._backing
                if backing is None or s >= backing.size:
                    continue
                if not isinstance(backing, Qcow2Image):
                    return False
                stop = min(e, backing.size)
                if not backing._read_nowait_into(part[: stop - s], s, stop):
                    return False
            elif kind == RUN_COMPRESSED:
                cluster = qfile._compressed_cache.get(host)
                if cluster is None:
                    return False
                base = s & ~cmask
                part[:] = cluster[s - base : e - base]
            else:
                return False
        return True

    def iter_host_ranges(
        self, guest_offset: int, guest_end: int
    ) -> Iterator[tuple[int, int, RawFile | None, int]]:
        """What a copy of ``[guest_offset, guest_end)`` must write, piece by piece.

        Yields ``(guest_start, guest_end, file, host_offset)`` in order:
        ``file`` holds exactly the guest bytes at ``host_offset`` (read them
        with ``file.pread_into``, or let the kernel copy them with
        ``copy_file_range``), or is None when the piece must come from
        :meth:`read` (compressed clusters, broken ranges, layers that cannot
        say).  Ranges that read as zeros are left out.
        """
        backing = self._backing
        data_file = self.qfile.data
        for s, e, kind, host in self._runs(guest_offset, min(guest_end, self._size)):
            if kind == RUN_DATA:
                yield (s, e, data_file, host)
            elif kind in _ZERO_KINDS:
                continue
            elif kind == RUN_UNALLOCATED:
                if backing is None or s >= backing.size:
                    continue
                stop = min(e, backing.size)
                below = getattr(backing, "iter_host_ranges", None)
                if below is None:
                    yield (s, stop, None, 0)
                else:
                    yield from below(s, stop)
            else:
                yield (s, e, None, 0)

    def _read_below(self, guest_offset: int, length: int) -> bytes:
        backing = self._backing
        if backing is None or guest_offset >= backing.size:
            return bytes(length)
        got = backing.read(guest_offset, length)
        if len(got) < length:
            got += bytes(length - len(got))
        return got

    def iter_extents(self, guest_offset: int = 0) -> Iterator[Extent]:
        """Data and hole runs from ``guest_offset`` to the end, merged.

        Data is what some layer of the chain stores (qemu-img map's "data"):
        normal, compressed and broken ranges (the latter read as EIO, so a
        copier fails instead of skipping them).  Zero clusters and ranges no
        layer stores are holes.
        """
        if self._backing is None:
            return self._iter_top_extents(guest_offset)
        return coalesce(self._iter_layer_extents(guest_offset, self._size))

    def _iter_top_extents(self, guest_offset: int) -> Iterator[Extent]:
        """:meth:`iter_extents` of an image without a backing file, in one pass.

        The same answer as the general path (zero and unallocated runs are
        holes, everything else data, touching runs of a kind merged), without
        its layers of generators: this is what every lseek walks.
        """
        pending_start = pending_end = guest_offset
        pending_data = False
        for s, e, kind, _ in self._runs(guest_offset, self._size):
            data = kind != RUN_ZERO and kind != RUN_UNALLOCATED and kind != RUN_UNWRITTEN
            if data == pending_data and s == pending_end:
                pending_end = e
                continue
            if pending_end > pending_start:
                yield Extent(
                    pending_start, pending_end - pending_start, pending_data, not pending_data
                )
            pending_start, pending_end, pending_data = s, e, data
        if pending_end > pending_start:
            yield Extent(pending_start, pending_end - pending_start, pending_data, not pending_data)

    def _iter_layer_extents(self, start: int, end: int) -> Iterator[Extent]:
        backing = self._backing
        for run in self.iter_runs(start, end):
            s, e, kind = run.guest_offset, run.guest_end, run.kind
            if kind in _ZERO_KINDS:
                yield Extent(s, e - s, data=False, zero=True)
            elif kind != RUN_UNALLOCATED:
                yield Extent(s, e - s, data=True)
            elif backing is None or s >= backing.size:
                yield Extent(s, e - s, data=False, zero=True)
            else:
                yield from _clip_extents(backing, s, min(e, backing.size))
                if e > backing.size:
                    yield Extent(backing.size, e - backing.size, data=False, zero=True)

    # -- qemu-img map -----------------------------------------------------------------

    def iter_map(self, depth: int = 0) -> Iterator[MapEntry]:
        """The map in the shape of ``qemu-img map --output=json`` (merged)."""
        pending: MapEntry | None = None
        for entry in self._iter_map_raw(0, self._size, depth):
            if pending is not None and _map_continues(pending, entry):
                pending = MapEntry(
                    pending.start,
                    pending.length + entry.length,
                    pending.depth,
                    pending.present,
                    pending.zero,
                    pending.data,
                    pending.compressed,
                    pending.offset,
                )
                continue
            if pending is not None:
                yield pending
            pending = entry
        if pending is not None:
            yield pending

    def _iter_map_raw(self, start: int, end: int, depth: int) -> Iterator[MapEntry]:
        for run in self.iter_runs(start, end):
            s, e, kind = run.guest_offset, run.guest_end, run.kind
            n = e - s
            if kind == RUN_DATA:
                yield MapEntry(s, n, depth, True, False, True, False, cast(int, run.host))
            elif kind == RUN_UNWRITTEN:
                # qemu-img map: data (allocated), and "zero" where the image
                # file has a hole (qemu asks the file layer below a
                # preallocated image); an unwritten extent, or anything in an
                # external data file, it calls data only.
                host_map = self.qfile.data.written_map()
                external = self.qfile.external_data
                host = cast(int, run.host)
                for rel_s, rel_e, state in host_map.classify(host, n):
                    yield MapEntry(
                        s + rel_s,
                        rel_e - rel_s,
                        depth,
                        True,
                        state == HOLE and not external,
                        True,
                        False,
                        host + rel_s,
                    )
            elif kind == RUN_COMPRESSED:
                yield MapEntry(s, n, depth, True, False, True, True, None)
            elif kind == RUN_ZERO:
                yield MapEntry(s, n, depth, True, True, False, False, None)
            elif kind == RUN_ERROR:
                yield MapEntry(s, n, depth, True, False, True, False, None)
            else:
                backing = self._backing
                # Unallocated with nothing below, or past the end of a shorter
                # backing file: this layer answers "zero" (qemu's depth too).
                if backing is None or s >= backing.size:
                    yield MapEntry(s, n, depth, False, True, False, False, None)
                    continue
                bend = min(e, backing.size)
                deeper = getattr(backing, "_iter_map_raw", None)
                if deeper is not None:
                    yield from deeper(s, bend, depth + 1)
                else:
                    for x in _clip_extents(backing, s, bend):
                        yield MapEntry(
                            x.guest_offset,
                            x.length,
                            depth + 1,
                            True,
                            not x.data,
                            x.data,
                            False,
                            x.guest_offset if x.data else None,
                        )
                if e > bend:
                    yield MapEntry(bend, e - bend, depth, False, True, False, False, None)

    # -- snapshots and description ---------------------------------------------------

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

    def chain(self) -> list[tuple[str, str]]:
        """The backing chain below this image: (path, format) pairs, top first."""
        out: list[tuple[str, str]] = []
        layer: SparseSource | None = self._backing
        while layer is not None:
            if isinstance(layer, Qcow2Image):
                out.append((layer.path, "qcow2"))
                layer = layer.backing
            else:
                out.append((getattr(layer, "path", "?"), getattr(layer, "format_name", "raw")))
                layer = getattr(layer, "backing", None)
        return out


def _clip_extents(source: SparseSource, start: int, end: int) -> Iterator[Extent]:
    """Extents of ``source`` over ``[start, end)``, clipped."""
    for ext in source.iter_extents(start):
        if ext.guest_offset >= end:
            break
        if ext.end > end:
            yield Extent(ext.guest_offset, end - ext.guest_offset, ext.data, ext.zero)
            break
        yield ext


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


def open_source(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    options: OpenOptions | None = None,
) -> SparseSource:
    """Open ``path`` in any format: :func:`sparsefs.formats.open_source` (kept for callers).

    Only callers that know the file is an image may pass ``fmt=None``: a raw
    disk copy can legitimately start with an image header written by its guest.
    """
    from sparsefs.formats import open_source as open_any

    return open_any(path, fmt, options)
