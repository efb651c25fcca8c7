"""The whole qcow2 format (issue 3) without FUSE, against qemu.

Every kind of image in the issue's "Done when" list is built with qemu-img
and qemu-io (tests/format_images.py, one builder per kind), then read through
``open_image``: the bytes must equal ``qemu-img convert -O raw`` (``-l`` for a
snapshot), the extent map must agree with ``qemu-img map --output=json`` by
the project's rule, and ``sparsefs map``/``sparsefs info`` must agree with
``qemu-img map``/``qemu-img info``.  Images sparsefs refuses are refused with
one line that names the file and the problem.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from format_images import (
    BUILDERS,
    Built,
    ImageCache,
    applied_snapshot_copy,
    qemu_convert,
    qemu_info,
    qemu_map_of,
)
from sparsefs.cli import main
from sparsefs.cli.mountset import open_mount_set, snapshot_file_names
from sparsefs.errors import (
    ImageFormatError,
    ImageReadError,
    MissingFileError,
    UnsupportedFeatureError,
)
from sparsefs.extents import Extent
from sparsefs.formats.qcow2 import Qcow2Image, open_image
from sparsefs.formats.qcow2.image import RUN_COMPRESSED
from sparsefs.options import OpenOptions
from support import (
    KiB,
    MiB,
    check_map_agrees,
    check_stored,
    host_files_of,
    make_encrypted_image,
    qemu_img_create,
    qemu_io,
    run,
    sparsefs,
    stored_segments,
)

SNAPSHOT_CASES = [("snapshots", "first"), ("snapshots", "second"), ("snapshots-overlay", "before")]
CASES = [(kind, None) for kind in BUILDERS] + SNAPSHOT_CASES
OVERLAYS = [
    "chain3-raw-base",
    "backing-shorter",
    "backing-shorter-raw-odd",
    "backing-longer",
    "zero-hides-backing",
    "relative-backing",
    "probed-backing",
    "extended-l2-overlay",
    "backing-fmt-raw-over-qcow2",
    "snapshots-overlay",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageCache:
    return ImageCache(tmp_path_factory.mktemp("formats"))


@dataclass
class Case:
    """One image (or snapshot) with qemu's answers about it."""

    built: Built
    snapshot: str | None
    expected: bytes  # qemu's bytes
    qmap: list[dict[str, object]]  # qemu's map
    host_files: list[Path]  # the file holding each layer's data (FIEMAP oracle)


@pytest.fixture(
    scope="module", params=CASES, ids=[k if s is None else f"{k}@{s}" for k, s in CASES]
)
def case(
    request: pytest.FixtureRequest, images: ImageCache, tmp_path_factory: pytest.TempPathFactory
) -> Case:
    kind, snapshot = request.param
    built = images.get(kind)
    out = tmp_path_factory.mktemp("oracle") / "out.raw"
    host_files = host_files_of(built.image, cwd=built.cwd)
    if snapshot is None:
        return Case(built, None, qemu_convert(built, out), qemu_map_of(built), host_files)
    # qemu-img map has no snapshot option: map a copy with the snapshot applied.
    # Its bytes are also the snapshot's at the snapshot's own virtual size;
    # its data clusters sit at the same offsets as in the image, whose host
    # file is the one that says what is written (the copy may not keep holes).
    copy = built.image.with_name(f"applied-{snapshot}.qcow2")
    applied_snapshot_copy(built, snapshot, copy)
    applied = Built(copy, cwd=built.cwd)
    return Case(built, snapshot, qemu_convert(applied, out), qemu_map_of(applied), host_files)


def open_case(case: Case, options: OpenOptions | None = None) -> tuple[Qcow2Image, Qcow2Image]:
    """(the opened image, the source under test: the image or its snapshot view)."""
    image = open_image(case.built.image, options)
    if case.snapshot is None:
        return image, image
    [snap] = [s for s in image.snapshots if s.name == case.snapshot]
    return image, image.open_snapshot(snap)


def chunk_sizes(seed: int) -> Iterator[int]:
    """Read sizes that put chunk boundaries everywhere: 1 byte to past a 2 MiB cluster."""
    rng = random.Random(seed)
    fixed = [1, 511, 513, 4095, 65537, 3 * MiB + 1]
    while True:
        yield rng.choice(fixed) if rng.random() < 0.3 else rng.randrange(1, 700 * KiB)


def data_segments(extents: list[Extent]) -> list[tuple[int, int]]:
    return [(e.guest_offset, e.end) for e in extents if e.data]


# -- bytes and holes, every kind ------------------------------------------------------------


def test_read_equals_qemu_convert(case: Case) -> None:
    expected = case.expected
    image, source = open_case(case)
    with image:
        assert source.size == len(expected)
        assert source.read(0, source.size) == expected
        pos = 0
        sizes = chunk_sizes(len(expected))
        while pos < source.size:
            n = next(sizes)
            got = source.read(pos, n)
            assert got == expected[pos : pos + n], f"read({pos}, {n}) differs"
            pos += n
        assert source.read(source.size, 4096) == b""
        assert source.read(source.size - 3, 4096) == expected[-3:]


def test_extents_agree_with_qemu_map(case: Case) -> None:
    image, source = open_case(case)
    with image:
        extents = list(source.iter_extents())
        # The runs tile [0, size) ...
        assert extents[0].guest_offset == 0
        assert extents[-1].end == source.size
        for a, b in itertools.pairwise(extents):
            assert a.end == b.guest_offset
            assert a.length > 0
        # ... holes read as zeros (a copier that skips them loses nothing) ...
        for ext in extents:
            if not ext.data:
                got = source.read(ext.guest_offset, ext.length)
                assert got == bytes(ext.length), f"hole {ext} holds data"
        # ... and agree with qemu's map, also when the walk starts mid-extent.
        check_stored(data_segments(extents), case.qmap, case.host_files)
        for ext in extents[:: max(1, len(extents) // 16)]:
            mid = ext.guest_offset + ext.length // 2
            tail = list(source.iter_extents(mid))
            assert tail[0].guest_offset == mid
            assert (
                data_segments(tail)[:1]
                == [(max(s, mid), e) for s, e in data_segments(extents) if e > mid][:1]
            )


def test_map_command_agrees_with_qemu_map(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["map", "--output=json", str(case.built.image)]
    if case.snapshot is not None:
        args += ["-l", case.snapshot]
    assert main(args) == 0
    entries = json.loads(capsys.readouterr().out)
    pos = 0
    for e in entries:
        assert e["start"] == pos, e
        assert e["length"] > 0, e
        pos += e["length"]
    assert pos == len(case.expected)
    check_map_agrees(
        [(e["start"], e["start"] + e["length"]) for e in entries if e["data"]], case.qmap
    )
    # Piece by piece: the same layer (depth), allocation and flags as qemu, and
    # the same host offset wherever qemu reports stored data at one.  qemu's
    # "zero" on allocated data comes from the image file's holes, which
    # sparsefs does not consult; an offset on a hole means nothing to a reader.
    cuts = {_int(e["start"]) for e in case.qmap} | {e["start"] for e in entries}
    for (lo, hi, q), (_, _, ours) in zip(
        map_pieces(case.qmap, cuts), map_pieces(entries, cuts), strict=True
    ):
        where = f"[{lo}, {hi}): qemu {q}, sparsefs {ours}"
        if not q["data"] and hi - lo < 512 and q["present"] and not ours["present"]:
            # qemu rounds a raw layer's length up to 512 bytes, so the zeros
            # after a raw backing file's odd end are "present" in that layer.
            assert not ours["data"], where
            continue
        assert (ours["data"], ours["present"], ours["depth"]) == (
            q["data"],
            q["present"],
            q["depth"],
        ), where
        if not (q["data"] and q["zero"]):
            assert ours["zero"] == q["zero"], where
        if q["data"] and not q["zero"] and q["offset"] is not None:
            assert ours["offset"] == q["offset"], where


def map_pieces(
    entries: list[dict[str, object]], cuts: set[int]
) -> list[tuple[int, int, dict[str, object]]]:
    """Map entries split at every cut: (start, end, fields), offsets advanced."""
    out = []
    for e in entries:
        start, end = _int(e["start"]), _int(e["start"]) + _int(e["length"])
        points = sorted({start, end, *(c for c in cuts if start < c < end)})
        for lo, hi in itertools.pairwise(points):
            fields = {k: e[k] for k in ("depth", "present", "zero", "data")}
            fields["offset"] = _int(e["offset"]) + lo - start if "offset" in e else None
            out.append((lo, hi, fields))
    return out


def _int(value: object) -> int:
    assert isinstance(value, int), value
    return value


# -- sparsefs info against qemu-img info ----------------------------------------------------


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_info_agrees_with_qemu_info(
    kind: str, images: ImageCache, capsys: pytest.CaptureFixture[str]
) -> None:
    built = images.get(kind)
    chain = qemu_info(built)
    top = chain[0]
    qspec = top["format-specific"]["data"]  # type: ignore[index]  # qemu-img info's JSON
    assert main(["info", "--output=json", str(built.image)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["virtual-size"] == top["virtual-size"]
    assert info["cluster-size"] == top["cluster-size"]
    assert info["compat"] == qspec["compat"]
    assert info["version"] == (2 if qspec["compat"] == "0.10" else 3)
    assert info["compression-type"] == qspec["compression-type"]
    assert info["refcount-bits"] == qspec["refcount-bits"]
    assert ("extended L2 entries (subclusters)" in info["features"]) == bool(
        qspec.get("extended-l2", False)
    )
    assert info["data-file"] == qspec.get("data-file")
    assert ("external data file (raw)" in info["features"]) == bool(
        qspec.get("data-file-raw", False)
    )
    assert [(s["id"], s["name"]) for s in info["snapshots"]] == [
        (s["id"], s["name"])
        for s in top.get("snapshots", [])  # type: ignore[attr-defined]  # qemu-img info's JSON
    ]
    assert info["backing-filename"] == top.get("backing-filename")
    assert info["backing-format"] == top.get("backing-filename-format")
    # The chain, layer by layer, as the same files in the same formats.
    assert [
        (Path(layer["filename"]).resolve(), layer["format"]) for layer in info["backing-chain"]
    ] == [
        (Path(built.cwd or ".", str(layer["filename"])).resolve(), layer["format"])
        for layer in chain[1:]
    ]
    # Stored data: what qemu calls data, where the host file has written bytes.
    stored = stored_segments(qemu_map_of(built), host_files_of(built.image, cwd=built.cwd))
    assert info["data-bytes"] == sum(e - s for s, e in stored)


# -- --no-backing: the top layer alone ------------------------------------------------------


@pytest.mark.parametrize("kind", OVERLAYS)
def test_no_backing_presents_the_top_layer(kind: str, images: ImageCache, tmp_path: Path) -> None:
    built = images.get(kind)
    expected = qemu_convert(built, tmp_path / "top.raw", no_backing=True)
    qmap = qemu_map_of(built, no_backing=True)
    with open_image(built.image, OpenOptions(backing=False)) as image:
        assert image.backing is None
        assert image.read(0, image.size) == expected
        extents = list(image.iter_extents())
        check_stored(
            data_segments(extents), qmap, host_files_of(built.image, cwd=built.cwd, no_backing=True)
        )
        # A delta holds less than (or as much as) the whole chain.
        with open_image(built.image) as full:
            assert sum(e.length for e in extents if e.data) <= sum(
                e.length for e in full.iter_extents() if e.data
            )


# -- snapshots --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "snapshot"), SNAPSHOT_CASES, ids=[f"{k}@{s}" for k, s in SNAPSHOT_CASES]
)
def test_snapshot_equals_qemu_convert_l(
    kind: str, snapshot: str, images: ImageCache, tmp_path: Path
) -> None:
    """``qemu-img convert -l`` bytes, at the snapshot's own virtual size.

    qemu-img convert -l presents a snapshot at the image's current virtual size
    (the 'snapshots' disk grew from 3 to 4 MiB after 'first' was taken) and
    reads zeros past the snapshot's own size; sparsefs presents the snapshot
    as it was taken, which is also what ``qemu-img snapshot -a`` restores.
    """
    built = images.get(kind)
    via_l = qemu_convert(built, tmp_path / "snap.raw", snapshot=snapshot)
    copy = applied_snapshot_copy(built, snapshot, built.image.with_name("applied.qcow2"))
    [copy_info] = qemu_info(Built(copy))[:1]
    copy.unlink()
    with open_image(built.image) as image:
        [snap] = [s for s in image.snapshots if s.name == snapshot]
        view = image.open_snapshot(snap)
        assert view.size == copy_info["virtual-size"]
        assert view.read(0, view.size) == via_l[: view.size]
        assert via_l[view.size :] == bytes(len(via_l) - view.size)


def test_snapshots_differ_from_each_other_and_from_active(images: ImageCache) -> None:
    built = images.get("snapshots")
    with open_image(built.image) as image:
        contents = [image.read(0, 3 * MiB)]
        for snap in image.snapshots:
            contents.append(image.open_snapshot(snap).read(0, 3 * MiB))
        assert len(set(contents)) == 3


# -- refusals ---------------------------------------------------------------------------------


def assert_refused(image: Path, *words: str, cwd: Path | None = None) -> str:
    """``sparsefs info`` and ``map`` fail with one line naming the image and the problem."""
    for command in ("info", "map"):
        proc = sparsefs(command, str(image), cwd=cwd)
        assert proc.returncode != 0, proc.stdout
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert str(image) in lines[0] or image.name in lines[0], lines[0]
        for word in words:
            assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("method", ["luks", "aes"])
def test_encrypted_image_is_refused(method: str, tmp_path: Path) -> None:
    image = make_encrypted_image(tmp_path / f"{method}.qcow2", method)
    with pytest.raises(UnsupportedFeatureError, match="encrypt"):
        open_image(image)
    assert_refused(image, "encrypt", method.upper(), "not supported")


def test_unknown_incompatible_feature_bit_is_refused(tmp_path: Path) -> None:
    image = qemu_img_create(tmp_path / "future.qcow2", MiB)
    with open(image, "r+b") as f:  # incompatible_features, spec "Header" bytes 72-79
        f.seek(72)
        (bits,) = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", bits | 1 << 13))
    # qemu refuses it too (the bit is meaningless to both).
    proc = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "feature" in proc.stderr
    with pytest.raises(UnsupportedFeatureError, match="bit 13"):
        open_image(image)
    assert_refused(image, "incompatible feature", "bit 13")


def test_missing_backing_file_is_refused(tmp_path: Path) -> None:
    base = qemu_img_create(tmp_path / "base.qcow2", MiB)
    top = qemu_img_create(tmp_path / "top.qcow2", MiB, f"backing_file={base}", "backing_fmt=qcow2")
    base.unlink()
    with pytest.raises(MissingFileError, match="backing file"):
        open_image(top)
    line = assert_refused(top, "backing file", "missing")
    assert str(base) in line
    # --no-backing reads the overlay alone, without its backing file.
    assert sparsefs("map", "--no-backing", str(top)).returncode == 0


def test_missing_data_file_is_refused(tmp_path: Path) -> None:
    image = qemu_img_create(tmp_path / "disk.qcow2", MiB, f"data_file={tmp_path / 'disk.data'}")
    qemu_io(image, "write -q -P 1 0 64k")
    (tmp_path / "disk.data").unlink()
    with pytest.raises(MissingFileError, match="data file"):
        open_image(image)
    line = assert_refused(image, "data file", "missing")
    assert str(tmp_path / "disk.data") in line


@pytest.mark.parametrize("length", [1, 2])
def test_backing_loop_is_refused(length: int, tmp_path: Path) -> None:
    a = qemu_img_create(tmp_path / "a.qcow2", MiB)
    b = qemu_img_create(tmp_path / "b.qcow2", MiB) if length == 2 else a
    run(["qemu-img", "rebase", "-u", "-b", str(b), "-F", "qcow2", str(a)])
    if length == 2:
        run(["qemu-img", "rebase", "-u", "-b", str(a), "-F", "qcow2", str(b)])
    with pytest.raises(ImageFormatError, match="loop"):
        open_image(a)
    assert_refused(a, "loop")


# -- where a relative data file name points ----------------------------------------------


@pytest.fixture
def cwd_relative_data_file(tmp_path: Path) -> tuple[Path, Path]:
    """(dir, image): ``sub/disk.qcow2`` naming its data file ``sub/disk.data``.

    Made from ``dir`` the way a user would; qemu finds the data file only when
    it runs in ``dir`` (it reads relative data file names from its cwd).
    """
    (tmp_path / "sub").mkdir()
    qemu_img_create("sub/disk.qcow2", "1M", "data_file=sub/disk.data", cwd=tmp_path)
    run(
        ["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x3c 4096 70000", "sub/disk.qcow2"],
        cwd=tmp_path,
    )
    return tmp_path, tmp_path / "sub" / "disk.qcow2"


def test_relative_data_file_from_qemus_directory(
    cwd_relative_data_file: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    where, image = cwd_relative_data_file
    expected = qemu_convert(Built(image, cwd=where), where / "out.raw")
    monkeypatch.chdir(where)
    with open_image(image) as img:
        assert img.qfile.data.path == str(where / "sub" / "disk.data")
        assert img.read(0, img.size) == expected


def test_relative_data_file_missing_names_the_place_beside_the_image(
    cwd_relative_data_file: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _where, image = cwd_relative_data_file
    monkeypatch.chdir(image.parent)  # sub/sub/disk.data exists neither here nor beside
    with pytest.raises(MissingFileError, match=str(image.parent / "sub" / "disk.data")):
        open_image(image)


def test_relative_data_file_that_resolves_two_ways_is_refused(
    cwd_relative_data_file: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    where, image = cwd_relative_data_file
    (image.parent / "sub").mkdir()
    (image.parent / "sub" / "disk.data").write_bytes(bytes(MiB))
    monkeypatch.chdir(where)
    with pytest.raises(UnsupportedFeatureError, match="ambiguous"):
        open_image(image)


# -- snapshot file names ------------------------------------------------------------------


def test_snapshot_file_names_are_keys_qemu_resolves_to_the_same_snapshot(tmp_path: Path) -> None:
    """Names that cannot serve (shared, '/', empty, too long, another's id) give way to ids."""
    image = qemu_img_create(tmp_path / "disk.qcow2", MiB)
    names = ["same", "same", "a/b", "1", "x" * 300, "", "nightly", "2024-01-01 12:00"]
    for i, name in enumerate(names):
        qemu_io(image, f"write -q -P {i + 1} {i * 4096} 4096")
        run(["qemu-img", "snapshot", "-c", name, str(image)])
    mset = open_mount_set([str(image)], OpenOptions())
    try:
        files = sorted(mset.files)
        assert files == sorted(
            [
                "disk.raw",
                "disk@1.raw",
                "disk@2.raw",
                "disk@3.raw",
                "disk@4.raw",
                "disk@5.raw",
                "disk@6.raw",
                "disk@nightly.raw",
                "disk@2024-01-01 12:00.raw",
            ]
        )
        for name in files:
            if name == "disk.raw":
                continue
            label = name[len("disk@") : -len(".raw")]
            # qemu-img convert -l LABEL: qemu looks the id up first, then the name.
            assert mset.files[name].read(0, MiB) == _convert_l(image, label, tmp_path), name
    finally:
        mset.close()


def _convert_l(image: Path, key: str, tmp_path: Path) -> bytes:
    out = tmp_path / "snap.raw"
    run(["qemu-img", "convert", "-O", "raw", "-l", key, str(image), str(out)])
    return out.read_bytes()


def test_snapshot_file_names_in_a_damaged_table() -> None:
    # Duplicate ids cannot come from qemu; each file still gets its own name.
    assert snapshot_file_names("vm", [("a", "1"), ("b", "1"), ("/", "/")]) == [
        "vm@a.raw",
        "vm@b.raw",
        "vm@snapshot-3.raw",
    ]
    assert snapshot_file_names("vm", [("", "1"), ("", "1")]) == [
        "vm@snapshot-1.raw",
        "vm@snapshot-2.raw",
    ]


# -- a compressed cluster that does not decompress ------------------------------------------


@pytest.mark.parametrize("kind", ["compressed-zlib", "compressed-zstd"])
def test_corrupt_compressed_cluster_fails_that_cluster_only(
    kind: str, images: ImageCache, tmp_path: Path
) -> None:
    built = images.get(kind)
    expected = qemu_convert(built, tmp_path / "good.raw")
    with open_image(built.image) as image:
        compressed = [r for r in image.iter_runs(0, image.size) if r.kind == RUN_COMPRESSED]
        cluster_size = image.qfile.cluster_size
    victim = compressed[len(compressed) // 2]
    assert isinstance(victim.host, tuple)
    host_offset, _ = victim.host
    bad = tmp_path / "bad.qcow2"
    shutil.copyfile(built.image, bad)
    with open(bad, "r+b") as f:  # only this cluster's first bytes: neighbours share sectors
        f.seek(host_offset)
        f.write(b"\xff" * 16)
    lo, hi = victim.guest_offset, victim.guest_end
    # qemu cannot read it either.
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"read {lo} {hi - lo}", str(bad)],
        capture_output=True,
        text=True,
    )
    assert "read failed" in proc.stdout + proc.stderr
    with open_image(bad) as image:
        with pytest.raises(ImageReadError, match="compressed cluster"):
            image.read(lo + 100, 10)
        with pytest.raises(ImageReadError):
            image.read(0, image.size)
        assert image.read(0, lo) == expected[:lo]
        assert image.read(hi, image.size - hi) == expected[hi:]
        # Still data in the map: a copier must read it (and fail), never skip it.
        assert any(e.data and e.guest_offset <= lo < e.end for e in image.iter_extents())
    assert hi - lo == cluster_size
