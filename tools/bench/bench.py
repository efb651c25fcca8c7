#!/usr/bin/env python3
"""The sparsefs benchmark harness (issue 7): sparsefs against qemu's own tools.

Run from the repository root with the project's interpreter::

    .venv/bin/python tools/bench/bench.py                 # full run, 5 rounds
    .venv/bin/python tools/bench/bench.py --quick         # small images, 3 rounds
    .venv/bin/python tools/bench/bench.py --workloads W1,W3 --rounds 7 --json out.json
    .venv/bin/python tools/bench/bench.py --cold           # W1, W7 and the group, cold
    .venv/bin/python tools/bench/bench.py --workloads W1 --taskset 0 --backup-group

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
    R   restore points over nights (issue 21): its own script,
        tools/bench/points_bench.py (backups, the newest point of a chain through
        the set mount and by restore, prune)

Cold mode (``--cold``, issue 22; root; W1 and W7 only): ``sync; echo 3 >
/proc/sys/vm/drop_caches`` before every contender's round, the images on the disk
of the work directory (refused on tmpfs), copies still on /dev/shm.  W1 and W7 then
also run the backup/checksum group (tools/bench/group.py: backup, convert+compare,
checksum, verify, compare, xxh128sum; ``--backup-group`` runs it warm).  Every
timed command is measured with /proc/diskstats of that disk (average queue depth,
read MiB, read requests, average request size) and, through a mount, with the
daemon's CPU and read system calls (/proc/PID/io ``syscr``).  A per-contender table
shows them with issue 22's targets.  ``--taskset CPUS`` pins the bench and so every
process it starts (daemons, copiers, qemu-img) to CPUS.  The warm table is unchanged
without these options.  Ctrl-C or SIGTERM: mounts are unmounted, daemons stopped,
copies deleted, and what was measured is reported.

Every output is checked once (first round) against the warm-up convert: the
byte ranges where either file stores data must be equal, which is the whole
file since both read as zeros elsewhere.  A contender that copies wrong bytes
aborts the run.

Modules: workloads.py (the images), contenders.py (mounts, copies, daemon
costs), group.py (the backup/checksum group), probes.py (/proc and /sys:
processes, mounts, diskstats), report.py (medians, ratios, targets, the tables,
JSON), common.py (helpers); this file is the entry point.  Other bench scripts import this
module for the names in ``__all__``.

This is a tool, not a test: it is never imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from common import (
    REPO,
    GiB,
    KiB,
    MiB,
    compact_memory,
    drop_caches,
    human,
    log,
    run,
    same_content,
)
from contenders import Bench, Mounted, qsd_mount, sparsefs_mount
from group import GROUP
from probes import disk_of, is_mounted
from report import (
    contender_rows,
    print_contender_table,
    print_header,
    print_table,
    rows,
    to_json,
)
from workloads import (
    AgedFsSpec,
    ImageSpec,
    Workload,
    build_aged_ext4,
    build_image,
    image_format,
    image_layout,
    preallocated_spec,
    workloads,
)

# What tools/bench/backup_bench.py and reqcost.py use as ``bench.NAME``.
__all__ = [
    "REPO",
    "GiB",
    "ImageSpec",
    "KiB",
    "MiB",
    "Mounted",
    "build_aged_ext4",
    "build_image",
    "compact_memory",
    "drop_caches",
    "is_mounted",
    "log",
    "main",
    "preallocated_spec",
    "qsd_mount",
    "run",
    "same_content",
    "sparsefs_mount",
    "workloads",
]


def run_workload(bench: Bench, wl: Workload) -> None:
    """Build the workload's image, make the reference copy, run every round."""
    if isinstance(wl.image, AgedFsSpec):
        image = build_aged_ext4(bench.work_dir, wl.image)
        virtual, data, extents = image_layout(image)
    else:
        image = build_image(wl.image, bench.work_dir)
        virtual, data = wl.image.virtual_size, wl.image.data_bytes()
        extents = len(wl.image.extents())
    bench.info[wl.name] = {
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
    ref = bench.out_path(f"{wl.name}-reference.raw")
    run(["qemu-img", "convert", "-f", image_format(image), "-O", "raw", str(image), str(ref)])
    try:
        order = list(wl.contenders)
        for rnd in range(bench.args.rounds):
            # Alternate: each round starts with the next contender.
            k = rnd % len(order)
            for who in order[k:] + order[:k]:
                bench.run_contender(wl, who, image, ref, rnd)
            log(
                f"{wl.name}: round {rnd + 1}/{bench.args.rounds}: "
                + ", ".join(
                    f"{who} {bench.results[wl.name][who].values['copy_s'][-1]:.2f} s"
                    for who in order
                )
            )
    finally:
        ref.unlink(missing_ok=True)


def preflight(args: argparse.Namespace) -> None:
    tools = ["qemu-img", "qemu-io", "qemu-storage-daemon", "cp", "rsync", "fusermount3"]
    if args.cold or args.backup_group:
        tools.append("xxh128sum")
    if args.taskset:
        tools.append("taskset")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"bench: missing tools: {', '.join(missing)} (see tools/setup)")
    if not os.path.exists("/dev/fuse"):
        raise SystemExit("bench: /dev/fuse is missing")
    if not os.path.isdir("/dev/shm"):
        raise SystemExit("bench: /dev/shm is missing (copies are written there)")
    if args.cold:
        drop_caches(strict=True)  # fails here, before any image is built, if it must


ALL_WORKLOADS = "W1,W2,W3,W4,W5,W6,W7,P1,P2,V1,X1"
COLD_WORKLOADS = ("W1", "W7")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark sparsefs against qemu-storage-daemon's FUSE export and "
        "qemu-img convert (issue 7). Prints medians, ratios and targets."
    )
    p.add_argument("--rounds", type=int, help="rounds per workload (default 5, 3 with --quick)")
    p.add_argument(
        "--workloads",
        help=f"comma-separated subset of W1..W7, P1, P2, V1, X1 (default: all, {ALL_WORKLOADS}; "
        "with --cold W1,W7; the targets of P1/P2/V1/X1 compare with W1, so run W1 with them)",
    )
    p.add_argument("--quick", action="store_true", help="small images: a smoke run")
    p.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache (sync; echo 3 > /proc/sys/vm/drop_caches) before every "
        "contender's round, measure the disk's queue depth, run the backup/checksum group "
        "(issue 22); W1 and W7 only, images on a disk (not tmpfs), as root",
    )
    p.add_argument(
        "--backup-group",
        action="store_true",
        help="also run the backup/checksum group (tools/bench/group.py) on W1 and W7 and "
        "print the per-contender table with issue 22's warm targets (implied by --cold)",
    )
    p.add_argument(
        "--taskset",
        metavar="CPUS",
        help="run every contender, daemons and copiers alike, on these CPUs (taskset -c "
        "CPUS, e.g. 0: one core shared)",
    )
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
    if args.workloads is None:
        args.workloads = ",".join(COLD_WORKLOADS) if args.cold else ALL_WORKLOADS
    return args


def chosen_workloads(args: argparse.Namespace) -> list[Workload]:
    """The workloads asked for, W1 and W7 with the backup/checksum group when wanted."""
    wanted = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    all_wl = workloads(args.quick)
    unknown = [w for w in wanted if w not in all_wl]
    if unknown:
        raise SystemExit(f"bench: unknown workloads {', '.join(unknown)} (W1..W7, P1, P2, V1, X1)")
    not_cold = [w for w in wanted if w not in COLD_WORKLOADS]
    if args.cold and not_cold:
        raise SystemExit(f"bench: --cold runs W1 and W7 only, not {', '.join(not_cold)}")
    out = []
    for name in wanted:
        wl = all_wl[name]
        if (args.cold or args.backup_group) and name in COLD_WORKLOADS:
            wl = dataclasses.replace(wl, contenders=wl.contenders + GROUP)
        out.append(wl)
    return out


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: unmount, stop, delete copies


def report(bench: Bench) -> None:
    """The table (warm), the per-contender table (cold, or the group asked for), JSON."""
    args = bench.args
    table = rows(bench)
    doc = to_json(bench, table)
    per_contender = args.cold or args.backup_group
    if per_contender or args.taskset:
        doc |= {"cold": args.cold, "taskset": args.taskset, "disk": bench.disk}
        doc |= {"pins": bench.pins}
        doc["contenders"] = [dataclasses.asdict(r) for r in contender_rows(bench)]
    if args.json == "-":
        json.dump(doc, sys.stdout, indent=2)
        print()
        return
    if args.cold:
        print_header(bench)
    else:
        print_table(bench, table)
    if per_contender:
        print_contender_table(bench, contender_rows(bench))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = chosen_workloads(args)
    preflight(args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    disk = disk_of(args.work_dir) if args.cold else None
    if args.taskset:
        # Inherited by every process the bench starts: daemons, copiers, qemu-img.
        run(["taskset", "-cp", args.taskset, str(os.getpid())])
    signal.signal(signal.SIGTERM, _interrupted)
    with (
        tempfile.TemporaryDirectory(prefix="sparsefs-bench-") as mount_base,
        tempfile.TemporaryDirectory(prefix="sparsefs-bench-", dir=args.shm_dir) as out_dir,
    ):
        bench = Bench(args, args.work_dir, Path(mount_base), Path(out_dir), disk=disk)
        try:
            for wl in chosen:
                run_workload(bench, wl)
        except KeyboardInterrupt:
            log("interrupted; reporting what was measured")
    report(bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
