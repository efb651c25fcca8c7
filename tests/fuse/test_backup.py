"""``sparsefs backup``: copies equal qemu's, manifests the standard tools accept,
a progress bar on a terminal, and no complete-looking file after a failure."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from points_support import manifest, points, qemu_compare
from sparsefs.cli import copier, main
from sparsefs.formats.qcow2 import open_image
from support import (
    MiB,
    files_equal,
    make_image,
    oracle_data_bytes,
    qemu_img_create,
    qemu_raw,
    run,
    sparsefs,
)


def _no_backup_mounts() -> bool:
    with open("/proc/self/mounts") as f:
        return not any("sparsefs-backup-" in line for line in f)


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    src = tmp_path / "images"
    src.mkdir()
    return [
        make_image(src / "web.qcow2", 256 * MiB, seed=41, writes=30, max_len=MiB),
        make_image(src / "db.qcow2", 64 * MiB + 4096, seed=42, writes=20, max_len=MiB),
    ]


def test_backup_copies_verifies_and_writes_manifests(images: list[Path], tmp_path: Path) -> None:
    dest = tmp_path / "backup"
    dest.mkdir()
    proc = sparsefs("backup", *map(str, images), str(dest))
    assert proc.returncode == 0, proc.stderr
    # Not a terminal: one summary line per file and a final one, no progress bar.
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    assert "\r" not in proc.stdout
    assert "\r" not in proc.stderr
    assert lines[-1].startswith("backup: 2 of 2 points added")
    for image in images:
        name = image.name.removesuffix(".qcow2")
        (point,) = points(dest, name)
        copy = dest / point["file"]
        assert copy.name == f"{name}@{point['id']}.raw"
        assert files_equal(copy, qemu_raw(image, tmp_path / f"{name}.ref"))
        assert copy.stat().st_blocks * 512 <= oracle_data_bytes(image) + MiB
        assert point["file"] in proc.stdout
        # The point and its block digests (hidden), for the next run's delta.
        assert sorted(p.name for p in (dest / name).iterdir()) == [
            f".{name}@{point['id']}.blocks",
            copy.name,
        ]
    # SPARSEFS-SUMS only by default (XXH128SUMS would hash every zero of the disk).
    assert sorted(p.name for p in dest.iterdir()) == [
        ".SPARSEFS-SET.lock",
        "SPARSEFS-SET.json",
        "SPARSEFS-SUMS",
        "db",
        "web",
    ]
    out = sparsefs("checksum", "--check", "SPARSEFS-SUMS", cwd=dest, check=True).stdout
    assert out.count(": OK") == 2
    # With --xxh128sums, new full raw points get lines the standard tool checks from DEST.
    sparsefs(
        "backup", "--quiet", "--full", "--xxh128sums", *map(str, images), str(dest), check=True
    )
    out = run(["xxh128sum", "-c", "XXH128SUMS"], cwd=dest).stdout
    assert out.count(": OK") == 2
    assert _no_backup_mounts()


def test_second_run_adds_a_delta_and_keeps_every_line(images: list[Path], tmp_path: Path) -> None:
    dest = tmp_path / "backup"
    dest.mkdir()
    sparsefs("backup", "--xxh128sums", *map(str, images), str(dest), check=True)
    before = (dest / "SPARSEFS-SUMS").read_text().splitlines()
    first = qemu_raw(images[0], tmp_path / "web0.ref")
    run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x99 1M 1M", str(images[0])])
    sparsefs("backup", "--quiet", str(images[0]), str(dest), check=True)
    sums = (dest / "SPARSEFS-SUMS").read_text().splitlines()
    assert len(sums) == 3  # web's delta added; web's full point and db's kept
    assert set(before) < set(sums)
    assert (
        sparsefs("checksum", "--check", "SPARSEFS-SUMS", cwd=dest, check=True).stdout.count(": OK")
        == 3
    )
    # XXH128SUMS still vouches for the two full points, which no run changes.
    assert run(["xxh128sum", "-c", "XXH128SUMS"], cwd=dest).stdout.count(": OK") == 2
    full, delta = points(dest, "web")
    assert delta["kind"] == "delta"
    assert delta["backing"] == full["file"]
    assert files_equal(dest / full["file"], first)
    assert qemu_compare(dest / delta["file"], qemu_raw(images[0], tmp_path / "web.ref"))


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    # Enough data that the copy outlasts the bar's first redraw interval (0.1 s).
    image = tmp_path / "big.qcow2"
    qemu_img_create(image, "4G")
    run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -q -P 0x31 0 200M",
            "-c",
            "write -q -P 0x32 3G 200M",
            str(image),
        ]
    )
    dest = tmp_path / "backup"
    dest.mkdir()
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its terminal
        os.execv(
            sys.executable, [sys.executable, "-m", "sparsefs", "backup", str(image), str(dest)]
        )
    output = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")
    # Redrawn in place with \r: bytes done / total, percent, rate, ETA.
    assert "\r" in text, text
    bar_lines = [part for part in text.split("\r") if "%" in part and "MiB" in part]
    assert bar_lines, text
    assert "ETA" in text or "eta" in text.lower(), text


def test_failed_verification_leaves_no_final_file(
    images: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A copy that comes out wrong is caught by verification, deleted, and not renamed."""
    dest = tmp_path / "backup"
    dest.mkdir()
    real_settle = copier.settle
    with open_image(images[0]) as web:
        target = next(e.guest_offset for e in web.iter_extents() if e.data) + 5000
    flipped = []

    def settle_then_rot(fd: int, start: int, end: int) -> None:
        """After a range is on the storage, one byte of it changes there (bad disk, bad RAM)."""
        real_settle(fd, start, end)
        if "web" in os.readlink(f"/proc/self/fd/{fd}") and start <= target < end:
            byte = os.pread(fd, 1, target)
            os.pwrite(fd, bytes([byte[0] ^ 0xFF]), target)
            flipped.append(target)

    monkeypatch.setattr(copier, "settle", settle_then_rot)
    status = main(["backup", *map(str, images), str(dest)])
    err = capsys.readouterr().err
    assert flipped == [target]
    assert status == 1
    assert str(dest / "web") in err
    assert f"verification failed: the copy differs from the image at byte {target}" in err
    assert not (dest / "web").exists()  # no point, no partial file, no digests
    assert list(manifest(dest)["disks"]) == ["db"]  # the other image is backed up
    assert len(list((dest / "db").iterdir())) == 2
    assert "web" not in (dest / "SPARSEFS-SUMS").read_text()
    assert "db/db@" in (dest / "SPARSEFS-SUMS").read_text()
    assert _no_backup_mounts()


def test_read_error_fails_the_run_and_leaves_no_file(tmp_path: Path) -> None:
    import struct

    image = make_image(
        tmp_path / "bad.qcow2", 1024 * MiB, seed=3, writes=0, zero_writes=0, discards=0
    )
    run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x6b 600M 1M", str(image)])
    l1_offset = struct.unpack_from(">Q", image.read_bytes(), 40)[0]
    with open(image, "r+b") as f:
        f.seek(l1_offset + 8)
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
    dest = tmp_path / "backup"
    dest.mkdir()
    proc = sparsefs("backup", str(image), str(dest))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert str(image) in proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == [".SPARSEFS-SET.lock", "SPARSEFS-SET.json"]
    assert manifest(dest)["disks"] == {}
    assert _no_backup_mounts()


def test_bad_arguments(tmp_path: Path) -> None:
    image = make_image(tmp_path / "ok.qcow2", 4 * MiB, seed=5)
    proc = sparsefs("backup", str(image), str(tmp_path / "nowhere"))
    assert proc.returncode == 1
    assert "nowhere" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = sparsefs("backup", str(tmp_path / "missing.qcow2"), str(tmp_path))
    assert proc.returncode == 1
    assert "missing.qcow2" in proc.stderr
    assert not list(tmp_path.glob("*.raw"))


def test_help_is_complete() -> None:
    for cmd in (
        [],
        ["mount"],
        ["umount"],
        ["backup"],
        ["list"],
        ["restore"],
        ["checksum"],
        ["verify"],
        ["map"],
        ["info"],
        ["demo"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "sparsefs", *cmd, "--help"], capture_output=True, text=True
        )
        assert proc.returncode == 0, cmd
        assert "usage: sparsefs" in proc.stdout
        if cmd:
            # every option of the subcommand carries a help text
            assert "  -h, --help" in proc.stdout
            for line in proc.stdout.splitlines():
                stripped = line.strip()
                if stripped.startswith("--") and "  " not in stripped:
                    # option whose help wrapped to the next line is fine; bare option is not
                    idx = proc.stdout.splitlines().index(line)
                    nxt = proc.stdout.splitlines()[idx + 1].strip()
                    assert nxt, (cmd, line)
                    assert not nxt.startswith("-"), (cmd, line)
