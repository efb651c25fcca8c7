"""mount(8), mount.fuse3 and fstab: the standard way administrators mount things.

mount(8) runs ``mount.fuse3``, which runs ``sparsefs SOURCE MOUNTPOINT -o OPTIONS``
with a fixed PATH; tools/setup (as root) links /usr/local/bin/sparsefs for it.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from support import (
    REPO,
    MiB,
    check_stored,
    daemon_pid,
    files_equal,
    force_unmount,
    host_files_of,
    is_mounted,
    make_image,
    mount_entry,
    qemu_map,
    qemu_raw,
    seek_walk,
    sparsefs,
)

LINK = Path("/usr/local/bin/sparsefs")
VENV_SPARSEFS = REPO / ".venv" / "bin" / "sparsefs"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) of a FUSE type needs root")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "vm.qcow2", 64 * MiB, seed=21, writes=25)


def _check_mounted_file(mp: Path, image: Path, tmp_path: Path) -> None:
    raw = mp / "vm.raw"
    assert files_equal(raw, qemu_raw(image, tmp_path / "ref.raw"))
    check_stored(seek_walk(raw), qemu_map(image), host_files_of(image))


def test_setup_links_the_command_for_mount() -> None:
    assert LINK.is_symlink(), "tools/setup (as root) links /usr/local/bin/sparsefs"
    assert LINK.resolve() == VENV_SPARSEFS.resolve()


def test_mount_t_fuse_sparsefs(image: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "fuse.sparsefs", "-o", "ro,allow_other", str(image), str(mp)],
            check=True,
            capture_output=True,
            text=True,
        )
        assert is_mounted(mp)
        fstype, opts = mount_entry(mp)
        assert fstype == "fuse.sparsefs"
        assert "ro" in opts
        assert "allow_other" in opts
        assert "default_permissions" in opts
        _check_mounted_file(mp, image, tmp_path)
        subprocess.run(["umount", str(mp)], check=True)
        assert not is_mounted(mp)
    finally:
        force_unmount(mp)


def test_mount_without_ro_is_still_read_only(image: Path, tmp_path: Path) -> None:
    """mount(8) passes "rw" when not told "ro"; the mount is read-only anyway."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        subprocess.run(["mount", "-t", "fuse.sparsefs", str(image), str(mp)], check=True)
        assert "ro" in mount_entry(mp)[1]
        assert "allow_other" not in mount_entry(mp)[1]
        with pytest.raises(OSError):
            open(mp / "vm.raw", "r+b")  # noqa: SIM115  # must fail: nothing to close
    finally:
        force_unmount(mp)


def test_fuse_type_with_program_path(image: Path, tmp_path: Path) -> None:
    """The ``-t fuse PROGRAM#SOURCE`` form needs no PATH entry at all."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "fuse", "-o", "ro", f"{VENV_SPARSEFS}#{image}", str(mp)], check=True
        )
        _check_mounted_file(mp, image, tmp_path)
    finally:
        force_unmount(mp)


def test_fstab_line(image: Path, tmp_path: Path) -> None:
    """An fstab entry (given to mount(8) with --fstab) mounts by mountpoint alone."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{image} {mp} fuse.sparsefs ro,noauto,nofail,_netdev,busy_poll=0 0 0\n")
    try:
        subprocess.run(["mount", "--fstab", str(fstab), str(mp)], check=True)
        _check_mounted_file(mp, image, tmp_path)
        subprocess.run(["umount", str(mp)], check=True)
        assert not is_mounted(mp)
    finally:
        force_unmount(mp)


def test_mount_helper_errors_are_one_line(tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = sparsefs(str(tmp_path / "missing.qcow2"), str(mp), "-o", "ro")
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1
    assert "missing.qcow2" in proc.stderr
    proc = sparsefs(str(tmp_path / "x.qcow2"), str(mp), "-o", "ro,frobnicate")
    assert proc.returncode != 0
    assert "frobnicate" in proc.stderr
    assert not is_mounted(mp)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def test_umount8_after_helper_mount_leaves_no_daemon(image: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "fuse.sparsefs", "-o", "ro", str(image), str(mp)], check=True
        )
        pid = daemon_pid(mp)
        assert pid is not None
        subprocess.run(["umount", str(mp)], check=True)
        assert not is_mounted(mp)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the daemon did not exit after umount"
    finally:
        force_unmount(mp)
