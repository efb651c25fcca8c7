"""VMDK through a real mount and the CLI, against qemu (issue 13's "done when" for VMDK).

Mounted files equal ``qemu-img convert -f vmdk -O raw`` byte for byte, read
whole and in odd chunks; their SEEK walk agrees with ``qemu-img map``;
``checksum`` equals that of qemu's raw copy; ``verify`` accepts qemu's copy;
``backup`` makes a copy with qemu's content.  The 3 GiB split image is
compared by checksum (holes cost nothing), not byte by byte.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from points_support import latest_file
from support import (
    check_map_agrees,
    files_equal,
    first_difference,
    one_line_error,
    qemu_img_create,
    qemu_io,
    qemu_map,
    qemu_raw,
    run,
    seek_walk,
    sparsefs,
)
from vmdk_images import BUILDERS

Mount = Callable[..., Path]
MOUNTED = [
    "streamOptimized-footer",
    "delta-chain",
    "mixed-descriptor",
    "zeroedGrain",
    "monolithicFlat",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vmdk-mount")
    out = {}
    for name in [*MOUNTED, "twoGbMaxExtentSparse"]:
        sub = root / name
        sub.mkdir()
        out[name] = BUILDERS[name](sub)
    return out


def _stem(image: Path) -> str:
    return image.name.removesuffix(".vmdk")


def _checksum(path: Path, *args: str) -> str:
    proc = sparsefs("checksum", *args, str(path), check=True)
    return proc.stdout.split()[0]


@pytest.mark.parametrize("kind", MOUNTED)
def test_mounted_equals_qemu(
    images: dict[str, Path], kind: str, mount: Mount, tmp_path: Path
) -> None:
    """Bytes (whole and odd chunks), SEEK walk, st_blocks, checksum, verify: as qemu's copy."""
    image = images[kind]
    want = qemu_raw(image, tmp_path / "want.raw", fmt="vmdk")
    mp = mount(image)
    mounted = mp / f"{_stem(image)}.raw"
    assert files_equal(mounted, want), f"differs at {first_difference(mounted, want)}"
    data = want.read_bytes()
    with open(mounted, "rb") as f:
        pos = 0
        while chunk := f.read(77_777):
            assert chunk == data[pos : pos + len(chunk)], f"chunk at {pos} differs"
            pos += len(chunk)
    segments = seek_walk(mounted)
    check_map_agrees(segments, qemu_map(image, fmt="vmdk"))
    assert os.stat(mounted).st_blocks == (sum(e - s for s, e in segments) + 511) // 512
    assert _checksum(image) == _checksum(want, "-f", "raw")
    sparsefs("verify", str(image), str(want), check=True)


def test_split_image_over_2gib(images: dict[str, Path], mount: Mount, tmp_path: Path) -> None:
    """The 3 GiB twoGbMaxExtentSparse mount: walk as qemu's map, sparse copy as qemu's bytes."""
    image = images["twoGbMaxExtentSparse"]
    want = qemu_raw(image, tmp_path / "want.raw", fmt="vmdk")
    mounted = mount(image) / f"{_stem(image)}.raw"
    assert os.path.getsize(mounted) == os.path.getsize(want) > 2 << 30
    segments = seek_walk(mounted)
    check_map_agrees(segments, qemu_map(image, fmt="vmdk"))
    copy = tmp_path / "copy.raw"
    run(["cp", "--sparse=always", str(mounted), str(copy)])
    assert _checksum(copy, "-f", "raw") == _checksum(want, "-f", "raw") == _checksum(image)


@pytest.mark.parametrize("kind", ["streamOptimized-footer", "delta-chain"])
def test_backup(images: dict[str, Path], kind: str, tmp_path: Path) -> None:
    """``sparsefs backup`` of a VMDK writes a full point with qemu's content and verifies it."""
    image = images[kind]
    dest = tmp_path / "dest"
    dest.mkdir()
    sparsefs("backup", "-q", str(image), str(dest), check=True)
    want = qemu_raw(image, tmp_path / "want.raw", fmt="vmdk")
    assert files_equal(latest_file(dest, _stem(image)), want)


def test_cli_refusal_is_one_line(tmp_path: Path) -> None:
    """A descriptor naming a missing extent: one line naming the file, exit non-zero."""
    desc = tmp_path / "broken.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n# Extent description\n'
        'RW 2048 FLAT "gone-flat.vmdk" 0\n'
    )
    for command in ("info", "checksum", "map"):
        one_line_error(sparsefs(command, str(desc)), str(desc), "gone-flat.vmdk", "missing")


def test_bad_grain_is_eio_through_the_mount(mount: Mount, tmp_path: Path) -> None:
    """A grain table entry pointing outside the file: EIO for that grain, the rest reads."""
    image = qemu_img_create(tmp_path / "g.vmdk", 1 << 20, fmt="vmdk")
    qemu_io(image, "write -P 1 0 64k", "write -P 2 64k 64k", "write -P 3 128k 64k", fmt="vmdk")
    buf = bytearray(image.read_bytes())
    (gd,) = struct.unpack_from("<Q", buf, 56)
    (gt,) = struct.unpack_from("<I", buf, gd * 512)
    struct.pack_into("<I", buf, gt * 512 + 4, 0x7FFF_0000)
    image.write_bytes(bytes(buf))
    mounted = mount(image) / "g.raw"
    fd = os.open(mounted, os.O_RDONLY)
    try:
        assert os.pread(fd, 65536, 0) == b"\1" * 65536
        with pytest.raises(OSError, match="Input/output error") as info:
            os.pread(fd, 4096, 65536)
        assert info.value.errno == errno.EIO
        assert os.pread(fd, 65536, 131072) == b"\3" * 65536
    finally:
        os.close(fd)
