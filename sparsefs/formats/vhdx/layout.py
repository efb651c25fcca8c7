"""VHDX on-disk structures: headers, region table, metadata table, parent locator.

Pure decoding of bytes into frozen dataclasses, plus CRC-32C.  Nothing here
opens a file; :mod:`sparsefs.formats.vhdx.image` reads the bytes and calls
these functions.  Names follow the VHDX 1.00 specification ([MS-VHDX]) and
qemu's block/vhdx.h.  All integers are little-endian.

Layout of the first MiB (the header section, [MS-VHDX] 2.2)::

    0      file identifier ("vhdxfile" + creator)
    64K    header 1 (4 KiB checksummed)
    128K   header 2
    192K   region table (64 KiB checksummed)
    256K   reserved up to 1 MiB
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB

FILE_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"

HEADER_BLOCK_SIZE = 64 * KiB
HEADER1_OFFSET = 1 * HEADER_BLOCK_SIZE
HEADER2_OFFSET = 2 * HEADER_BLOCK_SIZE
REGION_TABLE_OFFSET = 3 * HEADER_BLOCK_SIZE
REGION_TABLE_SIZE = HEADER_BLOCK_SIZE
HEADER_SIZE = 4 * KiB  # the checksummed part of a header block
HEADER_SECTION_SIZE = 1 * MiB

REGION_MAX_ENTRIES = 2047
REGION_ENTRY_REQUIRED = 0x1

METADATA_TABLE_SIZE = 64 * KiB
METADATA_MAX_ENTRIES = 2047
METADATA_ITEM_MAX_SIZE = 1 * MiB
META_IS_USER = 0x1
META_IS_VIRTUAL_DISK = 0x2
META_IS_REQUIRED = 0x4

PARAMS_LEAVE_BLOCKS_ALLOCATED = 0x1
PARAMS_HAS_PARENT = 0x2

BLOCK_SIZE_MIN = 1 * MiB
BLOCK_SIZE_MAX = 256 * MiB
MAX_SECTORS_PER_BLOCK = 1 << 23  # sectors described by one sector bitmap block
SECTOR_BITMAP_BLOCK_SIZE = 1 * MiB
MAX_VIRTUAL_DISK_SIZE = 64 * 1024**4  # 64 TiB

# BAT entry: state in bits 0-2, FileOffsetMB in bits 20-63 ([MS-VHDX] 2.5.1).
BAT_STATE_MASK = 0x7
BAT_FILE_OFFSET_MASK = ~((1 << 20) - 1) & (2**64 - 1)

# Payload block states ([MS-VHDX] 2.5.1.1); 5 is qemu's PAYLOAD_BLOCK_UNMAPPED_v095.
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_UNMAPPED_V095 = 5
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
# Sector bitmap block states ([MS-VHDX] 2.5.1.2).
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6

STATE_NAMES = {
    PAYLOAD_BLOCK_NOT_PRESENT: "NOT_PRESENT",
    PAYLOAD_BLOCK_UNDEFINED: "UNDEFINED",
    PAYLOAD_BLOCK_ZERO: "ZERO",
    PAYLOAD_BLOCK_UNMAPPED: "UNMAPPED",
    PAYLOAD_BLOCK_UNMAPPED_V095: "UNMAPPED_v095",
    PAYLOAD_BLOCK_FULLY_PRESENT: "FULLY_PRESENT",
    PAYLOAD_BLOCK_PARTIALLY_PRESENT: "PARTIALLY_PRESENT",
}


def _guid(text: str) -> bytes:
    """The on-disk (MS GUID, mixed-endian) bytes of a GUID written as text."""
    return uuid.UUID(text).bytes_le


BAT_GUID = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS_GUID = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_GUID = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_GUID = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_GUID = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
# The locator type of a VHDX parent ([MS-VHDX] 2.6.2.6.1).
VHDX_PARENT_LOCATOR_TYPE = _guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")

METADATA_ITEM_NAMES = {
    FILE_PARAMETERS_GUID: "file parameters",
    VIRTUAL_DISK_SIZE_GUID: "virtual disk size",
    PAGE83_GUID: "page 83 data",
    LOGICAL_SECTOR_SIZE_GUID: "logical sector size",
    PHYSICAL_SECTOR_SIZE_GUID: "physical sector size",
    PARENT_LOCATOR_GUID: "parent locator",
}
REQUIRED_METADATA_ITEMS = (
    FILE_PARAMETERS_GUID,
    VIRTUAL_DISK_SIZE_GUID,
    PAGE83_GUID,
    LOGICAL_SECTOR_SIZE_GUID,
    PHYSICAL_SECTOR_SIZE_GUID,
)

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
_REGION_HEADER = struct.Struct("<4sIII")
_REGION_ENTRY = struct.Struct("<16sQII")
_METADATA_HEADER = struct.Struct("<8sHH20x")
_METADATA_ENTRY = struct.Struct("<16sIII4x")
_LOCATOR_HEADER = struct.Struct("<16sHH")
_LOCATOR_ENTRY = struct.Struct("<IIHH")


class LayoutError(ValueError):
    """A structure does not decode; the message says what is wrong (no file name)."""


# -- CRC-32C (Castagnoli), as the VHDX headers and region table use it ---------------------


def _crc32c_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # reflected 0x1EDC6F41
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data`` (initial value and final xor 0xFFFFFFFF, reflected).

    ``crc32c(b"123456789") == 0xE3069283``.  Table-driven, one byte per step:
    the checksummed VHDX structures are at most 64 KiB and read once per open.
    """
    table = _CRC32C_TABLE
    c = crc ^ 0xFFFFFFFF
    for byte in bytes(data):
        c = table[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def checksum_ok(block: bytes, checksum_offset: int = 4) -> bool:
    """True when the CRC-32C stored at ``checksum_offset`` matches ``block``.

    The checksum is computed with its own four bytes taken as zero.
    """
    if len(block) < checksum_offset + 4:
        return False
    stored = int(struct.unpack_from("<I", block, checksum_offset)[0])
    zeroed = block[:checksum_offset] + b"\0\0\0\0" + block[checksum_offset + 4 :]
    return crc32c(zeroed) == stored


def guid_text(raw: bytes) -> str:
    """An on-disk GUID as ``{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}`` (upper case)."""
    return "{" + str(uuid.UUID(bytes_le=bytes(raw))).upper() + "}"


# -- header section -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """One VHDX header ([MS-VHDX] 2.2.2); GUIDs as their 16 on-disk bytes."""

    sequence_number: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int

    @classmethod
    def from_block(cls, block: bytes) -> Header | None:
        """Decode a 4 KiB header block; None when its signature, checksum or version is wrong."""
        if len(block) < HEADER_SIZE:
            return None
        block = block[:HEADER_SIZE]
        sig, _, seq, fwg, dwg, lg, log_version, version, log_length, log_offset = (
            _HEADER.unpack_from(block)
        )
        if sig != HEADER_SIGNATURE or version != 1 or not checksum_ok(block):
            return None
        return cls(seq, fwg, dwg, lg, log_version, version, log_length, log_offset)

    @property
    def has_log(self) -> bool:
        """True when the log GUID is not zero (the log may hold entries to replay)."""
        return self.log_guid != bytes(16)


def active_header(block1: bytes, block2: bytes) -> Header:
    """The current header of the two, as qemu's vhdx_parse_header chooses it.

    The valid header with the higher sequence number wins; two valid headers
    with the same number must be identical.

    Raises:
        LayoutError: neither header is valid, or they tie and differ.
    """
    h1 = Header.from_block(block1)
    h2 = Header.from_block(block2)
    if h1 is None and h2 is None:
        raise LayoutError("no valid VHDX header (bad signature, version or CRC-32C in both)")
    if h1 is None:
        assert h2 is not None
        return h2
    if h2 is None or h1.sequence_number > h2.sequence_number:
        return h1
    if h2.sequence_number > h1.sequence_number:
        return h2
    if h1 != h2:
        raise LayoutError("both VHDX headers have the same sequence number but differ")
    return h1


@dataclass(frozen=True, slots=True)
class Region:
    """A region table entry ([MS-VHDX] 2.2.3.2): ``length`` bytes at ``file_offset``."""

    guid: bytes
    file_offset: int
    length: int
    required: bool


def parse_region_table(table: bytes) -> list[Region]:
    """Decode the 64 KiB region table block.

    Raises:
        LayoutError: bad signature or checksum, too many entries.
    """
    if len(table) < REGION_TABLE_SIZE:
        raise LayoutError("region table is cut short by the end of the file")
    table = table[:REGION_TABLE_SIZE]
    sig, _, entry_count, _ = _REGION_HEADER.unpack_from(table)
    if sig != REGION_SIGNATURE:
        raise LayoutError("region table has a bad signature")
    if not checksum_ok(table):
        raise LayoutError("region table has a bad CRC-32C checksum")
    if entry_count > REGION_MAX_ENTRIES:
        raise LayoutError(f"region table has {entry_count} entries (at most 2047)")
    out = []
    for i in range(entry_count):
        guid, file_offset, length, bits = _REGION_ENTRY.unpack_from(
            table, _REGION_HEADER.size + i * _REGION_ENTRY.size
        )
        out.append(Region(guid, file_offset, length, bool(bits & REGION_ENTRY_REQUIRED)))
    return out


# -- metadata region ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetadataItem:
    """A metadata table entry ([MS-VHDX] 2.6.1.2); ``offset`` is from the region's start."""

    item_id: bytes
    offset: int
    length: int
    is_user: bool
    is_virtual_disk: bool
    is_required: bool


def parse_metadata_table(table: bytes, region_length: int) -> list[MetadataItem]:
    """Decode the metadata table at the start of the metadata region.

    Checks that each item lies inside the region, after the table, and is at
    most 1 MiB, and that no item appears twice.

    Raises:
        LayoutError: what is wrong, naming the item.
    """
    if len(table) < METADATA_TABLE_SIZE:
        raise LayoutError("metadata table is cut short by the end of the file")
    sig, _, entry_count = _METADATA_HEADER.unpack_from(table)
    if sig != METADATA_SIGNATURE:
        raise LayoutError("metadata table has a bad signature")
    if entry_count > METADATA_MAX_ENTRIES:
        raise LayoutError(f"metadata table has {entry_count} entries (at most 2047)")
    items: list[MetadataItem] = []
    seen: set[bytes] = set()
    for i in range(entry_count):
        item_id, offset, length, bits = _METADATA_ENTRY.unpack_from(
            table, _METADATA_HEADER.size + i * _METADATA_ENTRY.size
        )
        item = MetadataItem(
            item_id,
            offset,
            length,
            bool(bits & META_IS_USER),
            bool(bits & META_IS_VIRTUAL_DISK),
            bool(bits & META_IS_REQUIRED),
        )
        name = METADATA_ITEM_NAMES.get(item_id, f"item {guid_text(item_id)}")
        if length > METADATA_ITEM_MAX_SIZE:
            raise LayoutError(f"metadata {name} is {length} bytes long (at most 1 MiB)")
        if length and (offset < METADATA_TABLE_SIZE or offset + length > region_length):
            raise LayoutError(
                f"metadata {name} at {offset:#x}+{length:#x} is outside the metadata region"
            )
        if item_id in seen:  # qemu's vhdx_parse_metadata refuses a repeated item too
            raise LayoutError(f"metadata {name} appears twice")
        seen.add(item_id)
        items.append(item)
    return items


@dataclass(frozen=True, slots=True)
class FileParameters:
    """File parameters ([MS-VHDX] 2.6.2.1)."""

    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool

    @classmethod
    def from_bytes(cls, buf: bytes) -> FileParameters:
        """Decode the 8-byte item."""
        if len(buf) < 8:
            raise LayoutError("file parameters item is shorter than 8 bytes")
        block_size, bits = struct.unpack_from("<II", buf)
        return cls(
            block_size, bool(bits & PARAMS_LEAVE_BLOCKS_ALLOCATED), bool(bits & PARAMS_HAS_PARENT)
        )


def parse_u32(buf: bytes, what: str) -> int:
    """A 4-byte little-endian item (sector sizes)."""
    if len(buf) < 4:
        raise LayoutError(f"{what} item is shorter than 4 bytes")
    return int(struct.unpack_from("<I", buf)[0])


def parse_u64(buf: bytes, what: str) -> int:
    """An 8-byte little-endian item (virtual disk size)."""
    if len(buf) < 8:
        raise LayoutError(f"{what} item is shorter than 8 bytes")
    return int(struct.unpack_from("<Q", buf)[0])


@dataclass(frozen=True, slots=True)
class ParentLocator:
    """A parent locator ([MS-VHDX] 2.6.2.6): its type and key/value pairs."""

    locator_type: bytes
    entries: dict[str, str]


def parse_parent_locator(buf: bytes) -> ParentLocator:
    """Decode the parent locator item; keys and values are UTF-16LE inside the item.

    Raises:
        LayoutError: an entry points outside the item, is empty, is not UTF-16,
            or a key repeats.
    """
    if len(buf) < _LOCATOR_HEADER.size:
        raise LayoutError("parent locator is shorter than its header")
    locator_type, _, count = _LOCATOR_HEADER.unpack_from(buf)
    if _LOCATOR_HEADER.size + count * _LOCATOR_ENTRY.size > len(buf):
        raise LayoutError(f"parent locator's {count} entries do not fit in the item")
    entries: dict[str, str] = {}
    for i in range(count):
        key_offset, value_offset, key_length, value_length = _LOCATOR_ENTRY.unpack_from(
            buf, _LOCATOR_HEADER.size + i * _LOCATOR_ENTRY.size
        )
        fields = []
        for off, n in ((key_offset, key_length), (value_offset, value_length)):
            if n == 0 or n % 2 or off == 0 or off + n > len(buf):
                raise LayoutError(f"parent locator entry {i} has a bad offset or length")
            try:
                fields.append(buf[off : off + n].decode("utf-16-le"))
            except UnicodeDecodeError:
                raise LayoutError(f"parent locator entry {i} is not UTF-16") from None
        key, value = fields
        if key in entries:
            raise LayoutError(f"parent locator key {key!r} appears twice")
        entries[key] = value
    return ParentLocator(locator_type, entries)
