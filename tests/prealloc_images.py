"""Builders for preallocated qcow2 images (issue: holes from the host file).

Each builder gets an empty directory and returns the image path; qemu-img
makes the image with a ``preallocation=`` mode and qemu-io writes into it.
The answers come live from qemu (bytes, map) and from ``filefrag -s`` (which
host bytes are written); nothing here records one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from support import KiB, MiB, qemu_img_create, qemu_io, run

SIZE = 24 * MiB


def _scribble(
    image: Path,
    seed: int,
    *,
    lo: int = 0,
    hi: int = SIZE,
    writes: int = 10,
    zero_writes: int = 3,
    discards: int = 2,
    align: int = 1,
) -> None:
    """Data writes (unaligned), zero writes and discards into ``[lo, hi)``."""
    rng = random.Random(seed)
    commands = []

    def span() -> tuple[int, int]:
        length = rng.randrange(align, 384 * KiB, align)
        offset = rng.randrange(lo, hi - length, align)
        return offset, length

    for _ in range(writes):
        off, n = span()
        commands.append(f"write -q -P {rng.randrange(1, 256)} {off} {n}")
    for _ in range(zero_writes):
        off, n = span()
        commands.append(f"write -q -z {off} {n}")
    for _ in range(discards):
        off, n = span()
        commands.append(f"discard -q {off} {n}")
    qemu_io(image, *commands)


def build_metadata(d: Path) -> Path:
    img = qemu_img_create(d / "meta.qcow2", SIZE, "preallocation=metadata")
    _scribble(img, 1)
    return img


def build_falloc(d: Path) -> Path:
    img = qemu_img_create(d / "falloc.qcow2", SIZE, "preallocation=falloc")
    _scribble(img, 2)
    return img


def build_full(d: Path) -> Path:
    img = qemu_img_create(d / "full.qcow2", SIZE, "preallocation=full")
    _scribble(img, 3)
    return img


def build_metadata_extended_l2(d: Path) -> Path:
    """Subclusters: 2 KiB each in 64 KiB clusters, written partially."""
    img = qemu_img_create(d / "ext.qcow2", SIZE, "preallocation=metadata", "extended_l2=on")
    _scribble(img, 4, align=512)
    return img


def build_data_file(d: Path) -> Path:
    img = qemu_img_create(
        d / "df.qcow2", SIZE, "preallocation=falloc", f"data_file={d / 'df.data'}"
    )
    _scribble(img, 5)
    return img


def build_data_file_raw(d: Path) -> Path:
    img = qemu_img_create(
        d / "dfr.qcow2",
        SIZE,
        "preallocation=metadata",
        f"data_file={d / 'dfr.data'}",
        "data_file_raw=on",
    )
    _scribble(img, 6, discards=0)
    return img


def build_overlay(d: Path) -> Path:
    """A falloc-preallocated base under a plain overlay that writes over part of it."""
    base = qemu_img_create(d / "base.qcow2", SIZE, "preallocation=falloc")
    _scribble(base, 7)
    top = qemu_img_create(d / "top.qcow2", SIZE, f"backing_file={base}", "backing_fmt=qcow2")
    _scribble(top, 8, writes=5, zero_writes=2, discards=1)
    return top


def build_compressed(d: Path) -> Path:
    """Compressed clusters written into discarded parts of a metadata-preallocated image."""
    img = qemu_img_create(d / "comp.qcow2", SIZE, "preallocation=metadata")
    rng = random.Random(9)
    commands = []
    for _ in range(6):
        off = rng.randrange(0, SIZE // (64 * KiB) - 4) * 64 * KiB
        commands.append(f"discard -q {off} {256 * KiB}")
        commands.append(f"write -q -c -P {rng.randrange(1, 256)} {off} {64 * KiB}")
        commands.append(f"write -q -c -P {rng.randrange(1, 256)} {off + 128 * KiB} {64 * KiB}")
    qemu_io(img, *commands)
    _scribble(img, 10, writes=4, zero_writes=1, discards=0)
    return img


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "metadata": build_metadata,
    "falloc": build_falloc,
    "full": build_full,
    "metadata-extended-l2": build_metadata_extended_l2,
    "data-file": build_data_file,
    "data-file-raw": build_data_file_raw,
    "falloc-base-under-overlay": build_overlay,
    "compressed-in-metadata": build_compressed,
}


def read_all_files(directory: Path) -> None:
    """Read every file in ``directory`` once (``cat > /dev/null``): all pages cached.

    ext4's SEEK_DATA calls an unwritten extent data once its pages are cached;
    the answers must not change.
    """
    for path in sorted(directory.iterdir()):
        if path.is_file():
            run(["sh", "-c", 'cat "$1" > /dev/null', "sh", str(path)])
