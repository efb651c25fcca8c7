"""Preallocated images through a real mount: holes from the host file reach copiers."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from prealloc_images import BUILDERS, read_all_files
from support import (
    MiB,
    check_stored,
    daemon_pid,
    files_equal,
    host_files_of,
    qemu_img_create,
    qemu_io,
    qemu_map,
    qemu_raw,
    run,
    seek_walk,
    stored_segments,
)

pytestmark = pytest.mark.requires_fuse

Mount = Callable[..., Path]


def _rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_mounted_preallocated_image(kind: str, mount: Mount, tmp_path: Path) -> None:
    d = tmp_path / "img"
    d.mkdir()
    image = BUILDERS[kind](d)
    read_all_files(d)  # even with every page cached, the holes stay holes
    raw = mount(image) / (image.stem + ".raw")
    ref = qemu_raw(image, tmp_path / "ref.raw")
    assert files_equal(raw, ref)
    qmap = qemu_map(image)
    files = host_files_of(image)
    segments = seek_walk(raw)
    check_stored(segments, qmap, files)
    data = sum(e - s for s, e in stored_segments(qmap, files))
    assert abs(os.stat(raw).st_blocks * 512 - data) <= MiB


@pytest.mark.parametrize("mode", ["metadata", "falloc"])
def test_cp_reads_only_the_data(mode: str, mount: Mount, tmp_path: Path) -> None:
    """512 MiB preallocated, 6 MiB written: cp and the daemon read about 6 MiB, not 512."""
    image = qemu_img_create(tmp_path / "disk.qcow2", 512 * MiB, f"preallocation={mode}")
    qemu_io(image, *(f"write -q -P {i + 1} {i * 40 * MiB + 12345} {MiB}" for i in range(6)))
    read_all_files(tmp_path)
    data = sum(e - s for s, e in stored_segments(qemu_map(image), host_files_of(image)))
    assert 6 * MiB <= data <= 6 * MiB + 12 * 64 * 1024  # whole clusters at most
    mp = mount(image)
    raw = mp / "disk.raw"
    assert abs(os.stat(raw).st_blocks * 512 - data) <= MiB
    pid = daemon_pid(mp)
    assert pid is not None
    before = _rchar(pid)
    copy = tmp_path / "copy.raw"
    run(["cp", "--sparse=always", str(raw), str(copy)])
    assert _rchar(pid) - before <= data + 4 * MiB
    assert os.stat(copy).st_blocks * 512 <= data + MiB
    assert files_equal(copy, qemu_raw(image, tmp_path / "ref.raw"))
