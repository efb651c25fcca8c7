"""An open qcow2 file: header, extensions, validation, data file, backing file, L1 tables.

:class:`Qcow2File` opens and validates the image file once (qemu:
qcow2_do_open); the cluster map, the compressed clusters and the snapshot
table are its parts, each in its own module.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from sparsefs import locking
from sparsefs.errors import ImageFormatError, MissingFileError, UnsupportedFeatureError
from sparsefs.extents import SparseSource
from sparsefs.formats.qcow2 import layout as L
from sparsefs.formats.qcow2.clustermap import ClusterMap
from sparsefs.formats.qcow2.compressed import CompressedClusters
from sparsefs.formats.qcow2.messages import past_end_text, size_text
from sparsefs.formats.qcow2.runs import LRU
from sparsefs.formats.qcow2.snapshots import SnapshotTable
from sparsefs.options import OpenOptions
from sparsefs.parents import check_regular_file as _check_regular_file
from sparsefs.parents import resolve_name
from sparsefs.raw import RawFile

# L1 entries loaded per image file (active state plus snapshots), in bytes of
# on-disk table: bounds memory for images with many snapshots of huge disks.
MAX_TOTAL_L1_BYTES = 64 * 1024 * 1024


class Qcow2File(ClusterMap, CompressedClusters, SnapshotTable):
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
        """Open and validate, in qemu's order (qcow2_do_open); every step may raise."""
        head = self._read_header()
        first_cluster = head[: self.cluster_size] if self.cluster_size <= len(head) else None
        feature_names = self._read_extensions(first_cluster)
        self._check_features(feature_names)
        self._set_geometry()
        ext = {e.ext_type: e for e in self.extensions}
        self._read_names(ext)
        # Snapshots: the table is read on first use (``snapshots``), so that the
        # active disk never depends on it; a damaged table costs the snapshots only.
        self._snapshot_table: tuple[list[L.Snapshot], str | None] | None = None
        self._open_data_file()
        # From here on, every read of the image file is of something its
        # metadata places there: past the end of the file means truncated.
        self.file.strict_end = True
        # Backing chain
        self.backing: SparseSource | None = None
        self.backing_path: str | None = None
        if self.backing_name and self.options.backing:
            self.backing_path, self.backing = self._open_backing(chain)

    def _read_header(self) -> bytes:
        """Parse and check the header (spec, "Header"); return the file's first 4 KiB."""
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
                f"invalid cluster_bits {header.cluster_bits} (cluster size must be 512 B to 2 MiB)"
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
            raise self._err(f"refcount table too large ({header.refcount_table_clusters} clusters)")
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
        return head

    def _read_extensions(self, first_cluster: bytes | None) -> dict[tuple[int, int], str]:
        """Read the header extensions; return the feature name table (spec, "Header extensions")."""
        header = self.header
        cs = self.cluster_size
        if first_cluster is None:
            first_cluster = self.file.pread(0, cs)
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
        return feature_names

    def _check_features(self, feature_names: dict[tuple[int, int], str]) -> None:
        """Refuse unknown incompatible features, a corrupt mark, a mismatched compression type."""
        header = self.header
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

    def _set_geometry(self) -> None:
        """L2 entry size, table span, subclusters, the caches."""
        header = self.header
        cs = self.cluster_size
        self.l2_entry_size = 16 if self.extended_l2 else 8
        self.l2_bits = header.cluster_bits - (4 if self.extended_l2 else 3)
        self.table_shift = header.cluster_bits + self.l2_bits  # guest bytes per L2 table, log2
        self.subcluster_bits = header.cluster_bits - (5 if self.extended_l2 else 0)
        self._zero_table = bytes(cs)
        self._l2_cache = LRU(max(self.options.l2_cache_bytes, 2 * cs))
        self._init_compression(self.options.compressed_cache_bytes)

    def _read_names(self, ext: dict[int, L.HeaderExtension]) -> None:
        """The backing file name and format and the data file name, as the image stores them."""
        header = self.header
        cs = self.cluster_size
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

    def _open_data_file(self) -> None:
        """Open the external data file when the image has one (else data is the image file)."""
        header = self.header
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
