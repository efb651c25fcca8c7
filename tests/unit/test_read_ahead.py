"""The daemon's read-ahead for direct_io files: sequential readers get their next
range read ahead, and every read still returns qemu's bytes."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing

from sparsefs.errors import ImageReadError
from sparsefs.extents import Extent, SparseSource
from sparsefs.formats.qcow2 import open_image
from sparsefs.fusefs import SparseFS
from sparsefs.options import OpenOptions
from support import KiB, MiB, qemu_img_create, qemu_io, qemu_raw

CHUNK = 128 * KiB  # what cp reads at a time


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data at [1M, 2M) and [3M+64K, 4M), holes around them (64 KiB clusters)."""
    path = qemu_img_create(tmp_path_factory.mktemp("ahead") / "disk.qcow2", 8 * MiB)
    qemu_io(path, "write -q -P 0x11 1M 512k", "write -q -P 0x22 1536k 512k")
    qemu_io(path, "write -q -P 0x33 3136k 896k")
    return path


@pytest.fixture(scope="module")
def reference(image: Path) -> bytes:
    return qemu_raw(image, image.with_suffix(".raw")).read_bytes()


def _reads(
    image: Path, offsets: list[tuple[int, int]], *, page_cache: bool = False
) -> tuple[list[bytes], int]:
    """The bytes of each read (offset, size) in turn, and the reads answered from read-ahead."""
    with open_image(str(image), OpenOptions()) as src:
        return _reads_from(src, offsets, page_cache=page_cache)


def _reads_from(
    src: SparseSource, offsets: list[tuple[int, int]], *, page_cache: bool = False
) -> tuple[list[bytes], int]:
    """As :func:`_reads`, from any source; a read that fails gives its errno as bytes.

    Between two reads every other task runs (the read-ahead task among them,
    and its worker threads finish), as while the reader is busy with what it got.
    """
    files: dict[str, SparseSource] = {"disk.raw": src}
    ops = SparseFS(files, page_cache=page_cache)
    ops.precompute()
    (inode,) = ops.inodes()

    async def run() -> list[bytes]:
        got = []
        for off, size in offsets:
            try:
                got.append(bytes(await ops.read(inode, off, size)))
            except pyfuse3.FUSEError as exc:
                got.append(f"errno {exc.errno}".encode())
            with trio.fail_after(10):
                await ops.read_ahead_done(inode)
            await trio.testing.wait_all_tasks_blocked()
        return got

    return trio.run(run), ops.ahead_hits


class ThreadOnly:
    """A source without read_nowait (every read ahead goes to a worker thread) whose
    reads of ``bad`` fail as a damaged image's do."""

    def __init__(self, src: SparseSource, bad: tuple[int, int] | None = None) -> None:
        self._src = src
        self._bad = bad
        self.size = src.size

    def read(self, guest_offset: int, length: int) -> bytes:
        if (
            self._bad is not None
            and guest_offset < self._bad[1]
            and self._bad[0] < guest_offset + length
        ):
            raise ImageReadError(f"disk.qcow2: cannot read [{self._bad[0]}, {self._bad[1]})")
        return self._src.read(guest_offset, length)

    def iter_extents(self, guest_offset: int = 0) -> Iterator[Extent]:
        return self._src.iter_extents(guest_offset)


def _chunks(start: int, end: int, size: int = CHUNK) -> list[tuple[int, int]]:
    return [(off, size) for off in range(start, end, size)]


def test_sequential_reads_of_data_come_from_read_ahead(image: Path, reference: bytes) -> None:
    """cp's 128 KiB reads through [1M, 2M): all but the first were read ahead, bytes exact."""
    offsets = _chunks(1 * MiB, 2 * MiB)
    got, hits = _reads(image, offsets)
    assert got == [reference[o : o + n] for o, n in offsets]
    assert hits == len(offsets) - 1


def test_a_whole_stream_is_exact_and_holes_are_not_read_ahead(
    image: Path, reference: bytes
) -> None:
    """cat's 1 MiB reads of the whole file: every MiB of data is followed by a hole."""
    offsets = _chunks(0, 8 * MiB, MiB)
    got, hits = _reads(image, offsets)
    assert got == [reference[o : o + n] for o, n in offsets]
    assert hits == 0  # a hole is answered from the zero buffer, never read ahead


def test_read_ahead_across_a_data_edge(image: Path, reference: bytes) -> None:
    """Reads that straddle the start and the end of a data extent, in sequence."""
    offsets = _chunks(3 * MiB - CHUNK, 4 * MiB + 2 * CHUNK)
    got, hits = _reads(image, offsets)
    assert got == [reference[o : o + n] for o, n in offsets]
    # Read ahead: every chunk that holds data and follows a chunk that did.
    with_data = [o for o, n in offsets if any(reference[o : o + n])]
    assert hits == len(with_data) - 1


def test_a_reader_that_jumps_or_changes_size_gets_exact_bytes(
    image: Path, reference: bytes
) -> None:
    """What was read ahead is only used for the very range it holds."""
    offsets = [
        (1 * MiB, CHUNK),  # reads [1M+128K, +128K) ahead
        (1 * MiB + CHUNK, 64 * KiB),  # same offset, another size: not from read-ahead
        (1 * MiB + 3 * CHUNK, CHUNK),  # a jump
        (1 * MiB + 4 * CHUNK, CHUNK),  # sequential again: from read-ahead
        (1 * MiB + 4 * CHUNK, CHUNK),  # the same range twice: read again
        (3 * MiB + 64 * KiB, CHUNK),
    ]
    got, hits = _reads(image, offsets)
    assert got == [reference[o : o + n] for o, n in offsets]
    assert hits == 1


def test_read_ahead_from_worker_threads(image: Path, reference: bytes) -> None:
    """Data not in memory is read ahead in a worker thread, the bytes exact."""
    offsets = _chunks(1 * MiB, 2 * MiB) + _chunks(3 * MiB, 4 * MiB)
    with open_image(str(image), OpenOptions()) as src:
        got, hits = _reads_from(ThreadOnly(src), offsets)
    assert got == [reference[o : o + n] for o, n in offsets]
    assert hits == len(offsets) - 2  # the first chunk of each extent is read by the reader


def test_a_failed_read_ahead_leaves_the_error_to_the_reader(image: Path, reference: bytes) -> None:
    """A range that cannot be read is EIO for the reader that asks for it, and only for
    it; the chunks before and after it are served."""
    offsets = _chunks(1 * MiB, 2 * MiB)
    bad = (1 * MiB + 3 * CHUNK + 100, 1 * MiB + 3 * CHUNK + 200)
    with open_image(str(image), OpenOptions()) as src:
        got, hits = _reads_from(ThreadOnly(src, bad), offsets)
    want = [reference[o : o + n] for o, n in offsets]
    want[3] = f"errno {errno.EIO}".encode()
    assert got == want
    assert hits == len(offsets) - 3  # the first chunk, the bad one, and the one after it


def test_no_read_ahead_through_the_page_cache(image: Path, reference: bytes) -> None:
    """With the page cache the kernel reads ahead; the daemon does not."""
    offsets = _chunks(1 * MiB, 2 * MiB)
    got, hits = _reads(image, offsets, page_cache=True)
    assert got == [reference[o : o + n] for o, n in offsets]
    assert hits == 0
