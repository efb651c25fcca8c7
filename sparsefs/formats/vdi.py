"""VDI (VirtualBox): dynamic and static images, read-only.

Layout (VirtualBox's VDI header version 1.1, little-endian; qemu's
block/vdi.c for what qemu accepts): a text line, then at 0x40 the signature
0xBEDA107F and the header: image type (1 dynamic, 2 static), the offsets of
the block map and of the data area, the disk size and the block size.  The
block map holds one 32-bit entry per block: the index of the block in the
data area, 0xFFFFFFFF for a block never written (reads as zeros, or from a
parent) and 0xFFFFFFFE for a block discarded (reads as zeros).

Refused, as qemu refuses them: other header versions, block sizes other than
1 MiB, sector sizes other than 512, undo and differencing images (a link or
parent UUID), extra per-block data.
"""

from __future__ import annotations

import struct
import sys
import uuid as uuid_mod
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sparsefs.layered import (
    BELOW,
    DATA,
    ERROR,
    ZERO,
    ImageFileLayer,
    LayeredImage,
    LayerOptions,
    check_regular_file,
)

SECTOR_SIZE = 512
VDI_SIGNATURE = 0xBEDA107F
VDI_VERSION_1_1 = 0x00010001
VDI_TYPE_DYNAMIC = 1
VDI_TYPE_STATIC = 2
TYPE_NAMES = {VDI_TYPE_DYNAMIC: "dynamic", VDI_TYPE_STATIC: "static", 3: "undo", 4: "differencing"}
VDI_BLOCK_SIZE = 1024 * 1024  # the only block size qemu and VirtualBox make
VDI_UNALLOCATED = 0xFFFFFFFF
VDI_DISCARDED = 0xFFFFFFFE
# At most this many blocks (a block map under 1 GiB); the map must also lie in the file.
VDI_BLOCKS_IN_IMAGE_MAX = 0x3FFFFFFF // 4  # a block map under 1 GiB

HEADER_OFFSET = 0x40
# signature, version, header_size, image_type, image_flags, description (256),
# offset_bmap, offset_data, cylinders, heads, sectors, sector_size, unused,
# disk_size, block_size, block_extra, blocks_in_image, blocks_allocated,
# uuid_image, uuid_last_snap, uuid_link, uuid_parent.
_HEADER = struct.Struct("<IIIII256sIIIIIIIQIIII16s16s16s16s")
HEADER_END = HEADER_OFFSET + _HEADER.size


@dataclass(frozen=True, slots=True)
class Header:
    """The decoded VDI header (the fields sparsefs reads)."""

    signature: int
    version: int
    image_type: int
    offset_bmap: int
    offset_data: int
    sector_size: int
    disk_size: int
    block_size: int
    block_extra: int
    blocks_in_image: int
    uuid_image: bytes
    uuid_link: bytes
    uuid_parent: bytes

    @classmethod
    def from_bytes(cls, buf: bytes) -> Header:
        """Decode the header from the first bytes of the file."""
        h = _HEADER.unpack_from(buf, HEADER_OFFSET)
        return cls(
            h[0], h[1], h[3], h[6], h[7], h[11], h[13], h[14], h[15], h[16], h[18], h[20], h[21]
        )


class VdiLayer(ImageFileLayer):
    """One VDI file as a layer (see :mod:`sparsefs.layered`)."""

    format_name = "vdi"

    def _open(self) -> None:
        file_size = self.raw.file_size
        if file_size < HEADER_END:
            raise self._err("too small for a VDI header")
        h = Header.from_bytes(self.raw.pread(0, HEADER_END))
        self.header = h
        if h.signature != VDI_SIGNATURE:
            raise self._err(f"not a VDI image (signature {h.signature:#010x})")
        if h.version != VDI_VERSION_1_1:
            raise self._refuse(
                f"VDI header version {h.version >> 16}.{h.version & 0xFFFF} "
                "is not supported (only 1.1)"
            )
        if h.image_type not in (VDI_TYPE_DYNAMIC, VDI_TYPE_STATIC):
            name = TYPE_NAMES.get(h.image_type, str(h.image_type))
            raise self._refuse(f"VDI image type {name} is not supported (dynamic and static are)")
        if h.uuid_link.strip(b"\0") or h.uuid_parent.strip(b"\0"):
            raise self._refuse(
                "differencing VDI images (link or parent UUID set) are not supported"
            )
        if h.sector_size != SECTOR_SIZE:
            raise self._refuse(f"sector size {h.sector_size} is not supported (only 512)")
        if h.block_size != VDI_BLOCK_SIZE:
            raise self._refuse(f"block size {h.block_size} is not supported (only 1 MiB)")
        if h.block_extra != 0:
            raise self._refuse(f"extra data per block ({h.block_extra} bytes) is not supported")
        if h.offset_bmap % SECTOR_SIZE or h.offset_data % SECTOR_SIZE:
            raise self._err(
                f"block map offset {h.offset_bmap:#x} or data offset "
                f"{h.offset_data:#x} is not sector-aligned"
            )
        if h.blocks_in_image > VDI_BLOCKS_IN_IMAGE_MAX:
            raise self._err(f"{h.blocks_in_image} blocks are more than a VDI can have")
        if h.disk_size > h.blocks_in_image * h.block_size:
            raise self._err(
                f"disk size {h.disk_size} is larger than its {h.blocks_in_image} "
                f"blocks of {h.block_size} bytes"
            )
        self.size = h.disk_size // SECTOR_SIZE * SECTOR_SIZE
        self.block_size = h.block_size
        self.block_bits = h.block_size.bit_length() - 1
        nb_blocks = -(-self.size // self.block_size)
        bmap_end = h.offset_bmap + 4 * h.blocks_in_image
        if h.offset_bmap < HEADER_END or bmap_end > file_size:
            raise self._err(
                f"block map at {h.offset_bmap:#x} ({h.blocks_in_image} entries) is outside the file"
            )
        if h.offset_data < bmap_end:
            raise self._err(f"data area at {h.offset_data:#x} overlaps the block map")
        # Only the entries that map guest bytes are kept: 4 bytes a block.
        bmap = array("I")
        bmap.frombytes(self.raw.pread(h.offset_bmap, 4 * nb_blocks))
        if sys.byteorder == "big":  # little-endian on disk
            bmap.byteswap()
        self.bmap = bmap

    def runs(self, guest_start: int, guest_end: int) -> Iterator[tuple[int, int, int, Any]]:
        """The layer's runs over ``[guest_start, guest_end)`` (see :class:`Layer`)."""
        guest_end = min(guest_end, self.size)
        bits = self.block_bits
        bs = self.block_size
        bmap = self.bmap
        offset_data = self.header.offset_data
        file_size = self.raw.file_size
        pos = guest_start
        while pos < guest_end:
            index = pos >> bits
            entry = bmap[index]
            if entry >= VDI_DISCARDED:
                # A stretch of blocks of the same unallocated kind at once.
                nxt = index + 1
                last = (guest_end - 1) >> bits
                while nxt <= last and bmap[nxt] == entry:
                    nxt += 1
                stop = min(nxt << bits, guest_end)
                yield (pos, stop, BELOW if entry == VDI_UNALLOCATED else ZERO, None)
                pos = stop
                continue
            base = index << bits
            stop = min(base + bs, guest_end)
            host = offset_data + entry * bs
            if host + min(bs, self.size - base) > file_size:
                yield (
                    pos,
                    stop,
                    ERROR,
                    f"{self.path}: block {index} at host offset {host:#x} is past the end of "
                    "the file (damaged block map or truncated image)",
                )
            else:
                yield (pos, stop, DATA, (self.raw, host + (pos - base)))
            pos = stop

    def read_other(self, start: int, end: int, host: Any) -> bytes:
        """VDI has no OTHER runs."""
        raise AssertionError("vdi layers yield no OTHER runs")

    def close(self) -> None:
        """Close the file; idempotent."""
        self.raw.close()

    def describe(self) -> dict[str, Any]:
        """Facts for ``sparsefs info``."""
        return {
            "subformat": TYPE_NAMES[self.header.image_type],
            "cluster-size": self.block_size,
            "uuid": str(uuid_mod.UUID(bytes_le=self.header.uuid_image)),
        }


def open_image(path: str, options: LayerOptions, chain: tuple[str, ...]) -> LayeredImage:
    """Open a VDI image read-only.

    Raises:
        ImageFormatError: an invalid header or block map.
        UnsupportedFeatureError: a feature listed in the module docstring.
    """
    check_regular_file(path, "image")
    return LayeredImage(VdiLayer(path, options), None)
