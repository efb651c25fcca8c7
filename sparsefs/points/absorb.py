"""Prune's fold of a chain into its raw full point's file: it costs the changes, not the disk.

When prune drops a chain's full point F (raw) and the deltas D1..Dk above it
and keeps S, the delta right above them, a merge
(:func:`~sparsefs.points.merge.merge_into`) writes all of S's data to a new
file.  Instead, F's file becomes S's:

1. The manifest **retires** F, D1..Dk: they are no longer points (``list``,
   ``mount``, ``restore`` and SPARSEFS-SUMS leave them out), but S's chain
   still runs through their files.
2. For every 64 KiB cluster that S or D1..Dk hold anything of (data, or zeros
   hiding what is below), S's bytes there are written into F's file (a hole
   punched where they are zeros), then synced.  S reads those clusters from
   its own layers, never from F, and everywhere else F's bytes are already
   S's: S reads the same before, during and after.
3. F's file is read back where written (its pages dropped) and each cluster
   checked against S's 64 KiB digests (or, without them, all of it against
   S's sparsefs1 digest).
4. F's file is linked as ``NAME@SID.raw``, and the point above S (if it is a
   delta) rewritten over that name: its own clusters, the new backing file,
   verified, renamed over its file (:func:`~sparsefs.points.merge.rebase`).
5. The caller records it in one manifest write (S a full raw point, the point
   above backed by it, the retired points gone) and deletes the retired
   files, F's old name and S's old file.

This is the forever-forward merge of other backup tools: the full point
absorbs what came after it.  Every kept point reads the same at every
instant.  The retired points' files do change, which is why they are retired
first, and why the fold runs only while no mount or restore holds the set
(``.SPARSEFS-SET.readers``, see :mod:`sparsefs.points.set`); otherwise
prune merges into a new file.  A prune killed anywhere leaves the retired
points in the manifest, and the next prune finishes the fold from step 2:
every step can be done twice.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import xxhash

from sparsefs.checksum import zero_bytes
from sparsefs.formats import opened
from sparsefs.libc import punch_hole, pwrite_all
from sparsefs.points.blocks import FINE_SIZE, BlockDigests, BlocksFileError
from sparsefs.points.check import point_file, point_problem
from sparsefs.points.engine import all_digests, drop_pages
from sparsefs.points.merge import CLUSTER_SIZE, batches, layers_below, owners, rebase
from sparsefs.points.run import VerificationError
from sparsefs.points.set import BackupSet, Point, SetError, fsync_dir, id_key

assert FINE_SIZE == CLUSTER_SIZE  # a written cluster is one 64 KiB digest


@dataclass
class Folded:
    """What a fold or a merge did: data bytes written, entries to record, files to delete."""

    written: int
    updated: list[Point]
    obsolete: list[str]  # files (relative to the set) no point names any more


def can_fold(dropped: list[Point], into: Point) -> bool:
    """True when ``dropped`` starts at a raw full point ``into`` can take over (same size)."""
    full = dropped[0]
    return (
        full.kind == "full"
        and full.format == "raw"
        and into.kind == "delta"
        and (full.size == into.size)
    )


def fold(bset: BackupSet, disk: str, dropped: list[Point], into: Point) -> Folded | None:
    """Fold ``dropped`` into ``into`` in F's file (module docstring), or None when a
    mount or restore reads the set (the caller merges instead).  Lock held.

    Raises:
        SetError: the chain is damaged (nothing changed).
        VerificationError: F's file read back differs from S (the points stay retired:
            S still reads as it did; the next prune finishes the fold or merges them).
    """
    problem = point_problem(bset, disk, into)
    if problem is not None:
        raise SetError(f"{problem}; not pruned: the chain of point {into.id} is damaged")
    return _readers_locked_out(bset, disk, into, [p.id for p in dropped])


def finish_retired(bset: BackupSet, disk: str) -> tuple[list[Point], Point, Folded | None] | None:
    """Finish the fold a killed prune left (its retired points), or None when there is none.

    Returns (the retired points, the point they fold into, what was done), or
    with None as the last item when a reader holds the set (the caller merges).
    """
    retired = bset.retired.get(disk)
    if not retired:
        return None
    last = id_key(retired[-1].id)
    above = [p for p in bset.points(disk) if id_key(p.id) > last]
    if not above or above[0].kind != "delta" or not can_fold(retired, above[0]):
        raise SetError(f"{bset.path(disk)}: retired points with no point to fold them into")
    return retired, above[0], _readers_locked_out(bset, disk, above[0], [])


def _readers_locked_out(
    bset: BackupSet, disk: str, into: Point, retire: list[str]
) -> Folded | None:
    """Retire ``retire`` and fold into ``into`` with no reader of the set, or None (a reader)."""
    readers = bset.lock_out_readers()
    if readers is None:
        return None
    try:
        if retire:
            bset.retire(disk, retire)
        return _finish(bset, disk, into)
    finally:
        os.close(readers)


def _finish(bset: BackupSet, disk: str, into: Point) -> Folded:
    """Steps 2-4 of the module docstring (the points below ``into`` retired)."""
    chain = bset.chain(disk, into.id)
    full = chain[0]
    base = bset.path(full.file)
    written, clusters = _write_view(bset, into, base, len(chain))
    _verify(bset, into, base, clusters)
    raw_name = point_file(disk, into.id, "raw")
    _link(base, bset.path(raw_name))
    new_into = replace(
        into,
        kind="full",
        file=raw_name,
        format="raw",
        backing=None,
        data_bytes=os.stat(bset.path(raw_name)).st_blocks * 512,
    )
    updated = [new_into]
    points = bset.points(disk)
    index = [p.id for p in points].index(into.id)
    if index + 1 < len(points) and points[index + 1].kind == "delta":
        above = points[index + 1]
        if above.backing != raw_name:
            updated.append(_rebased(bset, disk, above, new_into))
    return Folded(written, updated, [into.file])


def _rebased(bset: BackupSet, disk: str, above: Point, new_into: Point) -> Point:
    """The point above, backed by S's raw file (rewritten unless a killed run did it)."""
    from sparsefs.formats.qcow2 import backing_name

    if backing_name(bset.path(above.file)) == os.path.basename(new_into.file):
        return replace(above, backing=new_into.file)
    return rebase(bset, disk, above, new_into)


def _write_view(bset: BackupSet, into: Point, base: str, depth: int) -> tuple[int, list[int]]:
    """Write ``into``'s bytes into ``base`` wherever a layer above it holds anything.

    Returns the data bytes written and the clusters written (holes punched too).
    """
    cs = CLUSTER_SIZE
    size = into.size
    written = 0
    clusters: list[int] = []
    fd = os.open(base, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != size:
            raise SetError(f"{base}: is not {size} bytes; not folded")
        with opened(bset.path(into.file), into.format) as top:
            layers = layers_below(top, depth)
            owner, zero = owners(layers, size, bottom_full=True)
            bottom = depth
            for first, count, mark, is_zero in batches(owner, zero):
                if mark == bottom:
                    continue  # F's own: S reads it from F already
                start = first * cs
                length = min(count * cs, size - start)
                clusters += range(first, first + count)
                if is_zero:
                    punch_hole(fd, start, length)
                    continue
                data = top.read(start, length)
                written += _write_clusters(fd, start, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written, clusters


def _write_clusters(fd: int, start: int, data: bytes) -> int:
    """Write ``data`` at ``start``: runs of clusters holding data, holes for zero clusters."""
    cs = CLUSTER_SIZE
    view = memoryview(data)
    written = 0
    pos = 0
    while pos < len(view):
        end = min(pos + cs, len(view))
        if view[pos:end] == zero_bytes(end - pos):
            punch_hole(fd, start + pos, end - pos)
            pos = end
            continue
        run_end = end
        while run_end < len(view):
            nxt = min(run_end + cs, len(view))
            if view[run_end:nxt] == zero_bytes(nxt - run_end):
                break
            run_end = nxt
        pwrite_all(fd, view[pos:run_end], start + pos)
        written += run_end - pos
        pos = run_end
    return written


def _verify(bset: BackupSet, into: Point, base: str, clusters: list[int]) -> None:
    """F's file read back: the clusters written against S's 64 KiB digests."""
    drop_pages(base)
    try:
        digests = BlockDigests.load(bset.path(into.blocks), into.digest, into.size)
    except BlocksFileError:
        with opened(base, "raw") as source:
            got = all_digests(source).fold()
        if got != into.digest:
            raise VerificationError(
                f"{base}: verification failed: folded, it has digest {got}, "
                f"point {into.id} has {into.digest}"
            ) from None
        return
    fines = {
        index: bytes(digests.fine_digests[16 * i : 16 * i + 16])
        for i, index in enumerate(digests.fine_index)
    }
    fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for c in clusters:
            start = c * CLUSTER_SIZE
            length = min(CLUSTER_SIZE, into.size - start)
            data = os.pread(fd, length, start)
            want = fines.get(c)
            if want is None:
                ok = data == zero_bytes(length)
            else:
                ok = len(data) == length and xxhash.xxh3_128_digest(data) == want
            if not ok:
                raise VerificationError(
                    f"{base}: verification failed: folded, its bytes at {start} differ from "
                    f"point {into.id}'s"
                )
    finally:
        os.close(fd)


def _link(base: str, name: str) -> None:
    """``name`` made a second name of ``base`` (kept when it already is one)."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.samefile(base, name):
            return
        os.unlink(name)
    os.link(base, name)
    fsync_dir(os.path.dirname(name))


__all__ = ["Folded", "can_fold", "finish_retired", "fold"]
