"""``sparsefs mount DEST_DIR MNT``: every point of a backup set as a sparse raw file.

Each point's file through the mount must equal ``qemu-img convert -O raw`` of
its night, its SEEK_DATA/SEEK_HOLE walk must agree with ``qemu-img map`` of
the point (chain and all), damaged points are left out with a warning, and a
file-level restore works: an ext4 filesystem backed up over two nights, a
point loop-attached read-only and mounted, its files as they were that night.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from points_support import backup, points
from support import (
    MiB,
    check_map_agrees,
    files_equal,
    make_image,
    qemu_io,
    qemu_map,
    qemu_raw,
    run,
    seek_walk,
    sparsefs,
)

Mount = Callable[..., Path]
SIZE = 32 * MiB


@pytest.fixture(scope="module")
def three_nights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/set: three points of vm (a full raw point, two deltas); ROOT/ID.raw each night."""
    root = tmp_path_factory.mktemp("set-mount")
    image = make_image(root / "vm.qcow2", SIZE, seed=21, writes=30, max_len=MiB)
    dest = root / "set"
    dest.mkdir()
    rng = random.Random(5)
    for night in range(3):
        if night:
            qemu_io(
                image,
                f"write -q -P {night + 1} {rng.randrange(0, 30) * MiB} {MiB + 4096}",
                f"write -q -z {rng.randrange(0, 30) * MiB} 300k",
                f"discard -q {rng.randrange(0, 30) * MiB} 1M",
            )
        backup(image, dest)
        qemu_raw(image, root / f"{points(dest, 'vm')[-1]['id']}.raw")
    return root


def test_every_point_is_a_file_equal_to_its_night(three_nights: Path, mount: Mount) -> None:
    dest = three_nights / "set"
    pts = points(dest, "vm")
    mp = mount(dest)
    names = {f"vm@{p['id']}.raw" for p in pts}
    assert sorted(os.listdir(mp)) == sorted(names | {"vm.raw"})
    for p in pts:
        through_mount = mp / f"vm@{p['id']}.raw"
        assert files_equal(through_mount, three_nights / f"{p['id']}.raw"), p["id"]
        check_map_agrees(seek_walk(through_mount), qemu_map(dest / p["file"]))
    assert files_equal(mp / "vm.raw", three_nights / f"{pts[-1]['id']}.raw")


def test_damaged_points_are_left_out_with_a_warning(
    three_nights: Path, tmp_path: Path, mount: Mount
) -> None:
    dest = tmp_path / "set"
    shutil.copytree(three_nights / "set", dest)
    pts = points(dest, "vm")
    (dest / pts[1]["file"]).unlink()  # the middle point: it and the newest are damaged
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = sparsefs("mount", str(dest), str(mp))
    try:
        assert proc.returncode == 0, proc.stderr
        assert sorted(os.listdir(mp)) == [f"vm@{pts[0]['id']}.raw"]
        assert f"skipped vm@{pts[1]['id']}.raw" in proc.stderr
        assert f"skipped vm@{pts[2]['id']}.raw" in proc.stderr
        assert files_equal(mp / f"vm@{pts[0]['id']}.raw", three_nights / f"{pts[0]['id']}.raw")
    finally:
        sparsefs("umount", str(mp))


def test_a_prune_while_mounted_leaves_every_mounted_point_reading_as_before(
    three_nights: Path, tmp_path: Path, mount: Mount
) -> None:
    """The mount holds the readers' lock: prune merges into a new file, never in place."""
    dest = tmp_path / "set"
    shutil.copytree(three_nights / "set", dest)
    pts = points(dest, "vm")
    mp = mount(dest)
    proc = sparsefs("prune", "-q", str(dest), "--keep-last", "1")
    assert proc.returncode == 0, proc.stderr
    assert [(p["kind"], p["format"]) for p in points(dest, "vm")] == [("full", "qcow2")]
    for p in pts:  # the dropped points too: the mount still has their files open
        assert files_equal(mp / f"vm@{p['id']}.raw", three_nights / f"{p['id']}.raw"), p["id"]
    again = tmp_path / "set2"
    shutil.copytree(three_nights / "set", again)
    assert sparsefs("prune", "-q", str(again), "--keep-last", "1").returncode == 0
    assert [(p["kind"], p["format"]) for p in points(again, "vm")] == [("full", "raw")]


# -- file-level restore: ext4 in a point --------------------------------------------


def _mkfs(image: Path, files: dict[str, bytes], work: Path) -> None:
    src = work / "fs-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    for name, content in files.items():
        (src / name).write_bytes(content)
    image.unlink(missing_ok=True)
    run(["truncate", "-s", str(64 * MiB), str(image)])
    run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(image)])


@contextlib.contextmanager
def _loop_mounted(raw: Path, where: Path) -> Iterator[Path]:
    """``losetup -r -f --show RAW`` and ``mount -o ro``; always undone."""
    device = run(["losetup", "-r", "-f", "--show", str(raw)]).stdout.strip()
    try:
        where.mkdir(exist_ok=True)
        run(["mount", "-o", "ro", device, str(where)])
        try:
            yield where
        finally:
            subprocess.run(["umount", str(where)], capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("losetup") is None, reason="needs root and losetup"
)
def test_file_level_restore_from_an_ext4_point(tmp_path: Path, mount: Mount) -> None:
    rng = random.Random(9)
    nights = [
        {"a.txt": b"first night\n", "big.bin": rng.randbytes(3 * MiB), "gone.txt": b"bye\n"},
        {"a.txt": b"second night, changed\n", "big.bin": rng.randbytes(3 * MiB)},
    ]
    image = tmp_path / "fs.raw"
    dest = tmp_path / "set"
    dest.mkdir()
    for files in nights:
        _mkfs(image, files, tmp_path)
        backup(image, dest)
    pts = points(dest, "fs")
    assert [p["kind"] for p in pts] == ["full", "delta"]
    mp = mount(dest)
    for p, files in zip(pts, nights, strict=True):
        with _loop_mounted(mp / f"fs@{p['id']}.raw", tmp_path / "ext4") as fs:
            got = {n: (fs / n).read_bytes() for n in os.listdir(fs) if n != "lost+found"}
            assert got == files, p["id"]
