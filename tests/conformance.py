"""One conformance check for an image of any format, and the self-consistency check.

:func:`check_conformance` runs over every image tests/format_builders.py
builds: the bytes equal qemu's raw copy (read whole and in odd chunks), the
SEEK_DATA/SEEK_HOLE walk agrees with ``qemu-img map`` by
:func:`support.check_map_agrees`'s rule, holes read as zeros (and qemu's copy
is zero there too), the sparsefs1 digest equals that of qemu's raw copy, and
the registry detects the format by its magic.

:func:`exercise` (moved from test_fuzz.py) checks that one opened source
agrees with itself: extents tile the image, holes read zeros, data reads
fully or raises ImageReadError, a window read whole equals it read in pieces,
the SEEK walk finds exactly the data extents, the map tiles the image.  The
fuzz tests run it over every mutant that opens; :func:`fuzz_loop` is their
shared loop (watchdog, one-line errors, failures kept next to the bases).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import resource
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from sparsefs.checksum import block_digest
from sparsefs.errors import ImageReadError, SparsefsError
from sparsefs.extents import Extent, SparseSource, data_size, seek_data, seek_hole
from sparsefs.formats import detect, open_source
from sparsefs.layered import OTHER, LayeredImage
from sparsefs.options import OpenOptions
from sparsefs.raw import RawFile
from support import KiB, MiB, check_map_agrees

READ_BUDGET = 6 * MiB  # data bytes read per mutant (beyond it, samples)
WATCHDOG_SECONDS = 30  # per mutant; only a hang gets anywhere near it
EXTRA_ADDRESS_SPACE = 1536 * MiB  # on top of what the test process already maps
MAX_REPORTED = 10


# -- consistency of one opened source (moved here from test_fuzz.py) ----------------------


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
        return [
            (ext.guest_offset + i, min(width, ext.end - ext.guest_offset - i))
            for i in range(0, ext.length, width)
        ]
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
        assert ext.guest_offset == pos, f"extents do not tile: {ext} at {pos}"
        assert ext.length > 0, f"extents do not tile: {ext} at {pos}"
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
        pieces = [_read(source, start + a, b - a) for a, b in itertools.pairwise(bounds)]
        if all(p is not None for p in pieces):
            assert whole is not None, f"[{start}, {start + length}) fails whole, reads in pieces"
            joined = b"".join(p for p in pieces if p is not None)
            assert whole == joined, f"[{start}, {start + length}) differs in pieces"
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
        assert hole is not None, (data, hole, size)
        assert data < hole <= size, (data, hole, size)
        walked.append((data, hole))
        pos = hole
    assert walked == expected, "SEEK_DATA/SEEK_HOLE walk disagrees with the extents"
    assert data_size(source) == sum(e - s for s, e in expected)

    iter_map = getattr(source, "iter_map", None)
    if iter_map is not None:
        pos = 0
        for entry in iter_map():
            assert entry.start == pos
            assert entry.length > 0
            pos += entry.length
        assert pos == size


# -- conformance against qemu ------------------------------------------------------------


def _close(source: SparseSource) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


def data_segments(source: SparseSource) -> list[tuple[int, int]]:
    """The data segments a copier finds with SEEK_DATA/SEEK_HOLE on the source."""
    out: list[tuple[int, int]] = []
    pos = 0
    while True:
        data = seek_data(source, pos)
        if data is None:
            return out
        hole = seek_hole(source, data)
        assert hole is not None
        assert data < hole <= source.size
        out.append((data, hole))
        pos = hole


def check_conformance(
    image: Path, fmt: str, expected: Path, qmap: list[dict[str, object]], rng: random.Random
) -> None:
    """Assert that sparsefs reads ``image`` as qemu does (see the module docstring)."""
    if fmt != "raw":
        assert detect(str(image)) == fmt, f"{image} is not detected as {fmt}"
    want = expected.read_bytes()
    source = open_source(image, fmt, OpenOptions())
    try:
        assert source.size == len(want), f"size {source.size}, qemu says {len(want)}"
        got = source.read(0, source.size + 4096)
        assert got == want, f"bytes differ at {_first_difference(got, want)}"
        for chunk in (4097, 65537 + rng.randrange(4096), 1048573):
            start = rng.randrange(min(chunk, len(want)))
            parts = [source.read(off, chunk) for off in range(start, len(want), chunk)]
            assert b"".join(parts) == want[start:], f"reads of {chunk} bytes from {start} differ"
        read_nowait = getattr(source, "read_nowait", None)
        if read_nowait is not None:  # from the page cache, warm after the reads above
            answered = 0
            for off in (0, rng.randrange(len(want)), max(0, len(want) - 70000)):
                fast = read_nowait(off, 200000)
                if fast is not None:
                    answered += 1
                    assert bytes(fast) == want[off : off + 200000], f"read_nowait at {off}"
            # qcow2 over another format: always None; a layer whose data is all OTHER
            # (VMDK compressed grains) never answers from the page cache either.
            if isinstance(source, LayeredImage) and not any(
                kind == OTHER for _, _, kind, _ in source.layer.runs(0, source.size)
            ):
                assert answered, "read_nowait answered nothing from a warm page cache"
        host_ranges = getattr(source, "iter_host_ranges", None)
        if host_ranges is not None:  # what checksum and backup copy: zeros left out
            rebuilt = bytearray(len(want))
            pos = 0
            for start, stop, raw, host in host_ranges(0, len(want)):
                assert pos <= start < stop, f"host ranges out of order at {start}"
                rebuilt[start:stop] = (
                    source.read(start, stop - start)
                    if raw is None
                    else (raw.pread(host, stop - start))
                )
                pos = stop
            assert rebuilt == want, (
                f"host ranges differ at {_first_difference(bytes(rebuilt), want)}"
            )
        segments = data_segments(source)
        check_map_agrees(segments, qmap)
        pos = 0
        for s, e in [*segments, (len(want), len(want))]:
            assert want[pos:s].count(0) == s - pos, f"hole [{pos}, {s}) is not zero in qemu's copy"
            pos = e
        with RawFile(expected) as copy:
            assert block_digest(source).digest == block_digest(copy).digest
        exercise(source, rng)
    finally:
        _close(source)


def _first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


# -- the fuzz loop ------------------------------------------------------------------------


class Hang(BaseException):
    """The watchdog fired: a mutant took far too long."""


def alarm(signum: int, frame: FrameType | None) -> None:
    """SIGALRM handler of the fuzz watchdogs."""
    raise Hang


@contextlib.contextmanager
def capped_address_space() -> Iterator[None]:
    """Cap the address space meanwhile (MemoryError instead of OOM)."""
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


Mutate = Callable[[bytearray, random.Random], str]


def fuzz_open(path: Path, fmt: str, rng: random.Random) -> None:
    """Open a mutant as ``fmt``: a one-line SparsefsError, or a self-consistent source."""
    try:
        source = open_source(path, fmt, OpenOptions())
    except SparsefsError as exc:
        message = str(exc)
        assert "\n" not in message, f"error message is not one line: {message!r}"
        assert message, f"error message is not one line: {message!r}"
        return
    try:
        exercise(source, rng)
    finally:
        _close(source)


def fuzz_loop(
    bases: dict[str, tuple[Path, str]], mutate: Mutate, iterations: int, seed: int
) -> list[str]:
    """Mutate each base in turn ``iterations`` times; return what misbehaved."""
    kinds = sorted(bases)
    failures: list[str] = []
    old_handler = signal.signal(signal.SIGALRM, alarm)
    try:
        for i in range(iterations):
            kind = kinds[i % len(kinds)]
            base, fmt = bases[kind]
            rng = random.Random(f"{seed}:{kind}:{i}")
            buf = bytearray(base.read_bytes())
            changes = [mutate(buf, rng) for _ in range(1 if rng.random() < 0.8 else 3)]
            mutant = base.with_name(f"mutant-{base.name}")
            mutant.write_bytes(bytes(buf))
            where = f"seed {seed} iteration {i} ({kind}): " + "; ".join(changes)
            signal.setitimer(signal.ITIMER_REAL, WATCHDOG_SECONDS)
            try:
                fuzz_open(mutant, fmt, rng)
            except Hang:
                failures.append(f"{where}: no answer within {WATCHDOG_SECONDS} s")
            except (AssertionError, Exception) as exc:
                failures.append(f"{where}: {type(exc).__name__}: {exc}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if failures and failures[-1].startswith(where):
                shutil.copy(mutant, base.with_name(f"failed-{i}-{base.name}"))
                if len(failures) >= MAX_REPORTED:
                    break
    finally:
        signal.signal(signal.SIGALRM, old_handler)
    return failures
