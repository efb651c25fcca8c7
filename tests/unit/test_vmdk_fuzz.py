"""Fuzz: seeded mutants of qemu-made VMDKs cost at most a clean error or EIO.

Same contract as tests/unit/test_fuzz.py (qcow2): conformance.exercise: every mutant either fails
to open with a one-line :class:`~sparsefs.errors.SparsefsError`, or is
self-consistent under ``exercise`` (extents tile the image, holes read zeros,
data reads fully or raises ImageReadError, whole and piecewise reads agree,
the SEEK walk finds the data extents) and its qemu-img-style map tiles it.
Each mutant runs under a watchdog, with the address space capped.

Bases (tests/vmdk_images.py): monolithicSparse, zeroed grains,
streamOptimized with the GD in the header and in the footer, a delta disk
(its parent intact), and two descriptors (mixed extents, twoGbMaxExtentSparse).
Mutations: a header field, a grain directory entry, a grain table entry, a
grain marker or its payload, the footer, the embedded descriptor, random
metadata bytes, a truncation; for descriptor files, a number, a word or a
byte of the text.

Budget: ``SPARSEFS_FUZZ_ITERATIONS`` (default 400 here), seed
``SPARSEFS_FUZZ_SEED``.  A failure names the seed, the iteration and the
changes, and keeps the mutant beside the bases.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import vmdk_images as V
from conformance import Hang, alarm, capped_address_space, exercise
from sparsefs.errors import SparsefsError
from sparsefs.formats import open_source
from sparsefs.layered import LayeredImage
from support import MiB

ITERATIONS = int(os.environ.get("SPARSEFS_FUZZ_ITERATIONS", "400"))
SEED = int(os.environ.get("SPARSEFS_FUZZ_SEED", "20261127"))
WATCHDOG_SECONDS = 30
MAX_REPORTED = 10
SECTOR = V.SECTOR
INTERESTING = (
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x200,
    0x1000,
    0xFFFF,
    0x7FFF_FFFF,
    0xFFFF_FFFF,
    0xFFFF_FFFF_FFFF_FFFF,
    1 << 40,
)
HEADER_FIELDS = {  # name: (offset, struct format)
    "version": (4, "<I"),
    "flags": (8, "<I"),
    "capacity": (12, "<Q"),
    "grain": (20, "<Q"),
    "desc_offset": (28, "<Q"),
    "desc_size": (36, "<Q"),
    "gtes": (44, "<I"),
    "rgd": (48, "<Q"),
    "gd": (56, "<Q"),
    "overhead": (64, "<Q"),
    "algorithm": (77, "<H"),
}


Change = tuple[str, Callable[[bytearray], None]]


def _value(rng: random.Random, old: int, bits: int) -> int:
    mask = (1 << bits) - 1
    choice = rng.randrange(4)
    if choice == 0:
        return rng.choice(INTERESTING) & mask
    if choice == 1:
        return (old + rng.choice((-1, 1, 8, -8, 128))) & mask
    if choice == 2:
        return old ^ (1 << rng.randrange(bits))
    return rng.getrandbits(bits)


def _put(offset: int, fmt: str, value: int) -> Callable[[bytearray], None]:
    def apply(buf: bytearray) -> None:
        if offset + struct.calcsize(fmt) <= len(buf):
            struct.pack_into(fmt, buf, offset, value)

    return apply


class SparseMutator:
    """Seeded changes to a hosted sparse extent file, aimed at its structures."""

    def __init__(self, raw: bytes, rng: random.Random) -> None:
        self.raw = raw
        self.rng = rng
        self.header_at = 0
        if struct.unpack_from("<Q", raw, 56)[0] == V.GD_AT_END:
            self.header_at = len(raw) - 2 * SECTOR  # the footer's copy is the one in use
        h = self.header_at
        capacity, grain = struct.unpack_from("<QQ", raw, h + 12)
        (gtes,) = struct.unpack_from("<I", raw, h + 44)
        (gd,) = struct.unpack_from("<Q", raw, h + 56)
        (self.overhead,) = struct.unpack_from("<Q", raw, h + 64)
        nb = -(-capacity // (gtes * grain))
        self.gd_at = gd * SECTOR
        self.gd = struct.unpack_from(f"<{nb}I", raw, self.gd_at)
        self.gts = [(e * SECTOR, gtes) for e in self.gd if e]
        self.grains = [
            struct.unpack_from("<I", raw, t + 4 * i)[0] * SECTOR
            for t, n in self.gts
            for i in range(n)
            if struct.unpack_from("<I", raw, t + 4 * i)[0] > 1
        ]

    def next(self) -> Change:
        rng = self.rng
        kind = rng.choice(
            (
                "header",
                "header",
                "gd",
                "gt",
                "gt",
                "gt",
                "grain",
                "footer",
                "descriptor",
                "bytes",
                "truncate",
            )
        )
        if kind == "header":
            name = rng.choice(sorted(HEADER_FIELDS))
            off, fmt = HEADER_FIELDS[name]
            at = rng.choice((0, self.header_at)) + off
            old = struct.unpack_from(fmt, self.raw, at)[0]
            new = _value(rng, old, struct.calcsize(fmt) * 8)
            return f"header@{at - off} {name} {old:#x}->{new:#x}", _put(at, fmt, new)
        if kind == "gd" and self.gd:
            i = rng.randrange(len(self.gd))
            new = _value(rng, self.gd[i], 32)
            return f"gd[{i}] {self.gd[i]:#x}->{new:#x}", _put(self.gd_at + 4 * i, "<I", new)
        if kind == "gt" and self.gts:
            table, n = rng.choice(self.gts)
            i = rng.randrange(n)
            old = struct.unpack_from("<I", self.raw, table + 4 * i)[0]
            new = _value(rng, old, 32)
            return f"gte@{table:#x}[{i}] {old:#x}->{new:#x}", _put(table + 4 * i, "<I", new)
        if kind == "grain" and self.grains:
            at = rng.choice(self.grains)
            if rng.random() < 0.5:
                off, fmt = rng.choice(((0, "<Q"), (8, "<I")))
                old = struct.unpack_from(fmt, self.raw, at + off)[0]
                new = _value(rng, old, struct.calcsize(fmt) * 8)
                return f"grain marker@{at:#x}+{off} ->{new:#x}", _put(at + off, fmt, new)
            pos = at + rng.randrange(12, 200)
            byte = rng.randrange(256)
            return f"grain byte@{pos:#x}={byte:#x}", _put(pos, "<B", byte)
        if kind == "footer" and self.header_at:
            pos = len(self.raw) - rng.randrange(1, 3 * SECTOR + 1)
            byte = rng.randrange(256)
            return f"footer byte@{pos:#x}={byte:#x}", _put(pos, "<B", byte)
        if kind == "descriptor":
            pos = 0x200 + rng.randrange(0, 400)
            byte = rng.choice(b'0123456789abcdef"=\n \0xyz')
            return f"descriptor byte@{pos:#x}={byte:#x}", _put(pos, "<B", byte)
        if kind == "truncate":
            n = rng.randrange(0, len(self.raw))
            return f"truncate to {n}", lambda buf: buf.__delitem__(slice(n, None))
        pos = rng.randrange(0, min(len(self.raw), max(SECTOR, self.overhead * SECTOR)))
        byte = rng.randrange(256)
        return f"byte@{pos:#x}={byte:#x}", _put(pos, "<B", byte)


class TextMutator:
    """Seeded changes to a text descriptor: a number, a word, a byte, a truncation."""

    WORDS = (
        "RW",
        "RDONLY",
        "NOACCESS",
        "FLAT",
        "SPARSE",
        "ZERO",
        "VMFS",
        "SESPARSE",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "vmfsSparse",
        '"',
        "",
        "\n",
        "#",
    )

    def __init__(self, raw: bytes, rng: random.Random) -> None:
        self.raw = raw
        self.rng = rng
        self.numbers = [m.span() for m in re.finditer(rb"\d+", raw)]
        self.words = [m.span() for m in re.finditer(rb"[A-Za-z]+|\"", raw)]

    def next(self) -> Change:
        rng = self.rng
        kind = rng.choice(("number", "number", "word", "byte", "truncate"))
        if kind == "number":
            s, e = rng.choice(self.numbers)
            new = str(
                rng.choice((0, 1, 7, 2**31, 2**32, 2**63, 2**64 + 5, rng.randrange(10**6)))
            ).encode()
            return f"number@{s}={new.decode()}", _splice(s, e, new)
        if kind == "word":
            s, e = rng.choice(self.words)
            new = rng.choice(self.WORDS).encode()
            return f"word@{s}={new!r}", _splice(s, e, new)
        if kind == "truncate":
            n = rng.randrange(len(self.raw))
            return f"truncate to {n}", lambda buf: buf.__delitem__(slice(n, None))
        pos = rng.randrange(len(self.raw))
        byte = rng.randrange(256)
        return f"byte@{pos}={byte:#x}", _put(pos, "<B", byte)


def _splice(s: int, e: int, new: bytes) -> Callable[[bytearray], None]:
    def apply(buf: bytearray) -> None:
        buf[s:e] = new

    return apply


BASES = {
    "mono": V.monolithic_sparse,
    "zgrain": V.zeroed_grain,
    "stream": V.stream_optimized,
    "stream-footer": V.stream_footer,
    "delta": V.delta_chain,
    "mixed": V.mixed_descriptor,
    "split": V.two_gb_sparse,
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vmdk-fuzz")
    out = {}
    for name, builder in BASES.items():
        sub = root / name
        sub.mkdir()
        out[name] = builder(sub)
    return out


@pytest.fixture
def capped_memory() -> Iterator[None]:
    """Cap the address space for the duration of the test (MemoryError instead of OOM)."""
    with capped_address_space():
        yield


def fuzz_one(path: Path, rng: random.Random) -> None:
    """Open a mutant; exercise it when it opens."""
    try:
        image = open_source(path, fmt="vmdk")
    except SparsefsError as exc:
        message = str(exc)
        assert message, "empty error message"
        assert "\n" not in message, f"error message is not one line: {message!r}"
        return
    assert isinstance(image, LayeredImage)
    with image:
        exercise(image, rng, budget=2 * MiB)
        pos = 0
        for entry in image.iter_map():
            assert entry.start == pos, f"map entry at {entry.start}, expected {pos}"
            assert entry.length > 0
            pos += entry.length
        assert pos == image.size


@pytest.mark.usefixtures("capped_memory")
def test_vmdk_fuzz_mutants(bases: dict[str, Path]) -> None:
    """Every seeded VMDK mutant is refused cleanly or served consistently."""
    kinds = sorted(bases)
    originals = {k: p.read_bytes() for k, p in bases.items()}
    failures: list[str] = []
    old_handler = signal.signal(signal.SIGALRM, alarm)
    try:
        for i in range(ITERATIONS):
            kind = kinds[i % len(kinds)]
            path = bases[kind]
            raw = originals[kind]
            rng = random.Random(f"{SEED}:{i}")
            is_text = not raw.startswith(b"KDMV")
            mutator = TextMutator(raw, rng) if is_text else SparseMutator(raw, rng)
            stacked = 1 if rng.random() < 0.8 else rng.randrange(2, 4)
            changes = [mutator.next() for _ in range(stacked)]
            buf = bytearray(raw)
            for _, change in changes:
                change(buf)
            path.write_bytes(bytes(buf))  # in place: extent and parent names stay valid
            where = f"seed {SEED} iteration {i} ({kind}): " + "; ".join(d for d, _ in changes)
            signal.setitimer(signal.ITIMER_REAL, WATCHDOG_SECONDS)
            try:
                fuzz_one(path, rng)
            except Hang:
                failures.append(f"{where}: no answer within {WATCHDOG_SECONDS} s")
            except (AssertionError, Exception) as exc:
                failures.append(f"{where}: {type(exc).__name__}: {exc}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if failures and failures[-1].startswith(where):
                shutil.copy(path, path.with_name(f"failed-{i}-{path.name}"))
            path.write_bytes(raw)
            if len(failures) >= MAX_REPORTED:
                break
    finally:
        signal.signal(signal.SIGALRM, old_handler)
    assert not failures, f"{len(failures)} mutants misbehaved:\n" + "\n".join(failures)


def test_mutators_reach_the_tables(bases: dict[str, Path]) -> None:
    """The sparse mutator finds grain tables and grains in each sparse base (no blind fuzzing)."""
    for kind in ("mono", "zgrain", "stream", "stream-footer"):
        m = SparseMutator(bases[kind].read_bytes(), random.Random(1))
        assert m.gts, kind
        assert m.grains, kind
