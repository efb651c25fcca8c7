"""The checksum tool without FUSE: digests, verify and --check against qemu's bytes.

Oracles: ``qemu-img convert -O raw`` for the content, ``qemu-img map`` for where
data and holes are, ``xxh128sum`` for the stream digest, and an independent
reimplementation of the documented sparsefs1 definition (plain reads of a raw
file, no sparsefs code) for the block digest.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefs import checksum as C
from sparsefs.cli.checksum import format_line, parse_manifest_line
from sparsefs.errors import ImageReadError
from sparsefs.extents import Extent
from sparsefs.formats import opened
from sparsefs.progress import Progress, human_bytes, human_duration
from sparsefs.raw import RawFile
from support import (
    SPARSEFS,
    KiB,
    MiB,
    make_image,
    num,
    oracle_data_bytes,
    qemu_compress,
    qemu_img_create,
    qemu_io,
    qemu_map,
    qemu_raw,
    run,
    seek_walk,
    sparsefs,
)

BLOCK = 1 * MiB  # the documented block size


# -- the documented definition, reimplemented from the README text ------------------


def reference_digest(path: Path, block_size: int = BLOCK) -> str:
    """sparsefs1 of a raw file's bytes, straight from the definition (reads every byte)."""
    size = path.stat().st_size
    fold = xxhash.xxh3_128()
    fold.update(b"sparsefs1\0" + size.to_bytes(8, "little") + block_size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        while block := f.read(block_size):
            fold.update(xxhash.xxh3_128(block).digest())
    return "sparsefs1:" + fold.hexdigest()


def reference_digest_bytes(data: bytes, block_size: int) -> str:
    fold = xxhash.xxh3_128()
    fold.update(b"sparsefs1\0" + len(data).to_bytes(8, "little") + block_size.to_bytes(8, "little"))
    for pos in range(0, len(data), block_size):
        fold.update(xxhash.xxh3_128(data[pos : pos + block_size]).digest())
    return "sparsefs1:" + fold.hexdigest()


def xxh128sum(path: Path) -> str:
    """The line xxh128sum prints for ``path`` (run from its directory, so NAME is the base name)."""
    return run(["xxh128sum", path.name], cwd=path.parent).stdout.rstrip("\n")


def digests(*paths: Path | str, extra: tuple[str, ...] = (), cwd: Path | None = None) -> list[str]:
    """``sparsefs checksum`` of the files: the DIGEST column, in order."""
    proc = sparsefs("checksum", "--quiet", *extra, *map(str, paths), check=True, cwd=cwd)
    lines = proc.stdout.splitlines()
    assert len(lines) == len(paths), proc.stdout
    return [line.split("  ", 1)[0] for line in lines]


def flip_byte(path: Path, offset: int) -> None:
    """Invert one byte of a file in place (a hole byte becomes 0xff data)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


# -- images: one builder per kind ---------------------------------------------------


def _plain(d: Path) -> Path:
    # Not a multiple of the block size: the last block is short.
    img = make_image(
        d / "plain.qcow2",
        22 * MiB + 7 * 512,
        seed=41,
        writes=24,
        zero_writes=5,
        discards=5,
        max_len=1536 * KiB,
    )
    rnd = d / "random.bin"
    rnd.write_bytes(random.Random(7).randbytes(3 * MiB))
    qemu_io(
        img,
        f"write -q -s {rnd} {5 * MiB + 4096} {3 * MiB}",
        f"write -q -s {rnd} {22 * MiB + 3 * 512} {2048}",
    )  # data in the short last block
    return img


def _compressed(d: Path) -> Path:
    src = _plain(d)
    return qemu_compress(src, d / "compressed.qcow2")


def _compressed_zstd(d: Path) -> Path:
    src = _plain(d)
    return qemu_compress(src, d / "zstd.qcow2", "zstd")


def _backing_chain(d: Path) -> Path:
    base = make_image(d / "base.qcow2", 18 * MiB, seed=5, writes=20, max_len=1 * MiB)
    mid = make_image(
        d / "mid.qcow2",
        18 * MiB,
        seed=6,
        writes=8,
        zero_writes=3,
        discards=2,
        backing=str(base),
        backing_fmt="qcow2",
    )
    return make_image(
        d / "top.qcow2",
        20 * MiB + 512,
        seed=7,
        writes=8,
        zero_writes=3,
        discards=3,
        backing=str(mid),
        backing_fmt="qcow2",
    )


def _extended_l2(d: Path) -> Path:
    return make_image(
        d / "subclusters.qcow2",
        17 * MiB + 3 * 512,
        seed=9,
        options=["extended_l2=on", "cluster_size=128k"],
        writes=30,
        zero_writes=6,
        discards=6,
        max_len=200 * KiB,
    )


KINDS = {
    "plain": _plain,
    "compressed": _compressed,
    "compressed-zstd": _compressed_zstd,
    "backing-chain": _backing_chain,
    "extended-l2": _extended_l2,
}


@pytest.fixture(scope="module", params=list(KINDS))
def image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return KINDS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The plain image and its qemu-img convert -O raw output (treat both as read-only)."""
    d = tmp_path_factory.mktemp("plain")
    img = _plain(d)
    return img, qemu_raw(img, d / "plain.raw")


@pytest.fixture
def copy(plain: tuple[Path, Path], tmp_path: Path) -> Path:
    """A fresh sparse copy of the plain image's raw content, for tests that modify it."""
    out = tmp_path / "copy.raw"
    run(["cp", "--sparse=always", str(plain[1]), str(out)])
    return out


# -- the digest of an image equals the digest of every copy of its content ----------


def test_image_digest_equals_every_copy(image: Path, tmp_path: Path) -> None:
    raw = qemu_raw(image, tmp_path / "qemu.raw")
    sparse = tmp_path / "sparse.raw"
    full = tmp_path / "full.raw"
    run(["cp", "--sparse=always", str(raw), str(sparse)])
    run(["cp", "--sparse=never", str(raw), str(full)])
    # The copies really differ in layout: holes in one, none in the other.
    size = raw.stat().st_size
    assert sum(e - s for s, e in seek_walk(sparse)) < size
    assert seek_walk(full) == [(0, size)]

    got = digests(image, raw, sparse, full)
    assert got == [reference_digest(raw)] * 4


def test_stream_xxh128_equals_xxh128sum(image: Path, tmp_path: Path) -> None:
    raw = qemu_raw(image, tmp_path / "disk.raw")
    expected = xxh128sum(raw)
    proc = sparsefs("checksum", "--quiet", "--stream-xxh128", "disk.raw", check=True, cwd=tmp_path)
    assert proc.stdout.rstrip("\n") == expected  # the whole line: DIGEST  NAME
    img_line = sparsefs("checksum", "--quiet", "--stream-xxh128", str(image), check=True).stdout
    assert img_line.split("  ")[0] == expected.split("  ")[0]


def test_qcow2_digest_reads_only_data(image: Path) -> None:
    """bytes-read of the qcow2 side equals what qemu-img map calls data."""
    proc = sparsefs("checksum", "--quiet", "--json", str(image), check=True)
    (record,) = json.loads(proc.stdout)
    assert record["bytes-read"] == oracle_data_bytes(image)
    assert record["bytes-read"] < record["size"]


def test_verify_equal(image: Path, tmp_path: Path) -> None:
    raw = qemu_raw(image, tmp_path / "disk.raw")
    proc = sparsefs("verify", "--quiet", str(image), str(raw))
    assert proc.returncode == 0, proc.stderr
    assert reference_digest(raw) in proc.stdout


# -- one flipped byte, anywhere, is found, with the right range ---------------------


def _spots(image: Path) -> dict[str, int]:
    qmap = qemu_map(image)
    data = next(e for e in qmap if e["data"] and not e["zero"] and num(e["length"]) > 2)
    hole = next(e for e in qmap if not e["data"] and num(e["length"]) > 2)
    size = num(qmap[-1]["start"]) + num(qmap[-1]["length"])
    assert size % BLOCK, "the image must end in a short block"
    return {
        "data": num(data["start"]) + num(data["length"]) // 2,
        "hole": num(hole["start"]) + num(hole["length"]) // 2,
        "last-partial-block": size - 3,
    }


@pytest.mark.parametrize("where", ["data", "hole", "last-partial-block"])
def test_flipped_byte_found_by_verify_and_check(
    plain: tuple[Path, Path], copy: Path, where: str, tmp_path: Path
) -> None:
    img, raw = plain
    offset = _spots(img)[where]
    manifest = tmp_path / "SUMS"
    manifest.write_text(
        sparsefs("checksum", "-q", str(img), check=True).stdout.replace(str(img), str(copy))
    )
    assert sparsefs("checksum", "--check", str(manifest)).returncode == 0

    in_data = any(s <= offset < e for s, e in seek_walk(copy))
    assert in_data == (where != "hole"), "the spot is not what the test claims"
    flip_byte(copy, offset)
    proc = sparsefs("verify", "--quiet", "--json", str(img), str(copy))
    assert proc.returncode == 1, proc.stderr
    diff = json.loads(proc.stdout)["difference"]
    size = raw.stat().st_size
    block = offset // BLOCK
    assert diff == {
        "kind": "content",
        "block": block,
        "start": block * BLOCK,
        "end": min((block + 1) * BLOCK, size),
        "offset": offset,
    }
    text = sparsefs("verify", "--quiet", str(img), str(copy))
    assert text.returncode == 1
    assert f"byte {offset}," in text.stdout
    assert f"[{block * BLOCK}, {min((block + 1) * BLOCK, size)})" in text.stdout

    check = sparsefs("checksum", "--check", str(manifest))
    assert check.returncode == 1
    assert check.stdout == f"{copy}: FAILED\n"
    assert "1 computed checksum did NOT match" in check.stderr
    no_traceback(check)


@pytest.mark.parametrize("change", ["truncated", "extended-by-zeros", "extended-by-data"])
def test_wrong_length_is_a_difference(
    plain: tuple[Path, Path], copy: Path, change: str, tmp_path: Path
) -> None:
    img, raw = plain
    size = raw.stat().st_size
    manifest = tmp_path / "SUMS"
    manifest.write_text(format_line(digests(img)[0], str(copy)) + "\n")
    if change == "truncated":
        os.truncate(copy, size - 512)
    elif change == "extended-by-zeros":
        os.truncate(copy, size + 1)
    else:
        with open(copy, "ab") as f:
            f.write(b"x")
    new_size = copy.stat().st_size
    proc = sparsefs("verify", "-q", str(img), str(copy))
    assert proc.returncode == 1
    word = "shorter" if new_size < size else "longer"
    assert f"{copy} is {new_size} bytes, {word} than {img} ({size} bytes)" in proc.stdout
    check = sparsefs("checksum", "-c", str(manifest))
    assert (check.returncode, check.stdout) == (1, f"{copy}: FAILED\n")
    assert digests(copy) == [reference_digest(copy)]


# -- errors: one line, the right exit status ----------------------------------------


def test_verify_exit_2_on_errors(plain: tuple[Path, Path], tmp_path: Path) -> None:
    img, raw = plain
    cases = {
        "missing copy": ([str(img), str(tmp_path / "nope.raw")], "nope.raw: no such file"),
        "missing image": ([str(tmp_path / "nope.qcow2"), str(raw)], "nope.qcow2"),
        # a raw IMAGE is probed as raw (no magic matches); forced qcow2 refuses it
        "image not qcow2": (["-f", "qcow2", str(raw), str(raw)], str(raw)),
        "copy is a directory": ([str(img), str(tmp_path)], "is a directory"),
    }
    for name, (argv, needle) in cases.items():
        proc = sparsefs("verify", "-q", *argv)
        assert proc.returncode == 2, (name, proc.stderr)
        assert proc.stdout == "", name
        assert len(proc.stderr.splitlines()) == 1, (name, proc.stderr)
        assert needle in proc.stderr, (name, proc.stderr)
        no_traceback(proc)
    # -f raw reads IMAGE as raw: the qemu raw output then verifies against itself.
    assert sparsefs("verify", "-q", "-f", "raw", str(raw), str(raw)).returncode == 0


def test_checksum_missing_file(plain: tuple[Path, Path], tmp_path: Path) -> None:
    _img, raw = plain
    proc = sparsefs("checksum", "-q", str(tmp_path / "gone.raw"), str(raw))
    assert proc.returncode == 1
    assert proc.stdout == format_line(reference_digest(raw), str(raw)) + "\n"
    assert proc.stderr.strip() == f"sparsefs: {tmp_path / 'gone.raw'}: no such file"

    manifest = tmp_path / "SUMS"
    manifest.write_text(
        format_line(reference_digest(raw), str(tmp_path / "gone.raw"))
        + "\n"
        + format_line(reference_digest(raw), str(raw))
        + "\n"
    )
    check = sparsefs("checksum", "--check", str(manifest))
    assert check.returncode == 1
    assert check.stdout == f"{tmp_path / 'gone.raw'}: FAILED open or read\n{raw}: OK\n"
    assert "gone.raw: no such file" in check.stderr
    assert "1 listed file could not be read" in check.stderr
    no_traceback(check)

    missing_manifest = sparsefs("checksum", "--check", str(tmp_path / "NOSUMS"))
    assert missing_manifest.returncode == 1
    assert "NOSUMS: cannot read manifest" in missing_manifest.stderr
    no_traceback(missing_manifest)


# -- the format rule: a raw copy is never sniffed ----------------------------------


def test_raw_copy_starting_with_a_qcow2_header_is_raw(tmp_path: Path) -> None:
    header_src = qemu_img_create(tmp_path / "inner.qcow2", 1 * MiB)
    img = qemu_img_create(tmp_path / "guest.qcow2", 9 * MiB)
    qemu_io(img, f"write -q -s {header_src} 0 64k", "write -q -P 0x5a 6M 100k")
    copy = qemu_raw(img, tmp_path / "disk.img")  # no .qcow2 suffix
    assert copy.read_bytes()[:4] == b"QFI\xfb"
    expected = reference_digest(copy)
    assert digests(img, copy) == [expected, expected]
    assert sparsefs("verify", "-q", str(img), str(copy)).returncode == 0
    # Even the qcow2 file itself, named without the suffix, is hashed as its bytes.
    alias = tmp_path / "inner.bin"
    shutil.copyfile(header_src, alias)
    assert digests(alias) == [reference_digest(alias)]
    # -f raw overrides the suffix; -f qcow2 forces qcow2 on any name.
    assert digests(header_src, extra=("-f", "raw")) == [reference_digest(header_src)]
    inner_raw = qemu_raw(header_src, tmp_path / "inner.raw")
    assert digests(alias, extra=("-f", "qcow2")) == [reference_digest(inner_raw)]


# -- manifests: our own, xxh128sum's, and xxh128sum reading ours --------------------


def test_check_reads_xxh128sum_manifests_and_xxh128sum_reads_ours(
    plain: tuple[Path, Path], tmp_path: Path
) -> None:
    _img, raw = plain
    work = tmp_path / "w"
    work.mkdir()
    shutil.copyfile(raw, work / "a.raw")
    (work / "odd name\\x.raw").symlink_to(work / "a.raw")
    gnu = run(["xxh128sum", "a.raw", "odd name\\x.raw"], cwd=work).stdout
    tag = run(["xxh128sum", "--tag", "a.raw"], cwd=work).stdout
    (work / "GNU").write_text(gnu)
    (work / "TAG").write_text(tag)
    for manifest in ("GNU", "TAG"):
        proc = sparsefs("checksum", "-c", manifest, cwd=work)
        assert proc.returncode == 0, proc.stderr
        assert all(line.endswith(": OK") for line in proc.stdout.splitlines()), proc.stdout

    ours = sparsefs(
        "checksum", "-q", "--stream-xxh128", "a.raw", "odd name\\x.raw", check=True, cwd=work
    ).stdout
    assert ours == gnu
    (work / "OURS").write_text(ours)
    run(["xxh128sum", "-c", "OURS"], cwd=work)


def test_names_that_are_not_utf8(plain: tuple[Path, Path], tmp_path: Path) -> None:
    """A file name with an undecodable byte is printed as its bytes and checked back."""
    _, raw = plain
    name = b"bad\xffname.raw"
    shutil.copyfile(raw, os.path.join(os.fsencode(tmp_path), name))
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    out = subprocess.run(
        [*SPARSEFS, "checksum", "-q", os.fsdecode(name)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        check=True,
    ).stdout
    assert out == reference_digest(raw).encode() + b"  " + name + b"\n"
    (tmp_path / "SUMS").write_bytes(out)
    check = subprocess.run(
        [*SPARSEFS, "checksum", "-c", "SUMS"], cwd=tmp_path, env=env, capture_output=True
    )
    assert (check.returncode, check.stdout, check.stderr) == (0, name + b": OK\n", b"")


def test_manifest_lines_round_trip() -> None:
    digest = "sparsefs1:" + "0123456789abcdef" * 2
    for name in (
        "plain.raw",
        "with space.raw",
        "back\\slash",
        "new\nline",
        "cr\rname",
        " lead",
        "*star",
    ):
        entry = parse_manifest_line(format_line(digest, name))
        assert entry is not None
        assert (entry.digest, entry.name) == (digest, name)
    entry = parse_manifest_line("ABCDEF0123456789ABCDEF0123456789 *bin.raw")
    assert entry is not None
    assert entry.stream
    assert entry.name == "bin.raw"
    assert entry.digest == "abcdef0123456789abcdef0123456789"
    for bad in (
        "",
        "sparsefs1:abc  x",
        "0123  x",
        "sparsefs1:" + "0" * 32 + " x",
        "XXH64 (x) = 0123456789abcdef",
    ):
        assert parse_manifest_line(bad) is None, bad


def test_checksum_json(plain: tuple[Path, Path]) -> None:
    img, raw = plain
    proc = sparsefs("checksum", "--json", str(img), str(raw), check=True)
    records = json.loads(proc.stdout)
    size = raw.stat().st_size
    assert [(r["file"], r["format"], r["algorithm"], r["digest"], r["size"]) for r in records] == [
        (str(img), "qcow2", "sparsefs1", reference_digest(raw), size),
        (str(raw), "raw", "sparsefs1", reference_digest(raw), size),
    ]
    verify = json.loads(sparsefs("verify", "--json", str(img), str(raw)).stdout)
    assert verify["equal"] is True
    assert verify["digest"] == reference_digest(raw)


def test_no_progress_bar_when_not_a_tty(plain: tuple[Path, Path]) -> None:
    img, raw = plain
    proc = sparsefs("checksum", str(img), check=True)  # no --quiet; stderr is a pipe
    assert proc.stderr == ""
    proc = sparsefs("verify", str(img), str(raw))
    assert (proc.returncode, proc.stderr) == (0, "")


# -- the digest engine on synthetic sources (any block size, any map) ----------------


class MemSource:
    """An in-memory SparseSource with a given map; holes must hold zeros."""

    def __init__(self, data: bytes, extents: list[Extent]) -> None:
        self.data = data
        self.extents = extents
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, guest_offset: int, length: int) -> bytes:
        self.reads.append((guest_offset, length))
        return self.data[guest_offset : guest_offset + length]

    def iter_extents(self, guest_offset: int = 0) -> Iterator[Extent]:
        assert guest_offset == 0
        return iter(self.extents)


@st.composite
def sources(draw: st.DrawFn) -> MemSource:
    """Random content and map: data runs (some all zero, some 'zero' flagged), holes."""
    size = draw(st.integers(0, 700))
    data = bytearray(size)
    extents = []
    pos = 0
    while pos < size:
        n = draw(st.integers(1, min(size - pos, 90)))
        kind = draw(st.sampled_from(["data", "data-zeros", "hole", "known-zero"]))
        if kind == "data":
            data[pos : pos + n] = draw(st.binary(min_size=n, max_size=n))
        extents.append(
            Extent(
                pos, n, data=kind in ("data", "data-zeros", "known-zero"), zero=kind == "known-zero"
            )
        )
        pos += n
    return MemSource(bytes(data), extents)


@settings(max_examples=300, deadline=None)
@given(src=sources(), block_size=st.sampled_from([1, 7, 64, 100, 4096]))
def test_block_digest_matches_definition(src: MemSource, block_size: int) -> None:
    result = C.block_digest(src, block_size=block_size)
    assert result.digest == reference_digest_bytes(src.data, block_size)
    # Holes and known-zero runs are never read.
    for off, n in src.reads:
        for ext in src.extents:
            if not ext.data or ext.zero:
                assert off + n <= ext.guest_offset or off >= ext.end, (off, n, ext)
    assert result.bytes_read == sum(n for _, n in src.reads)


@settings(max_examples=200, deadline=None)
@given(src=sources())
def test_stream_matches_xxh128_of_bytes(src: MemSource) -> None:
    assert C.stream_xxh128(src).digest == xxhash.xxh3_128_hexdigest(src.data)


@settings(max_examples=200, deadline=None)
@given(src=sources(), block_size=st.sampled_from([1, 16, 64, 100]), data=st.data())
def test_compare_names_the_first_difference(
    src: MemSource, block_size: int, data: st.DataObject
) -> None:
    other = bytearray(src.data)
    flips = data.draw(st.lists(st.integers(0, max(0, len(other) - 1)), max_size=3))
    for i in flips if other else ():
        other[i] ^= 0x41
    copy = MemSource(bytes(other), [Extent(0, len(other), data=True)] if other else [])
    diff, result = C.compare(src, copy, block_size=block_size)
    changed = [i for i in range(len(other)) if other[i] != src.data[i]]
    if not changed:
        assert diff is None
        assert result is not None
        assert result.digest == reference_digest_bytes(src.data, block_size)
        return
    first = changed[0]
    block = first // block_size
    assert diff is not None
    assert (diff.block, diff.start, diff.end, diff.offset) == (
        block,
        block * block_size,
        min((block + 1) * block_size, len(other)),
        first,
    )


def test_compare_different_lengths_reads_nothing() -> None:
    a = MemSource(b"abc" * 10, [Extent(0, 30, data=True)])
    b = MemSource(b"abc" * 10 + b"\0", [Extent(0, 31, data=True)])
    diff, result = C.compare(a, b)
    assert result is None
    assert diff is not None
    assert diff.length_differs
    assert (diff.size_a, diff.size_b, diff.block) == (30, 31, None)
    assert a.reads == b.reads == []


def test_stored_zeros_hash_like_a_hole() -> None:
    size = 3 * 64 + 10
    hole = MemSource(bytes(size), [Extent(0, size, data=False, zero=True)])
    stored = MemSource(bytes(size), [Extent(0, size, data=True)])
    assert (
        C.block_digest(hole, block_size=64).digest
        == C.block_digest(stored, block_size=64).digest
        == reference_digest_bytes(bytes(size), 64)
    )
    assert hole.reads == []


def test_large_hole_costs_no_reads() -> None:
    """A 1 TiB hole with one data byte: one block read, digest per the definition."""
    size = 1 << 40

    class Huge:
        def __init__(self) -> None:
            self.reads: list[tuple[int, int]] = []

        @property
        def size(self) -> int:
            return size

        def read(self, guest_offset: int, length: int) -> bytes:
            self.reads.append((guest_offset, length))
            buf = bytearray(length)
            if guest_offset <= 12345678 < guest_offset + length:
                buf[12345678 - guest_offset] = 1
            return bytes(buf)

        def iter_extents(self, guest_offset: int = 0) -> Iterator[Extent]:
            yield Extent(0, 12345678, data=False, zero=True)
            yield Extent(12345678, 1, data=True)
            yield Extent(12345679, size - 12345679, data=False, zero=True)

    src = Huge()
    result = C.block_digest(src)
    assert src.reads == [(12345678, 1)]
    nb = size // BLOCK
    fold = xxhash.xxh3_128(
        b"sparsefs1\0" + size.to_bytes(8, "little") + BLOCK.to_bytes(8, "little")
    )
    zero = xxhash.xxh3_128_digest(bytes(BLOCK))
    one = bytearray(BLOCK)
    one[12345678 % BLOCK] = 1
    data_block = 12345678 // BLOCK
    fold.update(zero * data_block)
    fold.update(xxhash.xxh3_128_digest(bytes(one)))
    remaining = nb - data_block - 1
    while remaining:
        k = min(remaining, 1 << 16)
        fold.update(zero * k)
        remaining -= k
    assert result.digest == "sparsefs1:" + fold.hexdigest()


def test_read_error_is_raised() -> None:
    class Broken(MemSource):
        def read(self, guest_offset: int, length: int) -> bytes:
            raise ImageReadError("disk.qcow2: L2 table at 0x50000 is past the end of the file")

    src = Broken(bytes(300), [Extent(0, 100, data=False, zero=True), Extent(100, 200, data=True)])
    with pytest.raises(ImageReadError, match="L2 table"):
        C.block_digest(src, block_size=64)
    with pytest.raises(ImageReadError, match="L2 table"):
        C.stream_xxh128(src)


def test_raw_file_without_holes_is_read_whole(tmp_path: Path) -> None:
    """A fully written raw file (no holes to report) still digests like its sparse twin."""
    path = tmp_path / "full.raw"
    data = bytes(5 * MiB) + b"tail"
    path.write_bytes(data)
    with RawFile(path) as raw:
        result = C.block_digest(raw)
    assert result.digest == reference_digest(path)
    assert result.bytes_read == len(data)


# -- the progress bar ----------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_redraws_at_most_ten_times_a_second() -> None:
    out, clock = FakeTTY(), FakeClock()
    bar = Progress(10 * MiB, label="disk.raw", stream=out, clock=clock, width=80)
    assert bar.enabled
    for i in range(1000):  # many updates, no time passes: nothing drawn yet
        bar.update(i)
    assert out.getvalue() == ""
    clock.now += 0.11
    for i in range(1000):  # one draw per interval, however many updates
        bar.update(1000 + i)
    assert out.getvalue().count("\r") == 1
    clock.now += 0.05
    bar.update(2000)
    assert out.getvalue().count("\r") == 1
    clock.now += 0.06
    bar.update(5 * MiB)
    assert out.getvalue().count("\r") == 2
    last = out.getvalue().rsplit("\r", 1)[1]
    assert last.startswith("disk.raw [")
    assert " 50% 5 MiB / 10 MiB" in last
    assert "MiB/s  ETA " in last
    assert len(last.replace("\x1b[K", "")) <= 79
    bar.close()
    assert out.getvalue().endswith("\r\x1b[K")


def test_progress_line_rate_and_eta() -> None:
    clock = FakeClock()
    bar = Progress(1000 * MiB, stream=FakeTTY(), clock=clock, width=100)
    clock.now += 2.0
    bar.update(200 * MiB)
    line = bar.line()
    assert " 20% 200 MiB / 1000 MiB  100 MiB/s  ETA 0:08" in line
    assert len(line) <= 99
    bar.update(1000 * MiB)
    assert "100%" in bar.line()
    assert "ETA 0:00" in bar.line()


def test_progress_silent_when_not_a_tty_or_quiet() -> None:
    pipe = io.StringIO()
    bar = Progress(100, stream=pipe)
    assert not bar.enabled
    tty = FakeTTY()
    quiet = Progress(100, stream=tty, enabled=False)
    for n in range(0, 101, 10):
        bar.update(n)
        quiet.update(n)
    bar.close()
    quiet.close()
    assert pipe.getvalue() == tty.getvalue() == ""


def test_progress_narrow_terminal_and_long_label() -> None:
    bar = Progress(
        100,
        label="/very/long/path/" * 10 + "disk.raw",
        stream=FakeTTY(),
        clock=FakeClock(),
        width=70,
    )
    bar.update(50)
    line = bar.line()
    assert len(line) <= 69
    assert line.startswith("...")
    assert "disk.raw [" in line


def test_human_units() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(16 << 30) == "16 GiB"
    assert human_bytes(1000 << 20) == "1000 MiB"
    assert human_bytes(123.4 * (1 << 30)) == "123 GiB"
    assert human_duration(59.6) == "1:00"
    assert human_duration(3725) == "1:02:05"


def test_check_quiet_prints_only_failures(tmp_path: Path) -> None:
    """As ``sha256sum --check --quiet``: OK lines are left out, FAILED lines stay."""
    good = tmp_path / "good.raw"
    bad = tmp_path / "bad.raw"
    good.write_bytes(b"a" * 5000)
    bad.write_bytes(b"b" * 5000)
    manifest = tmp_path / "SUMS"
    lines = sparsefs("checksum", str(good), str(bad), check=True).stdout
    manifest.write_text(lines)
    bad.write_bytes(b"c" * 5000)
    proc = sparsefs("checksum", "--quiet", "--check", str(manifest))
    assert proc.returncode == 1
    assert proc.stdout == f"{bad}: FAILED\n"


def test_sub_block_digests_are_those_of_the_bytes(tmp_path: Path) -> None:
    """block_digest(fine_size=F): each data block's non-zero F-byte pieces, digested as
    xxh3_128 of the raw bytes, whatever the block's mix of data and holes."""
    image = tmp_path / "fines.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "5M"])
    run(
        [
            "qemu-io",
            "-c",
            "write -P 0x11 0 1M",  # a whole data block
            "-c",
            "write -P 0x22 1088k 64k",  # data and holes in one block
            "-c",
            "write -z 2M 64k",  # zeros stored as zeros
            "-c",
            "write -P 0x33 4032k 4k",  # the last piece of the last block
            str(image),
        ]
    )
    raw = qemu_raw(image, tmp_path / "fines.raw").read_bytes()
    fine = 64 * 1024
    want = []
    for k in range(0, len(raw), fine):
        piece = raw[k : k + fine]
        if piece.count(0) != len(piece):
            want.append((k // fine, xxhash.xxh3_128_digest(piece)))
    got: list[tuple[int, bytes]] = []
    with opened(image, "qcow2") as src:
        result = C.block_digest(src, fine_size=fine, on_run=lambda r: got.extend(r.fines))
        assert result.digest == C.block_digest(src).digest
    assert got == want
