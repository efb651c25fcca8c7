"""A layered image: the runs of one layer over the source below it.

Every format describes one layer (a VHD, a VDI, a VMDK extent set, ...) as
runs of guest bytes of one kind; :class:`LayeredImage` turns "this layer +
the source below (parent, backing file)" into a
:class:`~sparsefs.extents.SparseSource` and a ``qemu-img map``-shaped map.
Reads, extents (lseek, ``st_blocks``, checksums) and the map all come from
the one walk, :meth:`Layer.runs`.

The resolution of a parent or backing file name, written once for every
format, is in :mod:`sparsefs.parents` (re-exported here).

Knows nothing of FUSE or of any format's layout.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from sparsefs import locking
from sparsefs.errors import ImageFormatError, ImageReadError, UnsupportedFeatureError
from sparsefs.extents import Extent, SparseSource, coalesce
from sparsefs.hostmap import HOLE, WRITTEN
from sparsefs.parents import check_regular_file as check_regular_file
from sparsefs.parents import file_identity as file_identity
from sparsefs.parents import path_has_protocol as path_has_protocol
from sparsefs.parents import resolve_name as resolve_name
from sparsefs.raw import RawFile

# Kinds of runs (spec-neutral; the numbers match qcow2's RUN_* constants).
DATA = 0  # stored in this layer; host = (RawFile, host_offset of the run's start)
OTHER = 1  # stored, needs the layer's decoder; host is the layer's own descriptor
ZERO = 2  # reads as zeros here and hides what is below
BELOW = 3  # not stored here: the source below, zeros past its end or without one
ERROR = 4  # broken metadata; host = one-line message naming the file
# Mapped to host bytes that the host file stores as nothing (a hole or an
# unwritten extent: qcow2 preallocation=metadata/falloc).  Reads as zeros
# without a read and is a hole for copies, yet is "data" in qemu-img map's
# sense; host = (RawFile, host_offset, zero_in_map): qemu-img map says "zero"
# for its file holes only when zero_in_map (the image file itself, not an
# external data file).
UNWRITTEN = 5

KIND_NAMES = {
    DATA: "data",
    OTHER: "other",
    ZERO: "zero",
    BELOW: "below",
    ERROR: "error",
    UNWRITTEN: "unwritten",
}

# Images in one chain, the top included (deeper chains are refused).
MAX_CHAIN_LENGTH = 128
# Cleared when preadv(RWF_NOWAIT) is refused (EOPNOTSUPP): then read_nowait gives up.
_nowait_ok = [hasattr(os, "RWF_NOWAIT")]
# Shared zeros that read_nowait answers holes with (read-only views of it).
_ZEROS = bytes(4 * 1024 * 1024)
_ZEROS_VIEW = memoryview(_ZEROS)


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One entry of ``sparsefs map``, shaped like ``qemu-img map --output=json``."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    compressed: bool
    offset: int | None

    def as_dict(self) -> dict[str, Any]:
        """The qemu-img map JSON object for this entry."""
        d: dict[str, Any] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
            "compressed": self.compressed,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        return d


def map_continues(a: MapEntry, b: MapEntry) -> bool:
    """True when ``b`` extends ``a`` into one qemu-img map entry."""
    if (a.depth, a.present, a.zero, a.data, a.compressed) != (
        b.depth,
        b.present,
        b.zero,
        b.data,
        b.compressed,
    ) or a.start + a.length != b.start:
        return False
    if a.offset is None or b.offset is None:
        return a.offset is None and b.offset is None and not a.compressed
    return a.offset + a.length == b.offset


def merge_map(entries: Iterator[MapEntry]) -> Iterator[MapEntry]:
    """Merge touching entries that qemu-img map would print as one."""
    pending: MapEntry | None = None
    for entry in entries:
        if pending is not None and map_continues(pending, entry):
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


class LayerOptions(Protocol):
    """What a format reads of the open options (sparsefs.formats.qcow2.OpenOptions has them)."""

    @property
    def backing(self) -> bool:
        """Follow parents / backing files."""
        ...

    @property
    def backing_dir(self) -> str | None:
        """When set, every parent must resolve inside it."""
        ...

    @property
    def force_share(self) -> bool:
        """Take no image locks."""
        ...


class Layer(Protocol):
    """One layer of an image: its own map as runs, and how to read a run."""

    path: str
    size: int
    format_name: str

    def runs(self, guest_start: int, guest_end: int) -> Iterator[tuple[int, int, int, Any]]:
        """Yield ``(start, end, kind, host)`` in order, covering ``[guest_start, guest_end)``.

        ``guest_end`` is at most :attr:`size`.  For DATA, ``host`` is
        ``(raw, host_offset)`` with ``host_offset`` the host byte of ``start``.
        """
        ...

    def read_other(self, start: int, end: int, host: Any) -> bytes:
        """The guest bytes of an OTHER run (or part of one) ``[start, end)``.

        Raises:
            ImageReadError: the run cannot be decoded.
        """
        ...

    def close(self) -> None:
        """Release the layer's files; idempotent."""
        ...

    def describe(self) -> dict[str, Any]:
        """Format-specific facts for ``sparsefs info`` (JSON-ready)."""
        ...


# Optional: splits_host_holes = True asks LayeredImage to split the layer's DATA
# runs by the host file's written map: host bytes stored as nothing become
# UNWRITTEN (holes for copies, data in the map).  For formats that allocate a
# whole block and write only part of it, leaving the rest a hole in the file
# (VHDX).  qcow2 splits its L2 tables itself, once, when it decodes them.
#
# Optional, for read_nowait (looked up with getattr, so a layer may lack them):
#   cached_runs(guest_start, guest_end): runs() from memory only; raises
#       (any exception) where it would have to read metadata from disk.
#   read_other_nowait(start, end, host) -> bytes | None: read_other() from
#       memory only, or None.


def split_unwritten(
    runs: Iterator[tuple[int, int, int, Any]],
) -> Iterator[tuple[int, int, int, Any]]:
    """``runs`` with each DATA run split by its host file's written map.

    Host bytes the file stores as nothing (a hole, an unwritten extent; see
    :mod:`sparsefs.hostmap`) become UNWRITTEN: zeros for reads and copies, yet
    data in the map (zero_in_map False: qemu-img map does not ask the file
    below such formats).  One bisect per DATA run when the file is written
    throughout.
    """
    for run in runs:
        s, e, kind, host = run
        if kind != DATA:
            yield run
            continue
        raw, host_offset = host
        host_map = raw.written_map()
        if host_map.fully_written(host_offset, e - s):
            yield run
            continue
        for rel_s, rel_e, state in host_map.classify(host_offset, e - s):
            if state == WRITTEN:
                yield (s + rel_s, s + rel_e, DATA, (raw, host_offset + rel_s))
            else:
                yield (s + rel_s, s + rel_e, UNWRITTEN, (raw, host_offset + rel_s, False))


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

    def _nowait_runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, Any]]:
        """The layer's runs from memory only (``cached_runs``), or its plain runs."""
        cached = getattr(self.layer, "cached_runs", None)
        if cached is None:
            return self._runs(start, end)
        runs: Iterator[tuple[int, int, int, Any]] = cached(start, end)
        return split_unwritten(runs) if self._split else runs

    def _reads_zeros(self, guest_offset: int, end: int) -> bool:
        """True when ``[guest_offset, end)`` reads as zeros in every layer; never blocks."""
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


def below_map(below: SparseSource | None, s: int, e: int, depth: int) -> Iterator[MapEntry]:
    """Map entries of ``[s, e)`` not stored in a layer at ``depth``: from ``below``.

    Past the end of ``below`` (or without one) the layer itself answers
    "zero, not present", as qemu does.
    """
    if below is None or s >= below.size:
        yield MapEntry(s, e - s, depth, False, True, False, False, None)
        return
    stop = min(e, below.size)
    deeper = getattr(below, "_iter_map_raw", None)
    if deeper is not None:
        yield from deeper(s, stop, depth + 1)
    else:
        for x in clip_extents(below, s, stop):
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
    if e > stop:
        yield MapEntry(stop, e - stop, depth, False, True, False, False, None)


def clip_extents(source: SparseSource, start: int, end: int) -> Iterator[Extent]:
    """Extents of ``source`` over ``[start, end)``, clipped."""
    for ext in source.iter_extents(start):
        if ext.guest_offset >= end:
            break
        if ext.end > end:
            yield Extent(ext.guest_offset, end - ext.guest_offset, ext.data, ext.zero)
            break
        yield ext


class ImageFileLayer:
    """The opening every one-file layer shares (vpc, vdi): the file, qemu's lock, checks.

    Opens ``path`` read-only, takes qemu's read-side image lock unless
    ``force_share``, runs the subclass's ``_open()`` (parse and validate), and
    then makes every later read strict: the metadata maps only host bytes inside
    the file (checked at open, or an ERROR run), so a short read means the file
    shrank.  Closes the file if anything fails.
    """

    def __init__(self, path: str, options: LayerOptions) -> None:
        self.path = path
        self.raw = RawFile(path)
        try:
            if not options.force_share:
                locking.lock_file(self.raw.fd, path, locking.ROLE_IMAGE)
            self._open()
            self.raw.strict_end = True
        except BaseException:
            self.raw.close()
            raise

    def _open(self) -> None:
        raise NotImplementedError

    def _err(self, problem: str) -> ImageFormatError:
        return ImageFormatError(f"{self.path}: {problem}")

    def _refuse(self, problem: str) -> UnsupportedFeatureError:
        return UnsupportedFeatureError(f"{self.path}: {problem}")
