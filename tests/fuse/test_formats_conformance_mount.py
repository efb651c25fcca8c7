"""One image per format mounted at once, then verify and backup of non-qcow2 images.

Each mounted file is named NAME.raw after the image's name without its
format suffix, equals qemu's raw copy, and its SEEK_DATA/SEEK_HOLE walk
agrees with qemu-img map (tests/format_builders.py holds the images and
their oracles).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from format_builders import FmtCache
from points_support import latest_file
from support import check_map_agrees, files_equal, first_difference, seek_walk, sparsefs

Mount = Callable[..., Path]
# kind -> the file name it gets in the mount (stems are unique across these kinds)
MOUNTED = {
    "vpc-differencing": "child.raw",
    "vpc-fixed": "fixed.raw",
    "vhdx-dynamic": "dynamic.raw",
    "vdi-static": "static.raw",
    "raw-sparse": "sparse.raw",
    "qcow2-over-vdi": "top.raw",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> FmtCache:
    return FmtCache(tmp_path_factory.mktemp("fmt-mount"))


def test_one_image_per_format_mounted(built: FmtCache, mount: Mount) -> None:
    images = {kind: built[kind] for kind in MOUNTED}
    mp = mount(*(img.image for img in images.values()))
    assert sorted(os.listdir(mp)) == sorted(MOUNTED.values())
    for kind, img in images.items():
        mounted = mp / MOUNTED[kind]
        assert files_equal(mounted, img.expected), (
            f"{kind}: differs at {first_difference(mounted, img.expected)}"
        )
        segments = seek_walk(mounted)
        check_map_agrees(segments, img.qmap)
        assert os.stat(mounted).st_blocks == (sum(e - s for s, e in segments) + 511) // 512


def test_verify_and_backup_of_vhd_and_vdi(built: FmtCache, tmp_path: Path) -> None:
    vhd, vdi = built["vpc-dynamic"], built["vdi-dynamic"]
    for img in (vhd, vdi):
        proc = sparsefs("verify", "-q", str(img.image), str(img.expected))
        assert proc.returncode == 0, proc.stderr
    dest = tmp_path / "backup"
    dest.mkdir()
    proc = sparsefs("backup", "--quiet", str(vhd.image), str(dest))
    assert proc.returncode == 0, proc.stderr
    assert files_equal(latest_file(dest, "dyn"), vhd.expected)
    out = sparsefs("checksum", "--check", "SPARSEFS-SUMS", cwd=dest, check=True).stdout
    assert out.count(": OK") == 1
