"""Process and file faults through a real mount: never silently wrong or short data.

- The daemon SIGKILLed while a reader has the file open: the reader gets an
  error (never a short file that looks complete), ``sparsefs mount`` on the
  dead mountpoint says so in one line, ``sparsefs umount`` cleans it up even
  while the dead file is still open, and a new mount there works.
- SIGTERM during a copy: the copy fails with an error, or it completed with
  exactly qemu's bytes.
- The source image truncated while mounted: EIO for what is gone, exact bytes
  for the rest, the daemon keeps serving; replaced (renamed over) while
  mounted: the daemon keeps the file it opened, so the old content is served.
- The corrupt bit refuses the mount unless --force.
- Hostile images through the mount (deterministic mutants and seeded random
  ones from tests/hostile_images.py): EIO exactly where reading in-process
  fails, the same bytes everywhere else, the same SEEK_DATA/SEEK_HOLE map,
  and the daemon survives them all.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from hostile_images import (
    COPIED,
    ZERO,
    Mutator,
    build_bases,
    locate,
    put,
)
from sparsefs.errors import ImageReadError, SparsefsError
from sparsefs.formats.qcow2 import open_image
from support import (
    KiB,
    MiB,
    daemon_pid,
    files_equal,
    force_unmount,
    is_mounted,
    make_image,
    mounted,
    qemu_io,
    qemu_raw,
    seek_walk,
    sparsefs,
)

Mount = Callable[..., Path]

# Reads the file in 1 MiB steps; after the first step it reports on fd R and
# waits for a byte on fd G.  Prints DONE <bytes> <sha256>, ERROR <errno> <pos>,
# or EOF <pos> (a short file: the failure this module exists to rule out).
READER = r"""
import hashlib, os, sys
path, ready, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
digest = hashlib.sha256()
pos = 0
try:
    while pos < size:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            print("EOF", pos)
            sys.exit()
        digest.update(chunk)
        if pos == 0:
            os.write(ready, b"r")
            os.read(go, 1)
        pos += len(chunk)
except OSError as exc:
    print("ERROR", exc.errno, pos)
    sys.exit()
print("DONE", pos, digest.hexdigest())
"""


class PausedReader:
    """A reader process stopped after its first MiB until :meth:`resume`."""

    def __init__(self, path: Path) -> None:
        self._ready_r, ready_w = os.pipe()
        go_r, self._go_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER, str(path), str(ready_w), str(go_r)],
            pass_fds=(ready_w, go_r),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(ready_w)
        os.close(go_r)
        got = os.read(self._ready_r, 1)
        assert got == b"r", self.proc.communicate()

    def resume(self) -> list[str]:
        os.write(self._go_w, b"g")
        out, err = self.proc.communicate(timeout=120)
        os.close(self._ready_r)
        os.close(self._go_w)
        assert self.proc.returncode == 0, err
        return out.split()


def assert_error_or_exact(result: list[str], reference: Path) -> None:
    """The reader failed with an errno, or read every byte exactly: never short."""
    assert result[0] in ("ERROR", "DONE"), f"silently short read: {result}"
    if result[0] == "DONE":
        assert int(result[1]) == reference.stat().st_size
        assert result[2] == hashlib.sha256(reference.read_bytes()).hexdigest()
    else:
        assert int(result[1]) in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO), result


def pread_full(fd: int, length: int, offset: int) -> bytes | None:
    """Read like cp does: short reads continue where they stopped; None on EIO.

    A read that meets a broken range returns the bytes before it (a short
    count); the next read, starting in the broken range, fails with EIO.
    Only a zero-length read (EOF) can make the result shorter than asked.
    """
    buf = b""
    while len(buf) < length:
        try:
            part = os.pread(fd, length - len(buf), offset + len(buf))
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
            return None
        if not part:
            break
        buf += part
    return buf


def wait_exit(pid: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        if "zombie" in status:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not exit")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An image with 48 MiB of data (so a copy is in flight for a while) and its qemu raw."""
    d = tmp_path_factory.mktemp("faults")
    image = make_image(d / "big.qcow2", 96 * MiB, seed=41, writes=0, zero_writes=0, discards=0)
    qemu_io(image, *(f"write -q -P {i + 1} {i * 2}M 1M" for i in range(48)))
    return image, qemu_raw(image, d / "big.raw")


# -- the daemon dies ------------------------------------------------------------------------


def test_sigkill_while_reading_then_umount_and_remount(
    big: tuple[Path, Path], tmp_path: Path
) -> None:
    image, reference = big
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        sparsefs("mount", str(image), str(mp), check=True)
        pid = daemon_pid(mp)
        assert pid is not None
        reader = PausedReader(mp / "big.raw")
        # Another reader keeps the file open across the kill and the umount.
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; f = open(sys.argv[1], 'rb'); sys.stdin.read()",
                str(mp / "big.raw"),
            ],
            stdin=subprocess.PIPE,
        )
        os.kill(pid, signal.SIGKILL)
        wait_exit(pid)
        assert_error_or_exact(reader.resume(), reference)
        assert is_mounted(mp)  # the dead mount is still there
        proc = sparsefs("mount", str(image), str(mp))
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip() == (
            f"sparsefs: {mp}: a dead mount is left here; run 'sparsefs umount {mp}'"
        )
        sparsefs("umount", str(mp), check=True)  # despite the file still open on it
        assert not is_mounted(mp)
        sparsefs("mount", str(image), str(mp), check=True)
        assert files_equal(mp / "big.raw", reference)
        sparsefs("umount", str(mp), check=True)
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    finally:
        force_unmount(mp)


def test_sigterm_during_copy_is_an_error_or_a_complete_copy(
    big: tuple[Path, Path], tmp_path: Path
) -> None:
    image, reference = big
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        # A reader paused mid-file when the daemon is told to stop.
        sparsefs("mount", str(image), str(mp), check=True)
        pid = daemon_pid(mp)
        assert pid is not None
        reader = PausedReader(mp / "big.raw")
        os.kill(pid, signal.SIGTERM)
        wait_exit(pid)
        assert_error_or_exact(reader.resume(), reference)
        if is_mounted(mp):
            sparsefs("umount", str(mp), check=True)
        # cp in flight when the daemon is told to stop.
        sparsefs("mount", str(image), str(mp), check=True)
        pid = daemon_pid(mp)
        assert pid is not None
        copy = tmp_path / "copy.raw"
        cp = subprocess.Popen(
            ["cp", "--sparse=always", str(mp / "big.raw"), str(copy)],
            stderr=subprocess.PIPE,
            text=True,
        )
        while not copy.exists() and cp.poll() is None:
            time.sleep(0.001)
        os.kill(pid, signal.SIGTERM)
        _, err = cp.communicate(timeout=120)
        if cp.returncode == 0:
            assert files_equal(copy, reference), "cp succeeded with wrong bytes"
        else:
            assert err.strip(), "cp failed without saying why"
        wait_exit(pid)
    finally:
        force_unmount(mp)


# -- the image changes under the mount --------------------------------------------------------


def test_image_truncated_while_mounted_is_eio_not_wrong_bytes(tmp_path: Path, mount: Mount) -> None:
    image = make_image(
        tmp_path / "shrink.qcow2",
        8 * MiB,
        seed=42,
        options=["cluster_size=4096"],
        writes=0,
        zero_writes=0,
        discards=0,
    )
    qemu_io(image, *(f"write -q -P {0x30 + i} {i * 2 + 1}M 192k" for i in range(4)))
    reference = qemu_raw(image, tmp_path / "shrink.raw").read_bytes()
    mp = mount(image)
    os.truncate(image, sorted(locate(image).l2_tables)[1])
    failed = 0
    fd = os.open(mp / "shrink.raw", os.O_RDONLY)
    try:
        for off in range(0, len(reference), 64 * KiB):
            got = pread_full(fd, 64 * KiB, off)
            if got is None:
                failed += 1
                continue
            assert got == reference[off : off + 64 * KiB], f"wrong bytes at {off}"
        assert failed > 0
        # Still serving: the first MiB (before the cut) reads again.
        assert os.pread(fd, MiB, 0) == reference[:MiB]
    finally:
        os.close(fd)
    proc = subprocess.run(
        ["cp", "--sparse=always", str(mp / "shrink.raw"), str(tmp_path / "c.raw")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "Input/output error" in proc.stderr


def test_image_replaced_while_mounted_serves_the_opened_file(tmp_path: Path, mount: Mount) -> None:
    """Renaming a new image over the path: the daemon holds the old file, serves it whole."""
    image = make_image(tmp_path / "vm.qcow2", 8 * MiB, seed=43, writes=12)
    old = qemu_raw(image, tmp_path / "old.raw")
    mp = mount(image)
    new = make_image(tmp_path / "new.qcow2", 8 * MiB, seed=44, writes=12)
    os.replace(new, image)
    assert not files_equal(qemu_raw(image, tmp_path / "new.raw"), old)
    assert files_equal(mp / "vm.raw", old)


def test_corrupt_image_mounts_only_with_force(tmp_path: Path, mount: Mount) -> None:
    image = make_image(tmp_path / "bad.qcow2", 4 * MiB, seed=45, writes=8)
    reference = qemu_raw(image, tmp_path / "bad.raw")
    with open(image, "r+b") as f:
        f.seek(72)
        f.write((1 << 1).to_bytes(8, "big"))  # incompatible_features: corrupt
    mp = tmp_path / "refused"
    mp.mkdir()
    proc = sparsefs("mount", str(image), str(mp))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert str(image) in proc.stderr
    assert "corrupt" in proc.stderr
    assert "--force" in proc.stderr
    assert not is_mounted(mp)
    assert files_equal(mount(image, options=["--force"]) / "bad.raw", reference)


# -- hostile images through the mount ----------------------------------------------------------


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_bases(tmp_path_factory.mktemp("mount-hostile"))


def _read_results(path: Path, size: int, step: int) -> list[bytes | None]:
    """Each ``step`` chunk of a mounted file: its bytes, or None for EIO."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return [pread_full(fd, step, off) for off in range(0, size, step)]
    finally:
        os.close(fd)


def _inprocess_results(
    image: Path, size: int, step: int
) -> tuple[list[bytes | None], list[tuple[int, int]]]:
    """The same chunks and the data segments, read in-process with open_image."""
    out: list[bytes | None] = []
    with open_image(image) as img:
        for off in range(0, size, step):
            try:
                out.append(img.read(off, step))
            except ImageReadError:
                out.append(None)
        segments: list[tuple[int, int]] = []
        for ext in img.iter_extents():
            if not ext.data:
                continue
            if segments and segments[-1][1] == ext.guest_offset:
                segments[-1] = (segments[-1][0], ext.end)
            else:
                segments.append((ext.guest_offset, ext.end))
    return out, segments


Hostile = tuple[Path, bytearray, str, list[tuple[int, int]]]


def _hostile_mutants(bases: dict[str, Path], d: Path) -> Iterator[Hostile]:
    """Deterministic hostile copies: (path, bytes, base kind, guest ranges that must be EIO)."""

    def copy(kind: str, name: str) -> tuple[Path, bytearray]:
        return d / f"{name}.qcow2", bytearray(bases[kind].read_bytes())

    loc = locate(bases["plain"])
    span = loc.cluster_size * (loc.cluster_size // 8)
    path, buf = copy("plain", "l1-past-eof")
    put(buf, loc.l1_table_offset + 8, ">Q", COPIED | (loc.file_size + 64 * loc.cluster_size))
    yield path, buf, "plain", [(span, 2 * span)]

    entry = loc.normal()[3]
    path, buf = copy("plain", "l2-unaligned")
    put(buf, entry.pos, ">Q", entry.value + 512)
    yield path, buf, "plain", [(entry.guest_offset, entry.guest_offset + loc.cluster_size)]

    zl = locate(bases["zlib"])
    entry = zl.compressed()[1]
    host, _ = zl.descriptor(entry.value)
    path, buf = copy("zlib", "zlib-garbage")
    buf[host : host + 16] = b"\xff" * 16
    yield path, buf, "zlib", [(entry.guest_offset, entry.guest_offset + zl.cluster_size)]

    zs = locate(bases["zstd"])
    entry = zs.compressed()[0]
    path, buf = copy("zstd", "zstd-bomb")
    comp = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    bomb = b"".join(comp.compress(bytes(MiB)) for _ in range(256)) + comp.flush()
    at = (len(buf) + 511) // 512 * 512
    buf += bytes(at - len(buf)) + bomb
    put(buf, entry.pos, ">Q", zs.make_descriptor(at, (len(bomb) + 511) // 512))
    yield path, buf, "zstd", [(entry.guest_offset, entry.guest_offset + zs.cluster_size)]

    v2 = locate(bases["v2"])
    entry = v2.normal()[0]
    path, buf = copy("v2", "v2-zero-flag")
    put(buf, entry.pos, ">Q", entry.value | ZERO)
    yield path, buf, "v2", [(entry.guest_offset, entry.guest_offset + v2.cluster_size)]


def test_hostile_images_in_one_mount(bases: dict[str, Path], tmp_path: Path) -> None:
    """Deterministic broken images: EIO for the broken range, qemu's bytes elsewhere."""
    oracle = {
        k: qemu_raw(p, tmp_path / f"{k}.raw").read_bytes()
        for k, p in bases.items()
        if k in ("plain", "zlib", "zstd", "v2")
    }
    cases = []
    for path, buf, kind, broken in _hostile_mutants(bases, tmp_path):
        path.write_bytes(bytes(buf))
        cases.append((path, kind, broken))
    step = 64 * KiB
    with mounted(tmp_path / "mnt", *(c[0] for c in cases)) as mp:
        pid = daemon_pid(mp)
        for path, kind, broken in cases:
            raw = mp / f"{path.stem}.raw"
            expected = oracle[kind]
            got = _read_results(raw, len(expected), step)
            for i, chunk in enumerate(got):
                off = i * step
                if any(s < off + step and off < e for s, e in broken):
                    assert chunk is None, f"{path.name}: chunk {off} should be EIO"
                else:
                    assert chunk == expected[off : off + step], f"{path.name}: chunk {off}"
            segments = seek_walk(raw)
            for s, e in broken:  # broken ranges are data, so copiers do not skip them
                assert any(a <= s and e <= b for a, b in segments), (path.name, s, segments)
            cp = subprocess.run(
                ["cp", "--sparse=always", str(raw), str(tmp_path / "c.raw")],
                capture_output=True,
                text=True,
            )
            assert cp.returncode != 0, path.name
            assert "Input/output error" in cp.stderr, path.name
        assert daemon_pid(mp) == pid
        assert is_mounted(mp)


FUZZ_MOUNT_MUTANTS = int(os.environ.get("SPARSEFS_FUZZ_MOUNT_MUTANTS", "16"))


def test_seeded_mutants_through_the_mount_match_in_process(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    """Random mutants that open: the mount serves what the library reads, EIO for EIO."""
    rng = random.Random(int(os.environ.get("SPARSEFS_FUZZ_SEED", "20240501")))
    kinds = ["plain", "v2", "zlib", "zstd", "extl2"]
    chosen: list[tuple[Path, str]] = []
    refused = 0
    attempt = 0
    while len(chosen) < FUZZ_MOUNT_MUTANTS and attempt < 50 * FUZZ_MOUNT_MUTANTS:
        kind = kinds[attempt % len(kinds)]
        attempt += 1
        loc = locate(bases[kind])
        mutator = Mutator(loc, rng)
        desc, change = mutator.next()
        buf = bytearray(loc.raw)
        change(buf)
        path = tmp_path / f"m{attempt:03d}-{kind}.qcow2"
        path.write_bytes(bytes(buf))
        try:
            with open_image(path) as img:
                if img.size > 64 * MiB:
                    continue  # keep the walk small
                for snap in img.snapshots:
                    img.open_snapshot(snap).close()
        except SparsefsError:
            refused += 1
            if refused <= 2:  # the command line refuses it in one line, too
                proc = sparsefs("map", str(path))
                assert proc.returncode != 0, desc
                assert "Traceback" not in proc.stderr, desc
                assert len(proc.stderr.strip().splitlines()) == 1, (desc, proc.stderr)
            continue
        chosen.append((path, desc))
    assert len(chosen) == FUZZ_MOUNT_MUTANTS
    step = 64 * KiB
    with mounted(tmp_path / "mnt", *(p for p, _ in chosen), options=["--no-snapshots"]) as mp:
        pid = daemon_pid(mp)
        for path, desc in chosen:
            raw = mp / f"{path.stem}.raw"
            size = raw.stat().st_size
            want, segments = _inprocess_results(path, size, step)
            got = _read_results(raw, size, step)
            for i, (a, b) in enumerate(zip(got, want, strict=True)):
                assert a == b, f"{path.name} ({desc}): chunk {i * step} differs from in-process"
            assert seek_walk(raw) == segments, f"{path.name} ({desc}): seek walk differs"
        assert daemon_pid(mp) == pid
        assert is_mounted(mp)
    shutil.rmtree(tmp_path / "mnt", ignore_errors=True)
