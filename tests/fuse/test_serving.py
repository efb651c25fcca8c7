"""How the mount serves reads: direct I/O by default, the page cache with --readahead.

Bytes come from ``qemu-img convert -O raw``, holes from ``qemu-img map``.
"""

from __future__ import annotations

import mmap
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from support import (
    KiB,
    MiB,
    check_stored,
    daemon_pid,
    files_equal,
    host_files_of,
    make_image,
    qemu_data_bytes,
    qemu_img_create,
    qemu_map,
    qemu_raw,
    seek_walk,
)

Mount = Callable[..., Path]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serving") / "disk.qcow2"
    return make_image(path, 512 * MiB, seed=31, writes=40, zero_writes=6, discards=6, max_len=MiB)


@pytest.fixture(scope="module")
def reference(image: Path) -> Path:
    return qemu_raw(image, image.with_suffix(".ref.raw"))


def _daemon_rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["rchar"])


@pytest.mark.parametrize("options", [(), ("--readahead", "256")], ids=["direct", "page-cache"])
def test_both_modes_serve_qemu_bytes_and_map(
    image: Path, reference: Path, mount: Mount, tmp_path: Path, options: tuple[str, ...]
) -> None:
    raw = mount(image, options=options) / "disk.raw"
    check_stored(seek_walk(raw), qemu_map(image), host_files_of(image))
    copy = tmp_path / "copy.raw"
    subprocess.run(["cp", "--sparse=always", str(raw), str(copy)], check=True)
    assert files_equal(copy, reference)
    out = subprocess.run(["cat", str(raw)], capture_output=True, check=True).stdout
    assert out == reference.read_bytes()


def test_cat_reads_holes_without_reading_the_image(
    image: Path, reference: Path, mount: Mount
) -> None:
    """A full-stream reader gets every hole, yet the daemon reads about the data alone."""
    mp = mount(image)
    pid = daemon_pid(mp)
    assert pid is not None
    before = _daemon_rchar(pid)
    digest = subprocess.run(
        f"cat '{mp / 'disk.raw'}' | sha256sum", shell=True, capture_output=True, check=True
    ).stdout.split()[0]
    daemon_read = _daemon_rchar(pid) - before
    expect = subprocess.run(["sha256sum", str(reference)], capture_output=True, check=True)
    assert digest == expect.stdout.split()[0]
    # Image data, plus FUSE request headers (one per request of up to 1 MiB).
    assert daemon_read <= qemu_data_bytes(qemu_map(image)) + 2 * MiB, daemon_read


def test_private_map_reads_the_bytes(image: Path, reference: Path, mount: Mount) -> None:
    """direct_io allows private maps (shared ones get ENODEV, as documented)."""
    raw = mount(image) / "disk.raw"
    want = reference.read_bytes()
    fd = os.open(raw, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as m:
            for off in range(0, len(want), 37 * MiB + 4 * KiB):
                assert m[off : off + 64 * KiB] == want[off : off + 64 * KiB]
    finally:
        os.close(fd)


def test_mostly_data_file_goes_through_the_page_cache(tmp_path: Path, mount: Mount) -> None:
    """A file at least half data is not direct_io: a shared map works and the bytes are qemu's."""
    dense = tmp_path / "dense.qcow2"
    qemu_img_create(dense, 32 * MiB)
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -q -P 0x5a 0 24M",
            "-c",
            "write -q -P 0x17 4M 1M",
            str(dense),
        ],
        check=True,
        capture_output=True,
    )
    want = qemu_raw(dense, tmp_path / "dense.ref.raw").read_bytes()
    raw = mount(dense) / "dense.raw"
    assert raw.read_bytes() == want
    fd = os.open(raw, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
            assert m[:] == want
    finally:
        os.close(fd)
