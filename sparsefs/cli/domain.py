"""``sparsefs backup --domain NAME [--connect URI] DEST_DIR``: every disk of a libvirt domain.

Each backed-up disk (:func:`sparsefs.domain.domxml.disks` says which) is disk
``NAME-TARGET`` of the set and gets one point per run; the run is recorded
with the domain XML in ``NAME.libvirt.json`` (:mod:`sparsefs.domain.record`).

**Running domain**, one instant for all disks (README "Backing up libvirt VMs"):
the guest agent freezes the filesystems when there is one; the domain is
paused; checkpoint ``sparsefs-RUN`` is created (a persistent bitmap in every
qcow2 disk); one atomic disk-only external snapshot moves every disk onto an
overlay beside its image; the domain resumes (and thaws).  The images below
no longer change: they are backed up as files, qcow2 ones from the previous
run's checkpoint bitmap (what changed since its instant), raw ones by
digests.  Then every overlay is committed back and pivoted
(``blockcommit --active --pivot``) and removed.  That ``finally`` runs after
any failure, SIGINT or SIGTERM; a SIGKILL is answered by the guardian
(:mod:`sparsefs.domain.repair`), and by the repair at the start of the next run.

**Stopped domain**: the images are read directly, under their image locks;
the previous checkpoint's bitmap is used when it is there.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

from sparsefs.cli import setbackup
from sparsefs.domain import domxml
from sparsefs.domain.record import CHECKPOINT_PREFIX, DiskRun, DomainRuns, Run, disk_name
from sparsefs.domain.repair import (
    Guardian,
    clear_state,
    commit_back,
    drop_checkpoints,
    overlay_path,
    remove_overlays,
    repair,
    write_state,
)
from sparsefs.domain.virt import Connection, Domain
from sparsefs.errors import SparsefsError
from sparsefs.extents import SparseSource, data_size
from sparsefs.formats import open_source
from sparsefs.options import OpenOptions
from sparsefs.points.run import RawCopier
from sparsefs.points.set import BackupSet, point_id

AGENT = "org.qemu.guest_agent.0"
log = logging.getLogger(__name__)


def say(line: str) -> None:
    """One line on stderr."""
    print(f"sparsefs: {line}", file=sys.stderr)


@dataclass
class Ctx:
    """One domain run."""

    args: argparse.Namespace
    dest: str
    bset: BackupSet
    runs: DomainRuns
    dom: Domain
    todo: list[domxml.DomainDisk]
    all_disks: list[domxml.DomainDisk]
    copier: RawCopier


def cmd_backup_domain(args: argparse.Namespace, copier: RawCopier) -> int:
    """``backup --domain``; see the module docstring (``copier`` makes full raw points)."""
    if len(args.paths) != 1:
        raise SparsefsError("backup --domain takes only DEST_DIR (the disks come from the domain)")
    for flag in ("since", "qmp", "node", "snapshots"):
        if getattr(args, flag, None):
            raise SparsefsError(f"--domain cannot be combined with --{flag}")
    dest = args.paths[0]
    if not os.path.isdir(dest):
        raise SparsefsError(f"{dest}: destination directory does not exist")
    with Connection(args.connect) as conn:
        dom = conn.domain(args.domain)
        with BackupSet.open(dest, lock=True, create=True) as bset:
            runs = DomainRuns.load(dest, dom.name)
            repair(dom, runs, say)
            runs.forget_pruned(bset)
            all_disks = domxml.disks(dom.xml())
            for d in all_disks:
                if d.skip is not None:
                    say(f"domain {dom.name}: disk {d.target} skipped: {d.skip}")
            todo = [d for d in all_disks if d.skip is None]
            if not todo:
                raise SparsefsError(f"domain {dom.name}: has no disk to back up")
            ctx = Ctx(args, dest, bset, runs, dom, todo, all_disks, copier)
            if dom.is_active():
                return _live(ctx)
            return _stopped(ctx)


def _run_id(runs: DomainRuns) -> str:
    return point_id(time.time(), {r.id for r in runs.runs})


def _previous_bitmap(ctx: Ctx, disk: domxml.DomainDisk) -> str | None:
    """The checkpoint whose bitmap holds this disk's changes since its newest point, or None.

    Says in one line why a qcow2 disk with points falls back to digests.
    """
    name = disk_name(ctx.dom.name, disk.target)
    newest = ctx.bset.latest(name)
    if newest is None or ctx.args.full:
        return None
    prev = ctx.runs.latest()
    entry = prev.disks.get(disk.target) if prev is not None else None
    if prev is None or prev.checkpoint is None or entry is None or entry.point != newest.id:
        if disk.fmt == "qcow2":
            say(
                f"{name}: no checkpoint of the domain matches point {newest.id}: "
                "digest-driven delta"
            )
        return None
    if disk.fmt != "qcow2":
        return None
    if prev.checkpoint not in ctx.dom.checkpoint_names():
        say(
            f"{name}: checkpoint {prev.checkpoint} of point {newest.id} is gone from libvirt "
            "(deleted by hand?): digest-driven delta"
        )
        return None
    return prev.checkpoint


def _dirty(source: SparseSource, bitmap: str | None, name: str) -> list[tuple[int, int]] | None:
    """The bitmap's dirty ranges in ``source``; None (and one line) when it cannot be used."""
    if bitmap is None:
        return None
    from sparsefs.formats.qcow2 import Qcow2Image, dirty_ranges, find_bitmap

    if not isinstance(source, Qcow2Image):
        return None
    try:
        return list(dirty_ranges(source, find_bitmap(source, bitmap)))
    except SparsefsError as exc:
        say(f"{name}: bitmap {bitmap} cannot be used ({exc}): digest-driven delta")
        return None


def _backup_disks(ctx: Ctx, force_share: bool) -> tuple[list[setbackup.DiskOutcome], set[str]]:
    """One point per disk to do; the outcomes and the checkpoints whose bitmaps were used."""
    run = setbackup.Run(ctx.bset, ctx.args, None, ctx.copier)
    outcomes, used = [], set()
    for disk in ctx.todo:
        assert disk.path is not None
        name = disk_name(ctx.dom.name, disk.target)
        try:
            source = open_source(disk.path, disk.fmt, OpenOptions(force_share=force_share))
        except (SparsefsError, OSError) as exc:
            outcomes.append(setbackup.DiskOutcome(name, None, f"{disk.path}: {exc}"))
            say(f"{disk.path}: {exc}")
            continue
        try:
            bitmap = _previous_bitmap(ctx, disk)
            dirty = _dirty(source, bitmap, name)
            if dirty is not None and bitmap is not None:
                used.add(bitmap)
            estimate = 2 * (data_size(source) if dirty is None else sum(n for _, n in dirty))
            plan = setbackup.Disk(name, source, disk.path, dirty, estimate)
            outcomes.append(setbackup.backup_disk(run, plan))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
    return outcomes, used


def _record(ctx: Ctx, run_id: str, state: str, frozen: str, checkpoint: str | None) -> None:
    """Record the run (its points are recorded) and its XML; keep only its checkpoint."""
    xml_rel = ctx.runs.save_xml(run_id, ctx.dom.xml(inactive=True))
    disks = {}
    for d in ctx.todo:
        assert d.path is not None
        point = ctx.bset.latest(disk_name(ctx.dom.name, d.target))
        assert point is not None
        disks[d.target] = DiskRun(disk_name(ctx.dom.name, d.target), point.id, d.fmt, d.path)
    ctx.runs.add(Run(run_id, state, frozen, xml_rel, checkpoint, disks))
    if ctx.dom.is_active():
        keep = {checkpoint} if checkpoint else set()
        drop_checkpoints(ctx.dom, keep)
        for r in ctx.runs.runs:
            if r.checkpoint not in keep:
                r.checkpoint = None
        ctx.runs.save()


def _stopped(ctx: Ctx) -> int:
    """Back up a stopped domain's images directly (their image locks taken)."""
    run_id = _run_id(ctx.runs)
    outcomes, used = _backup_disks(ctx, force_share=False)
    ok = all(o.error is None for o in outcomes)
    if ok:
        # A checkpoint still tracks every write since its own, earlier, instant: it
        # covers this run's points too (more than needed, never less).
        prev = ctx.runs.latest()
        keep = prev.checkpoint if prev is not None and prev.checkpoint in used else None
        _record(ctx, run_id, "stopped", "stopped", keep)
    return setbackup.report(outcomes, ctx.args, ctx.dest)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals(deferred: bool) -> Iterator[None]:
    """SIGINT/SIGTERM raise KeyboardInterrupt; ``deferred``: only once the block is done."""
    caught: list[int] = []
    handler = (lambda signum, frame: caught.append(signum)) if deferred else _raise_interrupt
    old_int = signal.signal(signal.SIGINT, handler)
    old_term = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    if caught:
        raise KeyboardInterrupt


def _checkpoint_xml(ctx: Ctx, name: str) -> str:
    qcow2 = {d.target for d in ctx.todo if d.fmt == "qcow2"}
    disks = "".join(
        f"<disk name='{d.target}' checkpoint='{'bitmap' if d.target in qcow2 else 'no'}'/>"
        for d in ctx.all_disks
    )
    return f"<domaincheckpoint><name>{name}</name><disks>{disks}</disks></domaincheckpoint>"


def _snapshot_xml(ctx: Ctx, overlays: dict[str, str]) -> str:
    parts = []
    for d in ctx.all_disks:
        if d.target in overlays:
            parts.append(
                f"<disk name='{d.target}' snapshot='external' type='file'><driver type='qcow2'/>"
                f"<source file='{_attr(overlays[d.target])}'/></disk>"
            )
        else:
            parts.append(f"<disk name='{d.target}' snapshot='no'/>")
    return f"<domainsnapshot><disks>{''.join(parts)}</disks></domainsnapshot>"


def _attr(text: str) -> str:
    return text.replace("&", "&amp;").replace("'", "&apos;").replace("<", "&lt;")


def _has_agent(ctx: Ctx) -> bool:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(ctx.dom.xml())
    return any(t.get("name") == AGENT for t in root.findall("./devices/channel/target"))


def _freeze_instant(ctx: Ctx, overlays: dict[str, str], checkpoint: str | None) -> str:
    """Checkpoint and snapshot every disk at one instant; return how the guest was frozen."""
    frozen = "paused"
    if _has_agent(ctx):
        problem = ctx.dom.fs_freeze()
        if problem is None:
            frozen = "guest-agent"
        else:
            say(f"domain {ctx.dom.name}: the guest agent did not freeze the filesystems: {problem}")
    else:
        say(f"domain {ctx.dom.name}: no guest agent: the guest's filesystems were not frozen")
    try:
        _paused_instant(ctx, overlays, checkpoint)
    finally:
        if frozen == "guest-agent":
            ctx.dom.fs_thaw()
    return frozen


def _paused_instant(ctx: Ctx, overlays: dict[str, str], checkpoint: str | None) -> None:
    """Pause, checkpoint, snapshot, resume; no checkpoint survives a failed snapshot."""
    was_paused = ctx.dom.is_paused()  # a domain paused by its owner stays paused
    t0 = time.monotonic()
    if not was_paused:
        ctx.dom.suspend()
    try:
        if checkpoint is not None:
            ctx.dom.checkpoint_create(_checkpoint_xml(ctx, checkpoint))
        try:
            ctx.dom.snapshot_disk_only(_snapshot_xml(ctx, overlays))
        except BaseException:
            if checkpoint is not None:
                ctx.dom.checkpoint_delete(checkpoint)
            raise
    finally:
        if not was_paused:
            ctx.dom.resume()
        paused = time.monotonic() - t0
        log.info("domain %s: paused %.3f s (checkpoint, snapshot)", ctx.dom.name, paused)


def _live(ctx: Ctx) -> int:
    """Back up a running domain at one instant (see the module docstring)."""
    run_id = _run_id(ctx.runs)
    overlays = {}
    for d in ctx.todo:
        assert d.path is not None
        overlays[d.target] = overlay_path(d.path, run_id)
    checkpoint = CHECKPOINT_PREFIX + run_id if any(d.fmt == "qcow2" for d in ctx.todo) else None
    pairs = {d.target: [d.path, overlays[d.target]] for d in ctx.todo}
    state = {"run": run_id, "checkpoint": checkpoint, "overlays": pairs}
    write_state(ctx.runs, {**state, "owner_paused": ctx.dom.is_paused()})
    guardian = Guardian(ctx.dest, ctx.dom.name, ctx.args.connect, ctx.bset._lock_fd)
    ok = False
    outcomes: list[setbackup.DiskOutcome] = []
    frozen = ""
    try:
        with _signals(deferred=False):
            with _signals(deferred=True):
                frozen = _freeze_instant(ctx, overlays, checkpoint)
            outcomes, _used = _backup_disks(ctx, force_share=True)
            ok = all(o.error is None for o in outcomes)
    finally:
        with _signals(deferred=True):
            commit_back(ctx.dom)
            remove_overlays(ctx.dom, None)
            if not ok and checkpoint is not None and checkpoint in ctx.dom.checkpoint_names():
                ctx.dom.checkpoint_delete(checkpoint)
            clear_state(ctx.runs)
            guardian.release()
    if ok:
        _record(ctx, run_id, "running", frozen, checkpoint)
    return setbackup.report(outcomes, ctx.args, ctx.dest)
