#!/usr/bin/env python3
"""Benchmark of the checksum tool (issue 4): sparsefs against qemu-img compare and xxh128sum.

Run from the repository root with the project's interpreter::

    .venv/bin/python tools/bench/checksum_bench.py              # 16 GiB / ~600 MiB, 5 rounds
    .venv/bin/python tools/bench/checksum_bench.py --rounds 7 --block-sizes

It builds, in a fresh directory on /dev/shm (RAM, so no disk writeback skews a
contender), a qcow2 image of 16 GiB virtual size holding about 600 MiB of
random data in a few hundred extents (qemu-img create + qemu-io ``write -s``),
and its sparse raw copy (``qemu-img convert -O raw``).  Then, for several
rounds, alternating the contenders inside each round, it times the wall clock
of:

    sparsefs verify IMAGE COPY     vs  qemu-img compare -f qcow2 -F raw IMAGE COPY
    sparsefs checksum COPY         vs  xxh128sum COPY

plus, for information, ``sparsefs checksum IMAGE`` and ``sparsefs checksum
--stream-xxh128 COPY``.  It prints the medians and the ratios next to the
targets (verify within 2x of qemu-img compare; checksum of the sparse copy at
least 5x faster than xxh128sum), and deletes its directory.  Every command's
answer is checked once (equal / the same digest), so a fast wrong answer
aborts the run.

``--block-sizes`` also times the sparsefs1 engine in-process on the copy for
several block sizes (the digest fixes 1 MiB; this shows why), and ``--micro``
times ways of testing a 1 MiB buffer for all zeros.

This is a tool, not a test: it is never imported by the package or the tests.
The machine may be shared: other work on the CPU shows up as spread between
rounds, which is why medians are reported.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
CLUSTER = 64 * KiB
REPO = Path(__file__).resolve().parents[2]
SPARSEFS = [sys.executable, "-m", "sparsefs"]


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run(
    cmd: Sequence[str], *, ok_codes: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, cwd=REPO)
    if proc.returncode not in ok_codes:
        raise SystemExit(f"bench: {' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
    return proc


def extents(virtual_size: int, count: int, mean_len: int, seed: int) -> list[tuple[int, int]]:
    """``count`` non-overlapping cluster-aligned (offset, length) writes, lengths 64 KiB..2*mean."""
    rng = random.Random(seed)
    slot = 2 * mean_len
    slots = rng.sample(range(virtual_size // slot), count)
    out = []
    for s in sorted(slots):
        length = rng.randrange(CLUSTER, 2 * mean_len + 1, CLUSTER)
        shift = rng.randrange(0, slot - length + 1, CLUSTER)
        out.append((s * slot + shift, length))
    return out


def build(work: Path, virtual_size: int, data_size: int, count: int) -> tuple[Path, Path, int]:
    """The image, its sparse raw copy, and the bytes of data written."""
    image = work / "bench.qcow2"
    copy = work / "bench.raw"
    pattern = work / "random.bin"
    mean_len = data_size // count
    writes = extents(virtual_size, count, mean_len, seed=20260509)
    longest = max(length for _, length in writes)
    pattern.write_bytes(random.Random(1).randbytes(longest))
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(virtual_size)])
    script = "".join(f"write -q -s {pattern} {off} {length}\n" for off, length in writes)
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", str(image)],
        input=script + "quit\n",
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or proc.stderr.strip():
        raise SystemExit(f"bench: qemu-io failed: {proc.stderr or proc.stdout}")
    pattern.unlink()
    run(["qemu-img", "convert", "-O", "raw", str(image), str(copy)])
    return image, copy, sum(length for _, length in writes)


def timed(cmd: Sequence[str], ok_codes: tuple[int, ...] = (0,)) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = run(cmd, ok_codes=ok_codes)
    return time.perf_counter() - t0, proc.stdout


def fmt_s(seconds: float) -> str:
    return f"{seconds:7.3f} s"


def block_size_table(copy: Path, sizes: Sequence[int], rounds: int) -> None:
    sys.path.insert(0, str(REPO))
    from sparsefs import checksum
    from sparsefs.raw import RawFile

    print("\nsparsefs1 engine in-process on the sparse copy, by block size (median):")
    for bs in sizes:
        times = []
        for _ in range(rounds):
            with RawFile(copy) as raw:
                t0 = time.perf_counter()
                result = checksum.block_digest(raw, block_size=bs)
                times.append(time.perf_counter() - t0)
        print(
            f"  {bs // MiB:3d} MiB blocks: {fmt_s(statistics.median(times))}  "
            f"({result.bytes_read / MiB:.0f} MiB read)"
        )


def zero_test_table() -> None:
    import xxhash

    size = 1 * MiB
    buf = bytearray(os.urandom(size))
    buf[:] = bytes(size)  # a real, touched zero buffer (not the shared zero page)
    ref = bytes(size)
    methods: dict[str, Callable[[], object]] = {
        "buf == bytes(1 MiB)": lambda: buf == ref,
        "not buf.strip(b'\\0')": lambda: not buf.strip(b"\0"),
        "buf.count(0) == len(buf)": lambda: buf.count(0) == len(buf),
        "not any(buf)": lambda: not any(buf),
        "(hashing instead: xxh3_128_digest)": lambda: xxhash.xxh3_128_digest(buf),
    }
    print("\ntesting a 1 MiB all-zero buffer for zeros (best of 50):")
    for name, fn in methods.items():
        n = 3 if "any" in name else 50
        best = min(_once(fn) for _ in range(n))
        print(f"  {name:36s} {size / best / 1e9:7.1f} GB/s")


def _once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    assert fn()
    return time.perf_counter() - t0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--virtual-gib", type=int, default=16)
    parser.add_argument("--data-mib", type=int, default=600)
    parser.add_argument("--extents", type=int, default=300)
    parser.add_argument("--workdir", default="/dev/shm", help="parent of the work directory")
    parser.add_argument(
        "--block-sizes",
        action="store_true",
        help="also time the engine in-process for 1, 2, 4, 8 MiB blocks",
    )
    parser.add_argument("--micro", action="store_true", help="also time zero tests")
    return parser.parse_args()


Contenders = dict[str, tuple[list[str], tuple[int, ...]]]


def contenders(image: Path, copy: Path) -> Contenders:
    """Each contender's command line and the exit codes that mean success."""
    return {
        "sparsefs verify IMAGE COPY": (
            [*SPARSEFS, "verify", "-q", str(image), str(copy)],
            (0,),
        ),
        "qemu-img compare IMAGE COPY": (
            ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(copy)],
            (0,),
        ),
        "sparsefs checksum COPY": ([*SPARSEFS, "checksum", "-q", str(copy)], (0,)),
        "xxh128sum COPY": (["xxh128sum", str(copy)], (0,)),
        "sparsefs checksum IMAGE": ([*SPARSEFS, "checksum", "-q", str(image)], (0,)),
        "sparsefs checksum --stream-xxh128 COPY": (
            [*SPARSEFS, "checksum", "-q", "--stream-xxh128", str(copy)],
            (0,),
        ),
    }


def run_rounds(cmds: Contenders, rounds: int) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Every contender once a round, alternating the order; times and first outputs."""
    times: dict[str, list[float]] = {name: [] for name in cmds}
    outputs: dict[str, str] = {}
    for r in range(rounds):
        order = list(cmds)
        if r % 2:
            order.reverse()
        for name in order:
            cmd, ok = cmds[name]
            seconds, out = timed(cmd, ok)
            times[name].append(seconds)
            outputs.setdefault(name, out)
        log(f"round {r + 1}/{rounds} done")
    return times, outputs


def check_answers(outputs: dict[str, str]) -> tuple[str, str]:
    """The answers must agree before the times mean anything: (sparsefs1 digest, xxh128)."""
    digest_copy = outputs["sparsefs checksum COPY"].split()[0]
    digest_image = outputs["sparsefs checksum IMAGE"].split()[0]
    stream = outputs["sparsefs checksum --stream-xxh128 COPY"].split()[0]
    xxh = outputs["xxh128sum COPY"].split()[0]
    if (
        digest_copy != digest_image
        or stream != xxh
        or digest_copy not in outputs["sparsefs verify IMAGE COPY"]
    ):
        raise SystemExit(f"bench: answers disagree: {outputs}")
    return digest_copy, xxh


def print_report(
    args: argparse.Namespace, data: int, times: dict[str, list[float]], digests: tuple[str, str]
) -> None:
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"\nchecksum benchmark: {args.virtual_gib} GiB virtual, {data / MiB:.0f} MiB "
        f"data in {args.extents} extents, files on {args.workdir}, "
        f"{args.rounds} rounds, wall-clock medians (min..max)"
    )
    for name in times:
        print(f"  {name:40s} {fmt_s(med[name])}   ({min(times[name]):.3f}..{max(times[name]):.3f})")
    verify_ratio = med["sparsefs verify IMAGE COPY"] / med["qemu-img compare IMAGE COPY"]
    sum_ratio = med["xxh128sum COPY"] / med["sparsefs checksum COPY"]
    print(
        f"\n  verify / qemu-img compare       = {verify_ratio:5.2f}x the time "
        f"(target <= 2x): {'met' if verify_ratio <= 2 else 'MISSED'}"
    )
    print(
        f"  xxh128sum / sparsefs checksum   = {sum_ratio:5.1f}x faster "
        f"(target >= 5x): {'met' if sum_ratio >= 5 else 'MISSED'}"
    )
    print(f"  digest {digests[0]}; xxh128 {digests[1]}")


def main() -> int:
    args = parse_args()
    for tool in ("qemu-img", "qemu-io", "xxh128sum"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is not installed")
    work = Path(tempfile.mkdtemp(prefix="sparsefs-checksum-bench-", dir=args.workdir))
    try:
        log(f"building in {work} ...")
        t0 = time.perf_counter()
        image, copy, data = build(work, args.virtual_gib * GiB, args.data_mib * MiB, args.extents)
        log(
            f"built in {time.perf_counter() - t0:.1f} s: {args.virtual_gib} GiB virtual, "
            f"{data / MiB:.0f} MiB data in {args.extents} extents; copy stores "
            f"{os.stat(copy).st_blocks * 512 / MiB:.0f} MiB"
        )
        times, outputs = run_rounds(contenders(image, copy), args.rounds)
        print_report(args, data, times, check_answers(outputs))
        if args.block_sizes:
            block_size_table(copy, (1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB), args.rounds)
        if args.micro:
            zero_test_table()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
