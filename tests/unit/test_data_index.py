"""DataIndex (the in-memory seek map behind the FUSE lseek) against the extent walk and qemu."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio

from sparsefs.extents import DataIndex, Extent, SparseSource, data_size, seek_data, seek_hole
from sparsefs.formats.qcow2 import open_image
from sparsefs.fusefs import SparseFS
from sparsefs.options import OpenOptions
from support import (
    MiB,
    host_files_of,
    make_image,
    num,
    qemu_img_create,
    qemu_io,
    qemu_map,
    stored_segments,
)


class RunsSource:
    """A SparseSource from explicit runs (start, end, data); touching runs stay split."""

    def __init__(self, size: int, runs: list[tuple[int, int, bool]]) -> None:
        self._size = size
        self._runs = runs

    @property
    def size(self) -> int:
        return self._size

    def read(self, guest_offset: int, length: int) -> bytes:
        raise AssertionError("not read in these tests")

    def iter_extents(self, guest_offset: int = 0) -> Iterator[Extent]:
        for s, e, data in self._runs:
            if e > guest_offset:
                start = max(s, guest_offset)
                yield Extent(start, e - start, data, not data)


LAYOUTS = {
    "empty": RunsSource(0, []),
    "all hole": RunsSource(1000, [(0, 1000, False)]),
    "all data, split": RunsSource(1000, [(0, 300, True), (300, 1000, True)]),
    "data at both ends": RunsSource(
        1000,
        [
            (0, 100, True),
            (100, 400, False),
            (400, 500, True),
            (500, 501, True),
            (501, 900, False),
            (900, 1000, True),
        ],
    ),
    "hole runs split": RunsSource(
        1000, [(0, 50, False), (50, 60, False), (60, 70, True), (70, 1000, False)]
    ),
}


def probe_offsets(source: RunsSource) -> list[int]:
    """Every run boundary and its neighbours, and offsets past the end."""
    out = {0, source.size, source.size + 1, source.size + 10**9}
    for ext in source.iter_extents(0):
        for b in (ext.guest_offset, ext.end):
            out.update((b - 1, b, b + 1))
    return sorted(o for o in out if o >= 0)


@pytest.mark.parametrize("name", LAYOUTS)
def test_index_answers_as_the_walk(name: str) -> None:
    source = LAYOUTS[name]
    index = DataIndex.build(source)
    assert index is not None
    assert index.data_bytes == data_size(source)
    for off in probe_offsets(source):
        assert index.seek_data(off) == seek_data(source, off), off
        assert index.seek_hole(off) == seek_hole(source, off), off


@pytest.mark.parametrize("name", LAYOUTS)
def test_is_hole_means_no_data_in_range(name: str) -> None:
    source = LAYOUTS[name]
    index = DataIndex.build(source)
    assert index is not None
    offsets = [o for o in probe_offsets(source) if o < source.size]
    for start in offsets:
        for end in [*offsets, source.size]:
            if end <= start:
                continue
            has_data = any(
                ext.data and ext.guest_offset < end for ext in source.iter_extents(start)
            )
            assert index.is_hole(start, end) == (not has_data), (start, end)


def test_touching_data_runs_are_one_extent() -> None:
    index = DataIndex.build(LAYOUTS["data at both ends"])
    assert index is not None
    assert index.nb_extents == 3  # 400..500 and 500..501 merged


def test_too_many_extents_gives_no_index() -> None:
    source = LAYOUTS["data at both ends"]
    assert DataIndex.build(source, max_extents=2) is None
    assert DataIndex.build(source, max_extents=3) is not None


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("index") / "img.qcow2"
    return make_image(path, 64 * MiB, seed=12, writes=60, zero_writes=8, discards=8)


def test_index_of_a_qcow2_image_agrees_with_qemu_img_map(image: Path) -> None:
    """Every boundary of the stored data (qemu-img map + FIEMAP): the index agrees."""
    segments = stored_segments(qemu_map(image), host_files_of(image))
    with open_image(str(image), OpenOptions()) as src:
        index = DataIndex.build(src)
        assert index is not None
        pos = 0
        pieces = []
        for start, end in segments:
            if start > pos:
                pieces.append((pos, start, False))
            pieces.append((start, end, True))
            pos = end
        if pos < src.size:
            pieces.append((pos, src.size, False))
        for start, end, data in pieces:
            for off in (start, start + (end - start) // 2, end - 1):
                if data:
                    assert index.seek_data(off) == off
                    assert index.seek_hole(off) == end
                else:
                    assert index.seek_hole(off) == off
                    assert index.seek_data(off) == seek_data(src, off)
                    assert index.is_hole(off, end)
        assert index.data_bytes == sum(e - s for s, e in segments)


def test_fuse_handlers_answer_from_the_index_as_from_the_walk(image: Path) -> None:
    """lseek and hole reads through the index (after precompute) equal the walk in a thread."""
    trio.run(_handlers_agree, image)


async def _handlers_agree(image: Path) -> None:
    with open_image(str(image), OpenOptions()) as src:
        cold = SparseFS({"img.raw": src})
        warm = SparseFS({"img.raw": src})
        warm.precompute()
        inode = next(iter(warm._nodes))
        assert warm._nodes[inode].index is not None
        assert cold._nodes[inode].index is None
        qmap = qemu_map(image)
        offsets = {0, src.size - 1, src.size, src.size + 1}
        for ent in qmap:
            start = num(ent["start"])
            offsets.update((start - 1, start, start + 1))
        for off in sorted(o for o in offsets if o >= 0):
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                answers = []
                for ops in (cold, warm):
                    try:
                        answers.append(await ops.lseek(inode, inode, off, whence))
                    except pyfuse3.FUSEError as exc:
                        answers.append(-exc.errno)
                assert answers[0] == answers[1], (off, whence, answers)
                if off >= src.size:
                    assert answers[1] == -errno.ENXIO
        for ent in qmap:
            start = num(ent["start"])
            length = min(num(ent["length"]), MiB)
            got = bytes(await warm.read(inode, start, length))
            assert got == src.read(start, length)
            if not ent["data"]:
                assert got == bytes(length)


def test_direct_io_by_default_page_cache_on_request(tmp_path: Path) -> None:
    """Every file is opened with direct_io, dense or sparse; page_cache=True: none is."""
    dense = qemu_img_create(tmp_path / "dense.qcow2", 4 * MiB)
    qemu_io(dense, "write -q -P 7 0 3M")  # three quarters data
    sparse = qemu_img_create(tmp_path / "sparse.qcow2", 4 * MiB)
    qemu_io(sparse, "write -q -P 7 1M 1M")  # one quarter data
    with open_image(str(dense), OpenOptions()) as d, open_image(str(sparse), OpenOptions()) as s:
        files: dict[str, SparseSource] = {"dense.raw": d, "sparse.raw": s}
        for page_cache in (False, True):
            ops = SparseFS(files, page_cache=page_cache)
            ops.precompute()
            for inode in ops.inodes():
                info = trio.run(ops.open, inode, os.O_RDONLY, None)  # type: ignore[arg-type]  # open() ignores ctx
                assert info.direct_io == (not page_cache)
