"""The checksum of an image equals the checksum of its mounted .raw file, and of copies.

One mount serves every kind of image (plain random writes, zlib and zstd
compressed, a backing chain, extended L2 subclusters).  Oracles: qemu-img
convert -O raw, qemu-img map, xxh128sum, and the documented sparsefs1
definition reimplemented with plain reads.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from support import (
    KiB,
    MiB,
    make_image,
    oracle_data_bytes,
    qemu_compress,
    qemu_io,
    qemu_raw,
    run,
    sparsefs,
)

Mount = Callable[..., Path]
BLOCK = 1 * MiB


def reference_digest(path: Path) -> str:
    """sparsefs1 of a file's bytes, from the documented definition (reads every byte)."""
    size = path.stat().st_size
    fold = xxhash.xxh3_128()
    fold.update(b"sparsefs1\0" + size.to_bytes(8, "little") + BLOCK.to_bytes(8, "little"))
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            fold.update(xxhash.xxh3_128(block).digest())
    return "sparsefs1:" + fold.hexdigest()


def build_images(d: Path) -> list[Path]:
    """One image per kind, each with a distinct stem (so one mount holds them all)."""
    plain = make_image(
        d / "plain.qcow2",
        13 * MiB + 5 * 512,
        seed=21,
        writes=16,
        zero_writes=4,
        discards=4,
        max_len=1 * MiB,
    )
    rnd = d / "random.bin"
    rnd.write_bytes(random.Random(3).randbytes(2 * MiB))
    qemu_io(plain, f"write -q -s {rnd} {3 * MiB + 512} {2 * MiB}")
    compressed = qemu_compress(plain, d / "zlib.qcow2")
    zstd = qemu_compress(plain, d / "zstd.qcow2", "zstd")
    base = make_image(d / "base.qcow2", 12 * MiB, seed=22, writes=12, max_len=1 * MiB)
    top = make_image(
        d / "overlay.qcow2",
        12 * MiB + 512,
        seed=23,
        writes=6,
        zero_writes=3,
        discards=3,
        backing=str(base),
        backing_fmt="qcow2",
    )
    sub = make_image(
        d / "subclusters.qcow2",
        9 * MiB + 512,
        seed=24,
        options=["extended_l2=on", "cluster_size=128k"],
        writes=20,
        zero_writes=4,
        discards=4,
        max_len=200 * KiB,
    )
    return [plain, compressed, zstd, top, sub]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_images(tmp_path_factory.mktemp("kinds"))


def test_mounted_raw_file_has_the_image_digest(
    images: list[Path], mount: Mount, tmp_path: Path
) -> None:
    mp = mount(*images)
    mounted = [mp / (img.name.removesuffix(".qcow2") + ".raw") for img in images]
    refs = [qemu_raw(img, tmp_path / f"{img.stem}.ref") for img in images]

    img_digests = sparsefs("checksum", "-q", *map(str, images), check=True).stdout.splitlines()
    mnt_digests = sparsefs("checksum", "-q", *map(str, mounted), check=True).stdout.splitlines()
    for img, ref, a, b in zip(images, refs, img_digests, mnt_digests, strict=True):
        expected = reference_digest(ref)
        assert a.split("  ")[0] == expected, img.name
        assert b.split("  ")[0] == expected, img.name

    # The plain XXH128 of the mounted file is what xxh128sum reads from it.
    stream = sparsefs("checksum", "-q", "--stream-xxh128", *map(str, mounted), check=True).stdout
    assert stream == run(["xxh128sum", *map(str, mounted)]).stdout
    for ref, line in zip(refs, stream.splitlines(), strict=True):
        assert line.split("  ")[0] == xxhash.xxh3_128_hexdigest(ref.read_bytes())


def test_mounted_raw_file_is_hashed_by_its_data_only(images: list[Path], mount: Mount) -> None:
    """Through the mount, SEEK_DATA/SEEK_HOLE hand the checksum only qemu's data ranges."""
    mp = mount(*images)
    for img in images:
        raw = mp / (img.name.removesuffix(".qcow2") + ".raw")
        (record,) = json.loads(sparsefs("checksum", "-q", "--json", str(raw), check=True).stdout)
        assert record["format"] == "raw"
        assert record["bytes-read"] == oracle_data_bytes(img), img
        assert record["bytes-read"] < record["size"]


def test_verify_image_against_mount_and_its_copies(
    images: list[Path], mount: Mount, tmp_path: Path
) -> None:
    mp = mount(*images)
    for img in images:
        raw = mp / (img.name.removesuffix(".qcow2") + ".raw")
        sparse = tmp_path / f"{img.stem}.sparse"
        full = tmp_path / f"{img.stem}.full"
        run(["cp", "--sparse=always", str(raw), str(sparse)])
        run(["cp", "--sparse=never", str(raw), str(full)])
        for copy in (raw, sparse, full):
            proc = sparsefs("verify", "-q", str(img), str(copy))
            assert proc.returncode == 0, (img, copy, proc.stdout, proc.stderr)
        # A byte changed in the copy made from the mount is found and placed.
        offset = sparse.stat().st_size - 1
        with open(sparse, "r+b") as f:
            f.seek(offset)
            old = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([old ^ 0x99]))
        proc = sparsefs("verify", "-q", "--json", str(img), str(sparse))
        assert proc.returncode == 1
        diff = json.loads(proc.stdout)["difference"]
        assert diff["offset"] == offset
        assert diff["start"] == offset // BLOCK * BLOCK
        assert diff["end"] == offset + 1
