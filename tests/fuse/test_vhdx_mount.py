"""VHDX through a real mount: bytes, SEEK walk, st_blocks, EIO for a broken block, backup.

The images come from tests/vhdx_images.py (qemu-made, or built by the spec
where qemu cannot: differencing disks).  qemu's vhdx driver has no block
status, so the SEEK walk is checked against the in-process extents (which
test_vhdx.py checks against the writes) and every hole against qemu's bytes.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import vhdx_images as V
from points_support import latest_file
from sparsefs.formats.vhdx import layout as L
from sparsefs.formats.vhdx import open_image
from sparsefs.options import OpenOptions
from support import MiB, files_equal, first_difference, qemu_raw, run, seek_walk, sparsefs

Mount = Callable[..., Path]


def _expected(b: V.VhdxBuilt, d: Path) -> Path:
    return b.expected or qemu_raw(b.qemu_image, d / "expected.raw", fmt="vhdx")


def _in_process_segments(image: Path) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    with open_image(image, OpenOptions()) as source:
        for ext in source.iter_extents(0):
            if not ext.data:
                continue
            if out and out[-1][1] == ext.guest_offset:
                out[-1] = (out[-1][0], ext.end)
            else:
                out.append((ext.guest_offset, ext.end))
    return out


@pytest.mark.parametrize("kind", ["dynamic", "fixed", "sector_4k", "differencing"])
def test_mounted_vhdx_equals_qemu(kind: str, tmp_path: Path, mount: Mount) -> None:
    """The mounted NAME.raw equals the expected bytes; its SEEK walk is the extent map."""
    d = tmp_path / "img"
    d.mkdir()
    b = V.ALL_BUILDERS[kind](d)
    expected = _expected(b, tmp_path)
    mp = mount(b.image)
    mounted = mp / (b.image.stem + ".raw")
    assert files_equal(mounted, expected), f"differs at {first_difference(mounted, expected)}"
    segments = seek_walk(mounted)
    assert segments == _in_process_segments(b.image)
    data = expected.read_bytes()
    pos = 0
    for s, e in [*segments, (len(data), len(data))]:
        assert data[pos:s].count(0) == s - pos, f"hole [{pos}, {s}) is not zero in qemu's copy"
        pos = e
    assert os.stat(mounted).st_blocks == (sum(e - s for s, e in segments) + 511) // 512
    # cp through the mount makes the same bytes
    copy = tmp_path / "copy.raw"
    run(["cp", "--sparse=always", str(mounted), str(copy)])
    assert files_equal(copy, expected)
    proc = sparsefs("verify", str(b.image), str(expected))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_broken_block_is_eio_for_that_block_only(tmp_path: Path, mount: Mount) -> None:
    """A BAT entry pointing past the end of the file: EIO there, the rest reads."""
    d = tmp_path / "img"
    d.mkdir()
    b = V.ALL_BUILDERS["not_present"](d)
    expected = _expected(b, tmp_path).read_bytes()
    buf = b.image.read_bytes()
    block = next(i for i in range(12) if V.get_bat(buf, i)[0] == L.PAYLOAD_BLOCK_FULLY_PRESENT)
    V.edit(b.image, lambda x: V.set_bat(x, block, L.PAYLOAD_BLOCK_FULLY_PRESENT, 1 << 40))
    mp = mount(b.image)
    mounted = mp / (b.image.stem + ".raw")
    fd = os.open(mounted, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="Input/output error") as exc:
            os.pread(fd, 4096, block * MiB)
        assert exc.value.errno == errno.EIO
        for other in range(len(expected) // MiB):
            if other != block:
                got = os.pread(fd, MiB, other * MiB)
                assert got == expected[other * MiB : (other + 1) * MiB], other
    finally:
        os.close(fd)


def test_backup_of_vhdx(tmp_path: Path) -> None:
    """sparsefs backup copies a dynamic and a differencing VHDX to raw files equal to qemu's."""
    dyn_dir = tmp_path / "dyn"
    diff_dir = tmp_path / "diff"
    dyn_dir.mkdir()
    diff_dir.mkdir()
    dyn = V.ALL_BUILDERS["dynamic"](dyn_dir)
    diff = V.ALL_BUILDERS["differencing"](diff_dir)
    dest = tmp_path / "dest"
    dest.mkdir()
    proc = sparsefs("backup", "-q", str(dyn.image), str(diff.image), str(dest))
    assert proc.returncode == 0, proc.stderr
    for b in (dyn, diff):
        copy = latest_file(dest, b.image.stem)
        assert files_equal(copy, _expected(b, b.image.parent)), b.image
    assert (dest / "SPARSEFS-SUMS").exists()
    shutil.rmtree(dest)
