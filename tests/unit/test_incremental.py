"""``backup --since BITMAP``: incremental updates of a verified raw copy from a dirty bitmap.

The starting copy is made by qemu (``qemu-img convert -O raw``) and vouched
for by ``sparsefs checksum`` in SPARSEFS-SUMS, as a full ``sparsefs backup``
leaves it; the bitmap is added at that moment.  After qemu-io writes, the
updated copy must equal qemu's conversion of the image, and the bytes the
run wrote (``wchar`` from /proc) stay near the dirty size.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sparsefs.cli import incremental
from sparsefs.errors import SparsefsError
from sparsefs.formats.qcow2 import open_image
from support import (
    REPO,
    KiB,
    MiB,
    files_equal,
    make_image,
    one_line_error,
    qemu_img_create,
    qemu_io,
    qemu_raw,
    run,
    sparsefs,
)

SIZE = 64 * MiB
SINCE = [sys.executable, "-m", "sparsefs", "backup"]


def since(*args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``backup --since`` in a shell that reports the bytes it wrote (``wchar``).

    A reaped child's I/O counters are added to its parent's, so the shell's
    own /proc/self/io after the command holds the command's writes.
    """
    script = '"$@"; rc=$?; grep ^wchar: /proc/$$/io >&2; exit $rc'
    proc = subprocess.run(
        ["sh", "-c", script, "sh", *SINCE, *args], capture_output=True, text=True, cwd=REPO
    )
    lines = proc.stderr.splitlines()
    wchar = int(lines[-1].split()[1])
    proc.stderr = "\n".join(lines[:-1]) + ("\n" if len(lines) > 1 else "")
    return proc, wchar


def full_copy(image: Path, dest: Path) -> Path:
    """A verified copy as a full backup leaves it: DEST/NAME.raw plus its SPARSEFS-SUMS line."""
    dest.mkdir(exist_ok=True)
    copy = qemu_raw(image, dest / image.name.replace(".qcow2", ".raw"))
    line = run(
        [sys.executable, "-m", "sparsefs", "checksum", "-f", "raw", copy.name], cwd=dest
    ).stdout
    (dest / "SPARSEFS-SUMS").write_text(line)
    return copy


def check_manifest(dest: Path) -> None:
    run([sys.executable, "-m", "sparsefs", "checksum", "--check", "SPARSEFS-SUMS"], cwd=dest)


def dir_state(dest: Path) -> dict[str, tuple[str, int]]:
    """Every file of ``dest``: its content hash and mtime (to prove "untouched")."""
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(dest.iterdir())
    }


def dirty_bytes(image: Path, name: str) -> int:
    proc = sparsefs("map", "--bitmap", name, "--output=json", str(image), check=True)
    return sum(e["length"] for e in json.loads(proc.stdout))


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    image = make_image(tmp_path / "vm.qcow2", SIZE, seed=71, writes=40, max_len=2 * MiB)
    dest = tmp_path / "backup"
    copy = full_copy(image, dest)
    run(["qemu-img", "bitmap", "--add", str(image), "nightly"])
    return image, dest, copy


def test_since_writes_only_dirty_and_equals_image(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    image, dest, copy = setup
    qemu_io(
        image,
        "write -q -P 0x11 5M 300k",
        "write -q -z 20M 1M",
        "discard -q 30M 2M",
        "write -q -P 0x22 63M 1M",
        "write -q -P 0x33 1k 2k",
    )
    dirty = dirty_bytes(image, "nightly")
    assert 0 < dirty < 8 * MiB
    proc, wchar = since(str(image), str(dest), "--since", "nightly", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)["files"][0]
    assert result["dirty-bytes"] == dirty
    assert result["copy-rehashed"]  # first incremental run after a full copy
    assert files_equal(copy, qemu_raw(image, tmp_path / "ref.raw"))
    check_manifest(dest)
    # O(changed): what was written (data, manifests, block digests) stays near the dirty size.
    assert result["written-bytes"] <= dirty
    assert wchar <= dirty + 256 * KiB, (wchar, dirty)
    assert sparsefs("verify", str(image), str(copy)).returncode == 0
    # The zeroed and discarded ranges became holes, not written zeros.
    assert copy.stat().st_blocks * 512 <= os.path.getsize(tmp_path / "ref.raw")

    # Nightly rotation: clear the bitmap after the run, write more, run again.
    run(["qemu-img", "bitmap", "--clear", str(image), "nightly"])
    qemu_io(image, "write -q -P 0x44 40M 128k")
    proc, wchar = since(str(image), str(dest), "--since", "nightly", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)["files"][0]
    assert not result["copy-rehashed"]  # trusted the block digests of the last verified run
    assert result["verified-bytes"] == result["dirty-bytes"] == 128 * KiB
    assert wchar <= 128 * KiB + 256 * KiB
    assert files_equal(copy, qemu_raw(image, tmp_path / "ref2.raw"))
    check_manifest(dest)


def test_since_chain_top_has_the_bitmap(tmp_path: Path) -> None:
    base = make_image(tmp_path / "base.qcow2", SIZE, seed=72, writes=20, max_len=MiB)
    top = tmp_path / "vm.qcow2"
    qemu_img_create(top, None, backing=base)
    qemu_io(top, "write -q -P 0x55 2M 1M")
    dest = tmp_path / "backup"
    copy = full_copy(top, dest)
    run(["qemu-img", "bitmap", "--add", str(top), "b"])
    qemu_io(top, "write -q -P 0x66 10M 512k", "discard -q 2M 64k", "write -q -z 3M 64k")
    proc, _ = since(str(top), str(dest), "--since", "b")
    assert proc.returncode == 0, proc.stderr
    assert files_equal(copy, qemu_raw(top, tmp_path / "ref.raw"))
    check_manifest(dest)


def _entry_flags_offset(image: Path, name: str) -> int:
    buf = image.read_bytes()
    pos = struct.unpack(">I", buf[100:104])[0]
    while True:
        ext_type, length = struct.unpack(">II", buf[pos : pos + 8])
        assert ext_type, "no bitmaps extension"
        if ext_type == 0x23852875:
            entry = struct.unpack(">Q", buf[pos + 24 : pos + 32])[0]
            break
        pos += 8 + ((length + 7) & ~7)
    while True:
        name_size, extra = struct.unpack(">HI", buf[entry + 18 : entry + 24])
        if buf[entry + 24 + extra : entry + 24 + extra + name_size] == name.encode():
            return int(entry) + 12
        entry += (24 + extra + name_size + 7) & ~7


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing_bitmap", "no bitmap named 'other'"),
        ("in_use", "in use"),
        ("in_use_force_share", "in use"),
        ("size_mismatch", "does not fit the image"),
        ("no_copy", "no previous copy"),
        ("copy_wrong_size", "not a copy of this image"),
        ("not_in_manifest", "not a verified copy"),
        ("copy_modified", "not a verified copy"),
    ],
)
def test_refusals_leave_destination_untouched(
    setup: tuple[Path, Path, Path], case: str, needle: str
) -> None:
    image, dest, copy = setup
    qemu_io(image, "write -q -P 0x77 1M 64k")
    bitmap = "nightly"
    extra: list[str] = []
    if case == "missing_bitmap":
        bitmap = "other"
    elif case in ("in_use", "in_use_force_share"):
        _patch(image, _entry_flags_offset(image, "nightly"), struct.pack(">I", 3))
        if case == "in_use_force_share":
            extra = ["--force-share"]
    elif case == "size_mismatch":
        # A bitmap table of another size than the image at this granularity needs.
        with open_image(image) as im:
            assert im.size == SIZE
        _patch(image, _entry_flags_offset(image, "nightly") - 4, struct.pack(">I", 2))
    elif case == "no_copy":
        copy.unlink()
    elif case == "copy_wrong_size":
        os.truncate(copy, SIZE + MiB)
    elif case == "not_in_manifest":
        (dest / "SPARSEFS-SUMS").write_text("")
    elif case == "copy_modified":
        with open(copy, "r+b") as f:
            f.seek(7 * MiB)
            f.write(b"\x01")
    before = dir_state(dest)
    proc, wchar = since(str(image), str(dest), "--since", bitmap, *extra)
    one_line_error(proc, needle)
    assert dir_state(dest) == before
    assert wchar < 4 * KiB  # nothing but the error line


def test_interrupted_run_leaves_no_verified_copy(
    setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    image, dest, _copy = setup
    qemu_io(image, "write -q -P 0x12 1M 64k", "write -q -P 0x13 9M 64k")
    real = incremental._copy_range
    calls = []

    def interrupted(*a: object) -> int:
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a)  # type: ignore[arg-type]  # forwarded unchanged

    monkeypatch.setattr(incremental, "_copy_range", interrupted)
    with open_image(image) as im, pytest.raises(KeyboardInterrupt):
        incremental.backup_since(im, str(image), str(dest), "nightly")
    assert "vm.raw" not in (dest / "SPARSEFS-SUMS").read_text()
    assert not (dest / ".vm.raw.sparsefs1-blocks").exists()
    monkeypatch.undo()
    proc, _ = since(str(image), str(dest), "--since", "nightly")
    one_line_error(proc, "not a verified copy")


def test_one_refusal_touches_no_copy(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """With two images, a refusal for the second leaves the first copy untouched too."""
    image, dest, _copy = setup
    other = make_image(tmp_path / "db.qcow2", 8 * MiB, seed=73, writes=5)
    full_copy(other, dest)
    line = (dest / "SPARSEFS-SUMS").read_text()  # full_copy rewrote it for db.raw only
    (dest / "SPARSEFS-SUMS").write_text(
        line
        + run(
            [sys.executable, "-m", "sparsefs", "checksum", "-f", "raw", "vm.raw"], cwd=dest
        ).stdout
    )
    qemu_io(image, "write -q -P 0x21 3M 64k")
    before = dir_state(dest)
    proc, _ = since(str(image), str(other), str(dest), "--since", "nightly")
    one_line_error(proc, "no bitmap named 'nightly'", "db.qcow2")
    assert dir_state(dest) == before


def test_bitmap_held_by_running_qemu_refused(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """A QEMU process with the image open marks its bitmaps in_use: refused, even with -U."""
    image, dest, _copy = setup
    pidfile = tmp_path / "qsd.pid"
    run(
        [
            "qemu-storage-daemon",
            "--daemonize",
            "--pidfile",
            str(pidfile),
            "--blockdev",
            f"driver=file,node-name=f,filename={image}",
            "--blockdev",
            "driver=qcow2,node-name=q,file=f",
        ]
    )
    try:
        before = dir_state(dest)
        proc, _ = since(str(image), str(dest), "--since", "nightly")
        one_line_error(proc, "in use by another process")  # the image lock
        proc, _ = since(str(image), str(dest), "--since", "nightly", "--force-share")
        one_line_error(proc, "bitmap 'nightly' is in use")
        assert dir_state(dest) == before
    finally:
        os.kill(int(pidfile.read_text()), 15)


def test_full_backup_then_since(tmp_path: Path) -> None:
    """The real sequence: ``sparsefs backup``, ``qemu-img bitmap --add``, writes, ``--since``."""
    image = make_image(tmp_path / "web.qcow2", 32 * MiB, seed=74, writes=20, max_len=MiB)
    dest = tmp_path / "backup"
    dest.mkdir()
    proc = sparsefs("backup", "--xxh128sums", str(image), str(dest))
    assert proc.returncode == 0, proc.stderr
    run(["qemu-img", "bitmap", "--add", str(image), "nightly"])
    qemu_io(image, "write -q -P 0x31 17M 100k", "discard -q 0 1M")
    proc, wchar = since(str(image), str(dest), "--since", "nightly", "--json")
    assert proc.returncode == 0, proc.stderr
    # The full backup left the copy's block digests: the copy is not hashed again.
    assert not json.loads(proc.stdout)["files"][0]["copy-rehashed"]
    assert files_equal(dest / "web.raw", qemu_raw(image, tmp_path / "ref.raw"))
    check_manifest(dest)
    assert wchar <= dirty_bytes(image, "nightly") + 256 * KiB
    # XXH128SUMS would need every byte hashed again: its line is dropped, not left stale.
    assert "web.raw" not in (dest / "XXH128SUMS").read_text()


def test_bad_write_fails_verification(
    setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy that does not hold what was written is caught, and no manifest vouches for it."""
    image, dest, _copy = setup
    qemu_io(image, "write -q -P 0x14 6M 64k")
    real = incremental._copy_range

    def corrupting(image_: object, fd: int, start: int, end: int) -> int:
        written = real(image_, fd, start, end)  # type: ignore[arg-type]  # forwarded unchanged
        os.pwrite(fd, b"\xff", start + 100)  # what the storage gives back is wrong
        return written

    monkeypatch.setattr(incremental, "_copy_range", corrupting)
    with open_image(image) as im, pytest.raises(SparsefsError, match="verification failed"):
        incremental.backup_since(im, str(image), str(dest), "nightly")
    assert "vm.raw" not in (dest / "SPARSEFS-SUMS").read_text()
