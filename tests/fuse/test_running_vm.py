"""Backing up a running VM through QEMU's external snapshots, over QMP.

qemu-storage-daemon stands in for the VM: it opens the image read-write,
serves it as a writable NBD export, and has a QMP monitor.  A writer keeps
writing through the export the whole time.  The flow: blockdev-snapshot-sync
(the base becomes read-only, writes go to an overlay), ``sparsefs backup`` of
the base without --force-share, block-commit + job-complete (pivot back).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import KiB, MiB, files_equal, make_image, qemu_raw, run, sparsefs

from sparsefs.qmp import QMPClient, QMPError

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None, reason="needs qemu-storage-daemon"
)

SIZE = 32 * MiB


class VM:
    """A qemu-storage-daemon with a QMP socket and a writable NBD export of node ``disk``."""

    def __init__(self, image: Path, workdir: Path) -> None:
        self.qmp_sock = workdir / "qmp.sock"
        self.nbd_sock = workdir / "nbd.sock"
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--chardev", f"socket,id=c,path={self.qmp_sock},server=on,wait=off",
             "--monitor", "chardev=c",
             "--blockdev", f"driver=file,node-name=f,filename={image}",
             "--blockdev", "driver=qcow2,node-name=disk,file=f",
             "--nbd-server", f"addr.type=unix,addr.path={self.nbd_sock}",
             "--export", "type=nbd,id=e,node-name=disk,name=disk,writable=on"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 20
        while not (self.qmp_sock.exists() and self.nbd_sock.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"qemu-storage-daemon did not start: {self.proc.stderr}")
            time.sleep(0.05)

    @property
    def nbd_uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.nbd_sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                with QMPClient(str(self.qmp_sock), timeout=5) as qmp:
                    qmp.execute("quit")
                self.proc.wait(timeout=10)
            except (QMPError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc.communicate()


class Writer(threading.Thread):
    """Keeps writing 64 KiB patterns at random offsets through the NBD export."""

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.rounds = 0
        self.error: str | None = None
        self._halt = threading.Event()
        self._rng = random.Random(7)

    def run(self) -> None:
        while not self._halt.is_set():
            cmds: list[str] = []
            for _ in range(8):
                offset = self._rng.randrange(0, SIZE // (64 * KiB)) * 64 * KiB
                cmds += ["-c", f"write -q -P {self._rng.randrange(1, 255)} {offset} 64k"]
            proc = subprocess.run(["qemu-io", "-f", "raw", *cmds, self.uri],
                                  capture_output=True, text=True)
            if proc.returncode != 0 or proc.stdout.strip() or proc.stderr.strip():
                self.error = proc.stdout + proc.stderr
                return
            self.rounds += 1

    def wait_rounds(self, more: int) -> None:
        target = self.rounds + more
        deadline = time.monotonic() + 60
        while self.rounds < target:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, "writer made no progress"
            time.sleep(0.02)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=30)
        assert self.error is None, self.error


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[tuple[Path, VM, Writer]]:
    image = make_image(tmp_path / "vm.qcow2", SIZE, seed=91, writes=10, max_len=MiB)
    machine = VM(image, tmp_path)
    writer = Writer(machine.nbd_uri)
    writer.start()
    try:
        yield image, machine, writer
    finally:
        writer.stop()
        machine.stop()


def test_snapshot_backup_commit_while_writing(
    vm: tuple[Path, VM, Writer], tmp_path: Path, mount: Callable[..., Path]
) -> None:
    image, machine, writer = vm
    overlay = tmp_path / "vm.overlay.qcow2"
    writer.wait_rounds(2)
    with QMPClient(str(machine.qmp_sock)) as qmp:
        qmp.snapshot("disk", str(overlay), "top")
        # The base at snapshot time: nobody writes it any more.
        at_snapshot = qemu_raw(image, tmp_path / "at-snapshot.raw", fmt="qcow2")
        writer.wait_rounds(3)  # the VM goes on writing, into the overlay

        dest = tmp_path / "backup"
        dest.mkdir()
        proc = sparsefs("backup", str(image), str(dest))  # no --force-share
        assert proc.returncode == 0, proc.stderr
        assert files_equal(dest / "vm.raw", at_snapshot)
        writer.wait_rounds(2)

        # Commit while sparsefs has the base mounted: QEMU is refused, sparsefs unharmed.
        mp = mount(image)
        with pytest.raises(QMPError, match="lock") as refused:
            qmp.commit("top", "commit0", timeout=30)
        assert files_equal(mp / "vm.raw", at_snapshot)
        sparsefs("umount", str(mp), check=True)
        assert qmp.job("commit0") is None

        # Now the commit goes through and QEMU pivots back to the base.
        writer.wait_rounds(2)
        qmp.commit("top", "commit1", timeout=60)
        writer.wait_rounds(3)  # writes now land in the base again
        nodes = {n["node-name"]: n for n in qmp.execute("query-named-block-nodes")}
        assert "top" not in nodes
    writer.stop()
    final = run(["qemu-img", "convert", "-f", "raw", "-O", "raw", machine.nbd_uri,
                 str(tmp_path / "final.raw")])
    assert final.returncode == 0
    machine.stop()
    committed = qemu_raw(image, tmp_path / "committed.raw", fmt="qcow2")
    assert files_equal(committed, tmp_path / "final.raw")
    assert not files_equal(committed, at_snapshot)
