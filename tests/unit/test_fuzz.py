"""Fuzz: seeded mutants of qemu-made images cost at most a clean error or EIO.

Each mutant is a copy of a small qemu-made image (tests/hostile_images.py:
plain, v2, zlib, zstd, snapshots, extended L2, overlay, external data file)
with one to three seeded changes: a header field, an L1 or L2 entry, a
compressed descriptor or its payload, a snapshot table field, a header
extension's length/type/data, random metadata bytes, or a truncation.

For every mutant, :func:`open_image` either raises a
:class:`~sparsefs.errors.SparsefsError` subclass (nothing else), or the image
is self-consistent (conformance.exercise): its extents tile ``[0, size)``; every
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
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from conformance import READ_BUDGET, Hang, alarm, capped_address_space, exercise
from hostile_images import Located, Mutator, build_bases, locate
from sparsefs.errors import SparsefsError
from sparsefs.formats.qcow2 import open_image
from sparsefs.options import OpenOptions
from support import KiB

ITERATIONS = int(os.environ.get("SPARSEFS_FUZZ_ITERATIONS", "1000"))
SEED = int(os.environ.get("SPARSEFS_FUZZ_SEED", "20240501"))
WATCHDOG_SECONDS = 30  # per mutant; only a hang gets anywhere near it
MAX_REPORTED = 10


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Located]]:
    directory = tmp_path_factory.mktemp("fuzz-bases")
    return {kind: (path, locate(path)) for kind, path in build_bases(directory).items()}


@pytest.fixture
def capped_memory() -> Iterator[None]:
    """Cap the address space for the duration of the test (MemoryError instead of OOM)."""
    with capped_address_space():
        yield


# -- the fuzz loop ------------------------------------------------------------------------


def fuzz_one(path: Path, rng: random.Random) -> None:
    """Open a mutant; exercise it and its snapshots when it opens."""
    try:
        image = open_image(
            path, OpenOptions(l2_cache_bytes=64 * KiB, compressed_cache_bytes=64 * KiB)
        )
    except SparsefsError as exc:
        message = str(exc)
        assert "\n" not in message, f"error message is not one line: {message!r}"
        assert message, f"error message is not one line: {message!r}"
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
    old_handler = signal.signal(signal.SIGALRM, alarm)
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
