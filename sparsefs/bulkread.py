"""How bulk readers read a source: its host ranges straight into a buffer.

Backup, checksum and verify read large ranges once.  For sources that name
their host ranges (``iter_host_ranges``: raw files and every layered
format), :func:`fill_from_host` reads the data
straight into the caller's buffer with
:meth:`~sparsefs.raw.RawFile.pread_into_uncached` (the page cache where it
holds the range, O_DIRECT where it does not), zeros fill the rest, and only
the pieces a format must decode go through ``read()``.

Knows sources only as :class:`~sparsefs.extents.SparseSource`; never FUSE, never
a format.
"""

from __future__ import annotations

import functools

from sparsefs.errors import ImageReadError
from sparsefs.extents import SparseSource


@functools.lru_cache(maxsize=8)
def _zeros(length: int) -> bytes:
    return bytes(length)


def fill_from_host(source: SparseSource, view: memoryview, offset: int) -> bool:
    """Fill ``view`` with guest bytes from ``offset`` by positional reads of the host files.

    For sources that name their host ranges (``iter_host_ranges``: qcow2,
    raw): data goes straight into ``view`` (no intermediate bytes objects),
    zeros fill the rest, pieces the source cannot name come from ``read()``.
    Returns False (nothing done) for other sources.

    Raises:
        ImageReadError: a read failed (``RawFile.pread_into``'s rule).
    """
    host_ranges = getattr(source, "iter_host_ranges", None)
    if host_ranges is None:
        return False
    end = offset + len(view)
    pos = offset
    for start, stop, raw, host in host_ranges(offset, end):
        if start > pos:
            view[pos - offset : start - offset] = _zeros(start - pos)
        part = view[start - offset : stop - offset]
        if raw is None:
            part[:] = read_exact(source, start, stop - start)
        else:
            raw.pread_into_uncached(part, host)
        pos = stop
    if pos < end:
        view[pos - offset :] = _zeros(end - pos)
    return True


def read_exact(source: SparseSource, offset: int, length: int) -> bytes:
    """``source.read`` that must return ``length`` bytes.

    Raises:
        ImageReadError: the source returned fewer.
    """
    buf = source.read(offset, length)
    if len(buf) != length:
        raise ImageReadError(
            f"short read of {length} bytes at guest offset {offset} ({len(buf)} bytes)"
        )
    return buf
