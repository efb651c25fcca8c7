"""The prefetcher advises exactly the host ranges a sequential reader will read next."""

from __future__ import annotations

import itertools
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sparsefs import prefetch
from sparsefs.formats import open_source
from sparsefs.options import OpenOptions

MIB = 1024 * 1024


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def __call__(self, fd: int, offset: int, length: int) -> None:
        with self.lock:
            self.calls.append((offset, length))

    def total(self) -> int:
        with self.lock:
            return sum(n for _, n in self.calls)


def _wait_for(pred: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "prefetcher did not get there"
        time.sleep(0.005)


def _sparse_raw(path: Path, extents: list[tuple[int, int]], size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for start, length in extents:
            f.seek(start)
            f.write(b"\x5a" * length)


def test_advises_data_ahead_within_the_window_and_never_holes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extents = [(i * 8 * MIB, 2 * MIB) for i in range(16)]  # 32 MiB of data in 128 MiB
    path = tmp_path / "disk.raw"
    _sparse_raw(path, extents, 128 * MIB)
    rec = _Recorder()
    monkeypatch.setattr(prefetch, "advise", rec)
    source = open_source(path, "raw", OpenOptions())
    pf = prefetch.Prefetcher()
    try:
        key = pf.open_stream(source, 0, source.size, window=8 * MIB)
        _wait_for(lambda: rec.total() >= 8 * MIB)
        time.sleep(0.05)
        assert rec.total() == 8 * MIB  # the window, not more
        data = [range(s, s + n) for s, n in extents]
        for offset, length in rec.calls:  # raw: host offset = guest offset
            assert any(offset in r and offset + length - 1 in r for r in data), (offset, length)
        # The reader moves past the first two extents (half the window): the
        # window moves with it, 8 MiB of data ahead again.
        pf.advance(key, 8 * MIB + 2 * MIB)
        _wait_for(lambda: rec.total() >= 12 * MIB)
        time.sleep(0.05)
        assert rec.total() == 12 * MIB
        # Read to the end: every data byte advised once, nothing else.
        for i in range(16):
            pf.advance(key, i * 8 * MIB + 2 * MIB)
            time.sleep(0.01)  # a reader takes its time
        _wait_for(lambda: rec.total() >= 32 * MIB)
        time.sleep(0.05)
        covered = sorted(rec.calls)
        assert sum(n for _, n in covered) == 32 * MIB
        assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(covered))
    finally:
        pf.close()
        source.close()  # type: ignore[attr-defined]


def test_qcow2_host_ranges_are_advised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For an image, the advice names the image file's host offsets of the data clusters."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    subprocess.run(
        ["qemu-io", "-c", "write -P 1 40M 1M", "-c", "write -P 2 4M 1M", str(image)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    rec = _Recorder()
    monkeypatch.setattr(prefetch, "advise", rec)
    source = open_source(image, "qcow2", OpenOptions())
    pf = prefetch.Prefetcher()
    try:
        pf.open_stream(source, 0, source.size, window=32 * MIB)
        _wait_for(lambda: rec.total() >= 2 * MIB)
        time.sleep(0.05)
        assert rec.total() == 2 * MIB
        size = os.path.getsize(image)
        # Both runs lie inside the image file, after its metadata.
        assert all(off > 0 and off + n <= size for off, n in rec.calls)
        host = [
            (e["offset"], e["length"])
            for e in _qemu_map(image)
            if e["data"] and e.get("offset") is not None
        ]
        assert sorted(rec.calls) == sorted(host) or _merged(rec.calls) == _merged(host)
    finally:
        pf.close()
        source.close()  # type: ignore[attr-defined]


def _qemu_map(image: Path) -> list[dict[str, int]]:
    import json

    out = subprocess.run(
        ["qemu-img", "map", "--output=json", str(image)], check=True, capture_output=True
    ).stdout
    result: list[dict[str, int]] = json.loads(out)
    return result


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


def test_a_source_without_host_ranges_gets_no_stream() -> None:
    class Plain:
        size = 1024

    pf = prefetch.Prefetcher()
    try:
        assert pf.open_stream(Plain(), 0, 1024) is None  # type: ignore[arg-type]
        pf.advance(None, 512)  # a no-op, not an error
    finally:
        pf.close()
