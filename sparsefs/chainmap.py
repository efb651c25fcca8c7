"""A backing chain resolved once per region: a read of the top goes to the layer holding it.

Reading a layered image whose source below is itself layered walks every
layer for every request (each BELOW run asks the image below, which asks the
one below it, ...): a point at the top of a 30-point chain paid 30 walks per
read.  :class:`ChainMap` resolves each region of the guest space (64 MiB)
once, on first use, into runs that name the layer holding them: stored data
(host file and offset), a compressed or otherwise decoded run (the layer that
decodes it), zeros, a broken range, or a source below the last layer that is
not layered (a raw file: read from it).  Later reads of the region bisect
those runs and read the host bytes directly, whatever the depth.

The images are read-only, so a resolved region never changes; the cache is
bounded (:data:`MAX_REGIONS`) and simply emptied when full.  Offsets are
guest offsets in bytes.  Knows nothing of FUSE or of any format's layout.
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Iterator
from typing import Any, Protocol

from sparsefs.errors import ImageReadError
from sparsefs.layer import BELOW, DATA, OTHER, UNWRITTEN, ZERO, split_unwritten

REGION_BITS = 26  # 64 MiB of guest space per resolved region
MAX_REGIONS = 4096  # resolved regions kept (then the cache is emptied)
HOLE = -1  # no layer holds it and nothing is below (or past the end of what is): zeros
SOURCE = -2  # held by the non-layered source below the last layer: read from it

# (start, end, kind, host, owner): host as the layer's runs give it (DATA: (raw,
# host offset of start)); owner: the layer (OTHER), or the source (SOURCE).
Run = tuple[int, int, int, Any, Any]


class Chain(Protocol):
    """What :class:`ChainMap` needs of a layered image (sparsefs.layered.LayeredImage)."""

    layer: Any

    @property
    def size(self) -> int:
        """Guest size in bytes."""
        ...

    @property
    def backing(self) -> Any:
        """The source below, or None."""
        ...

    def _runs(self, start: int, end: int) -> Any: ...


def _is_layered(source: Any) -> bool:
    return hasattr(source, "_runs") and hasattr(source, "layer")


def resolve(image: Chain, start: int, end: int, out: list[Run]) -> None:
    """Append the resolved runs of ``[start, end)`` of ``image`` to ``out``, in order."""
    for s, e, kind, host in image._runs(start, end):
        if kind != BELOW:
            out.append((s, e, kind, host, image.layer))
            continue
        below = image.backing
        if below is None or s >= below.size:
            out.append((s, e, HOLE, None, None))
            continue
        stop = min(e, below.size)
        if _is_layered(below):
            resolve(below, s, stop, out)
        else:
            out.append((s, stop, SOURCE, None, below))
        if e > stop:
            out.append((stop, e, HOLE, None, None))


class ChainMap:
    """The resolved runs of ``top``'s guest space, region by region (module docstring)."""

    def __init__(self, top: Chain) -> None:
        self._top = top
        self._regions: dict[int, tuple[list[int], list[Run]]] = {}

    def region(self, index: int) -> tuple[list[int], list[Run]]:
        """Run starts and runs of region ``index`` (resolved now if it was not)."""
        got = self._regions.get(index)
        if got is None:
            start = index << REGION_BITS
            runs: list[Run] = []
            resolve(self._top, start, min(start + (1 << REGION_BITS), self._top.size), runs)
            got = ([r[0] for r in runs], runs)
            if len(self._regions) >= MAX_REGIONS:
                self._regions.clear()
            self._regions[index] = got
        return got

    def _pieces(self, pos: int, end: int, cached: bool) -> Any:
        """(start, stop, run) of the runs covering ``[pos, end)``; None when not resolved."""
        while pos < end:
            index = pos >> REGION_BITS
            if cached and index not in self._regions:
                yield None
                return
            starts, runs = self.region(index)
            stop_region = min(end, (index + 1) << REGION_BITS)
            i = bisect.bisect_right(starts, pos) - 1
            while pos < stop_region:
                run = runs[i]
                stop = min(run[1], stop_region)
                yield pos, stop, run
                pos = stop
                i += 1

    def read(self, guest_offset: int, end: int) -> bytes:
        """Guest bytes ``[guest_offset, end)`` (``end`` at most the size).

        Raises:
            ImageReadError: a part of the range cannot be read.
        """
        parts: list[bytes] = []
        for s, e, (rs, _, kind, host, owner) in self._pieces(guest_offset, end, False):
            if kind == DATA:
                parts.append(host[0].pread(host[1] + s - rs, e - s))
            elif kind in (ZERO, UNWRITTEN, HOLE):
                parts.append(bytes(e - s))
            elif kind == OTHER:
                parts.append(owner.read_other(s, e, host))
            elif kind == SOURCE:
                got = owner.read(s, e - s)
                parts.append(got + bytes(e - s - len(got)) if len(got) < e - s else got)
            else:
                raise ImageReadError(str(host))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def host_ranges(self, guest_offset: int, end: int) -> Iterator[tuple[int, int, Any, int]]:
        """``LayeredImage.iter_host_ranges`` of ``[guest_offset, end)``, from the resolved runs.

        (start, end, raw file, host offset) of what a copy must read, in order;
        raw None where the bytes must come from ``read`` (decoded and broken
        runs, a source below that cannot say); ranges reading as zeros (and
        host bytes the file stores as nothing) are left out.
        """
        for s, e, (rs, _, kind, host, owner) in self._pieces(guest_offset, end, False):
            if kind == DATA:
                split = split_unwritten(iter([(s, e, DATA, (host[0], host[1] + s - rs))]))
                for s2, e2, k2, h2 in split:
                    if k2 == DATA:
                        yield (s2, e2, h2[0], h2[1])
            elif kind in (ZERO, UNWRITTEN, HOLE):
                continue
            elif kind == SOURCE:
                deeper = getattr(owner, "iter_host_ranges", None)
                if deeper is None:
                    yield (s, e, None, 0)
                else:
                    yield from deeper(s, e)
            else:
                yield (s, e, None, 0)

    def reads_zeros(self, guest_offset: int, end: int) -> bool:
        """True when ``[guest_offset, end)`` is known to read as zeros, from memory only."""
        for piece in self._pieces(guest_offset, end, True):
            if piece is None:
                return False
            s, e, (_, _, kind, _, owner) = piece
            if kind in (ZERO, UNWRITTEN, HOLE):
                continue
            if kind != SOURCE:
                return False
            deeper = getattr(owner, "_reads_zeros", None)
            if deeper is None or not deeper(s, e):
                return False
        return True

    def read_nowait_into(self, view: memoryview, guest_offset: int, end: int) -> bool:
        """Fill ``view`` (zeroed) with ``[guest_offset, end)`` from memory only; False if not.

        Not from memory: a region not resolved yet, host bytes not in the page
        cache, a run the layer cannot decode from its caches, an error run, a
        source below without ``_read_nowait_into``.
        """
        for piece in self._pieces(guest_offset, end, True):
            if piece is None:
                return False
            s, e, (rs, _, kind, host, owner) = piece
            if kind in (ZERO, UNWRITTEN, HOLE):
                continue
            part = view[s - guest_offset : e - guest_offset]
            if kind == DATA:
                try:
                    got = os.preadv(host[0].fd, [part], host[1] + s - rs, os.RWF_NOWAIT)
                except OSError as exc:
                    if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    return False
                if got != e - s:
                    return False
            elif kind == OTHER:
                other = getattr(owner, "read_other_nowait", None)
                data = other(s, e, host) if other is not None else None
                if data is None:
                    return False
                part[:] = data
            elif kind == SOURCE:
                deeper = getattr(owner, "_read_nowait_into", None)
                stop = min(e, owner.size)
                if stop > s and (deeper is None or not deeper(part[: stop - s], s, stop)):
                    return False
            else:
                return False
        return True
