#!/usr/bin/env python3
"""The sparsefs benchmark harness (issue 7): sparsefs against qemu's own tools.

Run from the repository root with the project's interpreter::

    .venv/bin/python tools/bench/bench.py                 # full run, 5 rounds
    .venv/bin/python tools/bench/bench.py --quick         # small images, 3 rounds
    .venv/bin/python tools/bench/bench.py --workloads W1,W3 --rounds 7 --json out.json

It builds its images with qemu-img/qemu-io in a work directory (default
``~/.cache/sparsefs-bench``; an image is reused when its name, which encodes
every parameter of the workload and the seed, is already there), then runs
each contender on the same image, in the same run, alternating, for several
rounds.  Every round mounts each contender afresh (a FUSE file kept in the
kernel page cache would otherwise serve the later rounds); the host image file
is left cached for all contenders alike (a warm-up ``qemu-img convert`` reads
it first).  Copies go to /dev/shm and are deleted after each run.  It prints
medians and ratios as a table, next to the targets of issue 7.

Contenders:
    sparsefs+cp   ``sparsefs mount`` then ``cp --sparse=always`` of the file
    qsd+cp        qemu-storage-daemon's FUSE export then ``cp --sparse=always``
    convert       ``qemu-img convert -O raw`` of the image
    sparsefs+rsync / qsd+rsync   ``rsync --sparse`` through each mount (W5)
    sparsefs+cat / qsd+cat       ``cat FILE > /dev/null`` through each mount (W6)

Workloads (full size; ``--quick`` shrinks them):
    W1  16 GiB virtual, ~600 MiB data in 300 extents (the everyday VM disk)
    W2  16 GiB virtual, 1 GiB data in 16384 extents of 64 KiB scattered everywhere
    W3  1 TiB virtual, 2 GiB data in 4096 extents of 512 KiB: mount ready time,
        full SEEK_DATA/SEEK_HOLE walk, cp, and the daemon's peak RSS (VmHWM)
    W4  4 GiB fully allocated (read throughput)
    W5  rsync --sparse of the W1 image through each mount (rsync reads the holes)
    W6  cat of the W1 image through each mount to /dev/null (reads every hole)
    W7  an aged ext4 filesystem: 40 GiB, made from /usr by ``mkfs.ext4 -d``,
        loop-mounted, a third of its files deleted, half of /usr copied in
        again, fstrim'ed, converted to qcow2 (see :func:`build_aged_ext4`;
        needs root and loop devices; built once, in a few minutes)
    P1  W1's extents in a 16 GiB ``preallocation=metadata`` image (issue 10): every
        cluster mapped, the unwritten ones over holes of the image file
    P2  the same with ``preallocation=falloc`` (unwritten extents)
    V1  W1's data as a monolithicSparse VMDK (``qemu-img convert -O vmdk``)
    X1  W1's data as a dynamic VHDX with 1 MiB blocks

Every output is checked once (first round) against the warm-up convert: the
byte ranges where either file stores data must be equal, which is the whole
file since both read as zeros elsewhere.  A contender that copies wrong bytes
aborts the run.

This is a tool, not a test: it is never imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
CLUSTER = 64 * KiB
# Bump when the way images are built changes, so cached images are rebuilt.
BUILD_VERSION = 1


# -- images ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """A benchmark image: virtual size and the guest extents written with data.

    ``layout`` is "scatter" (``count`` extents placed at random, non-overlapping,
    64 KiB-aligned guest offsets; lengths are ``min_len..max_len`` in 64 KiB
    steps), or "full" (every byte written, in 64 MiB sequential writes).
    Extents are written in a shuffled order, so host clusters are not in guest
    order, as in an image that grew over time.
    """

    label: str
    virtual_size: int
    layout: str
    count: int = 0
    min_len: int = CLUSTER
    max_len: int = CLUSTER
    seed: int = 20260509
    preallocation: str = "off"  # qemu-img create -o preallocation=...
    fmt: str = "qcow2"  # other formats: the qcow2 image converted with fmt_options
    fmt_options: str = ""

    @property
    def file_name(self) -> str:
        """A name that encodes every parameter, so a cached image is reused only when equal."""
        if self.layout == "full":
            shape = "full"
        else:
            shape = f"{self.count}x{self.min_len // KiB}-{self.max_len // KiB}k"
        prealloc = "" if self.preallocation == "off" else f"-p{self.preallocation}"
        opts = f"-{self.fmt_options.replace('=', '').replace(',', '-')}" if self.fmt_options else ""
        return (
            f"{self.label}-v{BUILD_VERSION}-{self.virtual_size // MiB}m-{shape}-s{self.seed}"
            f"{prealloc}{opts}.{self.fmt}"
        )

    def extents(self) -> list[tuple[int, int]]:
        """The (guest_offset, length) writes in bytes, in write order."""
        if self.layout == "full":
            step = 64 * MiB
            return [
                (off, min(step, self.virtual_size - off))
                for off in range(0, self.virtual_size, step)
            ]
        rng = random.Random(self.seed)
        slot = self.max_len
        nb_slots = self.virtual_size // slot
        if self.count > nb_slots:
            raise ValueError(f"{self.label}: {self.count} extents do not fit")
        slots = rng.sample(range(nb_slots), self.count)
        out = []
        for s in slots:
            length = rng.randrange(self.min_len, self.max_len + 1, CLUSTER)
            # Anywhere inside its slot, cluster aligned: extents never overlap.
            shift = rng.randrange(0, slot - length + 1, CLUSTER)
            out.append((s * slot + shift, length))
        return out  # rng.sample order is already shuffled

    def data_bytes(self) -> int:
        """Bytes of guest data the image stores."""
        return sum(length for _, length in self.extents())


def drop_caches() -> None:
    """As root, empty the page cache before a workload (``sync; echo 3 > drop_caches``).

    Measured here: with the page cache full of earlier workloads' images, every
    page a copy writes to /dev/shm first waits for reclaim, and W2 ran 1.9x slower
    for every contender alike.  Each workload then starts from the same state; its
    warm-up convert reads the image back in.
    """
    if os.geteuid() != 0:
        return
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def compact_memory() -> None:
    """As root, compact free memory before a contender runs (``/proc/sys/vm/compact_memory``).

    Measured here: after gigabytes were written to and freed from /dev/shm,
    page allocations stalled on compaction (tens of thousands of
    ``compact_stall``), and whichever contender came next paid for it (a cp of
    W4 took 9.7 s instead of 2.95 s).  Compacting first gives every contender
    the same memory state.
    """
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError), open("/proc/sys/vm/compact_memory", "w") as f:
        f.write("1\n")


def image_format(image: Path) -> str:
    """qemu's format name of a benchmark image, from its suffix."""
    return {".vmdk": "vmdk", ".vhdx": "vhdx"}.get(image.suffix, "qcow2")


def build_image(spec: ImageSpec, work_dir: Path) -> Path:
    """Create the image with qemu-img/qemu-io unless it is cached; return its path."""
    path = work_dir / spec.file_name
    if path.exists():
        return path
    if spec.fmt != "qcow2":
        source = build_image(dataclasses.replace(spec, fmt="qcow2", fmt_options=""), work_dir)
        tmp = path.with_suffix(".partial")
        log(f"converting {source.name} to {spec.fmt} {spec.fmt_options} ...")
        opts = ["-o", spec.fmt_options] if spec.fmt_options else []
        run(["qemu-img", "convert", "-f", "qcow2", "-O", spec.fmt, *opts, str(source), str(tmp)])
        os.rename(tmp, path)
        return path
    tmp = path.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    log(f"building {path.name} ({human(spec.data_bytes())} of data) ...")
    t0 = time.perf_counter()
    run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"preallocation={spec.preallocation}",
            str(tmp),
            str(spec.virtual_size),
        ]
    )
    rng = random.Random(spec.seed ^ 0x5EED)
    lines = []
    for off, length in spec.extents():
        # A non-zero pattern byte per write: cp must copy every byte.
        lines.append(f"write -q -P {rng.randrange(1, 256)} {off} {length}\n")
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", str(tmp)],
        input="".join(lines) + "quit\n",
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or "error" in proc.stdout.lower() or proc.stderr.strip():
        raise SystemExit(f"bench: qemu-io failed building {tmp}: {proc.stderr or proc.stdout}")
    os.rename(tmp, path)
    log(f"built {path.name} in {time.perf_counter() - t0:.1f} s")
    return path


@dataclass(frozen=True)
class AgedFsSpec:
    """An aged ext4 filesystem image (see :func:`build_aged_ext4`).

    ``source_dir`` seeds it (``mkfs.ext4 -d``) and is copied from again;
    ``seed`` picks the files deleted and copied.
    """

    label: str
    virtual_size: int
    source_dir: str
    seed: int = 20261127

    @property
    def file_name(self) -> str:
        """A name that encodes every parameter, so a cached image is reused only when equal."""
        tag = re.sub(r"[^A-Za-z0-9]+", "_", self.source_dir).strip("_") or "root"
        return (
            f"{self.label}-v{AGED_BUILD_VERSION}-{self.virtual_size // GiB}g-{tag}"
            f"-s{self.seed}.qcow2"
        )


# Bump when the way aged filesystem images are built changes.
AGED_BUILD_VERSION = 1
AGED_EXT4 = AgedFsSpec("ext4", 40 * GiB, "/usr")


def _regular_files(root: Path) -> list[Path]:
    """Regular files (not symlinks) under ``root``, sorted, for a reproducible pick."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out.append(p)
    return out


def build_aged_ext4(work_dir: Path, spec: AgedFsSpec = AGED_EXT4) -> Path:
    """An aged ext4 filesystem as a qcow2 image in ``work_dir``, built once and cached.

    ``truncate -s SIZE fs.raw && mkfs.ext4 -d SOURCE fs.raw``, loop-mounted;
    about a third of its files deleted, about half of SOURCE's files copied in
    again (they land in the freed gaps, fragmented), ``fstrim`` (the freed
    blocks become holes of fs.raw), unmounted, and ``qemu-img convert -O
    qcow2``.  Needs root and a loop device.  For tools/bench/backup_bench.py
    too: import this module and call it.

    Returns:
        The image's path (``work_dir / spec.file_name``).
    """
    path = work_dir / spec.file_name
    if path.exists():
        return path
    if os.geteuid() != 0:
        raise SystemExit(f"bench: building {path.name} needs root (loop mount)")
    for tool in ("mkfs.ext4", "mount", "umount", "fstrim", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: building {path.name} needs {tool} (see tools/setup)")
    log(f"building {path.name} from {spec.source_dir} (a few minutes) ...")
    t0 = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    with tempfile.TemporaryDirectory(prefix="aged-", dir=work_dir) as tmp:
        raw = Path(tmp) / "fs.raw"
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        with open(raw, "wb") as f:
            f.truncate(spec.virtual_size)
        run(["mkfs.ext4", "-q", "-F", "-d", spec.source_dir, str(raw)])
        run(["mount", "-o", "loop", str(raw), str(mnt)])
        try:
            deleted = 0
            for p in _regular_files(mnt):
                if rng.random() < 1 / 3:
                    p.unlink()
                    deleted += 1
            copied = 0
            source = Path(spec.source_dir)
            for p in _regular_files(source):
                if rng.random() < 1 / 2:
                    dest = mnt / "aged-copy" / p.relative_to(source)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with contextlib.suppress(OSError):  # unreadable: skip
                        shutil.copyfile(p, dest)
                        copied += 1
            os.sync()
            run(["fstrim", str(mnt)])
            log(f"  {deleted} files deleted, {copied} copied in again")
        finally:
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        partial = path.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(partial)])
        os.rename(partial, path)
    log(f"built {path.name} in {time.perf_counter() - t0:.1f} s")
    return path


def image_layout(image: Path) -> tuple[int, int, int]:
    """(virtual size, data bytes, data extents) of an image, from ``qemu-img map``."""
    out = run(["qemu-img", "map", "--output=json", str(image)]).stdout
    size = data = extents = 0
    end = -1
    for ent in json.loads(out):
        size = max(size, ent["start"] + ent["length"])
        if ent["data"]:
            data += ent["length"]
            extents += ent["start"] != end
            end = ent["start"] + ent["length"]
    return size, data, extents


# -- workloads -------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A named workload: an image and the contenders that run on it."""

    name: str
    title: str
    image: ImageSpec | AgedFsSpec
    contenders: tuple[str, ...]


def workloads(quick: bool) -> dict[str, Workload]:
    """W1..W7, full size or (``quick``) small enough for a smoke run."""
    if quick:
        w1 = ImageSpec("w1q", 2 * GiB, "scatter", 150, CLUSTER, 15 * CLUSTER)
        w2 = ImageSpec("w2q", 2 * GiB, "scatter", 2048, CLUSTER, CLUSTER)
        w3 = ImageSpec("w3q", 128 * GiB, "scatter", 512, 512 * KiB, 512 * KiB)
        w4 = ImageSpec("w4q", 512 * MiB, "full")
        aged = AgedFsSpec("ext4q", 4 * GiB, "/usr/share/doc")
    else:
        w1 = ImageSpec("w1", 16 * GiB, "scatter", 300, CLUSTER, 63 * CLUSTER)
        w2 = ImageSpec("w2", 16 * GiB, "scatter", 16384, CLUSTER, CLUSTER)
        w3 = ImageSpec("w3", TiB, "scatter", 4096, 512 * KiB, 512 * KiB)
        w4 = ImageSpec("w4", 4 * GiB, "full")
        aged = AGED_EXT4
    cp3 = ("sparsefs+cp", "qsd+cp", "convert")
    v1 = dataclasses.replace(w1, fmt="vmdk")
    x1 = dataclasses.replace(w1, fmt="vhdx", fmt_options="block_size=1M")
    p1 = dataclasses.replace(w1, label=f"{w1.label}p", preallocation="metadata")
    p2 = dataclasses.replace(w1, label=f"{w1.label}p", preallocation="falloc")
    return {
        "W1": Workload("W1", "everyday disk, cp", w1, cp3),
        "W2": Workload("W2", "64 KiB fragments, cp", w2, cp3),
        "W3": Workload("W3", "huge virtual size", w3, ("sparsefs+cp", "qsd+cp")),
        "W4": Workload("W4", "fully allocated, cp", w4, cp3),
        "W5": Workload("W5", "rsync --sparse of W1", w1, ("sparsefs+rsync", "qsd+rsync")),
        "W6": Workload("W6", "cat of W1 to /dev/null", w1, ("sparsefs+cat", "qsd+cat")),
        "W7": Workload("W7", "aged ext4 filesystem, cp", aged, cp3),
        "P1": Workload("P1", "W1's data, preallocation=metadata, cp", p1, cp3),
        "P2": Workload("P2", "W1's data, preallocation=falloc, cp", p2, cp3),
        "V1": Workload("V1", "W1 as a monolithicSparse VMDK, cp", v1, cp3),
        "X1": Workload("X1", "W1 as a dynamic VHDX (1 MiB blocks), cp", x1, cp3),
    }


def preallocated_spec(name: str) -> ImageSpec:
    """The image of workload P1 or P2 (for tools/bench/backup_bench.py)."""
    return workloads(False)[name].image  # type: ignore[return-value]  # P1/P2 are ImageSpecs


# -- helpers ---------------------------------------------------------------------------


def log(msg: str) -> None:
    """Progress to stderr (the table and JSON go to stdout)."""
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def human(n: float) -> str:
    """Bytes as a short human string."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def run(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; abort the benchmark with its stderr when it fails."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(
            f"bench: {' '.join(map(str, cmd))} exited {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()}"
        )
    return proc


def timed(cmd: Sequence[str]) -> float:
    """Wall seconds of one command, which must succeed."""
    t0 = time.perf_counter()
    run(cmd)
    return time.perf_counter() - t0


def is_mounted(path: Path) -> bool:
    """True when ``path`` is a mount point listed in /proc/self/mounts."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def peak_rss(pid: int) -> int | None:
    """VmHWM of a process in bytes, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * KiB
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process used so far, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # Fields 14 and 15 of stat(5), counted from 1; here the list starts at field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_gone(pid: int | None, mountpoint: Path, timeout: float = 30.0) -> None:
    """Wait until the daemon exited and the mount is gone; force the unmount if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (pid is None or not process_alive(pid)) and not is_mounted(mountpoint):
            return
        time.sleep(0.01)
    log(f"{mountpoint}: daemon did not exit, unmounting lazily")
    subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
    if pid is not None and process_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def daemon_pid(mountpoint: Path) -> int | None:
    """PID of the sparsefs daemon serving ``mountpoint`` (found by its command line)."""
    target = str(mountpoint)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                words = [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
        except OSError:
            continue
        if "sparsefs" in words and "mount" in words and target in words:
            found.append(int(entry))
    live = [p for p in found if process_alive(p)]
    return max(live) if live else None


def seek_walk(path: Path) -> int:
    """Walk a file with SEEK_DATA/SEEK_HOLE to the end; return the lseek calls made."""
    fd = os.open(path, os.O_RDONLY)
    calls = 0
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            calls += 1
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                break
            calls += 1
            pos = os.lseek(fd, data, os.SEEK_HOLE)
    finally:
        os.close(fd)
    return calls


def data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """[(start, end)] data segments of an open file by SEEK_DATA/SEEK_HOLE."""
    out = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def same_content(a: Path, b: Path) -> str | None:
    """None when two sparse files read the same, else what differs.

    Compares the union of both files' data segments byte for byte; outside
    it both files are holes, which read as zeros.
    """
    if a.stat().st_size != b.stat().st_size:
        return f"sizes differ: {a.stat().st_size} != {b.stat().st_size}"
    size = a.stat().st_size
    fa = os.open(a, os.O_RDONLY)
    fb = os.open(b, os.O_RDONLY)
    try:
        marks = sorted(data_segments(fa, size) + data_segments(fb, size))
        merged: list[list[int]] = []
        for s, e in marks:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        for s, e in merged:
            pos = s
            while pos < e:
                n = min(8 * MiB, e - pos)
                if os.pread(fa, n, pos) != os.pread(fb, n, pos):
                    return f"bytes differ in [{pos}, {pos + n})"
                pos += n
    finally:
        os.close(fa)
        os.close(fb)
    return None


# -- mounts ----------------------------------------------------------------------------


@dataclass
class Mounted:
    """A live mount: the raw file to read, the daemon, how long the mount took."""

    file: Path
    pid: int | None
    ready_s: float


@contextlib.contextmanager
def sparsefs_mount(image: Path, base: Path, extra: Sequence[str]) -> Iterator[Mounted]:
    """``sparsefs mount IMAGE MP`` (timed until the command returns); always unmounts."""
    mp = Path(tempfile.mkdtemp(prefix="sparsefs-", dir=base))
    cmd = [sys.executable, "-m", "sparsefs", "mount", *extra, str(image), str(mp)]
    pid = None
    try:
        t0 = time.perf_counter()
        run(cmd, cwd=REPO)
        ready = time.perf_counter() - t0
        pid = daemon_pid(mp)
        yield Mounted(mp / f"{image.stem}.raw", pid, ready)
    finally:
        if is_mounted(mp):
            subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        wait_gone(pid, mp)
        with contextlib.suppress(OSError):
            mp.rmdir()


@contextlib.contextmanager
def qsd_mount(image: Path, base: Path) -> Iterator[Mounted]:
    """qemu-storage-daemon's FUSE export of IMAGE onto a file; always stopped."""
    work = Path(tempfile.mkdtemp(prefix="qsd-", dir=base))
    export = work / "export.raw"
    export.touch()
    pidfile = work / "qsd.pid"
    cmd = [
        "qemu-storage-daemon", "--daemonize", "--pidfile", str(pidfile),
        "--blockdev", f"driver=file,node-name=f,filename={image},read-only=on",
        "--blockdev", f"driver={image_format(image)},node-name=q,file=f,read-only=on",
        "--export", f"type=fuse,id=e,node-name=q,mountpoint={export}",
    ]  # fmt: skip
    pid = None
    try:
        t0 = time.perf_counter()
        run(cmd)
        ready = time.perf_counter() - t0
        pid = int(pidfile.read_text().strip())
        yield Mounted(export, pid, ready)
    finally:
        if pid is not None and process_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        wait_gone(pid, export)
        shutil.rmtree(work, ignore_errors=True)


# -- running ---------------------------------------------------------------------------


@dataclass
class Samples:
    """Per-round measurements of one contender on one workload, by metric."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, metric: str, value: float) -> None:
        self.values.setdefault(metric, []).append(value)

    def median(self, metric: str) -> float | None:
        vals = self.values.get(metric)
        return statistics.median(vals) if vals else None


@dataclass
class Bench:
    """One benchmark run: options, work directories, results."""

    args: argparse.Namespace
    work_dir: Path
    mount_base: Path
    out_dir: Path
    results: dict[str, dict[str, Samples]] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)

    def out_path(self, name: str) -> Path:
        return self.out_dir / name

    def check(self, wl: str, who: str, out: Path, ref: Path, first_round: bool) -> None:
        if first_round and not self.args.no_verify:
            problem = same_content(out, ref)
            if problem is not None:
                raise SystemExit(f"bench: {wl} {who}: the copy is wrong: {problem}")

    def run_contender(self, wl: Workload, who: str, image: Path, ref: Path, rnd: int) -> None:
        samples = self.results.setdefault(wl.name, {}).setdefault(who, Samples())
        out = self.out_path(f"{wl.name}-{who.replace('+', '-')}.raw")
        out.unlink(missing_ok=True)
        compact_memory()
        try:
            if who == "convert":
                samples.add(
                    "copy_s",
                    timed(
                        [
                            "qemu-img",
                            "convert",
                            "-f",
                            image_format(image),
                            "-O",
                            "raw",
                            str(image),
                            str(out),
                        ]
                    ),
                )
                self.check(wl.name, who, out, ref, rnd == 0)
                return
            system, tool = who.split("+")
            mount: Callable[[], contextlib.AbstractContextManager[Mounted]]
            if system == "sparsefs":
                mount = lambda: sparsefs_mount(image, self.mount_base, self.args.sparsefs_opt)  # noqa: E731  # deferred, like its twin below
            else:
                mount = lambda: qsd_mount(image, self.mount_base)  # noqa: E731  # deferred mount
            with mount() as m:
                samples.add("mount_s", m.ready_s)
                if wl.name == "W3":
                    t0 = time.perf_counter()
                    calls = seek_walk(m.file)
                    samples.add("walk_s", time.perf_counter() - t0)
                    self.info.setdefault(wl.name, {})["lseek_calls"] = calls
                if tool == "cp":
                    cmd = ["cp", "--sparse=always", str(m.file), str(out)]
                elif tool == "cat":
                    cmd = ["sh", "-c", f"cat {shlex.quote(str(m.file))} > /dev/null"]
                else:
                    cmd = ["rsync", "--sparse", str(m.file), str(out)]
                samples.add("copy_s", timed(cmd))
                if m.pid is not None:
                    rss = peak_rss(m.pid)
                    if rss is not None:
                        samples.add("rss_mib", rss / MiB)
                    cpu = cpu_seconds(m.pid)
                    if cpu is not None:
                        samples.add("cpu_s", cpu)
                # Untimed, after the CPU sample: what cat read must be the image's bytes.
                verify_cat = tool == "cat" and rnd == 0 and not self.args.no_verify
                if verify_cat and subprocess.run(["cmp", "-s", str(m.file), str(ref)]).returncode:
                    raise SystemExit(f"bench: {wl.name} {who}: the bytes read are wrong")
            if tool != "cat":
                self.check(wl.name, who, out, ref, rnd == 0)
        finally:
            out.unlink(missing_ok=True)

    def run_workload(self, wl: Workload) -> None:
        if isinstance(wl.image, AgedFsSpec):
            image = build_aged_ext4(self.work_dir, wl.image)
            virtual, data, extents = image_layout(image)
        else:
            image = build_image(wl.image, self.work_dir)
            virtual, data = wl.image.virtual_size, wl.image.data_bytes()
            extents = len(wl.image.extents())
        self.info[wl.name] = {
            "image": str(image),
            "virtual_size": virtual,
            "data_bytes": data,
            "extents": extents,
            "extents_are": "data extents" if isinstance(wl.image, AgedFsSpec) else "writes",
        }
        drop_caches()
        log(
            f"{wl.name}: {human(virtual)} virtual, {human(data)} data; "
            f"warm-up convert (also the reference copy)"
        )
        ref = self.out_path(f"{wl.name}-reference.raw")
        run(["qemu-img", "convert", "-f", image_format(image), "-O", "raw", str(image), str(ref)])
        try:
            order = list(wl.contenders)
            for rnd in range(self.args.rounds):
                # Alternate: each round starts with the next contender.
                k = rnd % len(order)
                for who in order[k:] + order[:k]:
                    self.run_contender(wl, who, image, ref, rnd)
                log(
                    f"{wl.name}: round {rnd + 1}/{self.args.rounds}: "
                    + ", ".join(
                        f"{who} {self.results[wl.name][who].values['copy_s'][-1]:.2f} s"
                        for who in order
                    )
                )
        finally:
            ref.unlink(missing_ok=True)


# -- report ----------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table."""

    workload: str
    metric: str
    values: dict[str, float | None]
    ratios: dict[str, float | None]
    target: str
    ok: bool | None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def rows(bench: Bench) -> list[Row]:
    """Medians, ratios and targets (issue 7) for every measured workload."""
    out: list[Row] = []
    res = bench.results

    def med(wl: str, who: str, metric: str) -> float | None:
        s = res.get(wl, {}).get(who)
        return s.median(metric) if s else None

    def cp_row(wl: str) -> None:
        s, q, c = (med(wl, w, "copy_s") for w in ("sparsefs+cp", "qsd+cp", "convert"))
        rq, rc = ratio(s, q), ratio(s, c)
        if wl == "W7":  # issue 12: report it
            ok, target = None, "(info)"
        else:
            ok = None if rq is None or rc is None else rq <= 1.0 and rc <= 2.5
            target = "<=1.0x qsd, <=2.5x convert"
        out.append(
            Row(
                wl,
                "cp wall s",
                {"sparsefs": s, "qsd": q, "convert": c},
                {"/qsd": rq, "/convert": rc},
                target,
                ok,
            )
        )

    for wl in ("W1", "W2"):
        if wl in res:
            cp_row(wl)
    if "W3" in res:
        sm, qm = med("W3", "sparsefs+cp", "mount_s"), med("W3", "qsd+cp", "mount_s")
        out.append(
            Row(
                "W3",
                "mount ready s",
                {"sparsefs": sm, "qsd": qm},
                {"/qsd": ratio(sm, qm)},
                "< 1 s",
                None if sm is None else sm < 1.0,
            )
        )
        sw, qw = med("W3", "sparsefs+cp", "walk_s"), med("W3", "qsd+cp", "walk_s")
        out.append(
            Row(
                "W3",
                "seek walk s",
                {"sparsefs": sw, "qsd": qw},
                {"/qsd": ratio(sw, qw)},
                "< 1 s",
                None if sw is None else sw < 1.0,
            )
        )
        sc, qc = med("W3", "sparsefs+cp", "copy_s"), med("W3", "qsd+cp", "copy_s")
        out.append(
            Row(
                "W3",
                "cp wall s",
                {"sparsefs": sc, "qsd": qc},
                {"/qsd": ratio(sc, qc)},
                "(info)",
                None,
            )
        )
        sr, qr = med("W3", "sparsefs+cp", "rss_mib"), med("W3", "qsd+cp", "rss_mib")
        out.append(
            Row(
                "W3",
                "peak RSS MiB",
                {"sparsefs": sr, "qsd": qr},
                {"/qsd": ratio(sr, qr)},
                "< 150 MiB",
                None if sr is None else sr < 150,
            )
        )
    if "W4" in res:
        data = bench.info["W4"]["data_bytes"]
        s, q, c = (med("W4", w, "copy_s") for w in ("sparsefs+cp", "qsd+cp", "convert"))
        tput = {
            k: (data / MiB / v if v else None)
            for k, v in (("sparsefs", s), ("qsd", q), ("convert", c))
        }
        rq = ratio(tput["sparsefs"], tput["qsd"])
        out.append(
            Row(
                "W4",
                "cp MiB/s",
                tput,
                {"/qsd": rq, "/convert": ratio(tput["sparsefs"], tput["convert"])},
                ">=0.8x qsd",
                None if rq is None else rq >= 0.8,
            )
        )
    if "W5" in res:
        s, q = med("W5", "sparsefs+rsync", "copy_s"), med("W5", "qsd+rsync", "copy_s")
        rq = ratio(s, q)
        out.append(
            Row(
                "W5",
                "rsync wall s",
                {"sparsefs": s, "qsd": q},
                {"/qsd": rq},
                "<=0.7x qsd",
                None if rq is None else rq <= 0.7,
            )
        )
    if "W6" in res:
        s, q = med("W6", "sparsefs+cat", "copy_s"), med("W6", "qsd+cat", "copy_s")
        rq = ratio(s, q)
        out.append(
            Row(
                "W6",
                "cat wall s",
                {"sparsefs": s, "qsd": q},
                {"/qsd": rq},
                "<=0.5x qsd",
                None if rq is None else rq <= 0.5,
            )
        )
    if "W7" in res:
        cp_row("W7")
    for wl in ("V1", "X1"):
        if wl not in res:
            continue
        s, q, c = (med(wl, w, "copy_s") for w in ("sparsefs+cp", "qsd+cp", "convert"))
        rp = ratio(s, med("W1", "sparsefs+cp", "copy_s"))
        out.append(
            Row(
                wl,
                "cp wall s",
                {"sparsefs": s, "qsd": q, "convert": c},
                {"/qsd": ratio(s, q), "/convert": ratio(s, c)},
                f"<=1.2x W1 sparsefs ({fmt(rp, 2)}x)",
                None if rp is None else rp <= 1.2,
            )
        )
    for wl in ("P1", "P2"):
        if wl not in res:
            continue
        s, q, c = (med(wl, w, "copy_s") for w in ("sparsefs+cp", "qsd+cp", "convert"))
        plain = med("W1", "sparsefs+cp", "copy_s")
        rq, rp = ratio(s, q), ratio(s, plain)
        out.append(
            Row(
                wl,
                "cp wall s",
                {"sparsefs": s, "qsd": q, "convert": c},
                {"/qsd": rq, "/convert": ratio(s, c)},
                "<=0.1x qsd, <=1.5x W1 sparsefs",
                None if rq is None or rp is None else rq <= 0.1 and rp <= 1.5,
            )
        )
    return out


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"


def print_table(bench: Bench, table: list[Row]) -> None:
    a = bench.args
    print(
        f"sparsefs benchmark: {a.rounds} rounds, medians"
        f"{' (quick)' if a.quick else ''}; {os.cpu_count()} CPUs; "
        f"sparsefs options: {' '.join(a.sparsefs_opt) or '(none)'}"
    )
    for name, info in bench.info.items():
        print(
            f"  {name}: {human(info['virtual_size'])} virtual, {human(info['data_bytes'])} "
            f"data in {info['extents']} {info.get('extents_are', 'writes')}"
            + (f", {info['lseek_calls']} lseek calls per walk" if "lseek_calls" in info else "")
        )
    head = ["wl", "metric", "sparsefs", "qsd", "convert", "s/qsd", "s/convert", "target", "result"]
    lines = [head]
    for r in table:
        lines.append(
            [
                r.workload,
                r.metric,
                fmt(r.values.get("sparsefs")),
                fmt(r.values.get("qsd")),
                fmt(r.values.get("convert")),
                fmt(r.ratios.get("/qsd")),
                fmt(r.ratios.get("/convert")),
                r.target,
                "-" if r.ok is None else ("pass" if r.ok else "MISS"),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    # Daemon CPU (user + system, whole life of the mount): less noisy than wall time
    # on a busy machine, and what the FUSE layer costs.
    cpu = []
    for wl, by in bench.results.items():
        for who, samples in by.items():
            med = samples.median("cpu_s")
            if med is not None:
                cpu.append(f"{wl} {who} {med:.2f}")
    if cpu:
        print("daemon CPU s (median): " + "; ".join(cpu))


def to_json(bench: Bench, table: list[Row]) -> dict[str, Any]:
    return {
        "rounds": bench.args.rounds,
        "quick": bench.args.quick,
        "sparsefs_options": bench.args.sparsefs_opt,
        "workloads": bench.info,
        "samples": {
            wl: {who: s.values for who, s in by.items()} for wl, by in bench.results.items()
        },
        "table": [dataclasses.asdict(r) for r in table],
    }


# -- main ------------------------------------------------------------------------------


def preflight() -> None:
    missing = [
        t
        for t in ("qemu-img", "qemu-io", "qemu-storage-daemon", "cp", "rsync", "fusermount3")
        if shutil.which(t) is None
    ]
    if missing:
        raise SystemExit(f"bench: missing tools: {', '.join(missing)} (see tools/setup)")
    if not os.path.exists("/dev/fuse"):
        raise SystemExit("bench: /dev/fuse is missing")
    if not os.path.isdir("/dev/shm"):
        raise SystemExit("bench: /dev/shm is missing (copies are written there)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Benchmark sparsefs against qemu-storage-daemon's FUSE export and "
        "qemu-img convert (issue 7). Prints medians, ratios and targets."
    )
    p.add_argument("--rounds", type=int, help="rounds per workload (default 5, 3 with --quick)")
    p.add_argument(
        "--workloads",
        default="W1,W2,W3,W4,W5,W6,W7,P1,P2,V1,X1",
        help="comma-separated subset of W1..W7, P1, P2, V1, X1 (default: all; the targets "
        "of P1/P2/V1/X1 compare with W1, so run W1 with them)",
    )
    p.add_argument("--quick", action="store_true", help="small images: a smoke run")
    p.add_argument(
        "--json",
        metavar="FILE",
        nargs="?",
        const="-",
        help="also write the results as JSON to FILE (- or no FILE: stdout, instead of the table)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsefs-bench",
        help="where images are built and kept between runs",
    )
    p.add_argument(
        "--shm-dir",
        type=Path,
        default=Path("/dev/shm"),
        help="where copies are written (default /dev/shm)",
    )
    p.add_argument(
        "--sparsefs-opt",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for 'sparsefs mount' (repeatable), e.g. "
        "--sparsefs-opt=--l2-cache-mib=8",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the first-round check of every copy against qemu-img convert",
    )
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    wanted = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    all_wl = workloads(args.quick)
    unknown = [w for w in wanted if w not in all_wl]
    if unknown:
        raise SystemExit(f"bench: unknown workloads {', '.join(unknown)} (W1..W7, P1, P2, V1, X1)")
    preflight()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="sparsefs-bench-") as mount_base,
        tempfile.TemporaryDirectory(prefix="sparsefs-bench-", dir=args.shm_dir) as out_dir,
    ):
        bench = Bench(args, args.work_dir, Path(mount_base), Path(out_dir))
        try:
            for name in wanted:
                bench.run_workload(all_wl[name])
        except KeyboardInterrupt:
            log("interrupted; reporting what was measured")
    table = rows(bench)
    if args.json == "-":
        json.dump(to_json(bench, table), sys.stdout, indent=2)
        print()
    else:
        print_table(bench, table)
        if args.json:
            Path(args.json).write_text(json.dumps(to_json(bench, table), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
