#!/usr/bin/env python3
"""Cold reads of an image's data: buffered + WILLNEED prefetch against O_DIRECT (issue 22).

Reads every host range of the image's data once, cold (page cache dropped
before each round, root), the way ``sparsefs checksum`` walks it, and prints
the wall time and the disk's queue depth for:

    buffered     os.preadv into a reused buffer, 2 threads, no hints
    prefetch     the same with sparsefs.prefetch's WILLNEED window (what sparsefs does)
    odirect-N    O_DIRECT reads of aligned 1 MiB pieces, N threads (N = 2, 8)

    .venv/bin/python tools/bench/odirect.py IMAGE [--rounds 3]

A tool, not a test; never imported by the package.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from sparsefs.formats import open_source
from sparsefs.options import OpenOptions
from sparsefs.prefetch import Prefetcher

PIECE = 1024 * 1024
ALIGN = 4096

Piece = tuple[int, int, int]  # fd, host offset, length


def host_pieces(source: object, size: int) -> list[tuple[int, int, int, int]]:
    """(guest offset, fd, host offset, length) of every data piece, in guest order."""
    ranges = source.iter_host_ranges(0, size)  # type: ignore[attr-defined]
    out = []
    for start, stop, raw, host in ranges:
        if raw is None:
            continue
        for off in range(0, stop - start, PIECE):
            out.append((start + off, raw.fd, host + off, min(PIECE, stop - start - off)))
    return out


def read_buffered(pieces: list[tuple[int, int, int, int]], threads: int) -> None:
    def one(p: tuple[int, int, int, int]) -> None:
        buf = bytearray(p[3])
        os.preadv(p[1], [buf], p[2])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, pieces))


def read_direct(path: str, pieces: list[tuple[int, int, int, int]], threads: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:

        def one(p: tuple[int, int, int, int]) -> None:
            start = p[2] - p[2] % ALIGN
            end = -(-(p[2] + p[3]) // ALIGN) * ALIGN
            buf = mmap.mmap(-1, end - start)  # page-aligned, as O_DIRECT wants
            try:
                os.preadv(fd, [buf], start)
            finally:
                buf.close()

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, pieces))
    finally:
        os.close(fd)


def disk_of(path: str) -> str:
    st = os.stat(path)
    name = os.path.basename(
        os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    )
    return (
        name
        if os.path.exists(f"/sys/block/{name}")
        else os.path.basename(os.path.dirname(os.path.realpath(f"/sys/class/block/{name}")))
    )


def in_queue_ms(disk: str) -> int:
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if fields[2] == disk:
                return int(fields[13])
    return 0


def timed(disk: str, run: Callable[[], None]) -> tuple[float, float]:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    q0, t0 = in_queue_ms(disk), time.monotonic()
    run()
    wall = time.monotonic() - t0
    return wall, (in_queue_ms(disk) - q0) / 1000 / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("image")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    source = open_source(args.image, None, OpenOptions())
    pieces = host_pieces(source, source.size)
    disk = disk_of(args.image)
    data = sum(p[3] for p in pieces)

    def prefetched() -> None:
        pf = Prefetcher()
        key = pf.open_stream(source, 0, source.size)
        try:
            with ThreadPoolExecutor(2) as pool:
                for piece in pieces:
                    pf.advance(key, piece[0])
                    pool.submit(os.preadv, piece[1], [bytearray(piece[3])], piece[2])
        finally:
            pf.close()

    contenders: dict[str, Callable[[], None]] = {
        "buffered": lambda: read_buffered(pieces, 2),
        "prefetch": prefetched,
        "odirect-2": lambda: read_direct(args.image, pieces, 2),
        "odirect-8": lambda: read_direct(args.image, pieces, 8),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            results[name].append(timed(disk, run))
    print(f"{args.image}: {data / 2**20:.0f} MiB of data in {len(pieces)} pieces, disk {disk}")
    for name, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        depth = statistics.median(r[1] for r in rows)
        print(
            f"  {name:10s} {wall:6.3f} s  {data / 2**20 / wall:7.0f} MiB/s"
            f"  queue depth {depth:5.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
