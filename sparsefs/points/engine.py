"""Write what changed since the previous point into a sink, then verify the result.

One engine makes every point and every restore target:

- a **delta point**: the sink is a qcow2 overlay over the previous point; the
  previous point's :class:`~sparsefs.points.blocks.BlockDigests` say what it
  holds.  A 64 KiB block that is not zero now and whose digest differs is
  written; one that is zero now but was not becomes a zero cluster
  (``write_zeroes``, which hides the backing file); everything else is left
  unallocated and reads through to the previous point.
- a **full point** or a **restore**: the same with empty previous digests
  (every non-zero block is written; a new file's unwritten ranges are holes).

Which blocks are looked at: every MiB block holding data now or before
(digest-driven: O(data) read, holes cost nothing).  A delta from a dirty
bitmap reads only the dirty blocks: :mod:`sparsefs.points.dirty`.

Verification reads the written point back (after its sync and a page drop):
the MiB blocks that were written, through its backing chain; the digests of
the other blocks come from the previous point.  Folded, they must equal the
image's sparsefs1 digest as the scan computed it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from sparsefs.checksum import BLOCK_SIZE
from sparsefs.extents import Extent, SparseSource
from sparsefs.libc import pwrite_all
from sparsefs.points.blocks import FINE_PER_BLOCK, FINE_SIZE, BlockDigests, zero_digest
from sparsefs.points.scan import BlockScan, scan

Advance = Callable[[int], None]


class Sink(Protocol):
    """Where the engine writes: guest offsets, whole 64 KiB blocks (the last may be short)."""

    def write(self, guest_offset: int, data: bytes | memoryview) -> object:
        """Store ``data`` at ``guest_offset``."""
        ...

    def write_zeroes(self, guest_offset: int, length: int) -> object:
        """Make ``[guest_offset, guest_offset + length)`` read as zeros."""
        ...


@dataclass
class Written:
    """What :func:`write_changes` did.

    Attributes:
        digests: the source's block digests (complete).
        digest: the source's sparsefs1 digest (folded from ``digests``).
        changed_blocks: MiB blocks where something was written or zeroed.
        data_bytes: bytes of data written.
        zeroed_bytes: bytes made zero (zero clusters).
        bytes_read: data bytes read from the source.
    """

    digests: BlockDigests
    digest: str = ""
    changed_blocks: list[int] = field(default_factory=list)
    data_bytes: int = 0
    zeroed_bytes: int = 0
    bytes_read: int = 0


def _changes(
    block: BlockScan, prev: dict[int, bytes], size: int
) -> Iterator[tuple[int, int, bool]]:
    """(guest start, guest end, is data) runs of one block to write: data or zeros."""
    new = dict(block.fines)
    first = block.index * FINE_PER_BLOCK
    run: tuple[int, int, bool] | None = None
    for fine in range(first, first + -(-block.length // FINE_SIZE)):
        digest = new.get(fine)
        if digest is not None and prev.get(fine) != digest:
            kind: bool | None = True
        elif digest is None and fine in prev:
            kind = False
        else:
            kind = None
        start = fine * FINE_SIZE
        end = min(start + FINE_SIZE, size)
        if run is not None and (kind is None or kind != run[2]):
            yield run
            run = None
        if kind is not None:
            run = (run[0], end, kind) if run is not None else (start, end, kind)
    if run is not None:
        yield run


def write_changes(
    source: SparseSource,
    sink: Sink,
    prev: BlockDigests,
    *,
    advance: Advance | None = None,
) -> Written:
    """Write into ``sink`` what differs between ``source`` and the point ``prev`` describes.

    Args:
        source: the image (or the point to restore).
        sink: the new point or target, reading as ``prev`` before the call.
        prev: the previous point's digests (``BlockDigests(size)`` for none).
        advance: called with the data bytes read, as they are.

    Raises:
        ImageReadError: reading the source failed.
        OSError: writing failed.
    """
    size = source.size
    new = BlockDigests(size)
    out = Written(new)
    for block in scan(source, extra=prev.blocks_with_data()):
        new.add_block(block.index, block.digest, block.fines)
        out.bytes_read += block.bytes_read
        prev_fines = prev.fines_of_block(block.index) if block.index < prev.nb_blocks else {}
        changed = False
        for start, end, is_data in _changes(block, prev_fines, size):
            changed = True
            if is_data:
                assert block.data is not None
                rel = start - block.start
                sink.write(start, block.data[rel : rel + end - start])
                out.data_bytes += end - start
            else:
                sink.write_zeroes(start, end - start)
                out.zeroed_bytes += end - start
        if changed:
            out.changed_blocks.append(block.index)
        if advance is not None and block.bytes_read:
            advance(block.bytes_read)
    out.digest = out.digests.fold()
    return out


def point_digest(
    point: SparseSource,
    prev: BlockDigests | None,
    changed_blocks: list[int],
    *,
    advance: Advance | None = None,
) -> str:
    """The sparsefs1 digest of a point read back: ``changed_blocks`` read, the rest from ``prev``.

    ``prev`` None reads every block holding data (a full point, a restore target).
    """
    size = point.size
    if prev is None:
        return all_digests(point, advance=advance).fold()
    check = list(changed_blocks)
    if prev.size != size and prev.size % BLOCK_SIZE:
        check = sorted({*check, prev.nb_blocks - 1})
    updates = BlockDigests(size)
    for block in scan(point, blocks=check):
        updates.add_block(block.index, block.digest, block.fines)
        if advance is not None:
            advance(block.bytes_read)
    return prev.spliced(size, updates, check).fold()


RunCallback = Callable[[int, int, bytes, int], None]
"""Called with (first MiB block, count, block digest, bytes read) for consecutive runs."""


def all_digests(
    source: SparseSource, *, advance: Advance | None = None, on_run: RunCallback | None = None
) -> BlockDigests:
    """The block digests of all of ``source``, reading its data once (holes cost nothing).

    ``on_run`` sees every MiB block in order, zero runs included (a full run
    never includes the short last block).
    """
    size = source.size
    out = BlockDigests(size)
    full = size // BLOCK_SIZE
    pos = 0

    def zeros_until(stop: int) -> None:
        nonlocal pos
        if on_run is None:
            pos = stop
            return
        if min(stop, full) > pos:
            on_run(pos, min(stop, full) - pos, zero_digest(size, pos, BLOCK_SIZE), 0)
            pos = min(stop, full)
        if stop > pos:  # the short last block
            on_run(pos, 1, zero_digest(size, pos, BLOCK_SIZE), 0)
            pos = stop

    for block in scan(source):
        zeros_until(block.index)
        out.add_block(block.index, block.digest, block.fines)
        if on_run is not None:
            on_run(block.index, 1, block.digest, block.bytes_read)
        pos = block.index + 1
        if advance is not None and block.bytes_read:
            advance(block.bytes_read)
    zeros_until(out.nb_blocks)
    return out


def drop_pages(path: str) -> None:
    """Drop the cached pages of a synced file, so what is read next comes from the storage."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class RawFileSink:
    """A new sparse raw file of ``size`` bytes (created, never an existing file).

    Unwritten ranges are holes, so ``write_zeroes`` on a new file has nothing to do.

    Raises:
        FileExistsError: ``path`` exists.
    """

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(self.fd, size)
        except BaseException:
            self.abort()
            raise

    def write(self, guest_offset: int, data: bytes | memoryview) -> None:
        pwrite_all(self.fd, data, guest_offset)

    def write_zeroes(self, guest_offset: int, length: int) -> None:
        """Nothing: the range of a new file is a hole already."""

    def close(self) -> None:
        """fsync and close."""
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1

    def abort(self) -> None:
        """Close and remove the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# Block device ioctls (linux/fs.h).
BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F


def device_size(fd: int) -> int:
    """Bytes of the block device open on ``fd``."""
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return int.from_bytes(buf, "little")


class DeviceSink:
    """An existing block device: every byte of ``[0, size)`` is written, data or zeros.

    Ranges the point holds no data in are zeroed with ``BLKZEROOUT`` (the
    kernel writes zeros or uses the device's guaranteed zeroing); writes come
    in increasing order and every gap before a write is zeroed first, so no
    old byte survives in a hole.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._pos = 0

    def _zero(self, start: int, end: int) -> None:
        head = min(end, -(-start // 512) * 512)
        tail = max(head, end // 512 * 512)
        if head > start:
            pwrite_all(self.fd, bytes(head - start), start)
        pos = head
        while pos < tail:  # in pieces, so a huge device does not block one ioctl for long
            n = min(tail - pos, 1 << 30)
            fcntl.ioctl(self.fd, BLKZEROOUT, pos.to_bytes(8, "little") + n.to_bytes(8, "little"))
            pos += n
        if end > tail:
            pwrite_all(self.fd, bytes(end - tail), tail)

    def write(self, guest_offset: int, data: bytes | memoryview) -> None:
        if guest_offset > self._pos:
            self._zero(self._pos, guest_offset)
        pwrite_all(self.fd, data, guest_offset)
        self._pos = max(self._pos, guest_offset + len(data))

    def write_zeroes(self, guest_offset: int, length: int) -> None:
        end = guest_offset + length
        if end > self._pos:
            self._zero(self._pos, end)  # the gap before reads as zeros too
            self._pos = end

    def close(self) -> None:
        """Zero the rest up to ``size`` and sync; the caller closes the descriptor."""
        if self._pos < self.size:
            self._zero(self._pos, self.size)
            self._pos = self.size
        os.fsync(self.fd)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)


class DeviceSource:
    """The first ``size`` bytes of an open block device as a source (all data: no map)."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def read(self, guest_offset: int, length: int) -> bytes:
        length = max(0, min(length, self._size - guest_offset))
        out = bytearray()
        while len(out) < length:
            got = os.pread(self._fd, length - len(out), guest_offset + len(out))
            if not got:
                raise OSError(errno.EIO, "short read from the device")
            out += got
        return bytes(out)

    def iter_extents(self, guest_offset: int = 0) -> Iterator[Extent]:
        if guest_offset < self._size:
            yield Extent(guest_offset, self._size - guest_offset, data=True)


def is_block_device(path: str) -> bool:
    """True when ``path`` exists and is a block device."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False
