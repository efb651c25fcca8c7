"""A backup set over seven nights: bitmap- and digest-driven deltas, qcow2 and VMDK, a grown disk.

Each night qemu-io writes data, zero writes and discards into both disks; the
qcow2 disk grows once (``qemu-img resize``).  After every night, every point
made so far must still equal ``qemu-img convert -O raw`` of its disk as it was
that night (kept), ``qemu-img check`` must find every qcow2 point clean, and a
delta's allocated size must stay within what changed (rounded to 64 KiB,
the granularity of change detection) + 1% + 1 MiB.
"""

from __future__ import annotations

import random
from pathlib import Path

from points_support import (
    allocated,
    backup,
    delta_bound,
    list_json,
    manifest,
    points,
    qemu_check,
    qemu_compare,
    rounded_union,
)
from support import MiB, make_image, qemu_io, qemu_raw, run, sparsefs

SIZE = 48 * MiB
GROWN = 56 * MiB


def _night_writes(
    rng: random.Random, size: int, night: int, *, discards: bool = True
) -> tuple[list[str], list[tuple[int, int]]]:
    """qemu-io commands for one night (some 4 KiB, some larger), and the ranges they touch."""
    commands, ranges = [], []
    for i in range(6):
        length = rng.choice([4096, 64 * 1024, 300 * 1024, MiB + 4096])
        offset = rng.randrange(0, size - length, 512)
        if i == 4:
            commands.append(f"write -q -z {offset} {length}")
        elif i == 5 and discards:
            commands.append(f"discard -q {offset} {length}")
        else:
            commands.append(f"write -q -P {(night * 16 + i) % 255 + 1} {offset} {length}")
        ranges.append((offset, length))
    return commands, ranges


def test_seven_nights_every_point_stays_exact(tmp_path: Path) -> None:
    rng = random.Random(2112)
    vm = make_image(tmp_path / "vm.qcow2", SIZE, seed=5, writes=30, max_len=2 * MiB)
    db = tmp_path / "db.vmdk"
    db0 = make_image(tmp_path / "db0.qcow2", SIZE, seed=6)
    run(["qemu-img", "convert", "-O", "vmdk", str(db0), str(db)])
    dest = tmp_path / "set"
    dest.mkdir()
    kept: dict[str, list[Path]] = {"vm": [], "db": []}
    size = SIZE
    for night in range(7):
        changed = {"vm": 0, "db": 0}
        if night == 1:
            run(["qemu-img", "bitmap", "--add", str(vm), "nightly"])
        if night > 0:
            if night == 4:
                run(["qemu-img", "resize", str(vm), str(GROWN)])
                size = GROWN
            cmds, ranges = _night_writes(rng, size, night)
            if night == 4:  # something written past the old end
                cmds.append(f"write -q -P 0x77 {SIZE + MiB} 128k")
                ranges.append((SIZE + MiB, 128 * 1024))
            qemu_io(vm, *cmds)
            changed["vm"] = rounded_union(ranges, size)
            cmds, ranges = _night_writes(rng, SIZE, night, discards=False)
            qemu_io(db, *cmds, fmt="vmdk")
            changed["db"] = rounded_union(ranges, SIZE)
        # Nights 2, 3 and 5 take the qcow2 disk's changes from its bitmap.
        bitmap = night in (2, 3, 5)
        if bitmap:
            doc = backup("--since", "nightly", vm, dest)
            doc["files"] += backup(db, dest)["files"]
            run(["qemu-img", "bitmap", "--clear", str(vm), "nightly"])
        else:
            doc = backup(vm, db, dest)
        by_disk = {f["disk"]: f for f in doc["files"]}
        vm_changes = "full" if night == 0 else "bitmap" if bitmap else "digest"
        assert by_disk["vm"]["changes"] == vm_changes
        assert by_disk["db"]["changes"] == ("full" if night == 0 else "digest")
        for disk, image, fmt in (("vm", vm, "qcow2"), ("db", db, "vmdk")):
            kept[disk].append(qemu_raw(image, tmp_path / f"{disk}-night{night}.raw", fmt=fmt))
            if night:
                delta = dest / by_disk[disk]["file"]
                assert allocated(delta) <= delta_bound(changed[disk]), (disk, night)
        # Every point made so far equals its night's kept copy; every qcow2 point is clean.
        for disk in ("vm", "db"):
            pts = points(dest, disk)
            assert len(pts) == night + 1
            for point, ref in zip(pts, kept[disk], strict=True):
                assert qemu_compare(dest / point["file"], ref), (disk, point["id"], night)
                if point["format"] == "qcow2":
                    qemu_check(dest / point["file"])
    # The whole set checks out through SPARSEFS-SUMS, chain and all.
    check = sparsefs("checksum", "--check", "SPARSEFS-SUMS", cwd=dest)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == 14
    status, listing = list_json(dest)
    assert status == 0
    assert [d["name"] for d in listing["disks"]] == ["db", "vm"]
    assert all(p["status"] == "ok" for d in listing["disks"] for p in d["points"])
    vm_points = manifest(dest)["disks"]["vm"]["points"]
    assert [p["size"] for p in vm_points] == [SIZE] * 4 + [GROWN] * 3


def test_scattered_writes_over_a_large_disk_stay_small(tmp_path: Path) -> None:
    """4 KiB writes all over 16 GiB: the delta holds 64 KiB per write plus a page of table each.

    (qcow2 keeps one 64 KiB L2 table per 512 MiB of guest space; its unused
    pages are holes in the point's file.)
    """
    rng = random.Random(77)
    image = tmp_path / "big.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16G"])
    qemu_io(image, *(f"write -q -P {i + 1} {i * 256}M 512k" for i in range(64)))
    dest = tmp_path / "set"
    dest.mkdir()
    backup(image, dest)
    ranges = [(rng.randrange(0, 16 * 1024 * MiB, 4096), 4096) for _ in range(96)]
    qemu_io(image, *(f"write -q -P 0x5a {offset} 4k" for offset, _ in ranges))
    (entry,) = backup(image, dest)["files"]
    delta = dest / entry["file"]
    changed = rounded_union(ranges, 16 * 1024 * MiB)
    assert allocated(delta) <= delta_bound(changed), (allocated(delta), changed)
    qemu_check(delta)
    assert qemu_compare(delta, qemu_raw(image, tmp_path / "ref.raw"))
