"""VMDK: every subformat against qemu's live answers; refusals; bad tables cost one grain.

Images come from tests/vmdk_images.py (qemu-img/qemu-io at test time); bytes
are compared with ``qemu-img convert -f vmdk -O raw``, the data/hole map with
``qemu-img map -f vmdk`` by the project's rule (support.check_map_agrees).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from sparsefs.errors import (
    ImageFormatError,
    ImageReadError,
    MissingFileError,
    SparsefsError,
    UnsupportedFeatureError,
)
from sparsefs.extents import SparseSource, seek_data, seek_hole
from sparsefs.formats import detect, open_source
from sparsefs.formats.vmdk import open_layer, probe
from sparsefs.layered import LayeredImage
from sparsefs.options import OpenOptions
from support import (
    KiB,
    MiB,
    check_map_agrees,
    qemu_img_create,
    qemu_io,
    qemu_map,
    qemu_raw,
    run,
    seek_walk,
)
from vmdk_images import BUILDERS, OFF_FLAGS, OFF_GD, OFF_GTES, SECTOR, build_all, monolithic_sparse

CHUNK = 100_003  # odd read size


def _open(path: Path, options: OpenOptions | None = None) -> LayeredImage:
    """Open through the registry, forced to vmdk; a VMDK is always a layered image."""
    source = open_source(path, fmt="vmdk", options=options)
    assert isinstance(source, LayeredImage)
    return source


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_all(tmp_path_factory.mktemp("vmdk"))


def _data_segments(source: SparseSource) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for ext in source.iter_extents(0):
        if ext.data:
            if out and out[-1][1] == ext.guest_offset:
                out[-1] = (out[-1][0], ext.end)
            else:
                out.append((ext.guest_offset, ext.end))
    return out


def check_against_qemu(image: Path, tmp: Path) -> None:
    """Bytes, extents, SEEK walk and map of ``image`` agree with qemu's answers."""
    raw_path = qemu_raw(image, tmp / (image.name + ".raw"), fmt="vmdk")
    with _open(image) as source, open(raw_path, "rb") as raw:
        assert source.size == os.path.getsize(raw_path)
        segments = _data_segments(source)
        # Every data byte, read in odd chunks, equals qemu's.
        for s, e in segments:
            pos = s
            while pos < e:
                n = min(CHUNK, e - pos)
                raw.seek(pos)
                assert source.read(pos, n) == raw.read(n), f"{image.name}: bytes differ at {pos}"
                pos += n
        # What qemu stores outside our data segments is zeros, and so is our read of it.
        for s, e in seek_walk(raw_path):
            for hs, he in _holes_within(segments, s, e, source.size):
                raw.seek(hs)
                want = raw.read(he - hs)
                assert want.count(0) == len(want), f"{image.name}: data in our hole at {hs}"
                assert source.read(hs, min(he - hs, MiB)) == bytes(min(he - hs, MiB))
        # The SEEK walk a copier does finds exactly the data segments.
        walked, pos = [], 0
        while (data := seek_data(source, pos)) is not None:
            hole = seek_hole(source, data)
            assert hole is not None
            walked.append((data, hole))
            pos = hole
        assert walked == segments
        check_map_agrees(segments, qemu_map(image, fmt="vmdk"))
        # The layered map tiles the image.
        pos = 0
        for entry in source.iter_map():
            assert entry.start == pos
            assert entry.length > 0
            pos += entry.length
        assert pos == source.size


def _holes_within(
    segments: list[tuple[int, int]], s: int, e: int, size: int
) -> list[tuple[int, int]]:
    out, pos = [], s
    for ds, de in segments:
        if de <= pos or ds >= e:
            continue
        if ds > pos:
            out.append((pos, ds))
        pos = max(pos, de)
    if pos < min(e, size):
        out.append((pos, min(e, size)))
    return out


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_matches_qemu(images: dict[str, Path], kind: str, tmp_path: Path) -> None:
    """Each subformat reads byte for byte as qemu reads it, with qemu's holes."""
    check_against_qemu(images[kind], tmp_path)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_probe_and_detect(images: dict[str, Path], kind: str) -> None:
    """qemu's probe rule recognises every image; the registry detects it as vmdk."""
    head = images[kind].read_bytes()[:2048]
    assert probe(head, b"", len(head))
    assert detect(str(images[kind])) == "vmdk"
    assert not probe(b"version=4\n", b"", 10)
    assert not probe(b"x" * 512, b"", 512)


def test_two_gb_extents_and_describe(images: dict[str, Path]) -> None:
    """The split image has several extent files, and its size is past 2 GiB."""
    layer = open_layer(images["twoGbMaxExtentSparse"])
    try:
        info = layer.describe()
        assert layer.size > 2 * 1024 * MiB
        assert len(info["extents"]) >= 2
        assert info["create-type"] == "twoGbMaxExtentSparse"
    finally:
        layer.close()


def test_stream_footer_is_what_is_read(images: dict[str, Path]) -> None:
    """With GD_AT_END the header has no usable grain directory; the footer's is used."""
    buf = images["streamOptimized-footer"].read_bytes()
    assert struct.unpack_from("<Q", buf, OFF_GD)[0] == 0xFFFF_FFFF_FFFF_FFFF
    layer = open_layer(images["streamOptimized-footer"])
    try:
        assert layer.create_type == "streamOptimized"
    finally:
        layer.close()


# -- refusals ----------------------------------------------------------------------------


def _one_line(exc: SparsefsError, path: Path) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


def _patch(src: Path, dst: Path, offset: int, fmt: str, value: int) -> Path:
    buf = bytearray(src.read_bytes())
    struct.pack_into(fmt, buf, offset, value)
    dst.write_bytes(bytes(buf))
    return dst


@pytest.mark.parametrize(
    ("what", "offset", "fmt", "value", "error", "needle"),
    [
        ("version", 4, "<I", 4, UnsupportedFeatureError, "version 4"),
        ("flags", OFF_FLAGS, "<I", 0x3 | 0x100, UnsupportedFeatureError, "flags 0x100"),
        ("compression", 77, "<H", 2, UnsupportedFeatureError, "compression algorithm 2"),
        ("gtes", OFF_GTES, "<I", 1024, ImageFormatError, "grain table size"),
        ("gd", OFF_GD, "<Q", 1 << 40, ImageFormatError, "grain directory"),
    ],
)
def test_header_refusals(
    tmp_path: Path,
    what: str,
    offset: int,
    fmt: str,
    value: int,
    error: type[SparsefsError],
    needle: str,
) -> None:
    """Unknown version, flags, compression; bad table geometry: one line naming the file."""
    good = monolithic_sparse(tmp_path)
    bad = _patch(good, tmp_path / f"bad-{what}.vmdk", offset, fmt, value)
    with pytest.raises(error) as info:
        open_source(bad, fmt="vmdk")
    assert needle in _one_line(info.value, bad)


def _descriptor(path: Path, create_type: str, lines: list[str], extra: str = "") -> Path:
    path.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="{create_type}"\n{extra}\n'
        # A comment, not a blank line, before the extents: qemu 7.2 parses an
        # extent line that follows a blank line twice.
        "# Extent description\n" + "\n".join(lines) + "\n"
    )
    return path


@pytest.mark.parametrize(
    ("create_type", "line", "extra", "error", "needle"),
    [
        ("monolithicFlat", 'RW 2048 FLAT "absent.flat" 0', "", MissingFileError, "absent.flat"),
        ("seSparse", 'RW 2048 SESPARSE "x.vmdk"', "", UnsupportedFeatureError, "SE sparse"),
        ("vmfsSparse", 'RW 2048 VMFSSPARSE "x.vmdk"', "", UnsupportedFeatureError, "VMFS sparse"),
        ("monolithicFlat", 'RW 2048 VMFSRDM "x.vmdk"', "", UnsupportedFeatureError, "raw device"),
        ("custom", 'RW 2048 FLAT "d.flat" 0', "", UnsupportedFeatureError, "custom"),
        ("monolithicFlat", 'RW 2048 FLAT "d.flat"', "", ImageFormatError, "without offset"),
        (
            "monolithicFlat",
            'RW 2048 FLAT "d.flat" 0',
            'encryption.keySafe = "vmware:key"',
            UnsupportedFeatureError,
            "encrypted",
        ),
        ("monolithicFlat", "", "", ImageFormatError, "no extents"),
    ],
)
def test_descriptor_refusals(
    tmp_path: Path, create_type: str, line: str, extra: str, error: type[SparsefsError], needle: str
) -> None:
    """Missing extents, SE sparse, VMFS sparse, RDM, unknown types, encryption: one line."""
    (tmp_path / "d.flat").write_bytes(bytes(MiB))
    desc = _descriptor(tmp_path / "d.vmdk", create_type, [line] if line else [], extra)
    with pytest.raises(error) as info:
        open_source(desc, fmt="vmdk")
    assert needle in _one_line(info.value, desc)


def test_cowd_sparse_refused(tmp_path: Path) -> None:
    """An ESXi-hosted COWD sparse file is VMDK to the probe, and refused."""
    p = tmp_path / "cowd.vmdk"
    p.write_bytes(b"COWD" + bytes(4092))
    assert detect(str(p)) == "vmdk"
    with pytest.raises(UnsupportedFeatureError) as info:
        open_source(p, fmt="vmdk")
    assert "COWD" in _one_line(info.value, p)


def test_parent_cid_mismatch_refused(tmp_path: Path) -> None:
    """A write to the parent after the delta was made changes its CID: refused like qemu's EIO."""
    base = qemu_img_create(tmp_path / "b.vmdk", MiB, fmt="vmdk")
    top = qemu_img_create(
        tmp_path / "t.vmdk", MiB, "backing_file=b.vmdk", "backing_fmt=vmdk", fmt="vmdk"
    )
    with _open(top) as ok:
        assert ok.read(0, 4) == bytes(4)
    qemu_io(base, "write -P 1 0 4k", fmt="vmdk")
    with pytest.raises(ImageFormatError) as info:
        open_source(top, fmt="vmdk")
    assert "parentCID" in _one_line(info.value, top)
    # Without the chain the delta alone opens.
    with _open(top, OpenOptions(backing=False)) as alone:
        assert alone.read(0, 4096) == bytes(4096)


def test_missing_parent(tmp_path: Path) -> None:
    """A delta whose parent file is gone: one line naming it."""
    qemu_img_create(tmp_path / "b.vmdk", MiB, fmt="vmdk")
    top = qemu_img_create(
        tmp_path / "t.vmdk", MiB, "backing_file=b.vmdk", "backing_fmt=vmdk", fmt="vmdk"
    )
    (tmp_path / "b.vmdk").unlink()
    with pytest.raises(MissingFileError) as info:
        open_source(top, fmt="vmdk")
    assert "b.vmdk" in _one_line(info.value, top)


# -- access modes and ZERO extents (qemu drops these lines, so its answer is per piece) -----


def test_access_modes_and_zero_extent(tmp_path: Path) -> None:
    """RDONLY reads like RW, ZERO is a hole of zeros, NOACCESS is EIO for its range only."""
    flat = tmp_path / "p.flat"
    flat.write_bytes(os.urandom(256 * KiB))
    rw = _descriptor(tmp_path / "rw.vmdk", "monolithicFlat", ['RW 512 FLAT "p.flat" 0'])
    want = qemu_raw(rw, tmp_path / "rw.raw", fmt="vmdk").read_bytes()
    desc = _descriptor(
        tmp_path / "modes.vmdk",
        "monolithicFlat",
        [
            'RDONLY 512 FLAT "p.flat" 0',
            "RW 128 ZERO",
            'NOACCESS 64 FLAT "p.flat" 0',
            'RW 512 FLAT "p.flat" 0',
        ],
    )
    with _open(desc) as img:
        assert img.size == (512 + 128 + 64 + 512) * SECTOR
        assert img.read(0, 256 * KiB) == want
        z0, z1 = 256 * KiB, 320 * KiB
        assert img.read(z0, z1 - z0) == bytes(z1 - z0)
        holes = [(e.guest_offset, e.end) for e in img.iter_extents() if not e.data]
        assert holes == [(z0, z1)]
        with pytest.raises(ImageReadError):
            img.read(z1, 1)
        assert img.read(z1 + 32 * KiB, 256 * KiB) == want


# -- bad tables: EIO for one grain; bounded memory ----------------------------------------


def _first_gt(buf: bytes | bytearray) -> int:
    (gd,) = struct.unpack_from("<Q", buf, OFF_GD)
    (gt,) = struct.unpack_from("<I", buf, gd * SECTOR)
    return int(gt) * SECTOR


def test_bad_gte_is_eio_for_that_grain_only(tmp_path: Path) -> None:
    """A grain table entry pointing outside the file fails that grain; its neighbours read."""
    p = qemu_img_create(tmp_path / "g.vmdk", MiB, fmt="vmdk")
    qemu_io(p, "write -P 1 0 64k", "write -P 2 64k 64k", "write -P 3 128k 64k", fmt="vmdk")
    buf = bytearray(p.read_bytes())
    struct.pack_into("<I", buf, _first_gt(buf) + 4, 0x7FFF_0000)
    bad = tmp_path / "bad.vmdk"
    bad.write_bytes(bytes(buf))
    with _open(bad) as img:
        assert img.read(0, 64 * KiB) == b"\1" * (64 * KiB)
        assert img.read(128 * KiB, 64 * KiB) == b"\3" * (64 * KiB)
        with pytest.raises(ImageReadError) as info:
            img.read(64 * KiB + 5, 10)
        assert "bad.vmdk" in str(info.value)
        assert [(e.guest_offset, e.end) for e in img.iter_extents() if e.data] == [(0, 192 * KiB)]


def test_corrupt_compressed_grain_is_eio_for_that_grain_only(
    images: dict[str, Path], tmp_path: Path
) -> None:
    """A damaged deflate stream fails its grain; the other grains still read as qemu's."""
    src = images["streamOptimized"]
    want = qemu_raw(src, tmp_path / "s.raw", fmt="vmdk").read_bytes()
    buf = bytearray(src.read_bytes())
    first = struct.unpack_from("<I", buf, _first_gt(buf))[0]
    assert first
    buf[first * SECTOR + 14 : first * SECTOR + 30] = b"\xff" * 16
    bad = tmp_path / "bad-stream.vmdk"
    bad.write_bytes(bytes(buf))
    with _open(bad) as img:
        with pytest.raises(ImageReadError):
            img.read(0, 4096)
        segments = _data_segments(img)
        for s, e in segments:
            if s >= 64 * KiB:
                assert img.read(s, e - s) == want[s:e]


def test_bad_grain_table_offset_refused_at_open(tmp_path: Path) -> None:
    """A grain directory entry pointing past the file is refused when opening."""
    p = qemu_img_create(tmp_path / "g.vmdk", MiB, fmt="vmdk")
    qemu_io(p, "write -P 1 0 64k", fmt="vmdk")
    buf = bytearray(p.read_bytes())
    gd = struct.unpack_from("<Q", buf, OFF_GD)[0]
    struct.pack_into("<I", buf, gd * SECTOR, 0x00FF_FFFF)
    bad = tmp_path / "bad.vmdk"
    bad.write_bytes(bytes(buf))
    with pytest.raises(ImageFormatError) as info:
        open_source(bad, fmt="vmdk")
    assert "grain table 0" in _one_line(info.value, bad)


def test_grain_tables_loaded_on_demand_and_bounded(tmp_path: Path) -> None:
    """Walking an image with many grain tables keeps at most the configured number."""
    p = qemu_img_create(tmp_path / "many.vmdk", 1024 * MiB, fmt="vmdk")
    qemu_io(p, *[f"write -P {i + 1} {i * 32 * MiB} 4k" for i in range(32)], fmt="vmdk")
    layer = open_layer(p, OpenOptions(l2_cache_bytes=8 * KiB))
    try:
        ext = layer.extents[0]
        assert ext.tables_cached == 0  # type: ignore[union-attr]  # a sparse extent here
        runs = list(layer.runs(0, layer.size))
        assert sum(1 for r in runs if r[2] == 0) == 32
        assert ext.tables_cached <= 4  # type: ignore[union-attr]  # a sparse extent here
    finally:
        layer.close()


def test_never_writes_the_source(images: dict[str, Path], tmp_path: Path) -> None:
    """Opening and reading leaves every file of a chain unchanged."""
    d = images["delta-chain"].parent
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    with _open(images["delta-chain"]) as img:
        img.read(0, img.size)
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_extent_outside_backing_dir_refused(tmp_path: Path) -> None:
    """With --backing-dir, an extent file elsewhere on the host is refused, not served."""
    inside = tmp_path / "in"
    inside.mkdir()
    (tmp_path / "outside.flat").write_bytes(b"secret" * 1000)
    desc = _descriptor(
        inside / "d.vmdk", "monolithicFlat", [f'RW 8 FLAT "{tmp_path / "outside.flat"}" 0']
    )
    with _open(desc) as img:  # without confinement qemu's rule: any path
        assert img.read(0, 6) == b"secret"
    with pytest.raises(UnsupportedFeatureError) as info:
        open_source(desc, fmt="vmdk", options=OpenOptions(backing_dir=str(inside)))
    assert "outside --backing-dir" in _one_line(info.value, desc)


def test_huge_compressed_grains_refused(images: dict[str, Path], tmp_path: Path) -> None:
    """A stream whose grains would inflate to 32 MiB each is refused, not inflated."""
    bad = _patch(images["streamOptimized"], tmp_path / "huge.vmdk", 20, "<Q", 0x10000)
    with pytest.raises(UnsupportedFeatureError) as info:
        open_source(bad, fmt="vmdk")
    assert "compressed grains" in _one_line(info.value, bad)


def test_many_extent_lines_share_one_file(tmp_path: Path) -> None:
    """3000 extent lines naming one flat file open it once (no descriptor per line)."""
    flat = tmp_path / "one.flat"
    flat.write_bytes(bytes(range(256)) * 2)
    desc = _descriptor(tmp_path / "many.vmdk", "monolithicFlat", ['RW 1 FLAT "one.flat" 0'] * 3000)
    with _open(desc) as img:
        assert img.size == 3000 * SECTOR
        assert img.read(2999 * SECTOR, SECTOR) == flat.read_bytes()[:SECTOR]
        fds = os.listdir("/proc/self/fd")
        assert len(fds) < 100


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "# Disk DescriptorFile\n",
        "# a\n# b\n",
        "   \n",
        "  \r\n# c\n",
        "\n",
        "x\n",
        " x\n",
    ],
)
@pytest.mark.parametrize("version", ["version=1\n", "version=3\r\n", "version=4\n"])
def test_text_probe_as_qemu(tmp_path: Path, prefix: str, version: str) -> None:
    """A text descriptor is VMDK to the registry exactly when qemu-img probes it as vmdk."""
    (tmp_path / "p.flat").write_bytes(bytes(64 * KiB))
    path = tmp_path / "probe.img"  # no .vmdk suffix: only the magic decides
    path.write_text(
        prefix + version + "CID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n# Extent description\n'
        'RW 128 FLAT "p.flat" 0\n',
        newline="",
    )
    info = json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    assert detect(str(path)) == info["format"]


def test_shared_grain_table_refused(tmp_path: Path) -> None:
    """Two grain directory entries naming one grain table: refused at open, one line."""
    p = qemu_img_create(tmp_path / "g.vmdk", 64 * MiB, fmt="vmdk")
    qemu_io(p, "write -P 1 0 64k", fmt="vmdk")
    buf = bytearray(p.read_bytes())
    gd = struct.unpack_from("<Q", buf, OFF_GD)[0]
    struct.pack_into("<I", buf, gd * SECTOR + 4, struct.unpack_from("<I", buf, gd * SECTOR)[0])
    bad = tmp_path / "bad.vmdk"
    bad.write_bytes(bytes(buf))
    with pytest.raises(ImageFormatError) as info:
        open_source(bad, fmt="vmdk")
    assert "overlap" in _one_line(info.value, bad)
