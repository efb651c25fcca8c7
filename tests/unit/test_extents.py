"""lseek(2) semantics of seek_data/seek_hole over any SparseSource, without a mount."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sparsefs.extents import Extent, coalesce, data_size, seek_data, seek_hole


class ListSource:
    """A SparseSource defined by a list of (start, end, data) runs, for semantics tests."""

    def __init__(self, size: int, data_runs: list[tuple[int, int]]) -> None:
        self._size = size
        self._data = data_runs

    @property
    def size(self) -> int:
        return self._size

    def read(self, guest_offset: int, length: int) -> bytes:
        end = min(self._size, guest_offset + length)
        out = bytearray(max(0, end - guest_offset))
        for s, e in self._data:
            lo, hi = max(s, guest_offset), min(e, end)
            if lo < hi:
                out[lo - guest_offset : hi - guest_offset] = b"\x01" * (hi - lo)
        return bytes(out)

    def iter_extents(self, guest_offset: int = 0) -> Iterator[Extent]:
        pos = 0
        runs: list[Extent] = []
        for s, e in self._data:
            if s > pos:
                runs.append(Extent(pos, s - pos, False, True))
            runs.append(Extent(s, e - s, True))
            pos = e
        if pos < self._size:
            runs.append(Extent(pos, self._size - pos, False, True))
        for r in runs:
            if r.end <= guest_offset:
                continue
            start = max(r.guest_offset, guest_offset)
            yield Extent(start, r.end - start, r.data, r.zero)


SRC = ListSource(1000, [(100, 200), (500, 700)])


@pytest.mark.parametrize(
    ("offset", "expected"),
    [(0, 100), (100, 100), (150, 150), (199, 199), (200, 500), (650, 650), (699, 699)],
)
def test_seek_data_finds_next_data(offset: int, expected: int) -> None:
    assert seek_data(SRC, offset) == expected


@pytest.mark.parametrize("offset", [700, 850, 999, 1000, 5000])
def test_seek_data_in_trailing_hole_or_past_eof_is_enxio(offset: int) -> None:
    # lseek(2): ENXIO when no data follows; returning EOF makes cp loop forever.
    assert seek_data(SRC, offset) is None


@pytest.mark.parametrize(
    ("offset", "expected"),
    [(0, 0), (100, 200), (150, 200), (200, 200), (500, 700), (700, 700), (999, 999)],
)
def test_seek_hole_finds_next_hole(offset: int, expected: int) -> None:
    assert seek_hole(SRC, offset) == expected


def test_seek_hole_implicit_hole_at_eof() -> None:
    full = ListSource(1000, [(0, 1000)])
    assert seek_hole(full, 0) == 1000
    assert seek_hole(full, 999) == 1000
    assert seek_data(full, 999) == 999


@pytest.mark.parametrize("offset", [1000, 1001, 10**12])
def test_seek_hole_past_eof_is_enxio(offset: int) -> None:
    assert seek_hole(SRC, offset) is None


def test_empty_source() -> None:
    empty = ListSource(0, [])
    assert seek_data(empty, 0) is None
    assert seek_hole(empty, 0) is None
    assert data_size(empty) == 0


def test_data_size_counts_only_data() -> None:
    assert data_size(SRC) == 300


def test_coalesce_merges_touching_runs_of_one_kind() -> None:
    runs = [
        Extent(0, 10, True),
        Extent(10, 5, True),
        Extent(15, 5, False, True),
        Extent(20, 5, False, True),
        Extent(25, 5, True, True),
    ]
    assert list(coalesce(iter(runs))) == [
        Extent(0, 15, True),
        Extent(15, 10, False, True),
        Extent(25, 5, True, True),
    ]
