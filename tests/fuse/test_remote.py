"""Remote targets for real, on loopback: an rsync daemon, and a tar stream through a pipe.

The rsync daemon is started by the test on 127.0.0.1 and stopped afterwards;
the tar stream is the recipe for ssh (``tar --sparse -cf - ... | ssh host tar -xf -``)
with the ssh hop left out.  Every copy is checked with ``sparsefs verify``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import MiB, make_image, qemu_data_bytes, qemu_io, qemu_map, sparsefs

Mount = Callable[..., Path]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def rsync_daemon(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An rsync daemon on 127.0.0.1 with a writable module "backup"; yields (url, its dir)."""
    dest = tmp_path / "remote"
    dest.mkdir()
    conf = tmp_path / "rsyncd.conf"
    conf.write_text(
        f"pid file = {tmp_path / 'rsyncd.pid'}\n"
        "use chroot = no\n"
        f"lock file = {tmp_path / 'rsyncd.lock'}\n"
        "[backup]\n"
        f"    path = {dest}\n"
        "    read only = no\n"
        "    uid = root\n"
        "    gid = root\n"
    )
    port = _free_port()
    log = tmp_path / "rsyncd.log"
    proc = subprocess.Popen(
        [
            "rsync",
            "--daemon",
            "--no-detach",
            f"--config={conf}",
            "--address=127.0.0.1",
            f"--port={port}",
            f"--log-file={log}",
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, "rsync daemon exited"
                assert time.monotonic() < deadline, "rsync daemon did not listen"
                time.sleep(0.05)
        yield f"rsync://127.0.0.1:{port}/backup/", dest
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _verify(image: Path, copy: Path) -> None:
    proc = sparsefs("verify", str(image), str(copy))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "vm.qcow2", 512 * MiB, seed=31, writes=40, max_len=MiB)


def test_rsync_sparse_to_daemon(image: Path, mount: Mount, rsync_daemon: tuple[str, Path]) -> None:
    url, remote = rsync_daemon
    mp = mount(image)
    subprocess.run(["rsync", "--sparse", str(mp / "vm.raw"), url], check=True)
    copy = remote / "vm.raw"
    _verify(image, copy)
    # The receiving side wrote holes: the copy stores about the data, not 512 MiB.
    assert copy.stat().st_blocks * 512 <= qemu_data_bytes(qemu_map(image)) + 2 * MiB


def test_rsync_incremental_sends_only_changed_blocks(
    image: Path, mount: Mount, rsync_daemon: tuple[str, Path], tmp_path: Path
) -> None:
    url, remote = rsync_daemon
    mp = mount(image)
    subprocess.run(["rsync", "--times", "--sparse", str(mp / "vm.raw"), url], check=True)
    sparsefs("umount", str(mp), check=True)
    # The VM writes 1 MiB somewhere; the next night's run sends only what changed.
    changed = MiB
    qemu_io(image, f"write -q -P 0x77 {300 * MiB} {changed}")
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    mp2 = mount(image)
    proc = subprocess.run(
        ["rsync", "--times", "--inplace", "--no-whole-file", "--stats", str(mp2 / "vm.raw"), url],
        check=True,
        capture_output=True,
        text=True,
    )
    literal = int(
        re.search(r"Literal data: ([\d,]+) bytes", proc.stdout)
        .group(1)  # type: ignore[union-attr]  # rsync always prints these lines
        .replace(",", "")
    )
    sent = int(
        re.search(r"Total bytes sent: ([\d,]+)", proc.stdout)
        .group(1)  # type: ignore[union-attr]  # rsync always prints these lines
        .replace(",", "")
    )
    print(f"incremental rsync: literal data {literal} bytes, total sent {sent} bytes")
    assert changed <= literal <= changed + 256 * 1024, literal
    assert sent < 4 * changed
    _verify(image, remote / "vm.raw")


def test_tar_sparse_stream_through_a_pipe(image: Path, mount: Mount, tmp_path: Path) -> None:
    mp = mount(image)
    dest = tmp_path / "other-host"
    dest.mkdir()
    sender = subprocess.Popen(
        ["tar", "--sparse", "-cf", "-", "-C", str(mp), "vm.raw"], stdout=subprocess.PIPE
    )
    receiver = subprocess.run(["tar", "-xf", "-", "-C", str(dest)], stdin=sender.stdout)
    assert sender.stdout is not None
    sender.stdout.close()
    assert sender.wait() == 0
    assert receiver.returncode == 0
    copy = dest / "vm.raw"
    _verify(image, copy)
    assert copy.stat().st_blocks * 512 <= qemu_data_bytes(qemu_map(image)) + 2 * MiB
