"""Preallocated images: ranges the host file stores as nothing are holes.

For every kind in tests/prealloc_images.py: the bytes equal ``qemu-img
convert``; the data extents are exactly what qemu-img map calls data (not
zero), cut to the host bytes FIEMAP calls written (``filefrag -s``); all of
it also after every file was read into the page cache; ``sparsefs map``
keeps qemu's shape and values; checksum reads only the data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prealloc_images import BUILDERS, read_all_files
from sparsefs.formats.qcow2 import open_image
from sparsefs.formats.qcow2.layout import L2E_OFFSET_MASK
from support import (
    MiB,
    check_map_agrees,
    check_stored,
    host_files_of,
    qemu_data_bytes,
    qemu_img_create,
    qemu_io,
    qemu_map,
    qemu_raw,
    sparsefs,
    stored_segments,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prealloc")
    out = {}
    for kind, build in BUILDERS.items():
        d = root / kind
        d.mkdir()
        out[kind] = build(d)
    return out


def _segments(image: Path) -> list[tuple[int, int]]:
    with open_image(image) as img:
        return [(e.guest_offset, e.end) for e in img.iter_extents() if e.data]


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_bytes_equal_qemu_convert(kind: str, built: dict[str, Path], tmp_path: Path) -> None:
    image = built[kind]
    expected = qemu_raw(image, tmp_path / "ref.raw").read_bytes()
    with open_image(image) as img:
        assert img.read(0, img.size) == expected
        pos, step = 0, 777_777
        while pos < img.size:
            assert img.read(pos, step) == expected[pos : pos + step], pos
            pos += step
        for ext in img.iter_extents():
            if not ext.data:
                assert img.read(ext.guest_offset, ext.length) == bytes(ext.length), ext


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_holes_are_qemu_zeros_and_unwritten_host_ranges(kind: str, built: dict[str, Path]) -> None:
    image = built[kind]
    qmap = qemu_map(image)
    files = host_files_of(image)
    check_stored(_segments(image), qmap, files)
    # Cached pages change nothing (ext4's SEEK_DATA would call them data).
    read_all_files(image.parent)
    check_stored(_segments(image), qmap, files)
    # A preallocated image stores far less than its virtual size ("full" aside).
    stored = sum(e - s for s, e in stored_segments(qmap, files))
    with open_image(image) as img:
        if kind != "full":
            assert stored < img.size // 2, (kind, stored)
        else:
            # preallocation=full writes real zeros: all of qemu's data is stored.
            assert stored == qemu_data_bytes(qmap) > img.size // 2


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_map_command_keeps_qemus_shape_and_values(kind: str, built: dict[str, Path]) -> None:
    image = built[kind]
    ours = json.loads(sparsefs("map", "--output=json", str(image), check=True).stdout)
    theirs = qemu_map(image)
    check_map_agrees([(e["start"], e["start"] + e["length"]) for e in ours if e["data"]], theirs)
    assert {(e["start"], e.get("offset")) for e in ours if e["data"]} >= {
        (e["start"], e.get("offset")) for e in theirs if e["data"] and not e["zero"]
    }
    data_of = {(e["start"], e["length"]): (e["data"], e["depth"]) for e in theirs}
    for e in ours:
        if (e["start"], e["length"]) in data_of:
            assert (e["data"], e["depth"]) == data_of[(e["start"], e["length"])], e


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_checksum_and_verify_read_only_the_data(
    kind: str, built: dict[str, Path], tmp_path: Path
) -> None:
    image = built[kind]
    stored = sum(e - s for s, e in stored_segments(qemu_map(image), host_files_of(image)))
    (record,) = json.loads(sparsefs("checksum", "-q", "--json", str(image), check=True).stdout)
    assert record["bytes-read"] == stored
    ref = qemu_raw(image, tmp_path / "ref.raw")
    (ref_record,) = json.loads(
        sparsefs("checksum", "-q", "--json", "-f", "raw", str(ref), check=True).stdout
    )
    assert record["digest"] == ref_record["digest"]
    assert sparsefs("verify", "-q", str(image), str(ref)).returncode == 0


def test_one_entry_out_of_step_in_a_preallocated_table(tmp_path: Path) -> None:
    """Tables where every entry maps the next cluster are decoded in one step; a single
    entry out of step (here two swapped entries) must still be read exactly."""
    image = qemu_img_create(tmp_path / "swap.qcow2", 8 * MiB, "preallocation=metadata")
    qemu_io(image, "write -q -P 0x11 1M 64k", "write -q -P 0x22 3M 64k")
    data = bytearray(image.read_bytes())
    l1_offset = int.from_bytes(data[40:48], "big")
    l2_offset = int.from_bytes(data[l1_offset : l1_offset + 8], "big") & L2E_OFFSET_MASK
    a, b = l2_offset + 8 * 16, l2_offset + 8 * 48  # the entries of guest 1 MiB and 3 MiB
    data[a : a + 8], data[b : b + 8] = data[b : b + 8], data[a : a + 8]
    image.write_bytes(bytes(data))
    expected = qemu_raw(image, tmp_path / "ref.raw").read_bytes()
    assert expected[MiB : MiB + 1] == b"\x22"  # the swap is visible to qemu too
    with open_image(image) as img:
        assert img.read(0, img.size) == expected
    check_stored(_segments(image), qemu_map(image), host_files_of(image))
