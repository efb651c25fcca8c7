#!/usr/bin/env python3
"""Workload R (issue 21): restore points on W1 over nights, all in one run.

    .venv/bin/python tools/bench/points_bench.py [--quick] [--nights 10] [--rounds 3]
        [--chain 30] [--workdir DIR] [--json OUT]

W1 (16 GiB virtual, ~600 MiB data; ``--quick``: tools/bench's w1q, 2 GiB) is built
by tools/bench/workloads.py and copied into the work directory (it is written to).
Sets and copies live on /dev/shm.  A full point starts two sets (B: bitmap deltas,
D: digest deltas) and ``qemu-img bitmap --add`` starts the bitmap; then each night
1% of the image's allocated clusters (seeded) is rewritten, and, in alternating
order, ``backup --since`` adds a delta to B, ``backup`` a digest delta to D, and
``backup`` a full point to a fresh set F.  Reported, medians over the nights:

- full backup, bitmap delta (target <= 0.3x full), digest delta (<= 1.0x full)
  and the bytes it wrote (<= 2x the changed clusters; every byte the run wrote);

then, after the nights, each over ``--rounds`` rounds (a fresh mount each round):

- D's newest point through ``sparsefs mount D MNT`` with ``cp --sparse=always``,
  and by ``sparsefs restore``, against the same for F's single full point of the
  same content (target <= 1.5x);
- ``prune --keep-last`` dropping 5 points of a copy of D: the oldest five (the full
  point merged into its successor, target <= 1.0x a full backup), and five deltas
  in the middle of the chain (``--keep-last 5 --keep-monthly 1``: the full point stays);
- with ``--chain N``: D grown to N deltas by digest runs, and its newest point read
  again by cp through the mount and by restore (issue 21: <= 1.5x a full point).

Every newest point is checked against F's full point with ``qemu-img compare``,
and every copy against F's point (byte ranges, tools/bench/common.same_content).

This is a tool, not a test: it is never imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import CLUSTER, REPO, human, log, run, same_content
from workloads import ImageSpec, build_image, workloads

SPARSEFS = [sys.executable, "-m", "sparsefs"]
SHM = Path("/dev/shm")
Metrics = dict[str, float]


def measured(cmd: list[str]) -> Metrics:
    """Run ``cmd`` (must succeed): wall and CPU seconds, bytes read and written (rchar/wchar)."""
    script = '"$@"; rc=$?; grep -E "^(rchar|wchar):" /proc/$$/io >&2; exit $rc'
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.run(["sh", "-c", script, "sh", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = os.times()
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed: {proc.stderr.strip()}")
    io = dict(line.split(": ") for line in proc.stderr.splitlines()[-2:])
    cpu = after.children_user - before.children_user
    cpu += after.children_system - before.children_system
    return {"wall": wall, "cpu": cpu, "read": int(io["rchar"]), "written": int(io["wchar"])}


def newest(dest: Path) -> Path:
    """The newest point's file of the one disk of the set at ``dest``."""
    doc = json.loads((dest / "SPARSEFS-SET.json").read_text())
    (disk,) = doc["disks"].values()
    return dest / str(disk["points"][-1]["file"])


def point_count(dest: Path) -> int:
    doc = json.loads((dest / "SPARSEFS-SET.json").read_text())
    (disk,) = doc["disks"].values()
    return len(disk["points"])


def allocated_clusters(image: Path) -> list[int]:
    """Guest offsets of the image's allocated 64 KiB clusters (``qemu-img map``)."""
    out = run(["qemu-img", "map", "--output=json", str(image)]).stdout
    clusters: list[int] = []
    for e in json.loads(out):
        if e["data"]:
            clusters += range(e["start"], e["start"] + e["length"], CLUSTER)
    return clusters


def change(image: Path, rng: random.Random, clusters: list[int], pattern: int) -> int:
    """Rewrite 1% of ``clusters`` with ``pattern`` (qemu-io); the bytes changed."""
    picked = rng.sample(clusters, max(1, len(clusters) // 100))
    cmds = [a for off in picked for a in ("-c", f"write -q -P {pattern} {off} {CLUSTER}")]
    run(["qemu-io", "-f", "qcow2", *cmds, str(image)])
    return len(picked) * CLUSTER


class Run:
    """One run of workload R: paths, samples, the night loop and the reads."""

    def __init__(self, image: Path, shm: Path, rounds: int) -> None:
        self.image = image
        self.shm = shm
        self.rounds = rounds
        self.bsets, self.dsets, self.fsets = shm / "B", shm / "D", shm / "F"
        self.samples: dict[str, list[Metrics]] = {}
        self.changed: list[int] = []

    def add(self, name: str, metrics: Metrics) -> None:
        self.samples.setdefault(name, []).append(metrics)

    def backup(self, dest: Path, *extra: str) -> Metrics:
        return measured([*SPARSEFS, "backup", "-q", *extra, str(self.image), str(dest)])

    def full(self) -> Metrics:
        shutil.rmtree(self.fsets, ignore_errors=True)
        self.fsets.mkdir()
        return self.backup(self.fsets)

    def nights(self, count: int, rng: random.Random, clusters: list[int]) -> None:
        """The first points, then ``count`` nights of three contenders each."""
        for dest in (self.bsets, self.dsets):
            dest.mkdir()
            self.backup(dest)
        run(["qemu-img", "bitmap", "--add", str(self.image), "nightly"])
        runs: dict[str, Callable[[], Metrics]] = {
            "backup --since (bitmap delta)": lambda: self.backup(self.bsets, "--since", "nightly"),
            "backup (digest delta)": lambda: self.backup(self.dsets),
            "backup (full point)": self.full,
        }
        order = list(runs)
        for night in range(count):
            self.changed.append(change(self.image, rng, clusters, 0xC0 + night % 60))
            first = night % len(order)
            for name in order[first:] + order[:first]:
                self.add(name, runs[name]())
            run(["qemu-img", "bitmap", "--clear", str(self.image), "nightly"])
            full_point = newest(self.fsets)
            for dest in (self.bsets, self.dsets):
                run(["qemu-img", "compare", "-q", "-F", "raw", str(newest(dest)), str(full_point)])
            log(f"night {night + 1}/{count} done")

    def read_newest(self, label: str) -> None:
        """cp through the set mount and restore: D's newest point against F's full point."""
        reference = newest(self.fsets)
        for rnd in range(self.rounds):
            contenders = [("chain", self.dsets), ("full", self.fsets)]
            for who, dest in contenders if rnd % 2 == 0 else contenders[::-1]:
                self.add(f"{label} mount+cp ({who})", self.mount_cp(dest, reference))
                self.add(f"{label} restore ({who})", self.restore(dest, reference))

    def mount_cp(self, dest: Path, reference: Path) -> Metrics:
        mp = Path(tempfile.mkdtemp(prefix="mnt-", dir=self.shm))
        out = self.shm / "copy.raw"
        run([*SPARSEFS, "mount", str(dest), str(mp)], cwd=REPO)
        try:
            got = measured(["cp", "--sparse=always", str(mp / "w.raw"), str(out)])
        finally:
            subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
            time.sleep(0.2)
            mp.rmdir()
        self.check(out, reference)
        return got

    def restore(self, dest: Path, reference: Path) -> Metrics:
        out = self.shm / "restored.raw"
        got = measured([*SPARSEFS, "restore", "-q", str(dest), "w", str(out)])
        self.check(out, reference)
        return got

    def check(self, out: Path, reference: Path) -> None:
        problem = same_content(out, reference)
        out.unlink()
        if problem is not None:
            raise SystemExit(f"bench: {out} differs from {reference}: {problem}")

    def prune(self, label: str, rules: list[str]) -> None:
        """Prune a copy of D with ``rules`` (``--rounds`` times, a fresh copy each)."""
        before = point_count(self.dsets)
        for _ in range(self.rounds):
            copy = self.shm / "D-prune"
            shutil.rmtree(copy, ignore_errors=True)
            run(["cp", "-a", "--sparse=always", str(self.dsets), str(copy)])
            self.add(label, measured([*SPARSEFS, "prune", "-q", str(copy), *rules]))
            dropped = before - point_count(copy)
            if dropped != 5:
                raise SystemExit(f"bench: prune {' '.join(rules)} dropped {dropped} points, not 5")
            full_point = newest(self.fsets)
            run(["qemu-img", "compare", "-q", "-F", "raw", str(newest(copy)), str(full_point)])
            shutil.rmtree(copy)

    def grow_chain(self, deltas: int, rng: random.Random, clusters: list[int]) -> None:
        """More digest deltas into D until it holds ``deltas`` deltas; F follows the image."""
        while point_count(self.dsets) - 1 < deltas:
            self.changed.append(change(self.image, rng, clusters, 0x40 + point_count(self.dsets)))
            self.backup(self.dsets)
        self.full()


def median(samples: list[Metrics]) -> Metrics:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def report(r: Run, args: argparse.Namespace, spec: ImageSpec) -> dict[str, object]:
    """Print the table and the targets; return them for --json."""
    med = {name: median(s) for name, s in r.samples.items()}
    full = med["backup (full point)"]["wall"]
    changed = statistics.median(r.changed)
    print(
        f"R: {spec.label} ({human(spec.virtual_size)} virtual, {human(spec.data_bytes())} data), "
        f"{human(changed)} changed per night (1% of clusters), {args.nights} nights, "
        f"reads and prunes: medians of {args.rounds} rounds; sets and copies on /dev/shm"
    )
    print(f"| {'contender':<44} | {'wall s':>7} | {'x full':>6} | {'CPU s':>6} | {'written':>9} |")
    print(f"|{'-' * 46}|{'-' * 9}|{'-' * 8}|{'-' * 8}|{'-' * 11}|")
    for name, m in med.items():
        print(
            f"| {name:<44} | {m['wall']:7.3f} | {m['wall'] / full:6.2f} | {m['cpu']:6.2f} | "
            f"{human(m['written']):>9} |"
        )
    targets = [
        ("bitmap delta <= 0.3x full", med["backup --since (bitmap delta)"]["wall"] / full, 0.3),
        ("digest delta <= 1.0x full", med["backup (digest delta)"]["wall"] / full, 1.0),
        ("digest delta writes <= 2x changed", med["backup (digest delta)"]["written"] / changed, 2),
    ]
    for label in [k[: -len(" mount+cp (chain)")] for k in med if k.endswith("mount+cp (chain)")]:
        for how in ("mount+cp", "restore"):
            ratio = med[f"{label} {how} (chain)"]["wall"] / med[f"{label} {how} (full)"]["wall"]
            targets.append((f"{label} {how} <= 1.5x a full point", ratio, 1.5))
    prune_oldest = med.get("prune 5 oldest (full merged)")
    if prune_oldest is not None:
        targets.append(("prune of 5 points <= 1.0x full", prune_oldest["wall"] / full, 1.0))
    for what, ratio, limit in targets:
        print(f"target: {what}: {ratio:.2f}x {'pass' if ratio <= limit else 'MISS'}")
    return {
        "medians": med,
        "targets": [{"what": w, "ratio": round(x, 3), "pass": x <= lim} for w, x, lim in targets],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="w1q (2 GiB) instead of W1")
    p.add_argument("--nights", type=int, default=10, help="nights (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of reads and prunes (default 3)")
    p.add_argument("--chain", type=int, default=0, metavar="N", help="also read a chain of N")
    p.add_argument("--no-prune", action="store_true", help="leave the prunes out")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "sparsefs-bench"))
    p.add_argument("--json", metavar="OUT", help="write the medians and targets as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.nights < 6:
        raise SystemExit("bench: --nights must be 6 or more (prune drops 5 of the chain)")
    spec = workloads(args.quick)["W1"].image
    assert isinstance(spec, ImageSpec)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    source = build_image(spec, work)
    shm = Path(tempfile.mkdtemp(prefix="sparsefs-r-", dir=SHM))
    image = shm / "w.qcow2"  # named w: the disk's name in every set
    try:
        run(["cp", "--sparse=always", str(source), str(image)])
        clusters = allocated_clusters(image)
        rng = random.Random(21)
        r = Run(image, shm, args.rounds)
        r.nights(args.nights, rng, clusters)
        r.read_newest(f"newest of {point_count(r.dsets)}-point chain")
        if not args.no_prune:
            r.prune("prune 5 oldest (full merged)", ["--keep-last", str(point_count(r.dsets) - 5)])
            keep = str(point_count(r.dsets) - 6)
            r.prune("prune 5 middle deltas", ["--keep-last", keep, "--keep-monthly", "1"])
        if args.chain:
            r.grow_chain(args.chain, rng, clusters)
            r.read_newest(f"newest of {point_count(r.dsets)}-point chain")
        doc = report(r, args, spec)
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    finally:
        for mp in shm.glob("mnt-*"):
            subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        shutil.rmtree(shm, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
