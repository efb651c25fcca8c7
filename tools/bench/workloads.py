"""The bench's images and workloads: W1..W7, P1/P2, V1/X1 and the aged ext4 builder.

Images are built with qemu-img/qemu-io in a work directory and reused when
their name, which encodes every parameter and the seed, is already there.
tools/bench/backup_bench.py builds its images here too (through bench.py).

This is a tool, not a test: it is never imported by the package or the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import CLUSTER, GiB, KiB, MiB, TiB, human, log, run

# Bump when the way images are built changes, so cached images are rebuilt.
BUILD_VERSION = 1


@dataclass(frozen=True)
class ImageSpec:
    """A benchmark image: virtual size and the guest extents written with data.

    ``layout`` is "scatter" (``count`` extents placed at random, non-overlapping,
    64 KiB-aligned guest offsets; lengths are ``min_len..max_len`` in 64 KiB
    steps), or "full" (every byte written, in 64 MiB sequential writes).
    Extents are written in a shuffled order, so host clusters are not in guest
    order, as in an image that grew over time.
    """

    label: str
    virtual_size: int
    layout: str
    count: int = 0
    min_len: int = CLUSTER
    max_len: int = CLUSTER
    seed: int = 20260509
    preallocation: str = "off"  # qemu-img create -o preallocation=...
    fmt: str = "qcow2"  # other formats: the qcow2 image converted with fmt_options
    fmt_options: str = ""

    @property
    def file_name(self) -> str:
        """A name that encodes every parameter, so a cached image is reused only when equal."""
        if self.layout == "full":
            shape = "full"
        else:
            shape = f"{self.count}x{self.min_len // KiB}-{self.max_len // KiB}k"
        prealloc = "" if self.preallocation == "off" else f"-p{self.preallocation}"
        opts = f"-{self.fmt_options.replace('=', '').replace(',', '-')}" if self.fmt_options else ""
        return (
            f"{self.label}-v{BUILD_VERSION}-{self.virtual_size // MiB}m-{shape}-s{self.seed}"
            f"{prealloc}{opts}.{self.fmt}"
        )

    def extents(self) -> list[tuple[int, int]]:
        """The (guest_offset, length) writes in bytes, in write order."""
        if self.layout == "full":
            step = 64 * MiB
            return [
                (off, min(step, self.virtual_size - off))
                for off in range(0, self.virtual_size, step)
            ]
        rng = random.Random(self.seed)
        slot = self.max_len
        nb_slots = self.virtual_size // slot
        if self.count > nb_slots:
            raise ValueError(f"{self.label}: {self.count} extents do not fit")
        slots = rng.sample(range(nb_slots), self.count)
        out = []
        for s in slots:
            length = rng.randrange(self.min_len, self.max_len + 1, CLUSTER)
            # Anywhere inside its slot, cluster aligned: extents never overlap.
            shift = rng.randrange(0, slot - length + 1, CLUSTER)
            out.append((s * slot + shift, length))
        return out  # rng.sample order is already shuffled

    def data_bytes(self) -> int:
        """Bytes of guest data the image stores."""
        return sum(length for _, length in self.extents())


def image_format(image: Path) -> str:
    """qemu's format name of a benchmark image, from its suffix."""
    return {".vmdk": "vmdk", ".vhdx": "vhdx"}.get(image.suffix, "qcow2")


def build_image(spec: ImageSpec, work_dir: Path) -> Path:
    """Create the image with qemu-img/qemu-io unless it is cached; return its path."""
    path = work_dir / spec.file_name
    if path.exists():
        return path
    if spec.fmt != "qcow2":
        source = build_image(dataclasses.replace(spec, fmt="qcow2", fmt_options=""), work_dir)
        tmp = path.with_suffix(".partial")
        log(f"converting {source.name} to {spec.fmt} {spec.fmt_options} ...")
        opts = ["-o", spec.fmt_options] if spec.fmt_options else []
        run(["qemu-img", "convert", "-f", "qcow2", "-O", spec.fmt, *opts, str(source), str(tmp)])
        os.rename(tmp, path)
        return path
    tmp = path.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    log(f"building {path.name} ({human(spec.data_bytes())} of data) ...")
    t0 = time.perf_counter()
    run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"preallocation={spec.preallocation}",
            str(tmp),
            str(spec.virtual_size),
        ]
    )
    rng = random.Random(spec.seed ^ 0x5EED)
    lines = []
    for off, length in spec.extents():
        # A non-zero pattern byte per write: cp must copy every byte.
        lines.append(f"write -q -P {rng.randrange(1, 256)} {off} {length}\n")
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", str(tmp)],
        input="".join(lines) + "quit\n",
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or "error" in proc.stdout.lower() or proc.stderr.strip():
        raise SystemExit(f"bench: qemu-io failed building {tmp}: {proc.stderr or proc.stdout}")
    os.rename(tmp, path)
    log(f"built {path.name} in {time.perf_counter() - t0:.1f} s")
    return path


@dataclass(frozen=True)
class AgedFsSpec:
    """An aged ext4 filesystem image (see :func:`build_aged_ext4`).

    ``source_dir`` seeds it (``mkfs.ext4 -d``) and is copied from again;
    ``seed`` picks the files deleted and copied.
    """

    label: str
    virtual_size: int
    source_dir: str
    seed: int = 20261127

    @property
    def file_name(self) -> str:
        """A name that encodes every parameter, so a cached image is reused only when equal."""
        tag = re.sub(r"[^A-Za-z0-9]+", "_", self.source_dir).strip("_") or "root"
        return (
            f"{self.label}-v{AGED_BUILD_VERSION}-{self.virtual_size // GiB}g-{tag}"
            f"-s{self.seed}.qcow2"
        )


# Bump when the way aged filesystem images are built changes.
AGED_BUILD_VERSION = 1
AGED_EXT4 = AgedFsSpec("ext4", 40 * GiB, "/usr")


def _regular_files(root: Path) -> list[Path]:
    """Regular files (not symlinks) under ``root``, sorted, for a reproducible pick."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out.append(p)
    return out


def build_aged_ext4(work_dir: Path, spec: AgedFsSpec = AGED_EXT4) -> Path:
    """An aged ext4 filesystem as a qcow2 image in ``work_dir``, built once and cached.

    ``truncate -s SIZE fs.raw && mkfs.ext4 -d SOURCE fs.raw``, loop-mounted;
    about a third of its files deleted, about half of SOURCE's files copied in
    again (they land in the freed gaps, fragmented), ``fstrim`` (the freed
    blocks become holes of fs.raw), unmounted, and ``qemu-img convert -O
    qcow2``.  Needs root and a loop device.  For tools/bench/backup_bench.py
    too: import this module and call it.

    Returns:
        The image's path (``work_dir / spec.file_name``).
    """
    path = work_dir / spec.file_name
    if path.exists():
        return path
    if os.geteuid() != 0:
        raise SystemExit(f"bench: building {path.name} needs root (loop mount)")
    for tool in ("mkfs.ext4", "mount", "umount", "fstrim", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: building {path.name} needs {tool} (see tools/setup)")
    log(f"building {path.name} from {spec.source_dir} (a few minutes) ...")
    t0 = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    with tempfile.TemporaryDirectory(prefix="aged-", dir=work_dir) as tmp:
        raw = Path(tmp) / "fs.raw"
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        with open(raw, "wb") as f:
            f.truncate(spec.virtual_size)
        run(["mkfs.ext4", "-q", "-F", "-d", spec.source_dir, str(raw)])
        run(["mount", "-o", "loop", str(raw), str(mnt)])
        try:
            deleted = 0
            for p in _regular_files(mnt):
                if rng.random() < 1 / 3:
                    p.unlink()
                    deleted += 1
            copied = 0
            source = Path(spec.source_dir)
            for p in _regular_files(source):
                if rng.random() < 1 / 2:
                    dest = mnt / "aged-copy" / p.relative_to(source)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with contextlib.suppress(OSError):  # unreadable: skip
                        shutil.copyfile(p, dest)
                        copied += 1
            os.sync()
            run(["fstrim", str(mnt)])
            log(f"  {deleted} files deleted, {copied} copied in again")
        finally:
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        partial = path.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(partial)])
        os.rename(partial, path)
    log(f"built {path.name} in {time.perf_counter() - t0:.1f} s")
    return path


def image_layout(image: Path) -> tuple[int, int, int]:
    """(virtual size, data bytes, data extents) of an image, from ``qemu-img map``."""
    out = run(["qemu-img", "map", "--output=json", str(image)]).stdout
    size = data = extents = 0
    end = -1
    for ent in json.loads(out):
        size = max(size, ent["start"] + ent["length"])
        if ent["data"]:
            data += ent["length"]
            extents += ent["start"] != end
            end = ent["start"] + ent["length"]
    return size, data, extents


# -- workloads -------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A named workload: an image and the contenders that run on it."""

    name: str
    title: str
    image: ImageSpec | AgedFsSpec
    contenders: tuple[str, ...]


def workloads(quick: bool) -> dict[str, Workload]:
    """W1..W7, full size or (``quick``) small enough for a smoke run."""
    if quick:
        w1 = ImageSpec("w1q", 2 * GiB, "scatter", 150, CLUSTER, 15 * CLUSTER)
        w2 = ImageSpec("w2q", 2 * GiB, "scatter", 2048, CLUSTER, CLUSTER)
        w3 = ImageSpec("w3q", 128 * GiB, "scatter", 512, 512 * KiB, 512 * KiB)
        w4 = ImageSpec("w4q", 512 * MiB, "full")
        aged = AgedFsSpec("ext4q", 4 * GiB, "/usr/share/doc")
    else:
        w1 = ImageSpec("w1", 16 * GiB, "scatter", 300, CLUSTER, 63 * CLUSTER)
        w2 = ImageSpec("w2", 16 * GiB, "scatter", 16384, CLUSTER, CLUSTER)
        w3 = ImageSpec("w3", TiB, "scatter", 4096, 512 * KiB, 512 * KiB)
        w4 = ImageSpec("w4", 4 * GiB, "full")
        aged = AGED_EXT4
    cp3 = ("sparsefs+cp", "qsd+cp", "convert")
    v1 = dataclasses.replace(w1, fmt="vmdk")
    x1 = dataclasses.replace(w1, fmt="vhdx", fmt_options="block_size=1M")
    p1 = dataclasses.replace(w1, label=f"{w1.label}p", preallocation="metadata")
    p2 = dataclasses.replace(w1, label=f"{w1.label}p", preallocation="falloc")
    return {
        "W1": Workload("W1", "everyday disk, cp", w1, cp3),
        "W2": Workload("W2", "64 KiB fragments, cp", w2, cp3),
        "W3": Workload("W3", "huge virtual size", w3, ("sparsefs+cp", "qsd+cp")),
        "W4": Workload("W4", "fully allocated, cp", w4, cp3),
        "W5": Workload("W5", "rsync --sparse of W1", w1, ("sparsefs+rsync", "qsd+rsync")),
        "W6": Workload("W6", "cat of W1 to /dev/null", w1, ("sparsefs+cat", "qsd+cat")),
        "W7": Workload("W7", "aged ext4 filesystem, cp", aged, cp3),
        "P1": Workload("P1", "W1's data, preallocation=metadata, cp", p1, cp3),
        "P2": Workload("P2", "W1's data, preallocation=falloc, cp", p2, cp3),
        "V1": Workload("V1", "W1 as a monolithicSparse VMDK, cp", v1, cp3),
        "X1": Workload("X1", "W1 as a dynamic VHDX (1 MiB blocks), cp", x1, cp3),
    }


def preallocated_spec(name: str) -> ImageSpec:
    """The image of workload P1 or P2 (for tools/bench/backup_bench.py)."""
    return workloads(False)[name].image  # type: ignore[return-value]  # P1/P2 are ImageSpecs
