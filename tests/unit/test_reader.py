"""The qcow2 reader without FUSE: bytes and hole map against qemu, for the common case.

Images: random data at random offsets, zero writes, discards; several cluster
sizes; a virtual size that is not cluster aligned.  The oracle is qemu-img
convert -O raw (bytes) and qemu-img map --output=json (holes).
"""

from __future__ import annotations

import itertools
import json
import random
import struct
from pathlib import Path

import pytest

from sparsefs import layered
from sparsefs.errors import ImageFormatError, ImageReadError, MissingFileError
from sparsefs.extents import seek_data, seek_hole
from sparsefs.formats.qcow2 import open_image
from support import (
    KiB,
    MiB,
    check_map_agrees,
    check_stored,
    host_files_of,
    make_image,
    num,
    qemu_compress,
    qemu_img_create,
    qemu_io,
    qemu_map,
    qemu_raw,
    sparsefs,
)

# (cluster size, virtual size): the last two are not multiples of the cluster size.
CASES = [
    (512, 3 * MiB + 512),
    (4 * KiB, 8 * MiB),
    (64 * KiB, 64 * MiB + 12345),
    (2 * MiB, 37 * MiB + 7 * 512 + 3),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"cluster{c[0]}-size{c[1]}")
def image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cluster_size, size = request.param
    path = tmp_path_factory.mktemp("img") / "disk.qcow2"
    make_image(
        path,
        size,
        seed=cluster_size,
        options=[f"cluster_size={cluster_size}"],
        writes=30,
        zero_writes=6,
        discards=6,
        max_len=min(size // 8, 512 * KiB),
    )
    return path


def test_read_equals_qemu_convert(image: Path, tmp_path: Path) -> None:
    expected = qemu_raw(image, tmp_path / "ref.raw").read_bytes()
    with open_image(image) as img:
        assert img.size == len(expected)
        # Whole, then in odd-sized chunks that straddle cluster boundaries.
        assert img.read(0, img.size) == expected
        rng = random.Random(1)
        pos = 0
        while pos < img.size:
            n = rng.randrange(1, 300 * KiB)
            assert img.read(pos, n) == expected[pos : pos + n], f"read({pos}, {n})"
            pos += n
        assert img.read(img.size, 10) == b""
        assert img.read(img.size - 1, 10) == expected[-1:]


def test_extents_agree_with_qemu_map(image: Path) -> None:
    qmap = qemu_map(image)
    with open_image(image) as img:
        extents = list(img.iter_extents())
        segments = [(e.guest_offset, e.end) for e in extents if e.data]
        assert extents[0].guest_offset == 0
        assert extents[-1].end == img.size
        for a, b in itertools.pairwise(extents):
            assert a.end == b.guest_offset
    check_stored(segments, qmap, host_files_of(image))


def test_holes_read_as_zeros(image: Path) -> None:
    with open_image(image) as img:
        for ext in img.iter_extents():
            if not ext.data:
                assert img.read(ext.guest_offset, ext.length) == bytes(ext.length)


def test_seek_walk_from_every_extent_boundary(image: Path) -> None:
    with open_image(image) as img:
        extents = list(img.iter_extents())
        for ext in extents:
            for off in (ext.guest_offset, ext.guest_offset + ext.length // 2):
                d = seek_data(img, off)
                h = seek_hole(img, off)
                if ext.data:
                    assert d == off
                    assert h == ext.end
                else:
                    assert h == off
                    nxt = [e for e in extents if e.data and e.guest_offset > off]
                    assert d == (nxt[0].guest_offset if nxt else None)


def test_map_command_matches_qemu_map(image: Path) -> None:
    proc = sparsefs("map", "--output=json", str(image), check=True)
    ours = json.loads(proc.stdout)
    segments = [(e["start"], e["start"] + e["length"]) for e in ours if e["data"]]
    check_map_agrees(segments, qemu_map(image))
    theirs = qemu_map(image)
    # Same coverage and same offsets where qemu names them.
    assert sum(e["length"] for e in ours) == sum(num(e["length"]) for e in theirs)
    assert {(e["start"], e.get("offset")) for e in ours if e["data"]} == {
        (e["start"], e.get("offset")) for e in theirs if e["data"]
    }


def test_allocated_zero_data_stays_data(tmp_path: Path) -> None:
    """A cluster written with zero bytes (not with write -z) is data, as qemu-img map says."""
    path = tmp_path / "z.qcow2"
    make_image(path, 4 * MiB, seed=7, writes=0, zero_writes=0, discards=0)
    qemu_io(path, "write -q -P 0 1M 128k")
    qmap = qemu_map(path)
    with open_image(path) as img:
        segments = [(e.guest_offset, e.end) for e in img.iter_extents() if e.data]
    assert segments == [(MiB, MiB + 128 * KiB)]
    check_stored(segments, qmap, host_files_of(path))


# -- bad input -------------------------------------------------------------------------


def test_not_qcow2(tmp_path: Path) -> None:
    p = tmp_path / "plain.img"
    p.write_bytes(b"hello" * 1000)
    with pytest.raises(ImageFormatError, match=r"plain\.img: not a qcow2 image"):
        open_image(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"nope\.qcow2"):
        open_image(tmp_path / "nope.qcow2")


@pytest.mark.parametrize("length", [4, 50, 80])
def test_truncated_header(tmp_path: Path, length: int) -> None:
    good = make_image(tmp_path / "g.qcow2", MiB, seed=1, writes=1, zero_writes=0, discards=0)
    bad = tmp_path / "t.qcow2"
    bad.write_bytes(good.read_bytes()[:length])
    with pytest.raises(ImageFormatError, match=r"t\.qcow2"):
        open_image(bad)


def _l1_offset(path: Path) -> int:
    offset: int = struct.unpack_from(">Q", path.read_bytes(), 40)[0]
    return offset


def test_l2_table_past_eof_gives_read_error_for_that_range_only(tmp_path: Path) -> None:
    """One L1 entry pointing past the end of the file: EIO there, the rest is served."""
    path = tmp_path / "broken.qcow2"
    # 64 KiB clusters: one L2 table covers 512 MiB; use two tables' worth of data.
    make_image(path, 1024 * MiB, seed=3, writes=0, zero_writes=0, discards=0)
    qemu_io(path, "write -q -P 0x5a 0 1M", "write -q -P 0x6b 600M 1M")
    good = qemu_raw(path, tmp_path / "good.raw")
    with open(path, "r+b") as f:
        f.seek(_l1_offset(path) + 8)  # L1 entry 1: guest [512 MiB, 1 GiB)
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
    with open_image(path) as img:
        with open(good, "rb") as ref:
            assert img.read(0, MiB) == ref.read(MiB)
        with pytest.raises(ImageReadError, match="past the end of the file"):
            img.read(600 * MiB, 4096)
        # Broken ranges count as data so that copiers fail instead of skipping them.
        assert seek_data(img, 512 * MiB) == 512 * MiB


def test_read_nowait_never_reads_an_l2_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An L2 table not yet decoded means "ask a thread" (None), never a read from disk."""
    path = qemu_img_create(tmp_path / "disk.qcow2", 8 * MiB)
    qemu_io(path, "write -P 0x5a 1M 64k")
    expected = qemu_raw(path, tmp_path / "ref.raw").read_bytes()[MiB : MiB + 64 * KiB]
    with open_image(path) as img:
        qfile = img.qfile

        def no_disk(l1_entry: int) -> object:
            raise AssertionError("read_nowait decoded an L2 table")

        with monkeypatch.context() as patch:
            patch.setattr(qfile, "table_runs", no_disk)
            assert img.read_nowait(MiB, 64 * KiB) is None
            assert img.read_nowait(4 * MiB, 64 * KiB) is None  # a hole, but unknown yet
        assert img.read(MiB, 64 * KiB) == expected  # decodes and caches the table
        hole = img.read_nowait(4 * MiB, 64 * KiB)  # now known to be a hole: no I/O needed
        assert hole is not None
        assert bytes(hole) == bytes(64 * KiB)
        if layered._nowait_ok[0]:  # the host file was just read: in the page cache
            got = img.read_nowait(MiB, 64 * KiB)
            assert got is not None
            assert bytes(got) == expected


def test_read_nowait_serves_compressed_clusters_from_the_cache_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = qemu_img_create(tmp_path / "plain.qcow2", 4 * MiB)
    qemu_io(plain, "write -P 0x33 64k 128k")
    path = qemu_compress(plain, tmp_path / "packed.qcow2")
    expected = qemu_raw(path, tmp_path / "ref.raw").read_bytes()[64 * KiB : 192 * KiB]
    with open_image(path) as img:
        list(img.iter_extents(0))  # the L2 table is decoded and cached
        qfile = img.qfile

        def no_disk(descriptor: tuple[int, int]) -> bytes:
            raise AssertionError("read_nowait decompressed a cluster")

        with monkeypatch.context() as patch:
            patch.setattr(qfile, "decompress", no_disk)
            assert img.read_nowait(64 * KiB, 128 * KiB) is None
        assert img.read(64 * KiB, 128 * KiB) == expected
        if layered._nowait_ok[0]:
            got = img.read_nowait(64 * KiB, 128 * KiB)
            assert got is not None
            assert bytes(got) == expected
