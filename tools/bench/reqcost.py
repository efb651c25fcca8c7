#!/usr/bin/env python3
"""Daemon CPU per FUSE request (issue 12): robust to other load, unlike wall time.

Run from the repository root with the project's interpreter::

    .venv/bin/python tools/bench/reqcost.py                  # cp and cat of a small W2
    .venv/bin/python tools/bench/reqcost.py --null           # the same through a do-nothing fs
    .venv/bin/python tools/bench/reqcost.py --tool cat --count 64 --max-len 1024

For each run it mounts the image afresh, reads the daemon's utime+stime from
/proc/PID/stat, runs the copier, reads it again, and divides by the number of
FUSE requests, which a second run counts with ``strace -c -f`` on the daemon
(reads of /dev/fuse that returned a request; strace slows that run, so its CPU
is not used).  ``--null`` serves the same extent layout from a do-nothing
pyfuse3 filesystem (:mod:`nullfs`), the floor set by pyfuse3, trio and the
kernel round trip.

This is a tool, not a test: it is never imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench

KiB = bench.KiB
MiB = bench.MiB
GiB = bench.GiB


@contextlib.contextmanager
def null_mount(image: Path, base: Path, direct: bool, poll_us: int) -> Iterator[bench.Mounted]:
    """The do-nothing filesystem over IMAGE's extent layout; always unmounted."""
    mp = Path(tempfile.mkdtemp(prefix="nullfs-", dir=base))
    ready = mp / ".ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve().parent / "nullfs.py"),
            str(image),
            str(mp),
            *(["direct"] if direct else []),
            f"poll={poll_us}",
        ],
        cwd=bench.REPO,
    )
    try:
        deadline = time.monotonic() + 60
        while not bench.is_mounted(mp):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("reqcost: nullfs did not mount")
            time.sleep(0.05)
        del ready
        yield bench.Mounted(mp / "disk.raw", proc.pid, 0.0)
    finally:
        if bench.is_mounted(mp):
            subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        with contextlib.suppress(OSError):
            mp.rmdir()


def copier(tool: str, src: Path, out: Path) -> list[str]:
    """The command line of one copier."""
    if tool == "cp":
        return ["cp", "--sparse=always", str(src), str(out)]
    if tool == "cat":
        return ["sh", "-c", f"cat '{src}' > /dev/null"]
    if tool == "dd128":  # what cp does to a 4 KiB-blksize destination, without seeking
        return ["dd", f"if={src}", "of=/dev/null", "bs=128k", "status=none"]
    if tool == "rsync":
        return ["rsync", "--sparse", str(src), str(out)]
    raise SystemExit(f"reqcost: unknown tool {tool}")


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def count_requests(pid: int, cmd: list[str]) -> dict[str, int]:
    """Run ``cmd`` while strace counts the daemon's syscalls; {syscall: calls}."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        st = subprocess.Popen(
            ["strace", "-c", "-f", "-q", "-o", out.name, "-p", str(pid)],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # let strace attach to every thread
        subprocess.run(cmd, check=True)
        st.send_signal(signal.SIGINT)
        st.wait()
        counts: dict[str, int] = {}
        for line in out.read().splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)$", line)
            if m:
                counts[m.group(3)] = int(m.group(1))
        return counts


def measure(args: argparse.Namespace, image: Path, base: Path, shm: Path) -> None:
    mount: Any
    if args.null:
        mount = lambda: null_mount(image, base, args.direct, args.busy_poll)  # noqa: E731  # deferred mount
    elif args.qsd:
        mount = lambda: bench.qsd_mount(image, base)  # noqa: E731  # deferred mount
    else:
        opts = [*args.sparsefs_opt, f"--busy-poll={args.busy_poll}"]
        mount = lambda: bench.sparsefs_mount(image, base, opts)  # noqa: E731  # deferred mount
    out = shm / "reqcost.out"
    cpus = []
    for _ in range(args.rounds):
        with mount() as m:
            assert m.pid is not None
            u0, s0 = cpu_split(m.pid)
            subprocess.run(copier(args.tool, m.file, out), check=True)
            u1, s1 = cpu_split(m.pid)
            cpus.append((u1 - u0 + s1 - s0, u1 - u0, s1 - s0))
        out.unlink(missing_ok=True)
    with mount() as m:
        assert m.pid is not None
        counts = count_requests(m.pid, copier(args.tool, m.file, out))
    out.unlink(missing_ok=True)
    # Each request is answered by one writev (or a splice/write); reads include EAGAIN ones.
    replies = counts.get("writev", 0) + counts.get("write", 0)
    cpu, user, system = sorted(cpus)[len(cpus) // 2]
    n = max(replies, 1)
    who = "null" if args.null else "qsd" if args.qsd else "sparsefs"
    print(
        f"{who} {args.tool}: daemon CPU {cpu:.3f} s "
        f"(rounds {', '.join(f'{c[0]:.2f}' for c in cpus)}), replies {replies}, "
        f"{cpu / n * 1e6:.1f} us per request (user {user / n * 1e6:.1f}, "
        f"system {system / n * 1e6:.1f})"
    )
    print(
        "  syscalls: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:10])
    )


def _run_sync(coro: Any) -> Any:
    """Run a handler coroutine that never suspends, as the patched pyfuse3 loop does."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    except Exception as exc:  # FUSEError (ENXIO) is an answer too
        return exc
    raise RuntimeError("the handler suspended")


def handler_costs(image: Path) -> None:
    """CPU µs per call of the sparsefs handlers, in-process (no FUSE, no kernel)."""
    import trio

    from sparsefs.formats.qcow2 import open_image
    from sparsefs.fusefs import SparseFS
    from sparsefs.options import OpenOptions

    subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)  # page cache
    with open_image(str(image), OpenOptions()) as src:
        ops = SparseFS({"disk.raw": src})
        ops.precompute()
        inode = next(iter(ops._nodes))
        index = ops._nodes[inode].index
        assert index is not None
        pairs = [(index._bounds[i], index._bounds[i + 1]) for i in range(0, len(index._bounds), 2)]
        data = [(s, min(e - s, 64 * KiB)) for s, e in pairs]
        holes = [(e, MiB) for _, e in pairs if index.is_hole(e, min(e + MiB, src.size))]

        def cost(label: str, calls: list[Any]) -> None:
            t0 = time.process_time()
            for make in calls:
                _run_sync(make())
            us = (time.process_time() - t0) / len(calls) * 1e6
            print(f"  {label}: {us:.1f} us per call ({len(calls)} calls)")

        async def run_all() -> None:  # in trio, as the mount runs them (read-ahead needs it)
            print(f"handlers, in-process, {len(pairs)} data extents:")
            cost(
                "lseek SEEK_DATA",
                [lambda o=s: ops.lseek(inode, inode, o, os.SEEK_DATA) for s, _ in pairs] * 4,
            )
            cost(
                "lseek SEEK_HOLE",
                [lambda o=s: ops.lseek(inode, inode, o, os.SEEK_HOLE) for s, _ in pairs] * 4,
            )
            cost("read hole 1 MiB", [lambda o=o, n=n: ops.read(inode, o, n) for o, n in holes] * 4)
            cost(
                "read data 64 KiB (page cache)",
                [lambda o=o, n=n: ops.read(inode, o, n) for o, n in data] * 2,
            )

        trio.run(run_all)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tool", default="cp", choices=("cp", "cat", "rsync", "dd128"))
    p.add_argument("--null", action="store_true", help="serve from the do-nothing nullfs")
    p.add_argument("--direct", action="store_true", help="nullfs opens with direct_io")
    p.add_argument("--qsd", action="store_true", help="measure qemu-storage-daemon's export")
    p.add_argument(
        "--busy-poll",
        type=int,
        default=100,
        metavar="USEC",
        help="the FUSE loop's polling window, for sparsefs and nullfs alike (default 100, "
        "sparsefs's own default with two CPUs; 0: none, the loop as before)",
    )
    p.add_argument(
        "--handlers", action="store_true", help="time the sparsefs handlers in-process instead"
    )
    p.add_argument("--virtual-gib", type=int, default=4)
    p.add_argument("--count", type=int, default=8192, help="data extents")
    p.add_argument("--max-len", type=int, default=64, help="max extent length in KiB")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--image", type=Path, help="measure this qcow2 image instead of building one")
    p.add_argument("--sparsefs-opt", action="append", default=[])
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsefs-bench",
    )
    args = p.parse_args(argv)
    spec = bench.ImageSpec(
        "reqcost", args.virtual_gib * GiB, "scatter", args.count, 64 * KiB, args.max_len * KiB
    )
    args.work_dir.mkdir(parents=True, exist_ok=True)
    image = args.image or bench.build_image(spec, args.work_dir)
    if args.handlers:
        handler_costs(image)
        return 0
    with (
        tempfile.TemporaryDirectory(prefix="reqcost-") as base,
        tempfile.TemporaryDirectory(prefix="reqcost-", dir="/dev/shm") as shm,
    ):
        measure(args, image, Path(base), Path(shm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
