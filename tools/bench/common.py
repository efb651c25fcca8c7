"""Helpers the bench scripts share: units, logging, running commands, memory state, copies.

This is a tool, not a test: it is never imported by the package or the tests.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
CLUSTER = 64 * KiB


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


def drop_caches(strict: bool = False) -> None:
    """As root, empty the page cache before a workload (``sync; echo 3 > drop_caches``).

    Measured here: with the page cache full of earlier workloads' images, every
    page a copy writes to /dev/shm first waits for reclaim, and W2 ran 1.9x slower
    for every contender alike.  Each workload then starts from the same state; its
    warm-up convert reads the image back in.

    Raises:
        SystemExit: ``strict`` (cold mode) and the cache could not be dropped.
    """
    try:
        if os.geteuid() != 0:
            raise PermissionError("not root")
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        if strict:
            raise SystemExit(f"bench: --cold cannot drop the page cache: {exc}") from None


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
