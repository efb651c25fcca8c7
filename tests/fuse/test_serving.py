"""How the mount serves reads: direct I/O by default, the page cache with --readahead.

Bytes come from ``qemu-img convert -O raw``, holes from ``qemu-img map``.
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import time
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


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 MiB image, three quarters data."""
    path = qemu_img_create(tmp_path_factory.mktemp("dense") / "dense.qcow2", 32 * MiB)
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -q -P 0x5a 0 24M",
            "-c",
            "write -q -P 0x17 4M 1M",
            str(path),
        ],
        check=True,
        capture_output=True,
    )
    return path


def test_shared_maps_need_the_page_cache(tmp_path: Path, dense: Path, mount: Mount) -> None:
    """Even a mostly-data file is direct_io by default: a shared map fails with ENODEV,
    as documented; with --readahead it works and the bytes are qemu's."""
    want = qemu_raw(dense, tmp_path / "dense.ref.raw").read_bytes()
    for options, shared_ok in (((), False), (("--readahead", "256"), True)):
        raw = mount(dense, options=options) / "dense.raw"
        assert raw.read_bytes() == want
        fd = os.open(raw, os.O_RDONLY)
        try:
            if not shared_ok:
                with pytest.raises(OSError) as exc:
                    mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                assert exc.value.errno == errno.ENODEV
                continue
            with mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
                assert m[:] == want
        finally:
            os.close(fd)


@pytest.mark.parametrize("poll", ["0", "100", "5000"])
def test_busy_poll_window_serves_the_same_bytes(
    image: Path, reference: Path, mount: Mount, tmp_path: Path, poll: str
) -> None:
    """cp and cat through mounts with polling off, the default window and a large one."""
    raw = mount(image, options=("--busy-poll", poll)) / "disk.raw"
    copy = tmp_path / "copy.raw"
    subprocess.run(["cp", "--sparse=always", str(raw), str(copy)], check=True)
    assert files_equal(copy, reference)
    out = subprocess.run(["cat", str(raw)], capture_output=True, check=True).stdout
    assert out == reference.read_bytes()


def _daemon_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_mount_does_not_poll(image: Path, mount: Mount) -> None:
    """After a burst of reads, a daemon with a large polling window goes to sleep:
    over one idle second it uses (almost) no CPU."""
    mp = mount(image, options=("--busy-poll", "50000"))  # 50 ms
    pid = daemon_pid(mp)
    assert pid is not None
    fd = os.open(mp / "disk.raw", os.O_RDONLY)
    try:
        for _ in range(3):  # bursts with idle gaps: the window shrinks after each
            for off in range(0, 8 * MiB, 128 * KiB):
                os.pread(fd, 128 * KiB, off)
            time.sleep(0.2)
        before = _daemon_cpu_s(pid)
        time.sleep(1.0)
        idle = _daemon_cpu_s(pid) - before
    finally:
        os.close(fd)
    assert idle < 0.1, f"the daemon used {idle:.2f} s of CPU while idle for 1 s"
