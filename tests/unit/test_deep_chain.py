"""A 40-deep backing chain reads exactly as qemu says, at a cost that does not grow with the depth.

The chain: a raw base, a compressed qcow2 over it, then overlays made by
qemu-img with qemu-io writes, zero writes and discards, two of them larger than
the layer below (a grown disk).  Every read of the top (random ranges) must
equal ``qemu-img convert -O raw``, the extent walk must agree with ``qemu-img
map``, and so must layers in the middle of the chain.  Cost: the extent walk
asks each layer for its runs a number of times linear in the depth (it was
exponential: a 20-point chain took 12 s), and once a region of the top is
resolved (sparsefs.chainmap), reading it again asks no layer at all.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from sparsefs.extents import DataIndex, SparseSource
from sparsefs.formats import open_source
from support import KiB, MiB, check_map_agrees, qemu_io, qemu_map, qemu_raw, run

DEPTH = 40
SIZE = 8 * MiB


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The chain's files, bottom first (the raw base is not in the list)."""
    root = tmp_path_factory.mktemp("deep-chain")
    rng = random.Random(40)
    base = root / "base.raw"
    run(["truncate", "-s", str(SIZE - 2 * MiB), str(base)])
    qemu_io(base, "write -q -P 7 0 1M", "write -q -P 9 3M 512k", fmt="raw")
    plain = root / "plain.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(plain)])
    qemu_io(plain, "write -q -P 3 512k 1M", "write -q -z 3M 64k")
    first = root / "c00.qcow2"
    convert = ["qemu-img", "convert", "-q", "-c", "-O", "qcow2", "-B", "base.raw", "-F", "raw"]
    run([*convert, str(plain), str(first)])
    files = [first]
    size = SIZE - 2 * MiB
    for i in range(1, DEPTH):
        if i in (10, 25):
            size += MiB
        top = root / f"c{i:02d}.qcow2"
        create = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", files[-1].name, "-F", "qcow2"]
        run([*create, str(top), str(size)])
        commands = []
        for j in range(3):
            # Whole clusters: a partial write's copy-on-write leaves holes in the image
            # file, which qemu-img map of an overlay over a shorter backing file calls
            # data and sparsefs holes (an oracle quirk, not this test's subject).
            length = rng.choice([64 * KiB, 128 * KiB, 192 * KiB])
            offset = rng.randrange(0, size - length, 64 * KiB)
            verb = ("write -q -z", "discard -q", f"write -q -P {i % 250 + 1}")[j]
            commands.append(f"{verb} {offset} {length}")
        qemu_io(top, *commands)
        files.append(top)
    return files


def _same_as_qemu(source: SparseSource, path: Path, tmp: Path, rng: random.Random) -> None:
    ref = qemu_raw(path, tmp / f"{path.stem}.raw").read_bytes()
    assert source.size == len(ref)
    assert source.read(0, source.size) == ref
    for _ in range(200):
        start = rng.randrange(0, len(ref))
        length = rng.randrange(1, 300 * KiB)
        assert source.read(start, length) == ref[start : start + length], (start, length)
    index = DataIndex.build(source)
    assert index is not None
    segments = [(s, e) for s, e in zip(index._bounds[0::2], index._bounds[1::2], strict=True)]
    check_map_agrees(segments, qemu_map(path))


def _layers(top: Any) -> list[Any]:
    out = []
    while hasattr(top, "layer"):
        out.append(top)
        top = top.backing
    return out


def test_every_layer_reads_as_qemu_says(chain: list[Path], tmp_path: Path) -> None:
    rng = random.Random(1)
    source: Any = open_source(str(chain[-1]))
    try:
        images = _layers(source)
        assert len(images) == DEPTH
        for depth in (0, 1, 15, DEPTH - 2, DEPTH - 1):
            _same_as_qemu(images[depth], chain[DEPTH - 1 - depth], tmp_path, rng)
    finally:
        source.close()


def _count_runs(images: list[Any]) -> list[int]:
    """Wrap each layer's runs() to count its calls."""
    calls = [0]
    for image in images:
        real = image.layer.runs

        def counted(start: int, end: int, real: Any = real) -> Any:
            calls[0] += 1
            return real(start, end)

        image.layer.runs = counted
    return calls


def test_cost_does_not_grow_with_the_depth(chain: list[Path]) -> None:
    source: Any = open_source(str(chain[-1]))
    try:
        images = _layers(source)
        calls = _count_runs(images)
        extents = list(source.iter_extents(0))
        top_runs = len(list(images[0].layer.runs(0, source.size)))
        calls[0] -= 1
        # Linear: each run of each layer starts at most one bounded walk of the layer below.
        assert calls[0] <= 2 * DEPTH * (top_runs + len(extents)), calls[0]
        whole = source.read(0, source.size)
        calls[0] = 0
        for offset in range(0, source.size, 128 * KiB):
            assert source.read(offset, 128 * KiB) == whole[offset : offset + 128 * KiB]
        assert calls[0] == 0  # resolved regions: no layer is asked again
        got = source.read_nowait(0, source.size)
        assert got is None or bytes(got) == whole
        # What a copy and the prefetcher read (iter_host_ranges), from the resolved runs.
        copy = bytearray(source.size)
        for start, stop, raw, host in source.iter_host_ranges(0, source.size):
            copy[start:stop] = (
                source.read(start, stop - start) if raw is None else raw.pread(host, stop - start)
            )
        assert bytes(copy) == whole
        for start in range(0, source.size, 64 * KiB):
            if source._reads_zeros(start, start + 64 * KiB):
                assert not any(whole[start : start + 64 * KiB]), start
        assert calls[0] == 0
    finally:
        source.close()
