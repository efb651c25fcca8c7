"""``sparsefs backup`` copies straight from the reader (no mount): every image kind,
both copy paths, the reflink policy, progress for wrappers, per-phase times."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from format_images import BUILDERS as QCOW2_KINDS
from format_images import ImageCache, qemu_convert
from points_support import latest_file
from prealloc_images import BUILDERS as PREALLOC_KINDS
from sparsefs.cli import backup as backup_mod
from sparsefs.cli import copier, main
from sparsefs.cli.common import mount_table
from sparsefs.raw import RawFile
from support import MiB, files_equal, make_image, oracle_data_bytes, qemu_raw, seek_walk


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageCache:
    return ImageCache(tmp_path_factory.mktemp("backup-kinds"))


def _backup(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    status = main(["backup", "--json", *args])
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert status == (0 if out["ok"] else 1)
    return out


@pytest.mark.parametrize("kind", list(QCOW2_KINDS))
def test_every_qcow2_kind_is_copied_exactly(
    kind: str,
    images: ImageCache,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    built = images.get(kind)
    if built.cwd is not None:
        monkeypatch.chdir(built.cwd)
    dest = tmp_path / "dest"
    dest.mkdir()
    out = _backup(capsys, "--snapshots", str(built.image), str(dest))
    assert out["ok"], out
    stem = built.image.name.removesuffix(".qcow2")
    expected = qemu_convert(built, tmp_path / "ref.raw")
    assert latest_file(dest, stem).read_bytes() == expected
    for snap in built.snapshots:
        via_l = qemu_convert(built, tmp_path / "ref.raw", snapshot=snap)
        copy = latest_file(dest, f"{stem}@{snap}").read_bytes()
        assert copy == via_l[: len(copy)]
        assert via_l[len(copy) :].count(0) == len(via_l) - len(copy)
    sums = (dest / "SPARSEFS-SUMS").read_text()
    assert sums.count("sparsefs1:") == 1 + len(built.snapshots)


@pytest.mark.parametrize("kind", list(PREALLOC_KINDS))
def test_preallocated_images_copy_only_their_data(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    image = PREALLOC_KINDS[kind](src)
    dest = tmp_path / "dest"
    dest.mkdir()
    out = _backup(capsys, str(image), str(dest))
    (record,) = out["files"]
    assert record["ok"], record
    copy = latest_file(dest, image.stem)
    assert files_equal(copy, qemu_raw(image, tmp_path / "ref.raw"))
    assert copy.stat().st_blocks * 512 <= oracle_data_bytes(image) + MiB


@pytest.fixture
def image(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    return make_image(src / "vm.qcow2", 96 * MiB, seed=77, writes=24, max_len=2 * MiB)


def _method(out: dict[str, Any]) -> str:
    (record,) = out["files"]
    assert record["ok"], record
    return str(record["copy-method"])


def test_same_filesystem_uses_copy_file_range(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    fs = backup_mod.filesystem_type(str(dest))
    assert fs is not None
    out = _backup(capsys, str(image), str(dest))
    expected = "read-hash-write" if fs in backup_mod.REFLINK_FILESYSTEMS else "copy_file_range"
    assert _method(out) == expected
    assert files_equal(latest_file(dest, "vm"), qemu_raw(image, tmp_path / "ref.raw"))
    (record,) = out["files"]
    assert set(record["phase-seconds"]) == {"copy", "verify", "record"}


def test_other_filesystem_reads_hashes_and_writes(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shm = Path("/dev/shm")
    if os.stat(shm).st_dev == os.stat(image).st_dev:
        pytest.fail("/dev/shm and the test directory must be different filesystems")
    dest = shm / f"sparsefs-test-{os.getpid()}"
    dest.mkdir()
    try:
        out = _backup(capsys, str(image), str(dest))
        assert _method(out) == "read-hash-write"
        assert files_equal(latest_file(dest, "vm"), qemu_raw(image, tmp_path / "ref.raw"))
        assert latest_file(dest, "vm").stat().st_blocks * 512 <= oracle_data_bytes(image) + MiB
    finally:
        shutil.rmtree(dest)


def test_refused_copy_file_range_falls_back(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The kernel refuses mid-copy (EXDEV): the file is redone by read-hash-write, exact."""
    calls = []
    real = os.copy_file_range

    def refusing(*args: int) -> int:
        calls.append(args)
        if len(calls) > 2:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real(*args)

    monkeypatch.setattr(backup_mod, "_kernel_copy_allowed", lambda *a: True)
    monkeypatch.setattr(os, "copy_file_range", refusing)
    dest = tmp_path / "dest"
    dest.mkdir()
    out = _backup(capsys, str(image), str(dest))
    assert len(calls) == 3
    assert _method(out) == "read-hash-write"
    assert files_equal(latest_file(dest, "vm"), qemu_raw(image, tmp_path / "ref.raw"))


@pytest.mark.parametrize(
    ("fs", "reflink", "allowed"),
    [
        ("ext4", "never", True),
        ("xfs", "never", False),
        ("btrfs", "never", False),
        ("xfs", "auto", True),
        ("ext4", "auto", True),
    ],
)
def test_reflink_policy(
    fs: str, reflink: str, allowed: bool, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backup_mod, "filesystem_type", lambda path: fs)
    assert backup_mod._kernel_copy_allowed(str(image), str(image.parent), reflink) is allowed
    # Another filesystem: never (the kernel would refuse, or copy through the page cache).
    assert backup_mod._kernel_copy_allowed(str(image), "/dev/shm", reflink) is False


def test_progress_fd_prints_percent_lines(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    r, w = os.pipe()
    try:
        assert main(["backup", "-q", f"--progress={w}", str(image), str(dest)]) == 0
        os.close(w)
        w = -1
        with os.fdopen(r, "r") as f:
            r = -1
            lines = f.read().splitlines()
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    values = [int(line.removesuffix("/100")) for line in lines]
    assert all(line.endswith("/100") for line in lines)
    assert values == sorted(set(values))
    assert values[0] == 0
    assert values[-1] == 100
    assert len(values) > 3
    assert capsys.readouterr().out == ""


def test_progress_fd_must_be_open(image: Path, tmp_path: Path) -> None:
    from support import one_line_error, sparsefs

    proc = sparsefs("backup", "--progress=97", str(image), str(tmp_path))
    one_line_error(proc, "--progress=97", "not an open file descriptor")
    assert not list(tmp_path.glob("*.raw"))
    assert not (tmp_path / "SPARSEFS-SET.json").exists()


@pytest.mark.parametrize("where", ["same-fs", "shm"])
def test_verification_follows_the_copy_range_by_range(
    where: str,
    image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The copy is settled (synced, cache dropped) range by range, and the verifier reads
    only what is already settled: behind the copy on a disk, after it on tmpfs."""
    settled: list[tuple[int, int]] = []
    real_settle = copier.settle

    def recording_settle(fd: int, start: int, end: int) -> None:
        real_settle(fd, start, end)
        settled.append((start, end))
        time.sleep(0.002)  # a slow device: the verifier gets its turn whatever the scheduler

    read_ends: list[tuple[int, int]] = []  # (end of a verifier read, settled end then)
    real_ranges = copier.SettledCopy.iter_host_ranges

    def checked_ranges(
        self: copier.SettledCopy, start: int, end: int
    ) -> Iterator[tuple[int, int, RawFile | None, int]]:
        for item in real_ranges(self, start, end):
            read_ends.append((item[1], max((e for _, e in settled), default=0)))
            yield item

    monkeypatch.setattr(copier, "SETTLE_BYTES", MiB)
    monkeypatch.setattr(copier, "settle", recording_settle)
    monkeypatch.setattr(copier.SettledCopy, "iter_host_ranges", checked_ranges)
    if where == "shm":
        dest = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="sparsefs-test-"))
    else:
        dest = tmp_path / "dest"
        dest.mkdir()
    try:
        out = _backup(capsys, str(image), str(dest))
        _method(out)
        assert files_equal(latest_file(dest, "vm"), qemu_raw(image, tmp_path / "ref.raw"))
        segments = seek_walk(latest_file(dest, "vm"))
    finally:
        if where == "shm":
            shutil.rmtree(dest)
    nonempty = [r for r in settled if r[1] > r[0]]
    assert nonempty[-1][1] == 96 * MiB  # the last one runs to the end
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(nonempty))
    # Every byte the copy holds was settled before the verifier could read it.
    assert segments
    for start, end in segments:
        assert any(lo <= start and end <= hi for lo, hi in _merged(nonempty)), (start, end)
    assert read_ends
    assert all(end <= settled_end for end, settled_end in read_ends)
    if backup_mod.filesystem_type(str(image.parent)) in backup_mod.MEMORY_FILESYSTEMS:
        where = "shm"  # a tmp_path on tmpfs: the "same-fs" copy goes to memory too
    if where == "shm":
        # Memory: nothing to overlap; the data is settled once and verified after.
        assert len(nonempty) == 1
        assert all(settled_end == 96 * MiB for _, settled_end in read_ends)
    else:
        assert len(nonempty) > 4  # ~30 MiB of data in 1 MiB settles
        # The verifier ran alongside the copy: it read before the last settle.
        assert read_ends[0][1] < 96 * MiB


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def test_mount_table_decodes_mount_points(tmp_path: Path) -> None:
    """A mount point with a space (written as \\040 in mountinfo) is found, with its type."""
    where = tmp_path / "a dir with spaces"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(where)], check=True)
    try:
        entries = [e for e in mount_table() if e.mountpoint == str(where)]
        assert [e.fstype for e in entries] == ["tmpfs"]
        assert backup_mod.filesystem_type(str(where)) == "tmpfs"
        assert backup_mod.filesystem_type(str(tmp_path)) != "tmpfs"
    finally:
        subprocess.run(["umount", str(where)], check=True)
