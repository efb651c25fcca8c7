"""Prune a backup set: drop the points the policy does not keep, merging their blocks upward.

Which points stay is :mod:`sparsefs.points.policy`'s answer, per disk.  A
dropped point that no kept point reads (the end of an older chain) is simply
removed.  A run of dropped points P1..Pk directly below a kept delta S of the
same chain is **merged into S**, in an order that keeps every kept point's
content the same at every instant:

1. A new file S' is written as ``NAME/.NAME@SID.qcow2.partial-PID``: for every
   64 KiB cluster, what S reads there, taken from the topmost layer of S,
   Pk, ..., P1 that has anything of its own in the cluster (data, or a zero
   cluster that hides what is below); clusters none of them has stay
   unallocated.  S' is backed by P1's backing file (a kept point) with its
   format, or, when P1 was the chain's full point, has no backing file and
   becomes the chain's full point (qcow2, under S's name, so the point above
   it, which names S by file name, still finds it).
2. S' is synced, its cached pages dropped, and read back through its chain:
   the MiB blocks holding a merged cluster are hashed, the others taken from
   S's block digests (which hold for S' too: same content); the folded
   sparsefs1 digest must equal S's recorded digest.
3. ``os.replace(S', S)`` and an fsync of the directory: S reads the same
   before and after.  P1..Pk are still intact and still in the manifest.
4. The manifest (and SPARSEFS-SUMS) is replaced atomically without P1..Pk,
   S recorded with its new backing file (or as full).
5. P1..Pk's files and block digests are deleted: listed first in
   ``NAME/.NAME.pruned`` (before step 4), so a prune killed after step 4
   leaves the list, and the next prune deletes what it names that the
   manifest no longer does (:func:`finish_deletions`).

When P1 is the chain's full point and a raw file of S's size, S takes over
P1's file instead, at the cost of the changed clusters, not of the whole
disk (:mod:`sparsefs.points.absorb`); then S becomes a full raw point, and
the above steps only apply when a mount or restore is reading the set.

A prune killed at any moment leaves every kept point reading as before.
Killed between 3 and 4, S's file is backed by P1's backing file while the
manifest still lists P1..Pk below it (``list`` reports that chain as not
matching the manifest, and a backup run refuses to add to it); the next
prune finishes a fold it left first (the retired points), then that merge
(:func:`finish_interrupted`), then removes
what killed runs left (:func:`~sparsefs.points.check.remove_strays`).
"""

from __future__ import annotations

import calendar
import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sparsefs.errors import SparsefsError
from sparsefs.formats import opened
from sparsefs.points.absorb import Folded, can_fold, finish_retired, fold
from sparsefs.points.check import remove_strays
from sparsefs.points.engine import all_digests
from sparsefs.points.merge import merge_into, new_entry
from sparsefs.points.policy import Rules, decide
from sparsefs.points.set import BackupSet, Point, fsync_dir, write_atomic


@dataclass(frozen=True)
class Decision:
    """One point and what prune does with it: ``rule`` keeps it, or None drops it."""

    point: Point
    rule: str | None

    @property
    def keep(self) -> bool:
        return self.rule is not None


@dataclass
class Merge:
    """One merge: ``dropped`` (oldest first) merged into the kept point ``into``."""

    into: str
    dropped: list[str]
    merged_bytes: int = 0
    seconds: float = 0.0


@dataclass
class DiskPrune:
    """What prune decided and did for one disk."""

    disk: str
    decisions: list[Decision] = field(default_factory=list)
    merges: list[Merge] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # files removed (relative to the set)
    finished: list[Merge] = field(default_factory=list)  # interrupted merges completed


def point_seconds(point: Point) -> float:
    """A point's time (``2026-12-03T19:05:00Z``) in seconds since the epoch."""
    return float(calendar.timegm(time.strptime(point.time, "%Y-%m-%dT%H:%M:%SZ")))


def plan(points: list[Point], rules: Rules) -> list[Decision]:
    """The policy's decision for each point of one disk, oldest first.

    Raises:
        PolicyError: the rules keep nothing.
    """
    why = decide([point_seconds(p) for p in points], rules)
    return [Decision(p, w) for p, w in zip(points, why, strict=True)]


def prune(bset: BackupSet, rules: Rules, *, dry_run: bool = False) -> list[DiskPrune]:
    """Apply ``rules`` to every disk of the set (held with its lock unless ``dry_run``).

    Raises:
        PolicyError: the rules keep nothing.
        SetError: a chain a merge needs is damaged.
        VerificationError: a merged file read back differs; nothing changed for it.
        SparsefsError, OSError: reading a point or writing failed.
    """
    rules.check()
    out = []
    for disk in sorted(bset.disks):
        result = DiskPrune(disk)
        if not dry_run:
            result.removed += finish_deletions(bset, disk)
            result.finished = _finish_retired(bset, disk, result.removed)
            result.finished += finish_interrupted(bset, disk, result.removed)
            result.removed += [f"{disk}/{name}" for name in remove_strays(bset, disk)]
        result.decisions = plan(bset.points(disk), rules)
        if not dry_run:
            _apply(bset, disk, result)
        out.append(result)
    return out


def _groups(decisions: list[Decision]) -> Iterator[tuple[list[Point], Point | None]]:
    """(dropped points, the kept point of their chain right above them, or None)."""
    run: list[Point] = []
    for d in decisions:
        if d.point.kind == "full" and run:
            yield run, None  # the end of a chain: nothing reads them
            run = []
        if not d.keep:
            run.append(d.point)
        elif run:
            yield run, d.point
            run = []
    if run:
        yield run, None


def _apply(bset: BackupSet, disk: str, result: DiskPrune) -> None:
    for dropped, into in _groups(result.decisions):
        if into is None:
            result.removed += _drop(bset, disk, dropped, Folded(0, [], []))
            continue
        t0 = time.monotonic()
        into = next(p for p in bset.points(disk) if p.id == into.id)  # as a fold left it
        done = fold(bset, disk, dropped, into) if can_fold(dropped, into) else None
        if done is None:
            done = _merged(bset, disk, dropped, into)
        result.removed += _drop(bset, disk, dropped, done)
        seconds = time.monotonic() - t0
        result.merges.append(Merge(into.id, [p.id for p in dropped], done.written, seconds))


def _merged(bset: BackupSet, disk: str, dropped: list[Point], into: Point) -> Folded:
    written, new_into = merge_into(bset, disk, dropped, into)
    return Folded(written, [new_into], [])


def _finish_retired(bset: BackupSet, disk: str, removed: list[str]) -> list[Merge]:
    """Finish the fold a killed prune left (merging when a reader holds the set)."""
    left = finish_retired(bset, disk)
    if left is None:
        return []
    retired, into, done = left
    if done is None:
        done = _merged(bset, disk, retired, into)
    removed += _drop(bset, disk, retired, done)
    return [Merge(into.id, [p.id for p in retired], done.written)]


def pruned_list(disk: str) -> str:
    """The list of files a prune is deleting, relative to the set: ``NAME/.NAME.pruned``."""
    return f"{disk}/.{disk}.pruned"


def _drop(bset: BackupSet, disk: str, dropped: list[Point], done: Folded) -> list[str]:
    """Record the manifest without ``dropped`` (and ``done``'s new entries), then delete them.

    The files to delete are listed in ``NAME/.NAME.pruned`` first, so a prune
    killed after the manifest write and before the deletions leaves a list
    the next prune finishes (:func:`finish_deletions`); no file the manifest
    does not name is ever deleted otherwise.
    """
    files = [rel for p in dropped for rel in (p.file, p.blocks)] + done.obsolete
    write_atomic(bset.path(pruned_list(disk)), "".join(f"{rel}\n" for rel in files))
    _record(bset, disk, dropped, done.updated)
    return finish_deletions(bset, disk)


def _record(bset: BackupSet, disk: str, dropped: list[Point], updated: list[Point]) -> None:
    """The manifest without ``dropped`` and with the ``updated`` entries, in one atomic write."""
    bset.remove_points(disk, [p.id for p in dropped], tuple(updated))


def finish_deletions(bset: BackupSet, disk: str) -> list[str]:
    """Delete the files ``NAME/.NAME.pruned`` lists that the manifest no longer names.

    Files the manifest still names stay (the prune was killed before its
    manifest write: they are points still).  Then the list goes.  Lock held.
    """
    listing = bset.path(pruned_list(disk))
    try:
        with open(listing, encoding="utf-8") as f:
            files = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return []
    points = bset.disks.get(disk, []) + bset.retired.get(disk, [])
    named = {rel for p in points for rel in (p.file, p.blocks)}
    removed = []
    for rel in files:
        if rel in named or not rel.startswith(f"{disk}/") or "/" in rel[len(disk) + 1 :]:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bset.path(rel))
            removed.append(rel)
    fsync_dir(bset.path(disk))
    os.unlink(listing)
    fsync_dir(bset.path(disk))
    return removed


# -- finishing a prune that was killed -----------------------------------------------


def finish_interrupted(bset: BackupSet, disk: str, removed: list[str]) -> list[Merge]:
    """Finish merges a killed prune left between its file replace and its manifest write.

    A delta point whose file is backed by an earlier point of its chain than
    the one right below it in the manifest (or by none, above the chain's full
    point) and that reads its recorded digest through that chain was merged
    and replaced: the points in between are dropped from the manifest and
    deleted, as the killed prune would have done.  Anything else that does not
    match is left for ``list`` to report.  Lock held.
    """
    from sparsefs.formats.qcow2 import backing_name

    finished = []
    index = 1
    while index < len(points := bset.disks.get(disk, [])):
        point = points[index]
        index += 1
        if point.kind != "delta":
            continue
        try:
            name = backing_name(bset.path(point.file))
        except (SparsefsError, OSError):
            continue
        pos = index - 1
        if name == os.path.basename(points[pos - 1].file):
            continue
        start = pos - 1
        while start > 0 and points[start].kind != "full":
            start -= 1
        if points[start].kind != "full":
            continue
        names = [os.path.basename(p.file) for p in points[start : pos - 1]]
        if name is not None and name not in names:
            continue
        first = start if name is None else start + names.index(name) + 1
        below = None if name is None else points[first - 1]
        if not _reads_its_digest(bset, point):
            continue  # not a merged file (a damaged header?): leave it for list to report
        dropped = points[first:pos]
        removed += _drop(bset, disk, dropped, Folded(0, [new_entry(bset, point, below)], []))
        finished.append(Merge(point.id, [p.id for p in dropped]))
        index = first + 1
    return finished


def _reads_its_digest(bset: BackupSet, point: Point) -> bool:
    """True when ``point``'s file, read through its chain as it is now, has its digest."""
    try:
        with opened(bset.path(point.file), point.format) as source:
            return all_digests(source).fold() == point.digest
    except (SparsefsError, OSError):
        return False


def result_dict(result: DiskPrune) -> dict[str, Any]:
    """The JSON form of one disk's prune."""
    return {
        "name": result.disk,
        "points": [
            {
                "id": d.point.id,
                "time": d.point.time,
                "kind": d.point.kind,
                "action": "keep" if d.keep else "prune",
                "rule": d.rule,
            }
            for d in result.decisions
        ],
        "merges": [
            {
                "into": m.into,
                "dropped": m.dropped,
                "merged_bytes": m.merged_bytes,
                "seconds": round(m.seconds, 3),
            }
            for m in result.merges
        ],
        "finished": [{"into": m.into, "dropped": m.dropped} for m in result.finished],
        "removed": result.removed,
    }


__all__ = [
    "Decision",
    "DiskPrune",
    "Merge",
    "finish_interrupted",
    "merge_into",
    "plan",
    "prune",
    "result_dict",
]
