"""A delta from a dirty bitmap: read only the dirty 64 KiB blocks, verify through the point.

The bitmap names the guest ranges written since the previous point; rounded
out to 64 KiB blocks, they are all that is read from the image.  A dirty
block is written when its digest differs from the previous point's (zero
blocks that were not zero become zero clusters); the bitmap is trusted to
hold every write, as README "Restore points" says.

Verification reads every MiB block holding a dirty block back from the new
point (through its backing chain, after a sync and a page drop): each of its
64 KiB blocks must have the digest expected of it (the image's for a dirty
block, the previous point's for the others), and the MiB digests read there
give the new point's sparsefs1 digest, with the previous point's for every
other block.  So the image's dirty data is read once, and the point's
changed MiB blocks once.

All offsets are guest offsets in bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import xxhash

from sparsefs.checksum import BLOCK_SIZE
from sparsefs.errors import SparsefsError
from sparsefs.extents import SparseSource
from sparsefs.points.blocks import FINE_PER_BLOCK, FINE_SIZE, BlockDigests, zero_digest
from sparsefs.points.engine import Advance, Sink
from sparsefs.points.scan import fill_ranges, ranges_in, scan

# Dirty 64 KiB blocks read at once (consecutive ones), bytes.
READ_RUN = 4 * 1024 * 1024


class DeltaVerificationError(SparsefsError):
    """A block of the new point does not read back as expected."""


@dataclass
class DirtyWritten:
    """What :func:`write_dirty` did.

    Attributes:
        expected: dirty 64 KiB block -> its digest in the image (None: zero).
        changed_blocks: MiB blocks holding a write or a zeroing.
        data_bytes, zeroed_bytes, bytes_read: bytes written, zeroed, read.
    """

    expected: dict[int, bytes | None] = field(default_factory=dict)
    changed_blocks: list[int] = field(default_factory=list)
    data_bytes: int = 0
    zeroed_bytes: int = 0
    bytes_read: int = 0


def dirty_fines(ranges: list[tuple[int, int]], size: int) -> list[int]:
    """The 64 KiB blocks that ``ranges`` (guest offset, length) touch, increasing."""
    fines: set[int] = set()
    for start, length in ranges:
        end = min(start + length, size)
        if end > start:
            fines.update(range(start // FINE_SIZE, (end - 1) // FINE_SIZE + 1))
    return sorted(fines)


def _runs(fines: list[int], size: int) -> Iterator[tuple[int, int]]:
    """Consecutive dirty blocks as guest (start, end) runs of at most READ_RUN bytes."""
    start = end = -1
    for fine in fines:
        lo = fine * FINE_SIZE
        if lo == end and end - start < READ_RUN:
            end = min(lo + FINE_SIZE, size)
            continue
        if end > start >= 0:
            yield start, end
        start, end = lo, min(lo + FINE_SIZE, size)
    if end > start >= 0:
        yield start, end


def write_dirty(
    source: SparseSource,
    sink: Sink,
    prev: BlockDigests,
    fines: list[int],
    *,
    advance: Advance | None = None,
) -> DirtyWritten:
    """Write the dirty blocks of ``source`` that differ from ``prev``; see the module docstring.

    Raises:
        ImageReadError: reading the image failed.
        OSError: writing failed.
    """
    size = source.size
    if prev.size != size and prev.size % FINE_SIZE:  # the old short last block grew
        fines = sorted({*fines, prev.size // FINE_SIZE})
    out = DirtyWritten()
    buf = bytearray(READ_RUN)
    prev_fines: dict[int, dict[int, bytes]] = {}
    for start, end in _runs(fines, size):
        view = memoryview(buf)[: end - start]
        out.bytes_read += fill_ranges(source, view, start, ranges_in(source, start, end))
        for lo in range(start, end, FINE_SIZE):
            fine = lo // FINE_SIZE
            piece = view[lo - start : min(lo + FINE_SIZE, end) - start]
            digest: bytes | None = xxhash.xxh3_128_digest(piece)
            if digest == zero_digest(size, fine, FINE_SIZE):
                digest = None
            out.expected[fine] = digest
            block = fine // FINE_PER_BLOCK
            if block not in prev_fines:
                prev_fines[block] = prev.fines_of_block(block) if block < prev.nb_blocks else {}
            before = prev_fines[block].get(fine)
            if digest is not None and digest != before:
                sink.write(lo, piece)
                out.data_bytes += len(piece)
            elif digest is None and before is not None:
                sink.write_zeroes(lo, len(piece))
                out.zeroed_bytes += len(piece)
            else:
                continue
            if not out.changed_blocks or out.changed_blocks[-1] != block:
                out.changed_blocks.append(block)
        if advance is not None:
            advance(end - start)
    return out


def verify_dirty(
    point: SparseSource,
    prev: BlockDigests,
    written: DirtyWritten,
    *,
    advance: Advance | None = None,
) -> BlockDigests:
    """Read the dirty MiB blocks back from ``point``; return the point's block digests.

    Raises:
        DeltaVerificationError: a 64 KiB block reads back other than expected.
    """
    size = point.size
    check = sorted({fine // FINE_PER_BLOCK for fine in written.expected})
    if prev.size != size and prev.size % BLOCK_SIZE:
        check = sorted({*check, prev.nb_blocks - 1})  # the old short last block
    updates = BlockDigests(size)
    for block in scan(point, blocks=check):
        before = prev.fines_of_block(block.index) if block.index < prev.nb_blocks else {}
        got = dict(block.fines)
        first = block.index * FINE_PER_BLOCK
        for fine in range(first, first + -(-block.length // FINE_SIZE)):
            want = written.expected[fine] if fine in written.expected else before.get(fine)
            if got.get(fine) != want:
                raise DeltaVerificationError(
                    f"{getattr(point, 'path', 'the point')}: verification failed: guest bytes "
                    f"{fine * FINE_SIZE} to {min((fine + 1) * FINE_SIZE, size)} read back "
                    "other than the image held; nothing recorded"
                )
        updates.add_block(block.index, block.digest, block.fines)
        if advance is not None:
            advance(block.bytes_read)
    return prev.spliced(size, updates, check)
