"""Fuzz: seeded mutants of qemu-made images cost at most a clean error or EIO.

Each mutant is a copy of a small qemu-made image (tests/hostile_images.py:
plain, v2, zlib, zstd, snapshots, extended L2, overlay, external data file)
with one to three seeded changes: a header field, an L1 or L2 entry, a
compressed descriptor or its payload, a snapshot table field, a header
extension's length/type/data, random metadata bytes, or a truncation.

For every mutant, :func:`open_image` either raises a
:class:`~sparsefs.errors.SparsefsError` subclass (nothing else), or the image
is self-consistent (:func:`exercise`): its extents tile ``[0, size)``; every
byte of a hole reads as zero; a data range reads its full length or raises
:class:`~sparsefs.errors.ImageReadError`; a range read at once equals the same
range read in pieces; the SEEK_DATA/SEEK_HOLE walk finds exactly the data
extents; the qemu-img-style map tiles the image; the same holds for every
snapshot that opens.  Each mutant runs under a watchdog (a hang fails the
test) and the address space is capped, so unbounded allocation fails too.

Budget: ``SPARSEFS_FUZZ_ITERATIONS`` mutants (default 1000), seed
``SPARSEFS_FUZZ_SEED`` (default fixed).  A longer run:
``SPARSEFS_FUZZ_ITERATIONS=20000 SPARSEFS_FUZZ_SEED=$RANDOM
.venv/bin/python -m pytest tests/unit/test_fuzz.py``.  A failure names the
seed, the iteration and the changes, and leaves the mutant next to the bases.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
from hostile_images import Located, Mutator, build_bases, locate
from support import KiB, MiB

from sparsefs.errors import ImageReadError, SparsefsError
from sparsefs.extents import Extent, SparseSource, data_size, seek_data, seek_hole
from sparsefs.qcow2 import Qcow2Image, open_image
from sparsefs.qcow2.image import OpenOptions

ITERATIONS = int(os.environ.get("SPARSEFS_FUZZ_ITERATIONS", "1000"))
SEED = int(os.environ.get("SPARSEFS_FUZZ_SEED", "20240501"))
WATCHDOG_SECONDS = 30  # per mutant; only a hang gets anywhere near it
EXTRA_ADDRESS_SPACE = 1536 * MiB  # on top of what the test process already maps
READ_BUDGET = 6 * MiB  # data bytes read per mutant (beyond it, samples)
MAX_REPORTED = 10


class Hang(BaseException):  # noqa: N818 - not an Exception, so nothing under test swallows it
    """The watchdog fired: a mutant took far too long."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Located]]:
    directory = tmp_path_factory.mktemp("fuzz-bases")
    return {kind: (path, locate(path)) for kind, path in build_bases(directory).items()}


@pytest.fixture
def capped_memory() -> Iterator[None]:
    """Cap the address space for the duration of the test (MemoryError instead of OOM)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm_size + EXTRA_ADDRESS_SPACE
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# -- consistency of one opened source -----------------------------------------------------


def _read(source: SparseSource, offset: int, length: int) -> bytes | None:
    """The bytes, or None for ImageReadError (anything else propagates: a failure)."""
    try:
        got = source.read(offset, length)
    except ImageReadError:
        return None
    want = max(0, min(length, source.size - offset))
    assert len(got) == want, f"read({offset}, {length}) returned {len(got)} bytes, not {want}"
    return got


def _samples(rng: random.Random, ext: Extent, n: int, width: int) -> list[tuple[int, int]]:
    """Up to ``n`` windows of at most ``width`` bytes in ``ext``: its start, end and middle."""
    if ext.length <= width * n:
        return [(ext.guest_offset + i, min(width, ext.end - ext.guest_offset - i))
                for i in range(0, ext.length, width)]
    out = [(ext.guest_offset, width), (ext.end - width, width)]
    for _ in range(n - 2):
        out.append((rng.randrange(ext.guest_offset, ext.end - width), width))
    return out


def exercise(source: SparseSource, rng: random.Random, budget: int = READ_BUDGET) -> None:
    """Assert that a source's extents, reads, seeks and map agree with each other."""
    size = source.size
    assert size >= 0
    extents = list(source.iter_extents(0))
    pos = 0
    for ext in extents:
        assert ext.guest_offset == pos and ext.length > 0, f"extents do not tile: {ext} at {pos}"
        pos = ext.end
    assert pos == size, f"extents end at {pos}, size is {size}"

    # Holes read as zeros; data reads fully or fails with ImageReadError.
    spent = 0
    for ext in extents:
        if not ext.data:
            for off, n in _samples(rng, ext, 3, 64 * KiB):
                got = _read(source, off, n)
                assert got is not None, f"hole [{off}, {off + n}) raised ImageReadError"
                assert got.count(0) == len(got), f"hole [{off}, {off + n}) reads non-zero bytes"
        else:
            width = 256 * KiB
            n = max(1, (budget - spent) // width) if spent < budget else 2
            for off, length in _samples(rng, ext, n, width):
                _read(source, off, length)
                spent += length

    # A window read at once equals the same window read in pieces.
    if size:
        start = rng.randrange(size)
        length = min(size - start, rng.randrange(1, MiB))
        whole = _read(source, start, length)
        cuts = sorted(rng.sample(range(1, length), min(3, length - 1))) if length > 1 else []
        bounds = [0, *cuts, length]
        pieces = [_read(source, start + a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]
        if all(p is not None for p in pieces):
            assert whole is not None, f"[{start}, {start + length}) fails whole, reads in pieces"
            assert whole == b"".join(pieces), f"[{start}, {start + length}) differs in pieces"
        else:
            assert whole is None, f"[{start}, {start + length}) reads whole, fails in pieces"

    # The SEEK_DATA/SEEK_HOLE walk a copier does finds exactly the data extents.
    expected: list[tuple[int, int]] = []
    for ext in extents:
        if ext.data:
            if expected and expected[-1][1] == ext.guest_offset:
                expected[-1] = (expected[-1][0], ext.end)
            else:
                expected.append((ext.guest_offset, ext.end))
    walked: list[tuple[int, int]] = []
    pos = 0
    while len(walked) <= len(expected):
        data = seek_data(source, pos)
        if data is None:
            break
        hole = seek_hole(source, data)
        assert hole is not None and data < hole <= size, (data, hole, size)
        walked.append((data, hole))
        pos = hole
    assert walked == expected, "SEEK_DATA/SEEK_HOLE walk disagrees with the extents"
    assert data_size(source) == sum(e - s for s, e in expected)

    if isinstance(source, Qcow2Image):
        pos = 0
        for entry in source.iter_map():
            assert entry.start == pos and entry.length > 0
            pos += entry.length
        assert pos == size


# -- the fuzz loop ------------------------------------------------------------------------


def fuzz_one(path: Path, rng: random.Random) -> None:
    """Open a mutant; exercise it and its snapshots when it opens."""
    try:
        image = open_image(path, OpenOptions(l2_cache_bytes=64 * KiB,
                                             compressed_cache_bytes=64 * KiB))
    except SparsefsError as exc:
        message = str(exc)
        assert "\n" not in message and message, f"error message is not one line: {message!r}"
        return
    with image:
        exercise(image, rng)
        for snap in image.snapshots[:3]:
            try:
                view = image.open_snapshot(snap)
            except SparsefsError:
                continue
            exercise(view, rng, budget=READ_BUDGET // 4)


@pytest.mark.usefixtures("capped_memory")
def test_fuzz_mutants(bases: dict[str, tuple[Path, Located]]) -> None:
    """Every seeded mutant is refused cleanly or served consistently."""
    kinds = sorted(bases)
    failures: list[str] = []
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(ITERATIONS):
            kind = kinds[i % len(kinds)]
            base, loc = bases[kind]
            rng = random.Random(f"{SEED}:{i}")
            mutator = Mutator(loc, rng)
            stacked = 1 if rng.random() < 0.8 else rng.randrange(2, 4)
            changes = [mutator.next() for _ in range(stacked)]
            buf = bytearray(loc.raw)
            for _, change in changes:
                change(buf)
            mutant = base.with_name(f"mutant-{kind}.qcow2")
            mutant.write_bytes(bytes(buf))
            where = f"seed {SEED} iteration {i} ({kind}): " + "; ".join(d for d, _ in changes)
            signal.setitimer(signal.ITIMER_REAL, WATCHDOG_SECONDS)
            try:
                fuzz_one(mutant, rng)
            except Hang:
                failures.append(f"{where}: no answer within {WATCHDOG_SECONDS} s")
            except (AssertionError, Exception) as exc:
                failures.append(f"{where}: {type(exc).__name__}: {exc}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if failures and failures[-1].startswith(where):
                shutil.copy(mutant, base.with_name(f"failed-{i}-{kind}.qcow2"))
                if len(failures) >= MAX_REPORTED:
                    break
    finally:
        signal.signal(signal.SIGALRM, old_handler)
    assert not failures, f"{len(failures)} mutants misbehaved:\n" + "\n".join(failures)
