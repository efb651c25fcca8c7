"""RawFile.pread_into_uncached: exact bytes whether the page cache holds them or not.

Bulk readers (backup, checksum, verify) read cold ranges with O_DIRECT
through an aligned buffer and cached ones from the cache; both must give
the bytes a plain read gives, at any offset and length, with the same rule
at the end of the file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from sparsefs import raw as raw_module
from sparsefs.errors import ImageReadError
from sparsefs.raw import RawFile

MIB = 1024 * 1024


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    rng = random.Random(7)
    data = rng.randbytes(3 * MIB + 12345)  # not a multiple of the page size
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def _read(raw: RawFile, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    with memoryview(buf) as view:
        raw.pread_into_uncached(view, offset)
    return bytes(buf)


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, MIB), (4096, 8192), (1, 4095), (MIB - 7, 2 * MIB + 13), (3 * MIB, 12345), (12, 1)],
)
def test_cold_and_warm_reads_are_exact(
    data_file: tuple[Path, bytes], offset: int, length: int
) -> None:
    path, data = data_file
    _drop_cache(path)
    with RawFile(path) as raw:
        assert _read(raw, offset, length) == data[offset : offset + length]  # cold
        raw.pread_into(memoryview(bytearray(length)), offset)  # now cached
        assert _read(raw, offset, length) == data[offset : offset + length]  # warm


def test_past_the_end_follows_the_buffered_rule(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    size = len(data)
    _drop_cache(path)
    with RawFile(path) as raw:
        got = _read(raw, size - 100, 4196)
        assert got == data[-100:] + bytes(4096)  # zeros past the end
    _drop_cache(path)
    with RawFile(path) as raw:
        raw.strict_end = True  # an image file: data past its end is an error
        with pytest.raises(ImageReadError, match="past the end"):
            _read(raw, size - 100, 4196)


def test_cold_reads_leave_the_page_cache_alone(data_file: tuple[Path, bytes]) -> None:
    """A cold range read with O_DIRECT is not cached afterwards (a backup does not evict)."""
    path, data = data_file
    _drop_cache(path)
    with RawFile(path) as raw:
        if raw_module._all_cached(raw.fd, 0, MIB):
            pytest.fail("cachestat(2) missing or the cache could not be dropped")
        assert _read(raw, 0, 2 * MIB) == data[: 2 * MIB]
        assert not raw_module._all_cached(raw.fd, 0, 2 * MIB)
