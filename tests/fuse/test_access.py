"""Who may touch what: qemu's image locks, and the permissions of the mount.

Image locks: sparsefs takes the same OFD byte-range locks that qemu takes when
it reads an image (qemu itself is the oracle: the lock bytes ``qemu-io -r``
holds, seen in /proc/locks, and whether qemu-io accepts or refuses to open an
image).  So an image a running QEMU writes is refused (one line suggesting
--force-share), QEMU cannot open for writing an image sparsefs serves, and
read-only qemu tools keep working alongside.  ``--force-share`` takes no locks.

The mount: read-only, files 0444 and the directory 0555 owned by the mounting
user, ``default_permissions`` always, ``allow_other`` only on request; every
kind of write fails with EROFS.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sparsefs.errors import ImageLockedError
from sparsefs.formats.qcow2 import open_image
from sparsefs.options import OpenOptions
from support import (
    MiB,
    daemon_pid,
    files_equal,
    force_unmount,
    is_mounted,
    make_image,
    mount_entry,
    mounted,
    one_line_error,
    qemu_img_create,
    qemu_io,
    qemu_raw,
    run,
    sparsefs,
)

Mount = Callable[..., Path]


# -- lock helpers -----------------------------------------------------------------------


def lock_bytes(path: Path) -> list[int]:
    """Byte offsets of the OFD locks on ``path`` (any holder), sorted, from /proc/locks."""
    st = os.stat(path)
    out: list[int] = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields or len(fields) < 8 or fields[1] != "OFDLCK":
                continue
            major, minor, inode = fields[5].split(":")
            if (int(inode), int(major, 16), int(minor, 16)) != (
                st.st_ino,
                os.major(st.st_dev),
                os.minor(st.st_dev),
            ):
                continue
            start, end = int(fields[6]), int(fields[7])
            out.extend(range(start, end + 1))
    return sorted(out)


@contextlib.contextmanager
def qemu_io_holding(
    path: Path, *, fmt: str = "qcow2", read_only: bool = False, force_share: bool = False
) -> Iterator[None]:
    """qemu-io with ``path`` open (interactive, commands from a pipe) for the body."""
    cmd = ["qemu-io", "-f", fmt]
    if read_only:
        cmd.append("-r")
    if force_share:
        cmd.append("-U")
    proc = subprocess.Popen(
        [*cmd, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        proc.stdin.write("length\n")  # answered once the image is open
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line.startswith("qemu-io> "), f"qemu-io did not open {path}: {line}"
        yield
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()


@contextlib.contextmanager
def storage_daemon_writing(image: Path, tmp_path: Path) -> Iterator[None]:
    """qemu-storage-daemon exporting ``image`` writable over NBD (as a VM's disk would be)."""
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
            "--nbd-server",
            f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
            "--export",
            "type=nbd,id=e,node-name=q,writable=on",
        ]
    )
    pid = int(pidfile.read_text())
    try:
        yield
    finally:
        os.kill(pid, 15)
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)


def qemu_can_read(path: Path) -> bool:
    """Whether ``qemu-io -r`` (no -U) accepts to open the image now."""
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-r", "-c", "read -q 0 512", str(path)],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0 and "lock" not in proc.stderr + proc.stdout


def qemu_can_write(path: Path) -> tuple[bool, str]:
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -q -P 1 0 512", str(path)],
        capture_output=True,
        text=True,
    )
    out = proc.stderr + proc.stdout
    return proc.returncode == 0 and "lock" not in out, out


def wait_gone(pid: int | None) -> None:
    """Wait until a (daemon) process has exited, so its locks are released."""
    deadline = time.monotonic() + 20
    while pid is not None and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        status = (
            Path(f"/proc/{pid}/status").read_text() if os.path.exists(f"/proc/{pid}/status") else ""
        )
        if "zombie" in status:
            return
        time.sleep(0.05)


@pytest.fixture
def chain(tmp_path: Path) -> dict[str, Path]:
    """An overlay on a qcow2 base, an overlay on a raw base, and an image with a data file."""
    d = tmp_path
    base = make_image(d / "base.qcow2", 4 * MiB, seed=31, writes=6)
    top = make_image(
        d / "top.qcow2", 4 * MiB, seed=32, writes=4, backing="base.qcow2", backing_fmt="qcow2"
    )
    rawbase = d / "rawbase.img"
    run(["qemu-img", "convert", "-O", "raw", str(base), str(rawbase)])
    rawtop = make_image(
        d / "rawtop.qcow2", 4 * MiB, seed=33, writes=4, backing="rawbase.img", backing_fmt="raw"
    )
    ext = qemu_img_create(d / "ext.qcow2", 4 * MiB, f"data_file={d / 'ext.data'}")
    qemu_io(ext, "write -q -P 0x21 0 256k")
    return {
        "base": base,
        "top": top,
        "rawbase": rawbase,
        "rawtop": rawtop,
        "ext": ext,
        "extdata": d / "ext.data",
    }


# -- sparsefs takes qemu's locks -------------------------------------------------------------


def test_mount_holds_the_locks_qemu_io_r_holds(chain: dict[str, Path], tmp_path: Path) -> None:
    """For every file of three chains: the lock bytes of a sparsefs mount == those of qemu-io -r."""
    files = ["top", "base", "rawtop", "rawbase", "ext", "extdata"]
    assert all(lock_bytes(chain[f]) == [] for f in files)
    with mounted(tmp_path / "mnt", chain["top"], chain["rawtop"], chain["ext"]):
        ours = {f: lock_bytes(chain[f]) for f in files}
    for image in ("top", "rawtop", "ext"):
        with qemu_io_holding(chain[image], read_only=True):
            theirs = {f: lock_bytes(chain[f]) for f in files}
        for f in files:
            if theirs[f]:
                assert ours[f] == theirs[f], (f, ours[f], theirs[f])
    assert ours["top"] == [100, 201, 203]  # consistent read; write and resize not shared
    assert ours["extdata"] == [100, 203]
    assert ours["rawbase"] == [100]


@pytest.mark.parametrize("holder", ["qemu-io", "qemu-storage-daemon"])
def test_image_a_vm_writes_is_refused_and_force_share_overrides(
    holder: str, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "live.qcow2", 4 * MiB, seed=34, writes=6)
    expected = qemu_raw(image, tmp_path / "live.raw")
    holding = (
        qemu_io_holding(image) if holder == "qemu-io" else storage_daemon_writing(image, tmp_path)
    )
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        with holding:
            assert not qemu_can_read(image)  # qemu refuses too: same rule
            with pytest.raises(ImageLockedError, match="--force-share"):
                open_image(image)
            one_line_error(sparsefs("mount", str(image), str(mp)), str(image), "--force-share")
            assert not is_mounted(mp)
            one_line_error(sparsefs("info", str(image)), str(image), "--force-share")
            # --force-share reads it anyway, taking no locks at all.
            before = lock_bytes(image)
            sparsefs("mount", "--force-share", str(image), str(mp), check=True)
            assert lock_bytes(image) == before
            assert files_equal(mp / "live.raw", expected)
            sparsefs("umount", str(mp), check=True)
            # The mount(8) helper form spells it -o force_share.
            sparsefs(str(image), str(mp), "-o", "ro,force_share", check=True)
            assert files_equal(mp / "live.raw", expected)
            pid = daemon_pid(mp)
            sparsefs("umount", str(mp), check=True)
            wait_gone(pid)
        # Once the writer is gone, sparsefs opens it with its locks.
        with open_image(image):
            pass
    finally:
        force_unmount(mp)


def test_qemu_cannot_write_an_image_sparsefs_serves(chain: dict[str, Path], tmp_path: Path) -> None:
    """While mounted: qemu writers of the image, its backing file and data file are refused;
    qemu readers work; after umount writers work again."""
    mp = tmp_path / "mnt"
    try:
        with mounted(mp, chain["top"], chain["ext"]):
            pid = daemon_pid(mp)
            for name in ("top", "base", "ext"):
                ok, out = qemu_can_write(chain[name])
                assert not ok, (name, out)
                assert 'Failed to get "write" lock' in out, (name, out)
                assert qemu_can_read(chain[name]), name
            # Backups of the image straight from qemu keep working alongside.
            run(["qemu-img", "convert", "-O", "raw", str(chain["top"]), str(tmp_path / "t.raw")])
        wait_gone(pid)
        for name in ("top", "base", "ext"):
            ok, out = qemu_can_write(chain[name])
            assert ok, (name, out)
    finally:
        force_unmount(mp)


def test_readers_share_an_image(chain: dict[str, Path], tmp_path: Path) -> None:
    """Two mounts of one chain, qemu-io -r and qemu-img convert alongside: readers never clash."""
    with (
        mounted(tmp_path / "one", chain["top"]) as one,
        mounted(tmp_path / "two", chain["top"]) as two,
        qemu_io_holding(chain["top"], read_only=True),
    ):
        copy = qemu_raw(chain["top"], tmp_path / "top.raw")
        assert files_equal(one / "top.raw", copy)
        assert files_equal(two / "top.raw", copy)


@pytest.mark.parametrize("held", ["base", "rawbase", "extdata"])
def test_locks_on_backing_and_data_files_follow_qemu(
    held: str, chain: dict[str, Path], tmp_path: Path
) -> None:
    """A writer on a backing or data file: sparsefs refuses exactly when qemu-io -r refuses."""
    image = {"base": "top", "rawbase": "rawtop", "extdata": "ext"}[held]
    fmt = "qcow2" if held == "base" else "raw"
    with qemu_io_holding(chain[held], fmt=fmt):
        qemu_ok = qemu_can_read(chain[image])
        try:
            with open_image(chain[image]) as opened:
                opened.read(0, 4096)
            ours = True
        except ImageLockedError as exc:
            ours = False
            assert str(chain[held]) in str(exc)
        with open_image(chain[image], OpenOptions(force_share=True)):
            pass
    assert ours == qemu_ok, f"qemu-io -r {'opens' if qemu_ok else 'refuses'} {image}"


# -- the mount's permissions ------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "acc.qcow2", 4 * MiB, seed=35, writes=6)


def test_read_only_modes_and_owner(image: Path, mount: Mount) -> None:
    mp = mount(image)
    _, options = mount_entry(mp)
    assert "ro" in options
    assert "default_permissions" in options
    assert "allow_other" not in options
    assert f"user_id={os.getuid()}" in options
    st = os.stat(mp)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o555
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    st = os.stat(mp / "acc.raw")
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o444
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


def test_every_write_is_erofs(image: Path, mount: Mount) -> None:
    mp = mount(image)
    raw = mp / "acc.raw"
    before = image.read_bytes()
    attempts: list[tuple[str, Callable[[], object]]] = [
        ("open O_WRONLY", lambda: os.open(raw, os.O_WRONLY)),
        ("open O_RDWR", lambda: os.open(raw, os.O_RDWR)),
        ("open O_APPEND", lambda: os.open(raw, os.O_WRONLY | os.O_APPEND)),
        ("open O_TRUNC", lambda: os.open(raw, os.O_RDONLY | os.O_TRUNC)),
        ("create", lambda: os.open(mp / "new", os.O_WRONLY | os.O_CREAT, 0o644)),
        ("truncate", lambda: os.truncate(raw, 0)),
        ("unlink", lambda: os.unlink(raw)),
        ("rename", lambda: os.rename(raw, mp / "x.raw")),
        ("mkdir", lambda: os.mkdir(mp / "d")),
        ("symlink", lambda: os.symlink("acc.raw", mp / "l")),
        ("chmod", lambda: os.chmod(raw, 0o666)),
        ("chown", lambda: os.chown(raw, 0, 0)),
        ("utime", lambda: os.utime(raw, (0, 0))),
        ("setxattr", lambda: os.setxattr(raw, "user.x", b"1")),
    ]
    for what, attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, (what, info.value)
    assert image.read_bytes() == before


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_other_users_only_with_allow_other(image: Path) -> None:
    """Another user cannot even look without --allow-other; with it, can read, never write."""
    top = Path(tempfile.mkdtemp(prefix="sparsefs-access-"))
    try:
        top.chmod(0o755)
        shutil.copy(image, top / "acc.qcow2")
        probe = (
            "import errno, os, sys\n"
            "mp = sys.argv[1]\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "try:\n"
            "    data = open(os.path.join(mp, 'acc.raw'), 'rb').read(4096)\n"
            "except OSError as e:\n"
            "    print('read', errno.errorcode[e.errno]); sys.exit()\n"
            "print('read', len(data))\n"
            "try:\n"
            "    os.open(os.path.join(mp, 'acc.raw'), os.O_WRONLY)\n"
            "except OSError as e:\n"
            "    print('write', errno.errorcode[e.errno])\n"
        )

        def as_nobody(mp: Path) -> list[str]:
            proc = subprocess.run(
                ["python3", "-c", probe, str(mp)], capture_output=True, text=True, timeout=60
            )
            assert proc.returncode == 0, proc.stderr
            return proc.stdout.split()

        with mounted(top / "private", top / "acc.qcow2") as mp:
            assert as_nobody(mp) == ["read", "EACCES"]
        with mounted(top / "shared", top / "acc.qcow2", options=["--allow-other"]) as mp:
            assert "allow_other" in mount_entry(mp)[1]
            assert "default_permissions" in mount_entry(mp)[1]
            assert as_nobody(mp) == ["read", "4096", "write", "EROFS"]
    finally:
        for sub in ("private", "shared"):
            force_unmount(top / sub)
        shutil.rmtree(top, ignore_errors=True)
