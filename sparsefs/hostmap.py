"""Which bytes of a host file are written: FIEMAP, else SEEK_DATA/SEEK_HOLE.

A preallocated image maps guest ranges onto host ranges that were never
written: holes of the host file (qcow2 ``preallocation=metadata``) or
unwritten extents (``preallocation=falloc``: ``fallocate`` without writes).
Both read as zeros, so they are holes for a sparse copy.

The map is learnt once per open file:

- FIEMAP (``FS_IOC_FIEMAP`` with ``FIEMAP_FLAG_SYNC``) where the filesystem has
  it (ext4, XFS, btrfs).  Its ``FIEMAP_EXTENT_UNWRITTEN`` flag does not depend
  on the page cache, unlike ext4's SEEK_DATA, which calls an unwritten extent
  data as soon as one of its pages is cached.
- SEEK_DATA/SEEK_HOLE where FIEMAP is refused (tmpfs, NFS, FUSE): holes only.
- Neither: every byte of the file is written.

Memory and syscalls grow with the file's extents (touching written extents
are merged), never with its size.  All offsets here are host offsets, bytes
of the host file.

This module imports nothing from sparsefs but the error tree.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import os
import struct
from array import array
from collections.abc import Iterator

from sparsefs.errors import ImageReadError

# linux/fiemap.h and linux/fs.h
FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # fe_logical, fe_physical, fe_length, fe_flags
_EXTENTS_PER_CALL = 512
# errnos that mean "this filesystem cannot answer", not "the file is broken"
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EBADF)

# What a host range holds (HostMap.classify)
WRITTEN = 0  # bytes the filesystem stores
UNWRITTEN = 1  # allocated, never written: reads as zeros (FIEMAP_EXTENT_UNWRITTEN)
HOLE = 2  # nothing allocated: reads as zeros

METHOD_FIEMAP = "fiemap"
METHOD_SEEK = "seek"
METHOD_NONE = "none"


class HostMap:
    """The written and unwritten ranges of a host file, sorted and merged.

    Bytes at or past ``file_size`` count as written: a reader that reaches
    them reads (and reports the short read) as it always did.

    Attributes:
        file_size: the file's length when the map was taken.
        method: how the map was learnt: "fiemap", "seek" or "none".
    """

    __slots__ = (
        "_unwritten_ends",
        "_unwritten_starts",
        "_w_ends",
        "_w_starts",
        "file_size",
        "method",
    )

    def __init__(
        self,
        file_size: int,
        written: list[tuple[int, int]],
        unwritten: list[tuple[int, int]],
        method: str,
    ) -> None:
        self.file_size = file_size
        self.method = method
        self._w_starts = array("q", (s for s, _ in written))
        self._w_ends = array("q", (e for _, e in written))
        self._unwritten_starts = array("q", (s for s, _ in unwritten))
        self._unwritten_ends = array("q", (e for _, e in unwritten))

    @classmethod
    def all_written(cls, file_size: int) -> HostMap:
        """A map that calls the whole file written (no hole information)."""
        return cls(file_size, [(0, file_size)] if file_size else [], [], METHOD_NONE)

    @property
    def nb_extents(self) -> int:
        """Written plus unwritten ranges held (what the map costs)."""
        return len(self._w_starts) + len(self._unwritten_starts)

    def written_bytes(self) -> int:
        """Bytes of the file that are written."""
        return sum(e - s for s, e in zip(self._w_starts, self._w_ends, strict=True))

    def fully_written(self, host_offset: int, length: int) -> bool:
        """True when ``[host_offset, host_offset + length)`` is all written (fast path)."""
        if host_offset >= self.file_size:
            return True
        i = bisect.bisect_right(self._w_starts, host_offset) - 1
        end = min(host_offset + length, self.file_size)
        return i >= 0 and self._w_ends[i] >= end

    def classify(self, host_offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """Split ``[host_offset, host_offset + length)`` by what the file holds.

        Yields ``(start, end, state)`` relative to ``host_offset``, in order,
        covering the range; ``state`` is WRITTEN, UNWRITTEN or HOLE, and
        touching pieces of one state are merged.
        """
        end = host_offset + length
        pos = host_offset
        w_starts, w_ends = self._w_starts, self._w_ends
        u_starts, u_ends = self._unwritten_starts, self._unwritten_ends
        i = max(0, bisect.bisect_right(w_ends, pos))
        j = max(0, bisect.bisect_right(u_ends, pos))
        pending: list[int] | None = None  # [start, end, state], absolute
        file_end = min(end, self.file_size)
        while pos < file_end:
            nxt_w = w_starts[i] if i < len(w_starts) else file_end
            nxt_u = u_starts[j] if j < len(u_starts) else file_end
            if nxt_w <= pos:
                piece_end, state = min(w_ends[i], file_end), WRITTEN
                i += 1
            elif nxt_u <= pos:
                piece_end, state = min(u_ends[j], file_end), UNWRITTEN
                j += 1
            else:
                piece_end, state = min(nxt_w, nxt_u, file_end), HOLE
            if pending is not None and pending[2] == state:
                pending[1] = piece_end
            else:
                if pending is not None:
                    yield pending[0] - host_offset, pending[1] - host_offset, pending[2]
                pending = [pos, piece_end, state]
            pos = piece_end
        if pos < end:  # past the end of the file: counts as written
            if pending is not None and pending[2] == WRITTEN:
                pending[1] = end
            else:
                if pending is not None:
                    yield pending[0] - host_offset, pending[1] - host_offset, pending[2]
                pending = [pos, end, WRITTEN]
        if pending is not None:
            yield pending[0] - host_offset, pending[1] - host_offset, pending[2]

    def iter_written(self, host_offset: int = 0) -> Iterator[tuple[int, int]]:
        """Written ranges ``(start, end)`` that end after ``host_offset``, clipped to it."""
        i = bisect.bisect_right(self._w_ends, host_offset)
        for k in range(i, len(self._w_starts)):
            yield max(self._w_starts[k], host_offset), self._w_ends[k]


def _add(ranges: list[tuple[int, int]], start: int, end: int) -> None:
    """Append ``[start, end)`` to sorted ``ranges``, merging a touching last range."""
    if end <= start:
        return
    if ranges and ranges[-1][1] >= start:
        ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
    else:
        ranges.append((start, end))


def _fiemap(fd: int, file_size: int) -> HostMap | None:
    """The map from FIEMAP, or None when the filesystem refuses FIEMAP."""
    written: list[tuple[int, int]] = []
    unwritten: list[tuple[int, int]] = []
    buf = bytearray(_FIEMAP_HEAD.size + _EXTENTS_PER_CALL * _FIEMAP_EXTENT.size)
    pos = 0
    flags = FIEMAP_FLAG_SYNC  # flush delayed allocations once, at the first call
    while pos < file_size:
        _FIEMAP_HEAD.pack_into(buf, 0, pos, file_size - pos, flags, 0, _EXTENTS_PER_CALL, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                return None
            raise
        flags = 0
        mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
        if mapped == 0:
            break
        last = False
        for k in range(mapped):
            logical, _, length, fe_flags = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEAD.size + k * _FIEMAP_EXTENT.size
            )
            start, end = max(logical, pos), min(logical + length, file_size)
            if fe_flags & FIEMAP_EXTENT_UNWRITTEN:
                _add(unwritten, start, end)
            else:
                _add(written, start, end)
            pos = max(pos, logical + length)
            last = bool(fe_flags & FIEMAP_EXTENT_LAST)
        if last:
            break
    return HostMap(file_size, written, unwritten, METHOD_FIEMAP)


def _seek_map(fd: int, file_size: int) -> HostMap | None:
    """The map from SEEK_DATA/SEEK_HOLE, or None when they are not supported."""
    written: list[tuple[int, int]] = []
    pos = 0
    while pos < file_size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            if exc.errno in _UNSUPPORTED:
                return None
            raise
        if data >= file_size:
            break
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                return None
            raise
        hole = min(hole, file_size)
        if hole <= data:  # the file changed under us: stop guessing
            return None
        _add(written, data, hole)
        pos = hole
    return HostMap(file_size, written, [], METHOD_SEEK)


def host_map(fd: int, file_size: int, path: str = "?") -> HostMap:
    """Learn the written map of the open file ``fd`` (``file_size`` bytes long).

    Raises:
        ImageReadError: the filesystem failed the query with an I/O error.
    """
    try:
        found = _fiemap(fd, file_size)
        if found is None:
            found = _seek_map(fd, file_size)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot map the file's extents: {exc.strerror}") from exc
    return found if found is not None else HostMap.all_written(file_size)
