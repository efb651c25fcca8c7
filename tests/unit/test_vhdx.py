"""VHDX: qemu-made images read exactly as qemu reads them; broken ones cost one clean error.

The oracle is ``qemu-img convert -f vhdx -O raw``.  qemu's vhdx driver has no
block-status call, so ``qemu-img map`` calls every byte data and says nothing
about holes; the hole check here is therefore (a) every hole reads as zeros
in qemu's copy and (b) every range qemu-io wrote is data and every block it
never touched is a hole.  Differencing disks, which qemu cannot open, are
checked against qemu's raw copies of the parent and of the child alone.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import conformance
import vhdx_images as V
from sparsefs.errors import (
    ImageFormatError,
    ImageReadError,
    MissingFileError,
    SparsefsError,
    UnsupportedFeatureError,
)
from sparsefs.extents import Extent, SparseSource
from sparsefs.formats.vhdx import image as vhdx_image
from sparsefs.formats.vhdx import layout as L
from sparsefs.formats.vhdx import open_image
from sparsefs.options import OpenOptions
from support import (
    KiB,
    MiB,
    fiemap_written,
    one_line_error,
    qemu_img_create,
    qemu_io,
    qemu_raw,
    seek_walk,
    sparsefs,
)

OPTS = OpenOptions()


# -- comparing a source with qemu's sparse raw copy ---------------------------------------


def assert_matches_raw(source: SparseSource, raw: Path, rng: random.Random) -> list[Extent]:
    """Bytes equal qemu's raw copy; holes read (and are, in the copy) zeros.

    Reads only our data extents and the copy's data segments, so multi-GiB
    disks with a few MiB of data stay cheap.
    """
    assert source.size == raw.stat().st_size
    extents = list(source.iter_extents(0))
    pos = 0
    for ext in extents:
        assert ext.guest_offset == pos
        assert ext.length > 0
        pos = ext.end
    assert pos == source.size
    with raw.open("rb") as f:
        for ext in extents:
            if not ext.data:
                continue
            f.seek(ext.guest_offset)
            want = f.read(ext.length)
            assert source.read(ext.guest_offset, ext.length) == want, ext
            # the same range in odd pieces
            cut = ext.guest_offset
            while cut < ext.end:
                n = min(rng.randrange(1, 300 * KiB), ext.end - cut)
                got = source.read(cut, n)
                assert got == want[cut - ext.guest_offset : cut - ext.guest_offset + n], (cut, n)
                cut += n
        holes = [(e.guest_offset, e.end) for e in extents if not e.data]
        for s, e in seek_walk(raw):
            for hs, he in holes:
                lo, hi = max(s, hs), min(e, he)
                if lo < hi:
                    f.seek(lo)
                    assert f.read(hi - lo).count(0) == hi - lo, f"hole [{lo}, {hi}) not zero"
                    assert source.read(lo, min(hi - lo, MiB)).count(0) == min(hi - lo, MiB)
    return extents


def covered(extents: list[Extent], lo: int, hi: int) -> int:
    """Data bytes of [lo, hi)."""
    return sum(max(0, min(e.end, hi) - max(e.guest_offset, lo)) for e in extents if e.data)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, V.VhdxBuilt]:
    return {}


def _stored(written: list[tuple[int, int]], file_size: int, host: int, length: int) -> int:
    """Bytes of ``[host, host + length)`` the image file stores (FIEMAP; past its end: all)."""
    pieces = [*written, (file_size, max(file_size, host + length))]
    return sum(max(0, min(we, host + length) - max(ws, host)) for ws, we in pieces)


def _build(
    name: str, tmp_path_factory: pytest.TempPathFactory, cache: dict[str, V.VhdxBuilt]
) -> V.VhdxBuilt:
    if name not in cache:
        cache[name] = V.BUILDERS[name](tmp_path_factory.mktemp(name))
    return cache[name]


@pytest.mark.parametrize("kind", sorted(V.BUILDERS))
def test_matches_qemu(
    kind: str,
    built: dict[str, V.VhdxBuilt],
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    """Each image reads as qemu reads it; written ranges are data, untouched blocks
    holes, and an allocated block is data where the image file stores its bytes."""
    b = _build(kind, tmp_path_factory, built)
    raw = qemu_raw(b.qemu_image, tmp_path / "q.raw", fmt="vhdx")
    with open_image(b.image, OPTS) as image:
        extents = assert_matches_raw(image, raw, random.Random(kind))
        layer = image.layer
        assert isinstance(layer, vhdx_image.VhdxLayer)
        for off, n in b.writes:
            assert covered(extents, off, off + n) == n, f"write [{off}, {off + n}) is not data"
        bs = layer.block_size
        touched = {blk for off, n in b.writes for blk in range(off // bs, (off + n - 1) // bs + 1)}
        written = fiemap_written(b.image)
        file_size = os.path.getsize(b.image)
        for blk in range(layer.nb_blocks):
            lo, hi = blk * bs, min((blk + 1) * bs, image.size)
            if blk in touched or b.preallocated:
                state, host = layer.block_state(blk)
                assert state in (L.PAYLOAD_BLOCK_FULLY_PRESENT, L.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
                want = _stored(written, file_size, host, hi - lo)
            else:
                want = 0
            assert covered(extents, lo, hi) == want, f"block {blk}"
        assert image.describe()["subformat"] == ("fixed" if kind.startswith("fixed") else "dynamic")
        if kind == "sector_4k":
            assert layer.logical_sector_size == 4096
            assert layer.chunk_ratio == 32768
        if kind == "interleaved":
            # the BAT really holds a sector bitmap entry after the first chunk's payload entries
            assert layer.nb_bat_entries == layer.nb_blocks + 1


# -- BAT states qemu does not write ---------------------------------------------------------


def _np_copy(
    tmp_path: Path, built: dict[str, V.VhdxBuilt], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[int]]:
    """A copy of the NOT_PRESENT image and the blocks qemu allocated in it."""
    b = _build("not_present", tmp_path_factory, built)
    img = tmp_path / "states.vhdx"
    shutil.copy(b.image, img)
    buf = img.read_bytes()
    full = [i for i in range(12) if V.get_bat(buf, i)[0] == L.PAYLOAD_BLOCK_FULLY_PRESENT]
    assert len(full) >= 3
    return img, full


@pytest.mark.parametrize(
    "state",
    [
        L.PAYLOAD_BLOCK_UNDEFINED,
        L.PAYLOAD_BLOCK_ZERO,
        L.PAYLOAD_BLOCK_UNMAPPED,
        L.PAYLOAD_BLOCK_UNMAPPED_V095,
        L.PAYLOAD_BLOCK_NOT_PRESENT,
    ],
)
def test_zero_states_read_as_qemu(
    state: int,
    tmp_path: Path,
    built: dict[str, V.VhdxBuilt],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A written block set to a zero-reading state reads zeros (qemu agrees) and is a hole."""
    img, full = _np_copy(tmp_path, built, tmp_path_factory)
    block = full[1]
    V.edit(img, lambda buf: V.set_bat(buf, block, state))
    raw = qemu_raw(img, tmp_path / "q.raw", fmt="vhdx")
    with open_image(img, OPTS) as image:
        extents = assert_matches_raw(image, raw, random.Random(state))
        assert covered(extents, block * MiB, (block + 1) * MiB) == 0
        entries = [e for e in image.iter_map() if e.start <= block * MiB < e.start + e.length]
        assert entries[0].data is False
        # ZERO-like states are present (they hide a parent); NOT_PRESENT is not
        assert entries[0].present is (state != L.PAYLOAD_BLOCK_NOT_PRESENT)


@pytest.mark.parametrize(
    ("state", "offset", "why"),
    [
        (4, 0, "reserved state 4"),
        (L.PAYLOAD_BLOCK_PARTIALLY_PRESENT, None, "PARTIALLY_PRESENT in a disk without a parent"),
        (L.PAYLOAD_BLOCK_FULLY_PRESENT, 0, "header section"),
        (L.PAYLOAD_BLOCK_FULLY_PRESENT, 1 << 40, "past the end of the file"),
        (L.PAYLOAD_BLOCK_FULLY_PRESENT, -1, "overlaps the BAT"),
    ],
)
def test_bad_bat_entry_is_eio_for_that_block_only(
    state: int,
    offset: int | None,
    why: str,
    tmp_path: Path,
    built: dict[str, V.VhdxBuilt],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """One broken BAT entry: ImageReadError for its block, every other byte as qemu reads it."""
    img, full = _np_copy(tmp_path, built, tmp_path_factory)
    raw = qemu_raw(img, tmp_path / "q.raw", fmt="vhdx")  # before the damage
    block = full[0]

    def damage(buf: bytearray) -> None:
        old = V.get_bat(buf, block)[1]
        where = {None: old, -1: V.bat_offset(buf)}.get(offset, offset)
        V.set_bat(buf, block, state, where or 0)

    V.edit(img, damage)
    with open_image(img, OPTS) as image:
        with pytest.raises(ImageReadError, match=why) as exc:
            image.read(block * MiB + 100, 10)
        assert str(img) in str(exc.value)
        assert "\n" not in str(exc.value)
        data = raw.read_bytes()
        for blk in range(image.layer.nb_blocks):  # type: ignore[attr-defined]  # a VhdxLayer here
            if blk != block:
                assert image.read(blk * MiB, MiB) == data[blk * MiB : (blk + 1) * MiB], blk
        ext = [e for e in image.iter_extents(0) if e.guest_offset <= block * MiB < e.end]
        assert ext[0].data, "a broken block must not look like a hole"


# -- refusals --------------------------------------------------------------------------------


def _dyn_copy(
    tmp_path: Path, built: dict[str, V.VhdxBuilt], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    b = _build("dynamic", tmp_path_factory, built)
    img = tmp_path / "bad.vhdx"
    shutil.copy(b.image, img)
    return img


def _set_log_guid(buf: bytearray) -> None:
    off = V.active_header_offset(buf)
    buf[off + 48 : off + 64] = bytes(range(1, 17))
    V.reseal(buf, off, L.HEADER_SIZE)


def _bad_both_headers(buf: bytearray) -> None:
    for off in (L.HEADER1_OFFSET, L.HEADER2_OFFSET):
        buf[off + 100] ^= 0xFF


def _bad_region_crc(buf: bytearray) -> None:
    buf[L.REGION_TABLE_OFFSET + 16 + 40] ^= 0x1


def _required_region(buf: bytearray) -> None:
    count = struct.unpack_from("<I", buf, L.REGION_TABLE_OFFSET + 8)[0]
    struct.pack_into(
        "<16sQII", buf, L.REGION_TABLE_OFFSET + 16 + 32 * count, bytes(range(16)), 0, 0, 1
    )
    struct.pack_into("<I", buf, L.REGION_TABLE_OFFSET + 8, count + 1)
    V.reseal(buf, L.REGION_TABLE_OFFSET, L.REGION_TABLE_SIZE)


def _required_metadata(buf: bytearray) -> None:
    V.add_metadata_item(buf, bytes(range(16)), b"\1\2\3\4", L.META_IS_REQUIRED)


def _item(guid: bytes, value: int, fmt: str = "<I") -> object:
    def change(buf: bytearray) -> None:
        _, off, _, _ = V.metadata_items(buf)[guid]
        struct.pack_into(fmt, buf, off, value)

    return change


def _item_outside(buf: bytearray) -> None:
    entry, _, _, _ = V.metadata_items(buf)[L.VIRTUAL_DISK_SIZE_GUID]
    struct.pack_into("<I", buf, entry + 16, 2 * MiB)


def _drop_page83(buf: bytearray) -> None:
    entry, _, _, _ = V.metadata_items(buf)[L.PAGE83_GUID]
    buf[entry : entry + 16] = bytes(16)
    struct.pack_into("<I", buf, entry + 24, 0)  # an unknown item that is not required


def _bat_region_overlaps_metadata(buf: bytearray) -> None:
    count = struct.unpack_from("<I", buf, L.REGION_TABLE_OFFSET + 8)[0]
    meta = V.regions(buf)[L.METADATA_GUID][0]
    for i in range(count):
        at = L.REGION_TABLE_OFFSET + 16 + 32 * i
        if bytes(buf[at : at + 16]) == L.BAT_GUID:
            struct.pack_into("<Q", buf, at + 16, meta)
    V.reseal(buf, L.REGION_TABLE_OFFSET, L.REGION_TABLE_SIZE)


REFUSALS = {
    "log": (_set_log_guid, UnsupportedFeatureError, "log"),
    "headers": (_bad_both_headers, ImageFormatError, "no valid VHDX header"),
    "region_crc": (_bad_region_crc, ImageFormatError, "region table has a bad CRC-32C"),
    "required_region": (_required_region, UnsupportedFeatureError, "unknown required VHDX region"),
    "required_metadata": (
        _required_metadata,
        UnsupportedFeatureError,
        "unknown required VHDX metadata item",
    ),
    "block_size": (_item(L.FILE_PARAMETERS_GUID, 3 * MiB), UnsupportedFeatureError, "block size"),
    "sector_size": (
        _item(L.LOGICAL_SECTOR_SIZE_GUID, 1024),
        UnsupportedFeatureError,
        "logical sector size 1024",
    ),
    "huge": (
        _item(L.VIRTUAL_DISK_SIZE_GUID, 65 * 1024**4, "<Q"),
        UnsupportedFeatureError,
        "64 TiB",
    ),
    "bat_short": (
        _item(L.VIRTUAL_DISK_SIZE_GUID, 2 * 1024**4, "<Q"),
        ImageFormatError,
        "BAT of 1048576 bytes is too short",
    ),
    "item_outside": (_item_outside, ImageFormatError, "outside the metadata region"),
    "missing_item": (_drop_page83, ImageFormatError, "lacks the page 83 data item"),
    "overlap": (_bat_region_overlaps_metadata, ImageFormatError, "overlaps the"),
    "signature": (
        lambda buf: buf.__setitem__(slice(0, 8), b"vhdxfilX"),
        ImageFormatError,
        "not a VHDX image",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_are_one_line(
    case: str,
    tmp_path: Path,
    built: dict[str, V.VhdxBuilt],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Each broken or unsupported structure is refused in one line naming the file."""
    change, error, needle = REFUSALS[case]
    img = V.edit(_dyn_copy(tmp_path, built, tmp_path_factory), change)  # type: ignore[arg-type]  # the editor takes the raw header bytes
    with pytest.raises(error) as exc:
        open_image(img, OPTS)
    message = str(exc.value)
    assert needle in message, message
    assert str(img) in message
    assert "\n" not in message


def test_qemu_also_refuses_a_log_read_only(
    tmp_path: Path, built: dict[str, V.VhdxBuilt], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A set log GUID with no valid entries: qemu replays nothing; the refusal is ours alone.

    Documented here so the difference is deliberate: sparsefs refuses any set log GUID
    (it cannot tell an empty log from one it fails to parse without a log parser).
    """
    img = V.edit(_dyn_copy(tmp_path, built, tmp_path_factory), _set_log_guid)
    with pytest.raises(UnsupportedFeatureError, match="may need replay"):
        open_image(img, OPTS)


def test_one_bad_header_falls_back_like_qemu(
    tmp_path: Path, built: dict[str, V.VhdxBuilt], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A corrupt active header: the other one is used, as qemu does."""
    img = _dyn_copy(tmp_path, built, tmp_path_factory)
    V.edit(img, lambda buf: buf.__setitem__(V.active_header_offset(buf) + 200, 0x55))
    raw = qemu_raw(img, tmp_path / "q.raw", fmt="vhdx")
    with open_image(img, OPTS) as image:
        assert_matches_raw(image, raw, random.Random(0))


def test_crc32c() -> None:
    """The check value of CRC-32C, and the table against a bitwise reference."""
    assert L.crc32c(b"123456789") == 0xE3069283
    rng = random.Random(3)
    data = rng.randbytes(300)
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    assert L.crc32c(data) == crc ^ 0xFFFFFFFF


def test_bat_memory_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64 GiB disk with 1 MiB blocks (a 512 KiB BAT) walks with a few cached BAT pages."""
    monkeypatch.setattr(vhdx_image, "BAT_CACHE_PAGES", 2)
    img = V.create(tmp_path / "big.vhdx", 64 * 1024 * MiB, "block_size=1M")
    qemu_io(img, "write -q -P 9 0 4k", f"write -q -P 8 {63 * 1024 * MiB} 4k", fmt="vhdx")
    written, file_size = fiemap_written(img), os.path.getsize(img)
    with open_image(img, OPTS) as image:
        extents = list(image.iter_extents(0))
        layer = image.layer
        assert isinstance(layer, vhdx_image.VhdxLayer)
        # Each write's block, as far as the image file stores it (from the block's start).
        want = [
            (g, _stored(written, file_size, layer.block_state(g // MiB)[1], MiB))
            for g in (0, 63 * 1024 * MiB)
        ]
        assert [(e.guest_offset, e.length) for e in extents if e.data] == want
        assert all(n >= 4 * KiB for _, n in want)
        assert len(image.layer._bat_pages) <= 2  # type: ignore[attr-defined]  # a VhdxLayer here
        assert image.read(63 * 1024 * MiB, 2) == b"\x08\x08"


# -- differencing disks -----------------------------------------------------------------------


_family = V.family
_expected = V.compose


@pytest.mark.parametrize("where", ["relative", "absolute_posix", "win32_drive"])
def test_differencing_reads_child_over_parent(where: str, tmp_path: Path) -> None:
    """Blocks the child holds come from it; NOT_PRESENT blocks from the parent; ZERO hides it."""
    locator = {
        "relative": {"relative_path": ".\\parent.vhdx"},
        "absolute_posix": {"absolute_win32_path": str(tmp_path / "parent.vhdx")},
        "win32_drive": {
            "relative_path": "..\\elsewhere\\parent.vhdx",
            "absolute_win32_path": "C:\\VMs\\parent.vhdx",
        },
    }[where]
    parent, child, parent_raw, child_raw, writes = _family(tmp_path, locator=locator)
    blocks = {b for off, n in writes for b in range(off // MiB, (off + n - 1) // MiB + 1)}
    hidden = next(b for b in range(10) if b not in blocks)
    V.edit(child, lambda buf: V.set_bat(buf, hidden, L.PAYLOAD_BLOCK_ZERO))
    want = _expected(parent_raw, child_raw, blocks, {hidden})
    with open_image(child, OPTS) as image:
        assert image.read(0, image.size) == want
        assert image.chain() == [(str(parent), "vhdx")]
        assert image.describe()["subformat"] == "differencing"
        rng = random.Random(where)
        for _ in range(40):
            off = rng.randrange(image.size)
            n = rng.randrange(1, 3 * MiB)
            assert image.read(off, n) == want[off : off + n]
        # the parent is all data, so only the ZERO block is a hole
        holes = [(e.guest_offset, e.end) for e in image.iter_extents(0) if not e.data]
        assert holes == [(hidden * MiB, (hidden + 1) * MiB)]
        depths = {e.depth for e in image.iter_map()}
        assert depths == {0, 1}
    with open_image(child, OpenOptions(backing=False)) as alone:
        assert alone.read(0, alone.size) == _expected(bytes(len(parent_raw)), child_raw, blocks)


@pytest.mark.parametrize("sector", [512, 4096])
def test_partially_present_uses_the_sector_bitmap(sector: int, tmp_path: Path) -> None:
    """PARTIALLY_PRESENT: sectors with bitmap bit 1 come from the child, 0 from the parent."""
    _parent, child, parent_raw, child_raw, _writes = _family(tmp_path, sector=sector)
    buf = child.read_bytes()
    full = [b for b in range(11) if V.get_bat(buf, b)[0] == L.PAYLOAD_BLOCK_FULLY_PRESENT]
    block = full[0]
    spb = MiB // sector
    present = [
        (block * spb + 3, block * spb + 4),
        (block * spb + 9, block * spb + 100),
        (block * spb + 130, block * spb + 131),
        (block * spb + spb - 1, block * spb + spb),
    ]
    V.append_sector_bitmap(child, 0, MiB, present, sector)
    V.edit(
        child,
        lambda b: V.set_bat(b, block, L.PAYLOAD_BLOCK_PARTIALLY_PRESENT, V.get_bat(b, block)[1]),
    )
    blocks = {b for b in full if b != block}
    want = bytearray(_expected(parent_raw, child_raw, blocks))
    for first, end in present:
        want[first * sector : end * sector] = child_raw[first * sector : end * sector]
    with open_image(child, OPTS) as image:
        assert image.read(0, image.size) == bytes(want)
        for off in range(block * MiB, (block + 1) * MiB, 77 * 512 + 5):
            assert image.read(off, 1999) == bytes(want[off : off + 1999])
        m = [e for e in image.iter_map() if block * MiB <= e.start < (block + 1) * MiB]
        assert [(e.start, e.depth) for e in m][:3] == [
            (block * MiB, 1),
            (block * MiB + 3 * sector, 0),
            (block * MiB + 4 * sector, 1),
        ]
    # without a present sector bitmap the block is EIO, the rest still reads
    ratio = V.chunk_ratio(MiB, sector)
    V.edit(child, lambda b: V.set_bat(b, ratio, L.SB_BLOCK_NOT_PRESENT))
    with open_image(child, OPTS) as image:
        with pytest.raises(ImageReadError, match="sector bitmap of chunk 0 is not present"):
            image.read(block * MiB, 512)
        other = next(b for b in range(10) if b != block)
        assert image.read(other * MiB, MiB) == bytes(want[other * MiB : (other + 1) * MiB])


def test_parent_linkage_mismatch_and_missing_parent(tmp_path: Path) -> None:
    """A parent whose DataWriteGuid changed is refused; a missing parent is named."""
    parent, child, *_ = _family(tmp_path)
    qemu_io(parent, "write -q -P 3 0 512", fmt="vhdx")  # qemu gives it a new DataWriteGuid
    with pytest.raises(MissingFileError, match="is not the linked parent") as exc:
        open_image(child, OPTS)
    assert str(child) in str(exc.value)
    parent.unlink()
    with pytest.raises(MissingFileError, match="parent is missing"):
        open_image(child, OPTS)


def test_parent_outside_backing_dir_and_loops(tmp_path: Path) -> None:
    """--backing-dir confines the parent; a disk that is its own parent is a loop."""
    _parent, child, *_ = _family(tmp_path)
    elsewhere = tmp_path / "jail"
    elsewhere.mkdir()
    with pytest.raises(UnsupportedFeatureError, match="outside --backing-dir"):
        open_image(child, OpenOptions(backing_dir=str(elsewhere)))
    with open_image(child, OpenOptions(backing_dir=str(tmp_path))):
        pass
    # the child names itself, with its own DataWriteGuid as the linkage
    loop = tmp_path / "loop.vhdx"
    V.create(loop, 4 * MiB, "block_size=1M")
    V.make_differencing(loop, {"relative_path": "loop.vhdx"})
    buf = bytearray(loop.read_bytes())
    guid = V.data_write_guid(loop)
    _, off, length, _ = V.metadata_items(buf)[L.PARENT_LOCATOR_GUID]
    item = V.build_parent_locator({"parent_linkage": guid, "relative_path": "loop.vhdx"})
    assert len(item) <= length + 200
    buf[off : off + len(item)] = item
    entry, _, _, _ = V.metadata_items(buf)[L.PARENT_LOCATOR_GUID]
    struct.pack_into("<I", buf, entry + 20, len(item))
    loop.write_bytes(bytes(buf))
    with pytest.raises(ImageFormatError, match="loop"):
        open_image(loop, OPTS)


def test_grandparent_chain(tmp_path: Path) -> None:
    """child -> parent -> grand: a block neither child nor parent holds comes from grand."""
    parent, child, parent_raw, child_raw, writes = _family(tmp_path)
    grand = V.create(tmp_path / "grand.vhdx", len(parent_raw), "block_size=1M")
    qemu_io(grand, f"write -q -P 99 0 {len(parent_raw)}", fmt="vhdx")
    grand_raw = qemu_raw(grand, tmp_path / "grand.raw", fmt="vhdx").read_bytes()
    blocks = {b for off, n in writes for b in range(off // MiB, (off + n - 1) // MiB + 1)}
    gap = next(b for b in range(10) if b not in blocks)
    # editing the parent's metadata and BAT leaves its header (DataWriteGuid) as it was
    V.make_differencing(
        parent, {"parent_linkage": V.data_write_guid(grand), "relative_path": "grand.vhdx"}
    )
    V.edit(parent, lambda buf: V.set_bat(buf, gap, L.PAYLOAD_BLOCK_NOT_PRESENT))
    want = bytearray(_expected(parent_raw, child_raw, blocks))
    want[gap * MiB : (gap + 1) * MiB] = grand_raw[gap * MiB : (gap + 1) * MiB]
    with open_image(child, OPTS) as image:
        assert image.read(0, image.size) == bytes(want)
        assert image.chain() == [(str(parent), "vhdx"), (str(grand), "vhdx")]
        assert {e.depth for e in image.iter_map()} == {0, 1, 2}


def test_not_vhdx_is_refused(tmp_path: Path) -> None:
    """A qcow2 file opened as VHDX is refused in one line."""
    img = tmp_path / "x.qcow2"
    qemu_img_create(img, MiB)
    with pytest.raises(ImageFormatError, match="not a VHDX image"):
        open_image(img, OPTS)


def test_registry_detects_and_opens_vhdx(
    tmp_path: Path, built: dict[str, V.VhdxBuilt], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The registry probes a VHDX file by its magic and opens it, under any name."""
    from sparsefs import formats

    b = _build("dynamic", tmp_path_factory, built)
    renamed = tmp_path / "disk.img"
    shutil.copy(b.image, renamed)
    assert formats.detect(str(renamed)) == "vhdx"
    raw = qemu_raw(b.image, tmp_path / "q.raw", fmt="vhdx")
    source = formats.open_source(renamed)
    try:
        assert source.read(0, source.size) == raw.read_bytes()
    finally:
        source.close()  # type: ignore[attr-defined]  # every opened image has close()


# -- fuzz: seeded mutants of qemu-made VHDX images (the contract of test_fuzz.py) ---------

FUZZ_ITERATIONS = int(os.environ.get("SPARSEFS_FUZZ_ITERATIONS", "400"))
FUZZ_SEED = int(os.environ.get("SPARSEFS_FUZZ_SEED", "20240501"))


class _VhdxMutator:
    """Seeded changes at the places a VHDX reader trusts: header, regions, metadata, BAT."""

    def __init__(self, buf: bytes, rng: random.Random) -> None:
        self.rng = rng
        self.size = len(buf)
        self.bat = V.bat_offset(buf)
        self.items = [(off, length) for _, off, length, _ in V.metadata_items(buf).values()]
        self.table = V.regions(buf)[L.METADATA_GUID][0]

    def _value(self, width: int) -> int:
        r = self.rng
        limit = 1 << (8 * width)
        values = [
            0,
            1,
            2,
            3,
            5,
            6,
            7,
            512,
            4096,
            MiB,
            3 * MiB,
            256 * MiB,
            self.size,
            self.size + MiB,
            limit - 1,
            r.randrange(limit),
        ]
        return r.choice(values) % limit

    def _put(self, buf: bytearray, at: int, width: int) -> str:
        value = self._value(width)
        buf[at : at + width] = value.to_bytes(width, "little")
        return f"{width}-byte field at {at:#x} = {value:#x}"

    def next(self) -> tuple[str, Callable[[bytearray], None]]:
        r = self.rng
        kind = r.randrange(8)
        if kind == 0:  # a header field, resealed so the header stays valid
            at = r.choice([8, 16, 32, 48, 64, 66, 68, 72])
            width = {8: 8, 64: 2, 66: 2, 68: 4, 72: 8}.get(at, 16 if at < 64 else 8)

            def change(buf: bytearray) -> None:
                h = V.active_header_offset(buf)
                if width == 16:
                    buf[h + at : h + at + 16] = r.randbytes(16) if r.random() < 0.5 else bytes(16)
                else:
                    self._put(buf, h + at, width)
                V.reseal(buf, h, L.HEADER_SIZE)

            return f"header field +{at}", change
        if kind == 1:  # a region table entry field, resealed
            i = r.randrange(3)
            field_at = r.choice([(16, 8), (24, 4), (28, 4), (0, 16)])
            at = L.REGION_TABLE_OFFSET + 16 + 32 * i + field_at[0]

            def change(buf: bytearray) -> None:
                if field_at[1] == 16:
                    buf[at : at + 16] = r.randbytes(16)
                else:
                    self._put(buf, at, field_at[1])
                if i == 2:
                    struct.pack_into("<I", buf, L.REGION_TABLE_OFFSET + 8, r.randrange(4))
                V.reseal(buf, L.REGION_TABLE_OFFSET, L.REGION_TABLE_SIZE)

            return f"region entry {i} +{field_at[0]}", change
        if kind == 2:  # a metadata table field
            at = self.table + r.choice(
                [10, *(32 + 32 * i + f for i in range(6) for f in (0, 16, 20, 24))]
            )
            width = 2 if at == self.table + 10 else (16 if (at - self.table - 32) % 32 == 0 else 4)

            def change(buf: bytearray) -> None:
                if width == 16:
                    buf[at : at + 16] = r.randbytes(16)
                else:
                    self._put(buf, at, width)

            return f"metadata table at {at:#x}", change
        if kind == 3:  # a metadata item's value
            off, length = r.choice(self.items)
            at = off + r.randrange(max(1, min(length, 64)))
            width = r.choice([1, 2, 4, 8])

            def change(buf: bytearray) -> None:
                self._put(buf, at, width)

            return f"metadata item byte {at:#x}", change
        if kind in (4, 5):  # BAT entries: state and offset
            index = r.randrange(16) if r.random() < 0.8 else r.randrange(8192)
            at = self.bat + 8 * index

            def change(buf: bytearray) -> None:
                state = r.randrange(8)
                offset = r.choice([0, 1, 2, 3, 4, 8, 1 << 30, r.randrange(1 << 44)]) * MiB
                struct.pack_into("<Q", buf, at, (offset & ((1 << 64) - MiB)) | state)

            return f"BAT entry {index}", change
        if kind == 6:  # random bytes anywhere in the first 4 MiB
            at = r.randrange(min(self.size, 4 * MiB))
            n = r.randrange(1, 16)
            return f"{n} random bytes at {at:#x}", lambda buf: buf.__setitem__(
                slice(at, at + n), r.randbytes(n)[: len(buf) - at]
            )
        cut = r.randrange(self.size)
        return f"truncate to {cut}", lambda buf: buf.__delitem__(slice(cut, None))


@pytest.fixture(scope="module")
def fuzz_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vhdx-fuzz")
    dyn = V.create(d / "dynamic.vhdx", 6 * MiB + 512, "block_size=1M")
    V.random_writes(dyn, random.Random(21), 6 * MiB, 6)
    fixed = V.create(
        d / "fixed.vhdx", 3 * MiB, "subformat=fixed", "block_size=1M", "block_state_zero=off"
    )
    V.random_writes(fixed, random.Random(22), 3 * MiB, 3)
    _parent, child, *_ = _family(d)
    buf = child.read_bytes()
    full = [b for b in range(10) if V.get_bat(buf, b)[0] == L.PAYLOAD_BLOCK_FULLY_PRESENT]
    V.append_sector_bitmap(child, 0, MiB, [(full[0] * 2048 + 5, full[0] * 2048 + 900)])
    V.edit(
        child,
        lambda b: V.set_bat(
            b, full[0], L.PAYLOAD_BLOCK_PARTIALLY_PRESENT, V.get_bat(b, full[0])[1]
        ),
    )
    return {"dynamic": dyn, "fixed": fixed, "differencing": child}


def test_fuzz_vhdx_mutants(fuzz_bases: dict[str, Path]) -> None:
    """Every seeded mutant is refused in one line or served consistently, in time and memory.

    The contract of test_fuzz.py, with tests/conformance.py's exercise(),
    watchdog and address-space cap.
    """
    kinds = sorted(fuzz_bases)
    originals = {k: p.read_bytes() for k, p in fuzz_bases.items()}
    failures: list[str] = []
    outcomes = {True: 0, False: 0}
    old_handler = signal.signal(signal.SIGALRM, conformance.alarm)
    cap = conformance.capped_address_space()
    cap.__enter__()
    try:
        for i in range(FUZZ_ITERATIONS):
            kind = kinds[i % len(kinds)]
            rng = random.Random(f"{FUZZ_SEED}:vhdx:{i}")
            mutator = _VhdxMutator(originals[kind], rng)
            changes = [mutator.next() for _ in range(1 if rng.random() < 0.8 else 3)]
            changes.sort(key=lambda c: c[0].startswith("truncate"))  # cut last
            buf = bytearray(originals[kind])
            for _, change in changes:
                change(buf)
            mutant = fuzz_bases[kind].with_name(f"mutant-{kind}.vhdx")
            mutant.write_bytes(bytes(buf))
            # a differencing mutant must find the parent beside it: same directory
            where = f"seed {FUZZ_SEED} iteration {i} ({kind}): " + "; ".join(d for d, _ in changes)
            signal.setitimer(signal.ITIMER_REAL, conformance.WATCHDOG_SECONDS)
            try:
                outcomes[_fuzz_one(mutant, rng)] += 1
            except conformance.Hang:
                failures.append(f"{where}: no answer within {conformance.WATCHDOG_SECONDS} s")
            except (AssertionError, Exception) as exc:
                failures.append(f"{where}: {type(exc).__name__}: {exc}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if failures and failures[-1].startswith(where):
                shutil.copy(mutant, mutant.with_name(f"failed-{i}-{kind}.vhdx"))
                if len(failures) >= 10:
                    break
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        cap.__exit__(None, None, None)
    assert not failures, f"{len(failures)} mutants misbehaved:\n" + "\n".join(failures)
    # both paths ran: mutants that open (and were exercised) and mutants refused
    assert min(outcomes.values()) >= FUZZ_ITERATIONS // 10, outcomes


def _fuzz_one(path: Path, rng: random.Random) -> bool:
    """Open a mutant: True when it opened (and was consistent), False when refused cleanly."""
    try:
        image = open_image(path, OPTS)
    except SparsefsError as exc:
        message = str(exc)
        assert message, "empty error message"
        assert "\n" not in message, f"error message is not one line: {message!r}"
        return False
    with image:
        conformance.exercise(image, rng)
        pos = 0
        for entry in image.iter_map():
            assert entry.start == pos
            assert entry.length > 0
            pos += entry.length
        assert pos == image.size
    return True


def test_cli_checksum_info_and_refusal(
    tmp_path: Path, built: dict[str, V.VhdxBuilt], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """checksum of a VHDX equals that of qemu's raw copy; info names it; refusals are one line."""
    b = _build("dynamic", tmp_path_factory, built)
    raw = qemu_raw(b.image, tmp_path / "q.raw", fmt="vhdx")
    ours = sparsefs("checksum", "-q", str(b.image), check=True).stdout.split()[0]
    theirs = sparsefs("checksum", "-q", str(raw), check=True).stdout.split()[0]
    assert ours == theirs
    info = sparsefs("info", str(b.image), check=True).stdout
    assert "file format: vhdx" in info
    assert "subformat: dynamic" in info
    bad = V.edit(_dyn_copy(tmp_path, built, tmp_path_factory), _set_log_guid)
    one_line_error(sparsefs("checksum", str(bad)), str(bad), "may need replay")


def test_qcow2_over_vhdx_backing(
    tmp_path: Path, built: dict[str, V.VhdxBuilt], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A qcow2 overlay with backing_fmt=vhdx reads as qemu reads it, through the registry."""
    from sparsefs import formats

    b = _build("not_present", tmp_path_factory, built)
    base = tmp_path / "base.vhdx"
    shutil.copy(b.image, base)
    top = tmp_path / "top.qcow2"
    qemu_img_create(top, 12 * MiB, backing=base.name, backing_fmt="vhdx")
    qemu_io(top, f"write -q -P 200 {MiB + 512} 70000")
    raw = qemu_raw(top, tmp_path / "q.raw", fmt="qcow2")
    source = formats.open_source(top)
    try:
        assert source.read(0, source.size) == raw.read_bytes()
        assert source.chain() == [(str(base), "vhdx")]  # type: ignore[attr-defined]  # a LayeredImage
    finally:
        source.close()  # type: ignore[attr-defined]  # every opened image has close()
