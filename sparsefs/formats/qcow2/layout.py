"""qcow2 on-disk layout: constants, struct formats and decoded records; no I/O.

Names follow qemu's docs/interop/qcow2.txt (cited as "spec, <section>").  All
multi-byte numbers in qcow2 are big-endian.  Offsets named ``host_*`` are byte
offsets in the image (or data) file; ``guest_*`` are byte offsets in the
virtual disk.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field

QCOW2_MAGIC = b"QFI\xfb"

# spec, "Header": cluster_bits must be >= 9; qemu refuses more than 2 MiB.
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
# qemu's implementation limit for the L1 table (32 MiB) and snapshot count.
MAX_L1_SIZE_BYTES = 32 * 1024 * 1024
# qemu's QCOW_MAX_REFTABLE_SIZE: the refcount table is not read, but qemu refuses more.
MAX_REFTABLE_SIZE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
# qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA and QCOW_MAX_SNAPSHOTS_SIZE (64 MiB of table).
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_SNAPSHOTS_TABLE_BYTES = 1024 * MAX_SNAPSHOTS
MAX_BACKING_FILE_SIZE = 1023
# qemu keeps file offsets in int64_t: a table must end at or below this (qcow2_validate_table).
MAX_FILE_OFFSET = (1 << 63) - 1

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104

# spec, "Header", incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# spec, "Header extensions"
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# spec, "Cluster mapping"
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
# spec, "Extended L2 Entries"
SUBCLUSTERS_PER_CLUSTER = 32
SUBCLUSTER_ALLOC_MASK = 0xFFFFFFFF

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes, through snapshots_offset
_HEADER_V3 = struct.Struct(">QQQII")  # bytes 72..103
_EXT_HEADER = struct.Struct(">II")
_SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # 40 bytes


@dataclass(frozen=True, slots=True)
class Header:
    """The qcow2 header (spec, "Header"), v2 fields plus the v3 additions.

    For v2 images the v3 fields hold the values the spec says to assume.
    """

    magic: bytes
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB

    @classmethod
    def from_bytes(cls, buf: bytes) -> Header:
        """Decode a header from the first bytes of a file.

        Raises:
            ValueError: ``buf`` is too short for the fields its version needs
                (the caller names the file).
        """
        if len(buf) < _HEADER_V2.size:
            raise ValueError(f"header truncated ({len(buf)} of {_HEADER_V2.size} bytes)")
        (
            magic,
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
        ) = _HEADER_V2.unpack_from(buf, 0)
        v2 = cls(
            magic,
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
        )
        if version < 3:
            return v2
        if len(buf) < V3_MIN_HEADER_LENGTH:
            raise ValueError(f"v3 header truncated ({len(buf)} of {V3_MIN_HEADER_LENGTH} bytes)")
        incompat, compat, autoclear, refcount_order, header_length = _HEADER_V3.unpack_from(
            buf, _HEADER_V2.size
        )
        compression_type = COMPRESSION_ZLIB
        if header_length > 104:
            if len(buf) < 105:
                raise ValueError("v3 header truncated before compression_type")
            compression_type = buf[104]
        return dataclasses.replace(
            v2,
            incompatible_features=incompat,
            compatible_features=compat,
            autoclear_features=autoclear,
            refcount_order=refcount_order,
            header_length=header_length,
            compression_type=compression_type,
        )

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        """True when L2 entries carry subcluster bitmaps (spec, "Extended L2 Entries")."""
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        """True when guest data lives in an external data file."""
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def refcount_bits(self) -> int:
        """Width of a refcount entry in bits."""
        return 1 << self.refcount_order


@dataclass(frozen=True, slots=True)
class HeaderExtension:
    """One header extension: its type, its data, and where the data starts."""

    ext_type: int
    data: bytes
    host_offset: int


def parse_extensions(buf: bytes, start: int, limit: int) -> list[HeaderExtension]:
    """Decode the header extension area of ``buf`` from ``start`` up to ``limit``.

    Stops at the end marker.  Raises ValueError when an extension would run
    past ``limit`` (the end of the first cluster) or past ``buf``.
    """
    exts: list[HeaderExtension] = []
    pos = start
    limit = min(limit, len(buf))
    while True:
        if pos + _EXT_HEADER.size > limit:
            raise ValueError(f"header extension at byte {pos} runs past the first cluster")
        ext_type, length = _EXT_HEADER.unpack_from(buf, pos)
        if ext_type == EXT_END:
            return exts
        data_start = pos + _EXT_HEADER.size
        if length > limit - data_start:
            raise ValueError(
                f"header extension 0x{ext_type:08x} at byte {pos} has length {length}, "
                "past the first cluster"
            )
        exts.append(HeaderExtension(ext_type, bytes(buf[data_start : data_start + length]), pos))
        pos = data_start + ((length + 7) & ~7)


def parse_feature_table(data: bytes) -> dict[tuple[int, int], str]:
    """Decode the feature name table: (type, bit) -> name."""
    names: dict[tuple[int, int], str] = {}
    for pos in range(0, len(data) - 47, 48):
        name = data[pos + 2 : pos + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
        names[(data[pos], data[pos + 1])] = name
    return names


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One entry of the snapshot table (spec, "Snapshots")."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None = field(default=None)


class TruncatedError(ValueError):
    """The buffer ends before the record does: read more and decode again."""


def parse_snapshot(buf: bytes | bytearray, pos: int) -> tuple[Snapshot, int]:
    """Decode the snapshot table entry at ``pos``; return it and the next entry's position.

    Raises:
        TruncatedError: the entry runs past ``buf``.
        ValueError: the entry is invalid (more extra data than qemu allows).
    """
    if pos + _SNAPSHOT_HEADER.size > len(buf):
        raise TruncatedError("snapshot table entry truncated")
    (
        l1_table_offset,
        l1_size,
        id_str_size,
        name_size,
        date_sec,
        date_nsec,
        vm_clock_nsec,
        vm_state_size,
        extra_data_size,
    ) = _SNAPSHOT_HEADER.unpack_from(buf, pos)
    if extra_data_size > MAX_SNAPSHOT_EXTRA_DATA:
        raise ValueError(
            f"{extra_data_size} bytes of extra data (qemu allows at most {MAX_SNAPSHOT_EXTRA_DATA})"
        )
    extra_start = pos + _SNAPSHOT_HEADER.size
    id_start = extra_start + extra_data_size
    end = id_start + id_str_size + name_size
    if end > len(buf):
        raise TruncatedError("snapshot table entry truncated")
    extra = buf[extra_start:id_start]
    disk_size = None
    if extra_data_size >= 8:
        vm_state_size = int.from_bytes(extra[0:8], "big")
    if extra_data_size >= 16:
        disk_size = int.from_bytes(extra[8:16], "big")
    id_str = buf[id_start : id_start + id_str_size].decode("utf-8", "replace")
    name = buf[id_start + id_str_size : end].decode("utf-8", "replace")
    snap = Snapshot(
        l1_table_offset,
        l1_size,
        id_str,
        name,
        date_sec,
        date_nsec,
        vm_clock_nsec,
        vm_state_size,
        disk_size,
    )
    return snap, (end + 7) & ~7


def compressed_descriptor(cluster_bits: int, entry: int) -> tuple[int, int]:
    """Decode a compressed cluster descriptor into (host_offset, nb_bytes).

    spec, "Compressed Clusters Descriptor": x = 62 - (cluster_bits - 8); bits
    0..x-1 hold the host offset, bits x..61 the number of additional 512-byte
    sectors.  ``nb_bytes`` runs from the offset to the end of the last sector.
    """
    x = 62 - (cluster_bits - 8)
    host_offset = entry & ((1 << x) - 1)
    nb_sectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    nb_bytes = nb_sectors * 512 - (host_offset & 511)
    return host_offset, nb_bytes


# -- Bitmaps (spec, "Bitmaps extension" and "Bitmaps") -------------------------------

# spec, "Bitmaps extension": nb_bitmaps, reserved, bitmap_directory_size, _offset.
_BITMAPS_EXT = struct.Struct(">IIQQ")  # 24 bytes
# spec, "Bitmap directory": bitmap_table_offset, bitmap_table_size, flags, type,
# granularity_bits, name_size, extra_data_size; extra data and the name follow.
_BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes
BITMAPS_EXT_SIZE = _BITMAPS_EXT.size
BITMAP_DIR_ENTRY_SIZE = _BITMAP_DIR_ENTRY.size
# qemu's limits (QCOW2_MAX_BITMAPS, QCOW2_MAX_BITMAP_DIRECTORY_SIZE, BME_MAX_*).
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_BITMAP_TABLE_SIZE = 0x8000000  # entries
MAX_BITMAP_PHYS_SIZE = 0x20000000  # bytes of bitmap data
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_BITMAP_NAME_SIZE = 1023
# Bitmap directory entry flags
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_RESERVED_FLAGS = 0xFFFFFFFF & ~0x7
BITMAP_TYPE_DIRTY_TRACKING = 1
# Bitmap table entry: bit 0 = all ones (when no offset), bits 9..55 the offset.
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1 << 0


@dataclass(frozen=True, slots=True)
class BitmapsExtension:
    """The bitmaps header extension (spec, "Bitmaps extension")."""

    nb_bitmaps: int
    reserved: int
    bitmap_directory_size: int
    bitmap_directory_offset: int

    @classmethod
    def from_bytes(cls, data: bytes) -> BitmapsExtension:
        """Decode the extension data.

        Raises:
            ValueError: the data is not exactly 24 bytes long.
        """
        if len(data) != _BITMAPS_EXT.size:
            raise ValueError(
                f"bitmaps extension has length {len(data)} (must be {_BITMAPS_EXT.size})"
            )
        return cls(*_BITMAPS_EXT.unpack(data))


@dataclass(frozen=True, slots=True)
class BitmapDirEntry:
    """One bitmap directory entry (spec, "Bitmap directory").

    ``entry_size`` is the entry's length in the directory, padding included.
    """

    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: bytes
    extra_data: bytes
    padding: bytes
    entry_size: int


def parse_bitmap_dir_entry(buf: bytes, pos: int) -> BitmapDirEntry:
    """Decode the bitmap directory entry at ``pos`` of ``buf`` (the whole directory).

    Raises:
        ValueError: the entry runs past the end of ``buf``.
    """
    if pos + _BITMAP_DIR_ENTRY.size > len(buf):
        raise ValueError(f"bitmap directory entry at byte {pos} runs past the directory")
    (
        bitmap_table_offset,
        bitmap_table_size,
        flags,
        bitmap_type,
        granularity_bits,
        name_size,
        extra_data_size,
    ) = _BITMAP_DIR_ENTRY.unpack_from(buf, pos)
    extra_start = pos + _BITMAP_DIR_ENTRY.size
    name_start = extra_start + extra_data_size
    name_end = name_start + name_size
    end = (name_end + 7) & ~7
    if end > len(buf):
        raise ValueError(f"bitmap directory entry at byte {pos} runs past the directory")
    return BitmapDirEntry(
        bitmap_table_offset,
        bitmap_table_size,
        flags,
        bitmap_type,
        granularity_bits,
        bytes(buf[name_start:name_end]),
        bytes(buf[extra_start:name_start]),
        bytes(buf[name_end:end]),
        end - pos,
    )
