"""``sparsefs restore``: a point to a raw file, a qcow2 file and a loop device, and the refusals."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from points_support import backup, latest_file, points, qemu_check, qemu_compare
from support import SPARSEFS, MiB, make_image, one_line_error, qemu_io, qemu_raw, run, sparsefs

SIZE = 24 * MiB


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A set of three points of one disk and the image as it was at each."""
    root = tmp_path_factory.mktemp("restore")
    image = make_image(root / "vm.qcow2", SIZE, seed=11, writes=20, max_len=MiB)
    dest = root / "set"
    dest.mkdir()
    refs = []
    for night in range(3):
        if night:
            qemu_io(image, f"write -q -P {night + 1} {night}M 200k", f"discard -q {night + 4}M 1M")
        backup(image, dest)
        refs.append(qemu_raw(image, root / f"night{night}.raw"))
    return dest, refs


def restore(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return sparsefs("restore", *map(str, args))


def test_restore_to_raw_and_qcow2_files(chain: tuple[Path, list[Path]], tmp_path: Path) -> None:
    dest, refs = chain
    pts = points(dest, "vm")
    for point, ref in zip(pts, refs, strict=True):
        target = tmp_path / f"{point['id']}.raw"
        proc = restore(dest, "vm", "--at", point["id"], target, "--json")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["target-kind"] == "raw"
        assert doc["sparsefs1"] == point["digest"]
        assert qemu_compare(target, ref)
        assert target.stat().st_blocks * 512 <= ref.stat().st_blocks * 512 + MiB  # sparse
    qcow2 = tmp_path / "vm.qcow2"
    proc = restore(dest, "vm", qcow2)  # latest
    assert proc.returncode == 0, proc.stderr
    assert qemu_compare(qcow2, refs[-1])
    qemu_check(qcow2)
    # An existing file only with --overwrite, and then replaced whole.
    proc = restore(dest, "vm", "--at", pts[0]["id"], qcow2)
    one_line_error(proc, str(qcow2), "--overwrite")
    assert qemu_compare(qcow2, refs[-1])
    proc = restore(dest, "vm", "--at", pts[0]["id"], "--overwrite", qcow2)
    assert proc.returncode == 0, proc.stderr
    assert qemu_compare(qcow2, refs[0])
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_point_names(chain: tuple[Path, list[Path]], tmp_path: Path) -> None:
    dest, _ = chain
    ids = [p["id"] for p in points(dest, "vm")]
    assert len(set(ids)) == 3  # unique, even within one second
    assert all(re.fullmatch(r"\d{8}T\d{6}Z(-\d+)?", i) for i in ids)
    target = tmp_path / "x.raw"
    one_line_error(restore(dest, "vm", "--at", "2", target), "matches several points")
    one_line_error(restore(dest, "vm", "--at", "1999", target), "names no point")
    one_line_error(restore(dest, "nosuch", target), "no disk named 'nosuch'")
    missing = tmp_path / "no-dir" / "x.raw"
    one_line_error(restore(dest, "vm", missing), str(missing), "cannot be written")
    assert not target.exists()


@contextlib.contextmanager
def loop_device(size: int) -> Iterator[str]:
    """A loop device over a file on /dev/shm; always detached and removed."""
    backing = Path("/dev/shm") / f"sparsefs-restore-{os.getpid()}.img"
    backing.write_bytes(b"")
    os.truncate(backing, size)
    with open(backing, "r+b") as f:  # old bytes everywhere: a restore must leave none
        f.write(b"\xa5" * size)
    device = run(["losetup", "--find", "--show", str(backing)]).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
        backing.unlink()


def test_restore_to_a_loop_device(chain: tuple[Path, list[Path]], tmp_path: Path) -> None:
    dest, refs = chain
    first = points(dest, "vm")[0]["id"]
    with loop_device(SIZE + MiB) as device:
        one_line_error(restore(dest, "vm", device), device, "--overwrite")
        proc = restore(dest, "vm", "--at", first, "--overwrite", device)
        assert proc.returncode == 0, proc.stderr
        with open(device, "rb") as dev:
            got = dev.read(SIZE)
            tail = dev.read()
        assert got == refs[0].read_bytes()
        assert tail == b"\xa5" * MiB  # past the point: left alone
        # Held open exclusively by another process (as a mount holds it): refused.
        holder = os.open(device, os.O_RDONLY | os.O_EXCL)
        try:
            proc = restore(dest, "vm", "--overwrite", device)
            one_line_error(proc, device, "mounted or held open")
        finally:
            os.close(holder)
        proc = restore(dest, "vm", "--overwrite", device)
        assert proc.returncode == 0, proc.stderr
        with open(device, "rb") as dev:
            assert dev.read(SIZE) == refs[-1].read_bytes()
    with loop_device(SIZE - MiB) as small:
        proc = restore(dest, "vm", "--overwrite", small)
        one_line_error(proc, small, "smaller than the point")
        with open(small, "rb") as dev:
            assert dev.read(4096) == b"\xa5" * 4096  # refused before the first write


def test_damaged_points_are_marked_and_refused(
    chain: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    dest, refs = chain
    pts = points(dest, "vm")
    middle = dest / pts[1]["file"]
    hidden = tmp_path / "hidden"
    middle.rename(hidden)
    try:
        proc = sparsefs("list", "--json", str(dest))
        assert proc.returncode == 1
        listed = json.loads(proc.stdout)["disks"][0]["points"]
        assert [p["status"] for p in listed] == ["ok", "damaged", "damaged"]
        assert "missing" in listed[1]["problem"]
        assert pts[1]["id"] in listed[2]["problem"]  # depends on it
        text = sparsefs("list", str(dest))
        assert text.returncode == 1
        assert "DAMAGED" in text.stdout
        one_line_error(restore(dest, "vm", tmp_path / "r.raw"), "missing", "damaged")
        assert not (tmp_path / "r.raw").exists()
        # The full point below is intact and restorable.
        assert restore(dest, "vm", "--at", pts[0]["id"], tmp_path / "r0.raw").returncode == 0
        assert qemu_compare(tmp_path / "r0.raw", refs[0])
    finally:
        hidden.rename(middle)
    assert sparsefs("list", str(dest)).returncode == 0


def test_checksum_and_verify_accept_a_point(chain: tuple[Path, list[Path]]) -> None:
    dest, refs = chain
    newest = latest_file(dest, "vm")
    out = sparsefs("checksum", str(newest), check=True).stdout
    assert out.split()[0] == points(dest, "vm")[-1]["digest"]
    assert sparsefs("verify", "-q", str(newest), str(refs[-1])).returncode == 0
    assert sparsefs("verify", "-q", str(newest), str(refs[0])).returncode == 1


def test_restore_progress_for_wrappers(chain: tuple[Path, list[Path]], tmp_path: Path) -> None:
    dest, refs = chain
    read_end, write_end = os.pipe()
    try:
        target = str(tmp_path / "p.raw")
        proc = subprocess.run(
            [*SPARSEFS, "restore", "-q", f"--progress={write_end}", str(dest), "vm", target],
            capture_output=True,
            text=True,
            pass_fds=(write_end,),
        )
        os.close(write_end)
        lines = os.read(read_end, 65536).decode().split()
    finally:
        os.close(read_end)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    values = [int(line.split("/")[0]) for line in lines]
    assert values == sorted(values)
    assert values[-1] == 100
    assert qemu_compare(tmp_path / "p.raw", refs[-1])
    one_line_error(restore(dest, "vm", "--progress=97", tmp_path / "q.raw"), "--progress=97")
