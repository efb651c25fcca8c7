"""Merging dropped points into the kept point above them: a new file, verified, renamed over it.

Step 1-3 of :mod:`sparsefs.points.prune`'s merge (its docstring tells the
order and why every kept point reads the same at every instant), and the
per-cluster ownership of a chain's layers, which :mod:`sparsefs.points.absorb`
shares.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import replace

from sparsefs.checksum import BLOCK_SIZE
from sparsefs.errors import ImageReadError
from sparsefs.extents import SparseSource
from sparsefs.formats import opened
from sparsefs.layered import BELOW, DATA, ERROR, OTHER, UNWRITTEN, ZERO, LayeredImage
from sparsefs.points.blocks import BlockDigests, BlocksFileError
from sparsefs.points.check import partial_file, point_problem
from sparsefs.points.engine import all_digests, drop_pages, point_digest
from sparsefs.points.run import VerificationError
from sparsefs.points.set import BackupSet, Point, SetError, fsync_dir

CLUSTER_SIZE = 64 * 1024  # the clusters of the merged file (as every point's)
_BATCH_CLUSTERS = 64  # clusters read and written at once (4 MiB)


def layers_below(top: SparseSource, count: int) -> list[SparseSource]:
    """``top`` and the ``count - 1`` sources below it (each reads its own chain's view)."""
    out = [top]
    while len(out) < count:
        below = getattr(out[-1], "backing", None)
        if below is None:
            raise SetError(f"{getattr(out[-1], 'path', '?')}: its backing chain is too short")
        out.append(below)
    return out


def _own_runs(layer: SparseSource, bottom_full: bool) -> Iterator[tuple[int, int, bool]]:
    """(start, end, zero) of what ``layer`` holds itself: data (False) or zeros hiding below.

    The full point at the bottom of a merge holds its data only (nothing is below
    it, so its holes and zero clusters are what an unallocated cluster reads).
    """
    if bottom_full:
        for ext in layer.iter_extents(0):
            if ext.data:
                yield ext.guest_offset, ext.end, False
        return
    if not isinstance(layer, LayeredImage):
        raise SetError(f"{getattr(layer, 'path', '?')}: a delta point that is not a layered image")
    for s, e, kind, host in layer.layer.runs(0, layer.size):
        if kind == BELOW:
            continue
        if kind == ERROR:
            raise ImageReadError(str(host))
        if kind not in (DATA, OTHER, ZERO, UNWRITTEN):
            raise SetError(f"{layer.path}: a run of unknown kind {kind}")
        yield s, e, kind in (ZERO, UNWRITTEN)


def owners(layers: list[SparseSource], size: int, bottom_full: bool) -> tuple[bytearray, bytes]:
    """Per 64 KiB cluster of ``size``: 1 + the topmost layer holding anything of it (0: none).

    Also which clusters read as zeros in that layer throughout (write a zero cluster).
    """
    cs = CLUSTER_SIZE
    nb = -(-size // cs)
    owner = bytearray(nb)
    zero = bytearray(nb)
    for index, layer in enumerate(layers):
        mark = index + 1
        bottom = bottom_full and index == len(layers) - 1
        for s, e, is_zero in _own_runs(layer, bottom):
            first, last = s // cs, -(-min(e, size) // cs)
            for c in range(first, last):
                whole = s <= c * cs and min(e, size) >= min((c + 1) * cs, size)
                if owner[c] == 0:
                    owner[c] = mark
                    zero[c] = 1 if is_zero and whole else 0
                elif owner[c] == mark and not (is_zero and whole):
                    zero[c] = 0  # partly data, or partly below: read the layer's view
    return owner, bytes(zero)


def batches(owner: bytearray, zero: bytes) -> Iterator[tuple[int, int, int, bool]]:
    """(first cluster, count, owner, zero) of consecutive clusters alike, at most a batch."""
    c, nb = 0, len(owner)
    while c < nb:
        if owner[c] == 0:
            c += 1
            continue
        first, mark, z = c, owner[c], zero[c]
        c += 1
        while c < nb and owner[c] == mark and zero[c] == z and c - first < _BATCH_CLUSTERS:
            c += 1
        yield first, c - first, mark, bool(z)


def write_merged(
    path: str, size: int, layers: list[SparseSource], below: Point | None
) -> tuple[int, list[int]]:
    """Write S' at ``path`` (module docstring); return the data bytes and the MiB blocks touched."""
    from sparsefs.formats.qcow2 import Qcow2Writer

    owner, zero = owners(layers, size, bottom_full=below is None)
    writer = Qcow2Writer(
        path,
        size,
        backing_file=os.path.basename(below.file) if below is not None else None,
        backing_format=below.format if below is not None else None,
    )
    cs = CLUSTER_SIZE
    written = 0
    touched: set[int] = set()
    try:
        for first, count, mark, is_zero in batches(owner, zero):
            start = first * cs
            length = min(count * cs, size - start)
            touched.update(range(start // BLOCK_SIZE, (start + length - 1) // BLOCK_SIZE + 1))
            if is_zero:
                if below is not None:  # without a backing file, unallocated reads zeros
                    writer.write_zeroes(start, length)
                continue
            data = layers[mark - 1].read(start, length)
            if len(data) < length:  # past the end of a smaller (older) layer: zeros
                data += bytes(length - len(data))
            writer.write(start, data)
            written += length
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return written, sorted(touched)


def merge_into(bset: BackupSet, disk: str, dropped: list[Point], into: Point) -> tuple[int, Point]:
    """Merge ``dropped`` (consecutive, oldest first) into ``into``, the point right above them.

    Steps 1-3 of the module docstring; the caller records the result
    (step 4) and deletes the dropped files (step 5).  Returns the data bytes
    written and ``into``'s new manifest entry.

    Raises:
        SetError: the chain is damaged.
        VerificationError: S' read back differs from S (removed; S untouched).
    """
    problem = point_problem(bset, disk, into)
    if problem is not None:
        raise SetError(f"{problem}; not pruned: the chain of point {into.id} is damaged")
    chain = bset.chain(disk, into.id)
    ids = [p.id for p in chain]
    below = None if ids[0] == dropped[0].id else chain[ids.index(dropped[0].id) - 1]
    written = _rewrite(bset, disk, into, len(dropped) + 1, below)
    return written, new_entry(bset, into, below)


def rebase(bset: BackupSet, disk: str, point: Point, below: Point) -> Point:
    """Rewrite the delta ``point`` over ``below``, a file reading as its backing file does.

    Its own clusters only, verified, renamed over its file (as a merge of
    nothing); returns its new manifest entry.
    """
    _rewrite(bset, disk, point, 1, below)
    return new_entry(bset, point, below)


def _rewrite(bset: BackupSet, disk: str, into: Point, count: int, below: Point | None) -> int:
    """S' from ``into`` and the ``count - 1`` layers below it, verified, renamed over it."""
    partial = bset.path(partial_file(disk, into.id, into.format))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)
    try:
        with opened(bset.path(into.file), into.format) as top:
            layers = layers_below(top, count)
            written, touched = write_merged(partial, into.size, layers, below)
        verify_merged(bset, into, partial, touched)
        os.replace(partial, bset.path(into.file))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    fsync_dir(bset.path(disk))
    return written


def new_entry(bset: BackupSet, into: Point, below: Point | None) -> Point:
    """``into``'s manifest entry once it reads ``below`` (None: it is a full point)."""
    return replace(
        into,
        kind="delta" if below is not None else "full",
        backing=below.file if below is not None else None,
        data_bytes=os.stat(bset.path(into.file)).st_blocks * 512,
    )


def verify_merged(bset: BackupSet, into: Point, partial: str, touched: list[int]) -> None:
    """S' read back (through its chain) must have S's digest."""
    drop_pages(partial)
    try:
        digests: BlockDigests | None = BlockDigests.load(
            bset.path(into.blocks), into.digest, into.size
        )
    except BlocksFileError:
        digests = None
    with opened(partial, "qcow2") as readback:
        if digests is None:
            got = all_digests(readback).fold()
        else:
            got = point_digest(readback, digests, touched)
    if got != into.digest:
        raise VerificationError(
            f"{partial}: verification failed: the merged point read back has digest {got}, "
            f"point {into.id} has {into.digest}; nothing changed"
        )
