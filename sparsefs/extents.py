"""Extents, the SparseSource protocol, and SEEK_DATA/SEEK_HOLE on top of them.

A *source* is anything with a guest-visible byte stream of fixed size that
knows which ranges hold stored data and which are holes (read as zeros, store
nothing): a qcow2 image, a raw file, a snapshot.  All offsets here are guest
offsets in bytes.

The FUSE layer answers lseek(2) with :func:`seek_data` and :func:`seek_hole`,
computes ``st_blocks`` with :func:`data_size`, and the checksum tool walks
:meth:`SparseSource.iter_extents`; none of them knows a storage format.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of guest bytes ``[guest_offset, guest_offset + length)``.

    Attributes:
        guest_offset: first byte of the run, in the guest (virtual disk) space.
        length: bytes in the run, > 0.
        data: True when bytes are stored for the run (copy them); False for a
            hole, which reads as zeros and stores nothing.
        zero: True when the run is known to read as zeros (always true for a
            hole; true for data that is allocated but known zero, e.g. a
            preallocated qcow2 cluster).
    """

    guest_offset: int
    length: int
    data: bool
    zero: bool = False

    @property
    def end(self) -> int:
        """First guest byte after the run."""
        return self.guest_offset + self.length


@runtime_checkable
class SparseSource(Protocol):
    """A read-only byte stream with a data/hole map."""

    @property
    def size(self) -> int:
        """Length of the guest byte stream in bytes."""
        ...

    def read(self, guest_offset: int, length: int) -> bytes:
        """Return the guest bytes ``[guest_offset, guest_offset + length)``.

        Reads past the end are shortened; a read at or past the end returns b"".

        Raises:
            ImageReadError: the range cannot be read (broken table, I/O error).
        """
        ...

    def iter_extents(self, guest_offset: int = 0) -> Iterator[Extent]:
        """Yield the runs from ``guest_offset`` to the end, in order.

        The first run starts at ``guest_offset``; consecutive runs touch, and
        together they cover ``[guest_offset, size)``.  Adjacent runs of the
        same kind may or may not be merged.
        """
        ...


def coalesce(extents: Iterator[Extent]) -> Iterator[Extent]:
    """Merge touching runs with equal ``data`` and ``zero`` flags."""
    pending: Extent | None = None
    for ext in extents:
        if pending is None:
            pending = ext
        elif (
            pending.end == ext.guest_offset
            and pending.data == ext.data
            and pending.zero == ext.zero
        ):
            pending = Extent(pending.guest_offset, pending.length + ext.length, ext.data, ext.zero)
        else:
            yield pending
            pending = ext
    if pending is not None:
        yield pending


def seek_data(source: SparseSource, offset: int) -> int | None:
    """Return the first data offset >= ``offset``, or None (lseek's ENXIO).

    None when ``offset`` is at or past the end, or only holes follow it.
    """
    if offset >= source.size:
        return None
    for ext in source.iter_extents(offset):
        if ext.data:
            return max(offset, ext.guest_offset)
    return None


def seek_hole(source: SparseSource, offset: int) -> int | None:
    """Return the first hole offset >= ``offset``, or None (lseek's ENXIO).

    There is an implicit hole at the end of the stream, so this returns
    ``source.size`` when only data follows ``offset``; None when ``offset`` is
    at or past the end.
    """
    size = source.size
    if offset >= size:
        return None
    for ext in source.iter_extents(offset):
        if not ext.data:
            return max(offset, ext.guest_offset)
    return size


def data_size(source: SparseSource) -> int:
    """Bytes of the stream that hold stored data (what a sparse copy occupies)."""
    return sum(ext.length for ext in source.iter_extents(0) if ext.data)


def clip_extents(source: SparseSource, start: int, end: int) -> Iterator[Extent]:
    """Extents of ``source`` over ``[start, end)``, clipped."""
    for ext in source.iter_extents(start):
        if ext.guest_offset >= end:
            break
        if ext.end > end:
            yield Extent(ext.guest_offset, end - ext.guest_offset, ext.data, ext.zero)
            break
        yield ext


class DataIndex:
    """The data extents of a source, merged, as one sorted array: seeks without I/O.

    Built by one walk of :meth:`SparseSource.iter_extents` (so it says what
    :func:`seek_data`, :func:`seek_hole` and :func:`data_size` say, for a
    source whose content does not change).  ``bounds`` holds
    ``start0, end0, start1, end1, ...`` (guest offsets in bytes, strictly
    increasing: touching data extents are merged), 16 bytes per extent.

    Attributes:
        size: the source's size in bytes.
        data_bytes: bytes of stored data (``data_size``).
        nb_extents: data extents after merging.
    """

    __slots__ = ("_bounds", "data_bytes", "nb_extents", "size")

    def __init__(self, size: int, bounds: array[int]) -> None:
        self.size = size
        self._bounds = bounds
        self.nb_extents = len(bounds) // 2
        self.data_bytes = sum(bounds[1::2]) - sum(bounds[0::2])

    @classmethod
    def build(cls, source: SparseSource, max_extents: int | None = None) -> DataIndex | None:
        """Walk ``source`` once; None when it has more than ``max_extents`` data extents.

        Raises:
            SparsefsError: what the source's ``iter_extents`` raises.
        """
        bounds: array[int] = array("q")
        for ext in source.iter_extents(0):
            if not ext.data:
                continue
            if bounds and bounds[-1] == ext.guest_offset:
                bounds[-1] = ext.end
                continue
            if max_extents is not None and len(bounds) >= 2 * max_extents:
                return None
            bounds.append(ext.guest_offset)
            bounds.append(ext.end)
        return cls(source.size, bounds)

    def seek_data(self, offset: int) -> int | None:
        """As :func:`seek_data`: the first data offset >= ``offset``, or None (ENXIO)."""
        if offset >= self.size:
            return None
        i = bisect.bisect_right(self._bounds, offset)
        if i & 1:  # inside data extent i // 2
            return offset
        return self._bounds[i] if i < len(self._bounds) else None

    def seek_hole(self, offset: int) -> int | None:
        """As :func:`seek_hole`: the first hole offset >= ``offset``, or None (ENXIO)."""
        if offset >= self.size:
            return None
        i = bisect.bisect_right(self._bounds, offset)
        return self._bounds[i] if i & 1 else offset

    def is_hole(self, start: int, end: int) -> bool:
        """True when ``[start, end)`` (non-empty, within the source) holds no data."""
        i = bisect.bisect_right(self._bounds, start)
        return not i & 1 and (i == len(self._bounds) or self._bounds[i] >= end)
