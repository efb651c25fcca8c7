"""What the bench reads from /proc and /sys: mounts, a process's CPU, peak RSS and read
calls, and a disk's counters (/proc/diskstats) around a timed command.

This is a tool, not a test: it is never imported by the package or the tests.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common import KiB, MiB

SECTOR = 512


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


def proc_value(pid: int, name: str, key: str) -> str | None:
    """The first word after ``key:`` in /proc/PID/NAME, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return line.split()[1]
    except OSError:
        return None
    return None


def peak_rss(pid: int) -> int | None:
    """VmHWM of a process in bytes, or None when it is gone."""
    kib = proc_value(pid, "status", "VmHWM")
    return None if kib is None else int(kib) * KiB


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process used so far, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # Fields 14 and 15 of stat(5), counted from 1; here the list starts at field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_syscalls(pid: int) -> int | None:
    """``syscr`` of /proc/PID/io: the read-type system calls of all the process's threads
    (read, pread, readv, ...; for a FUSE daemon one read of /dev/fuse per request, plus
    its reads of the image), or None when it is gone.
    """
    count = proc_value(pid, "io", "syscr")
    return None if count is None else int(count)


def cpus_allowed(pid: int) -> str | None:
    """The CPUs a process may run on (``Cpus_allowed_list``), or None when it is gone."""
    return proc_value(pid, "status", "Cpus_allowed_list")


def disk_of(path: Path) -> str:
    """The disk holding ``path`` as /proc/diskstats and ``iostat`` name it (vda, nvme0n1).

    From ``st_dev`` through /sys/dev/block/MAJOR:MINOR; a partition counts as its disk.

    Raises:
        SystemExit: ``path`` is not on a block device (tmpfs, overlay, ...).
    """
    dev = os.stat(path).st_dev
    sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if os.major(dev) == 0 or not sys_dev.exists():
        raise SystemExit(
            f"bench: --cold needs the images on a disk, but {path} is on {fs_type(path)}"
        )
    node = sys_dev.resolve()
    return node.parent.name if (node / "partition").exists() else node.name


def fs_type(path: Path) -> str:
    """The type of the filesystem mounted at or above ``path`` (tmpfs, ext4, ...)."""
    target = os.path.realpath(path)
    best, kind = "", "an unknown filesystem"
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mp = fields[1]
            inside = target == mp or target.startswith(mp.rstrip("/") + "/")
            if inside and len(mp) >= len(best):
                best, kind = mp, fields[2]
    return kind


@dataclass(frozen=True)
class DiskCounters:
    """One line of /proc/diskstats, the fields the bench uses (see iostats.rst)."""

    reads: int  # field 1: reads completed
    sectors_read: int  # field 3: 512-byte sectors read
    weighted_ms: int  # field 11: time_in_queue, ms weighted by requests in flight

    @classmethod
    def of(cls, disk: str) -> DiskCounters:
        with open("/proc/diskstats") as f:
            for line in f:
                fields = line.split()
                if fields[2] == disk:
                    return cls(int(fields[3]), int(fields[5]), int(fields[13]))
        raise SystemExit(f"bench: {disk} is not in /proc/diskstats")


@contextlib.contextmanager
def window(disk: str | None, daemon: int | None) -> Iterator[dict[str, float]]:
    """Measure what happens between enter and exit; the metrics fill the yielded dict.

    With a ``disk``: ``aqu`` (average queue depth, Δweighted_ms / Δwall_ms, ``iostat -x``
    aqu-sz), ``read_mib``, ``read_reqs`` and ``req_kib`` (average read size).  With a
    ``daemon`` PID: ``dcpu_s`` (its user + system CPU seconds) and ``dreads`` (its
    read-type system calls, see :func:`read_syscalls`) and ``us_per_dread``.  Nothing is
    recorded when the body raises.
    """
    got: dict[str, float] = {}
    d0 = DiskCounters.of(disk) if disk else None
    c0 = cpu_seconds(daemon) if daemon else None
    r0 = read_syscalls(daemon) if daemon else None
    t0 = time.perf_counter()
    yield got
    wall_ms = (time.perf_counter() - t0) * 1000
    if disk and d0:
        d1 = DiskCounters.of(disk)
        reqs = d1.reads - d0.reads
        read = (d1.sectors_read - d0.sectors_read) * SECTOR
        got["aqu"] = (d1.weighted_ms - d0.weighted_ms) / wall_ms if wall_ms else 0.0
        got["read_mib"] = read / MiB
        got["read_reqs"] = reqs
        got["req_kib"] = read / KiB / reqs if reqs else 0.0
    c1 = cpu_seconds(daemon) if daemon else None
    r1 = read_syscalls(daemon) if daemon else None
    if c0 is not None and c1 is not None and r0 is not None and r1 is not None:
        got["dcpu_s"] = c1 - c0
        got["dreads"] = r1 - r0
        if r1 > r0:
            got["us_per_dread"] = (c1 - c0) / (r1 - r0) * 1e6
