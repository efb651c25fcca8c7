"""A damaged snapshot costs only itself; --no-snapshots never reads the snapshot table.

Each case (tests/hostile_images.py, ``SNAPSHOT_DAMAGES``) patches a qemu-made
image with two internal snapshots.  Checked against QEMU on the same bytes:

- the active disk equals ``qemu-img convert`` of the damaged image where QEMU
  opens it; where QEMU refuses the whole image (a difference sparsefs keeps on
  purpose, see the README), it equals ``qemu-img convert`` of the intact image;
- every intact snapshot equals ``qemu-img convert -l`` of the damaged image;
- the damaged snapshot is refused with one line naming image and snapshot,
  listed in ``MountSet.damaged`` and shown by ``info``; ``map -l`` of it is a
  one-line error.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hostile_images import (
    SNAPSHOT_DAMAGES,
    SNAPSHOT_FIELDS,
    SnapshotDamage,
    build_snapshots,
    damage_snapshots,
    put,
)
from sparsefs.cli.mountset import open_mount_set
from sparsefs.errors import ImageFormatError
from sparsefs.formats.qcow2 import Qcow2Image, open_image
from sparsefs.options import OpenOptions
from support import one_line_error, qemu_raw, sparsefs

SNAPSHOTS = ("first", "second")


@pytest.fixture(scope="module")
def intact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_snapshots(tmp_path_factory.mktemp("damaged-snapshots"))


@pytest.fixture(scope="module")
def intact_raw(intact: Path) -> dict[str | None, bytes]:
    """``qemu-img convert`` of the intact image's active disk (None) and of each snapshot."""
    out: dict[str | None, bytes] = {None: qemu_raw(intact, intact.with_suffix(".raw")).read_bytes()}
    for snap in SNAPSHOTS:
        out[snap] = qemu_raw(intact, intact.with_name(f"{snap}.raw"), snapshot=snap).read_bytes()
    return out


def qemu_convert(image: Path, out: Path, snapshot: str | None = None) -> bytes | None:
    """``qemu-img convert -O raw [-l SNAPSHOT]`` of ``image``; None when qemu refuses."""
    cmd = ["qemu-img", "convert", "-O", "raw"]
    if snapshot is not None:
        cmd += ["-l", snapshot]
    proc = subprocess.run([*cmd, str(image), str(out)], capture_output=True, text=True)
    return out.read_bytes() if proc.returncode == 0 else None


def damaged_names(damage: SnapshotDamage) -> list[str]:
    """The file names sparsefs must list as damaged (``snapshots@*.raw``: the whole table)."""
    return [f"snapshots@{label}.raw" for label in damage.damaged]


def intact_snapshots(damage: SnapshotDamage) -> list[str]:
    return [] if "*" in damage.damaged else [s for s in SNAPSHOTS if s not in damage.damaged]


@pytest.mark.parametrize("damage", SNAPSHOT_DAMAGES, ids=[d.name for d in SNAPSHOT_DAMAGES])
def test_damaged_snapshot_costs_only_itself(
    damage: SnapshotDamage, intact: Path, intact_raw: dict[str | None, bytes], tmp_path: Path
) -> None:
    path = tmp_path / "snapshots.qcow2"
    damage_snapshots(intact, path, damage)
    # QEMU on the same bytes: the active disk.
    qemu_active = qemu_convert(path, tmp_path / "qemu-active.raw")
    assert (qemu_active is not None) == damage.qemu_opens
    expected_active = qemu_active if qemu_active is not None else intact_raw[None]
    assert expected_active == intact_raw[None]

    with open_image(path) as image:
        assert image.read(0, image.size) == expected_active
        problem = image.snapshot_table_problem
        if "*" in damage.damaged:
            assert problem is not None
            assert damage.words in problem
            assert problem.startswith(f"{path}: ")
            assert "\n" not in problem
            assert image.snapshots == []
        else:
            assert problem is None
            for snap in image.snapshots:
                label = snap.name or f"snapshot-{image.snapshots.index(snap) + 1}"
                if label in damage.damaged:
                    with pytest.raises(ImageFormatError) as info:
                        image.open_snapshot(snap)
                    message = str(info.value)
                    assert message == image.snapshot_problem(snap)
                    assert message.startswith(f"{path}: snapshot ")
                    assert damage.words in message
                    assert "\n" not in message
                    # QEMU refuses it too, or reads it as zeros (a kept difference).
                    got = qemu_convert(path, tmp_path / "qemu-damaged.raw", snap.name or None)
                    if snap.name:
                        assert (got is not None) == damage.qemu_reads_damaged
                        if got is not None:
                            assert got == bytes(len(got)) != intact_raw[snap.name]
                else:
                    assert image.snapshot_problem(snap) is None
                    view = image.open_snapshot(snap)
                    qemu_snap = qemu_convert(path, tmp_path / f"{snap.name}.raw", snap.name)
                    assert qemu_snap == intact_raw[snap.name]
                    assert view.read(0, view.size) == qemu_snap

    mset = open_mount_set([str(path)], OpenOptions())
    try:
        assert [name for name, _ in mset.damaged] == damaged_names(damage)
        for name, message in mset.damaged:
            assert message.startswith(f"{path}: ")
            assert "\n" not in message
            assert damage.words in message
            if "*" not in name:
                assert "snapshot " in message
                assert name in message
        expected_files = [
            "snapshots.raw",
            *(f"snapshots@{s}.raw" for s in intact_snapshots(damage)),
        ]
        assert sorted(mset.files) == sorted(expected_files)
        assert mset.files["snapshots.raw"].read(0, len(expected_active)) == expected_active
    finally:
        mset.close()

    # --no-snapshots: the table is never read.
    mset = open_mount_set([str(path)], OpenOptions(), snapshots=False)
    try:
        assert list(mset.files) == ["snapshots.raw"]
        assert mset.damaged == []
        top = mset.images[0]
        assert isinstance(top, Qcow2Image)
        assert top.qfile._snapshot_table is None
    finally:
        mset.close()


@pytest.mark.parametrize(
    "damage",
    [d for d in SNAPSHOT_DAMAGES if d.name in ("l1-offset-unaligned", "table-past-end")],
    ids=lambda d: d.name,
)
def test_cli_shows_damaged_snapshots(
    damage: SnapshotDamage, intact: Path, intact_raw: dict[str | None, bytes], tmp_path: Path
) -> None:
    path = tmp_path / "snapshots.qcow2"
    damage_snapshots(intact, path, damage)
    proc = sparsefs("info", "--output=json", str(path))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    text = sparsefs("info", str(path), check=True).stdout
    if "*" in damage.damaged:
        assert damage.words in info["snapshot-table-damaged"]
        assert info["snapshots"] == []
        assert "snapshots: damaged: " in text
    else:
        assert info["snapshot-table-damaged"] is None
        states = {s["name"]: s["damaged"] for s in info["snapshots"]}
        assert states["second"] is None
        assert damage.words in states["first"]
        assert "damaged: " in next(line for line in text.splitlines() if " first " in line)
        one_line_error(sparsefs("map", "-l", "first", str(path)), str(path), "snapshot 'first'")
        assert sparsefs("map", "-l", "second", str(path)).returncode == 0
    # The active disk's digest equals the digest of QEMU's raw copy.
    (tmp_path / "active.raw").write_bytes(intact_raw[None])
    image_sum = sparsefs("checksum", str(path), check=True).stdout.split()[0]
    raw_sum = sparsefs("checksum", str(tmp_path / "active.raw"), check=True).stdout.split()[0]
    assert image_sum == raw_sum


def test_snapshot_l1_longer_than_the_file_is_read_like_qemu(
    intact: Path, intact_raw: dict[str | None, bytes], tmp_path: Path
) -> None:
    """An L1 table whose needed entries are in the file but whose tail is not: qemu reads
    the tail as zeros and never uses it; sparsefs reads only the needed entries."""
    from hostile_images import locate

    loc = locate(intact)
    buf = bytearray(loc.raw)
    off, fmt = SNAPSHOT_FIELDS["l1_size"]
    put(buf, loc.snapshot_entries[1] + off, fmt, loc.file_size // 8)
    path = tmp_path / "snapshots.qcow2"
    path.write_bytes(buf)
    qemu_snap = qemu_convert(path, tmp_path / "second.raw", "second")
    assert qemu_snap == intact_raw["second"]
    with open_image(path) as image:
        [snap] = [s for s in image.snapshots if s.name == "second"]
        view = image.open_snapshot(snap)
        assert view.read(0, view.size) == qemu_snap
