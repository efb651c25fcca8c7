"""A qcow2 v3 writer of our own: delta points and full points, without qemu.

Names follow qemu's docs/interop/qcow2.txt (cited as "spec, <section>").
``guest_offset`` is a byte offset in the virtual disk, ``host_offset`` one in
the image file.  The file is laid out in the order it is written::

    cluster 0     header, header extensions, backing file name: written LAST
    clusters 1..  guest data, appended as written: plain clusters cluster-aligned,
                  compressed clusters packed back to back
    then          L2 tables (touched L1 slots only), refcount table, refcount
                  blocks (16-bit), L1 table

Until :meth:`Qcow2Writer.close` writes the header, cluster 0 is a hole: a file
cut short by a crash is not a qcow2 image.  Callers write under a temporary
name and rename after verification.  Imports from sparsefs: errors, layout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import sys
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from sparsefs.errors import SparsefsError
from sparsefs.formats.qcow2 import layout as L

Compression = Literal[None, "zstd", "zlib"]
BACKING_FORMATS = ("raw", "qcow2")
REFCOUNT_ORDER = 4  # 16-bit refcounts (spec, "Host cluster management")
# spec, "Header": bytes 0..103 of a version 3 header.
_HEADER_V3 = struct.Struct(">4sIQIIQIIQQIIQQQQII")
_EXT_HEADER = struct.Struct(">II")
_SWAP = sys.byteorder == "little"  # tables are built as native arrays, stored big-endian
_COMPRESSED_BATCH = 8 << 20  # bytes of compressed output gathered for one pwrite


class ImageWriteError(SparsefsError):
    """A qcow2 image cannot be written: misuse of the writer, or an I/O error."""


@dataclass(frozen=True, slots=True)
class WriterStats:
    """What :meth:`Qcow2Writer.close` wrote.

    Attributes:
        data_clusters: guest clusters stored with data (plain and compressed).
        compressed_clusters: of those, the ones stored compressed.
        zero_clusters: guest clusters marked with the zero flag.
        data_bytes: host bytes of guest data written (compressed sizes for
            compressed clusters, the bytes given for a last partial cluster).
        file_size: size of the finished image file in bytes.
    """

    data_clusters: int
    compressed_clusters: int
    zero_clusters: int
    data_bytes: int
    file_size: int


def _big_endian(values: array[int]) -> bytes:
    """The bytes of an array of unsigned integers, big-endian."""
    if _SWAP:
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def _compressor(kind: Compression) -> Callable[[memoryview], bytes] | None:
    """A function compressing one cluster the way qemu decompresses it, or None.

    zlib: raw deflate with a 4 KiB window (qemu inflates with wbits -12, so a
    larger window would not decompress there).  zstd: one plain zstd frame, as
    qemu's qcow2_zstd_compress writes (ZSTD_e_end, default level).
    """
    if kind == "zlib":
        return lambda data: zlib.compress(data, wbits=-12)
    if kind == "zstd":
        import zstandard

        cctx = zstandard.ZstdCompressor(level=3)
        return lambda data: cctx.compress(data)
    return None


class Qcow2Writer:
    """Write a new qcow2 v3 image in one pass; the mapping tables stay in memory.

    Guest data goes to the file as it is written, one pwrite per call when not
    compressed; L2 tables exist only for touched L1 slots; :meth:`close` writes
    the tables, the refcounts and, last, the header.  Clusters never written
    stay unallocated and read through to the backing file.  As a context
    manager: an exception calls :meth:`abort`; a normal exit calls
    :meth:`close` unless the caller did (then see :attr:`stats`).  Not thread-safe.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        virtual_size: int,
        *,
        cluster_bits: int = 16,
        backing_file: str | None = None,
        backing_format: str | None = None,
        compression: Compression = None,
        mode: int = 0o644,
    ) -> None:
        """Create ``path`` with O_CREAT|O_EXCL (never overwriting) and prepare to write.

        Args:
            path: the new image file.
            virtual_size: guest disk size in bytes, a multiple of 512 (qemu
                reads qcow2 sizes in 512-byte sectors).
            cluster_bits: log2 of the cluster size in bytes, 9..21 (16: 64 KiB).
            backing_file: the backing file name, stored as given; readers
                resolve a relative name from the image's directory.
            backing_format: "raw" or "qcow2"; required with ``backing_file``.
            compression: None, "zstd" or "zlib": each written cluster is
                stored compressed when that makes it smaller than a cluster.
            mode: permission bits of the new file (the umask applies).

        Raises:
            ImageWriteError: invalid arguments, or ``path`` cannot be created
                (it exists, say).
        """
        self.path = path = os.fspath(path)
        self.virtual_size, self.cluster_bits = virtual_size, cluster_bits
        self.backing_file, self.backing_format = backing_file, backing_format
        self.compression = compression
        self.stats: WriterStats | None = None
        self._check_args()
        self.cluster_size = cs = 1 << cluster_bits
        self.l2_entries = cs // 8
        self.l1_size = -(-virtual_size // (cs * self.l2_entries))
        if self.l1_size * 8 > L.MAX_L1_SIZE_BYTES:
            raise ImageWriteError(
                f"{path}: {virtual_size} bytes need an L1 table larger than qemu's "
                f"{L.MAX_L1_SIZE_BYTES} bytes; use larger clusters"
            )
        self._header_cluster(0, 0, 0)  # the backing file name must fit into cluster 0
        self._compress = _compressor(compression)
        self._l2: dict[int, array[int]] = {}  # l1_index -> its L2 entries, native order
        self._refcounts = array("H", [1])  # one per host cluster; cluster 0: the header
        self._host_end = cs  # the next free host byte
        self._nb_data = self._nb_compressed = self._nb_zero = self._data_bytes = 0
        self._closed = self._failed = False  # _failed: a pwrite failed, abort() is left
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self._fd: int | None = os.open(path, flags, mode)
        except OSError as exc:
            raise ImageWriteError(f"{path}: cannot create: {exc.strerror}") from exc
        self._identity = os.fstat(self._fd)[1:3]  # (st_ino, st_dev) of the file we made

    def _check_args(self) -> None:
        """Validate the constructor's arguments (raises ImageWriteError)."""
        path, size, bits = self.path, self.virtual_size, self.cluster_bits
        if not L.MIN_CLUSTER_BITS <= bits <= L.MAX_CLUSTER_BITS:
            raise ImageWriteError(f"{path}: cluster_bits {bits} outside 9..21")
        if size < 0 or size % 512:
            raise ImageWriteError(f"{path}: virtual size {size} is not a multiple of 512")
        if (self.backing_file is None) != (self.backing_format is None):
            raise ImageWriteError(f"{path}: backing_file and backing_format go together")
        if self.backing_format not in (None, *BACKING_FORMATS):
            raise ImageWriteError(f"{path}: backing format {self.backing_format!r} unknown")
        if self.compression not in (None, "zstd", "zlib"):
            raise ImageWriteError(f"{path}: unknown compression {self.compression!r}")

    # -- guest clusters --------------------------------------------------------------

    def write(self, guest_offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``guest_offset`` in newly allocated clusters.

        Args:
            guest_offset: cluster-aligned guest byte offset.
            data: whole clusters, as many as the caller has at hand (one
                pwrite for all when not compressed); only a write that ends at
                the end of the disk may end with a partial cluster (the rest
                of that cluster reads as zeros).

        Raises:
            ImageWriteError: closed writer, unaligned, out of range, a cluster
                already written (data or zeroes), or an I/O error (ENOSPC...;
                only :meth:`abort` is left then).
        """
        view = memoryview(data).cast("B")
        first, nb_clusters = self._claim(guest_offset, len(view), "write")
        if nb_clusters and self._compress is not None:
            self._write_compressed(first, view)
        elif nb_clusters:
            host_offset = self._host_end
            self._pwrite(host_offset, view)
            cs = self.cluster_size
            self._set_entries(first, nb_clusters, host_offset | L.QCOW_OFLAG_COPIED, cs)
            self._refcounts.extend(array("H", [1]) * nb_clusters)
            self._host_end = host_offset + nb_clusters * cs
            self._nb_data += nb_clusters
            self._data_bytes += len(view)

    def write_zeroes(self, guest_offset: int, length: int) -> None:
        """Mark ``length`` bytes at ``guest_offset`` as reading zeros.

        The clusters get the zero flag and no host offset (spec, "Standard
        Cluster Descriptor", bit 0): they read as zeros and hide the backing
        file.  Alignment rules and errors as for :meth:`write`.
        """
        first, nb_clusters = self._claim(guest_offset, length, "write_zeroes")
        self._set_entries(first, nb_clusters, L.QCOW_OFLAG_ZERO, 0)
        self._nb_zero += nb_clusters

    def _claim(self, guest_offset: int, length: int, what: str) -> tuple[int, int]:
        """Validate a request; return (first guest cluster index, number of clusters).

        Raises:
            ImageWriteError: as listed for :meth:`write`.
        """
        if self._closed or self._failed:
            raise ImageWriteError(f"{self.path}: {what} after close, abort or a failed write")
        cs, end = self.cluster_size, guest_offset + length
        request = f"{self.path}: {what} of {length} bytes at guest offset {guest_offset}"
        if guest_offset < 0 or length < 0 or end > self.virtual_size:
            raise ImageWriteError(f"{request} is outside the disk of {self.virtual_size} bytes")
        if guest_offset % cs or (length % cs and end != self.virtual_size):
            raise ImageWriteError(f"{request} is not aligned to clusters of {cs} bytes")
        first, nb_clusters = guest_offset // cs, -(-length // cs)
        for l1_index, l2_index, count in self._runs(first, nb_clusters):
            table = self._l2.get(l1_index)
            if table is not None and any(table[l2_index : l2_index + count]):
                taken = next(i for i in range(l2_index, l2_index + count) if table[i])
                taken += l1_index * self.l2_entries
                raise ImageWriteError(f"{request}: cluster at {taken * cs} already written")
        return first, nb_clusters

    def _runs(self, first: int, nb_clusters: int) -> Iterator[tuple[int, int, int]]:
        """Split ``nb_clusters`` guest clusters from index ``first`` by L2 table.

        Yields:
            (l1_index, l2_index of the run's first cluster, number of clusters).
        """
        index, end = first, first + nb_clusters
        while index < end:
            l1_index, l2_index = divmod(index, self.l2_entries)
            count = min(end - index, self.l2_entries - l2_index)
            yield l1_index, l2_index, count
            index += count

    def _set_entries(self, first: int, nb_clusters: int, entry: int, step: int) -> None:
        """Give guest cluster ``first + n`` the L2 entry ``entry + n * step``."""
        for l1_index, l2_index, count in self._runs(first, nb_clusters):
            table = self._l2.get(l1_index)
            if table is None:
                table = self._l2[l1_index] = array("Q", bytes(self.cluster_size))
            if step:
                values = array("Q", range(entry, entry + count * step, step))
            else:
                values = array("Q", [entry]) * count
            table[l2_index : l2_index + count] = values
            entry += count * step

    def _write_compressed(self, first: int, view: memoryview) -> None:
        """Compress each cluster of ``view``; store it packed, or plain when not smaller.

        Compressed clusters are packed back to back (several may share a host
        cluster, each counting one reference); a plain cluster starts at the
        next cluster boundary.  Output goes to the file in pwrites of ~8 MiB.
        """
        assert self._compress is not None
        cs, cb = self.cluster_size, self.cluster_bits
        x = 62 - (cb - 8)  # spec, "Compressed Clusters Descriptor"
        buf, buf_start = bytearray(), self._host_end
        nb_clusters = -(-len(view) // cs)
        for n in range(nb_clusters):
            chunk = view[n * cs : (n + 1) * cs]
            if len(chunk) < cs:
                chunk = memoryview(bytes(chunk) + bytes(cs - len(chunk)))
            packed = self._compress(chunk)
            host_offset = buf_start + len(buf)
            if len(packed) < cs:
                if host_offset >= 1 << x:
                    raise ImageWriteError(f"{self.path}: too large for compressed clusters")
                last = host_offset + len(packed) - 1
                nb_sectors = (last >> 9) - (host_offset >> 9)  # additional 512-byte sectors
                entry = L.QCOW_OFLAG_COMPRESSED | nb_sectors << x | host_offset
                self._nb_compressed += 1
            else:
                buf += bytes(-host_offset % cs)  # to the next cluster boundary
                host_offset = buf_start + len(buf)
                packed, last = bytes(chunk), host_offset + cs - 1
                entry = host_offset | L.QCOW_OFLAG_COPIED
            self._count_host(host_offset >> cb, last >> cb)
            buf += packed
            self._set_entries(first + n, 1, entry, 0)
            self._nb_data += 1
            self._data_bytes += len(packed)
            if len(buf) >= _COMPRESSED_BATCH or n == nb_clusters - 1:
                self._pwrite(buf_start, buf)
                buf, buf_start = bytearray(), buf_start + len(buf)
                self._host_end = buf_start

    def _count_host(self, first: int, last: int) -> None:
        """Add one reference to host clusters ``first..last`` (indexes, inclusive).

        Allocation only appends: each index is counted already or is the next
        one.  16 bits do not overflow: the smallest zstd or deflate output of
        a cluster is more than 1/65535 of it (a block header per 128 KiB).
        """
        for index in range(first, last + 1):
            if index < len(self._refcounts):
                self._refcounts[index] += 1
            else:
                self._refcounts.append(1)

    def _pwrite(self, host_offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``host_offset`` (raises ImageWriteError on OSError)."""
        assert self._fd is not None
        view, pos = memoryview(data), host_offset
        try:
            while view:
                done = os.pwrite(self._fd, view, pos)
                if done <= 0:
                    raise OSError(errno.EIO, "short write")
                view, pos = view[done:], pos + done
        except OSError as exc:
            self._failed = True
            raise ImageWriteError(
                f"{self.path}: cannot write {len(data)} bytes at host offset {host_offset}: "
                f"{exc.strerror}"
            ) from exc

    def _pwrite_sparse(self, host_offset: int, data: bytes | bytearray) -> None:
        """:meth:`_pwrite` but for the all-zero 4 KiB pages of ``data``: holes of the new file.

        An L2 table or refcount block holding a few entries then stores one
        page, not a cluster (deltas stay near the data they hold).
        """
        page, zero, start = 4096, bytes(4096), -1
        for pos in range(0, len(data) + page, page):
            is_zero = pos >= len(data) or data[pos : pos + page] == zero[: len(data) - pos]
            if not is_zero and start < 0:
                start = pos
            elif is_zero and start >= 0:
                self._pwrite(host_offset + start, memoryview(data)[start:pos])
                start = -1
        assert self._fd is not None
        if os.fstat(self._fd).st_size < host_offset + len(data):
            os.ftruncate(self._fd, host_offset + len(data))  # the file ends with the tables

    # -- finishing -------------------------------------------------------------------

    def close(self) -> WriterStats:
        """Write the tables, the refcounts and the header (last), fsync, close.

        Returns:
            what was written; also kept in :attr:`stats`.

        Raises:
            ImageWriteError: closed already, an earlier write failed, or an I/O
                error; the unfinished file is then removed (see :meth:`abort`).
        """
        if self._closed or self._failed:
            self.abort()
            raise ImageWriteError(f"{self.path}: close after close, abort or a failed write")
        try:
            file_size = self._write_metadata()
        except ImageWriteError:
            self.abort()
            raise
        assert self._fd is not None
        os.close(self._fd)
        self._fd, self._closed, self._l2 = None, True, {}
        self.stats = WriterStats(
            self._nb_data, self._nb_compressed, self._nb_zero, self._data_bytes, file_size
        )
        return self.stats

    def _write_metadata(self) -> int:
        """Write L2 tables, refcount table and blocks, L1 table, then the header; fsync.

        Returns:
            the size of the finished file in bytes.
        """
        cs = self.cluster_size
        meta_cluster = -(-self._host_end // cs)
        l1_indexes = sorted(self._l2)
        l1_clusters = -(-self.l1_size * 8 // cs)  # none for an empty disk
        rt_cluster = meta_cluster + len(l1_indexes)
        rt_clusters, nb_blocks = self._refcount_geometry(rt_cluster + l1_clusters)
        l1_cluster = rt_cluster + rt_clusters + nb_blocks
        nb_clusters = l1_cluster + l1_clusters
        refcounts = self._refcounts
        refcounts.extend(array("H", [1]) * (nb_clusters - len(refcounts)))
        out = bytearray()
        l1 = array("Q", bytes(l1_clusters * cs))
        for n, l1_index in enumerate(l1_indexes):
            l1[l1_index] = (meta_cluster + n) * cs | L.QCOW_OFLAG_COPIED
            out += _big_endian(self._l2[l1_index])
        table = array("Q", bytes(rt_clusters * cs))
        table[:nb_blocks] = array("Q", range((rt_cluster + rt_clusters) * cs, l1_cluster * cs, cs))
        out += _big_endian(table)
        block_entries = cs * 8 >> REFCOUNT_ORDER
        for n in range(nb_blocks):
            block = refcounts[n * block_entries : (n + 1) * block_entries]
            block.extend(array("H", [0]) * (block_entries - len(block)))
            out += _big_endian(block)
        out += _big_endian(l1)
        self._pwrite_sparse(meta_cluster * cs, out)
        l1_offset = l1_cluster * cs if l1_clusters else 0  # as qemu-img writes an empty disk
        self._pwrite_sparse(0, self._header_cluster(l1_offset, rt_cluster * cs, rt_clusters))
        try:
            os.fsync(self._fd)  # type: ignore[arg-type]  # open until close() returns
        except OSError as exc:
            raise ImageWriteError(f"{self.path}: fsync failed: {exc.strerror}") from exc
        return nb_clusters * cs

    def _refcount_geometry(self, nb_other: int) -> tuple[int, int]:
        """(refcount table clusters, refcount blocks) for ``nb_other`` other clusters.

        The refcount structures count themselves too: grow both until they
        cover the whole file (a fixed point; both only ever grow).
        """
        cs = self.cluster_size
        rt_clusters = nb_blocks = 1
        while True:
            need_blocks = -(-(nb_other + rt_clusters + nb_blocks) * 16 // (cs * 8))
            need_rt = -(-need_blocks * 8 // cs)
            if (need_rt, need_blocks) == (rt_clusters, nb_blocks):
                break
            rt_clusters, nb_blocks = max(rt_clusters, need_rt), max(nb_blocks, need_blocks)
        if rt_clusters * cs > L.MAX_REFTABLE_SIZE_BYTES:
            raise ImageWriteError(f"{self.path}: refcount table larger than qemu allows")
        return rt_clusters, nb_blocks

    def _header_cluster(self, l1_offset: int, rt_offset: int, rt_clusters: int) -> bytes:
        """Header (spec, "Header"), extensions and backing file name, for cluster 0.

        Raises:
            ImageWriteError: the backing file name is too long for cluster 0.
        """
        zstd = self.compression == "zstd"
        header_length = L.V3_MIN_HEADER_LENGTH + (8 if zstd else 0)
        tail = bytes([L.COMPRESSION_ZSTD]) + bytes(7) if zstd else b""  # compression_type
        exts = b""
        if self.backing_format is not None:
            fmt = self.backing_format.encode()
            exts += _EXT_HEADER.pack(L.EXT_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
        exts += _EXT_HEADER.pack(L.EXT_END, 0)
        name = os.fsencode(self.backing_file) if self.backing_file is not None else b""
        name_offset = header_length + len(exts) if name else 0
        if len(name) > L.MAX_BACKING_FILE_SIZE or name_offset + len(name) > self.cluster_size:
            raise ImageWriteError(f"{self.path}: backing file name too long for cluster 0")
        # magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
        # crypt_method, l1_size, l1_table_offset, refcount_table_offset,
        # refcount_table_clusters, nb_snapshots, snapshots_offset; then v3's
        # incompatible, compatible, autoclear features, refcount_order, header_length.
        v2: tuple[object, ...] = (L.QCOW2_MAGIC, 3, name_offset, len(name), self.cluster_bits)
        v2 += (self.virtual_size, 0, self.l1_size, l1_offset, rt_offset, rt_clusters, 0, 0)
        incompat = L.INCOMPAT_COMPRESSION if zstd else 0
        header = _HEADER_V3.pack(*v2, incompat, 0, 0, REFCOUNT_ORDER, header_length)
        return header + tail + exts + name

    def abort(self) -> None:
        """Close and remove the unfinished file; a no-op after close() or abort().

        Only the file this writer created is removed (same inode at ``path``).
        """
        if self._closed:
            return
        fd, self._fd, self._closed, self._l2 = self._fd, None, True, {}
        assert fd is not None
        try:
            same = os.stat(self.path, follow_symlinks=False)[1:3] == self._identity
        except OSError:
            same = False
        os.close(fd)
        if same:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()
