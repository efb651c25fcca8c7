"""A VHDX file as one layer: its BAT as runs, its parent below it.

:class:`VhdxLayer` validates the header section, region table and metadata
once, at open, and afterwards answers :meth:`VhdxLayer.runs` from the BAT
(read in pages, so a 64 TiB disk's BAT is never held whole).  A BAT entry
that points somewhere impossible becomes an ERROR run: EIO for that block
only.  :func:`open_image` puts the layer over its parent (differencing disks)
in a :class:`~sparsefs.layered.LayeredImage` (sparsefs.formats.vhdx.chain).

How each payload block state reads (qemu's vhdx_co_readv for the states it
knows; the [MS-VHDX] 2.5.1.1 text for differencing disks, which qemu cannot
open):

===================  =========================  =================================
state                dynamic / fixed            differencing
===================  =========================  =================================
NOT_PRESENT (0)      zeros, not present         the parent
UNDEFINED (1)        zeros                      zeros
ZERO (2)             zeros                      zeros (hides the parent)
UNMAPPED (3, 5)      zeros                      zeros
FULLY_PRESENT (6)    data at FileOffsetMB       data at FileOffsetMB
PARTIALLY_PRESENT    error (EIO)                sector bitmap: 1 = here, 0 = parent
4 (reserved)         error (EIO)                error (EIO)
===================  =========================  =================================

Knows nothing of FUSE.
"""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Iterator
from typing import Any

from sparsefs import locking
from sparsefs.errors import (
    ImageFormatError,
    UnsupportedFeatureError,
)
from sparsefs.formats.vhdx import layout as L
from sparsefs.layered import (
    BELOW,
    DATA,
    ERROR,
    ZERO,
    LayerOptions,
)
from sparsefs.raw import RawFile

# BAT entries read and cached per page; pages kept (bounds memory on huge disks).
BAT_PAGE_ENTRIES = 8192  # 64 KiB of table
BAT_CACHE_PAGES = 64  # 4 MiB of table at most
_BITMAP_RUNS = re.compile(rb"\x00+|\xff+|[^\x00\xff]")
_U64 = struct.Struct("<Q")
# One compiled "(?:ENTRY)*" per BAT entry value seen (few: the unallocated states).
_REPEAT_PATTERNS: dict[bytes, re.Pattern[bytes]] = {}
_ZERO_STATES = (
    L.PAYLOAD_BLOCK_UNDEFINED,
    L.PAYLOAD_BLOCK_ZERO,
    L.PAYLOAD_BLOCK_UNMAPPED,
    L.PAYLOAD_BLOCK_UNMAPPED_V095,
)


class VhdxLayer:
    """One VHDX file, validated at open; its BAT as runs.

    Args:
        path: the file.
        options: open options (``force_share``: take no qemu image lock).

    Raises:
        ImageFormatError: not VHDX, or a structure is invalid (named).
        UnsupportedFeatureError: a log that needs replay, an unknown required
            region or metadata item, a parent locator of another type.
        MissingFileError: the file cannot be opened.
    """

    format_name = "vhdx"
    # qemu allocates a whole block at the end of the file and writes only what
    # the guest wrote; the rest of the block stays a hole in the file.
    splits_host_holes = True

    def __init__(self, path: str, options: LayerOptions) -> None:
        self.path = path
        self.raw = RawFile(path)
        self._bat_pages: dict[int, bytes] = {}
        self._bat_lock = threading.Lock()
        try:
            if not options.force_share:
                locking.lock_file(self.raw.fd, self.raw.path, locking.ROLE_IMAGE)
            self._open()
        except BaseException:
            self.raw.close()
            raise

    def _err(self, problem: str) -> ImageFormatError:
        return ImageFormatError(f"{self.path}: {problem}")

    def _read(self, offset: int, length: int, what: str) -> bytes:
        if offset + length > self.raw.file_size:
            raise self._err(f"{what} at {offset:#x} is past the end of the file")
        return self.raw.pread(offset, length)

    # -- open: header section, regions, metadata -----------------------------------------

    def _open(self) -> None:
        file_size = self.raw.file_size
        if file_size < L.REGION_TABLE_OFFSET + L.REGION_TABLE_SIZE:
            if self.raw.pread(0, 8) == L.FILE_SIGNATURE:
                raise self._err(f"file is {file_size} bytes, too short for a VHDX header section")
            raise self._err("not a VHDX image (no vhdxfile signature)")
        section = self.raw.pread(0, L.REGION_TABLE_OFFSET + L.REGION_TABLE_SIZE)
        if section[:8] != L.FILE_SIGNATURE:
            raise self._err("not a VHDX image (no vhdxfile signature)")
        try:
            header = L.active_header(
                section[L.HEADER1_OFFSET : L.HEADER1_OFFSET + L.HEADER_SIZE],
                section[L.HEADER2_OFFSET : L.HEADER2_OFFSET + L.HEADER_SIZE],
            )
            regions = L.parse_region_table(section[L.REGION_TABLE_OFFSET :])
        except L.LayoutError as exc:
            raise self._err(str(exc)) from None
        self.header = header
        if header.has_log:
            raise UnsupportedFeatureError(
                f"{self.path}: VHDX log {L.guid_text(header.log_guid)} may need replay; "
                "sparsefs never writes to an image (replay it with qemu-img check -r all "
                "or Hyper-V first)"
            )
        # Every structure must lie in the file and overlap no other (qemu's vhdx_region_check).
        self._regions: list[tuple[int, int, str]] = [(0, L.HEADER_SECTION_SIZE, "header section")]
        if header.log_length:
            self._add_region(header.log_offset, header.log_length, "log", in_file=False)
        bat: L.Region | None = None
        metadata: L.Region | None = None
        for region in regions:
            if region.guid == L.BAT_GUID:
                if bat is not None:
                    raise self._err("region table lists the BAT twice")
                bat = region
                self._add_region(region.file_offset, region.length, "BAT")
            elif region.guid == L.METADATA_GUID:
                if metadata is not None:
                    raise self._err("region table lists the metadata region twice")
                metadata = region
                self._add_region(region.file_offset, region.length, "metadata region")
            elif region.required:
                raise UnsupportedFeatureError(
                    f"{self.path}: unknown required VHDX region {L.guid_text(region.guid)}"
                )
            else:
                self._add_region(
                    region.file_offset, region.length, f"region {L.guid_text(region.guid)}"
                )
        if bat is None or metadata is None:
            missing = "BAT" if bat is None else "metadata region"
            raise self._err(f"region table lacks the {missing}")
        self._parse_metadata(metadata)
        self._setup_bat(bat)

    def _add_region(self, offset: int, length: int, what: str, *, in_file: bool = True) -> None:
        if offset % L.MiB or length % L.MiB or length == 0:
            raise self._err(f"{what} at {offset:#x}+{length:#x} is not aligned to 1 MiB")
        if in_file and offset + length > self.raw.file_size:
            raise self._err(f"{what} at {offset:#x}+{length:#x} is past the end of the file")
        for start, size, name in self._regions:
            if offset < start + size and start < offset + length:
                raise self._err(f"{what} at {offset:#x}+{length:#x} overlaps the {name}")
        self._regions.append((offset, length, what))

    def _parse_metadata(self, region: L.Region) -> None:
        table = self._read(region.file_offset, L.METADATA_TABLE_SIZE, "metadata table")
        try:
            items = L.parse_metadata_table(table, region.length)
        except L.LayoutError as exc:
            raise self._err(str(exc)) from None
        found: dict[bytes, L.MetadataItem] = {}
        for item in items:  # as qemu: by GUID alone, user or system
            if item.item_id in L.METADATA_ITEM_NAMES:
                found[item.item_id] = item
            elif item.is_required:
                raise UnsupportedFeatureError(
                    f"{self.path}: unknown required VHDX metadata item {L.guid_text(item.item_id)}"
                )
        for guid in L.REQUIRED_METADATA_ITEMS:
            if guid not in found:
                raise self._err(f"metadata lacks the {L.METADATA_ITEM_NAMES[guid]} item")

        def item_bytes(guid: bytes) -> bytes:
            item = found[guid]
            return self._read(
                region.file_offset + item.offset,
                item.length,
                f"metadata {L.METADATA_ITEM_NAMES[guid]}",
            )

        try:
            params = L.FileParameters.from_bytes(item_bytes(L.FILE_PARAMETERS_GUID))
            size = L.parse_u64(item_bytes(L.VIRTUAL_DISK_SIZE_GUID), "virtual disk size")
            lss = L.parse_u32(item_bytes(L.LOGICAL_SECTOR_SIZE_GUID), "logical sector size")
            pss = L.parse_u32(item_bytes(L.PHYSICAL_SECTOR_SIZE_GUID), "physical sector size")
            locator = None
            if params.has_parent:
                if L.PARENT_LOCATOR_GUID not in found:
                    raise self._err("differencing disk has no parent locator")
                locator = L.parse_parent_locator(item_bytes(L.PARENT_LOCATOR_GUID))
        except L.LayoutError as exc:
            raise self._err(str(exc)) from None
        bs = params.block_size
        if bs < L.BLOCK_SIZE_MIN or bs > L.BLOCK_SIZE_MAX or bs & (bs - 1):
            raise UnsupportedFeatureError(
                f"{self.path}: VHDX block size {bs} is not a power of two from 1 MiB to 256 MiB"
            )
        if lss not in (512, 4096):
            raise UnsupportedFeatureError(
                f"{self.path}: VHDX logical sector size {lss} (only 512 and 4096 exist)"
            )
        if pss not in (512, 4096):
            raise UnsupportedFeatureError(
                f"{self.path}: VHDX physical sector size {pss} (only 512 and 4096 exist)"
            )
        if size % lss or size > L.MAX_VIRTUAL_DISK_SIZE:
            raise UnsupportedFeatureError(
                f"{self.path}: VHDX virtual size {size} is not a multiple of the {lss}-byte "
                "sector or exceeds 64 TiB"
            )
        if locator is not None and locator.locator_type != L.VHDX_PARENT_LOCATOR_TYPE:
            raise UnsupportedFeatureError(
                f"{self.path}: parent locator type {L.guid_text(locator.locator_type)} "
                "is not the VHDX one"
            )
        self.size = size
        self.block_size = bs
        self.logical_sector_size = lss
        self.physical_sector_size = pss
        self.has_parent = params.has_parent
        self.leave_blocks_allocated = params.leave_blocks_allocated
        self.locator = locator
        # Payload blocks per sector bitmap block ([MS-VHDX] 2.4), a power of two >= 2.
        self.chunk_ratio = L.MAX_SECTORS_PER_BLOCK * lss // bs

    def _setup_bat(self, region: L.Region) -> None:
        nb_blocks = -(-self.size // self.block_size)
        nb_chunks = -(-nb_blocks // self.chunk_ratio)
        if self.has_parent:
            nb_entries = nb_chunks * (self.chunk_ratio + 1)
        else:
            nb_entries = nb_blocks + max(0, nb_blocks - 1) // self.chunk_ratio
        if nb_entries * 8 > region.length:
            raise self._err(f"BAT of {region.length} bytes is too short for {nb_entries} entries")
        self.nb_blocks = nb_blocks
        self.nb_bat_entries = nb_entries
        self.bat_offset = region.file_offset

    # -- the BAT ------------------------------------------------------------------------------

    def _bat_page(self, page_no: int) -> bytes:
        """BAT page ``page_no`` (up to BAT_PAGE_ENTRIES little-endian entries), cached."""
        page = self._bat_pages.get(page_no)
        if page is None:
            first = page_no * BAT_PAGE_ENTRIES
            count = min(BAT_PAGE_ENTRIES, self.nb_bat_entries - first)
            page = self.raw.pread(self.bat_offset + first * 8, count * 8)
            with self._bat_lock:
                if len(self._bat_pages) >= BAT_CACHE_PAGES:
                    self._bat_pages.pop(next(iter(self._bat_pages)), None)
                self._bat_pages[page_no] = page
        return page

    def bat_entry(self, index: int) -> int:
        """The raw 64-bit BAT entry ``index`` (payload and sector bitmap entries interleaved).

        Raises:
            ImageReadError: the BAT cannot be read.
        """
        page_no, slot = divmod(index, BAT_PAGE_ENTRIES)
        return int(_U64.unpack_from(self._bat_page(page_no), slot * 8)[0])

    def _repeats(self, index: int, limit: int) -> int:
        """How many entries from ``index`` (at least 1, at most ``limit``) equal entry ``index``.

        Counts within one BAT page, at C speed (a regex of the repeated 8 bytes),
        so that walking a huge unallocated disk does not cost a step per block.
        """
        page_no, slot = divmod(index, BAT_PAGE_ENTRIES)
        page = self._bat_page(page_no)
        at = slot * 8
        pattern = _REPEAT_PATTERNS.get(page[at : at + 8])
        if pattern is None:
            if len(_REPEAT_PATTERNS) >= 64:
                _REPEAT_PATTERNS.clear()
            pattern = re.compile(b"(?:" + re.escape(page[at : at + 8]) + b")*", re.DOTALL)
            _REPEAT_PATTERNS[page[at : at + 8]] = pattern
        match = pattern.match(page, at, min(len(page), at + 8 * limit))
        assert match is not None  # "*" always matches
        return max(1, (match.end() - at) // 8)

    def block_state(self, block: int) -> tuple[int, int]:
        """(state, file offset) of payload block ``block``."""
        entry = self.bat_entry(block + block // self.chunk_ratio)
        return entry & L.BAT_STATE_MASK, entry & L.BAT_FILE_OFFSET_MASK

    def _same_blocks(self, block: int, end: int) -> int:
        """Blocks from ``block`` (at least 1) with the same BAT entry, up to guest ``end``.

        Stops at the end of the chunk: the next entry is a sector bitmap entry.
        """
        ratio = self.chunk_ratio
        last = min(-(-end // self.block_size), (block // ratio + 1) * ratio)
        return self._repeats(block + block // ratio, last - block)

    def _stored_problem(self, what: str, offset: int, length: int) -> str | None:
        """Why ``length`` bytes at file ``offset`` cannot hold a block, or None."""
        if offset < L.HEADER_SECTION_SIZE:
            return f"{what} points into the header section ({offset:#x})"
        if offset + length > self.raw.file_size:
            return f"{what} at {offset:#x} is past the end of the file (was it truncated?)"
        for start, size, name in self._regions[1:]:
            if offset < start + size and start < offset + length:
                return f"{what} at {offset:#x} overlaps the {name}"
        return None

    def runs(self, guest_start: int, guest_end: int) -> Iterator[tuple[int, int, int, Any]]:
        """Runs of ``[guest_start, guest_end)`` from the BAT, merged where they continue.

        DATA hosts are ``(raw, host_offset)``; ERROR hosts are one-line messages.
        """
        pending: list[Any] | None = None
        for run in self._block_runs(guest_start, min(guest_end, self.size)):
            if pending is not None and _continues(pending, run):
                pending[1] = run[1]
                continue
            if pending is not None:
                yield pending[0], pending[1], pending[2], pending[3]
            pending = list(run)
        if pending is not None:
            yield pending[0], pending[1], pending[2], pending[3]

    def _block_runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, Any]]:
        bs = self.block_size
        pos = start
        while pos < end:
            block = pos // bs
            block_start = block * bs
            block_end = min(block_start + bs, self.size)
            stop = min(block_end, end)
            state, offset = self.block_state(block)
            if state == L.PAYLOAD_BLOCK_FULLY_PRESENT:
                problem = self._stored_problem(
                    f"BAT entry of block {block}", offset, block_end - block_start
                )
                if problem:
                    yield pos, stop, ERROR, f"{self.path}: {problem}"
                else:
                    yield pos, stop, DATA, (self.raw, offset + pos - block_start)
            elif state == L.PAYLOAD_BLOCK_NOT_PRESENT or state in _ZERO_STATES:
                # the same entry for the blocks that follow: one run for all of them
                stop = min(end, (block + self._same_blocks(block, end)) * bs)
                yield pos, stop, (BELOW if state == L.PAYLOAD_BLOCK_NOT_PRESENT else ZERO), None
            elif state == L.PAYLOAD_BLOCK_PARTIALLY_PRESENT and self.has_parent:
                yield from self._partial_runs(block, offset, pos, stop)
            else:
                why = (
                    "is PARTIALLY_PRESENT in a disk without a parent"
                    if state == L.PAYLOAD_BLOCK_PARTIALLY_PRESENT
                    else f"has the reserved state {state}"
                )
                yield pos, stop, ERROR, f"{self.path}: BAT entry of block {block} {why}"
            pos = stop

    def _partial_runs(
        self, block: int, offset: int, start: int, stop: int
    ) -> Iterator[tuple[int, int, int, Any]]:
        """Runs of a PARTIALLY_PRESENT block from its chunk's sector bitmap."""
        bs = self.block_size
        block_start = block * bs
        problem = self._stored_problem(
            f"BAT entry of block {block}", offset, min(block_start + bs, self.size) - block_start
        )
        chunk = block // self.chunk_ratio
        sb_entry = self.bat_entry(chunk * (self.chunk_ratio + 1) + self.chunk_ratio)
        sb_state = sb_entry & L.BAT_STATE_MASK
        sb_offset = sb_entry & L.BAT_FILE_OFFSET_MASK
        if problem is None and sb_state != L.SB_BLOCK_PRESENT:
            problem = (
                f"sector bitmap of chunk {chunk} is not present (state {sb_state}) "
                f"for PARTIALLY_PRESENT block {block}"
            )
        if problem is None:
            problem = self._stored_problem(
                f"sector bitmap of chunk {chunk}", sb_offset, L.SECTOR_BITMAP_BLOCK_SIZE
            )
        if problem is not None:
            yield start, stop, ERROR, f"{self.path}: {problem}"
            return
        lss = self.logical_sector_size
        chunk_start = chunk * self.chunk_ratio * bs
        first = (start - chunk_start) // lss  # sectors of the chunk
        last = -(-(stop - chunk_start) // lss)
        bitmap = self.raw.pread(sb_offset + first // 8, -(-last // 8) - first // 8)
        base = chunk_start + (first - first % 8) * lss  # guest byte of bitmap bit 0
        for match in _BITMAP_RUNS.finditer(bitmap):
            byte0 = match.start()
            value = bitmap[byte0]
            if value in (0, 0xFF):
                runs = [(byte0 * 8, match.end() * 8, value == 0xFF)]
            else:
                runs = [(byte0 * 8 + b, byte0 * 8 + b + 1, bool(value >> b & 1)) for b in range(8)]
            for s_bit, e_bit, here in runs:
                s = max(start, base + s_bit * lss)
                e = min(stop, base + e_bit * lss)
                if s >= e:
                    continue
                if here:
                    yield s, e, DATA, (self.raw, offset + s - block_start)
                else:
                    yield s, e, BELOW, None

    # -- the rest of the Layer protocol --------------------------------------------------------

    def read_other(self, start: int, end: int, host: Any) -> bytes:
        """VHDX has no OTHER runs."""
        raise AssertionError("VHDX layers make no OTHER runs")

    def close(self) -> None:
        """Close the file; idempotent."""
        self.raw.close()
        self._bat_pages.clear()

    @property
    def subformat(self) -> str:
        """qemu's subformat name, or "differencing"."""
        if self.has_parent:
            return "differencing"
        return "fixed" if self.leave_blocks_allocated else "dynamic"

    def describe(self) -> dict[str, Any]:
        """Facts for ``sparsefs info``."""
        out: dict[str, Any] = {
            "subformat": self.subformat,
            "block_size": self.block_size,
            "logical_sector_size": self.logical_sector_size,
            "physical_sector_size": self.physical_sector_size,
            "data_write_guid": L.guid_text(self.header.data_write_guid),
        }
        if self.locator is not None:
            out["parent_locator"] = dict(self.locator.entries)
        return out


def _continues(a: list[Any], b: tuple[int, int, int, Any]) -> bool:
    if a[1] != b[0] or a[2] != b[2]:
        return False
    if a[2] == DATA:
        return bool(a[3][0] is b[3][0] and a[3][1] + (a[1] - a[0]) == b[3][1])
    return bool(a[2] != ERROR or a[3] == b[3])
