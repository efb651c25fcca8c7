"""A layered image: the runs of one layer over the source below it.

Every format describes one layer (a VHD, a VDI, a VMDK extent set, ...) as
runs of guest bytes of one kind; :class:`LayeredImage` turns "this layer +
the source below (parent, backing file)" into a
:class:`~sparsefs.extents.SparseSource` and a ``qemu-img map``-shaped map.
Reads, extents (lseek, ``st_blocks``, checksums) and the map all come from
the one walk, :meth:`Layer.runs`.

What one layer supplies is in :mod:`sparsefs.layer`, the map entries in
:mod:`sparsefs.imagemap`, the resolution of a parent or backing file name,
written once for every format, in :mod:`sparsefs.parents`; this module
re-exports their names, so formats import one module.

Knows nothing of FUSE or of any format's layout.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

from sparsefs.chainmap import ChainMap
from sparsefs.errors import ImageReadError
from sparsefs.extents import Extent, SparseSource, clip_extents, coalesce
from sparsefs.hostmap import HOLE
from sparsefs.imagemap import MapEntry as MapEntry
from sparsefs.imagemap import below_map as below_map
from sparsefs.imagemap import map_continues as map_continues
from sparsefs.imagemap import merge_map as merge_map
from sparsefs.layer import BELOW as BELOW
from sparsefs.layer import DATA as DATA
from sparsefs.layer import ERROR as ERROR
from sparsefs.layer import KIND_NAMES as KIND_NAMES
from sparsefs.layer import OTHER as OTHER
from sparsefs.layer import UNWRITTEN as UNWRITTEN
from sparsefs.layer import ZERO as ZERO
from sparsefs.layer import ImageFileLayer as ImageFileLayer
from sparsefs.layer import Layer as Layer
from sparsefs.layer import LayerOptions as LayerOptions
from sparsefs.layer import split_unwritten as split_unwritten
from sparsefs.parents import check_regular_file as check_regular_file
from sparsefs.parents import file_identity as file_identity
from sparsefs.parents import path_has_protocol as path_has_protocol
from sparsefs.parents import resolve_name as resolve_name

# Images in one chain, the top included (deeper chains are refused).
MAX_CHAIN_LENGTH = 128
# Cleared when preadv(RWF_NOWAIT) is refused (EOPNOTSUPP): then read_nowait gives up.
_nowait_ok = [hasattr(os, "RWF_NOWAIT")]
# Shared zeros that read_nowait answers holes with (read-only views of it).
_ZEROS = bytes(4 * 1024 * 1024)
_ZEROS_VIEW = memoryview(_ZEROS)


class LayeredImage:
    """A layer over the source below it, as a SparseSource.

    Args:
        layer: the top layer (closed with this image).
        below: the parent or backing source, or None (BELOW runs read zeros).
            Closed with this image.
    """

    def __init__(self, layer: Layer, below: SparseSource | None) -> None:
        self.layer = layer
        self._below = below
        self._split = bool(getattr(layer, "splits_host_holes", False))
        # Over a layered source (a chain): reads resolved per region, whatever the depth.
        self._flat = ChainMap(self) if isinstance(below, LayeredImage) else None

    def _runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, Any]]:
        """The layer's runs (split by the host file's holes when the layer asks)."""
        runs = self.layer.runs(start, end)
        return split_unwritten(runs) if self._split else runs

    @property
    def path(self) -> str:
        """The top layer's file."""
        return self.layer.path

    @property
    def format_name(self) -> str:
        """qemu's name of the top layer's format."""
        return self.layer.format_name

    @property
    def size(self) -> int:
        """Guest size in bytes (the top layer's)."""
        return self.layer.size

    @property
    def backing(self) -> SparseSource | None:
        """The source below, or None."""
        return self._below

    def close(self) -> None:
        """Close the layer and everything below; idempotent."""
        self.layer.close()
        below, self._below = self._below, None
        close = getattr(below, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> LayeredImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """The top layer's own facts."""
        return self.layer.describe()

    @property
    def snapshots(self) -> list[Any]:
        """Internal snapshots: none in a layered image."""
        return []

    def read(self, guest_offset: int, length: int) -> bytes:
        """Guest bytes ``[guest_offset, guest_offset + length)``, shortened at the end.

        Raises:
            ImageReadError: a part of the range cannot be read.
        """
        end = min(guest_offset + length, self.size)
        if guest_offset >= end:
            return b""
        if self._flat is not None:
            return self._flat.read(guest_offset, end)
        parts: list[bytes] = []
        for s, e, kind, host in self._runs(guest_offset, end):
            if kind == DATA:
                parts.append(host[0].pread(host[1], e - s))
            elif kind == ZERO or kind == UNWRITTEN:  # noqa: SIM109 (hot path)
                parts.append(bytes(e - s))
            elif kind == BELOW:
                parts.append(self._read_below(s, e - s))
            elif kind == OTHER:
                parts.append(self.layer.read_other(s, e, host))
            else:
                raise ImageReadError(str(host))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_nowait(self, guest_offset: int, length: int) -> bytes | bytearray | memoryview | None:
        """Like :meth:`read`, from memory only: the page cache, the caches, zeros.

        Returns the guest bytes (shortened at the end), or None when a part
        would have to wait or fail: metadata not in memory (the layer's
        ``cached_runs`` refuses), host data not in the page cache (``preadv``
        with ``RWF_NOWAIT``), an OTHER run the layer cannot serve from memory
        (``read_other_nowait``), an ERROR run, a source below without
        ``read_nowait``.  The caller then uses :meth:`read` in a thread, which
        also reports the errors.  A range that is all holes comes back as a
        read-only view of a shared zero buffer (no allocation).  Never raises.
        """
        end = min(guest_offset + length, self.size)
        if guest_offset >= end:
            return b""
        if end - guest_offset <= len(_ZEROS) and self._reads_zeros(guest_offset, end):
            return _ZEROS_VIEW[: end - guest_offset]
        if not _nowait_ok[0]:
            return None
        out = bytearray(end - guest_offset)
        with memoryview(out) as view:
            if not self._read_nowait_into(view, guest_offset, end):
                return None
        return out

    def _flat_nowait_into(self, view: memoryview, guest_offset: int, end: int) -> bool:
        """:meth:`_read_nowait_into` of a chain, from its resolved regions (sparsefs.chainmap)."""
        assert self._flat is not None
        try:
            return self._flat.read_nowait_into(view, guest_offset, end)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                _nowait_ok[0] = False  # the filesystem cannot: stop trying
            return False
        except Exception:
            return False

    def _nowait_runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, Any]]:
        """The layer's runs from memory only (``cached_runs``), or its plain runs."""
        cached = getattr(self.layer, "cached_runs", None)
        if cached is None:
            return self._runs(start, end)
        runs: Iterator[tuple[int, int, int, Any]] = cached(start, end)
        return split_unwritten(runs) if self._split else runs

    def _reads_zeros(self, guest_offset: int, end: int) -> bool:
        """True when ``[guest_offset, end)`` reads as zeros in every layer; never blocks."""
        if self._flat is not None:
            try:
                return self._flat.reads_zeros(guest_offset, end)
            except Exception:
                return False
        try:
            for s, e, kind, _ in self._nowait_runs(guest_offset, end):
                if kind == ZERO or kind == UNWRITTEN:  # noqa: SIM109 (hot path)
                    continue
                if kind != BELOW:
                    return False
                below = self._below
                if below is None or s >= below.size:
                    continue
                deeper = getattr(below, "_reads_zeros", None)
                if deeper is None or not deeper(s, min(e, below.size)):
                    return False
        except Exception:
            return False
        return True

    def _read_nowait_into(self, view: memoryview, guest_offset: int, end: int) -> bool:
        """Fill ``view`` (zeroed, for guest bytes from ``guest_offset``) without blocking."""
        if self._flat is not None:
            return self._flat_nowait_into(view, guest_offset, end)
        try:
            for s, e, kind, host in self._nowait_runs(guest_offset, end):
                if kind == ZERO or kind == UNWRITTEN:  # noqa: SIM109 (hot path)
                    continue
                part = view[s - guest_offset : e - guest_offset]
                if kind == DATA:
                    try:
                        got = os.preadv(host[0].fd, [part], host[1], os.RWF_NOWAIT)
                    except OSError as exc:
                        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                            _nowait_ok[0] = False  # the filesystem cannot: stop trying
                        return False
                    if got != e - s:
                        return False
                elif kind == BELOW:
                    below = self._below
                    if below is None or s >= below.size:
                        continue
                    stop = min(e, below.size)
                    deeper = getattr(below, "_read_nowait_into", None)
                    if deeper is None or not deeper(part[: stop - s], s, stop):
                        return False
                elif kind == OTHER:
                    other = getattr(self.layer, "read_other_nowait", None)
                    got_other = other(s, e, host) if other is not None else None
                    if got_other is None:
                        return False
                    part[:] = got_other
                else:
                    return False
        except Exception:
            return False
        return True

    def iter_host_ranges(
        self, guest_offset: int, guest_end: int
    ) -> Iterator[tuple[int, int, Any, int]]:
        """What a copy of ``[guest_offset, guest_end)`` must write, piece by piece.

        The contract of ``Qcow2Image.iter_host_ranges``: yields ``(guest_start,
        guest_end, file, host_offset)`` in order, ``file`` a RawFile holding
        exactly those guest bytes at ``host_offset``, or None when the piece
        must come from :meth:`read` (OTHER and ERROR runs, a source below that
        cannot say).  Ranges that read as zeros are left out: ZERO runs, BELOW
        runs with nothing below, and DATA over host bytes the file stores as
        nothing (:meth:`sparsefs.raw.RawFile.written_map`).
        """
        if self._flat is not None:
            yield from self._flat.host_ranges(guest_offset, min(guest_end, self.size))
            return
        below = self._below
        # Split by the host file's holes for every layer, asked or not: a copy
        # never reads what the file stores as nothing (the map may call it data).
        runs = split_unwritten(self.layer.runs(guest_offset, min(guest_end, self.size)))
        for s, e, kind, host in runs:
            if kind == DATA:
                yield (s, e, host[0], host[1])
            elif kind == ZERO or kind == UNWRITTEN:  # noqa: SIM109 (hot path)
                continue
            elif kind == BELOW:
                if below is None or s >= below.size:
                    continue
                stop = min(e, below.size)
                deeper = getattr(below, "iter_host_ranges", None)
                if deeper is None:
                    yield (s, stop, None, 0)
                else:
                    yield from deeper(s, stop)
            else:
                yield (s, e, None, 0)

    def _read_below(self, guest_offset: int, length: int) -> bytes:
        below = self._below
        if below is None or guest_offset >= below.size:
            return bytes(length)
        got = below.read(guest_offset, length)
        if len(got) < length:
            got += bytes(length - len(got))
        return got

    def iter_extents(self, guest_offset: int = 0) -> Iterator[Extent]:
        """Data and hole runs from ``guest_offset`` to the end, merged.

        DATA, OTHER and ERROR runs are data (a broken range reads as EIO, so a
        copier fails instead of skipping it); ZERO and UNWRITTEN runs are
        holes; BELOW runs are what the source below says, holes past its end
        or without one.
        """
        if self._below is None:
            return self._iter_top_extents(guest_offset)
        return coalesce(self._iter_layer_extents(guest_offset, self.size))

    def _iter_top_extents(self, guest_offset: int) -> Iterator[Extent]:
        """:meth:`iter_extents` of a layer with nothing below, in one pass.

        The same answer as the general path (ZERO, UNWRITTEN and BELOW runs
        are holes, everything else data, touching runs of a kind merged),
        without its layers of generators: this is what every lseek walks.
        """
        pending_start = pending_end = guest_offset
        pending_data = False
        for s, e, kind, _ in self._runs(guest_offset, self.size):
            data = kind != ZERO and kind != BELOW and kind != UNWRITTEN
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
        below = self._below
        for s, e, kind, _ in self._runs(start, end):
            if kind == ZERO or kind == UNWRITTEN:  # noqa: SIM109 (hot path)
                yield Extent(s, e - s, data=False, zero=True)
            elif kind != BELOW:
                yield Extent(s, e - s, data=True)
            elif below is None or s >= below.size:
                yield Extent(s, e - s, data=False, zero=True)
            else:
                stop = min(e, below.size)
                # A layered source below walks only [s, stop): clip_extents over its
                # iter_extents would walk on to its end, and the look-ahead of each
                # level's coalesce would start the walk below again, level by level
                # (a 20-point chain took 12 s to walk; now linear in the depth).
                bounded = getattr(below, "_iter_layer_extents", None)
                if bounded is not None:
                    yield from bounded(s, stop)
                else:
                    yield from clip_extents(below, s, stop)
                if e > stop:
                    yield Extent(stop, e - stop, data=False, zero=True)

    def iter_map(self, depth: int = 0) -> Iterator[MapEntry]:
        """The map in the shape of ``qemu-img map --output=json`` (merged)."""
        return merge_map(self._iter_map_raw(0, self.size, depth))

    def _iter_map_raw(self, start: int, end: int, depth: int) -> Iterator[MapEntry]:
        """Unmerged map entries of ``[start, end)``; this layer is at ``depth``."""
        for s, e, kind, host in self._runs(start, end):
            n = e - s
            if kind == DATA:
                yield MapEntry(s, n, depth, True, False, True, False, host[1])
            elif kind == OTHER:
                yield MapEntry(s, n, depth, True, False, True, True, None)
            elif kind == ZERO:
                yield MapEntry(s, n, depth, True, True, False, False, None)
            elif kind == ERROR:
                yield MapEntry(s, n, depth, True, False, True, False, None)
            elif kind == UNWRITTEN:
                # qemu-img map: data (allocated), and "zero" where the image
                # file has a hole (qemu asks the file layer below a
                # preallocated image); an unwritten extent, or anything in an
                # external data file, it calls data only.
                raw, host_offset, zero_in_map = host
                for rel_s, rel_e, state in raw.written_map().classify(host_offset, n):
                    yield MapEntry(
                        s + rel_s,
                        rel_e - rel_s,
                        depth,
                        True,
                        zero_in_map and state == HOLE,
                        True,
                        False,
                        host_offset + rel_s,
                    )
            else:
                yield from below_map(self._below, s, e, depth)

    def chain(self) -> list[tuple[str, str]]:
        """The chain below this image: (path, format) pairs, top first."""
        out: list[tuple[str, str]] = []
        layer = self._below
        while layer is not None:
            name = getattr(layer, "format_name", None)
            if name is None:
                name = "qcow2" if hasattr(layer, "qfile") else "raw"
            out.append((getattr(layer, "path", "?"), name))
            layer = getattr(layer, "backing", None)
        return out
