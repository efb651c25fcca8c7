"""Hostile and broken images, without FUSE: a clean error at open, or EIO for just the range.

Every image starts as a qemu-made one (tests/hostile_images.py) and is changed
in-test at a spot the test finds itself.  What must hold:

- invalid header fields, tables, counts and names: one-line SparsefsError at
  open that names the file (qemu refuses the same images);
- a broken L1/L2 entry or compressed cluster: ImageReadError (EIO) for that
  range only, every other byte equal to ``qemu-img convert`` of the intact
  image, and the broken range reported as data so copiers fail on it;
- no unbounded memory (tracemalloc peaks) for huge counts and lengths, no
  hang on FIFOs, no wrong bytes when the file shrinks under an open image;
- the ``corrupt`` bit refuses unless --force; the ``dirty`` bit opens;
- backing files: protocols and ``json:`` refused, loops (also through hard
  links) and over-long chains refused, ``--backing-dir`` confines backing and
  data files.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import struct
import subprocess
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest
import zstandard

from hostile_images import (
    COPIED,
    HEADER_FIELDS,
    OFFSET_MASK,
    ZERO,
    Located,
    build_bases,
    locate,
    put,
)
from sparsefs.cli.mountset import open_mount_set
from sparsefs.errors import (
    ImageFormatError,
    ImageReadError,
    SparsefsError,
    UnsupportedFeatureError,
)
from sparsefs.extents import Extent, seek_data
from sparsefs.formats.qcow2 import Qcow2Image, open_image
from sparsefs.formats.qcow2.image import MAX_CHAIN_LENGTH
from sparsefs.options import OpenOptions
from support import KiB, MiB, make_image, qemu_img_create, qemu_io, qemu_raw, run, sparsefs


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_bases(tmp_path_factory.mktemp("hostile-bases"))


@pytest.fixture(scope="module")
def oracle(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """``qemu-img convert -O raw`` of each intact base image."""
    out = tmp_path_factory.mktemp("hostile-oracle")
    return {kind: qemu_raw(path, out / f"{kind}.raw").read_bytes() for kind, path in bases.items()}


def copy_base(bases: dict[str, Path], kind: str, tmp_path: Path) -> tuple[Path, Located]:
    """A private copy of a base image (next to its backing/data files when it has any)."""
    src = bases[kind]
    if kind in ("overlay", "datafile"):
        dst = src.with_name(f"{tmp_path.name}-{kind}.qcow2")  # relative names still resolve
    else:
        dst = tmp_path / src.name
    shutil.copy(src, dst)
    return dst, locate(dst)


def patch(path: Path, pos: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        buf = bytearray(f.read())
        put(buf, pos, fmt, value)
        f.seek(0)
        f.write(buf)


def assert_served_except(
    image: Qcow2Image, expected: bytes, broken: list[tuple[int, int]], step: int
) -> None:
    """EIO for every chunk touching ``broken``, the oracle's bytes for every other chunk."""
    assert image.size == len(expected)
    for off in range(0, image.size, step):
        n = min(step, image.size - off)
        if any(s < off + n and off < e for s, e in broken):
            with pytest.raises(ImageReadError):
                image.read(off, n)
        else:
            assert image.read(off, n) == expected[off : off + n], f"chunk at {off}"
    for s, e in broken:
        # Broken ranges are data: a hole-skipping copier must read (and fail on) them.
        assert all(ext.data for ext in image.iter_extents(s) if ext.guest_offset < e)
        assert seek_data(image, s) == s


def one_line_error(args: list[str]) -> str:
    """Run the CLI; assert it fails with one line and no traceback; return the line."""
    proc = sparsefs(*args)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


class Watchdog:
    """Turn a hang into a failure: SIGALRM after ``seconds`` raises Hang."""

    class Hang(BaseException):
        pass

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def fire(signum: int, frame: FrameType | None) -> None:
            raise Watchdog.Hang(f"no answer within {self.seconds} s")

        self._old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old)


@pytest.fixture
def peak_memory() -> Iterator[Callable[[], int]]:
    """tracemalloc's peak of Python allocations since the test started, in bytes."""
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- corrupt and dirty bits ----------------------------------------------------------------


def test_corrupt_bit_refused_unless_force(
    bases: dict[str, Path], oracle: dict[str, bytes], tmp_path: Path
) -> None:
    path, _ = copy_base(bases, "plain", tmp_path)
    patch(path, 72, ">Q", 1 << 1)  # incompatible_features: corrupt
    with pytest.raises(ImageFormatError, match=r"plain\.qcow2: image is marked corrupt.*--force"):
        open_image(path)
    with open_image(path, OpenOptions(force=True)) as image:
        assert image.read(0, image.size) == oracle["plain"]
    # The command line refuses it the same way, and --force is wired through.
    for command in ("info", "map"):
        line = one_line_error([command, str(path)])
        assert str(path) in line
        assert "corrupt" in line
        assert sparsefs(command, "--force", str(path)).returncode == 0


def test_dirty_bit_opens(tmp_path: Path) -> None:
    """Lazy refcounts left dirty by a crash: qemu reads such images, so does sparsefs."""
    path = qemu_img_create(tmp_path / "dirty.qcow2", 2 * MiB, "lazy_refcounts=on")
    qemu_io(path, "write -q -P 0x11 0 128k", "write -q -P 0x22 1M 64k")
    patch(path, 72, ">Q", 1 << 0)  # incompatible_features: dirty
    expected = qemu_raw(path, tmp_path / "dirty.raw").read_bytes()
    with open_image(path) as image:
        assert image.read(0, image.size) == expected


# -- header fields ------------------------------------------------------------------------

# (field, value, error type, words the message must contain); values qemu refuses too.
HEADER_CASES = [
    ("version", 1, UnsupportedFeatureError, "version 1"),
    ("version", 4, UnsupportedFeatureError, "version 4"),
    ("cluster_bits", 8, ImageFormatError, "cluster_bits 8"),
    ("cluster_bits", 22, ImageFormatError, "cluster_bits 22"),
    ("cluster_bits", 0xFFFFFFFF, ImageFormatError, "cluster_bits"),
    ("size", 1 << 62, ImageFormatError, "too few for a virtual size"),
    ("size", (1 << 64) - 1, ImageFormatError, "too few for a virtual size"),
    ("crypt_method", 1, UnsupportedFeatureError, "encrypted"),
    ("crypt_method", 77, UnsupportedFeatureError, "encrypted"),
    ("l1_size", 0xFFFFFFFF, ImageFormatError, "L1 table too large"),
    ("l1_size", 0, ImageFormatError, "too few"),
    ("l1_table_offset", 0, ImageFormatError, "not cluster aligned"),
    ("l1_table_offset", 4096 + 8, ImageFormatError, "not cluster aligned"),
    ("l1_table_offset", 1 << 50, ImageFormatError, "past the end of the file"),
    ("refcount_table_offset", 4096 + 512, ImageFormatError, "refcount table offset"),
    ("refcount_table_offset", 0xFFFFFFFFFFFF0000, ImageFormatError, "largest file offset"),
    ("refcount_table_clusters", 0, ImageFormatError, "no refcount table"),
    ("refcount_table_clusters", 0xFFFFFFFF, ImageFormatError, "refcount table too large"),
    ("refcount_order", 7, ImageFormatError, "refcount_order"),
    ("incompatible_features", 1 << 40, UnsupportedFeatureError, "bit 40"),
    ("header_length", 100, ImageFormatError, "header_length"),
    ("header_length", 0x10000, ImageFormatError, "header_length"),
    ("backing_file_offset", 1 << 40, ImageFormatError, "outside the first cluster"),
    ("compression_type", 1, ImageFormatError, "compression_type"),
]


@pytest.mark.parametrize(
    ("field", "value", "error", "words"),
    HEADER_CASES,
    ids=[f"{c[0]}={c[1]:#x}" for c in HEADER_CASES],
)
def test_invalid_header_field_is_refused_at_open(
    bases: dict[str, Path],
    tmp_path: Path,
    field: str,
    value: int,
    error: type[SparsefsError],
    words: str,
) -> None:
    path, _loc = copy_base(bases, "plain", tmp_path)
    if field == "backing_file_offset":
        patch(path, 16, ">I", 8)  # a name length, so that the offset is used
    pos, fmt = HEADER_FIELDS[field]
    patch(path, pos, fmt, value)
    with pytest.raises(error) as info:
        open_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert words in message
    assert "\n" not in message


def test_snapshot_table_past_end_and_misaligned(
    bases: dict[str, Path], oracle: dict[str, bytes], tmp_path: Path
) -> None:
    """An unreadable snapshot table costs the snapshots, not the disk (more in
    test_damaged_snapshots.py)."""
    path, loc = copy_base(bases, "snapshots", tmp_path)
    patch(path, 64, ">Q", loc.snapshots_offset + 512)
    with open_image(path) as image:
        assert image.read(0, image.size) == oracle["snapshots"]
        assert image.snapshots == []
        assert image.snapshot_table_problem == (
            f"{path}: snapshot table offset {loc.snapshots_offset + 512:#x} is not cluster aligned"
        )
    patch(path, 64, ">Q", 1 << 45)
    with open_image(path) as image:
        assert image.read(0, image.size) == oracle["snapshots"]
        assert image.snapshot_table_problem == (
            f"{path}: snapshot table at {1 << 45:#x} is past the end of the file "
            f"({loc.file_size:#x})"
        )


def test_extension_longer_than_the_first_cluster(bases: dict[str, Path], tmp_path: Path) -> None:
    path, loc = copy_base(bases, "snapshots", tmp_path)
    pos, _, _ = loc.extensions[0]
    patch(path, pos + 4, ">I", 0xFFFFFFF0)
    with pytest.raises(ImageFormatError, match=r"header extension .* past the first cluster"):
        open_image(path)


def test_backing_name_too_long_or_with_nul(bases: dict[str, Path], tmp_path: Path) -> None:
    path, _ = copy_base(bases, "overlay", tmp_path)
    data = path.read_bytes()
    name_at, name_len = struct.unpack_from(">QI", data, 8)
    patch(path, 16, ">I", 2000)
    with pytest.raises(ImageFormatError, match="backing file name too long"):
        open_image(path)
    patch(path, 16, ">I", name_len)
    patch(path, name_at + 2, ">B", 0)
    with pytest.raises(ImageFormatError, match="NUL"):
        open_image(path)


def test_data_file_name_with_nul(bases: dict[str, Path], tmp_path: Path) -> None:
    """A NUL in the data file name is a clean error (os.open would raise ValueError)."""
    path, loc = copy_base(bases, "datafile", tmp_path)
    pos, _, length = next(e for e in loc.extensions if e[1] == 0x44415441)
    patch(path, pos + 8 + length // 2, ">B", 0)
    with pytest.raises(ImageFormatError, match="data file name contains a NUL"):
        open_image(path)


# -- bounded memory -----------------------------------------------------------------------


def test_huge_snapshot_extra_data_is_refused_without_reading_it(
    bases: dict[str, Path], tmp_path: Path, peak_memory: Callable[[], int]
) -> None:
    path, loc = copy_base(bases, "snapshots", tmp_path)
    patch(path, loc.snapshot_entries[0] + 36, ">I", 0xFFFFFFF0)  # extra_data_size
    os.truncate(path, 2 * 1024 * MiB)  # a large (sparse) file the entry would run through
    tracemalloc.reset_peak()
    with open_image(path) as image:
        problem = image.snapshot_table_problem
        assert problem is not None
        assert "extra data" in problem
        assert image.snapshots == []
    assert peak_memory() < 4 * MiB


def test_snapshot_table_larger_than_qemu_allows(
    bases: dict[str, Path], tmp_path: Path, peak_memory: Callable[[], int]
) -> None:
    """65536 entries of 128 KiB each: refused at qemu's 64 MiB table limit."""
    path, loc = copy_base(bases, "snapshots", tmp_path)
    cs = loc.cluster_size
    table = (loc.file_size + cs - 1) // cs * cs
    entry_size = (40 + 0xFFFF + 0xFFFF + 7) & ~7
    with open(path, "r+b") as f:
        for k in range(64 * MiB // entry_size + 2):
            f.seek(table + k * entry_size + 12)
            f.write(struct.pack(">HH", 0xFFFF, 0xFFFF))
    os.truncate(path, table + 80 * MiB)
    patch(path, 60, ">I", 65536)
    patch(path, 64, ">Q", table)
    tracemalloc.reset_peak()
    with open_image(path) as image:
        problem = image.snapshot_table_problem
        assert problem is not None
        assert f"snapshot table at {table:#x} is larger than 64 MiB" in (problem)
    assert peak_memory() < 100 * MiB


def test_many_snapshots_of_a_huge_disk_stop_at_the_l1_budget(
    bases: dict[str, Path], tmp_path: Path, peak_memory: Callable[[], int]
) -> None:
    """1000 snapshots sharing one 8 MiB L1 table: presenting them all would hold 8 GB of L1.

    The image opens (its active state is fine); the snapshots past the budget
    are left out with a warning each, and --no-snapshots reads no snapshot at all.
    """
    path, loc = copy_base(bases, "snapshots", tmp_path)
    cs = loc.cluster_size
    l1_entries = 1 << 20
    l1_at = (loc.file_size + cs - 1) // cs * cs
    table = l1_at + l1_entries * 8
    disk_size = l1_entries * (cs // 8) * cs
    entries = bytearray()
    count = 1000
    for k in range(count):
        ident = str(k).encode()
        entry = (
            struct.pack(">QIHHIIQII", l1_at, l1_entries, len(ident), len(ident), 0, 0, 0, 0, 16)
            + struct.pack(">QQ", 0, disk_size)
            + ident
            + ident
        )
        entries += entry + bytes(-len(entry) % 8)
    with open(path, "r+b") as f:
        f.seek(table)
        f.write(entries)
    patch(path, 60, ">I", count)
    patch(path, 64, ">Q", table)
    tracemalloc.reset_peak()
    with open_image(path) as image:
        assert len(image.snapshots) == count
    mset = open_mount_set([str(path)], OpenOptions())
    try:
        budget = len(mset.files) - 1  # snapshots within 64 MiB of L1, the active one's too
        assert 0 < budget <= 64 * MiB // (l1_entries * 8)
        assert len(mset.damaged) == count - budget
        name, message = mset.damaged[0]
        assert name == f"snapshots@{budget}.raw"
        assert "would pass 64 MiB" in message
        assert message.startswith(f"{path}: snapshot '{budget}' (id {budget}) L1 table")
    finally:
        mset.close()
    assert peak_memory() < 400 * MiB
    mset = open_mount_set([str(path)], OpenOptions(), snapshots=False)
    mset.close()


def _append_compressed(path: Path, loc: Located, payload: bytes) -> int:
    """Append ``payload`` at a sector boundary past the end; return its host offset."""
    host = (loc.file_size + 511) // 512 * 512
    with open(path, "r+b") as f:
        f.seek(host)
        f.write(payload)
    return host


@pytest.mark.parametrize("kind", ["zstd", "zlib"])
def test_decompression_bomb_is_eio_with_bounded_memory(
    kind: str,
    bases: dict[str, Path],
    oracle: dict[str, bytes],
    tmp_path: Path,
    peak_memory: Callable[[], int],
) -> None:
    """A compressed cluster that inflates to 1 GiB: EIO (zstd) or one cluster (zlib), ~no memory.

    qemu fills one cluster from a zlib stream and ignores the rest; for zstd it
    requires the frame to end within the cluster.  Either way, no more than
    about a cluster is ever allocated.
    """
    path, loc = copy_base(bases, kind, tmp_path)
    entry = loc.compressed()[0]
    zeros = bytes(MiB)
    if kind == "zstd":  # a 1 GiB frame, without content size (as qemu writes them)
        zcomp = zstandard.ZstdCompressor(write_content_size=False).compressobj()
        bomb = b"".join(zcomp.compress(zeros) for _ in range(1024)) + zcomp.flush()
    else:  # deflate peaks near 1000:1, so 64 MiB fills the largest descriptor
        comp = zlib.compressobj(9, zlib.DEFLATED, -15)
        bomb = b"".join(comp.compress(zeros) for _ in range(64)) + comp.flush()
    max_bytes = (1 << (loc.cluster_bits - 8)) * 512
    assert len(bomb) <= max_bytes, len(bomb)
    host = _append_compressed(path, loc, bomb)
    patch(path, entry.pos, ">Q", loc.make_descriptor(host, (len(bomb) + 511) // 512))
    cs = loc.cluster_size
    tracemalloc.reset_peak()
    with open_image(path) as image:
        if kind == "zstd":
            assert_served_except(
                image, oracle[kind], [(entry.guest_offset, entry.guest_offset + cs)], cs
            )
        else:
            assert image.read(entry.guest_offset, cs) == bytes(cs)
    assert peak_memory() < 16 * MiB


# -- broken entries: EIO for exactly the affected range ----------------------------------


@pytest.mark.parametrize("how", ["past-eof", "unaligned", "reserved-high-bit"])
def test_broken_l1_entry_fails_only_its_table(
    how: str, bases: dict[str, Path], oracle: dict[str, bytes], tmp_path: Path
) -> None:
    path, loc = copy_base(bases, "plain", tmp_path)
    span = loc.cluster_size * (loc.cluster_size // 8)
    index = 1
    value = {
        "past-eof": COPIED | (loc.file_size + 16 * loc.cluster_size),
        "unaligned": loc.l1[index] + 512,
        "reserved-high-bit": COPIED | (1 << 55) | loc.l1[index],
    }[how]
    patch(path, loc.l1_table_offset + 8 * index, ">Q", value)
    with open_image(path) as image:
        assert_served_except(image, oracle["plain"], [(index * span, (index + 1) * span)], 64 * KiB)


@pytest.mark.parametrize("how", ["past-eof", "unaligned", "header"])
def test_broken_l2_entry_fails_only_its_cluster(
    how: str, bases: dict[str, Path], oracle: dict[str, bytes], tmp_path: Path
) -> None:
    path, loc = copy_base(bases, "plain", tmp_path)
    entry = loc.normal()[len(loc.normal()) // 2]
    host = entry.value & OFFSET_MASK
    value = {
        "past-eof": COPIED | (loc.file_size + 64 * loc.cluster_size),
        "unaligned": COPIED | (host + 512),
        "header": COPIED | 512,
    }[how]
    patch(path, entry.pos, ">Q", value)
    cs = loc.cluster_size
    with open_image(path) as image:
        assert_served_except(
            image, oracle["plain"], [(entry.guest_offset, entry.guest_offset + cs)], cs
        )


@pytest.mark.parametrize("how", ["header", "past-eof", "payload"])
def test_broken_compressed_cluster_fails_only_itself(
    how: str, bases: dict[str, Path], oracle: dict[str, bytes], tmp_path: Path
) -> None:
    path, loc = copy_base(bases, "zlib", tmp_path)
    entry = max(loc.compressed(), key=lambda e: loc.descriptor(e.value)[1])
    host, nb = loc.descriptor(entry.value)
    if how == "payload":
        with open(path, "r+b") as f:  # garbage where the deflate stream starts
            f.seek(host)
            f.write(b"\xff" * 16)
    else:
        new_host = 512 if how == "header" else loc.file_size + 4096
        patch(path, entry.pos, ">Q", loc.make_descriptor(new_host, nb))
    cs = loc.cluster_size
    with open_image(path) as image:
        assert_served_except(
            image, oracle["zlib"], [(entry.guest_offset, entry.guest_offset + cs)], cs
        )


def test_zero_flag_in_a_v2_image_is_eio_like_qemu(
    bases: dict[str, Path], oracle: dict[str, bytes], tmp_path: Path
) -> None:
    path, loc = copy_base(bases, "v2", tmp_path)
    entry = loc.normal()[0]
    patch(path, entry.pos, ">Q", entry.value | ZERO)
    # qemu refuses to read that cluster too.
    qemu = subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(path), str(tmp_path / "x.raw")],
        capture_output=True,
        text=True,
    )
    assert qemu.returncode != 0
    assert "Zero cluster entry found in pre-v3 image" in qemu.stderr
    cs = loc.cluster_size
    with open_image(path) as image:
        assert_served_except(
            image, oracle["v2"], [(entry.guest_offset, entry.guest_offset + cs)], cs
        )


def test_subcluster_both_allocated_and_zero_is_eio(
    bases: dict[str, Path], oracle: dict[str, bytes], tmp_path: Path
) -> None:
    path, loc = copy_base(bases, "extl2", tmp_path)
    entry = next(e for e in loc.normal() if e.bitmap)
    alloc = (entry.bitmap or 0) & 0xFFFFFFFF
    lowest = alloc & -alloc
    patch(path, entry.pos + 8, ">Q", (entry.bitmap or 0) | (lowest << 32))
    cs = loc.cluster_size
    with open_image(path) as image:
        assert_served_except(
            image, oracle["extl2"], [(entry.guest_offset, entry.guest_offset + cs)], cs
        )


# -- truncation -----------------------------------------------------------------------------


def test_truncated_files_never_serve_wrong_bytes(
    bases: dict[str, Path], oracle: dict[str, bytes], tmp_path: Path
) -> None:
    """Cut at many points: a clean error at open, or every cluster exact or EIO."""
    rng = random.Random(5)
    for kind in ("plain", "zlib", "zstd", "extl2"):
        src = bases[kind]
        loc = locate(src)
        cuts = {
            loc.file_size - 1,
            loc.file_size - loc.cluster_size // 2,
            *(rng.randrange(loc.cluster_size, loc.file_size) for _ in range(6)),
        }
        for cut in sorted(cuts):
            path = tmp_path / f"{kind}-{cut}.qcow2"
            path.write_bytes(src.read_bytes()[:cut])
            try:
                image = open_image(path)
            except SparsefsError:
                continue
            with image:
                _exact_or_eio(image, oracle[kind], loc.cluster_size, f"{kind} cut at {cut}")


def _exact_or_eio(image: Qcow2Image, expected: bytes, step: int, what: str) -> None:
    for off in range(0, image.size, step):
        try:
            got = image.read(off, step)
        except ImageReadError:
            continue
        assert got == expected[off : off + step], f"{what}: wrong bytes at {off}"


def test_image_shrinking_while_open_never_serves_wrong_bytes(tmp_path: Path) -> None:
    """Truncated under an open image whose L2 cache holds two tables: EIO, not zeros.

    Four L2 tables, a cache for two: after the cut, a table that must be read
    again comes back short.  That must not look like an empty table (which
    would turn the data it maps into holes).
    """
    path = make_image(
        tmp_path / "shrink.qcow2",
        8 * MiB,
        seed=8,
        options=["cluster_size=4096"],
        writes=0,
        zero_writes=0,
        discards=0,
    )
    qemu_io(path, *(f"write -q -P {0x10 + i} {i * 2 + 1}M 64k" for i in range(4)))
    expected = qemu_raw(path, tmp_path / "shrink.raw").read_bytes()
    loc = locate(path)
    assert len(loc.l2_tables) == 4
    cs = loc.cluster_size
    options = OpenOptions(l2_cache_bytes=2 * cs, compressed_cache_bytes=cs)
    with open_image(path, options) as image:
        assert image.read(0, image.size) == expected  # the cache now holds the last two tables
        os.truncate(path, sorted(loc.l2_tables)[1])  # the second table and all after it are gone
        failed = 0
        for off in range(0, image.size, 64 * KiB):
            try:
                got = image.read(off, 64 * KiB)
            except ImageReadError:
                failed += 1
                continue
            assert got == expected[off : off + 64 * KiB], f"wrong bytes at {off} after truncation"
        assert failed >= 3


def test_data_file_shrinking_while_open_is_eio(
    bases: dict[str, Path], oracle: dict[str, bytes], tmp_path: Path
) -> None:
    path, _ = copy_base(bases, "datafile", tmp_path)
    data = bases["datafile"].with_name("datafile.data")
    saved = data.read_bytes()
    try:
        with open_image(path) as image:
            assert image.read(0, image.size) == oracle["datafile"]
            os.truncate(data, 64 * KiB)
            assert image.read(0, 64 * KiB) == oracle["datafile"][: 64 * KiB]
            with pytest.raises(ImageReadError, match="truncated"):
                image.read(64 * KiB, 64 * KiB)
    finally:
        data.write_bytes(saved)


# -- concurrency ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zstd", "zlib"])
def test_concurrent_reads_of_compressed_clusters_are_exact(
    kind: str, bases: dict[str, Path], oracle: dict[str, bytes]
) -> None:
    """Eight threads decompressing at once (no cache hits) get exact bytes.

    A zstd decompression context shared between threads returns wrong bytes;
    each reading thread must have its own.
    """
    loc = locate(bases[kind])
    cs = loc.cluster_size
    clusters = [e.guest_offset for e in loc.compressed()]
    expected = oracle[kind]
    errors: list[str] = []
    with open_image(bases[kind], OpenOptions(compressed_cache_bytes=0)) as image:

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(300):
                off = rng.choice(clusters)
                try:
                    got = image.read(off, cs)
                except Exception as exc:
                    errors.append(f"thread {seed}: cluster {off:#x}: {exc!r}")
                    return
                if got != expected[off : off + cs]:
                    errors.append(f"thread {seed}: wrong bytes in cluster {off:#x}")
                    return

        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:3]


# -- files that are not images -------------------------------------------------------------


def test_fifo_image_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.qcow2"
    os.mkfifo(fifo)
    with Watchdog(20), pytest.raises(UnsupportedFeatureError, match="is a FIFO"):
        open_image(fifo)
    line = one_line_error(["info", str(fifo)])
    assert str(fifo) in line
    assert "FIFO" in line


# -- backing files ----------------------------------------------------------------------------


def _rebase_unsafe(image: Path, backing: str, fmt: str = "qcow2") -> None:
    run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", backing, "-F", fmt, str(image)])


@pytest.mark.parametrize(
    "name",
    [
        "nbd:localhost:10809",
        'json:{"driver":"file","filename":"/etc/passwd"}',
        "http://example.com/base.qcow2",
        "file:base.qcow2",
    ],
)
def test_protocol_backing_names_are_refused(name: str, tmp_path: Path) -> None:
    image = qemu_img_create(tmp_path / "top.qcow2", MiB)
    _rebase_unsafe(image, name, fmt="raw")
    with pytest.raises(UnsupportedFeatureError, match="names a protocol"):
        open_image(image)
    line = one_line_error(["info", str(image)])
    assert str(image) in line
    assert "protocol" in line
    # Without the chain, the top layer alone is served.
    with open_image(image, OpenOptions(backing=False)) as top:
        assert top.read(0, 4096) == bytes(4096)


def test_protocol_data_file_name_is_refused(bases: dict[str, Path], tmp_path: Path) -> None:
    path, loc = copy_base(bases, "datafile", tmp_path)
    pos, _, length = next(e for e in loc.extensions if e[1] == 0x44415441)
    name = b"nbd:127.0.0.1:1"
    with open(path, "r+b") as f:
        f.seek(pos + 4)
        f.write(struct.pack(">I", len(name)))
        f.write(name + bytes(length - len(name) if length > len(name) else 0))
    with pytest.raises(UnsupportedFeatureError, match=r"data file .* names a protocol"):
        open_image(path)


def test_backing_loops_are_refused(tmp_path: Path) -> None:
    a = qemu_img_create(tmp_path / "a.qcow2", MiB)
    b = qemu_img_create(tmp_path / "b.qcow2", MiB)
    _rebase_unsafe(a, "a.qcow2")  # itself
    with pytest.raises(ImageFormatError, match="makes a loop"):
        open_image(a)
    _rebase_unsafe(a, "b.qcow2")
    _rebase_unsafe(b, "a.qcow2")  # a -> b -> a
    with pytest.raises(ImageFormatError, match="makes a loop"):
        open_image(a)
    # A hard link is the same file under another name: c -> d == c.
    c = qemu_img_create(tmp_path / "c.qcow2", MiB)
    os.link(c, tmp_path / "d.qcow2")
    _rebase_unsafe(c, "d.qcow2")
    with Watchdog(20), pytest.raises(ImageFormatError, match="makes a loop"):
        open_image(c)
    # A symlink to an image further up the chain.
    e = qemu_img_create(tmp_path / "e.qcow2", MiB)
    f = qemu_img_create(tmp_path / "f.qcow2", MiB)
    os.symlink("e.qcow2", tmp_path / "link.qcow2")
    _rebase_unsafe(e, "f.qcow2")
    _rebase_unsafe(f, "link.qcow2")
    with pytest.raises(ImageFormatError, match="makes a loop"):
        open_image(e)


def test_overlong_chain_is_refused(tmp_path: Path) -> None:
    """MAX_CHAIN_LENGTH images open (and read through); one more is refused cleanly."""
    template = qemu_img_create(tmp_path / "template.qcow2", MiB)
    qemu_io(template, "write -q -P 0x77 0 4k")
    _rebase_unsafe(template, "c0000.qcow2")
    raw = template.read_bytes()
    name_at, name_len = struct.unpack_from(">QI", raw, 8)
    assert raw[name_at : name_at + name_len] == b"c0000.qcow2"
    n = MAX_CHAIN_LENGTH + 1
    for i in range(n):
        buf = bytearray(raw)
        if i == n - 1:
            put(buf, 8, ">Q", 0)  # the last one has no backing file
            put(buf, 16, ">I", 0)
        else:
            buf[name_at : name_at + name_len] = f"c{i + 1:04d}.qcow2".encode()
        (tmp_path / f"c{i:04d}.qcow2").write_bytes(bytes(buf))
    with open_image(tmp_path / "c0001.qcow2") as image:  # exactly MAX_CHAIN_LENGTH images
        assert len(image.chain()) == MAX_CHAIN_LENGTH - 1
        assert image.read(0, 8192) == b"\x77" * 4096 + bytes(4096)
    with pytest.raises(UnsupportedFeatureError, match=f"longer than {MAX_CHAIN_LENGTH}"):
        open_image(tmp_path / "c0000.qcow2")


def test_backing_dir_confines_backing_and_data_files(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    inside = tmp_path / "inside"
    outside = tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    base = qemu_img_create(outside / "base.qcow2", MiB)
    top = qemu_img_create(inside / "top.qcow2", MiB)
    _rebase_unsafe(top, str(base))
    confined = OpenOptions(backing_dir=str(inside))
    with pytest.raises(UnsupportedFeatureError, match="outside --backing-dir"):
        open_image(top, confined)
    line = one_line_error(["info", "--backing-dir", str(inside), str(top)])
    assert "outside --backing-dir" in line
    # A symlink inside that points outside is still outside.
    os.symlink(base, inside / "sneaky.qcow2")
    _rebase_unsafe(top, "sneaky.qcow2")
    with pytest.raises(UnsupportedFeatureError, match="outside --backing-dir"):
        open_image(top, confined)
    # Inside is fine.
    shutil.copy(base, inside / "base.qcow2")
    _rebase_unsafe(top, "base.qcow2")
    with open_image(top, confined) as image:
        assert image.chain()[0][0] == str(inside / "base.qcow2")
    # An external data file outside is refused the same way.
    datafile = bases["datafile"]
    with pytest.raises(UnsupportedFeatureError, match=r"data file .* outside --backing-dir"):
        open_image(datafile, confined)
    with open_image(datafile, OpenOptions(backing_dir=str(datafile.parent))):
        pass


@pytest.mark.parametrize("kind", ["fifo", "directory", "chardev"])
def test_backing_that_is_not_a_regular_file_is_refused(kind: str, tmp_path: Path) -> None:
    top = qemu_img_create(tmp_path / "top.qcow2", MiB)
    if kind == "fifo":
        os.mkfifo(tmp_path / "base")
        name = "base"
    elif kind == "directory":
        (tmp_path / "base").mkdir()
        name = "base"
    else:
        name = "/dev/zero"
    _rebase_unsafe(top, name, fmt="raw")
    with Watchdog(20), pytest.raises(UnsupportedFeatureError, match="sparsefs reads regular files"):
        open_image(top)


# -- the FUSE layer ------------------------------------------------------------------------


class _BuggySource:
    """A source whose reads and extent walks fail with an error that is not a SparsefsError."""

    size = 1 << 20

    def read(self, guest_offset: int, length: int) -> bytes:
        raise ValueError("a bug in a reader")

    def iter_extents(self, guest_offset: int = 0) -> Iterator[Extent]:
        if guest_offset:
            raise KeyError("a bug in an extent walk")
        yield Extent(0, self.size, data=True)


def test_unexpected_errors_cost_one_request_not_the_mount(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception that is not a SparsefsError is answered EIO and logged with its traceback.

    Anything else escaping a handler would end pyfuse3's main loop: one bad
    request would unmount everything.
    """
    import pyfuse3
    import trio

    from sparsefs.fusefs import SparseFS

    ops = SparseFS({"bug.raw": _BuggySource()})
    inode = next(iter(ops._nodes))
    for call in (
        lambda: ops.read(inode, 0, 4096),
        lambda: ops.lseek(inode, inode, 4096, os.SEEK_DATA),
    ):
        with pytest.raises(pyfuse3.FUSEError) as info:
            trio.run(call)
        assert info.value.errno == errno.EIO
    assert "a bug in a reader" in caplog.text
    assert "a bug in an extent walk" in caplog.text
