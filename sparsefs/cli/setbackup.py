"""``sparsefs backup IMAGE... DEST_DIR``: add a verified point per image to the backup set.

DEST_DIR is a backup set (:mod:`sparsefs.points.set`).  For each image (disk
NAME: the image's file name without its format suffix; with ``--snapshots``
also ``NAME@SNAPSHOT`` per internal snapshot) the run adds one point
(:func:`sparsefs.points.run.add_point`):

- a full point when the disk has none, or with ``--full``: ``NAME/NAME@ID.raw``
  by the copy pipeline of :mod:`sparsefs.cli.copier` (kernel copy where it may,
  verification behind the copy), or ``NAME/NAME@ID.qcow2`` with ``--format qcow2``;
- a delta point otherwise: the 64 KiB blocks that changed since the newest
  point, found from ``--since BITMAP`` or by comparing digests.

The set is locked for the run (``flock``); a second run on the same set is
refused.  Exit status: 0 when every image got its point, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sparsefs.checksum import compare, stream_xxh128
from sparsefs.cli.checksum import format_line, parse_manifest_line
from sparsefs.cli.common import EXIT_FAILURE, EXIT_OK, fail_message, raw_name
from sparsefs.cli.copier import CopyFailed, copy_and_verify
from sparsefs.cli.mountset import MountSet
from sparsefs.errors import SparsefsError
from sparsefs.extents import SparseSource, data_size
from sparsefs.formats.qcow2 import Qcow2Image, dirty_ranges, find_bitmap
from sparsefs.points.blocks import FINE_PER_BLOCK, FINE_SIZE, BlockDigests
from sparsefs.points.run import RawCopier, RawCopy, RunOptions, RunResult, add_point
from sparsefs.points.set import BackupSet, write_atomic
from sparsefs.progress import Progress, human_bytes, human_duration
from sparsefs.raw import RawFile

XXH128_SUMS = "XXH128SUMS"


def _point_digests(
    size: int, block_digests: list[bytes], fines: list[tuple[int, bytes]]
) -> BlockDigests:
    """A full point's block digests: the copy's MiB digests read back, the image's fines.

    The fines were taken from the image while copying; the copy's MiB
    digests, read back from the storage, equal the image's (the caller
    checked the folded digests), so the fines describe the copy too.
    """
    out = BlockDigests(size)
    by_block: dict[int, list[tuple[int, bytes]]] = {}
    for fine, digest in fines:
        by_block.setdefault(fine // FINE_PER_BLOCK, []).append((fine, digest))
    for index, digest in enumerate(block_digests):
        out.add_block(index, digest, by_block.get(index, []))
    return out


def raw_copier(
    dest: str, kernel_allowed: Callable[[SparseSource, str], bool], overlap: bool
) -> Callable[[SparseSource, str, Callable[[int], None] | None], RawCopy]:
    """The full raw point maker: copier.copy_and_verify, with the fine digests of its read-back."""

    def copier(
        source: SparseSource, partial: str, advance: Callable[[int], None] | None
    ) -> RawCopy:
        outcome = copy_and_verify(
            source,
            partial,
            kernel=kernel_allowed(source, dest),
            overlap=overlap,
            advance=advance or (lambda n: None),
            fine_size=FINE_SIZE,
        )
        if outcome.copy.digest != outcome.image.digest:
            with RawFile(partial) as copy:
                difference, _ = compare(source, copy)
            where = (
                f"at byte {difference.offset}"
                if difference and difference.offset is not None
                else "in length"
            )
            raise CopyFailed(
                f"verification failed: the copy differs from the image {where}; no point written"
            )
        digests = _point_digests(source.size, outcome.block_digests, outcome.image_fines)
        return RawCopy(digests, outcome.image.bytes_read, outcome.method, outcome.phases)

    return copier


def _dirty(source: SparseSource, bitmap: str | None, image: str) -> list[tuple[int, int]] | None:
    """The dirty ranges of ``bitmap`` in ``source``, or None without ``--since``.

    Raises:
        SparsefsError: not a qcow2 image; the bitmap is missing, in use or does not fit.
    """
    if bitmap is None:
        return None
    if not isinstance(source, Qcow2Image):
        raise SparsefsError(f"{image}: --since needs a qcow2 image (bitmaps are qcow2's)")
    return list(dirty_ranges(source, find_bitmap(source, bitmap)))


def result_dict(result: RunResult | None, disk: str, error: str | None = None) -> dict[str, Any]:
    """The JSON form of one disk's outcome (backup's ``files`` entries)."""
    point = result.point if result is not None else None
    out: dict[str, Any] = {
        "disk": disk,
        "ok": point is not None,
        "file": point.file if point else None,
        "point": point.id if point else None,
        "kind": point.kind if point else None,
        "changes": point.changes if point else None,
        "format": point.format if point else None,
        "size": point.size if point else 0,
        "data-bytes": point.data_bytes if point else 0,
        "changed-bytes": point.changed_bytes if point else 0,
        "sparsefs1": point.digest if point else None,
        "error": error,
    }
    if result is not None:
        out["bytes-read"] = result.bytes_read
        out["copy-method"] = result.method
        out["removed-strays"] = result.removed
        out["phase-seconds"] = {k: round(v, 3) for k, v in result.phases.items()}
    return out


@dataclass
class Disk:
    """One disk of the run: its name in the set, source, image path, bitmap ranges."""

    name: str
    source: SparseSource
    image: str | None
    dirty: list[tuple[int, int]] | None
    estimate: int  # bytes of progress the run will report for it


@dataclass
class DiskOutcome:
    """What happened to one disk."""

    disk: str
    result: RunResult | None
    error: str | None = None
    seconds: float = 0.0
    xxh128: str | None = None
    dirty_bytes: int | None = None  # what the bitmap marked dirty (--since)


def plan_disks(images: list[str], mset: MountSet, bitmap: str | None) -> list[Disk]:
    """The disks of the run, every bitmap read before anything is written.

    Raises:
        SparsefsError: a bitmap is missing, in use, or does not fit its image.
    """
    paths = {raw_name(path): path for path in images}
    disks = []
    for name, source in mset.files.items():
        image = paths.get(name)
        dirty = _dirty(source, bitmap, image or name)
        data = data_size(source) if dirty is None else sum(n for _, n in dirty)
        disks.append(Disk(name.removesuffix(".raw"), source, image, dirty, 2 * data))
    return disks


@dataclass
class Run:
    """Settings of one backup run."""

    bset: BackupSet
    args: argparse.Namespace
    fd_progress: Any  # backup.FdProgress or None
    copier: RawCopier


def backup_disk(run: Run, disk: Disk) -> DiskOutcome:
    """Add one point for ``disk``; errors become the outcome's one-line message."""
    args = run.args
    bar = Progress(disk.estimate, label=disk.name, enabled=False if args.quiet else None)
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            bar.advance(n)
        if run.fd_progress is not None:
            run.fd_progress.advance(n)

    options = RunOptions(
        full=args.full,
        fmt=args.format,
        compression=args.compress,
        dirty=disk.dirty,
        source_path=disk.image,
    )
    outcome = DiskOutcome(disk.name, None)
    if disk.dirty is not None:
        outcome.dirty_bytes = sum(n for _, n in disk.dirty)
    t0 = time.monotonic()
    try:
        with bar:
            outcome.result = add_point(
                run.bset, disk.name, disk.source, options, advance=advance, raw_copier=run.copier
            )
            point = outcome.result.point
            if args.xxh128sums and point is not None and point.format == "raw":
                with RawFile(run.bset.path(point.file)) as copy:
                    outcome.xxh128 = stream_xxh128(copy).digest
                update_manifest(run.bset.path(XXH128_SUMS), {point.file: outcome.xxh128})
    except CopyFailed as exc:
        outcome.error = f"{run.bset.path(disk.name)}: {exc}"
    except (SparsefsError, OSError) as exc:
        outcome.error = fail_message(exc).removeprefix("sparsefs: ")
    outcome.seconds = time.monotonic() - t0
    bar.close()
    if outcome.error is not None:
        print(f"sparsefs: {outcome.error}", file=sys.stderr)
    elif not (args.quiet or args.json):
        print(_line(outcome))
    return outcome


def _line(outcome: DiskOutcome) -> str:
    assert outcome.result is not None
    assert outcome.result.point is not None
    r, p = outcome.result, outcome.result.point
    if p.kind == "full":
        what = f"full point {p.id}: {human_bytes(p.data_bytes)} of {human_bytes(p.size)}"
    else:
        what = (
            f"delta point {p.id} ({p.changes}): {human_bytes(r.data_bytes)} changed, "
            f"{human_bytes(r.zeroed_bytes)} zeroed, of {human_bytes(p.size)}"
        )
    took = human_duration(outcome.seconds)
    return f"{p.file}: {what}, written and verified in {took}  {p.digest}"


def report(outcomes: list[DiskOutcome], args: argparse.Namespace, dest: str) -> int:
    """Print the summary (or JSON); return the exit status."""
    failed = [o for o in outcomes if o.error is not None]
    if args.json:
        files = []
        for o in outcomes:
            entry = result_dict(o.result, o.disk, o.error)
            entry["dirty-bytes"] = o.dirty_bytes
            entry["seconds"] = round(o.seconds, 3)
            entry["xxh128"] = o.xxh128
            files.append(entry)
        print(json.dumps({"ok": not failed, "set": dest, "files": files}, indent=2))
    elif not args.quiet:
        written = sum(o.result.data_bytes for o in outcomes if o.result is not None)
        secs = sum(o.seconds for o in outcomes)
        print(
            f"backup: {len(outcomes) - len(failed)} of {len(outcomes)} points added to {dest}, "
            f"{human_bytes(written)} written in {human_duration(secs)}"
        )
    return EXIT_FAILURE if failed else EXIT_OK


def update_manifest(path: str, entries: dict[str, str | None]) -> None:
    """Rewrite a checksum manifest atomically: names mapped to a digest get that line.

    Other lines stay as they are; a name mapped to None loses its line.
    """
    kept: list[str] = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            entry = parse_manifest_line(line)
            if (entry is None or entry.name not in entries) and line:
                kept.append(line)
    lines = kept + [format_line(d, n) for n, d in sorted(entries.items()) if d is not None]
    write_atomic(path, "".join(line + "\n" for line in lines))


def add_arguments(b: argparse.ArgumentParser) -> None:
    """The options of ``backup`` that choose the kind of point."""
    b.add_argument(
        "--full",
        action="store_true",
        help="write a full point even when the disk has points (starts a new chain)",
    )
    b.add_argument(
        "--format",
        choices=("raw", "qcow2"),
        default="raw",
        help="format of a full point: raw (sparse, the default) or qcow2 (compact: for "
        "storage without sparse files); delta points are always qcow2",
    )
    b.add_argument(
        "--compress",
        choices=("zstd", "zlib"),
        help="with --format qcow2: compress the full point's clusters",
    )
    b.add_argument(
        "--since",
        metavar="BITMAP",
        help="find the changes from the image's persistent dirty bitmap BITMAP (qcow2) "
        "instead of by comparing block digests; clear it after a successful run (see README "
        "'Restore points')",
    )
