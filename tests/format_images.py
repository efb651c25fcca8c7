"""Builders for issue 3's image kinds, each made by qemu's own tools at test time.

One builder function per kind.  Each gets an empty directory and returns a
:class:`Built`: the image to open and where qemu must run to read it.  The
test modules (``tests/unit/test_formats.py``, ``tests/fuse/test_formats_mount.py``)
ask qemu for the truth about every image; nothing here records an answer.

Writes land at random (seeded) offsets, many of them not sector or cluster
aligned, with contents that differ per write (patterns, and ``write -s``
files mixing random bytes with compressible text), so a misplaced or
mis-decompressed cluster shows up as a byte difference.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from support import KiB, MiB, qemu_img_create, qemu_io, run


@dataclass(frozen=True)
class Built:
    """An image a builder made.

    Attributes:
        image: the qcow2 file to open.
        snapshots: names of its internal snapshots, oldest first.
        cwd: the directory qemu must run in to open it (relative data file
            names are relative to qemu's working directory); None for any.
        overlay: True when the image has a backing file.
    """

    image: Path
    snapshots: tuple[str, ...] = ()
    cwd: Path | None = None
    overlay: bool = False


# -- content --------------------------------------------------------------------------


def payload(rng: random.Random, length: int) -> bytes:
    """``length`` bytes mixing random data, compressible text, runs and zeros.

    The mix makes compressed clusters of many sizes (so descriptors span one
    or several sectors at unaligned offsets) and some clusters that do not
    compress at all (qemu stores those uncompressed).
    """
    out = bytearray()
    words = [b"qcow2 ", b"cluster ", b"backing ", b"sparse ", b"\x00\x00\x00\x00", b"\xff"]
    while len(out) < length:
        kind = rng.randrange(4)
        n = rng.randrange(64, 48 * KiB)
        if kind == 0:
            out += rng.randbytes(n)
        elif kind == 1:
            out += b"".join(rng.choice(words) for _ in range(n // 6 + 1))[:n]
        elif kind == 2:
            out += bytes([rng.randrange(1, 256)]) * n
        else:
            half = rng.randbytes(n // 2)
            out += half + bytes(n - len(half))
    return bytes(out[:length])


def write_source_file(path: Path, rng: random.Random, length: int) -> Path:
    """A file for ``qemu-io write -s`` (qemu repeats it when a write is longer)."""
    path.write_bytes(payload(rng, length))
    return path


def scribble(
    image: Path,
    rng: random.Random,
    size: int,
    *,
    writes: int = 12,
    zero_writes: int = 3,
    discards: int = 3,
    compressed_writes: int = 0,
    cluster_size: int = 64 * KiB,
    max_len: int = 256 * KiB,
    align: int = 1,
    lo: int = 0,
    fmt: str = "qcow2",
    cwd: Path | None = None,
) -> None:
    """Random writes into ``[lo, size)`` of an image with qemu-io, in one process.

    Offsets and lengths are multiples of ``align`` (1: any byte).  Data writes
    alternate between ``-P`` patterns and ``-s`` source files; zero writes use
    ``-z`` (half of them with ``-u``); compressed writes are whole clusters,
    made first.  ``cwd`` is where qemu-io runs (relative data file names).
    """
    src = write_source_file(image.parent / f".{image.name}.src", rng, max_len)
    commands = []

    def span() -> tuple[int, int]:
        length = rng.randrange(align, max_len + 1, align)
        offset = rng.randrange(lo, max(lo + align, size - length), align)
        return offset, min(length, size - offset)

    # Compressed writes first (qemu only compresses into a cluster with no host
    # offset, hence the discard); later writes then land partly over them.
    nb_clusters = size // cluster_size
    first = -(-lo // cluster_size)
    if compressed_writes and nb_clusters > first:
        picks = rng.sample(range(first, nb_clusters), min(compressed_writes, nb_clusters - first))
        for c in sorted(picks):
            commands.append(f"discard -q {c * cluster_size} {cluster_size}")
            commands.append(f"write -q -c -s {src} {c * cluster_size} {cluster_size}")
    for i in range(writes):
        off, n = span()
        if i % 2:
            commands.append(f"write -q -s {src} {off} {n}")
        else:
            commands.append(f"write -q -P {rng.randrange(1, 256)} {off} {n}")
    for i in range(zero_writes):
        off, n = span()
        commands.append(f"write -q -z {'-u ' if i % 2 else ''}{off} {n}")
    for _ in range(discards):
        off, n = span()
        commands.append(f"discard -q {off} {n}")
    cmd = ["qemu-io", "-f", fmt]
    for command in commands:
        cmd += ["-c", command]
    run([*cmd, str(image)], cwd=cwd)
    src.unlink()


def raw_file(path: Path, size: int, rng: random.Random, *, fill: float = 0.5) -> Path:
    """A sparse raw file of ``size`` bytes: ``payload`` runs with real holes between."""
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            n = min(rng.randrange(4 * KiB, 384 * KiB), size - pos)
            if rng.random() < fill:
                f.seek(pos)
                f.write(payload(rng, n))
            pos += n
    return path


def patch_extension_type(image: Path, ext_type: int, new_type: int) -> None:
    """Rewrite the type of a header extension in place (unknown types are skipped by readers)."""
    with open(image, "r+b") as f:
        head = f.read(64 * KiB)
        version = struct.unpack_from(">I", head, 4)[0]
        pos = struct.unpack_from(">I", head, 100)[0] if version >= 3 else 72
        while True:
            kind, length = struct.unpack_from(">II", head, pos)
            if kind == 0:
                raise AssertionError(f"{image}: no header extension {ext_type:#x}")
            if kind == ext_type:
                f.seek(pos)
                f.write(struct.pack(">I", new_type))
                return
            pos += 8 + ((length + 7) & ~7)


EXT_BACKING_FORMAT = 0xE2792ACA


# -- builders: one per kind -----------------------------------------------------------


def _plain(
    d: Path,
    size: int,
    seed: int,
    *options: str,
    cluster_size: int = 64 * KiB,
    max_len: int = 256 * KiB,
    align: int = 1,
) -> Built:
    img = qemu_img_create(d / "disk.qcow2", size, *options)
    scribble(
        img, random.Random(seed), size, cluster_size=cluster_size, max_len=max_len, align=align
    )
    return Built(img)


def build_compat_010(d: Path) -> Built:
    """qcow2 v2 (no zero flag: zero writes allocate or unmap)."""
    return _plain(d, 6 * MiB + 512, 10, "compat=0.10")


def build_cluster_512(d: Path) -> Built:
    return _plain(d, 3 * MiB, 512, "cluster_size=512", cluster_size=512, max_len=96 * KiB)


def build_cluster_4k(d: Path) -> Built:
    return _plain(d, 5 * MiB + 512, 4096, "cluster_size=4096", cluster_size=4096)


def build_cluster_64k(d: Path) -> Built:
    return _plain(d, 8 * MiB + 7 * 512, 65536, "cluster_size=65536")


def build_cluster_2m(d: Path) -> Built:
    return _plain(
        d, 9 * MiB + 4096, 2 * MiB, "cluster_size=2M", cluster_size=2 * MiB, max_len=512 * KiB
    )


def build_refcount_1(d: Path) -> Built:
    return _plain(d, 4 * MiB, 1, "refcount_bits=1", "cluster_size=4096", cluster_size=4096)


def build_refcount_64(d: Path) -> Built:
    return _plain(d, 4 * MiB, 64, "refcount_bits=64")


def _compressed(d: Path, ctype: str, cluster_size: int, size: int, seed: int) -> Path:
    src = raw_file(d / "src.raw", size, random.Random(seed), fill=0.6)
    img = d / "disk.qcow2"
    run(
        [
            "qemu-img",
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            f"compression_type={ctype},cluster_size={cluster_size}",
            str(src),
            str(img),
        ]
    )
    src.unlink()
    return img


def build_compressed_zlib(d: Path) -> Built:
    return Built(_compressed(d, "zlib", 64 * KiB, 6 * MiB, 20))


def build_compressed_zstd(d: Path) -> Built:
    return Built(_compressed(d, "zstd", 64 * KiB, 6 * MiB, 21))


def build_compressed_zlib_512(d: Path) -> Built:
    """512-byte clusters: the descriptor has one sector-count bit."""
    return Built(_compressed(d, "zlib", 512, 2 * MiB, 22))


def build_compressed_zstd_4k(d: Path) -> Built:
    return Built(_compressed(d, "zstd", 4 * KiB, 3 * MiB, 23))


def build_compressed_zstd_2m(d: Path) -> Built:
    return Built(_compressed(d, "zstd", 2 * MiB, 8 * MiB, 24))


def build_mixed_zlib(d: Path) -> Built:
    """Compressed image overwritten in part: compressed, plain, zero and free clusters mix."""
    size = 6 * MiB
    img = _compressed(d, "zlib", 64 * KiB, size, 30)
    scribble(img, random.Random(31), size, writes=10, compressed_writes=6, max_len=160 * KiB)
    return Built(img)


def build_mixed_zstd(d: Path) -> Built:
    size = 6 * MiB
    img = _compressed(d, "zstd", 16 * KiB, size, 32)
    scribble(
        img,
        random.Random(33),
        size,
        writes=10,
        compressed_writes=8,
        cluster_size=16 * KiB,
        max_len=160 * KiB,
    )
    return Built(img)


def build_chain3_raw_base(d: Path) -> Built:
    """raw base <- qcow2 mid <- qcow2 top; each layer writes, zeroes and discards."""
    size = 6 * MiB
    base = raw_file(d / "base.raw", size, random.Random(40), fill=0.5)
    mid = qemu_img_create(d / "mid.qcow2", size, f"backing_file={base}", "backing_fmt=raw")
    scribble(mid, random.Random(41), size, writes=10)
    top = qemu_img_create(
        d / "top.qcow2", size, f"backing_file={mid}", "backing_fmt=qcow2", "cluster_size=32768"
    )
    scribble(
        top,
        random.Random(42),
        size,
        writes=8,
        zero_writes=4,
        discards=3,
        compressed_writes=3,
        cluster_size=32 * KiB,
    )
    return Built(top, overlay=True)


def build_backing_shorter(d: Path) -> Built:
    """A base of 3 MiB + 1536 bytes under an 8 MiB overlay; a write covers the base's end.

    qemu copies the base's last partial cluster into the overlay (zeros past its end).
    """
    base = qemu_img_create(d / "base.qcow2", 3 * MiB + 1536)
    qemu_io(base, "write -q -P 0x61 0 3146240")
    top = qemu_img_create(d / "top.qcow2", 8 * MiB, f"backing_file={base}", "backing_fmt=qcow2")
    qemu_io(
        top,
        "write -q -P 0x62 100000 5000",
        "write -q -P 0x63 3100000 1000",
        "write -q -P 0x64 7000001 9999",
        "write -q -z 1048576 65536",
    )
    return Built(top, overlay=True)


def build_backing_shorter_raw_odd(d: Path) -> Built:
    """A raw base of 2 MiB + 1000 bytes under a 4 MiB overlay that leaves its end unallocated.

    Reads across the base's end get the base's bytes, then zeros.
    """
    base = d / "base.raw"
    base.write_bytes(payload(random.Random(50), 2 * MiB + 1000))
    top = qemu_img_create(
        d / "top.qcow2", 4 * MiB, f"backing_file={base}", "backing_fmt=raw", "cluster_size=4096"
    )
    qemu_io(top, "write -q -P 0x71 2000000 300", "write -q -P 0x72 3000000 4097")
    return Built(top, overlay=True)


def build_backing_longer(d: Path) -> Built:
    """A 6 MiB base under a 2 MiB overlay: only the overlay's size shows."""
    base = qemu_img_create(d / "base.qcow2", 6 * MiB)
    qemu_io(base, "write -q -P 0x41 0 6M")
    top = qemu_img_create(d / "top.qcow2", 2 * MiB, f"backing_file={base}", "backing_fmt=qcow2")
    qemu_io(top, "write -q -P 0x42 65536 1000")
    return Built(top, overlay=True)


def build_zero_hides_backing(d: Path) -> Built:
    """Zero clusters (write -z, discard) in an overlay over a base full of data."""
    size = 4 * MiB
    base = qemu_img_create(d / "base.qcow2", size)
    qemu_io(base, f"write -q -s {write_source_file(d / 's', random.Random(60), MiB)} 0 {size}")
    top = qemu_img_create(d / "top.qcow2", size, f"backing_file={base}", "backing_fmt=qcow2")
    qemu_io(
        top,
        "write -q -z 0 64k",
        "write -q -z -u 1M 192k",
        "discard -q 2M 128k",
        "write -q -z 3000000 70000",
        "write -q -P 0x33 3100000 1000",
        "write -q -z 3276800 512",
    )
    return Built(top, overlay=True)


def build_relative_backing(d: Path) -> Built:
    """top -> ../layers/mid/mid.qcow2 -> ../../base/base.qcow2, names stored relative.

    The mid layer's name only resolves against mid's own directory, not top's.
    """
    size = 4 * MiB
    (d / "base").mkdir()
    (d / "layers" / "mid").mkdir(parents=True)
    (d / "vm").mkdir()
    base = qemu_img_create(d / "base" / "base.qcow2", size)
    qemu_io(base, "write -q -P 0x11 0 4M")
    mid = qemu_img_create(
        "mid.qcow2", size, backing="../../base/base.qcow2", cwd=d / "layers" / "mid"
    )
    qemu_io(mid, "write -q -P 0x22 1M 1M")
    top = qemu_img_create("top.qcow2", size, backing="../layers/mid/mid.qcow2", cwd=d / "vm")
    qemu_io(top, "write -q -P 0x33 1536k 1M", "write -q -z 3M 64k")
    return Built(d / "vm" / "top.qcow2", overlay=True)


def build_probed_backing(d: Path) -> Built:
    """No backing_fmt anywhere: a qcow2 mid probed by its magic, a raw base read as raw.

    The backing-format extensions are renamed to an unknown type, which also
    checks that unknown header extensions are skipped.
    """
    size = 4 * MiB
    base = raw_file(d / "base.raw", size, random.Random(70), fill=0.7)
    mid = qemu_img_create(d / "mid.qcow2", size, f"backing_file={base}", "backing_fmt=raw")
    qemu_io(mid, "write -q -P 0x5a 1M 100000")
    top = qemu_img_create(d / "top.qcow2", size, f"backing_file={mid}", "backing_fmt=qcow2")
    qemu_io(top, "write -q -P 0xa5 2M 100000")
    patch_extension_type(mid, EXT_BACKING_FORMAT, 0x12345678)
    patch_extension_type(top, EXT_BACKING_FORMAT, 0x12345678)
    return Built(top, overlay=True)


def build_backing_fmt_raw_over_qcow2(d: Path) -> Built:
    """backing_fmt=raw naming a qcow2 file: the file's own bytes are the backing data."""
    base = qemu_img_create(d / "base.qcow2", MiB)
    qemu_io(base, "write -q -P 0x19 0 64k")
    top = qemu_img_create(d / "top.qcow2", 2 * MiB, f"backing_file={base}", "backing_fmt=raw")
    qemu_io(top, "write -q -P 0x91 70000 1000")
    return Built(top, overlay=True)


def build_header_104(d: Path) -> Built:
    """A v3 header of 104 bytes (no compression_type field), as qemu before 5.0 wrote.

    Made from a current image by moving its header extensions 8 bytes down.
    """
    img = _plain(d, 3 * MiB, 104, "cluster_size=4096", cluster_size=4096).image
    with open(img, "r+b") as f:
        head = bytearray(f.read(4096))
        assert struct.unpack_from(">I", head, 100)[0] == 112
        assert head[104] == 0
        struct.pack_into(">I", head, 100, 104)
        head[104:4088] = head[112:4096]
        head[4088:4096] = bytes(8)
        f.seek(0)
        f.write(head)
    return Built(img)


def build_extended_l2(d: Path) -> Built:
    """extended_l2=on, 64 KiB clusters (2 KiB subclusters); writes cover parts of clusters."""
    size = 4 * MiB
    img = qemu_img_create(d / "disk.qcow2", size, "extended_l2=on")
    rng = random.Random(80)
    commands = []
    for c in range(0, size // (64 * KiB), 3):
        base = c * 64 * KiB
        sc = rng.randrange(32)
        length = rng.randrange(1, 5) * 2048
        commands.append(f"write -q -P {c % 250 + 1} {base + sc * 2048} {length}")
        commands.append(f"write -q -P 0x77 {base + rng.randrange(64 * KiB - 700)} 700")
    commands += [
        "write -q -z 1M 6k",
        "write -q -z 1056768 4096",
        "discard -q 2M 64k",
        "write -q -z -u 3M 128k",
    ]
    qemu_io(img, *commands)
    return Built(img)


def build_extended_l2_overlay(d: Path) -> Built:
    """extended_l2=on overlay (16 KiB clusters, 512 B subclusters) over a full base.

    Unallocated subclusters read from the base; zero subclusters hide it.
    """
    size = 2 * MiB
    base = qemu_img_create(d / "base.qcow2", size)
    qemu_io(base, f"write -q -s {write_source_file(d / 's', random.Random(81), 300 * KiB)} 0 2M")
    top = qemu_img_create(
        d / "top.qcow2",
        size,
        f"backing_file={base}",
        "backing_fmt=qcow2",
        "extended_l2=on",
        "cluster_size=16384",
    )
    scribble(
        top,
        random.Random(82),
        size,
        writes=20,
        zero_writes=8,
        discards=4,
        compressed_writes=4,
        cluster_size=16 * KiB,
        max_len=24 * KiB,
        align=512,
    )
    return Built(top, overlay=True)


def build_data_file(d: Path) -> Built:
    """External data file named relative (qemu reads such names from its cwd)."""
    size = 4 * MiB
    qemu_img_create("disk.qcow2", size, "data_file=disk.data", cwd=d)
    scribble(d / "disk.qcow2", random.Random(90), size, writes=10, cwd=d)
    return Built(d / "disk.qcow2", cwd=d)


def build_data_file_raw(d: Path) -> Built:
    """External data file with data_file_raw=on, named by its absolute path."""
    size = 4 * MiB
    img = qemu_img_create(
        d / "disk.qcow2", size, f"data_file={d / 'disk.data'}", "data_file_raw=on"
    )
    scribble(img, random.Random(91), size, writes=10)
    return Built(img)


def build_snapshots(d: Path) -> Built:
    """Writes, snapshot 'first', grow the disk, writes, snapshot 'second', writes."""
    img = qemu_img_create(d / "disk.qcow2", 3 * MiB)
    scribble(img, random.Random(100), 3 * MiB, writes=6)
    run(["qemu-img", "snapshot", "-c", "first", str(img)])
    run(["qemu-img", "resize", "-q", str(img), str(4 * MiB)])
    scribble(img, random.Random(101), 4 * MiB, writes=6)
    run(["qemu-img", "snapshot", "-c", "second", str(img)])
    scribble(img, random.Random(102), 4 * MiB, writes=6)
    return Built(img, snapshots=("first", "second"))


def build_snapshots_overlay(d: Path) -> Built:
    """Snapshots of an overlay: a snapshot reads what it does not store from the base."""
    size = 2 * MiB
    base = raw_file(d / "base.raw", size, random.Random(105), fill=0.8)
    img = qemu_img_create(d / "top.qcow2", size, f"backing_file={base}", "backing_fmt=raw")
    scribble(img, random.Random(106), size, writes=4, max_len=128 * KiB)
    run(["qemu-img", "snapshot", "-c", "before", str(img)])
    scribble(img, random.Random(107), size, writes=4, zero_writes=4, max_len=128 * KiB)
    return Built(img, snapshots=("before",), overlay=True)


def build_prealloc_metadata(d: Path) -> Built:
    size = 4 * MiB
    img = qemu_img_create(d / "disk.qcow2", size, "preallocation=metadata")
    scribble(img, random.Random(110), size, writes=6)
    return Built(img)


def build_prealloc_falloc(d: Path) -> Built:
    size = 4 * MiB
    img = qemu_img_create(d / "disk.qcow2", size, "preallocation=falloc")
    scribble(img, random.Random(111), size, writes=6)
    return Built(img)


BUILDERS: dict[str, Callable[[Path], Built]] = {
    "compat-0.10": build_compat_010,
    "cluster-512": build_cluster_512,
    "cluster-4k": build_cluster_4k,
    "cluster-64k": build_cluster_64k,
    "cluster-2m": build_cluster_2m,
    "refcount-1": build_refcount_1,
    "refcount-64": build_refcount_64,
    "compressed-zlib": build_compressed_zlib,
    "compressed-zstd": build_compressed_zstd,
    "compressed-zlib-512": build_compressed_zlib_512,
    "compressed-zstd-4k": build_compressed_zstd_4k,
    "compressed-zstd-2m": build_compressed_zstd_2m,
    "mixed-zlib": build_mixed_zlib,
    "mixed-zstd": build_mixed_zstd,
    "chain3-raw-base": build_chain3_raw_base,
    "backing-shorter": build_backing_shorter,
    "backing-shorter-raw-odd": build_backing_shorter_raw_odd,
    "backing-longer": build_backing_longer,
    "zero-hides-backing": build_zero_hides_backing,
    "relative-backing": build_relative_backing,
    "probed-backing": build_probed_backing,
    "backing-fmt-raw-over-qcow2": build_backing_fmt_raw_over_qcow2,
    "header-104": build_header_104,
    "extended-l2": build_extended_l2,
    "extended-l2-overlay": build_extended_l2_overlay,
    "data-file": build_data_file,
    "data-file-raw": build_data_file_raw,
    "snapshots": build_snapshots,
    "snapshots-overlay": build_snapshots_overlay,
    "prealloc-metadata": build_prealloc_metadata,
    "prealloc-falloc": build_prealloc_falloc,
}


class ImageCache:
    """Builds each kind once, in its own directory under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Built] = {}

    def get(self, kind: str) -> Built:
        if kind not in self._built:
            d = self.root / kind
            d.mkdir()
            self._built[kind] = BUILDERS[kind](d)
        return self._built[kind]


# -- the oracle, for images that may need a working directory or a snapshot ---------


def qemu_convert(
    built: Built, out: Path, *, snapshot: str | None = None, no_backing: bool = False
) -> bytes:
    """``qemu-img convert -O raw`` of the image (``-l`` for a snapshot), as bytes."""
    cmd = ["qemu-img", "convert", "-O", "raw"]
    if snapshot is not None:
        cmd += ["-l", f"snapshot.name={snapshot}"]
    cmd += [_source_arg(built, no_backing), str(out)]
    run(cmd, cwd=built.cwd)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_map_of(
    built: Built, *, image: Path | None = None, no_backing: bool = False
) -> list[dict[str, object]]:
    """``qemu-img map --output=json`` of the image (or of ``image``, e.g. a copy)."""
    target = _source_arg(built, no_backing) if image is None else str(image)
    out = run(["qemu-img", "map", "--output=json", target], cwd=built.cwd).stdout
    result: list[dict[str, object]] = json.loads(out)
    return result


def qemu_info(built: Built) -> list[dict[str, object]]:
    """``qemu-img info --output=json --backing-chain``: one object per layer, top first."""
    out = run(
        ["qemu-img", "info", "--output=json", "--backing-chain", str(built.image)], cwd=built.cwd
    ).stdout
    result: list[dict[str, object]] = json.loads(out)
    return result


def applied_snapshot_copy(built: Built, snapshot: str, dest: Path) -> Path:
    """A copy of the image with ``snapshot`` applied (``qemu-img snapshot -a``).

    Its active state is the snapshot: same L1 table, the snapshot's virtual size.
    """
    shutil.copyfile(built.image, dest)
    run(["qemu-img", "snapshot", "-a", snapshot, str(dest)], cwd=built.cwd)
    return dest


def _source_arg(built: Built, no_backing: bool) -> str:
    if not no_backing:
        return str(built.image)
    spec = {
        "driver": "qcow2",
        "backing": None,
        "file": {"driver": "file", "filename": os.path.abspath(built.image)},
    }
    return "json:" + json.dumps(spec)
