"""End to end through a real mount: bytes, holes, copiers, lseek errors, lifecycle.

Every expectation comes from qemu at test time: qemu-img convert -O raw for the
bytes, qemu-img map --output=json for the holes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support import (
    KiB,
    MiB,
    check_stored,
    daemon_pid,
    files_equal,
    force_unmount,
    host_files_of,
    is_mounted,
    make_encrypted_image,
    make_image,
    one_line_error,
    oracle_data_bytes,
    qemu_io,
    qemu_map,
    qemu_raw,
    run,
    seek_walk,
    sparsefs,
)

Mount = Callable[..., Path]

# (cluster size, virtual size, data writes): the 4 KiB case is not cluster aligned.
CASES = [
    (64 * KiB, 256 * MiB, 40),
    (4 * KiB, 48 * MiB + 1536, 60),
    (512, 8 * MiB + 512, 40),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"cluster{c[0]}")
def image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cluster_size, size, writes = request.param
    path = tmp_path_factory.mktemp("e2e") / "vm-disk.qcow2"
    make_image(
        path,
        size,
        seed=cluster_size + 1,
        options=[f"cluster_size={cluster_size}"],
        writes=writes,
        zero_writes=8,
        discards=8,
        max_len=512 * KiB,
    )
    return path


@pytest.fixture(scope="module")
def reference(image: Path) -> Path:
    return qemu_raw(image, image.with_suffix(".ref.raw"))


def test_mounted_file_is_qemu_convert(image: Path, reference: Path, mount: Mount) -> None:
    mp = mount(image)
    assert sorted(os.listdir(mp)) == ["vm-disk.raw"]
    raw = mp / "vm-disk.raw"
    assert raw.stat().st_size == reference.stat().st_size
    assert files_equal(raw, reference)


def test_seek_walk_agrees_with_qemu_map(image: Path, mount: Mount) -> None:
    raw = mount(image) / "vm-disk.raw"
    segments = seek_walk(raw)
    assert segments, "no data reported at all"
    check_stored(segments, qemu_map(image), host_files_of(image))


def test_st_blocks_counts_stored_data(image: Path, mount: Mount) -> None:
    raw = mount(image) / "vm-disk.raw"
    st = raw.stat()
    data = sum(e - s for s, e in seek_walk(raw))
    assert st.st_blocks == (data + 511) // 512
    assert data == oracle_data_bytes(image)
    assert st.st_blocks * 512 < st.st_size
    du = run(["du", "-B1", str(raw)]).stdout.split()[0]
    assert int(du) == st.st_blocks * 512


def test_lseek_errors_follow_lseek2(image: Path, mount: Mount) -> None:
    raw = mount(image) / "vm-disk.raw"
    segments = seek_walk(raw)
    size = raw.stat().st_size
    last_data_end = segments[-1][1]
    fd = os.open(raw, os.O_RDONLY)
    try:
        for off in (size, size + 1, size + 10 * MiB):
            with pytest.raises(OSError) as exc:
                os.lseek(fd, off, os.SEEK_DATA)
            assert exc.value.errno == errno.ENXIO
            with pytest.raises(OSError) as exc:
                os.lseek(fd, off, os.SEEK_HOLE)
            assert exc.value.errno == errno.ENXIO
        if last_data_end < size:  # inside the trailing hole
            for off in (last_data_end, (last_data_end + size) // 2, size - 1):
                with pytest.raises(OSError) as exc:
                    os.lseek(fd, off, os.SEEK_DATA)
                assert exc.value.errno == errno.ENXIO
                assert os.lseek(fd, off, os.SEEK_HOLE) == off
        # The implicit hole at EOF: SEEK_HOLE inside the last data run answers its end.
        s, e = segments[-1]
        assert os.lseek(fd, s, os.SEEK_HOLE) == e
        assert os.lseek(fd, s, os.SEEK_DATA) == s
    finally:
        os.close(fd)


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _assert_sparse_copy(copy: Path, reference: Path, data_bytes: int) -> None:
    assert files_equal(copy, reference), f"{copy} differs from qemu-img convert"
    # Close to the image's data (cp may round to filesystem blocks), far from the virtual size.
    assert _allocated(copy) <= data_bytes + 1 * MiB, (_allocated(copy), data_bytes)


def test_cp_sparse_always(image: Path, reference: Path, mount: Mount, tmp_path: Path) -> None:
    raw = mount(image) / "vm-disk.raw"
    copy = tmp_path / "cp.raw"
    run(["cp", "--sparse=always", str(raw), str(copy)])
    _assert_sparse_copy(copy, reference, oracle_data_bytes(image))


def test_tar_sparse_roundtrip(image: Path, reference: Path, mount: Mount, tmp_path: Path) -> None:
    mp = mount(image)
    archive = tmp_path / "backup.tar"
    run(
        [
            "tar",
            "--sparse",
            "--hole-detection=seek",
            "-cf",
            str(archive),
            "-C",
            str(mp),
            "vm-disk.raw",
        ]
    )
    # The archive stores only the data (plus headers and sparse maps).
    data = oracle_data_bytes(image)
    assert archive.stat().st_size <= data + 2 * MiB
    with tarfile.open(archive) as tf:
        member = tf.getmember("vm-disk.raw")
        assert member.size == reference.stat().st_size
    out = tmp_path / "x"
    out.mkdir()
    run(["tar", "-xf", str(archive), "-C", str(out)])
    _assert_sparse_copy(out / "vm-disk.raw", reference, data)


def test_qemu_img_convert_from_mount(
    image: Path, reference: Path, mount: Mount, tmp_path: Path
) -> None:
    raw = mount(image) / "vm-disk.raw"
    copy = tmp_path / "conv.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(raw), str(copy)])
    _assert_sparse_copy(copy, reference, oracle_data_bytes(image))


def _read_bytes_by_fd(strace_log: str, path: str) -> tuple[int, int]:
    """Bytes read(2)/pread(2) returned on the descriptor that opened ``path``; SEEK_DATA calls."""
    fds: set[str] = set()
    total = 0
    seek_data = 0
    for line in strace_log.splitlines():
        m = re.search(r'openat\(AT_FDCWD, "([^"]+)".*\) = (\d+)', line)
        if m and m.group(1) == path:
            fds.add(m.group(2))
            continue
        m = re.search(r"\b(?:read|pread64)\((\d+),.*\) = (\d+)$", line)
        if m and m.group(1) in fds:
            total += int(m.group(2))
        if "SEEK_DATA" in line:
            seek_data += 1
    return total, seek_data


def _daemon_io(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["rchar"])


def test_holes_are_not_read_by_cp(tmp_path: Path, mount: Mount) -> None:
    """cp seeks over the holes: it reads about the data, and so does the daemon from the image."""
    image = tmp_path / "big.qcow2"
    make_image(image, 2048 * MiB, seed=99, writes=30, zero_writes=0, discards=0, max_len=MiB)
    data = oracle_data_bytes(image)
    mp = mount(image)
    raw = mp / "big.raw"
    pid = daemon_pid(mp)
    assert pid is not None
    before = _daemon_io(pid)
    log = tmp_path / "strace.log"
    copy = tmp_path / "copy.raw"
    run(
        [
            "strace",
            "-f",
            "-o",
            str(log),
            "-e",
            "trace=openat,read,pread64,lseek",
            "cp",
            "--sparse=always",
            str(raw),
            str(copy),
        ]
    )
    read_by_cp, seek_data = _read_bytes_by_fd(log.read_text(), str(raw))
    daemon_read = _daemon_io(pid) - before
    assert seek_data > 0, "cp did not use SEEK_DATA"
    assert data <= read_by_cp <= data + 4 * MiB, (read_by_cp, data)
    # The daemon read the data from the image file (plus metadata and FUSE headers),
    # nowhere near the 2 GiB virtual size.
    assert daemon_read <= data + 8 * MiB, (daemon_read, data)
    assert files_equal(copy, qemu_raw(image, tmp_path / "ref.raw"))


# -- lifecycle and safety -------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_source_image_is_never_written(tmp_path: Path, mount: Mount) -> None:
    image = make_image(tmp_path / "ro.qcow2", 32 * MiB, seed=5)
    digest, mtime = _sha256(image), image.stat().st_mtime_ns
    mp = mount(image)
    raw = mp / "ro.raw"
    pid = daemon_pid(mp)
    assert pid is not None
    # Every descriptor the daemon holds on the image is read-only.
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target == str(image):
            flags = int(
                Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8
            )
            assert flags & os.O_ACCMODE == os.O_RDONLY
    raw.read_bytes()
    with pytest.raises(OSError) as exc:
        open(raw, "r+b")  # noqa: SIM115  # must fail: nothing to close
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    run(["cp", "--sparse=always", str(raw), str(tmp_path / "c.raw")])
    sparsefs("umount", str(mp), check=True)
    assert _sha256(image) == digest
    assert image.stat().st_mtime_ns == mtime


def test_several_images_one_mount(tmp_path: Path, mount: Mount) -> None:
    a = make_image(tmp_path / "a.qcow2", 8 * MiB, seed=1)
    (tmp_path / "sub").mkdir()
    b = make_image(tmp_path / "sub" / "b.disk", 4 * MiB, seed=2)
    mp = mount(a, b)
    assert sorted(os.listdir(mp)) == ["a.raw", "b.disk.raw"]
    assert files_equal(mp / "a.raw", qemu_raw(a, tmp_path / "a.ref"))
    assert files_equal(mp / "b.disk.raw", qemu_raw(b, tmp_path / "b.ref"))


def test_eio_for_broken_range_rest_served(tmp_path: Path, mount: Mount) -> None:
    import struct

    image = tmp_path / "broken.qcow2"
    make_image(image, 1024 * MiB, seed=3, writes=0, zero_writes=0, discards=0)
    qemu_io(image, "write -q -P 0x5a 0 1M", "write -q -P 0x6b 600M 1M")
    ref = qemu_raw(image, tmp_path / "good.raw")
    l1_offset = struct.unpack_from(">Q", image.read_bytes(), 40)[0]
    with open(image, "r+b") as f:
        f.seek(l1_offset + 8)  # L2 table of guest [512 MiB, 1 GiB) now past EOF
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
    raw = mount(image) / "broken.raw"
    with open(raw, "rb") as f, open(ref, "rb") as r:
        assert f.read(MiB) == r.read(MiB)
        f.seek(600 * MiB)
        with pytest.raises(OSError) as exc:
            f.read(4096)
        assert exc.value.errno == errno.EIO
        f.seek(100 * MiB)
        assert f.read(4096) == bytes(4096)
    # A copier fails loudly instead of writing a short or zero-filled copy.
    proc = subprocess.run(
        ["cp", "--sparse=always", str(raw), str(tmp_path / "c.raw")], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "Input/output error" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    image = make_image(tmp_path / "s.qcow2", 8 * MiB, seed=4)
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        sparsefs("mount", str(image), str(mp), check=True)
        pid = daemon_pid(mp)
        assert pid is not None
        assert is_mounted(mp)
        os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while (is_mounted(mp) or os.path.exists(f"/proc/{pid}")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_mounted(mp)
        assert (
            not os.path.exists(f"/proc/{pid}")
            or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
    finally:
        force_unmount(mp)


def test_foreground_mount_and_ctrl_c(tmp_path: Path) -> None:
    image = make_image(tmp_path / "f.qcow2", 8 * MiB, seed=6)
    mp = tmp_path / "mnt"
    mp.mkdir()
    errlog = tmp_path / "stderr.log"
    with open(errlog, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sparsefs", "mount", "--foreground", str(image), str(mp)],
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 15
        while not is_mounted(mp) and time.monotonic() < deadline:
            assert proc.poll() is None, errlog.read_text()
            time.sleep(0.05)
        assert files_equal(mp / "f.raw", qemu_raw(image, tmp_path / "ref.raw"))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert not is_mounted(mp)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mp)


def test_umount_after_daemon_killed_and_remount(tmp_path: Path) -> None:
    image = make_image(tmp_path / "k.qcow2", 8 * MiB, seed=8)
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        sparsefs("mount", str(image), str(mp), check=True)
        pid = daemon_pid(mp)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}/cmdline") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert is_mounted(mp)  # the dead mount is left behind
        again = sparsefs("mount", str(image), str(mp))
        assert again.returncode != 0
        assert "sparsefs umount" in again.stderr
        sparsefs("umount", str(mp), check=True)
        assert not is_mounted(mp)
        sparsefs("mount", str(image), str(mp), check=True)
        assert files_equal(mp / "k.raw", qemu_raw(image, tmp_path / "ref.raw"))
        sparsefs("umount", str(mp), check=True)
    finally:
        force_unmount(mp)


# -- bad input at the command line ----------------------------------------------------


def test_bad_input_is_one_line_and_mounts_nothing(tmp_path: Path) -> None:
    good = make_image(tmp_path / "good.qcow2", 4 * MiB, seed=9)
    mp = tmp_path / "mnt"
    mp.mkdir()
    notq = tmp_path / "notes.txt"
    notq.write_text("not an image\n" * 100)
    fake = tmp_path / "fake.qcow2"  # no magic: not served as a raw disk
    fake.write_text("not an image\n" * 100)
    trunc = tmp_path / "trunc.qcow2"
    trunc.write_bytes(good.read_bytes()[:60])
    enc = make_encrypted_image(tmp_path / "enc.qcow2")
    cases = [
        ([str(tmp_path / "missing.qcow2"), str(mp)], ["missing.qcow2"]),
        (["--format", "qcow2", str(notq), str(mp)], ["notes.txt", "not a qcow2 image"]),
        ([str(notq), str(mp)], ["notes.txt", "not a disk image", "-f raw"]),
        ([str(fake), str(mp)], ["fake.qcow2", "not a qcow2 image", "-f raw"]),
        ([str(trunc), str(mp)], ["trunc.qcow2", "truncated"]),
        ([str(enc), str(mp)], ["enc.qcow2", "encrypt"]),
        ([str(good), str(tmp_path / "nodir")], ["nodir", "does not exist"]),
        ([str(good), str(notq)], ["notes.txt", "not a directory"]),
        ([str(good), str(good), str(mp)], ["good.raw", "already taken"]),
    ]
    try:
        for argv, needles in cases:
            proc = sparsefs("mount", *argv)
            one_line_error(proc, *needles)
            assert not is_mounted(mp)
        # A busy mountpoint.
        sparsefs("mount", str(good), str(mp), check=True)
        proc = sparsefs("mount", str(good), str(mp))
        one_line_error(proc, str(mp), "busy")
        sparsefs("umount", str(mp), check=True)
        # umount of something that is not mounted.
        one_line_error(sparsefs("umount", str(mp)), str(mp), "not mounted")
    finally:
        force_unmount(mp)


def test_refuses_pyfuse3_without_lseek(tmp_path: Path) -> None:
    """A stock pyfuse3 (no lseek handler) would report no holes: sparsefs refuses to mount."""
    image = make_image(tmp_path / "p.qcow2", 4 * MiB, seed=10)
    mp = tmp_path / "mnt"
    mp.mkdir()
    code = (
        "import sys, pyfuse3\n"
        "del pyfuse3.Operations.lseek\n"
        "from sparsefs.cli import main\n"
        f"sys.exit(main(['mount', {str(image)!r}, {str(mp)!r}]))\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        one_line_error(proc, "lseek", "tools/setup")
        assert not is_mounted(mp)
    finally:
        force_unmount(mp)
