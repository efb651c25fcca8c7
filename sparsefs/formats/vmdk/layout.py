"""VMDK on-disk structures: the hosted sparse extent header, markers, the text descriptor.

Pure decoding, no file access: every function takes bytes and returns typed
values or raises :class:`~sparsefs.errors.ImageFormatError` /
:class:`~sparsefs.errors.UnsupportedFeatureError` with a message that the
caller prefixes with the file name.  Names follow VMware's "Virtual Disk
Format 5.0" specification and qemu's block/vmdk.c (``VMDK4Header``,
``num_gtes_per_gt``, ``VMDK_GTE_ZEROED``).  All sizes in the header are in
512-byte sectors.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

SECTOR_SIZE = 512
VMDK4_MAGIC = b"KDMV"
VMDK3_MAGIC = b"COWD"  # ESX/ESXi-hosted "vmfsSparse" extents
SESPARSE_MAGIC = struct.pack("<Q", 0xCAFEBABE)

# Header flags (spec section "Hosted Sparse Extent Header").
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESS = 1 << 16
FLAG_MARKER = 1 << 17
KNOWN_FLAGS = FLAG_NL_DETECT | FLAG_RGD | FLAG_ZERO_GRAIN | FLAG_COMPRESS | FLAG_MARKER

COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF  # streamOptimized: the real header is the footer
GTE_ZEROED = 1  # a grain table entry meaning "reads as zeros" (with FLAG_ZERO_GRAIN)

MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3

MAX_VERSION = 3
MAX_GTES_PER_GT = 512  # qemu: "L2 table size too big" above this
MAX_GRAIN_SECTORS = 0x200000  # qemu: 1 GiB grains are "unrealistic"
MAX_COMPRESSED_GRAIN = 16 << 20  # streamOptimized writers use 64 KiB; bounds inflate memory
MAX_GD_ENTRIES = 32 * 1024 * 1024  # qemu's bound on the L1 (grain directory) size
MAX_DESCRIPTOR_BYTES = (1 << 20) - 1  # qemu reads at most this much descriptor text
MAX_DISK_BYTES = 1 << 62  # host and guest offsets stay well inside off_t

# magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize,
# numGTEsPerGT, rgdOffset, gdOffset, overHead, uncleanShutdown, 4 newline check
# chars, compressAlgorithm; the rest of the 512-byte sector is padding.
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_MARKER = struct.Struct("<QII")  # value (lba or sectors), size, type
GRAIN_MARKER_SIZE = 12  # lba (8) + size (4), then the compressed bytes


class LayoutError(ValueError):
    """A structure is invalid; the message lacks the file name (the caller adds it)."""


class LayoutUnsupported(ValueError):
    """A structure is valid but uses something sparsefs refuses; message lacks the file name."""


@dataclass(frozen=True, slots=True)
class SparseHeader:
    """A VMDK4 hosted sparse extent header (``SparseExtentHeader`` in the spec).

    Attributes:
        version: 1, 2 or 3.
        flags: FLAG_* bits.
        capacity: extent size in sectors.
        grain_sectors: sectors per grain (``grainSize``).
        descriptor_offset: sector of the embedded descriptor, 0 for none.
        descriptor_sectors: its length in sectors.
        num_gtes_per_gt: grain table entries per grain table.
        rgd_offset: sector of the redundant grain directory.
        gd_offset: sector of the grain directory (GD_AT_END: see the footer).
        overhead: sectors of metadata before the first grain (``overHead``).
        compress_algorithm: COMPRESSION_NONE or COMPRESSION_DEFLATE.
    """

    version: int
    flags: int
    capacity: int
    grain_sectors: int
    descriptor_offset: int
    descriptor_sectors: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    compress_algorithm: int

    @classmethod
    def from_bytes(cls, buf: bytes) -> SparseHeader:
        """Decode the first ``_HEADER.size`` bytes of ``buf`` (starting with the magic).

        Raises:
            LayoutError: ``buf`` is short or does not start with ``KDMV``.
        """
        if len(buf) < _HEADER.size:
            raise LayoutError("file too short for a VMDK sparse extent header")
        (
            magic,
            version,
            flags,
            capacity,
            grain,
            desc_off,
            desc_size,
            gtes,
            rgd,
            gd,
            overhead,
            _unclean,
            _nl,
            algo,
        ) = _HEADER.unpack_from(buf)
        if magic != VMDK4_MAGIC:
            raise LayoutError("no VMDK4 magic (KDMV)")
        return cls(
            version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, overhead, algo
        )

    @property
    def compressed(self) -> bool:
        """Grains are deflate-compressed (streamOptimized), as qemu decides it."""
        return self.compress_algorithm == COMPRESSION_DEFLATE

    @property
    def has_marker(self) -> bool:
        """Compressed grains start with a grain marker (lba, size)."""
        return bool(self.flags & FLAG_MARKER)

    @property
    def has_zero_grain(self) -> bool:
        """A grain table entry of GTE_ZEROED means a zeroed grain."""
        return bool(self.flags & FLAG_ZERO_GRAIN)

    @property
    def gd_entry_sectors(self) -> int:
        """Guest sectors covered by one grain directory entry (one grain table)."""
        return self.num_gtes_per_gt * self.grain_sectors

    @property
    def nb_gd_entries(self) -> int:
        """Entries in the grain directory: enough grain tables for ``capacity``."""
        per = self.gd_entry_sectors
        return -(-self.capacity // per) if per else 0

    def check(self) -> None:
        """Validate the fields that do not depend on the file (qemu's vmdk_open_vmdk4 rules).

        Raises:
            LayoutUnsupported: version above 3, unknown flags, an unknown
                compression algorithm.
            LayoutError: a field out of range.
        """
        if self.version > MAX_VERSION:
            raise LayoutUnsupported(f"VMDK version {self.version} is not supported")
        unknown = self.flags & ~KNOWN_FLAGS
        if unknown:
            raise LayoutUnsupported(f"unknown VMDK header flags {unknown:#x}")
        if self.compress_algorithm not in (COMPRESSION_NONE, COMPRESSION_DEFLATE):
            raise LayoutUnsupported(f"unknown VMDK compression algorithm {self.compress_algorithm}")
        if not 1 <= self.num_gtes_per_gt <= MAX_GTES_PER_GT:
            raise LayoutError(f"grain table size {self.num_gtes_per_gt} entries is invalid")
        if not 1 <= self.grain_sectors <= MAX_GRAIN_SECTORS:
            raise LayoutError(f"grain size {self.grain_sectors} sectors is invalid")
        if self.capacity * SECTOR_SIZE > MAX_DISK_BYTES:
            raise LayoutError(f"capacity of {self.capacity} sectors is too large")
        if self.nb_gd_entries > MAX_GD_ENTRIES:
            raise LayoutError(f"grain directory of {self.nb_gd_entries} entries is too big")


def parse_footer(buf: bytes) -> SparseHeader:
    """Decode a streamOptimized footer: footer marker, header copy, end-of-stream marker.

    ``buf`` is the last 1536 bytes (three sectors) of the file, as qemu reads them.

    Raises:
        LayoutError: the markers or the magic are wrong.
    """
    if len(buf) < 3 * SECTOR_SIZE:
        raise LayoutError("file too short for a streamOptimized footer")
    _val, fsize, ftype = _MARKER.unpack_from(buf, 0)
    eos_val, eos_size, eos_type = _MARKER.unpack_from(buf, 2 * SECTOR_SIZE)
    if (
        buf[SECTOR_SIZE : SECTOR_SIZE + 4] != VMDK4_MAGIC
        or fsize != 0
        or ftype != MARKER_FOOTER
        or eos_val != 0
        or eos_size != 0
        or eos_type != MARKER_EOS
    ):
        raise LayoutError("invalid streamOptimized footer")
    footer = SparseHeader.from_bytes(buf[SECTOR_SIZE : 2 * SECTOR_SIZE])
    if footer.gd_offset == GD_AT_END:
        raise LayoutError("streamOptimized footer does not give the grain directory offset")
    return footer


def parse_grain_marker(buf: bytes) -> tuple[int, int]:
    """(lba, compressed size in bytes) of a grain marker at the start of ``buf``."""
    lba, size = struct.unpack_from("<QI", buf, 0)
    return lba, size


def build_marker(value: int, size: int, kind: int) -> bytes:
    """One 512-byte metadata marker sector (tests use it to write streams)."""
    return _MARKER.pack(value, size, kind).ljust(SECTOR_SIZE, b"\0")


def pack_header(h: SparseHeader) -> bytes:
    """The 512-byte header sector of ``h`` (newline check chars as qemu writes them)."""
    return _HEADER.pack(
        VMDK4_MAGIC,
        h.version,
        h.flags,
        h.capacity,
        h.grain_sectors,
        h.descriptor_offset,
        h.descriptor_sectors,
        h.num_gtes_per_gt,
        h.rgd_offset,
        h.gd_offset,
        h.overhead,
        0,
        b"\n \r\n",
        h.compress_algorithm,
    ).ljust(SECTOR_SIZE, b"\0")


# -- the text descriptor ------------------------------------------------------------------

ACCESS_MODES = ("RW", "RDONLY", "NOACCESS")
# createType values a descriptor file may carry, and which are refused.
DESCRIPTOR_TYPES = ("monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "vmfs")
REFUSED_TYPES = {
    "vmfsSparse": "ESXi-hosted VMFS sparse (vmfsSparse) disks are not supported",
    "seSparse": "ESXi SE sparse (seSparse) disks are not supported",
    "vmfsRaw": "raw device mappings (vmfsRaw) are not supported",
    "vmfsRDM": "raw device mappings (vmfsRDM) are not supported",
    "vmfsPassthroughRawDeviceMap": "raw device mappings are not supported",
    "fullDevice": "whole-device VMDKs (fullDevice) are not supported",
    "partitionedDevice": "device-backed VMDKs (partitionedDevice) are not supported",
}
REFUSED_EXTENTS = {
    "VMFSSPARSE": "ESXi-hosted VMFS sparse (VMFSSPARSE) extents are not supported",
    "SESPARSE": "ESXi SE sparse (SESPARSE) extents are not supported",
    "VMFSRDM": "raw device mapping (VMFSRDM) extents are not supported",
    "VMFSRAW": "raw device (VMFSRAW) extents are not supported",
}
# access, size in sectors, type, optional "file name", optional offset in sectors
_EXTENT_LINE = re.compile(
    r'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"\r\n]*)"(?:\s+(\d+))?)?\s*$'
)
_KEY_VALUE = re.compile(r'^\s*([A-Za-z][\w.]*)\s*=\s*"?([^"\r\n]*)"?\s*$')


@dataclass(frozen=True, slots=True)
class ExtentLine:
    """One line of the descriptor's extent description.

    Attributes:
        access: RW, RDONLY or NOACCESS.
        sectors: extent size in sectors.
        kind: SPARSE, FLAT, ZERO or VMFS (VMFS is a flat extent at offset 0).
        file_name: the extent file as written (None for ZERO).
        offset: FLAT only: sector in the file where the extent starts.
    """

    access: str
    sectors: int
    kind: str
    file_name: str | None
    offset: int


@dataclass(frozen=True, slots=True)
class Descriptor:
    """The fields of a VMDK text descriptor that reading needs.

    Attributes:
        fields: every ``key=value`` line, quotes removed (first occurrence wins).
        extents: the extent lines, in order.
    """

    fields: dict[str, str] = field(default_factory=dict)
    extents: tuple[ExtentLine, ...] = ()

    @property
    def create_type(self) -> str | None:
        """The ``createType`` value."""
        return self.fields.get("createType")

    @property
    def cid(self) -> int | None:
        """The content id (hex), None when absent or unreadable."""
        return _hex(self.fields.get("CID"))

    @property
    def parent_cid(self) -> int | None:
        """The parent's content id this delta was made against (0xffffffff: none)."""
        return _hex(self.fields.get("parentCID"))

    @property
    def parent_hint(self) -> str | None:
        """``parentFileNameHint``: the parent of a delta (differencing) disk."""
        return self.fields.get("parentFileNameHint")


def _hex(value: str | None) -> int | None:
    if value is None:
        return None
    m = re.match(r"\s*(?:0[xX])?([0-9a-fA-F]+)", value)  # as sscanf("%x") reads it
    return int(m.group(1), 16) & 0xFFFF_FFFF if m else None


def decode_text(buf: bytes) -> str:
    """Descriptor text: up to the first NUL, undecodable bytes replaced."""
    end = buf.find(b"\0")
    return (buf if end < 0 else buf[:end]).decode("utf-8", errors="replace")


def parse_descriptor(text: str) -> Descriptor:
    """Parse descriptor text into fields and extent lines.

    Lines that are neither ``key=value`` nor an extent line (comments, blank
    lines, the DDB section's ``ddb.x = "y"`` lines are key=value too) are
    skipped, as qemu skips them.

    Raises:
        LayoutError: an extent line is malformed (FLAT without an offset, a
            file name missing, a zero size).
        LayoutUnsupported: an extent type sparsefs refuses or does not know.
    """
    fields: dict[str, str] = {}
    extents: list[ExtentLine] = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_LINE.match(line)
        if m:
            extents.append(_extent_line(m, line))
            continue
        kv = _KEY_VALUE.match(line)
        if kv:
            fields.setdefault(kv.group(1), kv.group(2).strip())
    return Descriptor(fields, tuple(extents))


def _extent_line(m: re.Match[str], line: str) -> ExtentLine:
    access, sectors_s, kind, name, offset_s = m.groups()
    sectors = int(sectors_s)
    if kind in REFUSED_EXTENTS:
        raise LayoutUnsupported(REFUSED_EXTENTS[kind])
    if kind not in ("SPARSE", "FLAT", "ZERO", "VMFS"):
        raise LayoutUnsupported(f"unknown extent type {kind!r}")
    if sectors <= 0:
        raise LayoutError(f"invalid extent line (size 0): {line[:120]}")
    if (sectors + int(offset_s or 0)) * SECTOR_SIZE > MAX_DISK_BYTES:
        raise LayoutError(f"invalid extent line (size or offset too large): {line[:120]}")
    if kind == "ZERO":
        if name is not None:
            raise LayoutError(f"invalid extent line (ZERO names a file): {line[:120]}")
        return ExtentLine(access, sectors, kind, None, 0)
    if name is None or not name:
        raise LayoutError(f"invalid extent line (no file name): {line[:120]}")
    if kind == "FLAT" and offset_s is None:
        raise LayoutError(f"invalid extent line (FLAT without offset): {line[:120]}")
    if kind != "FLAT" and offset_s is not None:
        raise LayoutError(f"invalid extent line (offset on a {kind} extent): {line[:120]}")
    return ExtentLine(access, sectors, "FLAT" if kind == "VMFS" else kind, name, int(offset_s or 0))


def probe_descriptor(head: bytes) -> bool:
    """qemu's text probe: comment/blank lines, then ``version=1|2|3`` on a line of its own."""
    pos = 0
    n = len(head)
    while pos < n:
        c = head[pos : pos + 1]
        if c == b"#":
            nl = head.find(b"\n", pos)
            if nl < 0:
                return False
            pos = nl + 1
            continue
        if c == b" ":
            while pos < n and head[pos : pos + 1] == b" ":
                pos += 1
            if head[pos : pos + 1] == b"\r":
                pos += 1
            if head[pos : pos + 1] != b"\n":
                return False
            pos += 1
            continue
        rest = head[pos : pos + 11]
        return any(
            rest.startswith(f"version={v}{eol}".encode())
            for v in (1, 2, 3)
            for eol in ("\n", "\r\n")
        )
    return False


def probe(head: bytes, tail: bytes, file_size: int) -> bool:
    """True when the file looks like VMDK as qemu-img probes it (sparse magic or descriptor)."""
    del tail, file_size
    if head[:4] in (VMDK4_MAGIC, VMDK3_MAGIC):
        return True
    return probe_descriptor(head)
