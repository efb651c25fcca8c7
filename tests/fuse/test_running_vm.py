"""Backing up a running VM through QEMU's external snapshots, over QMP.

qemu-storage-daemon stands in for the VM: it opens the image read-write,
serves it as a writable NBD export, and has a QMP monitor.  A writer keeps
writing through the export the whole time.  The flow: blockdev-snapshot-sync
(the base becomes read-only, writes go to an overlay), ``sparsefs backup`` of
the base without --force-share, block-commit + job-complete (pivot back).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from points_support import latest_file, manifest
from sparsefs.qmp import QMPClient, QMPError
from support import (
    REPO,
    KiB,
    MiB,
    files_equal,
    make_image,
    one_line_error,
    qemu_raw,
    run,
    sparsefs,
)

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None, reason="needs qemu-storage-daemon"
)

SIZE = 32 * MiB
BLOCK = 64 * KiB
PROMPT = b"qemu-io> "


class VM:
    """A qemu-storage-daemon with a QMP socket and a writable NBD export of node ``disk``."""

    def __init__(self, image: Path, workdir: Path) -> None:
        self.qmp_sock = workdir / "qmp.sock"
        self.nbd_sock = workdir / "nbd.sock"
        self.proc = subprocess.Popen(
            [
                "qemu-storage-daemon",
                "--chardev",
                f"socket,id=c,path={self.qmp_sock},server=on,wait=off",
                "--monitor",
                "chardev=c",
                "--blockdev",
                f"driver=file,node-name=f,filename={image}",
                "--blockdev",
                "driver=qcow2,node-name=disk,file=f",
                "--nbd-server",
                f"addr.type=unix,addr.path={self.nbd_sock}",
                "--export",
                "type=nbd,id=e,node-name=disk,name=disk,writable=on",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
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
        if self.proc.stdout is None or self.proc.stdout.closed:
            return  # stopped before
        if self.proc.poll() is None:
            try:
                with QMPClient(str(self.qmp_sock), timeout=5) as qmp:
                    qmp.execute("quit")
                self.proc.wait(timeout=10)
            except (QMPError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        _, err = self.proc.communicate()
        # A daemon that died on its own (not by our quit or kill) is a failure worth its words.
        assert self.proc.returncode in (0, -signal.SIGKILL), (
            f"qemu-storage-daemon exited {self.proc.returncode}: {err}"
        )


class Writer(threading.Thread):
    """Keeps writing 64 KiB patterns at random offsets through the NBD export.

    One qemu-io process, one NBD connection, for the whole run, as a VM's disk
    is one long-lived client.  (A new qemu-io per round connects while QEMU
    completes a commit job; QEMU 7.2 then can abort in mirror_run with
    ``QLIST_EMPTY(&bs->tracked_requests)``: measured here, about one commit
    in 30.  That is QEMU's race between its drained section and a new NBD
    client, not something a guest's disk does.)

    ``log`` holds every write in the order issued, as (offset, pattern byte).
    """

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.rounds = 0
        self.error: str | None = None
        self.log: list[tuple[int, int]] = []
        self.total = 0  # writes issued since the start (the log is cleared on resume)
        self._halt = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._idle = threading.Event()
        self._rng = random.Random(7)

    @staticmethod
    def _answer(io: subprocess.Popen[bytes], line: str | None) -> str:
        """Send ``line`` (None: nothing) and return qemu-io's output up to its next prompt.

        qemu-io takes one command per prompt: several lines written at once
        wait in its buffer, so commands go one at a time.
        """
        assert io.stdin is not None
        assert io.stdout is not None
        if line is not None:
            os.write(io.stdin.fileno(), line.encode() + b"\n")
        out = b""
        while not out.endswith(PROMPT):
            chunk = os.read(io.stdout.fileno(), 4096)
            if not chunk:
                return out.decode(errors="replace") + " (qemu-io ended)"
            out += chunk
        return out[: -len(PROMPT)].decode(errors="replace")

    def _round(self, io: subprocess.Popen[bytes]) -> str | None:
        """Issue 8 writes; what qemu-io said, if it was not silent (-q)."""
        said = ""
        for _ in range(8):
            offset = self._rng.randrange(0, SIZE // BLOCK) * BLOCK
            pattern = self._rng.randrange(1, 255)
            self.log.append((offset, pattern))
            self.total += 1
            said += self._answer(io, f"write -q -P {pattern} {offset} {BLOCK}")
        return said or None

    def run(self) -> None:
        io = subprocess.Popen(
            ["qemu-io", "-f", "raw", self.uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            self.error = self._answer(io, None) or None  # the first prompt
            while not self._halt.is_set() and self.error is None:
                if not self._running.is_set():
                    self._idle.set()
                    self._running.wait(0.1)
                    continue
                self._idle.clear()
                self.error = self._round(io)
                if self.error is None:
                    self.rounds += 1
        finally:
            assert io.stdin is not None
            assert io.stdout is not None
            with contextlib.suppress(OSError):
                io.stdin.close()
            try:
                io.wait(timeout=10)
            except subprocess.TimeoutExpired:
                io.kill()
                io.wait()
            io.stdout.close()

    def pause(self) -> None:
        self._running.clear()
        assert self._idle.wait(30), "writer did not pause"

    def resume(self) -> None:
        self.log.clear()
        self._running.set()

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


def consistent_prefix(start: bytes, log: list[tuple[int, int]], got: bytes) -> list[int]:
    """Every k such that ``got`` equals ``start`` with the first k writes of ``log`` applied."""
    n = len(log)
    allowed = [True] * (n + 1)
    blocks: dict[int, list[int]] = {}
    for index, (offset, _) in enumerate(log):
        blocks.setdefault(offset, []).append(index)
    for offset in range(0, len(start), BLOCK):
        mine = got[offset : offset + BLOCK]
        writes = blocks.get(offset, [])
        # Version v of the block holds for k in [end of write v, start of write v+1].
        ok = [False] * (n + 1)
        bounds = [-1, *writes, n]
        for v in range(len(writes) + 1):
            if v == 0:
                value = start[offset : offset + BLOCK]
            else:
                value = bytes([log[writes[v - 1]][1]]) * BLOCK
            if mine == value:
                for k in range(bounds[v] + 1, bounds[v + 1] + 1):
                    ok[k] = True
        allowed = [a and b for a, b in zip(allowed, ok, strict=True)]
    return [k for k, a in enumerate(allowed) if a]


@contextlib.contextmanager
def running(image: Path, workdir: Path) -> Iterator[tuple[Path, VM, Writer]]:
    """The VM on ``image`` with the writer writing; both stopped afterwards."""
    machine = VM(image, workdir)
    writer = Writer(machine.nbd_uri)
    writer.start()
    try:
        yield image, machine, writer
    finally:
        try:
            writer.stop()
        finally:
            machine.stop()


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[tuple[Path, VM, Writer]]:
    image = make_image(tmp_path / "vm.qcow2", SIZE, seed=91, writes=10, max_len=MiB)
    with running(image, tmp_path) as parts:
        yield parts


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
        assert files_equal(latest_file(dest, "vm"), at_snapshot)
        writer.wait_rounds(2)

        # Commit while sparsefs has the base mounted: QEMU is refused, sparsefs unharmed.
        mp = mount(image)
        with pytest.raises(QMPError, match="lock"):
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
    final = run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            machine.nbd_uri,
            str(tmp_path / "final.raw"),
        ]
    )
    assert final.returncode == 0
    machine.stop()
    committed = qemu_raw(image, tmp_path / "committed.raw", fmt="qcow2")
    assert files_equal(committed, tmp_path / "final.raw")
    assert not files_equal(committed, at_snapshot)


LIVE = [sys.executable, "-m", "sparsefs", "backup"]


def test_backup_qmp_snapshots_backs_up_and_commits(
    vm: tuple[Path, VM, Writer], tmp_path: Path
) -> None:
    image, machine, writer = vm
    writer.wait_rounds(2)
    writer.pause()
    start = run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            machine.nbd_uri,
            str(tmp_path / "start.raw"),
        ]
    )
    assert start.returncode == 0
    writer.resume()
    writer.wait_rounds(1)
    dest = tmp_path / "backup"
    dest.mkdir()
    proc = subprocess.run(
        [*LIVE, "--qmp", str(machine.qmp_sock), "--node", "disk", str(image), str(dest)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    writer.wait_rounds(2)
    log = list(writer.log)
    # The copy is the disk at one instant: the start plus a prefix of the writes since.
    got = latest_file(dest, "vm").read_bytes()
    prefixes = consistent_prefix((tmp_path / "start.raw").read_bytes(), log, got)
    assert prefixes, "the backup is not the disk at any one instant"
    assert prefixes[0] > 0, "the backup should hold some of the writes made before it"
    assert prefixes[-1] < len(log), "writes after the snapshot must not be in the backup"
    # Committed back and pivoted: no overlay node, no overlay file, the VM writes to the base.
    with QMPClient(str(machine.qmp_sock)) as qmp:
        names = [n["node-name"] for n in qmp.execute("query-named-block-nodes")]
        assert not [n for n in names if n.startswith("sparsefs-overlay")], names
        assert qmp.execute("query-jobs") == []
    assert not list(image.parent.glob(".vm.qcow2.sparsefs-overlay-*"))
    writer.stop()
    final = tmp_path / "final.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", machine.nbd_uri, str(final)])
    machine.stop()
    assert files_equal(qemu_raw(image, tmp_path / "committed.raw", fmt="qcow2"), final)


def test_backup_qmp_commits_even_when_the_backup_fails(
    vm: tuple[Path, VM, Writer], tmp_path: Path
) -> None:
    image, machine, writer = vm
    writer.wait_rounds(1)
    missing = tmp_path / "no-such-dir"
    proc = subprocess.run(
        [*LIVE, "--qmp", str(machine.qmp_sock), "--node", "disk", str(image), str(missing)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    one_line_error(proc, "destination directory does not exist")
    # A failure inside the snapshot window (the bitmap is missing) still commits.
    dest = tmp_path / "backup"
    dest.mkdir()
    proc = subprocess.run(
        [
            *LIVE,
            "--qmp",
            str(machine.qmp_sock),
            "--node",
            "disk",
            "--since",
            "nope",
            str(image),
            str(dest),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    one_line_error(proc, "no bitmap named 'nope'")
    with QMPClient(str(machine.qmp_sock)) as qmp:
        names = [n["node-name"] for n in qmp.execute("query-named-block-nodes")]
    assert not [n for n in names if n.startswith("sparsefs-overlay")], names
    assert not list(image.parent.glob(".vm.qcow2.sparsefs-overlay-*"))
    # A node that is not this image: refused before any snapshot.
    other = make_image(tmp_path / "other.qcow2", SIZE, seed=92, writes=1)
    proc = subprocess.run(
        [*LIVE, "--qmp", str(machine.qmp_sock), "--node", "disk", str(other), str(dest)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    one_line_error(proc, "not this image")
    # A protocol node over the image file: refused before any snapshot.
    proc = subprocess.run(
        [*LIVE, "--qmp", str(machine.qmp_sock), "--node", "f", str(image), str(dest)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    one_line_error(proc, "not the qcow2 format node")
    writer.wait_rounds(1)


def test_backup_qmp_since_bitmap_of_a_running_vm(tmp_path: Path) -> None:
    """--qmp with --since, two nights: QEMU stores the bitmap when the base turns read-only,
    and sparsefs rotates it over QMP so that the window's writes reach the next run."""
    image = make_image(tmp_path / "vm.qcow2", SIZE, seed=93, writes=10, max_len=MiB)
    dest = tmp_path / "backup"
    dest.mkdir()
    run([*LIVE, "-q", str(image), str(dest)])  # the full point, the VM not yet running
    run(["qemu-img", "bitmap", "--add", str(image), "nightly"])
    snapshot_at = 0  # writes issued before the last snapshot, at least
    with running(image, tmp_path) as (_, machine, writer):
        for night in range(2):
            writer.wait_rounds(2)
            writer.pause()
            start = tmp_path / f"start{night}.raw"
            run(["qemu-img", "convert", "-f", "raw", "-O", "raw", machine.nbd_uri, str(start)])
            resumed_at = writer.total
            writer.resume()
            writer.wait_rounds(1)
            proc = subprocess.run(
                [
                    *LIVE,
                    "--qmp",
                    str(machine.qmp_sock),
                    "--node",
                    "disk",
                    "--since",
                    "nightly",
                    "--json",
                    str(image),
                    str(dest),
                ],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            assert proc.returncode == 0, proc.stderr
            writer.wait_rounds(2)  # these writes must show up in the next night's bitmap
            log = list(writer.log)
            (entry,) = json.loads(proc.stdout)["files"]
            assert entry["changes"] == "bitmap"
            copy = qemu_raw(latest_file(dest, "vm"), tmp_path / f"night{night}.raw", fmt="qcow2")
            prefixes = consistent_prefix(start.read_bytes(), log, copy.read_bytes())
            assert prefixes, f"night {night}: the copy is not the disk at any one instant"
            assert prefixes[-1] < len(log)
            dirty = entry["dirty-bytes"]
            if night == 1:
                # Rotated: only writes after night 0's snapshot are dirty, not the older ones.
                assert dirty <= BLOCK * (resumed_at + len(log) - snapshot_at), dirty
            snapshot_at = resumed_at + prefixes[0]
            run(
                [sys.executable, "-m", "sparsefs", "checksum", "--check", "SPARSEFS-SUMS"], cwd=dest
            )
        with QMPClient(str(machine.qmp_sock)) as qmp:
            disk = next(
                n for n in qmp.execute("query-named-block-nodes") if n["node-name"] == "disk"
            )
            names = [b["name"] for b in disk.get("dirty-bitmaps", [])]
        assert names == ["nightly"], names  # the temporary window bitmaps are gone


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_backup_qmp_commits_on_interrupt(
    vm: tuple[Path, VM, Writer], tmp_path: Path, signum: int
) -> None:
    """Ctrl-C or SIGTERM in the middle of the backup: the overlay is still committed back.

    The backup is held in the middle by a full pipe as its --progress descriptor.
    """
    image, machine, writer = vm
    writer.wait_rounds(1)
    dest = tmp_path / "backup"
    dest.mkdir()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_end, b"x" * 4096)
    os.set_blocking(write_end, True)
    proc = subprocess.Popen(
        [
            *LIVE,
            "--qmp",
            str(machine.qmp_sock),
            "--node",
            "disk",
            "--progress",
            str(write_end),
            str(image),
            str(dest),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        pass_fds=(write_end,),
    )
    os.close(write_end)
    try:
        deadline = time.monotonic() + 30
        while True:
            with QMPClient(str(machine.qmp_sock)) as qmp:
                names = [n["node-name"] for n in qmp.execute("query-named-block-nodes")]
            if any(n.startswith("sparsefs-overlay") for n in names):
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no snapshot was taken"
            time.sleep(0.05)
        writer.wait_rounds(1)  # the VM writes into the overlay meanwhile
        assert proc.poll() is None, "the backup should be held by the full pipe"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(read_end)
    one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), "interrupted")
    assert proc.returncode == 130
    with QMPClient(str(machine.qmp_sock)) as qmp:
        names = [n["node-name"] for n in qmp.execute("query-named-block-nodes")]
        assert not [n for n in names if n.startswith("sparsefs-overlay")], names
        assert qmp.execute("query-jobs") == []
    assert not list(image.parent.glob(".vm.qcow2.sparsefs-overlay-*"))
    names = sorted(p.name for p in dest.iterdir())
    assert names == [".SPARSEFS-SET.lock", "SPARSEFS-SET.json"], "no partial point"
    assert manifest(dest)["disks"] == {}
    writer.wait_rounds(1)
    writer.stop()
    final = tmp_path / "final.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", machine.nbd_uri, str(final)])
    machine.stop()
    assert files_equal(qemu_raw(image, tmp_path / "committed.raw", fmt="qcow2"), final)
