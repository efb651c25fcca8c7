"""Persistent dirty bitmaps: directory, tables, dirty ranges, info and map --bitmap.

Images and bitmaps are made by qemu-img/qemu-io at test time; the dirty
ranges are checked against qemu's own view, ``qemu-nbd -B NAME`` read with
``nbdinfo --map=qemu:dirty-bitmap:NAME``; the listing against ``qemu-img info``.
Corrupt cases mutate a valid image in the test.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest

from sparsefs.formats.qcow2 import open_image
from sparsefs.formats.qcow2.bitmaps import BitmapError, dirty_ranges, find_bitmap, list_bitmaps
from support import KiB, MiB, one_line_error, qemu_img_create, qemu_io, run, sparsefs

pytestmark = pytest.mark.skipif(
    shutil.which("nbdinfo") is None or shutil.which("qemu-nbd") is None,
    reason="needs nbdinfo (libnbd-bin) and qemu-nbd for the oracle",
)


def qemu_dirty(image: Path, name: str) -> list[tuple[int, int]]:
    """Dirty ranges of bitmap ``name`` as qemu exports them, merged."""
    out = run(
        [
            "nbdinfo",
            "--json",
            f"--map=qemu:dirty-bitmap:{name}",
            "--",
            "[",
            "qemu-nbd",
            "-r",
            "-f",
            "qcow2",
            "-B",
            name,
            str(image),
            "]",
        ]
    ).stdout
    ranges: list[tuple[int, int]] = []
    for e in json.loads(out):
        if not e["type"] & 1:
            continue
        if ranges and sum(ranges[-1]) == e["offset"]:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + e["length"])
        else:
            ranges.append((e["offset"], e["length"]))
    return ranges


def qemu_bitmaps(image: Path) -> list[dict[str, object]]:
    """The bitmaps ``qemu-img info`` lists (name, granularity, flags)."""
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(image)]).stdout)
    return info["format-specific"]["data"].get("bitmaps", [])  # type: ignore[no-any-return]  # qemu-img info's JSON


def ours(image: Path, name: str) -> list[tuple[int, int]]:
    with open_image(image) as img:
        return list(dirty_ranges(img, find_bitmap(img, name)))


def written_image(
    path: Path,
    size: int,
    *,
    cluster: int,
    granularity: int,
    seed: int,
    writes: int = 12,
    backing: Path | None = None,
) -> Path:
    """An image with an enabled bitmap ``b`` and a disabled ``off``, then random writes.

    Also writes before the bitmap exists (must not show as dirty).
    """
    qemu_img_create(path, size, f"cluster_size={cluster}", backing=backing)
    rng = random.Random(seed)
    qemu_io(path, f"write -q -P 7 0 {min(size, 256 * KiB)}")
    run(["qemu-img", "bitmap", "--add", "-g", str(granularity), str(path), "b"])
    run(["qemu-img", "bitmap", "--add", "--disable", str(path), "off"])
    cmds = []
    for _ in range(writes):
        length = rng.randrange(1, 96) * 1024
        offset = rng.randrange(0, size - length) // 512 * 512
        kind = rng.choice(["write -q -P 9", "write -q -z", "discard -q"])
        cmds.append(f"{kind} {offset} {length}")
    qemu_io(path, *cmds)
    return path


@pytest.mark.parametrize(
    ("size", "cluster", "granularity"),
    [
        (8 * MiB, 64 * KiB, 64 * KiB),
        (8 * MiB + 3 * KiB, 512, 512),  # bitmap table spans several clusters; odd size
        (6 * MiB, 4 * KiB, 1 * MiB),  # granularity above the cluster size
        (20 * MiB, 2 * MiB, 4 * KiB),
    ],
)
def test_dirty_ranges_match_qemu(tmp_path: Path, size: int, cluster: int, granularity: int) -> None:
    img = written_image(
        tmp_path / "a.qcow2",
        size,
        cluster=cluster,
        granularity=granularity,
        seed=size ^ cluster ^ granularity,
    )
    expected = qemu_dirty(img, "b")
    assert expected, "the writes must have dirtied something"
    assert ours(img, "b") == expected
    assert ours(img, "off") == qemu_dirty(img, "off") == []
    proc = sparsefs("map", "--bitmap", "b", "--output=json", str(img), check=True)
    got = [(e["start"], e["length"]) for e in json.loads(proc.stdout)]
    assert got == expected


def test_chain_top_has_the_bitmap(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img_create(base, 8 * MiB)
    qemu_io(base, "write -q -P 1 0 8M")
    top = written_image(
        tmp_path / "top.qcow2",
        8 * MiB,
        cluster=64 * KiB,
        granularity=64 * KiB,
        seed=3,
        backing=base,
    )
    expected = qemu_dirty(top, "b")
    assert expected
    assert ours(top, "b") == expected


def test_all_ones_table_entry(tmp_path: Path) -> None:
    """A table entry with no offset and bit 0 set reads as a cluster of ones."""
    img = written_image(
        tmp_path / "a.qcow2", 8 * MiB, cluster=512, granularity=512, seed=5, writes=2
    )
    table_offset = _dir_entry_field(img, "b", 0, ">Q")
    _patch(img, table_offset + 8, struct.pack(">Q", 1))
    expected = qemu_dirty(img, "b")
    assert ours(img, "b") == expected
    assert any(length >= 2 * MiB for _, length in expected)


def test_info_lists_bitmaps_like_qemu_img(tmp_path: Path) -> None:
    img = written_image(
        tmp_path / "a.qcow2", 4 * MiB, cluster=64 * KiB, granularity=128 * KiB, seed=1
    )
    info = json.loads(sparsefs("info", "--output=json", str(img), check=True).stdout)
    want = [
        {"name": b["name"], "granularity": b["granularity"], "flags": b["flags"]}
        for b in qemu_bitmaps(img)
    ]
    assert info["bitmaps"] == want
    text = sparsefs("info", str(img), check=True).stdout
    assert "bitmaps:" in text
    assert "131072" in text
    _set_flags(img, "b", 0x3)  # in_use + auto, as a QEMU holding the image leaves it
    info = json.loads(sparsefs("info", "--output=json", str(img), check=True).stdout)
    want = [
        {"name": b["name"], "granularity": b["granularity"], "flags": b["flags"]}
        for b in qemu_bitmaps(img)
    ]
    assert info["bitmaps"] == want
    assert "in-use" in info["bitmaps"][0]["flags"]


def test_no_bitmaps(tmp_path: Path) -> None:
    img = qemu_img_create(tmp_path / "a.qcow2", MiB)
    info = json.loads(sparsefs("info", "--output=json", str(img), check=True).stdout)
    assert info["bitmaps"] == [] == qemu_bitmaps(img)
    one_line_error(sparsefs("map", "--bitmap", "b", str(img)), "no bitmap named 'b'")


def test_autoclear_bit_clear_means_no_bitmaps(tmp_path: Path) -> None:
    """A program without bitmap support cleared the autoclear bit: the bitmaps are stale."""
    img = written_image(
        tmp_path / "a.qcow2", MiB, cluster=64 * KiB, granularity=64 * KiB, seed=2, writes=2
    )
    autoclear = struct.unpack(">Q", img.read_bytes()[88:96])[0]
    _patch(img, 88, struct.pack(">Q", autoclear & ~1))
    with open_image(img) as im:
        assert list_bitmaps(im) == []
    one_line_error(sparsefs("map", "--bitmap", "b", str(img)), "no bitmap named 'b'")


# -- refusals and corrupt metadata ---------------------------------------------------


def test_in_use_refused_even_with_force_share(tmp_path: Path) -> None:
    img = written_image(
        tmp_path / "a.qcow2", MiB, cluster=64 * KiB, granularity=64 * KiB, seed=4, writes=2
    )
    _set_flags(img, "b", 0x3)
    with open_image(img) as im, pytest.raises(BitmapError, match="in use"):
        list(dirty_ranges(im, find_bitmap(im, "b")))
    one_line_error(sparsefs("map", "-U", "--bitmap", "b", str(img)), "in use", str(img))


def _corrupt_cases() -> list[tuple[str, str]]:
    return [
        ("reserved_flags", "reserved flags"),
        ("table_size_mismatch", "does not fit the image"),
        ("table_offset_misaligned", "not cluster aligned"),
        ("table_entry_reserved", "reserved bits"),
        ("table_entry_past_eof", "past the end of the file"),
        ("directory_misaligned", "bitmap directory offset"),
        ("nb_bitmaps_too_many", "declares"),
        ("duplicate_name", "appears twice"),
        ("granularity", "granularity"),
        ("type", "type 2"),
        ("extension_length", "bitmaps extension has length"),
    ]


@pytest.mark.parametrize(("case", "needle"), _corrupt_cases(), ids=[c for c, _ in _corrupt_cases()])
def test_corrupt_bitmaps_one_line_error(tmp_path: Path, case: str, needle: str) -> None:
    img = written_image(
        tmp_path / "a.qcow2", MiB, cluster=64 * KiB, granularity=64 * KiB, seed=6, writes=3
    )
    before = img.read_bytes()
    dir_offset, dir_pos, ext_pos = _directory(img)
    entry = dir_offset  # first entry ("b")
    table_offset = _dir_entry_field(img, "b", 0, ">Q")
    if case == "reserved_flags":
        _set_flags(img, "b", 0x2 | 0x100)
    elif case == "table_size_mismatch":
        _patch(img, entry + 8, struct.pack(">I", 2))
    elif case == "table_offset_misaligned":
        _patch(img, entry, struct.pack(">Q", table_offset + 512))
    elif case == "table_entry_reserved":
        value = struct.unpack(">Q", before[table_offset : table_offset + 8])[0]
        _patch(img, table_offset, struct.pack(">Q", value | 0x2))
    elif case == "table_entry_past_eof":
        far = (len(before) + 64 * KiB * 4) // (64 * KiB) * (64 * KiB)
        _patch(img, table_offset, struct.pack(">Q", far))
    elif case == "directory_misaligned":
        _patch(img, dir_pos + 16, struct.pack(">Q", dir_offset + 8))
    elif case == "nb_bitmaps_too_many":
        _patch(img, dir_pos, struct.pack(">I", 3))
    elif case == "duplicate_name":
        # the second entry, "off", becomes a second "b" (same entry size, zero padding)
        second = _entry_pos(img, "off")
        _patch(img, second + 18, struct.pack(">H", 1))
        _patch(img, second + 24, b"b\0\0")
    elif case == "granularity":
        _patch(img, entry + 17, bytes([40]))
    elif case == "type":
        _patch(img, entry + 16, bytes([2]))
    elif case == "extension_length":
        _patch(img, ext_pos + 4, struct.pack(">I", 16))
    after = img.read_bytes()
    proc = sparsefs("map", "--bitmap", "b", str(img))
    one_line_error(proc, needle, str(img))
    assert img.read_bytes() == after, "sparsefs must never write the image"


# -- helpers: an independent reading of the on-disk layout --------------------------


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _directory(img: Path) -> tuple[int, int, int]:
    """(directory offset, position of the extension data, position of the extension header)."""
    buf = img.read_bytes()[: 64 * KiB]
    header_length = struct.unpack(">I", buf[100:104])[0]
    pos = header_length
    while True:
        ext_type, length = struct.unpack(">II", buf[pos : pos + 8])
        if ext_type == 0x23852875:
            dir_offset = struct.unpack(">Q", buf[pos + 8 + 16 : pos + 8 + 24])[0]
            return dir_offset, pos + 8, pos
        assert ext_type != 0, "no bitmaps extension"
        pos += 8 + ((length + 7) & ~7)


def _entry_pos(img: Path, name: str) -> int:
    dir_offset, _, _ = _directory(img)
    buf = img.read_bytes()
    pos = dir_offset
    while True:
        name_size, extra = struct.unpack(">HI", buf[pos + 18 : pos + 24])
        start = pos + 24 + extra
        if buf[start : start + name_size] == name.encode():
            return pos
        pos += (24 + extra + name_size + 7) & ~7


def _dir_entry_field(img: Path, name: str, offset: int, fmt: str) -> int:
    pos = _entry_pos(img, name) + offset
    value: int = struct.unpack_from(fmt, img.read_bytes(), pos)[0]
    return value


def _set_flags(img: Path, name: str, flags: int) -> None:
    _patch(img, _entry_pos(img, name) + 12, struct.pack(">I", flags))
