"""VHDX test images: made by qemu-img/qemu-io at test time, then edited by the [MS-VHDX] spec.

qemu-img 7.2 makes dynamic and fixed VHDX files with 512-byte logical
sectors; its payload blocks are ZERO (``block_state_zero=on``, the default) or
NOT_PRESENT (``off``) until written, then FULLY_PRESENT.  What qemu cannot
make is made here by editing a qemu-made file the way the spec lays it out:
4096-byte logical sectors (the metadata item), the other BAT states, sector
bitmaps, dirty logs, and differencing disks (qemu cannot open those at all,
so their expected bytes are composed from qemu's raw copies of the parent and
of the child read alone).  Nothing here records an expected answer.
"""

from __future__ import annotations

import random
import shutil
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsefs.formats.vhdx import layout as L
from support import KiB, MiB, qemu_io, qemu_map, qemu_raw, run

SECTOR = 512


@dataclass
class VhdxBuilt:
    """A VHDX image a builder made.

    Attributes:
        image: the file to open.
        fmt: the format name.
        writes: the guest ranges qemu-io wrote (data), in order.
        preallocated: every block is FULLY_PRESENT from creation (data, never holes).
        oracle: a file with the same guest bytes that qemu can read, when qemu
            refuses ``image`` itself.
        expected: the guest bytes as a raw file, when no single file qemu reads
            has them (differencing disks: composed from qemu's copies).
    """

    image: Path
    fmt: str = "vhdx"
    writes: list[tuple[int, int]] = field(default_factory=list)
    preallocated: bool = False
    oracle: Path | None = None
    expected: Path | None = None

    @property
    def qemu_image(self) -> Path:
        """The file qemu-img converts for the expected bytes (itself unless qemu refuses it)."""
        return self.oracle or self.image


def create(path: Path, size: int, *options: str) -> Path:
    """``qemu-img create -f vhdx`` with options."""
    cmd = ["qemu-img", "create", "-q", "-f", "vhdx"]
    for opt in options:
        cmd += ["-o", opt]
    run([*cmd, str(path), str(size)])
    return path


def random_writes(
    path: Path,
    rng: random.Random,
    size: int,
    count: int,
    *,
    max_len: int = 192 * KiB,
    within: tuple[int, int] | None = None,
) -> list[tuple[int, int]]:
    """Pattern writes at random sector-aligned (often not block-aligned) offsets."""
    lo, hi = within or (0, size)
    commands = []
    writes = []
    for _ in range(count):
        length = rng.randrange(1, max_len // SECTOR + 1) * SECTOR
        offset = rng.randrange(lo // SECTOR, max(lo + SECTOR, hi - length) // SECTOR) * SECTOR
        length = min(length, size - offset)
        commands.append(f"write -q -P {rng.randrange(1, 256)} {offset} {length}")
        writes.append((offset, length))
    qemu_io(path, *commands, fmt="vhdx")
    return writes


# -- reading and editing a VHDX file by the spec -----------------------------------------


def active_header_offset(buf: bytes | bytearray) -> int:
    """File offset of the header with the higher sequence number."""
    seqs = [
        struct.unpack_from("<Q", buf, off + 8)[0] for off in (L.HEADER1_OFFSET, L.HEADER2_OFFSET)
    ]
    return L.HEADER1_OFFSET if seqs[0] >= seqs[1] else L.HEADER2_OFFSET


def reseal(buf: bytearray, offset: int, length: int) -> None:
    """Recompute the CRC-32C at ``offset + 4`` over ``length`` bytes."""
    buf[offset + 4 : offset + 8] = bytes(4)
    struct.pack_into("<I", buf, offset + 4, L.crc32c(bytes(buf[offset : offset + length])))


def regions(buf: bytes | bytearray) -> dict[bytes, tuple[int, int]]:
    """Region GUID -> (file offset, length) from the region table."""
    count = struct.unpack_from("<I", buf, L.REGION_TABLE_OFFSET + 8)[0]
    out = {}
    for i in range(count):
        at = L.REGION_TABLE_OFFSET + 16 + 32 * i
        guid, off, length, _ = struct.unpack_from("<16sQII", buf, at)
        out[guid] = (off, length)
    return out


def bat_offset(buf: bytes | bytearray) -> int:
    """File offset of the BAT."""
    return regions(buf)[L.BAT_GUID][0]


def metadata_items(buf: bytes | bytearray) -> dict[bytes, tuple[int, int, int, int]]:
    """Item GUID -> (table entry file offset, item file offset, length, flags)."""
    base = regions(buf)[L.METADATA_GUID][0]
    count = struct.unpack_from("<H", buf, base + 10)[0]
    out = {}
    for i in range(count):
        entry = base + 32 + 32 * i
        guid, off, length, flags = struct.unpack_from("<16sIII", buf, entry)
        out[guid] = (entry, base + off, length, flags)
    return out


def add_metadata_item(buf: bytearray, guid: bytes, data: bytes, flags: int) -> None:
    """Append a metadata table entry and its data after the last item."""
    base = regions(buf)[L.METADATA_GUID][0]
    items = metadata_items(buf)
    end = max(off + length for _, off, length, _ in items.values()) - base
    end = -(-end // 4096) * 4096
    count = struct.unpack_from("<H", buf, base + 10)[0]
    struct.pack_into("<16sIII4x", buf, base + 32 + 32 * count, guid, end, len(data), flags)
    struct.pack_into("<H", buf, base + 10, count + 1)
    buf[base + end : base + end + len(data)] = data


def relabel_sectors(path: Path, logical_sector_size: int) -> None:
    """Set the logical and physical sector size metadata items (qemu makes only 512)."""

    def change(buf: bytearray) -> None:
        for guid in (L.LOGICAL_SECTOR_SIZE_GUID, L.PHYSICAL_SECTOR_SIZE_GUID):
            _, off, _, _ = metadata_items(buf)[guid]
            struct.pack_into("<I", buf, off, logical_sector_size)

    edit(path, change)


def chunk_ratio(block_size: int, logical_sector_size: int = SECTOR) -> int:
    """Payload blocks per sector bitmap block."""
    return (1 << 23) * logical_sector_size // block_size


def set_bat(buf: bytearray, index: int, state: int, file_offset: int = 0) -> None:
    """Write BAT entry ``index`` (an index into the interleaved table)."""
    struct.pack_into("<Q", buf, bat_offset(buf) + 8 * index, file_offset | state)


def get_bat(buf: bytes | bytearray, index: int) -> tuple[int, int]:
    """(state, file offset) of BAT entry ``index``."""
    entry = struct.unpack_from("<Q", buf, bat_offset(buf) + 8 * index)[0]
    return entry & 7, entry & ~((1 << 20) - 1)


def data_write_guid(path: Path) -> str:
    """The active header's DataWriteGuid as ``{...}`` text."""
    buf = path.read_bytes()[: L.REGION_TABLE_OFFSET]
    off = active_header_offset(buf)
    return "{" + str(uuid.UUID(bytes_le=bytes(buf[off + 32 : off + 48]))).upper() + "}"


def build_parent_locator(entries: dict[str, str]) -> bytes:
    """A VHDX parent locator item ([MS-VHDX] 2.6.2.6) with these key/value pairs."""
    head = struct.pack("<16sHH", L.VHDX_PARENT_LOCATOR_TYPE, 0, len(entries))
    table = bytearray()
    strings = bytearray()
    base = len(head) + 12 * len(entries)
    for key, value in entries.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        table += struct.pack(
            "<IIHH", base + len(strings), base + len(strings) + len(k), len(k), len(v)
        )
        strings += k + v
    return head + bytes(table) + bytes(strings)


def make_differencing(child: Path, locator: dict[str, str]) -> None:
    """Turn a qemu-made dynamic VHDX into a differencing disk with this parent locator."""
    buf = bytearray(child.read_bytes())
    _, params_off, _, _ = metadata_items(buf)[L.FILE_PARAMETERS_GUID]
    bits = struct.unpack_from("<I", buf, params_off + 4)[0]
    struct.pack_into("<I", buf, params_off + 4, bits | L.PARAMS_HAS_PARENT)
    add_metadata_item(
        buf,
        L.PARENT_LOCATOR_GUID,
        build_parent_locator(locator),
        L.META_IS_VIRTUAL_DISK | L.META_IS_REQUIRED,
    )
    child.write_bytes(bytes(buf))


def append_sector_bitmap(
    path: Path,
    chunk: int,
    block_size: int,
    present: list[tuple[int, int]],
    logical_sector_size: int = SECTOR,
) -> None:
    """Give ``chunk`` a sector bitmap block at the end of the file, with ``present`` sectors set.

    ``present`` holds (first, end) sector ranges of the chunk.
    """
    buf = bytearray(path.read_bytes())
    offset = -(-len(buf) // MiB) * MiB
    buf += bytes(offset - len(buf))
    bitmap = bytearray(MiB)
    for first, end in present:
        for sector in range(first, end):
            bitmap[sector // 8] |= 1 << (sector % 8)
    buf += bitmap
    ratio = chunk_ratio(block_size, logical_sector_size)
    set_bat(buf, chunk * (ratio + 1) + ratio, L.SB_BLOCK_PRESENT, offset)
    path.write_bytes(bytes(buf))


def edit(path: Path, change: Callable[[bytearray], None]) -> Path:
    """Apply ``change`` to the file's bytes."""
    buf = bytearray(path.read_bytes())
    change(buf)
    path.write_bytes(bytes(buf))
    return path


# -- differencing disks (qemu-img cannot make or open them) ---------------------------------


def family(
    d: Path, *, locator: dict[str, str] | None = None, sector: int = 512
) -> tuple[Path, Path, bytes, bytes, list[tuple[int, int]]]:
    """parent.vhdx (qemu-written) and child.vhdx (qemu-written, then made differencing).

    Returns the paths, qemu's raw copies of the parent and of the child read
    alone (before it became differencing, and before both were relabelled to
    ``sector``-byte logical sectors, which qemu refuses), and the child's writes.
    """
    size = 10 * MiB + 4 * KiB
    parent = create(d / "parent.vhdx", size, "block_size=1M")
    qemu_io(parent, f"write -q -P 17 0 {size}", fmt="vhdx")
    random_writes(parent, random.Random(11), size, 8)
    child = create(d / "child.vhdx", size, "block_size=1M", "block_state_zero=off")
    writes = random_writes(child, random.Random(12), size, 4, max_len=600 * KiB)
    parent_raw = qemu_raw(parent, d / "parent.raw", fmt="vhdx").read_bytes()
    child_raw = qemu_raw(child, d / "child.raw", fmt="vhdx").read_bytes()
    if locator is None:
        locator = {"relative_path": ".\\parent.vhdx"}
    locator = {"parent_linkage": data_write_guid(parent), **locator}
    make_differencing(child, locator)
    if sector != 512:
        relabel_sectors(parent, sector)
        relabel_sectors(child, sector)
    return parent, child, parent_raw, child_raw, writes


def compose(
    parent_raw: bytes,
    child_raw: bytes,
    blocks: set[int],
    zero_blocks: frozenset[int] | set[int] = frozenset(),
) -> bytes:
    """Parent bytes, with whole 1 MiB ``blocks`` from the child and ``zero_blocks`` zeroed."""
    out = bytearray(parent_raw)
    for blk in blocks:
        out[blk * MiB : (blk + 1) * MiB] = child_raw[blk * MiB : (blk + 1) * MiB]
    for blk in zero_blocks:
        end = min((blk + 1) * MiB, len(out))
        out[blk * MiB : end] = bytes(end - blk * MiB)
    return bytes(out)


# -- builders: each makes one kind in an empty directory ------------------------------------


def build_dynamic(d: Path) -> VhdxBuilt:
    """Dynamic, default 8 MiB blocks (ZERO until written), size not block-aligned."""
    size = 19 * MiB + 3 * SECTOR
    img = create(d / "dynamic.vhdx", size)
    writes = random_writes(img, random.Random(1), size, 14)
    qemu_io(
        img, f"write -q -z {3 * MiB} {64 * KiB}", f"write -q -P 7 {size - 4 * KiB} 4096", fmt="vhdx"
    )
    return VhdxBuilt(img, writes=[*writes, (3 * MiB, 64 * KiB), (size - 4 * KiB, 4096)])


def build_not_present(d: Path) -> VhdxBuilt:
    """Dynamic with 1 MiB blocks and ``block_state_zero=off``: NOT_PRESENT blocks."""
    size = 12 * MiB
    img = create(d / "notpresent.vhdx", size, "block_size=1M", "block_state_zero=off")
    return VhdxBuilt(img, writes=random_writes(img, random.Random(2), size, 6))


def build_block_32m(d: Path) -> VhdxBuilt:
    """Dynamic with 32 MiB blocks, one short final block."""
    size = 70 * MiB
    img = create(d / "block32m.vhdx", size, "block_size=32M")
    return VhdxBuilt(img, writes=random_writes(img, random.Random(3), size, 6))


def build_block_256m(d: Path) -> VhdxBuilt:
    """The largest block size, 256 MiB: one full block written in places, one short block.

    The host file stays sparse (qemu extends it by truncation), but the test
    reads the written block whole: about 260 MiB of guest data.
    """
    size = 256 * MiB + 4 * MiB
    img = create(d / "block256m.vhdx", size, "block_size=256M")
    rng = random.Random(8)
    writes = random_writes(img, rng, size, 3, within=(0, 256 * MiB))
    writes += random_writes(img, rng, size, 2, within=(256 * MiB, size))
    return VhdxBuilt(img, writes=writes)


def build_fixed(d: Path) -> VhdxBuilt:
    """Fixed with ``block_state_zero=off``: every block FULLY_PRESENT from creation."""
    size = 5 * MiB
    img = create(d / "fixed.vhdx", size, "subformat=fixed", "block_size=1M", "block_state_zero=off")
    return VhdxBuilt(img, writes=random_writes(img, random.Random(4), size, 5), preallocated=True)


def build_fixed_zero(d: Path) -> VhdxBuilt:
    """Fixed as qemu makes it by default: preallocated file, blocks in the ZERO state.

    Measured with qemu-img 7.2: the BAT entries are ZERO with offset 0, and a
    write allocates a new block at the end of the file, as in a dynamic image.
    """
    size = 5 * MiB
    img = create(d / "fixedzero.vhdx", size, "subformat=fixed", "block_size=1M")
    return VhdxBuilt(img, writes=random_writes(img, random.Random(7), size, 3))


def build_sector_4k(d: Path) -> VhdxBuilt:
    """A qemu-made image relabelled with 4096-byte logical sectors.

    qemu-img 7.2 refuses to open such a file ("Operation not supported"), so
    the oracle is the same file before the relabel: the chunk ratio changes
    with the sector size, but with fewer blocks than either ratio the BAT and
    the payload are the same.
    """
    size = 9 * MiB
    img = create(d / "sector4k.vhdx", size, "block_size=1M")
    writes = random_writes(img, random.Random(5), size, 6, max_len=64 * KiB)

    oracle = d / "sector4k-as-512.vhdx"
    shutil.copy(img, oracle)
    relabel_sectors(img, 4096)
    return VhdxBuilt(img, writes=writes, oracle=oracle)


def build_interleaved(d: Path) -> VhdxBuilt:
    """A disk past one chunk (4 GiB at 512-byte sectors): a sector bitmap entry sits in the BAT.

    Writes land on both sides of the chunk boundary, so a reader that forgets
    the interleaved entry reads the wrong block.  Unwritten blocks are
    NOT_PRESENT (entry 0), like the sector bitmap entry between the chunks, so
    a reader that skips runs of equal entries must stop at the chunk's end.
    """
    size = 4 * 1024 * MiB + 40 * MiB
    img = create(d / "interleaved.vhdx", size, "block_size=16M", "block_state_zero=off")
    rng = random.Random(6)
    chunk = 4 * 1024 * MiB
    # the last block of chunk 0 stays unwritten; the first of chunk 1 is written
    writes = random_writes(img, rng, size, 4, within=(chunk - 48 * MiB, chunk - 17 * MiB))
    writes += random_writes(img, rng, size, 4, within=(chunk, size))
    qemu_io(img, f"write -q -P 0x66 {chunk} 4096", fmt="vhdx")
    writes.append((chunk, 4096))
    writes += random_writes(img, rng, size, 2, within=(0, 32 * MiB))
    return VhdxBuilt(img, writes=writes)


BUILDERS: dict[str, Callable[[Path], VhdxBuilt]] = {
    "dynamic": build_dynamic,
    "not_present": build_not_present,
    "block_32m": build_block_32m,
    "block_256m": build_block_256m,
    "fixed": build_fixed,
    "fixed_zero": build_fixed_zero,
    "sector_4k": build_sector_4k,
    "interleaved": build_interleaved,
}


def build_differencing(d: Path) -> VhdxBuilt:
    """A spec-built differencing disk over a qemu-made parent, one block ZERO.

    Its expected bytes are composed from qemu's raw copies of the parent and
    of the child read alone; written to ``expected.raw`` beside it.
    """
    _parent, child, parent_raw, child_raw, writes = family(d)
    blocks = {b for off, n in writes for b in range(off // MiB, (off + n - 1) // MiB + 1)}
    hidden = next(b for b in range(10) if b not in blocks)
    edit(child, lambda buf: set_bat(buf, hidden, L.PAYLOAD_BLOCK_ZERO))
    expected = d / "expected.raw"
    expected.write_bytes(compose(parent_raw, child_raw, blocks, {hidden}))
    return VhdxBuilt(child, writes=writes, expected=expected)


# Kinds for the shared conformance run (tests/conformance.py): the multi-GiB and
# 256 MiB-block kinds stay in test_vhdx.py, which reads only their data.
CONFORMANCE_KINDS = (
    "dynamic",
    "not_present",
    "block_32m",
    "fixed",
    "fixed_zero",
    "sector_4k",
    "differencing",
)


def conformance_builders() -> dict[str, Callable[[Path], Any]]:
    """Builders of ``format_builders.FmtImage`` for the VHDX kinds, by conformance name.

    qemu's vhdx driver has no block-status call, so ``qemu-img map`` calls
    every byte data: its map carries no information about holes and would
    demand that sparsefs report none.  These kinds pass an empty map instead
    (no map constraint); test_vhdx.py checks holes against the writes.
    """
    from format_builders import FmtImage

    def wrap(kind: str) -> Callable[[Path], Any]:
        def build(d: Path) -> Any:
            b = ALL_BUILDERS[kind](d)
            expected = b.expected
            if expected is None:
                expected = qemu_raw(b.qemu_image, d / "qemu.raw", fmt="vhdx")
                # the claim above, measured each time: qemu maps the whole disk as data
                assert [e["data"] for e in qemu_map(b.qemu_image, fmt="vhdx")] == [True]
            return FmtImage(b.image, "vhdx", expected, [])

        return build

    return {f"vhdx-{kind.replace('_', '-')}": wrap(kind) for kind in CONFORMANCE_KINDS}


ALL_BUILDERS: dict[str, Callable[[Path], VhdxBuilt]] = {
    **BUILDERS,
    "differencing": build_differencing,
}
