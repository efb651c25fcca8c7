"""SIGKILL of ``backup --domain`` at random moments (10 seeds).

After each kill, once the run's guardian has let the set's lock go, the
domain runs on its original files with no overlay left; the next run
succeeds and its points equal the disks at its instant; every earlier point
stays intact (``sparsefs list``, and ``checksum --check SPARSEFS-SUMS`` at
the end reads them all).
"""

from __future__ import annotations

import random
import signal
import subprocess
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
    wait_unlocked,
    write_round,
)
from support import SPARSEFS, sparsefs


def test_sigkill_at_random_moments(daemon: Libvirtd, tmp_path: Path) -> None:
    name = "sfs-kill"
    qcow2, raw = make_disks(tmp_path)
    define_domain(daemon, name, qcow2, raw)
    before = blklist(daemon, name)
    dest = tmp_path / "set"
    dest.mkdir()
    assert backup_run(daemon, name, dest, None)[0].returncode == 0
    write_round(daemon, name, random.Random(99))
    t0 = time.monotonic()
    assert backup_run(daemon, name, dest, None)[0].returncode == 0
    duration = time.monotonic() - t0
    cmd = [*SPARSEFS, "backup", "--domain", name, "--connect", daemon.uri, str(dest)]
    for seed in range(10):
        rng = random.Random(seed)
        write_round(daemon, name, rng)
        refs = reference(daemon, name, tmp_path / f"ref{seed}")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.0, duration))
        proc.kill()
        proc.communicate()  # EOF once the guardian (which shares stderr) is done too
        wait_unlocked(dest)
        assert blklist(daemon, name) == before, f"seed {seed}"
        assert daemon.virsh("domstate", name).stdout.strip() == "running"
        assert not list(tmp_path.glob(".*.sparsefs-*")), f"seed {seed}: overlay left"
        after, _ = backup_run(daemon, name, dest, None)
        assert after.returncode == 0, f"seed {seed}: {after.stderr}"
        assert "Traceback" not in after.stderr
        check_points(dest, name, refs)
        check_domain_state(daemon, name, dest, before)
        assert sparsefs("list", str(dest)).returncode == 0, f"seed {seed}"
    check = sparsefs("checksum", "--check", "SPARSEFS-SUMS", cwd=dest)
    assert check.returncode == 0, check.stdout + check.stderr


def test_sigterm_and_sigint_clean_up_in_the_run(daemon: Libvirtd, tmp_path: Path) -> None:
    """SIGTERM/SIGINT: the run itself commits back (no guardian needed), exits 130 or 0."""
    name = "sfs-term"
    qcow2, raw = make_disks(tmp_path)
    define_domain(daemon, name, qcow2, raw)
    before = blklist(daemon, name)
    dest = tmp_path / "set"
    dest.mkdir()
    assert backup_run(daemon, name, dest, None)[0].returncode == 0
    cmd = [*SPARSEFS, "backup", "--domain", name, "--connect", daemon.uri, str(dest)]
    for seed in range(4):
        rng = random.Random(100 + seed)
        write_round(daemon, name, rng)
        refs = reference(daemon, name, tmp_path / f"ref{seed}")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not any(".sparsefs-" in s for _, s in blklist(daemon, name)) and proc.poll() is None:
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGTERM if seed % 2 else signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, 130), err
        assert "Traceback" not in err
        assert "guardian" not in err, err
        assert blklist(daemon, name) == before
        assert not list(tmp_path.glob(".*.sparsefs-*"))
        after, _ = backup_run(daemon, name, dest, None)
        assert after.returncode == 0, after.stderr
        check_points(dest, name, refs)
        check_domain_state(daemon, name, dest, before)
    # A point that fails (its directory is taken by a file), in a second set: exit 1,
    # the domain back on its files, and no checkpoint left (this run's is deleted; the
    # first set's was deleted at the start, as one that no run of this set keeps).
    dest2 = tmp_path / "set2"
    dest2.mkdir()
    (dest2 / f"{name}-vdb").write_text("in the way\n")
    failed, _ = backup_run(daemon, name, dest2, None)
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    assert f"{name}-vdb" in failed.stderr
    assert blklist(daemon, name) == before
    assert checkpoints(daemon, name) == []
    assert not list(tmp_path.glob(".*.sparsefs-*"))
