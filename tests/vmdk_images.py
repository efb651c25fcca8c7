"""VMDK test images, made by qemu-img/qemu-io at test time (one builder per subformat/feature).

Every builder takes a directory and returns the path of the image to open
(the descriptor for multi-file subformats).  The answers always come live
from ``qemu-img convert -f vmdk -O raw`` and ``qemu-img map -f vmdk``.

``stream_footer`` turns qemu's streamOptimized output (grain directory named
in the header) into the layout VMware writes: header ``gdOffset`` =
GD_AT_END, grain tables and directory after the grains behind their markers,
the real offsets only in the footer; the tables qemu wrote at the front are
zeroed so nothing can read them by accident.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from pathlib import Path

from support import GiB, KiB, MiB, qemu_img_create, qemu_io, random_writes, run

SECTOR = 512
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
# Byte offsets of header fields (VMDK4 SparseExtentHeader).
OFF_FLAGS, OFF_CAPACITY, OFF_GRAIN, OFF_GTES = 8, 12, 20, 44
OFF_RGD, OFF_GD, OFF_OVERHEAD = 48, 56, 64

Builder = Callable[[Path], Path]


def _writes(path: Path, seed: int, size: int, count: int, *, zero_writes: int = 2) -> None:
    """Random patterned writes (sector-aligned, some not grain-aligned) and a few zero writes."""
    rng = random.Random(seed)
    cmds = [
        f"write -P {rng.randrange(1, 256)} {off} {n}"
        for off, n in random_writes(rng, size, count, max_len=192 * KiB, align=SECTOR)
    ]
    for off, n in random_writes(rng, size, zero_writes, max_len=128 * KiB, align=SECTOR):
        cmds.append(f"write -z {off} {n}")
    cmds.append(f"write -P 0x5a {size - 3 * SECTOR} {3 * SECTOR}")  # the last, partial grain
    qemu_io(path, *cmds, fmt="vmdk")


def _create(path: Path, size: int, *options: str) -> Path:
    return qemu_img_create(path, size, *options, fmt="vmdk")


UNALIGNED = 5 * MiB + 7 * SECTOR  # not a multiple of the 64 KiB grain


def monolithic_sparse(d: Path) -> Path:
    """monolithicSparse, unaligned size, random and zero writes."""
    p = _create(d / "mono.vmdk", UNALIGNED)
    _writes(p, 1, UNALIGNED, 12)
    return p


def zeroed_grain(d: Path) -> Path:
    """monolithicSparse with zeroed_grain=on: ``write -z`` leaves zeroed GTEs."""
    p = _create(d / "zgrain.vmdk", UNALIGNED, "zeroed_grain=on")
    _writes(p, 2, UNALIGNED, 8, zero_writes=4)
    qemu_io(p, "write -P 7 0 256k", "write -z 64k 128k", fmt="vmdk")  # zeroes over data
    return p


def stream_optimized(d: Path) -> Path:
    """streamOptimized as qemu writes it (compressed grains with markers, GD in the header)."""
    src = monolithic_sparse(d)
    p = d / "stream.vmdk"
    run(
        [
            "qemu-img",
            "convert",
            "-f",
            "vmdk",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            str(src),
            str(p),
        ]
    )
    return p


def _marker(value: int, size: int, kind: int) -> bytes:
    return struct.pack("<QII", value, size, kind).ljust(SECTOR, b"\0")


def stream_footer(d: Path) -> Path:
    """streamOptimized with GD_AT_END in the header: tables after the grains, footer at the end."""
    src = stream_optimized(d)
    buf = bytearray(src.read_bytes())
    capacity, grain = struct.unpack_from("<QQ", buf, OFF_CAPACITY)
    (gtes,) = struct.unpack_from("<I", buf, OFF_GTES)
    rgd, gd, overhead = struct.unpack_from("<QQQ", buf, OFF_RGD)
    nb_gd = -(-capacity // (gtes * grain))
    gd_entries = struct.unpack_from(f"<{nb_gd}I", buf, gd * SECTOR)
    gt_sectors = -(-gtes * 4 // SECTOR)
    tables = [bytes(buf[e * SECTOR : e * SECTOR + gtes * 4]) if e else b"" for e in gd_entries]
    buf[min(rgd, gd) * SECTOR : overhead * SECTOR] = bytes((overhead - min(rgd, gd)) * SECTOR)
    if len(buf) % SECTOR:
        buf += bytes(SECTOR - len(buf) % SECTOR)
    new_gd = []
    for table in tables:
        if not table:
            new_gd.append(0)
            continue
        buf += _marker(gt_sectors, 0, 1)
        new_gd.append(len(buf) // SECTOR)
        buf += table.ljust(gt_sectors * SECTOR, b"\0")
    gd_sectors = -(-nb_gd * 4 // SECTOR)
    buf += _marker(gd_sectors, 0, 2)
    gd_pos = len(buf) // SECTOR
    buf += struct.pack(f"<{nb_gd}I", *new_gd).ljust(gd_sectors * SECTOR, b"\0")
    footer = bytearray(buf[:SECTOR])
    struct.pack_into("<QQ", footer, OFF_RGD, 0, gd_pos)
    (flags,) = struct.unpack_from("<I", footer, OFF_FLAGS)
    struct.pack_into("<I", footer, OFF_FLAGS, flags & ~2)  # no redundant GD in this stream
    struct.pack_into("<I", buf, OFF_FLAGS, flags & ~2)
    struct.pack_into("<QQ", buf, OFF_RGD, 0, GD_AT_END)
    buf += _marker(0, 0, 3) + footer + _marker(0, 0, 0)
    p = d / "stream-footer.vmdk"
    p.write_bytes(bytes(buf))
    return p


def two_gb_sparse(d: Path) -> Path:
    """twoGbMaxExtentSparse over 3 GiB: writes at the start, across the 2 GiB seam, at the end."""
    size = 3 * GiB + 64 * KiB
    p = _create(d / "split.vmdk", size, "subformat=twoGbMaxExtentSparse")
    qemu_io(
        p,
        "write -P 1 0 100k",
        f"write -P 2 {2 * GiB - 48 * KiB} 96k",
        f"write -P 3 {2 * GiB + MiB} 4k",
        f"write -z {2 * GiB - 16 * KiB} 8k",
        f"write -P 4 {size - 70 * KiB} 70k",
        fmt="vmdk",
    )
    return p


def monolithic_flat(d: Path) -> Path:
    """monolithicFlat: one descriptor, one flat file."""
    p = _create(d / "flat.vmdk", 3 * MiB + 5 * SECTOR, "subformat=monolithicFlat")
    _writes(p, 3, 3 * MiB + 5 * SECTOR, 6)
    return p


def two_gb_flat(d: Path) -> Path:
    """twoGbMaxExtentFlat (small: one flat extent)."""
    p = _create(d / "splitflat.vmdk", 2 * MiB, "subformat=twoGbMaxExtentFlat")
    _writes(p, 4, 2 * MiB, 5)
    return p


def mixed_descriptor(d: Path) -> Path:
    """A hand-written descriptor: FLAT at an offset, a SPARSE extent, another FLAT, CRLF lines."""
    a = d / "mixed-a.flat"
    a.write_bytes(random.Random(5).randbytes(8 * SECTOR) + bytes(2 * 64 * KiB))
    s = _create(d / "mixed-s.vmdk", MiB)
    qemu_io(s, "write -P 9 4k 70k", "write -P 8 900k 10k", fmt="vmdk")
    b = d / "mixed-b.flat"
    b.write_bytes(random.Random(6).randbytes(64 * KiB))
    p = d / "mixed.vmdk"
    p.write_bytes(
        (
            "# Disk DescriptorFile\r\nversion=1\r\nCID=12345678\r\nparentCID=ffffffff\r\n"
            'createType="monolithicFlat"\r\n\r\n# Extent description\r\n'
            f'RW {2 * 64 * KiB // SECTOR} FLAT "mixed-a.flat" 8\r\n'
            f'RW {MiB // SECTOR} SPARSE "mixed-s.vmdk"\r\n'
            f'RW {64 * KiB // SECTOR} FLAT "{b}" 0\r\n\r\nddb.adapterType = "ide"\r\n'
        ).encode()
    )
    return p


def delta_chain(d: Path) -> Path:
    """base <- delta <- top (parentFileNameHint, parentCID), zero writes hide the parent."""
    base = _create(d / "base.vmdk", UNALIGNED)
    _writes(base, 7, UNALIGNED, 10, zero_writes=0)
    qemu_io(base, "write -P 0x11 0 512k", f"write -P 0x12 {2 * MiB} 256k", fmt="vmdk")
    mid = _create(d / "delta.vmdk", UNALIGNED, f"backing_file={base.name}", "backing_fmt=vmdk")
    _writes(mid, 8, UNALIGNED, 6, zero_writes=0)
    top = _create(
        d / "top.vmdk", UNALIGNED, "backing_file=delta.vmdk", "backing_fmt=vmdk", "zeroed_grain=on"
    )
    qemu_io(
        top, "write -P 0x33 128k 64k", "write -z 0 128k", f"write -z {2 * MiB} 192k", fmt="vmdk"
    )
    return top


def delta_split_over_flat(d: Path) -> Path:
    """A twoGbMaxExtentSparse delta (descriptor file) over a monolithicFlat parent."""
    base = _create(d / "fbase.vmdk", 3 * MiB, "subformat=monolithicFlat")
    _writes(base, 9, 3 * MiB, 6, zero_writes=0)
    top = _create(
        d / "sdelta.vmdk",
        3 * MiB,
        "subformat=twoGbMaxExtentSparse",
        f"backing_file={base.name}",
        "backing_fmt=vmdk",
    )
    _writes(top, 10, 3 * MiB, 4, zero_writes=1)
    return top


BUILDERS: dict[str, Builder] = {
    "monolithicSparse": monolithic_sparse,
    "zeroedGrain": zeroed_grain,
    "streamOptimized": stream_optimized,
    "streamOptimized-footer": stream_footer,
    "twoGbMaxExtentSparse": two_gb_sparse,
    "monolithicFlat": monolithic_flat,
    "twoGbMaxExtentFlat": two_gb_flat,
    "mixed-descriptor": mixed_descriptor,
    "delta-chain": delta_chain,
    "delta-split-over-flat": delta_split_over_flat,
}


def build_all(directory: Path) -> dict[str, Path]:
    """Every builder's image, each in its own subdirectory of ``directory``."""
    out = {}
    for name, builder in BUILDERS.items():
        sub = directory / name
        sub.mkdir(parents=True, exist_ok=True)
        out[name] = builder(sub)
    return out
