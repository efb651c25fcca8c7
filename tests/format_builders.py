"""Per-format image builders (vpc, vdi, raw, qcow2 over them), made by qemu at test time.

Each builder gets an empty directory and returns a :class:`FmtImage`: the
image, the format to force, and the oracle, taken live from qemu when the
image is built: ``qemu-img convert -f FMT -O raw`` (bytes) and ``qemu-img map
-f FMT --output=json`` (holes).  Writes (``qemu-io -f FMT``) land at seeded
random offsets, half of them not sector aligned, with a pattern per write;
zero writes and discards are issued too (where the format has no discard,
qemu ignores it).  Sizes are not aligned to the block size.

One kind qemu cannot make: a differencing VHD (qemu opens one as a plain
dynamic disk and ignores its parent).  Its builder makes two dynamic disks
with qemu, then turns the child into a differencing disk (footer type,
parent UUID and locators, a few sector bitmap bits cleared).  Its oracle is
composed from qemu's own copies of both files: the child's bytes where the
child stores sectors (qemu's map of the child, minus the cleared bits), the
parent's elsewhere.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from support import KiB, MiB, num, qemu_img_create, qemu_io, qemu_map, qemu_raw, random_writes, run
from vmdk_images import BUILDERS as VMDK_BUILDERS

QMap = list[dict[str, object]]


@dataclass(frozen=True)
class FmtImage:
    """A built image and qemu's answers for it.

    Attributes:
        image: the file to open.
        fmt: qemu's name of its format (what ``-f`` forces).
        expected: a raw file with the guest bytes qemu reads.
        qmap: the ``qemu-img map --output=json`` entries.
    """

    image: Path
    fmt: str
    expected: Path
    qmap: QMap


def virtual_size(image: Path, fmt: str) -> int:
    """``qemu-img info``'s virtual size (vpc rounds to its geometry, vdi to sectors)."""
    out = run(["qemu-img", "info", "--output=json", "-f", fmt, str(image)]).stdout
    return int(json.loads(out)["virtual-size"])


def scribble(
    image: Path,
    fmt: str,
    seed: int,
    *,
    writes: int = 12,
    zero_writes: int = 3,
    discards: int = 3,
    max_len: int = 600 * KiB,
) -> None:
    """Seeded pattern writes, zero writes and discards, half of them unaligned."""
    rng = random.Random(seed)
    size = virtual_size(image, fmt)
    commands = []
    for i, (offset, length) in enumerate(
        random_writes(rng, size, writes, max_len=max_len, align=512 if seed % 2 else 1)
    ):
        if i % 2:
            offset = min(offset + rng.randrange(1, 511), size - 1)
            length = max(1, min(length, size - offset))
        commands.append(f"write -q -P {rng.randrange(1, 256)} {offset} {length}")
    for offset, length in random_writes(rng, size, zero_writes, max_len=max_len):
        commands.append(f"write -q -z {offset} {length}")
    for offset, length in random_writes(rng, size, discards, max_len=max_len):
        commands.append(f"discard -q {offset} {length}")
    # The last byte of the disk, so the unaligned tail holds data.
    commands.append(f"write -q -P 0x5a {size - 1} 1")
    qemu_io(image, *commands, fmt=fmt)


def oracle(image: Path, fmt: str) -> FmtImage:
    """The image with qemu's raw copy and map."""
    expected = qemu_raw(image, image.with_name(image.name + ".qemu.raw"), fmt=fmt)
    return FmtImage(image, fmt, expected, qemu_map(image, fmt=fmt))


# -- vpc ------------------------------------------------------------------------------


def build_vpc_dynamic(d: Path) -> FmtImage:
    image = qemu_img_create(d / "dyn.vhd", 7 * MiB + 12345, fmt="vpc")
    scribble(image, "vpc", 11)
    return oracle(image, "vpc")


def build_vpc_dynamic_force_size(d: Path) -> FmtImage:
    image = qemu_img_create(d / "dynforce.vhd", 5 * MiB + 1001, "force_size=on", fmt="vpc")
    scribble(image, "vpc", 12)
    return oracle(image, "vpc")


def build_vpc_fixed(d: Path) -> FmtImage:
    image = qemu_img_create(d / "fixed.vhd", 6 * MiB + 777, "subformat=fixed", fmt="vpc")
    scribble(image, "vpc", 13)
    return oracle(image, "vpc")


def build_vpc_fixed_force_size(d: Path) -> FmtImage:
    image = qemu_img_create(
        d / "fixedforce.vhd", 3 * MiB + 3333, "subformat=fixed", "force_size=on", fmt="vpc"
    )
    scribble(image, "vpc", 14, max_len=200 * KiB)
    return oracle(image, "vpc")


def _vhd_checksum(buf: bytes | bytearray, at: int) -> int:
    return ~(sum(buf) - sum(buf[at : at + 4])) & 0xFFFFFFFF


def _set_footer(buf: bytearray, at: int, disk_type: int) -> None:
    struct.pack_into(">I", buf, at + 60, disk_type)
    struct.pack_into(">I", buf, at + 64, 0)
    struct.pack_into(">I", buf, at + 64, _vhd_checksum(buf[at : at + 512], 64))


def make_differencing(child: Path, parent: Path, clear: list[tuple[int, int]]) -> None:
    """Turn qemu-made dynamic ``child`` into a differencing disk of ``parent``.

    Sets the disk type (both footer copies), the parent's unique id and name,
    a relative (W2ru) and an absolute (W2ku) locator, and clears the sector
    bitmap bits of the guest sector ranges ``clear`` (sector, count) in
    allocated blocks.
    """
    buf = bytearray(child.read_bytes())
    parent_footer = parent.read_bytes()[:512]
    footer = bytes(buf[-512:])
    dyn_off = struct.unpack_from(">Q", footer, 16)[0]
    table_off = struct.unpack_from(">Q", buf, dyn_off + 16)[0]
    block_size = struct.unpack_from(">I", buf, dyn_off + 32)[0]
    spb = block_size // 512
    for sector, count in clear:
        for s in range(sector, sector + count):
            entry = struct.unpack_from(">I", buf, table_off + 4 * (s // spb))[0]
            assert entry != 0xFFFFFFFF, "clear bits only in allocated blocks"
            i = s % spb
            buf[entry * 512 + i // 8] &= ~(0x80 >> (i % 8)) & 0xFF
    # Locator data goes in a new sector before the footer at the end of the file.
    body = buf[:-512]
    loc_off = len(body)
    rel = parent.name.encode("utf-16-le")
    absolute = ("C:\\images\\" + parent.name).encode("utf-16-le")
    body += rel.ljust(512, b"\0") + absolute.ljust(512, b"\0")
    struct.pack_into(">16s", body, dyn_off + 40, parent_footer[68:84])  # parent unique id
    struct.pack_into(">512s", body, dyn_off + 64, parent.name.encode("utf-16-be"))
    struct.pack_into(">4sIIIQ", body, dyn_off + 576, b"W2ru", 512, len(rel), 0, loc_off)
    struct.pack_into(">4sIIIQ", body, dyn_off + 600, b"W2ku", 512, len(absolute), 0, loc_off + 512)
    struct.pack_into(">I", body, dyn_off + 36, 0)
    struct.pack_into(">I", body, dyn_off + 36, _vhd_checksum(body[dyn_off : dyn_off + 1024], 36))
    out = body + footer
    _set_footer(out, 0, 4)
    _set_footer(out, len(out) - 512, 4)
    child.write_bytes(bytes(out))


def build_vpc_differencing(d: Path) -> FmtImage:
    size = 9 * MiB
    parent = qemu_img_create(d / "parent.vhd", size, fmt="vpc")
    scribble(parent, "vpc", 21)
    child = qemu_img_create(d / "child.vhd", size, fmt="vpc")
    vsize = virtual_size(child, "vpc")
    assert vsize == virtual_size(parent, "vpc")
    qemu_io(
        child,
        "write -q -P 0xc1 1M 1M",
        "write -q -P 0xc2 5000000 300000",
        f"write -q -P 0xc3 {vsize - 4096} 4096",
        fmt="vpc",
    )
    child_raw = qemu_raw(child, d / "child.alone.raw", fmt="vpc").read_bytes()
    parent_raw = qemu_raw(parent, d / "parent.qemu.raw", fmt="vpc").read_bytes()
    stored = [
        (num(e["start"]), num(e["start"]) + num(e["length"]))
        for e in qemu_map(child, fmt="vpc")
        if e["data"]
    ]
    # Sectors whose bits are cleared read from the parent again.
    clear = [(2048 + 8, 24), (2048 + 1000, 1), (9765, 100)]
    make_differencing(child, parent, clear)
    cleared = {s for first, n in clear for s in range(first, first + n)}
    out = bytearray(parent_raw)
    child_sectors: list[int] = []
    for s, e in stored:
        for sector in range(s // 512, -(-e // 512)):
            if sector not in cleared:
                lo, hi = sector * 512, min(sector * 512 + 512, vsize)
                out[lo:hi] = child_raw[lo:hi]
                child_sectors.append(sector)
    expected = d / "child.vhd.expected.raw"
    expected.write_bytes(bytes(out))
    qmap = _overlay_map(child_sectors, qemu_map(parent, fmt="vpc"))
    return FmtImage(child, "vpc", expected, qmap)


def _overlay_map(child_sectors: list[int], parent_map: QMap) -> QMap:
    """A qemu-map-shaped list: data where the child stores sectors, the parent's map elsewhere."""
    runs: list[list[int]] = []
    for sector in sorted(child_sectors):
        if runs and runs[-1][1] == sector * 512:
            runs[-1][1] += 512
        else:
            runs.append([sector * 512, sector * 512 + 512])
    out: QMap = []
    for entry in parent_map:
        lo = num(entry["start"])
        hi = lo + num(entry["length"])
        pos = lo
        for s, e in runs:
            if e <= pos or s >= hi:
                continue
            if s > pos:
                out.append({**entry, "start": pos, "length": s - pos})
            out.append(
                {
                    "start": max(s, pos),
                    "length": min(e, hi) - max(s, pos),
                    "data": True,
                    "zero": False,
                }
            )
            pos = min(e, hi)
        if pos < hi:
            out.append({**entry, "start": pos, "length": hi - pos})
    return out


# -- vdi ------------------------------------------------------------------------------


def build_vdi_dynamic(d: Path) -> FmtImage:
    image = qemu_img_create(d / "dyn.vdi", 5 * MiB + 999, fmt="vdi")
    scribble(image, "vdi", 31)
    return oracle(image, "vdi")


def build_vdi_static(d: Path) -> FmtImage:
    image = qemu_img_create(d / "static.vdi", 4 * MiB + 4097, "static=on", fmt="vdi")
    scribble(image, "vdi", 32)
    return oracle(image, "vdi")


def build_vdi_zero_blocks(d: Path) -> FmtImage:
    """A dynamic VDI with a written block and an unwritten one marked zero (0xFFFFFFFE)."""
    image = qemu_img_create(d / "zeroblocks.vdi", 6 * MiB, fmt="vdi")
    qemu_io(
        image,
        "write -q -P 0x31 0 1M",
        "write -q -P 0x32 1M 512k",
        "write -q -P 0x33 4M 100k",
        fmt="vdi",
    )
    buf = bytearray(image.read_bytes())
    bmap = struct.unpack_from("<I", buf, 0x154)[0]
    struct.pack_into("<I", buf, bmap + 4 * 1, 0xFFFFFFFE)  # written block 1: now zeros
    struct.pack_into("<I", buf, bmap + 4 * 2, 0xFFFFFFFE)  # unwritten block 2: zeros
    image.write_bytes(bytes(buf))
    return oracle(image, "vdi")


# -- raw and qcow2 over the others --------------------------------------------------------


def build_raw_sparse(d: Path) -> FmtImage:
    image = d / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(3 * MiB + 12345)
    # No zero writes or discards: qemu makes those unwritten extents, which ext4's
    # SEEK_DATA reports as holes or data depending on the page cache (see NOTES.md);
    # holes of written-but-unwritten extents are sparsefs.hostmap's business.
    scribble(image, "raw", 41, max_len=200 * KiB, zero_writes=0, discards=0)
    return oracle(image, "raw")


def _qcow2_over(d: Path, base: FmtImage, seed: int) -> FmtImage:
    top = d / "top.qcow2"
    qemu_img_create(top, None, backing=base.image.name, backing_fmt=base.fmt)
    scribble(top, "qcow2", seed, writes=6)
    return oracle(top, "qcow2")


def build_qcow2_over_vpc(d: Path) -> FmtImage:
    return _qcow2_over(d, build_vpc_dynamic(d), 51)


def build_qcow2_over_vdi(d: Path) -> FmtImage:
    return _qcow2_over(d, build_vdi_dynamic(d), 52)


BUILDERS: dict[str, Callable[[Path], FmtImage]] = {
    "vpc-dynamic": build_vpc_dynamic,
    "vpc-dynamic-force-size": build_vpc_dynamic_force_size,
    "vpc-fixed": build_vpc_fixed,
    "vpc-fixed-force-size": build_vpc_fixed_force_size,
    "vpc-differencing": build_vpc_differencing,
    "vdi-dynamic": build_vdi_dynamic,
    "vdi-static": build_vdi_static,
    "vdi-zero-blocks": build_vdi_zero_blocks,
    "raw-sparse": build_raw_sparse,
    "qcow2-over-vpc": build_qcow2_over_vpc,
    "qcow2-over-vdi": build_qcow2_over_vdi,
}


def _vmdk(builder: Callable[[Path], Path]) -> Callable[[Path], FmtImage]:
    return lambda d: oracle(builder(d), "vmdk")


# VMDK's builders live in tests/vmdk_images.py; the 3 GiB split image is left to
# tests/unit/test_vmdk.py, which compares it without reading it whole.
BUILDERS.update(
    {
        f"vmdk-{name}": _vmdk(builder)
        for name, builder in VMDK_BUILDERS.items()
        if name != "twoGbMaxExtentSparse"
    }
)


# VHDX kinds are built by tests/vhdx_images.py (see conformance_builders there).
from vhdx_images import conformance_builders as _vhdx_conformance_builders  # noqa: E402  # after BUILDERS: vhdx_images imports this module

BUILDERS.update(_vhdx_conformance_builders())


class FmtCache:
    """Builds each kind once per session directory, on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, FmtImage] = {}

    def __getitem__(self, kind: str) -> FmtImage:
        if kind not in self._built:
            d = self.root / kind
            d.mkdir()
            self._built[kind] = BUILDERS[kind](d)
        return self._built[kind]
