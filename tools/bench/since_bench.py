"""Delta points' cost: bitmap- and digest-driven deltas against a full ``backup`` and rsync.

Measures wall time (run it alone on the machine), CPU time (user + system, of
every process involved, the sparsefs mount daemon included for rsync) and the
bytes each contender read and wrote (``rchar``/``wchar``); medians over
``--nights`` nights.  The copies live on /dev/shm (no disk writeback in the
timing).  Usage:

    .venv/bin/python tools/bench/since_bench.py [--quick] [--nights N] [--no-rsync] [--workdir DIR]

The image is W1 (16 GiB virtual, ~600 MiB in 300 extents; ``--quick``: 2 GiB,
~150 MiB), built by qemu-img/qemu-io.  After a full point in two sets and a
first rsync, ``qemu-img bitmap --add`` starts the bitmap, 1% of the allocated
clusters are rewritten, and ``backup --since`` adds a delta point (night 1);
the bitmap is cleared, another 1% rewritten, and the contenders bring their
copies up to date (nights 2, 3, ...):

- ``backup --since``: sparsefs backup --since nightly IMAGE DEST (a delta point
  from the bitmap)
- ``backup`` (digest delta): sparsefs backup IMAGE DEST3 (a delta point found by
  comparing block digests)
- ``backup`` (full): sparsefs backup IMAGE DEST2 (a new set, one full point)
- rsync: ``rsync --inplace --no-whole-file --ignore-times`` of the mounted
  file onto its copy (the first copy made by ``rsync --sparse``)
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
import time
from collections.abc import Callable
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
CLUSTER = 64 * KiB
SPARSEFS = [sys.executable, "-m", "sparsefs"]


def sh(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]  # kw: subprocess.run's own
        cmd, capture_output=True, text=True, **kw
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr}")
    return proc


def measured(cmd: list[str], extra_pid: int | None = None, **kw: object) -> dict[str, float]:
    """Run ``cmd``; its CPU seconds (with children, plus ``extra_pid``'s) and rchar/wchar."""
    script = '"$@"; rc=$?; grep -E "^(rchar|wchar):" /proc/$$/io >&2; exit $rc'
    before = os.times()
    extra0 = _cpu(extra_pid) if extra_pid else 0.0
    t0 = time.perf_counter()
    proc = subprocess.run(  # type: ignore[call-overload]  # kw: subprocess.run's own
        ["sh", "-c", script, "sh", *cmd], capture_output=True, text=True, **kw
    )
    wall = time.perf_counter() - t0
    after = os.times()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr}")
    io = dict(line.split(": ") for line in proc.stderr.splitlines()[-2:])
    cpu = (
        after.children_user - before.children_user + after.children_system - before.children_system
    )
    if extra_pid:
        cpu += _cpu(extra_pid) - extra0
    return {"wall": wall, "cpu": cpu, "read": int(io["rchar"]), "written": int(io["wchar"])}


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_pid(mountpoint: Path) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            words = [w.decode(errors="replace") for w in argv]
            if "mount" in words and str(mountpoint) in words:
                return int(entry)
    raise SystemExit("no mount daemon found")


def build(image: Path, size: int, extents: int, extent_size: int, seed: int) -> list[int]:
    """The W1 image; returns the guest offsets of its allocated clusters."""
    sh(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)])
    rng = random.Random(seed)
    starts = sorted(rng.sample(range(0, size // extent_size), extents))
    cmds: list[str] = []
    clusters: list[int] = []
    for i, slot in enumerate(starts):
        offset = slot * extent_size
        cmds += ["-c", f"write -q -P {i % 250 + 1} {offset} {extent_size}"]
        clusters += range(offset, offset + extent_size, CLUSTER)
    sh(["qemu-io", "-f", "qcow2", *cmds, str(image)])
    return clusters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 GiB / 150 MiB instead of W1")
    parser.add_argument("--nights", type=int, default=5, help="measured nights (default 5)")
    parser.add_argument("--no-rsync", action="store_true", help="leave rsync out (slow)")
    parser.add_argument("--workdir", default="/tmp/sparsefs-since-bench")
    args = parser.parse_args()
    work = Path(args.workdir)
    copies = Path("/dev/shm/sparsefs-since-bench")
    for d in (work, copies):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    try:
        return _run(args, work, copies)
    finally:
        shutil.rmtree(copies, ignore_errors=True)


def _first_copies(image: Path, dests: list[Path], rdest: Path | None, mp: Path) -> None:
    """A full point into each of ``dests`` and the first ``rsync --sparse`` into ``rdest``."""
    for dest in dests:
        sh([*SPARSEFS, "backup", "-q", str(image), str(dest)])
    if rdest is None:
        return
    sh([*SPARSEFS, "mount", str(image), str(mp)])
    try:
        sh(["rsync", "--sparse", str(mp / "w1.raw"), str(rdest)])
    finally:
        sh([*SPARSEFS, "umount", str(mp)])


def _change(image: Path, rng: random.Random, clusters: list[int], pattern: int) -> list[int]:
    """Rewrite 1% of the allocated clusters with ``pattern``; return their offsets."""
    changed = rng.sample(clusters, max(1, len(clusters) // 100))
    sh(
        [
            "qemu-io",
            "-f",
            "qcow2",
            *[a for off in changed for a in ("-c", f"write -q -P {pattern} {off} {CLUSTER}")],
            str(image),
        ]
    )
    return changed


def _since(image: Path, dest: Path) -> dict[str, float]:
    return measured([*SPARSEFS, "backup", "-q", "--since", "nightly", str(image), str(dest)])


def _digest(image: Path, dest3: Path) -> dict[str, float]:
    return measured([*SPARSEFS, "backup", "-q", str(image), str(dest3)])


def _newest(dest: Path) -> Path:
    """The newest point's file of the one disk in the set at ``dest``."""
    doc = json.loads((dest / "SPARSEFS-SET.json").read_text())
    (disk,) = doc["disks"].values()
    return dest / str(disk["points"][-1]["file"])


def _check(dest: Path, dest2: Path, dest3: Path, rdest: Path | None) -> None:
    """Every contender's newest copy equals the full point."""
    full_point = _newest(dest2)
    for point in (_newest(dest), _newest(dest3)):
        sh(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(point), str(full_point)])
    if rdest is not None:
        sh(["cmp", str(rdest / "w1.raw"), str(full_point)])


def _full(image: Path, dest2: Path) -> dict[str, float]:
    shutil.rmtree(dest2, ignore_errors=True)
    dest2.mkdir()
    return measured([*SPARSEFS, "backup", "-q", str(image), str(dest2)])


def _rsync(image: Path, rdest: Path, mp: Path) -> dict[str, float]:
    sh([*SPARSEFS, "mount", str(image), str(mp)])
    try:
        time.sleep(0.2)
        return measured(
            # --ignore-times: image and copy can share an mtime second
            [
                "rsync",
                "--inplace",
                "--no-whole-file",
                "--ignore-times",
                str(mp / "w1.raw"),
                str(rdest),
            ],
            extra_pid=daemon_pid(mp),
        )
    finally:
        sh([*SPARSEFS, "umount", str(mp)])


def _print_report(
    med: dict[str, dict[str, float]], size: int, clusters: int, changed: int, nights: int
) -> None:
    full = med["backup (full)"]
    print(
        f"image: {size >> 20} MiB virtual, {clusters * CLUSTER >> 20} MiB data, "
        f"{changed} of {clusters} clusters changed (1%) per night; "
        f"medians of {nights} nights; copies on /dev/shm"
    )
    print(
        f"| {'contender':<32} | {'wall s':>7} | {'x full':>6} | {'CPU s':>6} | "
        f"{'read MiB':>9} | {'written MiB':>11} |"
    )
    print(f"|{'-' * 34}|{'-' * 9}|{'-' * 8}|{'-' * 8}|{'-' * 11}|{'-' * 13}|")
    for name, r in med.items():
        print(
            f"| {name:<32} | {r['wall']:7.3f} | {r['wall'] / full['wall']:6.2f} | "
            f"{r['cpu']:6.2f} | {r['read'] / MiB:9.1f} | {r['written'] / MiB:11.1f} |"
        )
    ratio = med["backup --since"]["wall"] / full["wall"]
    print(
        f"target: backup --since <= 0.3x a full backup (wall): {ratio:.2f}x "
        f"{'pass' if ratio <= 0.3 else 'MISS'}"
    )
    digest = med["backup (digest delta)"]
    ratio = digest["wall"] / full["wall"]
    print(
        f"target: digest delta <= 1.0x a full backup (wall): {ratio:.2f}x "
        f"{'pass' if ratio <= 1.0 else 'MISS'}"
    )
    ratio = digest["written"] / (changed * CLUSTER)
    print(
        f"target: digest delta writes <= 2x the changed data ({changed * CLUSTER >> 10} KiB): "
        f"{ratio:.2f}x {'pass' if ratio <= 2.0 else 'MISS'} (every byte the run wrote: the "
        "point file with its metadata, block digests, manifests)"
    )


def _run(args: argparse.Namespace, work: Path, copies: Path) -> int:
    size, extents = (2 * GiB, 150) if args.quick else (16 * GiB, 300)
    image = work / "w1.qcow2"
    clusters = build(image, size, extents, 1 * MiB if args.quick else 2 * MiB, seed=1)
    dest, dest2, dest3, mp = (copies / "dest", copies / "dest2", copies / "dest3", work / "mnt")
    rdest = None if args.no_rsync else copies / "rsync"
    for d in (dest, dest3, rdest, mp):
        if d is not None:
            d.mkdir()
    _first_copies(image, [dest, dest3], rdest, mp)
    sh(["qemu-img", "bitmap", "--add", str(image), "nightly"])
    rng = random.Random(2)
    samples: dict[str, list[dict[str, float]]] = {}
    # Night 1: the first delta after the full point.
    changed = _change(image, rng, clusters, 0xEE)
    samples["backup --since (first night)"] = [_since(image, dest)]
    sh(["qemu-img", "bitmap", "--clear", str(image), "nightly"])
    runs: dict[str, tuple[str, Callable[[], dict[str, float]]]] = {
        "since": ("backup --since", lambda: _since(image, dest)),
        "digest": ("backup (digest delta)", lambda: _digest(image, dest3)),
        "full": ("backup (full)", lambda: _full(image, dest2)),
    }
    if rdest is not None:
        rsync_dest = rdest  # narrowed for the lambda
        runs["rsync"] = ("rsync --inplace --no-whole-file", lambda: _rsync(image, rsync_dest, mp))
    for night in range(args.nights):
        changed = _change(image, rng, clusters, 0xD0 + night)
        order = list(runs)
        first = night % len(order)
        for who in order[first:] + order[:first]:  # alternate who goes first
            name, contender = runs[who]
            samples.setdefault(name, []).append(contender())
        sh(["qemu-img", "bitmap", "--clear", str(image), "nightly"])
        _check(dest, dest2, dest3, rdest)
    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for name, rs in samples.items()
    }
    _print_report(med, size, len(clusters), len(changed), args.nights)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
