"""The backup set's parts: ids and names, the lock, block-digest files, and bad input.

Bad input gets one line naming the file, a non-zero exit, and the set untouched.
"""

from __future__ import annotations

import calendar
import hashlib
import json
from pathlib import Path

import pytest

from points_support import backup, list_json, manifest, points, qemu_check, qemu_compare
from sparsefs.points.blocks import BlockDigests, BlocksFileError
from sparsefs.points.engine import point_digest as real
from sparsefs.points.set import BackupSet, SetError, id_time, point_id
from support import MiB, make_image, one_line_error, qemu_io, qemu_raw, run, sparsefs

SIZE = 8 * MiB


def dir_state(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: content hash and mtime (to prove "untouched")."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".SPARSEFS-SET.lock"
    }


def test_ids_are_utc_seconds_made_unique() -> None:
    now = calendar.timegm((2026, 12, 3, 19, 5, 0))
    assert point_id(now, set()) == "20261203T190500Z"
    assert point_id(now + 0.9, {"20261203T190500Z"}) == "20261203T190500Z-2"
    taken = {"20261203T190500Z", "20261203T190500Z-2"}
    assert point_id(now, taken) == "20261203T190500Z-3"
    assert id_time("20261203T190500Z-3") == "2026-12-03T19:05:00Z"


@pytest.fixture
def two_points(tmp_path: Path) -> tuple[Path, Path]:
    image = make_image(tmp_path / "vm.qcow2", SIZE, seed=21, writes=10, max_len=MiB)
    dest = tmp_path / "set"
    dest.mkdir()
    backup(image, dest)
    qemu_io(image, "write -q -P 7 1M 64k")
    backup(image, dest)
    return image, dest


def test_resolve_latest_and_prefixes(two_points: tuple[Path, Path]) -> None:
    _, dest = two_points
    first, second = points(dest, "vm")
    with BackupSet.open(str(dest)) as bset:
        assert bset.resolve("vm", "latest").id == second["id"]
        assert bset.resolve("vm", first["id"]).id == first["id"]
        assert bset.resolve("vm", second["id"][:-1]).id == second["id"]  # "...Z-" is unique
        assert [p.id for p in bset.chain("vm", second["id"])] == [first["id"], second["id"]]
        with pytest.raises(SetError, match="matches several points"):
            bset.resolve("vm", "2")
        with pytest.raises(SetError, match="names no point"):
            bset.resolve("vm", "3")


def test_list_json_fields(two_points: tuple[Path, Path]) -> None:
    _, dest = two_points
    status, doc = list_json(dest)
    assert status == 0
    (disk,) = doc["disks"]
    assert disk["name"] == "vm"
    full, delta = disk["points"]
    for p in (full, delta):
        assert {"id", "time", "kind", "file", "format", "data_bytes", "digest"} <= set(p)
        assert p["time"] == id_time(p["id"])
        assert p["digest"].startswith("sparsefs1:")
        assert p["status"] == "ok"
        assert (dest / p["file"]).stat().st_blocks * 512 == p["data_bytes"]
    assert (full["kind"], full["format"], full["file"]) == (
        "full",
        "raw",
        f"vm/vm@{full['id']}.raw",
    )
    assert (delta["kind"], delta["format"]) == ("delta", "qcow2")
    assert delta["file"] == f"vm/vm@{delta['id']}.qcow2"


def test_a_second_run_is_refused_while_the_set_is_locked(two_points: tuple[Path, Path]) -> None:
    image, dest = two_points
    before = dir_state(dest)
    with BackupSet.open(str(dest), lock=True):
        one_line_error(sparsefs("backup", str(image), str(dest)), "another sparsefs run")
    assert dir_state(dest) == before


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("shrunk", ("smaller than the newest point", "--full")),
        ("point-missing", ("point file is missing", "--full")),
        ("manifest-size", ("the manifest says", "--full")),
        ("manifest-damaged", ("SPARSEFS-SET.json", "damaged")),
        ("bitmap-missing", ("no bitmap named 'nope'",)),
    ],
)
def test_bad_input_leaves_the_set_untouched(
    two_points: tuple[Path, Path], case: str, needles: tuple[str, ...]
) -> None:
    image, dest = two_points
    qemu_io(image, "write -q -P 9 3M 64k")
    args = [str(image), str(dest)]
    if case == "shrunk":
        run(["qemu-img", "resize", "--shrink", str(image), str(SIZE - MiB)])
    elif case == "point-missing":
        (dest / points(dest, "vm")[0]["file"]).unlink()
    elif case == "manifest-size":
        doc = manifest(dest)
        doc["disks"]["vm"]["points"][1]["size"] += 512
        (dest / "SPARSEFS-SET.json").write_text(json.dumps(doc))
    elif case == "manifest-damaged":
        (dest / "SPARSEFS-SET.json").write_text("{not json")
    elif case == "bitmap-missing":
        args = ["--since", "nope", *args]
    before = dir_state(dest)
    one_line_error(sparsefs("backup", *args), *needles)
    assert dir_state(dest) == before


def test_failed_verification_records_nothing(
    two_points: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delta that reads back wrong (bad storage) is removed and not recorded."""
    image, dest = two_points
    qemu_io(image, "write -q -P 5 2M 128k")

    def rotten(point: object, *args: object, **kwargs: object) -> str:
        path = point.path  # type: ignore[attr-defined]  # an opened qcow2 point
        with open(path, "r+b") as f:  # one byte of the data cluster rots on the storage
            f.seek(65536 + 100)
            byte = f.read(1)
            f.seek(65536 + 100)
            f.write(bytes([byte[0] ^ 1]))
        return real(point, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("sparsefs.points.run.point_digest", rotten)
    before = dir_state(dest)
    from sparsefs.cli import main

    assert main(["backup", "-q", str(image), str(dest)]) == 1
    assert dir_state(dest) == before
    monkeypatch.undo()
    assert main(["backup", "-q", str(image), str(dest)]) == 0
    assert len(points(dest, "vm")) == 3


def test_lost_block_digests_are_recomputed_from_the_point(
    two_points: tuple[Path, Path], tmp_path: Path
) -> None:
    image, dest = two_points
    newest = points(dest, "vm")[-1]
    (dest / newest["blocks"]).write_bytes(b"garbage")
    status, doc = list_json(dest)
    assert status == 0  # the point's data is intact
    assert doc["disks"][0]["points"][-1]["blocks_ok"] is False
    qemu_io(image, "write -q -P 3 5M 64k")
    entry = backup(image, dest)["files"][0]
    assert entry["kind"] == "delta"
    assert qemu_compare(dest / entry["file"], qemu_raw(image, tmp_path / "ref.raw"))
    with BackupSet.open(str(dest)) as bset:  # and the digests were written again
        BlockDigests.load(bset.path(newest["blocks"]), newest["digest"], newest["size"])


def test_block_digest_files_are_bound_to_their_point(two_points: tuple[Path, Path]) -> None:
    _, dest = two_points
    point = points(dest, "vm")[0]
    path = str(dest / point["blocks"])
    digests = BlockDigests.load(path, point["digest"], point["size"])
    assert digests.fold() == point["digest"]
    with pytest.raises(BlocksFileError, match="another point"):
        BlockDigests.load(path, points(dest, "vm")[1]["digest"], point["size"])
    raw = bytearray(Path(path).read_bytes())
    raw[-20] ^= 1
    Path(path).write_bytes(bytes(raw))
    with pytest.raises(BlocksFileError, match="damaged"):
        BlockDigests.load(path, point["digest"], point["size"])


def test_legacy_copy_stays_beside_the_set(tmp_path: Path) -> None:
    """A directory of an older sparsefs (DEST/NAME.raw + SPARSEFS-SUMS) is left as it is."""
    image = make_image(tmp_path / "vm.qcow2", SIZE, seed=23, writes=5, max_len=MiB)
    dest = tmp_path / "old"
    dest.mkdir()
    qemu_raw(image, dest / "vm.raw")
    line = sparsefs("checksum", "-f", "raw", "vm.raw", cwd=dest, check=True).stdout
    (dest / "SPARSEFS-SUMS").write_text(line)
    backup(image, dest)
    assert (dest / "vm.raw").exists()
    sums = (dest / "SPARSEFS-SUMS").read_text().splitlines()
    assert sums[0] == line.strip()
    assert len(sums) == 2
    out = sparsefs("checksum", "--check", "SPARSEFS-SUMS", cwd=dest, check=True).stdout
    assert out.count(": OK") == 2


def test_full_point_as_compressed_qcow2_then_a_delta(tmp_path: Path) -> None:
    image = make_image(tmp_path / "vm.qcow2", SIZE, seed=24, writes=8, max_len=MiB)
    dest = tmp_path / "set"
    dest.mkdir()
    full = backup("--format", "qcow2", "--compress", "zstd", image, dest)["files"][0]
    assert (full["kind"], full["format"]) == ("full", "qcow2")
    qemu_check(dest / full["file"])
    assert qemu_compare(dest / full["file"], qemu_raw(image, tmp_path / "ref0.raw"))
    info = json.loads(run(["qemu-img", "info", "--output=json", str(dest / full["file"])]).stdout)
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    assert "backing-filename" not in info
    qemu_io(image, "write -q -P 4 6M 64k")
    delta = backup(image, dest)["files"][0]
    assert (delta["kind"], delta["format"]) == ("delta", "qcow2")
    qemu_check(dest / delta["file"])
    assert qemu_compare(dest / delta["file"], qemu_raw(image, tmp_path / "ref1.raw"))
    one_line_error(sparsefs("backup", "--compress", "zstd", str(image), str(dest)), "--format")


def test_remove_points_rewrites_manifest_and_sums(two_points: tuple[Path, Path]) -> None:
    """The API prune builds on: dropping the newest point from the manifest, atomically."""
    _, dest = two_points
    first, second = points(dest, "vm")
    with BackupSet.open(str(dest), lock=True) as bset:
        assert bset.chain_files("vm", second["id"]) == [
            str(dest / first["file"]),
            str(dest / second["file"]),
        ]
        bset.remove_points("vm", [second["id"]])
    assert [p["id"] for p in points(dest, "vm")] == [first["id"]]
    sums = (dest / "SPARSEFS-SUMS").read_text()
    assert first["file"] in sums
    assert second["file"] not in sums
    with BackupSet.open(str(dest)) as bset, pytest.raises(SetError, match="lock"):
        bset.remove_points("vm", [first["id"]])
    one_line_error(sparsefs("list", str(dest / "vm")), "no backup set here")


def test_a_lost_manifest_is_never_taken_for_an_empty_set(two_points: tuple[Path, Path]) -> None:
    image, dest = two_points
    (dest / "SPARSEFS-SET.json").unlink()
    before = dir_state(dest)
    one_line_error(sparsefs("backup", str(image), str(dest)), "SPARSEFS-SET.json", "is missing")
    assert dir_state(dest) == before


def test_unrecorded_points_older_than_the_newest_are_left_alone(
    two_points: tuple[Path, Path],
) -> None:
    """Only a killed run's point (newer than every recorded one) is removed as a stray."""
    image, dest = two_points
    second = points(dest, "vm")[-1]
    old = dest / "vm" / "vm@20000101T000000Z.raw"
    old.write_bytes(b"not ours to delete")
    newer = dest / "vm" / "vm@29991231T235959Z.qcow2"
    newer.write_bytes(b"left by a killed run")
    partial = dest / "vm" / f".vm@{second['id']}-7.qcow2.partial-99999"
    partial.write_bytes(b"")
    entry = backup(image, dest)["files"][0]
    assert sorted(entry["removed-strays"]) == sorted([newer.name, partial.name])
    assert old.exists()
