"""Read-only qcow2 images: open and validate, walk the cluster map, read.

:class:`Qcow2Image` is a :class:`~sparsefs.extents.SparseSource`.  Everything
it serves comes from one walk, :meth:`Qcow2Image.iter_runs`, which decodes L1
and L2 entries into runs of one kind (stored data, compressed cluster, zeros,
unallocated, broken).  Reads, the extent map, lseek and checksums all go
through it; nothing else decodes an L2 entry.

All I/O is ``os.pread`` on descriptors opened read-only, so concurrent reads
from several threads are safe; the caches take a lock only to look up and
insert.
"""

from __future__ import annotations

import bisect
import errno
import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import compress, islice, repeat
from operator import add, ne
from typing import Any

from sparsefs.errors import (
    ImageFormatError,
    ImageReadError,
    MissingFileError,
    UnsupportedFeatureError,
)
from sparsefs import locking
from sparsefs.extents import Extent, SparseSource, coalesce
from sparsefs.hostmap import HOLE, WRITTEN
from sparsefs.layered import MAX_CHAIN_LENGTH as MAX_CHAIN_LENGTH  # re-exported
from sparsefs.layered import MapEntry, resolve_name
from sparsefs.layered import check_regular_file as _check_regular_file
from sparsefs.layered import map_continues as _map_continues
from sparsefs.qcow2 import layout as L
from sparsefs.raw import RawFile

# Kinds of runs in the cluster map (mirroring qemu's QCow2SubclusterType).
RUN_DATA = 0  # stored at a host offset in the data file (NORMAL)
RUN_COMPRESSED = 1  # one compressed cluster; host is (host_offset, nb_bytes)
RUN_ZERO = 2  # reads as zeros, nothing read from below (ZERO_PLAIN / ZERO_ALLOC)
RUN_UNALLOCATED = 3  # not in this layer: the backing file, or zeros
RUN_ERROR = 4  # metadata is invalid for this range; host is the message
# Mapped to a host range that the host file stores as nothing (a hole, or an
# unwritten extent: preallocation=metadata/falloc); host as RUN_DATA.  Reads as
# zeros without a read; a hole for copies; still "data" in qemu-img map's sense.
RUN_UNWRITTEN = 5

RUN_KIND_NAMES = {
    RUN_DATA: "data",
    RUN_COMPRESSED: "compressed",
    RUN_ZERO: "zero",
    RUN_UNALLOCATED: "unallocated",
    RUN_ERROR: "error",
    RUN_UNWRITTEN: "unwritten",
}
# Kinds that read as zeros from this layer without reading anything.
_ZERO_KINDS = (RUN_ZERO, RUN_UNWRITTEN)

DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024
DEFAULT_COMPRESSED_CACHE_BYTES = 16 * 1024 * 1024
# L2 entries decoded as a block (512 bytes of a standard table): see _decode_l2.
# Cleared when preadv(RWF_NOWAIT) is refused (EOPNOTSUPP): then read_nowait gives up.
_nowait_ok = [hasattr(os, "RWF_NOWAIT")]
# Shared zeros that read_nowait answers holes with (read-only views of it).
_ZEROS = bytes(4 * 1024 * 1024)
_ZEROS_VIEW = memoryview(_ZEROS)
_L2_BLOCK_ENTRIES = 64
# L1 entries loaded per image file (active state plus snapshots), in bytes of
# on-disk table: bounds memory for images with many snapshots of huge disks.
MAX_TOTAL_L1_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Run:
    """A run of one kind: guest bytes ``[guest_offset, guest_end)``.

    ``host`` is the host offset of ``guest_offset`` for RUN_DATA, the
    (host_offset, nb_bytes) descriptor for RUN_COMPRESSED, the error message
    for RUN_ERROR, and None otherwise.
    """

    guest_offset: int
    guest_end: int
    kind: int
    host: Any


@dataclass(frozen=True, slots=True)
class OpenOptions:
    """How to open an image and its chain.

    Attributes:
        backing: follow the backing chain; False presents the top layer alone
            (unallocated ranges read as zeros and are holes).
        backing_dir: when set, every backing file must resolve inside it.
        force: open images marked corrupt.
        force_share: take no qemu image locks (``qemu-img -U``): read images
            that a running VM may be writing.
        l2_cache_bytes: bound of the decoded L2 tables kept in memory, in
            bytes (their estimated size, see ``_TableRuns.cost``), for the
            image and its backing chain together (each file gets an equal
            share, at least two tables).
        compressed_cache_bytes: bound of the decompressed clusters kept, in
            bytes, shared by the chain likewise.
    """

    backing: bool = True
    backing_dir: str | None = None
    force: bool = False
    force_share: bool = False
    l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES
    compressed_cache_bytes: int = DEFAULT_COMPRESSED_CACHE_BYTES


class _LRU:
    """A small thread-safe LRU cache bounded by the summed cost of its values."""

    def __init__(self, max_cost: int) -> None:
        self._max_cost = max_cost
        self._cost = 0
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Any, value: Any, cost: int) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (value, cost)
            self._cost += cost
            self._evict()

    def set_max_cost(self, max_cost: int) -> None:
        """Change the bound, evicting what no longer fits."""
        with self._lock:
            self._max_cost = max_cost
            self._evict()

    def _evict(self) -> None:
        while self._cost > self._max_cost and len(self._items) > 1:
            _, (_, old_cost) = self._items.popitem(last=False)
            self._cost -= old_cost

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._cost = 0


class _TableRuns:
    """The runs of one L2 table, relative to the table's first guest byte."""

    __slots__ = ("kinds", "starts", "ends", "hosts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.kinds: list[int] = []
        self.hosts: list[Any] = []

    def add(self, start: int, end: int, kind: int, host: Any) -> None:
        """Append a run, merging it into the last one when they continue each other."""
        if self.kinds and self.ends[-1] == start and kind != RUN_COMPRESSED:
            last = self.kinds[-1]
            if last == kind:
                if kind == RUN_DATA or kind == RUN_UNWRITTEN:
                    if self.hosts[-1] + (start - self.starts[-1]) == host:
                        self.ends[-1] = end
                        return
                elif kind != RUN_ERROR:
                    self.ends[-1] = end
                    return
        self.starts.append(start)
        self.ends.append(end)
        self.kinds.append(kind)
        self.hosts.append(host)

    def cost(self) -> int:
        """Approximate bytes these runs hold in memory (what the L2 cache charges).

        Measured with tracemalloc: about 115 bytes per run (four list slots,
        the int objects) plus the object itself.  A decoded table can be far
        larger than the 1 cluster on disk (extended L2 with alternating
        subclusters), or far smaller (a sparse table): charge what it holds.
        """
        return 512 + 128 * len(self.starts)


class Qcow2File:
    """An open qcow2 file: header, extensions, caches, data file, backing.

    The file is shared by the active image and its snapshots
    (:class:`Qcow2Image` views with their own L1 table).  Use
    :func:`open_image` rather than this class directly.
    """

    def __init__(self, path: str, options: OpenOptions, chain: tuple[str, ...] = ()) -> None:
        self.path = path
        self.options = options
        self._closers: list[Any] = []
        self._l1_bytes_loaded = 0
        _check_regular_file(path, "image")
        self.file = RawFile(path)
        self._closers.append(self.file)
        try:
            self._lock(self.file, locking.ROLE_IMAGE)
            self._open(chain)
        except BaseException:
            self.close()
            raise

    # -- opening and validation (qemu: qcow2_do_open) --------------------------------

    def _err(self, problem: str) -> ImageFormatError:
        return ImageFormatError(f"{self.path}: {problem}")

    def _lock(self, raw: RawFile, role: tuple[int, int]) -> None:
        """Take qemu's read-side image locks on ``raw`` unless --force-share."""
        if not self.options.force_share:
            locking.lock_file(raw.fd, raw.path, role)

    def _open(self, chain: tuple[str, ...]) -> None:
        head = self.file.pread(0, 4096)
        if self.file.file_size < 4 or head[:4] != L.QCOW2_MAGIC:
            raise self._err("not a qcow2 image (no QFI\\xfb magic)")
        try:
            header = L.Header.from_bytes(head[: self.file.file_size])
        except ValueError as exc:
            raise self._err(str(exc)) from None
        self.header = header
        if header.version not in (2, 3):
            raise UnsupportedFeatureError(
                f"{self.path}: qcow2 version {header.version} is not supported"
            )
        if not L.MIN_CLUSTER_BITS <= header.cluster_bits <= L.MAX_CLUSTER_BITS:
            raise self._err(
                f"invalid cluster_bits {header.cluster_bits} "
                f"(cluster size must be 512 B to 2 MiB)"
            )
        self.cluster_bits = header.cluster_bits
        self.cluster_size = cs = header.cluster_size
        if header.version >= 3:
            if header.header_length < L.V3_MIN_HEADER_LENGTH or header.header_length % 8:
                raise self._err(f"invalid header_length {header.header_length}")
            if header.header_length > cs:
                raise self._err(f"header_length {header.header_length} exceeds the cluster size")
        if header.refcount_order > 6:
            raise self._err(f"invalid refcount_order {header.refcount_order}")
        # qemu's qcow2_do_open refuses these although a reader never needs refcounts.
        if header.refcount_table_clusters == 0:
            raise self._err("no refcount table (refcount_table_clusters is 0)")
        if header.refcount_table_clusters * cs > L.MAX_REFTABLE_SIZE_BYTES:
            raise self._err(
                f"refcount table too large ({header.refcount_table_clusters} clusters)"
            )
        # qemu's qcow2_validate_table: aligned, and ending below 2^63 (its int64_t offsets).
        reftable_offset = header.refcount_table_offset
        reftable_bytes = header.refcount_table_clusters * cs
        if reftable_offset % cs:
            raise self._err(f"refcount table offset {reftable_offset:#x} is not cluster aligned")
        if reftable_offset > L.MAX_FILE_OFFSET - reftable_bytes:
            raise self._err(
                f"refcount table at {reftable_offset:#x} ({size_text(reftable_bytes)}) ends "
                "past the largest file offset qemu accepts (2^63 - 1)"
            )
        if header.crypt_method != L.CRYPT_NONE:
            kind = {L.CRYPT_AES: "AES", L.CRYPT_LUKS: "LUKS"}.get(
                header.crypt_method, f"method {header.crypt_method}"
            )
            raise UnsupportedFeatureError(
                f"{self.path}: encrypted image ({kind} encryption) is not supported"
            )
        first_cluster = head[:cs] if cs <= len(head) else self.file.pread(0, cs)
        ext_start = header.header_length if header.version >= 3 else L.V2_HEADER_LENGTH
        try:
            self.extensions = L.parse_extensions(
                first_cluster, ext_start, min(cs, self.file.file_size)
            )
        except ValueError as exc:
            raise self._err(str(exc)) from None
        ext = {e.ext_type: e for e in self.extensions}
        feature_names = (
            L.parse_feature_table(ext[L.EXT_FEATURE_TABLE].data)
            if L.EXT_FEATURE_TABLE in ext
            else {}
        )
        unknown = header.incompatible_features & ~L.INCOMPAT_KNOWN
        if unknown:
            bits = [b for b in range(64) if unknown >> b & 1]
            names = ", ".join(
                f"{feature_names[(0, b)]} (bit {b})" if (0, b) in feature_names else f"bit {b}"
                for b in bits
            )
            raise UnsupportedFeatureError(
                f"{self.path}: unknown incompatible feature {names} is not supported"
            )
        if header.incompatible_features & L.INCOMPAT_CORRUPT and not self.options.force:
            raise ImageFormatError(
                f"{self.path}: image is marked corrupt (run 'qemu-img check -r all' "
                "or use --force to read it anyway)"
            )
        self.extended_l2 = header.extended_l2
        if self.extended_l2 and header.cluster_bits < 14:
            raise self._err("extended L2 entries need clusters of at least 16 KiB")
        # Compression (spec, "Header", compression_type)
        has_ctype_bit = bool(header.incompatible_features & L.INCOMPAT_COMPRESSION)
        if has_ctype_bit != (header.compression_type != L.COMPRESSION_ZLIB):
            raise self._err(
                f"compression_type {header.compression_type} does not match the "
                "compression type feature bit"
            )
        if header.compression_type not in L.COMPRESSION_NAMES:
            raise UnsupportedFeatureError(
                f"{self.path}: unknown compression type {header.compression_type}"
            )
        self.compression_type = header.compression_type
        # L2 geometry
        self.l2_entry_size = 16 if self.extended_l2 else 8
        self.l2_bits = header.cluster_bits - (4 if self.extended_l2 else 3)
        self.table_shift = header.cluster_bits + self.l2_bits  # guest bytes per L2 table, log2
        self.subcluster_bits = header.cluster_bits - (5 if self.extended_l2 else 0)
        self._zero_table = bytes(cs)
        self._l2_cache = _LRU(max(self.options.l2_cache_bytes, 2 * cs))
        self._compressed_cache = _LRU(max(self.options.compressed_cache_bytes, 2 * cs))
        # A ZstdDecompressor must not be shared between threads (concurrent
        # use returns wrong bytes): one per reading thread.
        self._zstd: Any = None
        self._zstd_local = threading.local()
        if self.compression_type == L.COMPRESSION_ZSTD:
            import zstandard

            self._zstd = zstandard
        # Names in the first cluster and extensions
        self.backing_name: str | None = None
        if header.backing_file_offset:
            if header.backing_file_size > L.MAX_BACKING_FILE_SIZE:
                raise self._err(f"backing file name too long ({header.backing_file_size} bytes)")
            if header.backing_file_offset > cs:
                raise self._err(
                    f"backing file name at byte {header.backing_file_offset} "
                    "is outside the first cluster"
                )
            raw_name = self.file.pread(header.backing_file_offset, header.backing_file_size)
            try:
                self.backing_name = raw_name.decode("utf-8")
            except UnicodeDecodeError:
                raise self._err("backing file name is not valid UTF-8") from None
            if "\0" in self.backing_name:
                raise self._err("backing file name contains a NUL byte")
        self.backing_format: str | None = None
        if L.EXT_BACKING_FORMAT in ext:
            self.backing_format = ext[L.EXT_BACKING_FORMAT].data.decode("utf-8", "replace")
        self.data_file_name: str | None = None
        if L.EXT_DATA_FILE in ext:
            self.data_file_name = ext[L.EXT_DATA_FILE].data.decode("utf-8", "replace")
        self.data_file_raw = bool(header.autoclear_features & L.AUTOCLEAR_DATA_FILE_RAW)
        # Snapshots: the table is read on first use (``snapshots``), so that the
        # active disk never depends on it; a damaged table costs the snapshots only.
        self._snapshot_table: tuple[list[L.Snapshot], str | None] | None = None
        # External data file
        self.data: RawFile = self.file
        self.external_data = header.has_data_file
        if self.external_data:
            if not self.data_file_name:
                raise UnsupportedFeatureError(
                    f"{self.path}: uses an external data file but does not name it"
                )
            data_path = self._resolve_data_file(self.data_file_name)
            _check_regular_file(data_path, "external data file", self.path)
            try:
                self.data = RawFile(data_path)
            except MissingFileError:
                raise MissingFileError(
                    f"{self.path}: external data file {data_path} is missing"
                ) from None
            self._closers.append(self.data)
            self._lock(self.data, locking.ROLE_DATA_FILE)
        # From here on, every read of the image file is of something its
        # metadata places there: past the end of the file means truncated.
        self.file.strict_end = True
        # Backing chain
        self.backing: SparseSource | None = None
        self.backing_path: str | None = None
        if self.backing_name and self.options.backing:
            self.backing_path, self.backing = self._open_backing(chain)

    def _resolve(self, name: str, *, what: str) -> str:
        """The path a backing or data file name from the image refers to.

        Relative names are relative to the image's directory.  Refuses
        protocols (``nbd:``, ``json:{...}``), NUL bytes, and with
        ``--backing-dir`` anything whose real path is outside that directory.
        """
        return resolve_name(self.path, name, what=what, backing_dir=self.options.backing_dir)

    def _resolve_data_file(self, name: str) -> str:
        """The path of the external data file the image names.

        A relative name is looked up beside the image first.  qemu opens it
        relative to its own working directory instead, so when nothing is
        beside the image that is tried next.  When both exist and are
        different files, the image is refused rather than guessed at.

        Raises:
            UnsupportedFeatureError: the name is ambiguous as above, or refused
                by :meth:`_resolve`.
        """
        path = self._resolve(name, what="data file")
        if os.path.isabs(name):
            return path
        from_cwd = os.path.abspath(name)
        if from_cwd == path or not os.path.exists(from_cwd):
            return path
        if not os.path.exists(path):
            return self._resolve(from_cwd, what="data file")
        if os.path.samefile(path, from_cwd):
            return path
        raise UnsupportedFeatureError(
            f"{self.path}: data file name {name!r} is ambiguous: {path} (beside the image) "
            f"and {from_cwd} (from the current directory, where qemu looks) are different files"
        )

    def _open_backing(self, chain: tuple[str, ...]) -> tuple[str, SparseSource]:
        """Open the backing file through the format registry (``backing_fmt`` honoured)."""
        from sparsefs.formats import open_parent

        assert self.backing_name is not None
        return open_parent(
            self.path, self.file.fd, self.backing_name, self.backing_format, self.options, chain
        )

    @property
    def snapshots(self) -> list[L.Snapshot]:
        """The entries of the snapshot table; empty when the table is damaged.

        Read on first use.  An entry is listed even when its L1 table is
        invalid: :meth:`l1_problem` and :meth:`Qcow2Image.open_snapshot` tell.
        """
        return self._load_snapshot_table()[0]

    @property
    def snapshot_table_problem(self) -> str | None:
        """Why the snapshot table cannot be read at all (one line naming the file), or None."""
        return self._load_snapshot_table()[1]

    def _load_snapshot_table(self) -> tuple[list[L.Snapshot], str | None]:
        if self._snapshot_table is None:
            try:
                self._snapshot_table = (self._read_snapshot_table(), None)
            except _SnapshotTableError as exc:
                self._snapshot_table = ([], f"{self.path}: {exc}")
        return self._snapshot_table

    def _read_snapshot_table(self) -> list[L.Snapshot]:
        """Decode the snapshot table (qemu: qcow2_read_snapshots).

        Raises:
            _SnapshotTableError: the table cannot be read: too many entries, an
                offset that is not cluster aligned or past the end of the file,
                an entry running past the end, more than 64 MiB, an invalid
                entry.  Then no snapshot is trusted.
        """
        h = self.header
        if h.nb_snapshots == 0:
            return []  # the offset means nothing then (qemu checks it anyway)
        if h.nb_snapshots > L.MAX_SNAPSHOTS:
            raise _SnapshotTableError(
                f"snapshot table lists {h.nb_snapshots} snapshots "
                f"(qemu allows at most {L.MAX_SNAPSHOTS})"
            )
        offset = h.snapshots_offset
        file_size = self.file.file_size
        if offset % self.cluster_size or offset == 0:
            raise _SnapshotTableError(f"snapshot table offset {offset:#x} is not cluster aligned")
        if offset >= file_size:
            raise _SnapshotTableError(
                f"snapshot table at {offset:#x} is past the end of the file ({file_size:#x})"
            )
        snaps: list[L.Snapshot] = []
        # Read in chunks: entries are variable-length.  Parsed bytes are dropped
        # so memory stays near a chunk; the table itself is bounded like qemu's
        # (QCOW_MAX_SNAPSHOTS_SIZE).
        buf = bytearray()
        base = 0  # table offset of buf[0]
        chunk = 64 * 1024
        pos = 0
        in_file = file_size - offset
        limit = min(in_file, L.MAX_SNAPSHOTS_TABLE_BYTES)
        for index in range(h.nb_snapshots):
            while True:
                try:
                    snap, nxt = L.parse_snapshot(buf, pos)
                    break
                except L.TruncatedError:
                    if base + len(buf) >= limit:
                        entry_at = offset + base + pos
                        if limit < in_file:
                            raise _SnapshotTableError(
                                f"snapshot table at {offset:#x} is larger than "
                                f"{limit >> 20} MiB (entry {index + 1} of {h.nb_snapshots} "
                                f"at {entry_at:#x} ends past that)"
                            ) from None
                        raise _SnapshotTableError(
                            f"snapshot table at {offset:#x} runs past the end of the file "
                            f"({file_size:#x}): entry {index + 1} of {h.nb_snapshots} "
                            f"at {entry_at:#x} does not end in it"
                        ) from None
                    del buf[:pos]
                    base += pos
                    pos = 0
                    more = min(chunk, limit - base - len(buf))
                    if more > 0:
                        buf += self.file.pread(offset + base + len(buf), more)
                    chunk = min(chunk * 2, 4 * 1024 * 1024)
                except ValueError as exc:
                    raise _SnapshotTableError(
                        f"snapshot table entry {index + 1} of {h.nb_snapshots} "
                        f"at {offset + base + pos:#x}: {exc}"
                    ) from None
            snaps.append(snap)
            pos = nxt
        return snaps

    def close(self) -> None:
        """Close the files this image opened, its backing chain included; idempotent."""
        backing = getattr(self, "backing", None)
        if backing is not None and hasattr(backing, "close"):
            backing.close()
        for closer in reversed(self._closers):
            closer.close()
        self._closers.clear()

    # -- L1/L2 tables ----------------------------------------------------------------

    def l1_problem(self, l1_table_offset: int, l1_size: int, size: int, what: str) -> str | None:
        """Why an L1 table covering a virtual ``size`` is invalid (one line), or None.

        ``what`` names the table in the message ("active", "snapshot 'x' (id 1)").
        """
        needed = (size + (1 << self.table_shift) - 1) >> self.table_shift
        if l1_size * 8 > L.MAX_L1_SIZE_BYTES:
            return f"{self.path}: {what} L1 table too large ({l1_size} entries)"
        if l1_size < needed:
            return (
                f"{self.path}: {what} L1 table has {l1_size} entries, too few for a virtual "
                f"size of {size} bytes ({needed} needed)"
            )
        if l1_size == 0:
            return None
        if l1_table_offset % self.cluster_size or l1_table_offset == 0:
            return (
                f"{self.path}: {what} L1 table offset {l1_table_offset:#x} is not cluster aligned"
            )
        # Only the entries the virtual size needs are read.  Like qemu, which
        # reads entries past the end of the file as zeros, a longer table may
        # end outside the file; a needed entry outside it is refused (qemu
        # would map its range as unallocated: zeros for data the file lost).
        if l1_table_offset + needed * 8 > self.file.file_size:
            where = past_end_text(l1_table_offset, needed * 8, self.file.file_size)
            return f"{self.path}: {what} L1 table {where}"
        return None

    def read_l1(self, l1_table_offset: int, l1_size: int, size: int, what: str) -> list[int]:
        """Read and validate an L1 table covering a virtual ``size``.

        Raises:
            ImageFormatError: the table is invalid (:meth:`l1_problem`).
            UnsupportedFeatureError: the L1 tables loaded for this file would
                pass ``MAX_TOTAL_L1_BYTES``.
        """
        problem = self.l1_problem(l1_table_offset, l1_size, size, what)
        if problem is not None:
            raise ImageFormatError(problem)
        needed = (size + (1 << self.table_shift) - 1) >> self.table_shift
        if needed == 0:
            return []
        if self._l1_bytes_loaded + needed * 8 > MAX_TOTAL_L1_BYTES:
            raise UnsupportedFeatureError(
                f"{self.path}: {what} L1 table not loaded: the L1 tables held for this file "
                f"would pass {MAX_TOTAL_L1_BYTES >> 20} MiB (many snapshots of a huge disk?)"
            )
        self._l1_bytes_loaded += needed * 8
        buf = self.file.pread(l1_table_offset, needed * 8)
        return list(struct.unpack(f">{needed}Q", buf))

    def table_runs(self, l1_entry: int) -> _TableRuns:
        """The decoded runs of the L2 table an L1 entry points to (cached)."""
        l2_offset = l1_entry & L.L1E_OFFSET_MASK
        runs = self._l2_cache.get(l2_offset)
        if runs is not None:
            return runs  # type: ignore[no-any-return]
        table_span = 1 << self.table_shift
        cs = self.cluster_size
        problem = None
        if l2_offset % cs:
            problem = f"L2 table offset {l2_offset:#x} is not cluster aligned"
        elif l2_offset < cs:
            problem = f"L2 table offset {l2_offset:#x} overlaps the header"
        elif l2_offset + cs > self.file.file_size:
            problem = f"L2 table {past_end_text(l2_offset, cs, self.file.file_size)}"
        if problem is None:
            # Not RawFile.pread: a short read (the file shrank since open) must
            # not turn into a zero table, which would serve holes for data.
            try:
                buf = os.pread(self.file.fd, cs, l2_offset)
            except OSError as exc:
                problem = f"read of the L2 table at {l2_offset:#x} failed: {exc.strerror}"
            else:
                if len(buf) != cs:
                    problem = (
                        f"L2 table at {l2_offset:#x} ({size_text(cs)}) runs past the end "
                        "of the file (was the image truncated?)"
                    )
        runs = _TableRuns()
        if problem is not None:
            runs.add(0, table_span, RUN_ERROR, f"{self.path}: {problem}")
            return runs  # not cached: a transient error may clear
        if buf == self._zero_table:
            runs.add(0, table_span, RUN_UNALLOCATED, None)
        elif self.extended_l2:
            self._decode_extended_l2(buf, runs)
        else:
            self._decode_l2(buf, runs)
        if RUN_DATA in runs.kinds:
            runs = self._split_unwritten(runs)
        self._l2_cache.put(l2_offset, runs, runs.cost())
        return runs

    def _split_unwritten(self, runs: _TableRuns) -> _TableRuns:
        """Split the RUN_DATA runs of a table by the data file's written map.

        Host bytes that the data file stores as nothing (a hole or an
        unwritten extent, see :mod:`sparsefs.hostmap`) become RUN_UNWRITTEN.
        Costs one bisect per data run when the file is written throughout.
        """
        host_map = self.data.written_map()
        fully_written = host_map.fully_written
        if all(kind != RUN_DATA or fully_written(host, end - start)
               for start, end, kind, host in zip(runs.starts, runs.ends, runs.kinds, runs.hosts,
                                                 strict=True)):
            return runs
        out = _TableRuns()
        for start, end, kind, host in zip(runs.starts, runs.ends, runs.kinds, runs.hosts,
                                          strict=True):
            if kind != RUN_DATA or fully_written(host, end - start):
                out.add(start, end, kind, host)
                continue
            for rel_start, rel_end, state in host_map.classify(host, end - start):
                out.add(start + rel_start, start + rel_end,
                        RUN_DATA if state == WRITTEN else RUN_UNWRITTEN, host + rel_start)
        return out

    def _data_problem(self, host_offset: int, length: int) -> str | None:
        """Why a data cluster at ``host_offset`` cannot be read, or None."""
        if host_offset % self.cluster_size:
            return f"data cluster offset {host_offset:#x} is not cluster aligned"
        if not self.external_data:
            if host_offset < self.cluster_size:
                return f"data cluster offset {host_offset:#x} overlaps the header"
            if host_offset >= self.file.file_size:
                return f"data cluster at {host_offset:#x} is past the end of the file"
        return None

    def _decode_l2(self, buf: bytes, runs: _TableRuns) -> None:
        """Decode a standard L2 table (8-byte entries) into ``runs``.

        The Python work grows with the allocated clusters, not with the
        table: all-zero blocks of ``_L2_BLOCK_ENTRIES`` entries are skipped at
        memcmp speed and the zero entries of the other blocks by
        ``itertools.compress``; what is left are stretches of non-zero
        entries, which :meth:`_decode_l2_stretch` decodes.
        """
        cb = self.cluster_bits
        nb_entries = len(buf) // 8
        indices: list[int] = []  # of the non-zero entries, ascending
        values: list[int] = []  # their entries
        for first in _nonzero_blocks(buf, 8):
            entries = _unpack_block(buf, first * 8)
            indices.extend(compress(range(first, first + _L2_BLOCK_ENTRIES), entries))
            values.extend(compress(entries, entries))
        # Stretches of consecutive indices: break where indices[i] != indices[i - 1] + 1.
        n = len(indices)
        breaks = list(compress(range(1, n), map(ne, islice(indices, 1, None),
                                                map(add, indices, repeat(1)))))
        if n:
            breaks.append(n)
        done = 0  # entries [0, done) of the table are in runs
        lo = 0
        for hi in breaks:
            start = indices[lo]
            if start > done:
                runs.add(done << cb, start << cb, RUN_UNALLOCATED, None)
            self._decode_l2_stretch(start, values[lo:hi], runs)
            done = start + hi - lo
            lo = hi
        if done < nb_entries:
            runs.add(done << cb, nb_entries << cb, RUN_UNALLOCATED, None)

    def _decode_l2_stretch(self, first_index: int, entries: list[int], runs: _TableRuns) -> None:
        """Decode consecutive non-zero L2 entries, starting at ``first_index``.

        Entries that step by exactly one cluster (contiguous data, or
        preallocated zeros) form segments, found at C speed; a segment whose
        first and last entries decode to data with the matching host offsets,
        or both to zeros, is one run without looking at the entries between:
        their flags equal the first's (the bits outside the offset mask only
        change by a carry, and the first and last agree on them) and their
        validity is monotonic in the host offset (alignment, above the header,
        below the end of the file).  Everything else goes entry by entry
        through :meth:`_decode_l2_entries`, the one place that interprets an
        entry.  Equal entries (zero clusters) are handled likewise.
        """
        cs = self.cluster_size
        cb = self.cluster_bits
        decode_entries = self._decode_l2_entries
        n = len(entries)
        if n >= 2 and entries[-1] == entries[0] and entries.count(entries[0]) == n:
            kind, host = self._probe_l2_segment(first_index, entries[0], entries[0], n, 0)
            if kind in (RUN_ZERO, RUN_UNALLOCATED):
                runs.add(first_index << cb, (first_index + n) << cb, kind, host)
                return
        if n < 3:
            decode_entries(first_index, entries, runs)
            return
        # Segment boundaries: i where entries[i] != entries[i - 1] + cluster_size.
        breaks = list(
            compress(range(1, n), map(ne, islice(entries, 1, None), map(add, entries, repeat(cs))))
        )
        breaks.append(n)
        pending = 0  # entries[pending:seg_start] still to decode one by one
        seg_start = 0
        for seg_end in breaks:
            length = seg_end - seg_start
            if length >= 2:
                e0 = entries[seg_start]
                e_last = entries[seg_end - 1]
                if not (e0 ^ e_last) & ~L.L2E_OFFSET_MASK:
                    kind, host = self._probe_l2_segment(
                        first_index + seg_start, e0, e_last, length, cs
                    )
                    if kind in (RUN_DATA, RUN_ZERO):
                        if pending < seg_start:
                            decode_entries(first_index + pending, entries[pending:seg_start], runs)
                        runs.add((first_index + seg_start) << cb,
                                 (first_index + seg_end) << cb, kind, host)
                        pending = seg_end
            seg_start = seg_end
        if pending < n:
            decode_entries(first_index + pending, entries[pending:], runs)

    def _probe_l2_segment(
        self, first_index: int, e0: int, e_last: int, length: int, step: int
    ) -> tuple[int, Any]:
        """The kind and host of a uniform segment of L2 entries, or (-1, None).

        Decodes its first and last entries; they must give the same kind, and
        for data, host offsets ``(length - 1) * step`` apart.
        """
        probe = _TableRuns()
        self._decode_l2_entries(first_index, (e0,), probe)
        self._decode_l2_entries(first_index + length - 1, (e_last,), probe)
        if len(probe.kinds) != 2 or probe.kinds[0] != probe.kinds[1]:
            return -1, None
        kind = probe.kinds[0]
        if kind == RUN_DATA:
            if not step or probe.hosts[1] != probe.hosts[0] + (length - 1) * step:
                return -1, None
        elif kind not in (RUN_ZERO, RUN_UNALLOCATED):
            return -1, None
        return kind, probe.hosts[0]

    def _decode_l2_entries(
        self, first_index: int, entries: Sequence[int], runs: _TableRuns
    ) -> None:
        """Decode standard L2 entries one by one into ``runs``.

        ``entries[0]`` is entry ``first_index`` of its table; guest offsets
        in ``runs`` are relative to the table's first byte.
        """
        cb = self.cluster_bits
        cs = self.cluster_size
        v3 = self.header.version >= 3
        external = self.external_data
        for index, entry in enumerate(entries, first_index):
            start = index << cb
            if entry & L.QCOW_OFLAG_COMPRESSED:
                if external:
                    runs.add(start, start + cs, RUN_ERROR, f"{self.path}: compressed cluster "
                             "in an image with an external data file")
                else:
                    runs.add(start, start + cs, RUN_COMPRESSED,
                             L.compressed_descriptor(cb, entry))
                continue
            if entry & L.QCOW_OFLAG_ZERO:
                if v3:
                    runs.add(start, start + cs, RUN_ZERO, None)
                else:  # qemu: "Zero cluster entry found in pre-v3 image", EIO
                    runs.add(start, start + cs, RUN_ERROR, f"{self.path}: zero cluster "
                             "entry in a version 2 image")
                continue
            host = entry & L.L2E_OFFSET_MASK
            if host == 0 and not (external and entry & L.QCOW_OFLAG_COPIED):
                runs.add(start, start + cs, RUN_UNALLOCATED, None)
                continue
            problem = self._data_problem(host, cs)
            if problem is not None:
                runs.add(start, start + cs, RUN_ERROR, f"{self.path}: {problem}")
            else:
                runs.add(start, start + cs, RUN_DATA, host)

    def _decode_extended_l2(self, buf: bytes, runs: _TableRuns) -> None:
        cb = self.cluster_bits
        cs = self.cluster_size
        scb = self.subcluster_bits
        external = self.external_data
        for index, entry, bitmap in _extended_entries(buf, runs, cb):
            start = index << cb
            if entry & L.QCOW_OFLAG_COMPRESSED:
                if external:
                    runs.add(start, start + cs, RUN_ERROR, f"{self.path}: compressed cluster "
                             "in an image with an external data file")
                else:
                    runs.add(start, start + cs, RUN_COMPRESSED,
                             L.compressed_descriptor(cb, entry))
                continue
            alloc = bitmap & L.SUBCLUSTER_ALLOC_MASK
            zero = bitmap >> 32
            host = entry & L.L2E_OFFSET_MASK
            allocated = host != 0 or bool(external and entry & L.QCOW_OFLAG_COPIED)
            problem = None
            if alloc & zero:
                problem = "subcluster marked both allocated and zero"
            elif alloc and not allocated:
                problem = "allocated subcluster in a cluster with no host offset"
            elif alloc:
                problem = self._data_problem(host, cs)
            if problem is not None:
                runs.add(start, start + cs, RUN_ERROR, f"{self.path}: {problem}")
                continue
            if alloc == 0xFFFFFFFF:
                runs.add(start, start + cs, RUN_DATA, host)
                continue
            if zero == 0xFFFFFFFF:
                runs.add(start, start + cs, RUN_ZERO, None)
                continue
            if alloc == 0 and zero == 0:
                runs.add(start, start + cs, RUN_UNALLOCATED, None)
                continue
            for sc in range(L.SUBCLUSTERS_PER_CLUSTER):
                sc_start = start + (sc << scb)
                sc_end = sc_start + (1 << scb)
                if alloc >> sc & 1:
                    runs.add(sc_start, sc_end, RUN_DATA, host + (sc << scb))
                elif zero >> sc & 1:
                    runs.add(sc_start, sc_end, RUN_ZERO, None)
                else:
                    runs.add(sc_start, sc_end, RUN_UNALLOCATED, None)

    # -- compressed clusters ---------------------------------------------------------

    def decompress(self, descriptor: tuple[int, int]) -> bytes:
        """Return the cluster a compressed descriptor points to (cached).

        Raises:
            ImageReadError: the data is past the end of the file or does not
                decompress to exactly one cluster.
        """
        cached = self._compressed_cache.get(descriptor)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        host_offset, nb_bytes = descriptor
        cs = self.cluster_size
        if host_offset < cs or host_offset >= self.file.file_size:
            raise ImageReadError(
                f"{self.path}: compressed cluster at {host_offset:#x} is outside the file"
            )
        # The last sector may run past the end of the file (qemu reads it short).
        nb_bytes = min(nb_bytes, self.file.file_size - host_offset)
        raw = self.file.pread(host_offset, nb_bytes)
        try:
            if self.compression_type == L.COMPRESSION_ZSTD:
                out = self._zstd_decompress(raw)
            else:
                dec = zlib.decompressobj(-15)
                out = dec.decompress(raw, cs)
        except Exception as exc:
            raise ImageReadError(
                f"{self.path}: compressed cluster at {host_offset:#x} is corrupt: {exc}"
            ) from None
        if len(out) != cs:
            raise ImageReadError(
                f"{self.path}: compressed cluster at {host_offset:#x} decompresses to "
                f"{len(out)} bytes, not one cluster of {cs}"
            )
        self._compressed_cache.put(descriptor, out, cs)
        return out

    def _zstd_decompress(self, raw: bytes) -> bytes:
        """Decompress one zstd frame, stopping after cluster_size + 1 bytes.

        The bound keeps a crafted frame (gigabytes of zeros in a few KiB) from
        using more than a cluster of memory; more than a cluster is an error,
        as in qemu's qcow2_zstd_decompress.
        """
        dctx = getattr(self._zstd_local, "dctx", None)
        if dctx is None:
            dctx = self._zstd_local.dctx = self._zstd.ZstdDecompressor()
        with dctx.stream_reader(raw, read_across_frames=False) as reader:
            out: bytes = reader.read(self.cluster_size + 1)
        return out


class _SnapshotTableError(Exception):
    """The snapshot table cannot be read (the message lacks the file name)."""


def size_text(nb_bytes: int) -> str:
    """``nb_bytes`` exactly, in the largest binary unit that divides it: "64 KiB", "1000 bytes"."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nb_bytes and not nb_bytes % (1 << shift):
            return f"{nb_bytes >> shift} {unit}"
    return f"{nb_bytes} bytes"


def past_end_text(host_offset: int, length: int, file_size: int) -> str:
    """ "at 0x30000 (64 KiB) runs past the end of the file (0x3c000)", or "is past" when
    the range starts at or after the end."""
    verb = "is" if host_offset >= file_size else "runs"
    return (
        f"at {host_offset:#x} ({size_text(length)}) {verb} past the end of the file "
        f"({file_size:#x})"
    )


_ZERO_BLOCK = bytes(_L2_BLOCK_ENTRIES * 8)
_ZERO_CHUNK = bytes(_L2_BLOCK_ENTRIES * 64)
_unpack_block = struct.Struct(f">{_L2_BLOCK_ENTRIES}Q").unpack_from


def _nonzero_blocks(buf: bytes, entry_size: int) -> Iterator[int]:
    """Table index of the first entry of each 512-byte block of ``buf`` not all zero.

    ``entry_size`` is 8 (standard L2) or 16 (extended L2).  Chunks of 8
    blocks are compared first, then the blocks of the chunks that are not
    zero: an empty 64 KiB table costs 16 memcmps.
    """
    block = len(_ZERO_BLOCK)
    chunk = len(_ZERO_CHUNK) if len(buf) >= len(_ZERO_CHUNK) else block
    zero_chunk = _ZERO_CHUNK if chunk > block else _ZERO_BLOCK
    per_block = block // entry_size
    for cpos in range(0, len(buf), chunk):
        if buf[cpos : cpos + chunk] == zero_chunk:
            continue
        for pos in range(cpos, cpos + chunk, block):
            if chunk == block or buf[pos : pos + block] != _ZERO_BLOCK:
                yield pos // block * per_block


def _extended_entries(
    buf: bytes, runs: _TableRuns, cluster_bits: int
) -> Iterator[tuple[int, int, int]]:
    """Yield (l2_index, entry, bitmap) of an extended L2 table, skipping zero blocks.

    The entries of all-zero 512-byte blocks (unallocated, nothing in their
    bitmaps) are added to ``runs`` here as unallocated runs, in order
    between the entries the caller decodes.
    """
    per_block = len(_ZERO_BLOCK) // 16
    nb_entries = len(buf) // 16
    done = 0
    for first in _nonzero_blocks(buf, 16):
        if first > done:
            runs.add(done << cluster_bits, first << cluster_bits, RUN_UNALLOCATED, None)
        words = _unpack_block(buf, first * 16)
        for i in range(per_block):
            yield first + i, words[2 * i], words[2 * i + 1]
        done = first + per_block
    if done < nb_entries:
        runs.add(done << cluster_bits, nb_entries << cluster_bits, RUN_UNALLOCATED, None)


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
                    self._l1_allocated[nxt] << shift
                    if nxt < len(self._l1_allocated)
                    else guest_end
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
                if kind == RUN_DATA or kind == RUN_UNWRITTEN:
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
                parts.append(qfile.data.pread(run.host, n))
            elif kind == RUN_ZERO or kind == RUN_UNWRITTEN:
                parts.append(bytes(n))
            elif kind == RUN_UNALLOCATED:
                parts.append(self._read_below(s, n))
            elif kind == RUN_COMPRESSED:
                cluster = qfile.decompress(run.host)
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
                        os.posix_fadvise(qfile.file.fd, start, end - start,
                                         os.POSIX_FADV_WILLNEED)
                    except OSError:
                        return
                start, end = off, off + cs
            layer = layer._backing

    def read_nowait(
        self, guest_offset: int, length: int
    ) -> bytes | bytearray | memoryview | None:
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
                yield Extent(pending_start, pending_end - pending_start, pending_data,
                             not pending_data)
            pending_start, pending_end, pending_data = s, e, data
        if pending_end > pending_start:
            yield Extent(pending_start, pending_end - pending_start, pending_data,
                         not pending_data)

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
                    pending.start, pending.length + entry.length, pending.depth,
                    pending.present, pending.zero, pending.data, pending.compressed,
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
                yield MapEntry(s, n, depth, True, False, True, False, run.host)
            elif kind == RUN_UNWRITTEN:
                # qemu-img map: data (allocated), and "zero" where the image
                # file has a hole (qemu asks the file layer below a
                # preallocated image); an unwritten extent, or anything in an
                # external data file, it calls data only.
                host_map = self.qfile.data.written_map()
                external = self.qfile.external_data
                for rel_s, rel_e, state in host_map.classify(run.host, n):
                    yield MapEntry(s + rel_s, rel_e - rel_s, depth, True,
                                   state == HOLE and not external, True, False, run.host + rel_s)
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
                        yield MapEntry(x.guest_offset, x.length, depth + 1, True, not x.data,
                                       x.data, False, x.guest_offset if x.data else None)
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
        return self.qfile.l1_problem(snap.l1_table_offset, snap.l1_size, size,
                                     snapshot_label(snap))

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


def snapshot_label(snap: L.Snapshot) -> str:
    """How messages name a snapshot: ``snapshot 'NAME' (id ID)``."""
    return f"snapshot {snap.name!r} (id {snap.id_str})"


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
