"""The whole qcow2 format (issue 3) through a real mount, against qemu.

A representative subset of tests/format_images.py's kinds is mounted: the
mounted file must equal ``qemu-img convert -O raw`` byte for byte, and the
SEEK_DATA/SEEK_HOLE walk of it (what every hole-aware copier sees) must agree
with ``qemu-img map --output=json``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from format_images import (
    Built,
    ImageCache,
    applied_snapshot_copy,
    qemu_convert,
    qemu_map_of,
)
from support import (
    MiB,
    check_stored,
    files_equal,
    first_difference,
    host_files_of,
    is_mounted,
    num,
    qemu_img_create,
    qemu_io,
    seek_walk,
    sparsefs,
)

Mount = Callable[..., Path]
MOUNTED_KINDS = [
    "compressed-zstd",
    "mixed-zlib",
    "chain3-raw-base",
    "extended-l2-overlay",
    "data-file",
    "data-file-raw",
    "compat-0.10",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageCache:
    return ImageCache(tmp_path_factory.mktemp("formats"))


def raw_name(image: Path) -> str:
    return image.name.removesuffix(".qcow2") + ".raw"


def assert_file_is(
    mounted: Path,
    expected: bytes,
    qmap: list[dict[str, object]],
    scratch: Path,
    host_files: list[Path],
) -> None:
    """Mounted bytes equal qemu's, and its SEEK walk agrees with qemu's map."""
    scratch.write_bytes(expected)
    assert files_equal(mounted, scratch), f"differs at {first_difference(mounted, scratch)}"
    segments = seek_walk(mounted)
    check_stored(segments, qmap, host_files)
    # st_blocks counts the data the walk finds, no more (copiers trust it).
    assert os.stat(mounted).st_blocks == (sum(e - s for s, e in segments) + 511) // 512


@pytest.mark.parametrize("kind", MOUNTED_KINDS)
def test_mounted_image_equals_qemu(
    kind: str, images: ImageCache, mount: Mount, tmp_path: Path
) -> None:
    built = images.get(kind)
    mp = mount(built.image)
    assert sorted(os.listdir(mp)) == [raw_name(built.image)]
    expected = qemu_convert(built, tmp_path / "out.raw")
    assert_file_is(
        mp / raw_name(built.image),
        expected,
        qemu_map_of(built),
        tmp_path / "q.raw",
        host_files_of(built.image, cwd=built.cwd),
    )


def test_snapshots_are_files_equal_to_qemu_convert_l(
    images: ImageCache, mount: Mount, tmp_path: Path
) -> None:
    built = images.get("snapshots")
    mp = mount(built.image)
    assert sorted(os.listdir(mp)) == ["disk.raw", "disk@first.raw", "disk@second.raw"]
    assert_file_is(
        mp / "disk.raw",
        qemu_convert(built, tmp_path / "out.raw"),
        qemu_map_of(built),
        tmp_path / "q.raw",
        host_files_of(built.image),
    )
    for snap in built.snapshots:
        # convert -l reads at the current virtual size, zeros past the snapshot's.
        via_l = qemu_convert(built, tmp_path / "out.raw", snapshot=snap)
        copy = applied_snapshot_copy(built, snap, tmp_path / f"applied-{snap}.qcow2")
        size = os.path.getsize(mp / f"disk@{snap}.raw")
        assert size == qemu_map_size(Built(copy))
        assert via_l[size:] == bytes(len(via_l) - size)
        assert_file_is(
            mp / f"disk@{snap}.raw",
            via_l[:size],
            qemu_map_of(Built(copy)),
            tmp_path / "q.raw",
            host_files_of(built.image),
        )


def qemu_map_size(built: Built) -> int:
    entries = qemu_map_of(built)
    return num(entries[-1]["start"]) + num(entries[-1]["length"])


def test_no_snapshots_option_hides_them(images: ImageCache, mount: Mount) -> None:
    mp = mount(images.get("snapshots").image, options=["--no-snapshots"])
    assert os.listdir(mp) == ["disk.raw"]


@pytest.mark.parametrize("kind", ["chain3-raw-base", "extended-l2-overlay"])
def test_no_backing_presents_the_top_layer(
    kind: str, images: ImageCache, mount: Mount, tmp_path: Path
) -> None:
    """--no-backing equals qemu reading the overlay with ``"backing": null``."""
    built = images.get(kind)
    mp = mount(built.image, options=["--no-backing"])
    expected = qemu_convert(built, tmp_path / "out.raw", no_backing=True)
    assert_file_is(
        mp / raw_name(built.image),
        expected,
        qemu_map_of(built, no_backing=True),
        tmp_path / "q.raw",
        host_files_of(built.image, cwd=built.cwd, no_backing=True),
    )


def test_mount_refuses_a_missing_backing_file(tmp_path: Path) -> None:
    base = qemu_img_create(tmp_path / "base.qcow2", MiB)
    top = qemu_img_create(tmp_path / "top.qcow2", MiB, f"backing_file={base}", "backing_fmt=qcow2")
    qemu_io(top, "write -q -P 1 0 64k")
    base.unlink()
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = sparsefs("mount", str(top), str(mp))
    try:
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert str(top) in line, line
        assert str(base) in line, line
        assert "missing" in line, line
        assert not is_mounted(mp)
    finally:
        if is_mounted(mp):
            sparsefs("umount", str(mp))
