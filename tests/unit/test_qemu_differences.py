"""Where sparsefs and QEMU 7.2 answer differently, on the same bytes, and where they agree.

The README's fault section lists each difference with its reason; these tests
hold both sides of it.  Each image is made by qemu-img/qemu-io and patched at
a spot found by tests/hostile_images.py's own parser.  QEMU's side comes live:
``qemu-img convert`` where it reads, ``qemu-img dd`` of single ranges where it
answers EIO for part of the disk.

Kept on purpose (the bytes served are the ones the metadata defines):

- a zero cluster whose unused host offset is not cluster aligned: zeros (QEMU: EIO);
- an extended-L2 cluster with no allocated subcluster and an unaligned host
  offset: what lies below, as for any unallocated subcluster (QEMU: EIO);
- an unaligned snapshot table offset with nb_snapshots 0: the image opens
  (QEMU refuses it).

Matched: a refcount table ending past 2^63 - 1 is refused, as QEMU refuses it.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from hostile_images import HEADER_FIELDS, OFFSET_MASK, ZERO, build_snapshots, locate, qemu_dd_range
from sparsefs.errors import ImageFormatError, ImageReadError
from sparsefs.formats.qcow2 import open_image
from support import KiB, MiB, one_line_error, qemu_img_create, qemu_io, qemu_raw, sparsefs


def patch(path: Path, pos: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(struct.pack(fmt, *values))


def qemu_refuses(image: Path, tmp_path: Path) -> str:
    """Assert ``qemu-img convert`` cannot open ``image``; return its message."""
    proc = subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(image), str(tmp_path / "qemu.raw")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    return proc.stderr


def test_refcount_table_ending_past_2_63_is_refused_like_qemu(tmp_path: Path) -> None:
    path = qemu_img_create(tmp_path / "reftable.qcow2", 2 * MiB)
    qemu_io(path, "write -q -P 0x11 0 64k")
    patch(path, HEADER_FIELDS["refcount_table_offset"][0], ">Q", 0xFFFFFFFFFFFF0000)
    assert "Reference count table offset invalid" in qemu_refuses(path, tmp_path)
    line = one_line_error(sparsefs("info", str(path)), str(path))
    assert line == (
        f"sparsefs: {path}: refcount table at 0xffffffffffff0000 (64 KiB) ends past "
        "the largest file offset qemu accepts (2^63 - 1)"
    )


def test_unaligned_snapshot_offset_without_snapshots_opens(tmp_path: Path) -> None:
    """QEMU refuses the image; sparsefs serves it: with no snapshot, the offset is never used."""
    path = qemu_img_create(tmp_path / "nosnap.qcow2", 2 * MiB)
    qemu_io(path, "write -q -P 0x22 64k 128k")
    expected = qemu_raw(path, tmp_path / "intact.raw").read_bytes()
    patch(path, HEADER_FIELDS["snapshots_offset"][0], ">Q", 0x10200)
    assert locate(path).nb_snapshots == 0
    assert "Snapshot table offset invalid" in qemu_refuses(path, tmp_path)
    with open_image(path) as image:
        assert image.read(0, image.size) == expected
        assert image.snapshots == []
        assert image.snapshot_table_problem is None
    # And with snapshots listed, the table is damaged: the disk is still served.
    snap = build_snapshots(tmp_path)
    expected = qemu_raw(snap, tmp_path / "snap.raw").read_bytes()
    patch(snap, HEADER_FIELDS["snapshots_offset"][0], ">Q", locate(snap).snapshots_offset + 512)
    assert "Snapshot table offset invalid" in qemu_refuses(snap, tmp_path)
    with open_image(snap) as image:
        assert image.read(0, image.size) == expected
        assert image.snapshot_table_problem is not None


def _check_kept_difference(
    image: Path, sibling: Path, guest_offset: int, length: int, tmp_path: Path
) -> None:
    """sparsefs serves ``image`` exactly as QEMU serves ``sibling`` (the same image with the
    unused host offset made valid); QEMU answers EIO for ``[guest_offset, +length)`` of
    ``image`` and the same bytes as sparsefs for the ranges around it."""
    expected = qemu_raw(sibling, tmp_path / "sibling.raw").read_bytes()
    assert qemu_dd_range(image, guest_offset, length, tmp_path) is None
    with open_image(image) as img:
        assert img.read(0, img.size) == expected
        for off in (guest_offset - length, guest_offset + length):
            if 0 <= off < img.size:
                assert qemu_dd_range(image, off, length, tmp_path) == img.read(off, length)
        # What sparsefs serves there is what the metadata defines, not a guess.
        assert img.read(guest_offset, length) == expected[guest_offset : guest_offset + length]


def test_zero_cluster_with_unaligned_unused_offset_reads_as_zeros(tmp_path: Path) -> None:
    base = qemu_img_create(tmp_path / "base.qcow2", 2 * MiB, "cluster_size=4096")
    qemu_io(base, "write -q -P 0x33 0 1M")
    path = qemu_img_create(
        tmp_path / "zero.qcow2",
        2 * MiB,
        "cluster_size=4096",
        f"backing_file={base.name}",
        "backing_fmt=qcow2",
    )
    # Data, then zeros written over it: the clusters keep their host offsets (ZERO_ALLOC).
    qemu_io(path, "write -q -P 0x44 0 64k", "write -q -z 16k 16k")
    loc = locate(path)
    entry = next(e for e in loc.l2_entries if e.value & ZERO and e.value & OFFSET_MASK)
    sibling = tmp_path / "sibling.qcow2"
    sibling.write_bytes(path.read_bytes())
    patch(path, entry.pos, ">Q", entry.value + 0x200)  # host offset no longer aligned
    _check_kept_difference(path, sibling, entry.guest_offset, loc.cluster_size, tmp_path)
    with open_image(path) as img:
        assert img.read(entry.guest_offset, loc.cluster_size) == bytes(loc.cluster_size)


def test_extended_l2_cluster_without_allocated_subcluster_reads_below(tmp_path: Path) -> None:
    base = qemu_img_create(tmp_path / "base.qcow2", 2 * MiB)
    qemu_io(base, "write -q -P 0x55 0 2M")
    path = qemu_img_create(
        tmp_path / "extl2.qcow2",
        2 * MiB,
        "extended_l2=on",
        "cluster_size=65536",
        f"backing_file={base.name}",
        "backing_fmt=qcow2",
    )
    qemu_io(path, "write -q -P 0x66 0 64k", "write -q -P 0x77 128k 8k")
    loc = locate(path)
    entry = next(e for e in loc.l2_entries if e.guest_offset == 128 * KiB)
    assert entry.bitmap
    assert entry.value & OFFSET_MASK
    # The sibling: the same cluster with no allocated subcluster and no host offset.
    sibling = tmp_path / "sibling.qcow2"
    sibling.write_bytes(path.read_bytes())
    patch(sibling, entry.pos, ">QQ", 0, 0)
    # The image: a host offset that is not aligned, and no subcluster allocated.
    patch(path, entry.pos, ">QQ", entry.value + 0x200, 0)
    _check_kept_difference(path, sibling, entry.guest_offset, loc.cluster_size, tmp_path)
    with open_image(path) as img:
        assert img.read(entry.guest_offset, 8 * KiB) == b"\x55" * (8 * KiB)


def test_l2_table_running_past_the_end_names_the_exact_range(tmp_path: Path) -> None:
    """An L1 entry pointing at the L1 table itself, which starts inside the file but ends
    past it: EIO for that table's range, and the message says exactly that."""
    path = qemu_img_create(tmp_path / "self.qcow2", 2 * MiB)
    loc = locate(path)
    assert loc.l1_table_offset < loc.file_size < loc.l1_table_offset + loc.cluster_size
    patch(path, loc.l1_table_offset, ">Q", (1 << 63) | loc.l1_table_offset)
    with open_image(path) as image, pytest.raises(ImageReadError) as info:
        image.read(0, 4096)
    assert str(info.value) == (
        f"{path}: L2 table at {loc.l1_table_offset:#x} (64 KiB) runs past "
        f"the end of the file ({loc.file_size:#x})"
    )
    # Past the end altogether: "is past".
    patch(path, loc.l1_table_offset, ">Q", (1 << 63) | (loc.l1_table_offset + loc.cluster_size))
    with open_image(path) as image, pytest.raises(ImageReadError) as info:
        image.read(0, 4096)
    assert str(info.value) == (
        f"{path}: L2 table at {loc.l1_table_offset + loc.cluster_size:#x} "
        f"(64 KiB) is past the end of the file ({loc.file_size:#x})"
    )


def test_active_l1_past_the_end_is_refused(tmp_path: Path) -> None:
    """QEMU reads the missing L1 entries as zeros (unallocated), serving zeros for the data
    the table mapped; sparsefs refuses the image rather than serve them."""
    path = qemu_img_create(tmp_path / "l1.qcow2", 2 * MiB)
    qemu_io(path, "write -q -P 0x11 0 64k")
    intact = qemu_raw(path, tmp_path / "intact.raw").read_bytes()
    loc = locate(path)
    end = -(-loc.file_size // loc.cluster_size) * loc.cluster_size
    patch(path, HEADER_FIELDS["l1_table_offset"][0], ">Q", end)
    qemu = qemu_raw(path, tmp_path / "qemu.raw").read_bytes()
    assert qemu == bytes(len(intact)) != intact
    with pytest.raises(ImageFormatError) as info:
        open_image(path)
    assert str(info.value) == (
        f"{path}: active L1 table at {end:#x} (8 bytes) is past the end "
        f"of the file ({loc.file_size:#x})"
    )
