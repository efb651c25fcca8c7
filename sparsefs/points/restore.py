"""Restore a point: to a new sparse raw file, a qcow2 file, or an existing block device.

The point is read through the registry (a delta with its whole backing
chain); its digest as read must equal the manifest's, and the target, read
back after a sync and a page drop, must equal it too.

- **raw file** (any name but ``*.qcow2``): sparse, holes where the point reads
  zeros.
- **qcow2 file** (``*.qcow2``): written by qcow2's writer, no backing file.
- Both are written as ``.TARGET.partial-PID`` beside the target and renamed
  over it only once verified: a failed restore leaves no file that looks
  complete, and an existing file (allowed only with ``overwrite``) is
  replaced whole or not at all.
- **block device** (only with ``overwrite``): opened with ``O_EXCL``, so a
  device that is mounted or held open by another exclusive user is refused;
  one smaller than the point is refused before the first write.  Every byte
  of ``[0, point size)`` is written: data, or zeros by ``BLKZEROOUT``
  (:class:`~sparsefs.points.engine.DeviceSink`); bytes past the point's size
  are left alone.  The whole range is read back to verify.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, field

from sparsefs.errors import SparsefsError
from sparsefs.extents import SparseSource
from sparsefs.formats import opened
from sparsefs.formats.qcow2 import Qcow2Writer
from sparsefs.points.blocks import BlockDigests
from sparsefs.points.check import point_problem
from sparsefs.points.engine import (
    Advance,
    DeviceSink,
    DeviceSource,
    RawFileSink,
    Sink,
    all_digests,
    device_size,
    drop_pages,
    is_block_device,
    write_changes,
)
from sparsefs.points.set import BackupSet, Point, SetError, fsync_dir


class RestoreError(SparsefsError):
    """The restore was refused or failed (one line, naming the file)."""


@dataclass
class RestoreResult:
    """What a restore did.

    Attributes:
        target: the path written.
        kind: "raw", "qcow2" or "device".
        point: the point restored.
        data_bytes: bytes of data written.
        seconds: wall time; ``phases`` per phase.
    """

    target: str
    kind: str
    point: Point
    data_bytes: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)


def target_kind(target: str) -> str:
    """ "device", "qcow2" (by the name) or "raw"."""
    if is_block_device(target):
        return "device"
    return "qcow2" if target.lower().endswith(".qcow2") else "raw"


def check_restorable(bset: BackupSet, disk: str, point: Point) -> None:
    """Refuse a damaged point, or one that depends on a damaged point.

    Raises:
        RestoreError: names the damaged point and the problem.
    """
    problem = point_problem(bset, disk, point)
    if problem is not None:
        raise RestoreError(
            f"{problem}: point {point.id} is damaged or depends on a damaged point; not restored"
        )


def restore(
    bset: BackupSet,
    disk: str,
    point: Point,
    target: str,
    *,
    overwrite: bool = False,
    advance: Advance | None = None,
) -> RestoreResult:
    """Write ``point`` of ``disk`` to ``target`` and verify it (module docstring).

    Raises:
        RestoreError: refused (damaged point, existing target without
            ``overwrite``, device busy or too small) or not verified.
        SparsefsError, OSError: reading the point or writing the target failed.
    """
    kind = target_kind(target)
    result = RestoreResult(target, kind, point)
    if kind != "device":
        if os.path.isdir(target):
            raise RestoreError(f"{target}: is a directory")
        if os.path.lexists(target) and not overwrite:
            raise RestoreError(f"{target}: exists; pass --overwrite to replace it")
    elif not overwrite:
        raise RestoreError(f"{target}: is a block device; pass --overwrite to write to it")
    check_restorable(bset, disk, point)
    t0 = time.monotonic()
    with opened(bset.path(point.file), point.format) as source:
        if source.size != point.size:
            raise RestoreError(f"{bset.path(point.file)}: size differs from the manifest")
        if kind == "device":
            _to_device(source, point, target, result, advance)
        else:
            _to_file(source, point, target, kind, result, advance)
    result.seconds = time.monotonic() - t0
    return result


def _check_digest(what: str, got: str, point: Point) -> None:
    if got != point.digest:
        raise RestoreError(
            f"{what}: verification failed: digest {got}, the point's is {point.digest}"
        )


def _write(
    source: SparseSource, sink: Sink, point: Point, result: RestoreResult, advance: Advance | None
) -> None:
    """Write the point's data into ``sink``; the point as read must match its digest."""
    t0 = time.monotonic()
    written = write_changes(source, sink, BlockDigests(source.size), advance=advance)
    _check_digest(getattr(source, "path", "the point"), written.digest, point)
    result.data_bytes = written.data_bytes
    result.phases["write"] = time.monotonic() - t0


def _to_file(
    source: SparseSource,
    point: Point,
    target: str,
    kind: str,
    result: RestoreResult,
    advance: Advance | None,
) -> None:
    directory = os.path.dirname(os.path.abspath(target))
    partial = os.path.join(directory, f".{os.path.basename(target)}.partial-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)
    sink: Qcow2Writer | RawFileSink
    try:
        if kind == "qcow2":
            sink = Qcow2Writer(partial, source.size)
        else:
            sink = RawFileSink(partial, source.size)
    except (OSError, SparsefsError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc).split(": ")[-1]
        raise RestoreError(f"{target}: cannot be written: {why}") from None
    try:
        try:
            _write(source, sink, point, result, advance)
            sink.close()
        except BaseException:
            sink.abort()
            raise
        t1 = time.monotonic()
        drop_pages(partial)
        with opened(partial, kind) as readback:
            _check_digest(target, all_digests(readback, advance=advance).fold(), point)
        result.phases["verify"] = time.monotonic() - t1
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    fsync_dir(directory)


def _open_device(target: str) -> int:
    try:
        return os.open(target, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise RestoreError(
                f"{target}: is mounted or held open by another process; not written"
            ) from None
        raise RestoreError(f"{target}: cannot open: {exc.strerror}") from None


def _to_device(
    source: SparseSource, point: Point, target: str, result: RestoreResult, advance: Advance | None
) -> None:
    fd = _open_device(target)
    try:
        size = device_size(fd)
        if size < point.size:
            raise RestoreError(
                f"{target}: is {size} bytes, smaller than the point ({point.size} bytes); "
                "nothing written"
            )
        sink = DeviceSink(fd, point.size)
        _write(source, sink, point, result, advance)
        sink.close()  # zeros to the end of the point, fsync, page drop
        t1 = time.monotonic()
        got = all_digests(DeviceSource(fd, point.size), advance=advance).fold()
        _check_digest(target, got, point)
        result.phases["verify"] = time.monotonic() - t1
    finally:
        os.close(fd)


__all__ = ["RestoreError", "RestoreResult", "SetError", "check_restorable", "restore"]
