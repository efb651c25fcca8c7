"""``backup --domain`` against virtnbdbackup on one running libvirt domain, full and nightly.

A private libvirtd (tests/libvirt_support.py: as root, in a mount namespace)
runs a TCG domain whose one disk is a 16 GiB qcow2 holding about 600 MiB
(300 extents of 2 MiB, written with qemu-io before the domain is defined;
``--quick``: 2 GiB / 150 MiB).  Both contenders back up the same domain in
the same run, one after the other.  virtnbdbackup refuses a domain with a
checkpoint it did not make ("Foreign checkpoint found"), so each contender
has its own domain, both on copies of the same image (``cp --sparse``), and
every night's writes go to both, the same offsets and patterns:

- sparsefs: ``sparsefs backup --domain DOM DEST`` (a full point, then delta
  points from the checkpoint bitmap);
- virtnbdbackup (Debian's 1.9.15): ``virtnbdbackup -d DOM -l full -o DIR``,
  then ``-l inc`` (pull-mode ``backup-begin``, read over NBD into its stream
  format).

On night 0 the sparsefs domain is also copied in libvirt's pull mode, with
no checkpoint (``virsh backup-begin`` exporting a point-in-time view over NBD,
``nbdcopy`` of it to a raw file, ``virsh domjobabort``): what a pull-mode
reader with a fast NBD client would pay for a full copy.

Each night 1% of the data (6 MiB: 96 writes of 64 KiB at random offsets in
the data) is rewritten through the monitor, then each contender runs.
Backups go to /dev/shm (no disk writeback in the timing).  Wall seconds per
contender and night, and the domain's pause in sparsefs's flow (from its
``-v`` log), are printed as JSON.  Usage (as root, alone on the machine):

    .venv/bin/python tools/bench/libvirt_bench.py [--quick] [--nights N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from libvirt_support import Libvirtd, libvirtd, monitor_write

MiB = 1024 * 1024
GiB = 1024 * MiB
SPARSEFS = [sys.executable, "-m", "sparsefs"]
EXTENT = 2 * MiB
XML = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
<emulator>/usr/bin/qemu-system-x86_64</emulator>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{image}'/>
<target dev='vda' bus='virtio'/></disk></devices></domain>"""


def sh(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
    return proc


def make_image(path: Path, size: int, extents: int, rng: random.Random) -> list[int]:
    """A qcow2 of ``size`` with ``extents`` 2 MiB data extents; their offsets."""
    sh(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)])
    slots = rng.sample(range(size // EXTENT), extents)
    commands: list[str] = []
    for slot in sorted(slots):
        commands += ["-c", f"write -q -P {rng.randrange(1, 256)} {slot * EXTENT} {EXTENT}"]
    sh(["qemu-io", "-f", "qcow2", *commands, str(path)])
    return [slot * EXTENT for slot in sorted(slots)]


def night(daemon: Libvirtd, names: list[str], offsets: list[int], rng: random.Random) -> None:
    """Rewrite 1% of the data (64 KiB writes inside the data extents) through the monitor."""
    data = len(offsets) * EXTENT
    for _ in range(max(1, data // 100 // (64 * 1024))):
        start = rng.choice(offsets) + rng.randrange(0, EXTENT // (64 * 1024)) * 64 * 1024
        pattern = rng.randrange(1, 256)
        for name in names:
            monitor_write(daemon, name, 0, f"write -P {pattern} {start} 64k")
    for name in names:
        monitor_write(daemon, name, 0, "flush")


def pull_full(daemon: Libvirtd, name: str, work: Path, out: Path) -> float:
    """Seconds for a pull-mode full copy: backup-begin, nbdcopy of the export, domjobabort."""
    sock, scratch = work / "nbd.sock", work / "scratch.qcow2"
    (work / "pull.xml").write_text(
        f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/><disks>"
        f"<disk name='vda' backup='yes' type='file'><scratch file='{scratch}'/></disk>"
        "</disks></domainbackup>"
    )
    t0 = time.monotonic()
    daemon.virsh("backup-begin", name, str(work / "pull.xml"))
    try:
        sh(["nbdcopy", f"nbd+unix:///vda?socket={sock}", str(out)])
    finally:
        daemon.virsh("domjobabort", name)
    return time.monotonic() - t0


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = sh(cmd)
    return time.monotonic() - t0, proc.stderr


def run(args: argparse.Namespace) -> dict[str, object]:
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shm = Path("/dev/shm/sparsefs-libvirt-bench")
    shutil.rmtree(shm, ignore_errors=True)
    (shm / "sparsefs").mkdir(parents=True)
    rng = random.Random(1)
    size, extents = (2 * GiB, 75) if args.quick else (16 * GiB, 300)
    image = work / "bench.qcow2"
    offsets = make_image(image, size, extents, rng)
    results: dict[str, list[float]] = {"sparsefs": [], "virtnbdbackup": []}
    pauses: list[float] = []
    pull = 0.0
    try:
        with libvirtd() as daemon:
            names = ["sfs-bench", "vnb-bench"]
            for name in names:
                copy = work / f"{name}.qcow2"
                sh(["cp", "--sparse=always", str(image), str(copy)])
                (work / "dom.xml").write_text(XML.format(name=name, image=copy))
                daemon.virsh("define", str(work / "dom.xml"))
                daemon.virsh("start", name)
            image.unlink()
            for n in range(args.nights + 1):
                if n:
                    night(daemon, names, offsets, rng)
                cmd = [*SPARSEFS, "-v", "backup", "-q", "--domain", names[0]]
                seconds, err = timed([*cmd, "--connect", daemon.uri, str(shm / "sparsefs")])
                results["sparsefs"].append(seconds)
                pauses += [float(p) for p in re.findall(r"paused ([0-9.]+) s", err)]
                if n == 0:
                    pull = pull_full(daemon, names[0], work, shm / "pull.raw")
                    (shm / "pull.raw").unlink()
                level = "full" if n == 0 else "inc"
                vnb = ["virtnbdbackup", "-U", daemon.uri, "-d", names[1], "-l", level, "-n"]
                seconds, _ = timed([*vnb, "-o", str(shm / "virtnbdbackup")])
                results["virtnbdbackup"].append(seconds)
                print(f"night {n}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in results.items()))
            for name in names:
                daemon.virsh("destroy", name)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "image": {"virtual": size, "data": extents * EXTENT},
        "full_seconds": {k: round(v[0], 2) for k, v in results.items()},
        "incremental_median_seconds": {
            k: round(statistics.median(v[1:]), 2) for k, v in results.items() if v[1:]
        },
        "incremental_seconds": {k: [round(x, 2) for x in v[1:]] for k, v in results.items()},
        "sparsefs_domain_paused_seconds": [round(p, 3) for p in pauses],
        "pull_mode_full_seconds": round(pull, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 GiB / 150 MiB")
    parser.add_argument("--nights", type=int, default=3)
    parser.add_argument("--workdir", default="/var/tmp/sparsefs-libvirt-bench")
    args = parser.parse_args()
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
