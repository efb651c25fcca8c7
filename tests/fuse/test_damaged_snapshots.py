"""A damaged snapshot, mounted and backed up: the active disk and the intact snapshots are
served and copied exactly (checked against ``qemu-img convert`` of the same damaged
image), the damaged one is refused with one warning line, and ``backup --snapshots``
exits 1 naming it.  ``--no-snapshots`` never looks at the snapshot table."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostile_images import SNAPSHOT_DAMAGES, SnapshotDamage, build_snapshots, damage_snapshots
from points_support import latest_file
from support import files_equal, force_unmount, is_mounted, qemu_raw, run, sparsefs

CASES = [d for d in SNAPSHOT_DAMAGES if d.name in ("l1-offset-unaligned", "table-past-end")]


@contextlib.contextmanager
def mounted_with_stderr(mountpoint: Path, image: Path, *options: str) -> Iterator[str]:
    """``sparsefs mount``; yields its stderr; always unmounts."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = sparsefs("mount", *options, str(image), str(mountpoint))
    try:
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(mountpoint)
        yield proc.stderr
    finally:
        if is_mounted(mountpoint):
            sparsefs("umount", str(mountpoint))
        deadline = time.monotonic() + 10
        while is_mounted(mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        force_unmount(mountpoint)


def _no_backup_mounts() -> bool:
    with open("/proc/self/mounts") as f:
        return not any("sparsefs-backup-" in line for line in f)


@pytest.mark.parametrize("damage", CASES, ids=[d.name for d in CASES])
def test_damaged_snapshot_is_refused_alone(damage: SnapshotDamage, tmp_path: Path) -> None:
    intact = build_snapshots(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    path = images / "snapshots.qcow2"
    damage_snapshots(intact, path, damage)
    # QEMU on the same damaged bytes: the active disk and the intact snapshots.
    expected = {"snapshots.raw": qemu_raw(path, tmp_path / "active.ref")}
    if "*" not in damage.damaged:
        for snap in ("first", "second"):
            if snap not in damage.damaged:
                expected[f"snapshots@{snap}.raw"] = qemu_raw(
                    path, tmp_path / f"{snap}.ref", snapshot=snap
                )
        for snap in damage.damaged:  # qemu-img refuses the damaged snapshot too
            proc = subprocess.run(
                [
                    "qemu-img",
                    "convert",
                    "-O",
                    "raw",
                    "-l",
                    snap,
                    str(path),
                    str(tmp_path / "x.raw"),
                ],
                capture_output=True,
                text=True,
            )
            assert proc.returncode != 0
    damaged_files = [f"snapshots@{label}.raw" for label in damage.damaged]
    # What the warning names: the skipped file, or that no snapshot is served.
    named = "no snapshot is served" if "*" in damage.damaged else f"skipped {damaged_files[0]}"

    with mounted_with_stderr(tmp_path / "mnt", path) as stderr:
        warnings = stderr.strip().splitlines()
        assert len(warnings) == 1, stderr
        assert str(path) in warnings[0]
        assert damage.words in warnings[0]
        assert named in warnings[0]
        assert "Traceback" not in stderr
        assert sorted(os.listdir(tmp_path / "mnt")) == sorted(expected)
        for name, ref in expected.items():
            copy = tmp_path / f"cp-{name}"
            run(["cp", "--sparse=always", str(tmp_path / "mnt" / name), str(copy)])
            assert files_equal(copy, ref), name

    dest = tmp_path / "backup"
    dest.mkdir()
    proc = sparsefs("backup", "--snapshots", str(path), str(dest))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert named in proc.stderr
    assert str(path) in proc.stderr
    total = len(expected) + len(damaged_files)
    assert f"backup: {len(expected)} of {total} points added" in proc.stdout
    for name, ref in expected.items():
        assert files_equal(latest_file(dest, name.removesuffix(".raw")), ref), name
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == sorted(
        [*(n.removesuffix(".raw") for n in expected), "SPARSEFS-SET.json", "SPARSEFS-SUMS"]
    )
    assert _no_backup_mounts()

    # Without --snapshots the same image backs up cleanly.
    dest2 = tmp_path / "backup2"
    dest2.mkdir()
    proc = sparsefs("backup", str(path), str(dest2))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert files_equal(latest_file(dest2, "snapshots"), expected["snapshots.raw"])

    # --no-snapshots: nothing about snapshots is even looked at.
    with mounted_with_stderr(tmp_path / "mnt2", path, "--no-snapshots") as stderr:
        assert stderr == ""
        assert os.listdir(tmp_path / "mnt2") == ["snapshots.raw"]
