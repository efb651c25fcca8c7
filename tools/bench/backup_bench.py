#!/usr/bin/env python3
"""Backup benchmark: ``sparsefs backup`` against ``qemu-img convert`` and ``nbdcopy``.

Run from the repository root, alone on the machine::

    .venv/bin/python tools/bench/backup_bench.py                  # all workloads, 5 rounds
    .venv/bin/python tools/bench/backup_bench.py --workloads W1,FS --rounds 7 --json out.json

Images come from tools/bench/bench.py's builders (cached in
``~/.cache/sparsefs-bench``): W1, W2 and W3 as there, FS the aged ext4
filesystem image, P1/P2 the 16 GiB preallocated images (metadata / falloc,
~600 MiB written).  Every contender writes to /dev/shm (a fresh directory per
run, deleted after), so disk writeback stays out of the timing; the image
files are read once before the first round so all contenders find them in the
page cache alike.  Contenders run in alternating order, medians are printed.

Contenders:
    backup         ``sparsefs backup -q IMAGE DEST`` (copy, verify from storage,
                   SPARSEFS-SUMS)
    backup+xxh128  the same with ``--xxh128sums`` (the extra cost of XXH128SUMS)
    convert        ``qemu-img convert -O raw IMAGE DEST/x.raw``
    nbdcopy        ``nbdcopy -- [ qemu-nbd -r -f qcow2 IMAGE ] DEST/x.raw``
    convert+compare  convert, then ``qemu-img compare IMAGE DEST/x.raw``: what QEMU's
                   tools take to give a copy checked against its image (the check
                   reads the copy through the page cache, a weaker check than backup's)
    checksum       ``sparsefs checksum IMAGE`` (P1/P2: reads only the data)
    verify         ``sparsefs verify IMAGE COPY`` against the backup's copy (P1/P2)

Every output of round 1 is compared with qemu-img convert's (their data segments).
This is a tool, not a test: it is never imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

SHM = Path("/dev/shm")
TARGETS = {"W1": 1.0, "W2": 1.0, "FS": 1.0, "W3": 1.5}


def images(work: Path, names: list[str]) -> dict[str, Path]:
    """Build (or find cached) the images of the named workloads."""
    specs = {w.name: w.image for w in bench.workloads(False).values()}
    out: dict[str, Path] = {}
    for name in names:
        if name == "FS":
            out[name] = bench.build_aged_ext4(work)
        elif name in ("P1", "P2"):
            out[name] = bench.build_image(bench.preallocated_spec(name), work)
        else:
            spec = specs[name]
            assert isinstance(spec, bench.ImageSpec), name
            out[name] = bench.build_image(spec, work)
    return out


def contenders(workload: str) -> list[str]:
    base = ["backup", "convert", "nbdcopy", "convert+compare"]
    if workload in ("W1", "W3"):
        base.append("backup+xxh128")
    if workload in ("P1", "P2"):
        base += ["checksum", "verify"]
    return base


def run_one(contender: str, image: Path, dest: Path, ref_copy: Path | None) -> float:
    """Run one contender into the empty directory ``dest``; return its wall time."""
    sparsefs = [sys.executable, "-m", "sparsefs"]
    if contender == "backup":
        cmd = [*sparsefs, "backup", "-q", str(image), str(dest)]
    elif contender == "backup+xxh128":
        cmd = [*sparsefs, "backup", "-q", "--xxh128sums", str(image), str(dest)]
    elif contender == "convert":
        cmd = ["qemu-img", "convert", "-O", "raw", str(image), str(dest / "x.raw")]
    elif contender == "convert+compare":
        out = str(dest / "x.raw")
        cmd = [
            "sh",
            "-c",
            'qemu-img convert -O raw "$1" "$2" && qemu-img compare -q -f qcow2 -F raw "$1" "$2"',
            "convert+compare",
            str(image),
            out,
        ]
    elif contender == "nbdcopy":
        cmd = [
            "nbdcopy",
            "--",
            "[",
            "qemu-nbd",
            "-r",
            "-f",
            "qcow2",
            str(image),
            "]",
            str(dest / "x.raw"),
        ]
    elif contender == "checksum":
        cmd = [*sparsefs, "checksum", "-q", str(image)]
    elif contender == "verify":
        assert ref_copy is not None
        cmd = [*sparsefs, "verify", "-q", str(image), str(ref_copy)]
    else:
        raise ValueError(contender)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=bench.REPO)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench: {contender} failed on {image.name}: {proc.stderr.strip()}")
    return elapsed


def output_of(contender: str, dest: Path, image: Path) -> Path | None:
    if contender.startswith("backup"):  # the set's one point of the one disk
        disk = image.name.removesuffix(".qcow2")
        return next((dest / disk).glob(f"{disk}@*.raw"))
    if contender in ("convert", "nbdcopy", "convert+compare"):
        return dest / "x.raw"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="W1,W2,W3,FS,P1,P2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "sparsefs-bench")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    imgs = images(args.work_dir, names)
    results: dict[str, dict[str, list[float]]] = {}
    for name in names:
        image = imgs[name]
        bench.log(f"{name}: {image.name}")
        bench.drop_caches()  # the same memory state for every workload
        subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)  # warm
        ref_dir = Path(tempfile.mkdtemp(prefix="ref-", dir=SHM))
        try:
            ref = ref_dir / "ref.raw"
            bench.run(["qemu-img", "convert", "-O", "raw", str(image), str(ref)])
            samples: dict[str, list[float]] = {c: [] for c in contenders(name)}
            order = list(samples)
            for rnd in range(args.rounds):
                for contender in order if rnd % 2 == 0 else reversed(order):
                    bench.compact_memory()  # the same memory state for every contender
                    dest = Path(tempfile.mkdtemp(prefix="out-", dir=SHM))
                    try:
                        samples[contender].append(run_one(contender, image, dest, ref))
                        out = output_of(contender, dest, image)
                        if rnd == 0 and out is not None:
                            # Data segments only: cmp of a 1 TiB file reads 1 TiB of zeros.
                            problem = bench.same_content(out, ref)
                            if problem is not None:
                                raise SystemExit(f"bench: {contender} copy of {name}: {problem}")
                    finally:
                        shutil.rmtree(dest, ignore_errors=True)
                bench.log(
                    f"  round {rnd + 1}: "
                    + ", ".join(f"{c} {v[-1]:.3f}" for c, v in samples.items())
                )
            results[name] = samples
        finally:
            shutil.rmtree(ref_dir, ignore_errors=True)
    print_table(results, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def print_table(results: dict[str, dict[str, list[float]]], rounds: int) -> None:
    print(
        f"sparsefs backup benchmark: {rounds} rounds, medians (s), copies on /dev/shm, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'wl':4} {'contender':14} {'median':>8} {'min':>8} {'max':>8} {'/convert':>9} "
        f"{'/nbdcopy':>9}  target"
    )
    for name, samples in results.items():
        med = {c: statistics.median(v) for c, v in samples.items()}
        for c, v in samples.items():
            target = ""
            if c == "backup" and name in TARGETS:
                ok = med[c] / med["convert"] <= TARGETS[name]
                target = f"<={TARGETS[name]}x convert {'pass' if ok else 'MISS'}"
            if c == "backup+xxh128":
                target = f"xxh128 costs +{med[c] - med['backup']:.3f} s"
            print(
                f"{name:4} {c:14} {med[c]:8.3f} {min(v):8.3f} {max(v):8.3f} "
                f"{med[c] / med['convert']:9.2f} {med[c] / med['nbdcopy']:9.2f}  {target}"
            )


if __name__ == "__main__":
    sys.exit(main())
