"""One backup run for one disk: add a verified point to a set.

:func:`add_point` decides the kind of point, writes it under a temporary name
(``NAME/.NAME@ID.FMT.partial-PID``), syncs it and drops its cached pages,
reads it back through the registry (a delta with its backing chain) and
compares its sparsefs1 digest with the image's, and only then saves its
block digests, renames it into place, fsyncs the directory and records it in
the manifest (and SPARSEFS-SUMS).  A run killed at any moment leaves every
earlier point as it was and the manifest naming only verified points; the
next run removes what it left (:func:`sparsefs.points.check.remove_strays`).

- No point yet, or ``full``: a full point, raw (sparse) or qcow2 (no backing
  file, optionally compressed).
- Otherwise a delta: a qcow2 overlay over the newest point, holding the 64 KiB
  blocks that changed (``dirty`` ranges of a bitmap, or found by comparing
  digests of the whole image's data with the previous point's).
- A disk that grew gets a delta of the larger size: the qcow2 overlay reads
  zeros past its smaller backing file, as qemu does.  A disk that shrank is
  refused (``--full`` starts a new chain).

The caller holds the set's lock.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sparsefs.errors import SparsefsError
from sparsefs.extents import SparseSource
from sparsefs.formats import opened
from sparsefs.formats.qcow2 import Compression, Qcow2Writer
from sparsefs.points.blocks import BlockDigests, BlocksFileError
from sparsefs.points.check import (
    blocks_file,
    partial_file,
    point_file,
    point_problem,
    remove_strays,
)
from sparsefs.points.dirty import dirty_fines, verify_dirty, write_dirty
from sparsefs.points.engine import (
    RawFileSink,
    all_digests,
    drop_pages,
    point_digest,
    write_changes,
)
from sparsefs.points.set import BackupSet, Point, SetError, check_disk_name, fsync_dir, id_time

Advance = Callable[[int], None]


class VerificationError(SparsefsError):
    """The new point, read back, does not equal the image; nothing was recorded."""


@dataclass
class RunResult:
    """What one run did for one disk (bytes unless named otherwise)."""

    disk: str
    point: Point | None = None
    bytes_read: int = 0
    data_bytes: int = 0
    zeroed_bytes: int = 0
    changed_blocks: int = 0
    removed: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    recomputed_blocks: bool = False
    method: str = ""


@dataclass(frozen=True)
class RunOptions:
    """How to make the point.

    Attributes:
        full: start a new chain.
        fmt: "raw" or "qcow2": the format of a full point (deltas are qcow2).
        compression: None, "zstd" or "zlib" for qcow2 points.
        dirty: the bitmap's dirty ranges (guest offset, length), or None to
            find the changes by digests.
        source_path: the image's path, recorded in the manifest.
    """

    full: bool = False
    fmt: str = "raw"
    compression: Compression = None
    dirty: list[tuple[int, int]] | None = None
    source_path: str | None = None


def _previous(
    bset: BackupSet, disk: str, size: int, image: str
) -> tuple[Point, BlockDigests, bool]:
    """The newest point (checked) and its block digests; whether they were recomputed.

    Raises:
        SetError: the disk shrank, or a point of the chain is damaged.
    """
    prev = bset.latest(disk)
    assert prev is not None
    problem = point_problem(bset, disk, prev)
    if problem is not None:
        raise SetError(
            f"{problem}; the chain of point {prev.id} is damaged: start a new chain with --full"
        )
    if size < prev.size:
        raise SetError(
            f"{image}: is {size} bytes, smaller than the newest point {bset.path(prev.file)} "
            f"({prev.size} bytes): a disk that shrank needs a new chain: use --full"
        )
    try:
        return prev, BlockDigests.load(bset.path(prev.blocks), prev.digest, prev.size), False
    except BlocksFileError:
        pass
    # The digests are lost or damaged: hash the point itself (O(data)) and check it.
    with opened(bset.path(prev.file), prev.format) as source:
        digests = all_digests(source)
    if digests.fold() != prev.digest:
        raise SetError(
            f"{bset.path(prev.file)}: does not match its digest in the manifest: the point is "
            "damaged: start a new chain with --full"
        )
    digests.save(bset.path(prev.blocks), prev.digest)
    return prev, digests, True


def _new_sink(
    path: str, size: int, fmt: str, backing: Point | None, compression: Compression
) -> RawFileSink | Qcow2Writer:
    if fmt == "raw":
        return RawFileSink(path, size)
    return Qcow2Writer(
        path,
        size,
        backing_file=os.path.basename(backing.file) if backing is not None else None,
        backing_format=backing.format if backing is not None else None,
        compression=compression,
    )


@dataclass
class RawCopy:
    """What a raw copier made: a full raw point at the partial path, verified.

    Attributes:
        digests: the copy's block digests, read back from the storage.
        bytes_read: data bytes read from the image.
        method: how the bytes were copied (for the report).
        phases: seconds per phase.
    """

    digests: BlockDigests
    bytes_read: int = 0
    method: str = "read-hash-write"
    phases: dict[str, float] = field(default_factory=dict)


RawCopier = Callable[[SparseSource, str, "Advance | None"], RawCopy]
"""``copier(source, path, advance)``: write a verified full raw copy of ``source`` at the new
file ``path`` (or raise, leaving no file); how the CLI plugs in its kernel-copy pipeline."""


@dataclass
class _Target:
    """Where the new point goes."""

    pid: str
    fmt: str
    partial: str
    final_rel: str
    directory: str
    made_directory: bool  # this run made the disk's directory (a first point)


def _target(bset: BackupSet, disk: str, fmt: str, now: float | None) -> _Target:
    pid = bset.new_id(disk, now)
    directory = bset.path(disk)
    made = not os.path.isdir(directory)
    if made:
        os.mkdir(directory)
    return _Target(
        pid,
        fmt,
        bset.path(partial_file(disk, pid, fmt)),
        point_file(disk, pid, fmt),
        directory,
        made,
    )


def _write_and_verify(
    source: SparseSource,
    target: _Target,
    prev: Point | None,
    prev_digests: BlockDigests,
    options: RunOptions,
    advance: Advance | None,
    result: RunResult,
) -> tuple[BlockDigests, str]:
    """Write the point with the engine at the partial path and verify it read back."""
    if prev is not None and options.dirty is not None:
        return _bitmap_delta(source, target, prev, prev_digests, options, advance, result)
    t0 = time.monotonic()
    sink = _new_sink(target.partial, source.size, target.fmt, prev, options.compression)
    try:
        written = write_changes(source, sink, prev_digests, advance=advance)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    t1 = time.monotonic()
    drop_pages(target.partial)
    with opened(target.partial, target.fmt) as readback:
        got = point_digest(
            readback,
            prev_digests if prev is not None else None,
            written.changed_blocks,
            advance=advance,
        )
    if got != written.digest:
        raise VerificationError(
            f"{target.partial}: verification failed: the point read back has digest "
            f"{got}, the image {written.digest}; nothing recorded"
        )
    result.bytes_read = written.bytes_read
    result.data_bytes = written.data_bytes
    result.zeroed_bytes = written.zeroed_bytes
    result.changed_blocks = len(written.changed_blocks)
    result.method = "qcow2-writer" if target.fmt == "qcow2" else "read-hash-write"
    result.phases.update({"write": t1 - t0, "verify": time.monotonic() - t1})
    return written.digests, written.digest


def _bitmap_delta(
    source: SparseSource,
    target: _Target,
    prev: Point,
    prev_digests: BlockDigests,
    options: RunOptions,
    advance: Advance | None,
    result: RunResult,
) -> tuple[BlockDigests, str]:
    """A delta from the bitmap's dirty 64 KiB blocks (:mod:`sparsefs.points.dirty`)."""
    assert options.dirty is not None
    t0 = time.monotonic()
    sink = _new_sink(target.partial, source.size, "qcow2", prev, None)
    fines = dirty_fines(options.dirty, source.size)
    try:
        written = write_dirty(source, sink, prev_digests, fines, advance=advance)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    t1 = time.monotonic()
    drop_pages(target.partial)
    with opened(target.partial, target.fmt) as readback:
        digests = verify_dirty(readback, prev_digests, written, advance=advance)
    result.bytes_read = written.bytes_read
    result.data_bytes = written.data_bytes
    result.zeroed_bytes = written.zeroed_bytes
    result.changed_blocks = len(written.changed_blocks)
    result.method = "qcow2-writer"
    result.phases.update({"write": t1 - t0, "verify": time.monotonic() - t1})
    return digests, digests.fold()


def add_point(
    bset: BackupSet,
    disk: str,
    source: SparseSource,
    options: RunOptions,
    *,
    advance: Advance | None = None,
    now: float | None = None,
    raw_copier: RawCopier | None = None,
) -> RunResult:
    """Write, verify and record a new point of ``disk`` from ``source``.

    A full raw point is made by ``raw_copier`` when given, else by the engine.

    Raises:
        SetError: the set refuses the run (damaged chain, shrunk disk, ...).
        VerificationError: the point read back differs from the image.
        ImageReadError, OSError: reading the image or writing the point failed.
    """
    check_disk_name(disk)
    result = RunResult(disk)
    result.removed = remove_strays(bset, disk)
    prev: Point | None = None
    prev_digests = BlockDigests(source.size)
    if not options.full and bset.latest(disk) is not None:
        image = options.source_path or disk
        prev, prev_digests, result.recomputed_blocks = _previous(bset, disk, source.size, image)
    target = _target(bset, disk, "qcow2" if prev is not None else options.fmt, now)
    try:
        if prev is None and target.fmt == "raw" and raw_copier is not None:
            copy = raw_copier(source, target.partial, advance)
            digests, digest = copy.digests, copy.digests.fold()
            result.bytes_read = result.data_bytes = copy.bytes_read
            result.method = copy.method
            result.phases.update(copy.phases)
        else:
            digests, digest = _write_and_verify(
                source, target, prev, prev_digests, options, advance, result
            )
        t0 = time.monotonic()
        digests.save(bset.path(blocks_file(disk, target.pid)), digest)
        os.rename(target.partial, bset.path(target.final_rel))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target.partial)
        if target.made_directory:
            with contextlib.suppress(OSError):
                os.rmdir(target.directory)  # only if empty
        raise
    fsync_dir(target.directory)
    if target.made_directory:
        fsync_dir(bset.root)
    result.point = _record(bset, disk, target, prev, options, digest, result, source.size)
    result.phases["record"] = time.monotonic() - t0
    return result


def _record(
    bset: BackupSet,
    disk: str,
    target: _Target,
    prev: Point | None,
    options: RunOptions,
    digest: str,
    result: RunResult,
    digests_size: int,
) -> Point:
    changes = "full" if prev is None else ("bitmap" if options.dirty is not None else "digest")
    point = Point(
        id=target.pid,
        time=id_time(target.pid),
        kind="full" if prev is None else "delta",
        file=target.final_rel,
        format=target.fmt,
        size=digests_size,
        data_bytes=os.stat(bset.path(target.final_rel)).st_blocks * 512,
        digest=digest,
        blocks=blocks_file(disk, target.pid),
        backing=prev.file if prev is not None else None,
        source=os.path.abspath(options.source_path) if options.source_path else None,
        changes=changes,
        changed_bytes=result.data_bytes + result.zeroed_bytes,
    )
    bset.add_point(disk, point)
    return point
