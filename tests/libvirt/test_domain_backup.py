"""``backup --domain`` / ``restore --domain``: a TCG domain with a qcow2 and a raw disk.

References: before each run, the domain is paused, each disk flushed and
copied with ``qemu-img convert -U``, and resumed; nothing writes between
that copy and the run's instant (the tests write through the monitor only,
there is no guest OS), so each point must equal its copy.  While a run
has the domain on its overlays, the test writes more ("window writes"):
they must be in no point of that run, and in the next run's points (a
checkpoint bitmap that lost them would give a wrong delta).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from libvirt_support import (
    Libvirtd,
    backup_run,
    blklist,
    check_domain_state,
    check_points,
    checkpoints,
    define_domain,
    make_disks,
    reference,
    runs,
    stderr_lines,
    write_round,
)
from points_support import latest_file, points, qemu_compare
from support import qemu_io, run, sparsefs


def test_running_then_stopped_then_restored(daemon: Libvirtd, tmp_path: Path) -> None:
    name = "sfs-run"
    qcow2, raw = make_disks(tmp_path)
    define_domain(daemon, name, qcow2, raw)
    before = blklist(daemon, name)
    dest = tmp_path / "set"
    dest.mkdir()
    rng = random.Random(11)
    windows = 0
    for n in range(4):
        if n:
            write_round(daemon, name, rng)
        refs = reference(daemon, name, tmp_path / f"ref{n}")
        proc, windowed = backup_run(daemon, name, dest, rng if n < 3 else None)
        windows += windowed
        assert proc.returncode == 0, proc.stderr
        lines = stderr_lines(proc)
        assert len(lines) == 2, lines  # the CD-ROM skipped; no guest agent
        assert "hdc skipped" in lines[0]
        assert "not frozen" in lines[1]
        check_points(dest, name, refs)
        check_domain_state(daemon, name, dest, before)
        vda = points(dest, f"{name}-vda")[-1]
        assert (vda["kind"], vda["changes"]) == (
            ("full", "full") if n == 0 else ("delta", "bitmap")
        )
        assert points(dest, f"{name}-vdb")[-1]["changes"] == ("full" if n == 0 else "digest")
    assert windows >= 1, "no run was caught with the domain on its overlays"
    _checkpoint_deleted_by_hand(daemon, name, dest, tmp_path, rng, before)
    _stopped(daemon, name, dest, tmp_path, qcow2, raw)
    _restore_define(daemon, name, dest, tmp_path)


def _checkpoint_deleted_by_hand(
    daemon: Libvirtd, name: str, dest: Path, tmp: Path, rng: random.Random, before: object
) -> None:
    (checkpoint,) = checkpoints(daemon, name)
    daemon.virsh("checkpoint-delete", name, checkpoint)
    write_round(daemon, name, rng)
    refs = reference(daemon, name, tmp / "ref-deleted")
    proc, _ = backup_run(daemon, name, dest, None)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in stderr_lines(proc) if "digest-driven" in line]
    assert len(warnings) == 1, proc.stderr
    assert checkpoint in warnings[0]
    assert f"{name}-vda" in warnings[0]
    assert points(dest, f"{name}-vda")[-1]["changes"] == "digest"
    check_points(dest, name, refs)
    check_domain_state(daemon, name, dest, before)


def _stopped(daemon: Libvirtd, name: str, dest: Path, tmp: Path, qcow2: Path, raw: Path) -> None:
    daemon.virsh("destroy", name)
    qemu_io(qcow2, "write -q -P 0x77 5M 1M", "write -q -z 70M 2M")
    qemu_io(raw, "write -q -P 0x78 9M 1M", fmt="raw")
    refs = {"vda": tmp / "stopped-vda.raw", "vdb": tmp / "stopped-vdb.raw"}
    run(["qemu-img", "convert", "-O", "raw", str(qcow2), str(refs["vda"])])
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(raw), str(refs["vdb"])])
    proc = sparsefs("backup", "--domain", name, "--connect", daemon.uri, str(dest))
    assert proc.returncode == 0, proc.stderr
    assert not any("frozen" in line for line in stderr_lines(proc))
    check_points(dest, name, refs)
    assert runs(dest, name)[-1]["state"] == "stopped"
    # The stopped run read the bitmap the last running run's checkpoint left in the image.
    assert points(dest, f"{name}-vda")[-1]["changes"] == "bitmap"
    # Running again: that checkpoint, kept, still gives an exact bitmap delta.
    before = blklist(daemon, name)
    daemon.virsh("start", name)
    write_round(daemon, name, random.Random(5))
    refs = reference(daemon, name, tmp / "ref-restarted")
    proc, _ = backup_run(daemon, name, dest, None)
    assert proc.returncode == 0, proc.stderr
    assert points(dest, f"{name}-vda")[-1]["changes"] == "bitmap"
    check_points(dest, name, refs)
    check_domain_state(daemon, name, dest, before)
    daemon.virsh("destroy", name)


def _restore_define(daemon: Libvirtd, name: str, dest: Path, tmp: Path) -> None:
    target = tmp / "restored"
    target.mkdir()
    args = ["restore", str(dest), "--domain", name, str(target), "--define", "sfs-copy"]
    proc = sparsefs(*args, "--connect", daemon.uri)
    assert proc.returncode == 0, proc.stderr
    files = {"vda": target / "sfs-copy-vda.qcow2", "vdb": target / "sfs-copy-vdb.raw"}
    for t, path in files.items():
        assert qemu_compare(
            latest_file(dest, f"{name}-{t}"), path, "qcow2" if t == "vda" else "raw"
        )
    xml = daemon.virsh("dumpxml", "sfs-copy").stdout
    original = daemon.virsh("dumpxml", name).stdout
    uuid = original.split("<uuid>")[1].split("</uuid>")[0]
    assert uuid not in xml
    daemon.virsh("start", "sfs-copy")
    time.sleep(0.3)
    assert daemon.virsh("domstate", "sfs-copy").stdout.strip() == "running"
    assert dict(blklist(daemon, "sfs-copy")) == {
        "vda": str(files["vda"]),
        "vdb": str(files["vdb"]),
        "hdc": "-",
    }
    daemon.virsh("destroy", "sfs-copy")
    daemon.virsh("undefine", "sfs-copy")
