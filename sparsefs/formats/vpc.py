"""VHD (qemu's "vpc"): fixed, dynamic and differencing disks, read-only.

Layout (Microsoft's Virtual Hard Disk Image Format Specification 1.0;
qemu's block/vpc.c for what qemu accepts):

- a 512-byte *footer* (big-endian, cookie ``conectix``) at the end of the
  file; dynamic and differencing disks keep a copy at offset 0;
- fixed: the guest disk is the file before the footer;
- dynamic / differencing: a 1024-byte *dynamic header* (cookie
  ``cxsparse``) at the footer's ``data_offset`` names the Block Allocation
  Table (BAT): one 32-bit sector number per block, 0xFFFFFFFF when the block
  is not allocated.  An allocated block starts with its *sector bitmap*
  (one bit per 512-byte sector, most significant bit first, padded to 512
  bytes) followed by the block's data.  A set bit: the sector is stored
  here; a clear bit: it is read from the parent (differencing) or is zeros.

qemu probes only the footer copy at offset 0, opens a differencing disk as a
plain dynamic one (ignoring its parent) and reads an allocated block whole
without looking at its bitmap.  sparsefs follows the specification for
bitmaps and parents; for images qemu makes (which set every bit of a block
they allocate) both agree.

Guest size: the CHS geometry's, unless the creator application is one that
uses the footer's current size (``win ``, ``qem2``, ``d2v ``, ``CTXS``,
``tap\\0``) or the geometry is the maximum one, as qemu decides.
"""

from __future__ import annotations

import os
import re
import struct
import sys
import threading
import uuid as uuid_mod
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sparsefs.errors import ImageFormatError, MissingFileError, UnsupportedFeatureError
from sparsefs.extents import SparseSource
from sparsefs.formats import open_parent
from sparsefs.layered import (
    BELOW,
    DATA,
    ERROR,
    ZERO,
    ImageFileLayer,
    LayeredImage,
    check_regular_file,
    resolve_name,
)

SECTOR_SIZE = 512
FOOTER_SIZE = 512
DYN_HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"

VHD_FIXED = 2
VHD_DYNAMIC = 3
VHD_DIFFERENCING = 4
DISK_TYPE_NAMES = {VHD_FIXED: "fixed", VHD_DYNAMIC: "dynamic", VHD_DIFFERENCING: "differencing"}

BAT_UNUSED = 0xFFFFFFFF
# qemu's limits: at most 2040 GiB; the largest CHS geometry means "use current_size".
VHD_MAX_SECTORS = 0xFF000000
VHD_MAX_GEOMETRY = 65535 * 16 * 255
# Creator applications whose images are sized by current_size (qemu's table).
_CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
# Larger blocks are refused (bounds the bitmap read per block); the spec's default is 2 MiB.
MAX_BLOCK_SIZE = 256 * 1024 * 1024
# Decoded sector bitmaps kept per image.
BITMAP_CACHE_ENTRIES = 256

# Footer: cookie, features, version, data_offset, timestamp, creator_app,
# creator major, minor, creator_os, original_size, current_size, cylinders,
# heads, sectors_per_track, disk_type, checksum, unique_id, saved_state.
_FOOTER = struct.Struct(">8sIIQI4sHH4sQQHBBII16sB")
_FOOTER_CHECKSUM_OFFSET = 64
# Dynamic header: cookie, data_offset, table_offset, header_version,
# max_table_entries, block_size, checksum, parent_uuid, parent_timestamp,
# reserved, parent_unicode_name (UTF-16BE).
_DYN = struct.Struct(">8sQQIIII16sII512s")
_LOCATOR = struct.Struct(">4sIIIQ")  # platform code, data space, data length, reserved, offset
_LOCATORS_OFFSET = 576
_NB_LOCATORS = 8
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:/")


@dataclass(frozen=True, slots=True)
class Footer:
    """The decoded hard disk footer."""

    data_offset: int
    creator_app: bytes
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    unique_id: bytes

    @classmethod
    def from_bytes(cls, buf: bytes) -> Footer:
        """Decode a 512-byte footer (cookie and checksum checked by the caller)."""
        f = _FOOTER.unpack_from(buf)
        return cls(f[3], f[5], f[10], f[11], f[12], f[13], f[14], f[16])


def vhd_checksum(buf: bytes, checksum_offset: int) -> int:
    """One's complement of the byte sum of ``buf`` without its 4-byte checksum field."""
    total = sum(buf) - sum(buf[checksum_offset : checksum_offset + 4])
    return ~total & 0xFFFFFFFF


def _valid_footer(buf: bytes) -> bool:
    """True when ``buf`` is a footer: its cookie, and its checksum holds."""
    stored = struct.unpack_from(">I", buf, _FOOTER_CHECKSUM_OFFSET)[0]
    return buf[:8] == FOOTER_COOKIE and vhd_checksum(buf, _FOOTER_CHECKSUM_OFFSET) == stored


def guest_size(footer: Footer) -> int:
    """The guest size in bytes, as qemu computes it."""
    sectors = footer.cylinders * footer.heads * footer.sectors_per_track
    if footer.creator_app in _CURRENT_SIZE_CREATORS or sectors == VHD_MAX_GEOMETRY:
        sectors = footer.current_size // SECTOR_SIZE
    return sectors * SECTOR_SIZE


class VpcLayer(ImageFileLayer):
    """One VHD file as a layer (see :mod:`sparsefs.layered`)."""

    format_name = "vpc"

    def _open(self) -> None:
        file_size = self.raw.file_size
        if file_size < FOOTER_SIZE:
            raise self._err("too small for a VHD footer")
        head = self.raw.pread(0, FOOTER_SIZE)
        tail = self.raw.pread(file_size - FOOTER_SIZE, FOOTER_SIZE)
        # A valid footer of a fixed disk at the end wins: then sector 0 is the
        # guest's, even if the guest wrote a VHD footer there.
        if _valid_footer(tail) and Footer.from_bytes(tail).disk_type == VHD_FIXED:
            buf, where = tail, "footer"
        elif head[:8] == FOOTER_COOKIE:
            buf, where = head, "footer copy at offset 0"
        elif tail[:8] == FOOTER_COOKIE:
            buf, where = tail, "footer"
        else:
            raise self._err("not a VHD image (no 'conectix' footer)")
        if not _valid_footer(buf):
            raise self._err(f"{where} checksum is wrong (damaged footer)")
        footer = Footer.from_bytes(buf)
        self.footer = footer
        if footer.disk_type not in DISK_TYPE_NAMES:
            raise UnsupportedFeatureError(
                f"{self.path}: VHD disk type {footer.disk_type} is not fixed, dynamic or "
                "differencing"
            )
        if buf is tail and footer.disk_type != VHD_FIXED:
            raise self._err(
                f"{DISK_TYPE_NAMES[footer.disk_type]} VHD without the footer copy at offset 0"
            )
        if buf is head and footer.disk_type == VHD_FIXED:
            raise self._err("fixed VHD with a footer copy at offset 0 but none at the end")
        self.size = guest_size(footer)
        if self.size // SECTOR_SIZE > VHD_MAX_SECTORS:
            raise UnsupportedFeatureError(
                f"{self.path}: virtual size {self.size} is over the VHD limit of 2040 GiB"
            )
        self.disk_type = footer.disk_type
        self.parent_name: str | None = None
        self.parent_locators: list[str] = []
        self.parent_uuid = b""
        if self.disk_type == VHD_FIXED:
            if self.size > file_size - FOOTER_SIZE:
                raise self._err(
                    f"fixed disk of {self.size} bytes is longer than the file holds "
                    f"({file_size - FOOTER_SIZE}); was it truncated?"
                )
            self.block_size = 0
            return
        self._open_dynamic(file_size)

    def _open_dynamic(self, file_size: int) -> None:
        off = self.footer.data_offset
        if off % SECTOR_SIZE or off < FOOTER_SIZE or off + DYN_HEADER_SIZE > file_size:
            raise self._err(f"dynamic header offset {off:#x} is outside the file or misaligned")
        buf = self.raw.pread(off, DYN_HEADER_SIZE)
        d = _DYN.unpack_from(buf)
        if d[0] != DYN_COOKIE:
            raise self._err("dynamic header has no 'cxsparse' cookie")
        table_offset, max_entries, block_size = d[2], d[4], d[5]
        if block_size < SECTOR_SIZE or block_size & (block_size - 1):
            raise self._err(f"block size {block_size} is not a power of two >= 512")
        if block_size > MAX_BLOCK_SIZE:
            raise UnsupportedFeatureError(
                f"{self.path}: block size {block_size} is over {MAX_BLOCK_SIZE}"
            )
        self.block_size = block_size
        self.block_bits = block_size.bit_length() - 1
        self.sectors_per_block = block_size // SECTOR_SIZE
        self.bitmap_size = -(-self.sectors_per_block // 8 // SECTOR_SIZE) * SECTOR_SIZE
        if self.bitmap_size == 0:
            self.bitmap_size = SECTOR_SIZE
        nb_blocks = -(-self.size // block_size)
        if max_entries < nb_blocks:
            raise self._err(
                f"BAT of {max_entries} entries is too short for {nb_blocks} blocks of "
                f"{block_size} bytes"
            )
        if table_offset % SECTOR_SIZE or table_offset + 4 * nb_blocks > file_size:
            raise self._err(
                f"BAT at {table_offset:#x} ({nb_blocks} entries) is outside the file or misaligned"
            )
        # Only the entries that map guest bytes are kept: 4 bytes a block.
        bat = array("I")
        bat.frombytes(self.raw.pread(table_offset, 4 * nb_blocks))
        if sys.byteorder == "little":  # big-endian on disk
            bat.byteswap()
        self.bat = bat
        self.table_offset = table_offset
        self._bitmaps: OrderedDict[int, tuple[tuple[int, int, bool], ...]] = OrderedDict()
        self._lock = threading.Lock()
        if self.disk_type == VHD_DIFFERENCING:
            self.parent_uuid = d[7]
            name = d[10].decode("utf-16-be", errors="replace").split("\0", 1)[0]
            self.parent_name = name or None
            self.parent_locators = self._read_locators(buf, file_size)

    def _read_locators(self, header: bytes, file_size: int) -> list[str]:
        """Parent file names from the parent locator entries, most specific first."""
        found: dict[bytes, str] = {}
        for i in range(_NB_LOCATORS):
            code, _space, length, _res, offset = _LOCATOR.unpack_from(
                header, _LOCATORS_OFFSET + i * _LOCATOR.size
            )
            if code == b"\0\0\0\0" or length == 0:
                continue
            if length > 64 * 1024 or offset + length > file_size:
                raise self._err(f"parent locator {i} at {offset:#x} is outside the file")
            data = self.raw.pread(offset, length)
            if code in (b"W2ru", b"W2ku"):
                text = data.decode("utf-16-le", errors="replace")
            elif code in (b"Wi2r", b"Wi2k", b"MacX"):
                text = data.decode("utf-8", errors="replace")
            else:
                continue
            text = text.split("\0", 1)[0]
            if code == b"MacX" and text.startswith("file://"):
                text = text[len("file://") :]
            elif code != b"MacX":
                text = text.replace("\\", "/")
                if text.startswith("./"):
                    text = text[2:]
            if text:
                found.setdefault(code, text)
        return [found[c] for c in (b"W2ru", b"Wi2r", b"MacX", b"W2ku", b"Wi2k") if c in found]

    # -- the map -------------------------------------------------------------------------

    def _block_runs(self, index: int) -> tuple[tuple[int, int, bool], ...] | str:
        """Runs (first sector, end sector, stored) of allocated block ``index``, or an error."""
        entry = self.bat[index]
        host = entry * SECTOR_SIZE
        if host < FOOTER_SIZE or host + self.bitmap_size + self.block_size > self.raw.file_size:
            return (
                f"{self.path}: block {index} at host offset {host:#x} is outside the file "
                "(damaged BAT or truncated image)"
            )
        with self._lock:
            cached = self._bitmaps.get(index)
            if cached is not None:
                self._bitmaps.move_to_end(index)
                return cached
        nbytes = -(-self.sectors_per_block // 8)
        bitmap = self.raw.pread(host, nbytes)
        spb = self.sectors_per_block
        if bitmap == b"\xff" * nbytes:
            runs: tuple[tuple[int, int, bool], ...] = ((0, spb, True),)
        else:
            bits = bin(int.from_bytes(bitmap, "big") | (1 << (8 * nbytes)))[3:][:spb]
            runs = tuple(
                (m.start(), m.end(), m.group()[0] == "1") for m in re.finditer("1+|0+", bits)
            )
        with self._lock:
            self._bitmaps[index] = runs
            while len(self._bitmaps) > BITMAP_CACHE_ENTRIES:
                self._bitmaps.popitem(last=False)
        return runs

    def runs(self, guest_start: int, guest_end: int) -> Iterator[tuple[int, int, int, Any]]:
        """The layer's runs over ``[guest_start, guest_end)`` (see :class:`Layer`)."""
        guest_end = min(guest_end, self.size)
        if guest_start >= guest_end:
            return
        if self.disk_type == VHD_FIXED:
            yield from self._fixed_runs(guest_start, guest_end)
            return
        bits = self.block_bits
        pos = guest_start
        bat = self.bat
        while pos < guest_end:
            index = pos >> bits
            base = index << bits
            stop = min(base + self.block_size, guest_end)
            if bat[index] == BAT_UNUSED:
                # Jump over a stretch of unallocated blocks at once.
                nxt = index + 1
                last = (guest_end - 1) >> bits
                while nxt <= last and bat[nxt] == BAT_UNUSED:
                    nxt += 1
                stop = min(nxt << bits, guest_end)
                yield (pos, stop, BELOW, None)
                pos = stop
                continue
            runs = self._block_runs(index)
            if isinstance(runs, str):
                yield (pos, stop, ERROR, runs)
                pos = stop
                continue
            data_base = bat[index] * SECTOR_SIZE + self.bitmap_size
            for first, end, stored in runs:
                s = max(pos, base + first * SECTOR_SIZE)
                e = min(stop, base + end * SECTOR_SIZE)
                if s >= e:
                    continue
                if stored:
                    yield (s, e, DATA, (self.raw, data_base + (s - base)))
                else:
                    yield (s, e, BELOW, None)
            pos = stop

    def _fixed_runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, Any]]:
        """A fixed disk is the file itself: data where the host stores data, else zeros."""
        for ext in self.raw.iter_extents(start):
            if ext.guest_offset >= end:
                break
            e = min(ext.end, end)
            if ext.data:
                yield (ext.guest_offset, e, DATA, (self.raw, ext.guest_offset))
            else:
                yield (ext.guest_offset, e, ZERO, None)
            if e >= end:
                break

    def read_other(self, start: int, end: int, host: Any) -> bytes:
        """VHD has no OTHER runs."""
        raise AssertionError("vpc layers yield no OTHER runs")

    def close(self) -> None:
        """Close the file; idempotent."""
        self.raw.close()

    def describe(self) -> dict[str, Any]:
        """Facts for ``sparsefs info``."""
        info: dict[str, Any] = {
            "subformat": DISK_TYPE_NAMES[self.disk_type],
            "creator-app": self.footer.creator_app.decode("latin-1").rstrip("\0"),
            "uuid": str(uuid_mod.UUID(bytes=self.footer.unique_id)),
        }
        if self.disk_type != VHD_FIXED:
            info["cluster-size"] = self.block_size
        if self.disk_type == VHD_DIFFERENCING:
            info["parent-uuid"] = str(uuid_mod.UUID(bytes=self.parent_uuid))
            info["backing-filename"] = self.parent_name
            info["backing-format"] = "vpc"
        return info


def _open_differencing_parent(
    layer: VpcLayer, options: Any, chain: tuple[str, ...]
) -> SparseSource:
    """Open the parent a differencing disk names: the first locator that exists."""
    candidates = [*layer.parent_locators]
    if layer.parent_name:
        candidates.append(layer.parent_name)
    if not candidates:
        raise ImageFormatError(f"{layer.path}: differencing VHD names no parent")
    tried: list[str] = []
    for name in candidates:
        if _WINDOWS_DRIVE.match(name):
            name = name.rsplit("/", 1)[-1]  # a Windows drive path: look beside the image
        try:
            path = resolve_name(layer.path, name, what="parent", backing_dir=None)
        except UnsupportedFeatureError:
            continue
        tried.append(path)
        if os.path.exists(path):
            _, parent = open_parent(
                layer.path, layer.raw.fd, name, "vpc", options, chain, what="parent"
            )
            _check_parent_uuid(layer, parent)
            return parent
    raise MissingFileError(
        f"{layer.path}: parent VHD is missing (tried {', '.join(tried) or 'no usable name'})"
    )


def _check_parent_uuid(layer: VpcLayer, parent: SparseSource) -> None:
    """Refuse a parent whose unique id is not the one the child recorded."""
    parent_layer = getattr(parent, "layer", None)
    parent_id = getattr(getattr(parent_layer, "footer", None), "unique_id", None)
    if layer.parent_uuid.strip(b"\0") and parent_id is not None and parent_id != layer.parent_uuid:
        close = getattr(parent, "close", None)
        if close is not None:
            close()
        raise ImageFormatError(
            f"{layer.path}: parent {getattr(parent, 'path', '?')} is not the disk it was made "
            f"from (unique id {uuid_mod.UUID(bytes=parent_id)}, expected "
            f"{uuid_mod.UUID(bytes=layer.parent_uuid)})"
        )


def open_image(path: str, options: Any, chain: tuple[str, ...]) -> LayeredImage:
    """Open a VHD (and a differencing disk's parents) read-only.

    Raises:
        ImageFormatError: invalid footer, header or BAT.
        UnsupportedFeatureError: an unknown disk type, a size over 2040 GiB.
        MissingFileError: a differencing disk's parent is missing.
    """
    check_regular_file(path, "image")
    layer = VpcLayer(path, options)
    below: SparseSource | None = None
    try:
        if layer.disk_type == VHD_DIFFERENCING and options.backing:
            below = _open_differencing_parent(layer, options, chain)
    except BaseException:
        layer.close()
        raise
    return LayeredImage(layer, below)
