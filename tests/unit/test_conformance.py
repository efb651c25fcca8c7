"""Every image of every format tests/format_builders.py builds, against qemu; seeded fuzz.

The conformance check (tests/conformance.py) runs once per built kind.  The
fuzz test mutates qemu-made images of each format (header and footer fields,
BAT / block map entries, sector bitmaps, truncation; VHD footers get their
checksum fixed up most of the time, so the mutant reaches past it) and asks
that each mutant is refused in one line or served self-consistently.

Budget: ``SPARSEFS_FMT_FUZZ_ITERATIONS`` mutants per format (default 150),
seed ``SPARSEFS_FUZZ_SEED``.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from conformance import capped_address_space, check_conformance, fuzz_loop
from format_builders import BUILDERS, FmtCache, FmtImage
from sparsefs.formats import detect, open_source
from sparsefs.options import OpenOptions

ITERATIONS = int(os.environ.get("SPARSEFS_FMT_FUZZ_ITERATIONS", "150"))
SEED = int(os.environ.get("SPARSEFS_FUZZ_SEED", "20240501"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> FmtCache:
    return FmtCache(tmp_path_factory.mktemp("fmt-images"))


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_conformance(built: FmtCache, kind: str) -> None:
    img: FmtImage = built[kind]
    check_conformance(img.image, img.fmt, img.expected, img.qmap, random.Random(kind))


def test_raw_is_never_probed_into(built: FmtCache, tmp_path: Path) -> None:
    """A raw disk whose guest wrote a VHD footer copy at sector 0 is raw when -f raw says so."""
    vhd = built["vpc-dynamic"].image
    disk = tmp_path / "guest.img"
    disk.write_bytes(vhd.read_bytes()[:512] + bytes(4096))
    assert detect(str(disk)) == "vpc"  # the magic matches, as it would for qemu-img
    source = open_source(disk, "raw", OpenOptions())
    try:
        assert source.read(0, 512) == vhd.read_bytes()[:512]
    finally:
        source.close()  # type: ignore[attr-defined]  # every opened image has close()


# -- fuzz ---------------------------------------------------------------------------------

Region = tuple[int, int, str]  # start, end, struct byte order


def _vpc_regions(buf: bytes) -> list[Region]:
    size = len(buf)
    regions: list[Region] = [(size - 512, size, ">")]
    if buf[:8] == b"conectix":
        dyn = struct.unpack_from(">Q", buf, 16)[0]
        table = struct.unpack_from(">Q", buf, dyn + 16)[0]
        regions += [(0, 512, ">"), (dyn, dyn + 1024, ">"), (table, table + 64, ">")]
        first = struct.unpack_from(">I", buf, table)[0]
        if first != 0xFFFFFFFF:
            regions.append((first * 512, first * 512 + 512, ">"))
    return regions


def _vdi_regions(buf: bytes) -> list[Region]:
    bmap = struct.unpack_from("<I", buf, 0x154)[0]
    return [(0x40, 0x1C8, "<"), (bmap, bmap + 64, "<")]


def _fix_vhd_checksums(buf: bytearray) -> None:
    for at in (0, len(buf) - 512):
        if at >= 0 and buf[at : at + 8] == b"conectix":
            struct.pack_into(">I", buf, at + 64, 0)
            total = sum(buf[at : at + 512])
            struct.pack_into(">I", buf, at + 64, ~total & 0xFFFFFFFF)


def _mutate(buf: bytearray, rng: random.Random) -> str:
    """One seeded change to a VHD or VDI: a field, a byte, or a truncation."""
    if not buf:
        return "already empty"
    is_vhd = buf[-512:-504] == b"conectix" or buf[:8] == b"conectix"
    try:  # an earlier change may have moved the tables out of the file
        regions = _vpc_regions(bytes(buf)) if is_vhd else _vdi_regions(bytes(buf))
    except (struct.error, OverflowError):
        regions = []
    regions = [(s, min(e, len(buf)), o) for s, e, o in regions if 0 <= s < len(buf) - 8]
    if not regions:
        regions = [(0, min(len(buf), 512), ">" if is_vhd else "<")]
    roll = rng.random()
    if roll < 0.08 or len(buf) < 16:
        cut = rng.randrange(len(buf))
        del buf[cut:]
        return f"truncated to {cut}"
    start, end, order = rng.choice(regions)
    if roll < 0.3:
        at = rng.randrange(start, end)
        old = buf[at]
        buf[at] = rng.randrange(256)
        what = f"byte {at:#x}: {old:#x} -> {buf[at]:#x}"
    else:
        width = rng.choice((4, 4, 8, 2))
        at = start + rng.randrange(0, max(1, end - start - width)) // width * width
        code = {2: "H", 4: "I", 8: "Q"}[width]
        limit = 1 << (8 * width)
        old = struct.unpack_from(order + code, buf, at)[0]
        value = (
            rng.choice(
                [
                    0,
                    1,
                    limit - 1,
                    limit - 2,
                    old + 1,
                    old - 1,
                    old * 2,
                    len(buf) // 512,
                    len(buf),
                    rng.randrange(limit),
                ]
            )
            % limit
        )
        struct.pack_into(order + code, buf, at, value)
        what = f"u{8 * width} at {at:#x}: {old:#x} -> {value:#x}"
    if is_vhd and rng.random() < 0.7:
        _fix_vhd_checksums(buf)
        what += " (checksums fixed)"
    return what


@pytest.mark.parametrize("fmt", ["vpc", "vdi"])
def test_fuzz_format(built: FmtCache, fmt: str) -> None:
    """Seeded mutants of qemu-made images of ``fmt``: a clean error or a consistent image."""
    bases = {
        kind: (built[kind].image, fmt)
        for kind in sorted(BUILDERS)
        if kind.startswith(fmt + "-") and kind != "vpc-differencing"
    }
    with capped_address_space():
        failures = fuzz_loop(bases, _mutate, ITERATIONS, SEED)
    assert not failures, f"{len(failures)} mutants misbehaved:\n" + "\n".join(failures)
