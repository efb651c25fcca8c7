"""The three kinds of VMDK extent as run producers: hosted sparse, flat, zero/no-access.

Each extent answers ``runs(start, end)`` in its own byte space (0 = its first
guest byte) with the layered base's kinds (sparsefs.layered).  A sparse extent
validates its grain directory at open and loads grain tables on demand into a
bounded LRU; a bad grain table entry becomes an ERROR run for that grain only.
"""

from __future__ import annotations

import bisect
import itertools
import sys
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from sparsefs.errors import ImageFormatError, ImageReadError, UnsupportedFeatureError
from sparsefs.formats.vmdk import layout as L
from sparsefs.layered import BELOW, DATA, ERROR, OTHER, ZERO
from sparsefs.raw import RawFile

Run = tuple[int, int, int, Any]
_U32 = "I" if array("I").itemsize == 4 else "L"  # array typecode of a 32-bit entry


def _u32_array(buf: bytes) -> array[int]:
    """Little-endian 32-bit entries (GD and GT) as a compact array."""
    out = array(_U32, buf)
    if sys.byteorder == "big":
        out.byteswap()
    return out


def format_error(path: str, problem: str) -> ImageFormatError:
    """The one-line error for an invalid VMDK file."""
    return ImageFormatError(f"{path}: invalid VMDK: {problem}")


def unsupported(path: str, problem: str) -> UnsupportedFeatureError:
    """The one-line refusal of a VMDK feature sparsefs does not read."""
    return UnsupportedFeatureError(f"{path}: {problem}")


class _LRU:
    """A thread-safe LRU cache with a bounded number of entries."""

    def __init__(self, max_items: int) -> None:
        self._max = max(1, max_items)
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._max:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class SparseExtent:
    """A hosted sparse extent (monolithicSparse, a twoGbMaxExtentSparse piece, a stream).

    Args:
        raw: the extent file.
        header: its header (the footer's copy for a stream with GD_AT_END).
        gd: the grain directory: grain table sector per entry, 0 = none.
        table_cache_items: bound on decoded grain tables kept.
        grain_cache_bytes: bound on the decompressed grains kept, in bytes (at
            least one grain is kept).
    """

    def __init__(
        self,
        raw: RawFile,
        header: L.SparseHeader,
        gd: array[int],
        table_cache_items: int,
        grain_cache_bytes: int,
    ) -> None:
        self.raw = raw
        self.path = raw.path
        self.header = header
        self.gd = gd
        self.size = header.capacity * L.SECTOR_SIZE
        self.grain_size = header.grain_sectors * L.SECTOR_SIZE
        self.gt_span = header.num_gtes_per_gt * self.grain_size
        # Indexes of the allocated grain tables, to step over unallocated ones at once.
        self._present = array(_U32, (i for i, sector in enumerate(gd) if sector))
        self._tables = _LRU(table_cache_items)
        self._grains = _LRU(grain_cache_bytes // self.grain_size)

    @classmethod
    def open(
        cls, raw: RawFile, table_cache_items: int = 64, grain_cache_bytes: int = 1 << 20
    ) -> SparseExtent:
        """Read and validate the header (or stream footer) and the grain directory.

        Raises:
            ImageFormatError: invalid header, footer, or a grain directory or
                grain table offset outside the file.
            UnsupportedFeatureError: VMFS sparse, SE sparse, unknown flags or
                version, a descriptor-only header.
        """
        path, file_size = raw.path, raw.file_size
        head = raw.pread(0, L.SECTOR_SIZE) if file_size >= L.SECTOR_SIZE else b""
        if head[:4] == L.VMDK3_MAGIC:
            raise unsupported(path, "ESXi-hosted VMFS sparse (COWD) extents are not supported")
        if head[:8] == L.SESPARSE_MAGIC:
            raise unsupported(path, "ESXi SE sparse extents are not supported")
        try:
            header = L.SparseHeader.from_bytes(head)
            if header.capacity == 0 and header.descriptor_offset:
                raise L.LayoutUnsupported(
                    "a sparse header that only points at a descriptor is not supported"
                )
            if header.gd_offset == L.GD_AT_END:
                end = -(-file_size // L.SECTOR_SIZE) * L.SECTOR_SIZE - 3 * L.SECTOR_SIZE
                if end < L.SECTOR_SIZE:
                    raise L.LayoutError("file too short for a streamOptimized footer")
                header = L.parse_footer(raw.pread(end, 3 * L.SECTOR_SIZE))
            header.check()
        except L.LayoutUnsupported as exc:
            raise unsupported(path, str(exc)) from None
        except L.LayoutError as exc:
            raise format_error(path, str(exc)) from None
        file_sectors = -(-file_size // L.SECTOR_SIZE)
        if file_sectors < header.overhead:
            raise format_error(
                path,
                f"file truncated: the header says metadata takes "
                f"{header.overhead * L.SECTOR_SIZE} bytes, the file has {file_size}",
            )
        nb = header.nb_gd_entries
        gd = array(_U32)
        if nb:
            gd_bytes = header.gd_offset * L.SECTOR_SIZE
            if header.gd_offset == 0 or gd_bytes + 4 * nb > file_size:
                raise format_error(
                    path,
                    f"grain directory at sector {header.gd_offset} "
                    f"({nb} entries) lies outside the file",
                )
            gd = _u32_array(raw.pread(gd_bytes, 4 * nb))
            gt_bytes = 4 * header.num_gtes_per_gt
            for i, gt_sector in enumerate(gd):
                if gt_sector and gt_sector * L.SECTOR_SIZE + gt_bytes > file_size:
                    raise format_error(
                        path, f"grain table {i} at sector {gt_sector} lies outside the file"
                    )
            # Two entries naming overlapping tables would alias guest ranges (and let a
            # small file describe an endless disk of data): no writer does that.
            starts = sorted(sector * L.SECTOR_SIZE for sector in gd if sector)
            for a, b in itertools.pairwise(starts):
                if b < a + gt_bytes:
                    raise format_error(
                        path,
                        f"grain tables at sectors {a // L.SECTOR_SIZE} "
                        f"and {b // L.SECTOR_SIZE} overlap",
                    )
        if header.compressed and header.grain_sectors * L.SECTOR_SIZE > L.MAX_COMPRESSED_GRAIN:
            raise unsupported(
                path,
                f"compressed grains of {header.grain_sectors} sectors "
                f"(sparsefs inflates grains up to {L.MAX_COMPRESSED_GRAIN} bytes)",
            )
        return cls(raw, header, gd, table_cache_items, grain_cache_bytes)

    def _table(self, gd_index: int) -> array[int]:
        """Grain table ``gd_index``, decoded (4 bytes an entry in memory, as on disk)."""
        table: array[int] | None = self._tables.get(gd_index)
        if table is None:
            offset = self.gd[gd_index] * L.SECTOR_SIZE
            table = _u32_array(self.raw.pread(offset, 4 * self.header.num_gtes_per_gt))
            self._tables.put(gd_index, table)
        return table

    @property
    def tables_cached(self) -> int:
        """Grain tables held in memory now."""
        return len(self._tables)

    def _classify(self, gte: int, gs: int, pos: int) -> tuple[int, Any]:
        """(kind, host) of the grain starting at ``gs`` (extent bytes) read from ``pos``."""
        h = self.header
        if gte == 0:
            return BELOW, None
        if gte == L.GTE_ZEROED and h.has_zero_grain:
            return ZERO, None
        host = gte * L.SECTOR_SIZE
        if gte < h.overhead or host >= self.raw.file_size:
            return ERROR, (
                f"{self.path}: grain table entry for extent byte {gs} points at "
                f"sector {gte}, outside the grain area"
            )
        if h.compressed:
            return OTHER, (self, gs, host)
        return DATA, (self.raw, host + pos - gs)

    def runs(self, start: int, end: int) -> Iterator[Run]:
        """Runs covering ``[start, end)`` of this extent (extent byte offsets)."""
        end = min(end, self.size)
        pending: list[Any] | None = None
        pos = start
        while pos < end:
            gd_index = pos // self.gt_span
            gt_start = gd_index * self.gt_span
            stop = min(end, gt_start + self.gt_span)
            if gd_index >= len(self.gd) or self.gd[gd_index] == 0:
                k = bisect.bisect_left(self._present, gd_index)
                stop = min(end, self._present[k] * self.gt_span) if k < len(self._present) else end
                items: Iterator[Run] = iter(((pos, stop, BELOW, None),))
            else:
                items = self._table_runs(gd_index, gt_start, pos, stop)
            for s, e, kind, host in items:
                if (
                    pending is not None
                    and pending[2] == kind
                    and pending[1] == s
                    and (
                        (kind in (BELOW, ZERO))
                        or (kind == DATA and pending[3][1] + (s - pending[0]) == host[1])
                        or (kind == ERROR and pending[3] == host)
                    )
                ):
                    pending[1] = e
                    continue
                if pending is not None:
                    yield pending[0], pending[1], pending[2], pending[3]
                pending = [s, e, kind, host]
            pos = stop
        if pending is not None:
            yield pending[0], pending[1], pending[2], pending[3]

    def _table_runs(self, gd_index: int, gt_start: int, pos: int, stop: int) -> Iterator[Run]:
        try:
            table = self._table(gd_index)
        except ImageReadError as exc:
            yield pos, stop, ERROR, str(exc)
            return
        grain = self.grain_size
        g = (pos - gt_start) // grain
        while pos < stop:
            gs = gt_start + g * grain
            ge = min(gs + grain, stop)
            kind, host = self._classify(table[g], gs, pos)
            yield pos, ge, kind, host
            pos = ge
            g += 1

    def read_compressed(self, grain_start: int, host: int, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` (extent offsets) of the compressed grain at ``host``.

        Mirrors qemu's vmdk_read_extent: the marker's size must be non-zero and
        fit in two grains; the deflate stream must end within one grain; the
        requested range must lie within what it inflates to.

        Raises:
            ImageReadError: the grain cannot be decompressed or is too short.
        """
        data: bytes | None = self._grains.get(host)
        if data is None:
            data = self._inflate(grain_start, host)
            self._grains.put(host, data)
        lo, hi = start - grain_start, end - grain_start
        if hi > len(data):
            raise ImageReadError(
                f"{self.path}: compressed grain at {host:#x} holds "
                f"{len(data)} bytes, the read needs {hi}"
            )
        return data[lo:hi]

    def _inflate(self, grain_start: int, host: int) -> bytes:
        grain = self.grain_size
        if self.header.has_marker:
            _lba, size = L.parse_grain_marker(self.raw.pread(host, L.GRAIN_MARKER_SIZE))
            if size == 0 or size > 2 * grain - L.GRAIN_MARKER_SIZE:
                raise ImageReadError(
                    f"{self.path}: grain marker at {host:#x} gives an invalid "
                    f"compressed size {size}"
                )
            payload = self.raw.pread(host + L.GRAIN_MARKER_SIZE, size)
        else:
            payload = self.raw.pread(host, grain)
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(payload, grain)
        except zlib.error as exc:
            raise ImageReadError(
                f"{self.path}: compressed grain at {host:#x} (extent byte "
                f"{grain_start}) is corrupt: {exc}"
            ) from None
        if not inflater.eof:
            raise ImageReadError(
                f"{self.path}: compressed grain at {host:#x} (extent byte "
                f"{grain_start}) is truncated or inflates past the grain size"
            )
        return out


class FlatExtent:
    """A flat extent: guest bytes at ``offset`` of a plain file."""

    def __init__(self, raw: RawFile, offset: int, size: int) -> None:
        self.raw = raw
        self.path = raw.path
        self.offset = offset
        self.size = size

    def runs(self, start: int, end: int) -> Iterator[Run]:
        """One DATA run over ``[start, end)``."""
        if start < end:
            yield start, end, DATA, (self.raw, self.offset + start)


class ConstExtent:
    """A ZERO extent (reads as zeros) or a NOACCESS one (an error to read)."""

    def __init__(self, size: int, kind: int, message: str | None = None) -> None:
        self.size = size
        self.kind = kind
        self.message = message

    def runs(self, start: int, end: int) -> Iterator[Run]:
        """One run of the extent's kind over ``[start, end)``."""
        if start < end:
            yield start, end, self.kind, self.message
