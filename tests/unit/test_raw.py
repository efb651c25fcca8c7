"""RawFile: a raw file as a source (raw backing files, data files, copies)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparsefs.errors import ImageReadError, UnsupportedFeatureError
from sparsefs.formats.qcow2 import open_image
from sparsefs.raw import RawFile
from support import KiB, MiB, check_stored, make_image, qemu_map


def test_holes_from_seek_data(tmp_path: Path) -> None:
    p = tmp_path / "sparse.raw"
    with open(p, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"x" * 64 * KiB)
        f.seek(5 * MiB)
        f.write(b"y" * 128 * KiB)
    with RawFile(p) as raw:
        data = [(e.guest_offset, e.end) for e in raw.iter_extents() if e.data]
        assert data == [(MiB, MiB + 64 * KiB), (5 * MiB, 5 * MiB + 128 * KiB)]
        check_stored(data, qemu_map(p, fmt="raw"), [p])
        assert raw.read(MiB - 1, 3) == b"\0xx"


def test_reads_past_the_opened_size_are_zeros(tmp_path: Path) -> None:
    p = tmp_path / "short.raw"
    p.write_bytes(b"a" * 1000)
    with RawFile(p, size=4096) as raw:
        assert raw.read(900, 300) == b"a" * 100 + bytes(200)
        assert [(e.data, e.guest_offset, e.end) for e in raw.iter_extents()] == [
            (True, 0, 1000),
            (False, 1000, 4096),
        ]


def test_a_file_that_shrinks_while_open_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "base.raw"
    p.write_bytes(os.urandom(2 * MiB))
    with RawFile(p) as raw:
        os.truncate(p, MiB)
        assert len(raw.read(0, 4096)) == 4096
        with pytest.raises(ImageReadError, match="shrank"):
            raw.read(MiB + 4096, 4096)


def test_raw_backing_truncated_under_an_overlay_gives_eio(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(4 * MiB))
    top = make_image(
        tmp_path / "top.qcow2",
        4 * MiB,
        seed=1,
        writes=2,
        zero_writes=0,
        discards=0,
        backing=str(base),
        backing_fmt="raw",
        max_len=64 * KiB,
    )
    with open_image(top) as img:
        whole = img.read(0, img.size)
        os.truncate(base, MiB)
        # What the base still holds reads as before; what it lost is EIO, never zeros.
        assert img.read(0, MiB) == whole[:MiB]
        with pytest.raises(ImageReadError):
            img.read(2 * MiB, img.size - 2 * MiB)


def test_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UnsupportedFeatureError, match="not a regular file"):
        RawFile(fifo)
