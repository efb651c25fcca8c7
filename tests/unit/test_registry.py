"""The format registry through the CLI: names, detection, -f, backing_fmt, refusals.

Images come from tests/format_builders.py (made by qemu at test time); the
answers from qemu (``qemu-img convert`` / ``map``) or from the files themselves.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from format_builders import FmtCache
from sparsefs.cli.checksum import file_format
from sparsefs.cli.common import image_stem
from sparsefs.errors import UnsupportedFeatureError
from sparsefs.formats import FORMAT_NAMES, spec_for
from support import check_map_agrees, one_line_error, qemu_img_create, qemu_raw, sparsefs


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> FmtCache:
    return FmtCache(tmp_path_factory.mktemp("registry"))


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("disk.qcow2", "disk"),
        ("disk.VHD", "disk"),
        ("disk.vpc", "disk"),
        ("d.vdi", "d"),
        ("d.vmdk", "d"),
        ("d.vhdx", "d"),
        ("lv.img", "lv"),
        ("copy.raw", "copy"),
        ("noext", "noext"),
        (".vhd", ".vhd"),
        ("a.b.vdi", "a.b"),
    ],
)
def test_mount_names_strip_any_format_suffix(name: str, stem: str) -> None:
    assert image_stem(f"/x/{name}") == stem


def test_checksum_reads_by_suffix_or_forced_format() -> None:
    assert file_format("a.vhd", None) == "vpc"
    assert file_format("a.VDI", None) == "vdi"
    assert file_format("a.qcow2", None) == "qcow2"
    assert file_format("a.bin", None) == "raw"
    assert file_format("a.vhd", "raw") == "raw"
    assert set(FORMAT_NAMES) == {"qcow2", "vmdk", "vhdx", "vpc", "vdi", "raw"}
    with pytest.raises(UnsupportedFeatureError, match="unknown format 'foo'"):
        spec_for("foo", "x.img")


@pytest.mark.parametrize("kind", ["vpc-dynamic", "vdi-dynamic", "vpc-differencing"])
def test_map_info_checksum_of_other_formats(built: FmtCache, kind: str) -> None:
    img = built[kind]
    entries = json.loads(sparsefs("map", "--output=json", str(img.image), check=True).stdout)
    pos = 0
    for e in entries:
        assert e["start"] == pos
        pos += e["length"]
    assert pos == img.expected.stat().st_size
    check_map_agrees(
        [(e["start"], e["start"] + e["length"]) for e in entries if e["data"]], img.qmap
    )
    info = sparsefs("info", str(img.image), check=True).stdout
    assert f"file format: {img.fmt}" in info
    digests = sparsefs("checksum", str(img.image), str(img.expected), check=True).stdout
    first, second = (line.split()[0] for line in digests.splitlines())
    assert first == second


def test_backing_fmt_is_honoured(built: FmtCache, tmp_path: Path) -> None:
    """A qcow2 overlay whose backing_fmt says raw reads a VHD file as raw, as qemu does."""
    vhd = built["vpc-dynamic"].image
    top = tmp_path / "top.qcow2"
    qemu_img_create(top, vhd.stat().st_size, backing=vhd, backing_fmt="raw")
    want = qemu_raw(top, tmp_path / "want.raw")
    assert want.read_bytes()[:8] == b"conectix"  # the VHD's own bytes, not its guest disk
    assert sparsefs("verify", "-q", str(top), str(want)).returncode == 0


def _differencing_copy(built: FmtCache, tmp_path: Path) -> tuple[Path, Path]:
    src = built["vpc-differencing"].image
    d = tmp_path / "diff"
    d.mkdir()
    shutil.copy(src, d / src.name)
    shutil.copy(src.with_name("parent.vhd"), d / "parent.vhd")
    return d / src.name, d / "parent.vhd"


def test_differencing_parent_missing_or_wrong(built: FmtCache, tmp_path: Path) -> None:
    child, parent = _differencing_copy(built, tmp_path)
    other = built["vpc-dynamic"].image
    shutil.copy(other, parent)  # another disk under the parent's name
    one_line_error(sparsefs("info", str(child)), str(child), "is not the disk it was made from")
    parent.unlink()
    one_line_error(sparsefs("info", str(child)), str(child), "parent VHD is missing")


def test_differencing_parent_outside_backing_dir(built: FmtCache, tmp_path: Path) -> None:
    child, _ = _differencing_copy(built, tmp_path)
    jail = tmp_path / "jail"
    jail.mkdir()
    one_line_error(
        sparsefs("info", "--backing-dir", str(jail), str(child)),
        str(child),
        "outside --backing-dir",
    )
    assert sparsefs("info", "--backing-dir", str(child.parent), str(child)).returncode == 0


def test_refusals_are_one_line(built: FmtCache, tmp_path: Path) -> None:
    vdi = tmp_path / "diff.vdi"
    buf = bytearray(built["vdi-dynamic"].image.read_bytes())
    buf[0x1B8:0x1C8] = b"\x01" * 16  # a parent UUID: a differencing VDI
    vdi.write_bytes(bytes(buf))
    one_line_error(sparsefs("info", str(vdi)), str(vdi), "differencing VDI")
    vhd = tmp_path / "bad.vhd"
    buf = bytearray(built["vpc-dynamic"].image.read_bytes())
    struct.pack_into(">I", buf, 40, 12345)  # original size, under the footer checksum
    vhd.write_bytes(bytes(buf))
    one_line_error(sparsefs("map", str(vhd)), str(vhd), "checksum is wrong")
    one_line_error(sparsefs("info", "-f", "vdi", str(vhd)), str(vhd), "not a VDI image")


def test_damaged_magic_is_refused_not_read_as_raw(built: FmtCache, tmp_path: Path) -> None:
    """No magic matches, but the suffix names a format: refused (``-f raw`` still reads it)."""
    vdi = tmp_path / "damaged.vdi"
    buf = bytearray(built["vdi-dynamic"].image.read_bytes())
    buf[0x40:0x44] = bytes(4)
    vdi.write_bytes(bytes(buf))
    one_line_error(sparsefs("info", str(vdi)), str(vdi), "not a vdi image", "-f raw")
    assert "file format: raw" in sparsefs("info", "-f", "raw", str(vdi), check=True).stdout


def test_fixed_vhd_whose_guest_wrote_a_footer_at_sector_0(built: FmtCache, tmp_path: Path) -> None:
    """The valid fixed footer at the end decides; sector 0 stays guest data."""
    fixed = built["vpc-fixed"]
    disk = tmp_path / "nested.vhd"
    buf = bytearray(fixed.image.read_bytes())
    buf[:512] = built["vpc-dynamic"].image.read_bytes()[:512]
    disk.write_bytes(bytes(buf))
    want = bytearray(fixed.expected.read_bytes())
    want[:512] = buf[:512]
    copy = tmp_path / "want.raw"
    copy.write_bytes(bytes(want))
    assert sparsefs("verify", "-q", "-f", "vpc", str(disk), str(copy)).returncode == 0
