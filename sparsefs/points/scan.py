"""Read a source once and hash it in MiB blocks and in 64 KiB blocks, on worker threads.

:func:`scan` yields, in block order, one :class:`BlockScan` per MiB block it
was asked about: the block's bytes (valid until the next block is asked for),
its sparsefs1 block digest, and the XXH3-128 digests of its non-zero 64 KiB
blocks (:mod:`sparsefs.points.blocks`).  Blocks are read through the
source's own holes: a range the source's extent map calls a hole (or known
zeros) is never read.  A block without data is yielded without a read.

Data blocks are read and hashed by a thread pool (xxhash releases the GIL on
large inputs), into a fixed set of reused 1 MiB buffers: at most
``in_flight`` blocks are ahead of the caller, so memory stays bounded.

All offsets are guest offsets in bytes.
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import xxhash

from sparsefs.bulkread import fill_from_host, read_exact
from sparsefs.checksum import BLOCK_SIZE, data_blocks, zero_bytes
from sparsefs.extents import SparseSource
from sparsefs.points.blocks import FINE_PER_BLOCK, FINE_SIZE, zero_digest

# As the checksum walk: cold images are read with O_DIRECT, and the readers
# blocked in reads keep the disk busy.
DEFAULT_WORKERS = 8
DEFAULT_IN_FLIGHT = 16

Ranges = list[tuple[int, int]]


@dataclass(slots=True)
class BlockScan:
    """One MiB block as read.

    Attributes:
        index: the MiB block (guest bytes ``[index*B, min((index+1)*B, size))``).
        length: its length in bytes (short for the last block).
        digest: its sparsefs1 block digest.
        fines: (64 KiB block index, digest) of its non-zero 64 KiB blocks.
        data: the block's bytes, or None when it held no data (not read).
        bytes_read: data bytes read from the source.
    """

    index: int
    length: int
    digest: bytes
    fines: list[tuple[int, bytes]]
    data: memoryview | None
    bytes_read: int
    _buf: bytearray | None = None
    _pool: queue.SimpleQueue[bytearray] | None = None

    @property
    def start(self) -> int:
        """The block's first guest byte."""
        return self.index * BLOCK_SIZE

    def release(self) -> None:
        """Give the buffer back; ``data`` is invalid afterwards."""
        if self._buf is not None and self._pool is not None:
            self.data = None
            self._pool.put(self._buf)
            self._buf = None


def ranges_in(source: SparseSource, start: int, end: int) -> Ranges:
    """The data ranges of guest bytes ``[start, end)``."""
    out: Ranges = []
    for ext in source.iter_extents(start):
        if ext.guest_offset >= end:
            break
        if ext.data and not ext.zero:
            out.append((max(ext.guest_offset, start), min(ext.end, end)))
        if ext.end >= end:
            break
    return out


def ranges_of_block(source: SparseSource, block: int) -> Ranges:
    """The data ranges of one MiB block."""
    start = block * BLOCK_SIZE
    return ranges_in(source, start, min(start + BLOCK_SIZE, source.size))


def _plan(
    source: SparseSource, blocks: Iterable[int] | None, extra: Iterable[int]
) -> Iterator[tuple[int, Ranges]]:
    """The blocks to scan: ``blocks`` if given, else the data blocks plus ``extra``, in order."""
    if blocks is not None:
        for block in blocks:
            yield block, ranges_of_block(source, block)
        return
    pending = deque(sorted(set(extra)))
    for block, ranges in data_blocks(source):
        while pending and pending[0] < block:
            yield pending.popleft(), []
        if pending and pending[0] == block:
            pending.popleft()
        yield block, ranges
    while pending:
        yield pending.popleft(), []


def _fill(source: SparseSource, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the guest bytes from ``offset`` (a data range of the source).

    Host ranges straight into ``view``, uncached where the page cache lacks
    them (:func:`sparsefs.bulkread.fill_from_host`); else ``read()``.
    """
    if not fill_from_host(source, view, offset):
        view[:] = read_exact(source, offset, len(view))


def fill_ranges(source: SparseSource, view: memoryview, start: int, ranges: Ranges) -> int:
    """Fill ``view`` with the guest bytes from ``start``: ``ranges`` read, the rest zeros.

    Returns the bytes read.
    """
    end = start + len(view)
    pos = start
    for lo, hi in ranges:
        if lo > pos:
            view[pos - start : lo - start] = zero_bytes(lo - pos)
        _fill(source, view[lo - start : hi - start], lo)
        pos = hi
    if pos < end:
        view[pos - start :] = zero_bytes(end - pos)
    return sum(hi - lo for lo, hi in ranges)


def hash_block(index: int, view: memoryview, size: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The block digest of MiB block ``index`` holding ``view``, and its non-zero fine digests.

    A 64 KiB block is zero when its digest is the zero block's: the MiB-level
    verification of every point re-reads what was written, so a collision
    there cannot pass unseen.
    """
    fines: list[tuple[int, bytes]] = []
    first = index * FINE_PER_BLOCK
    full_zero = zero_digest(size, first, FINE_SIZE) if len(view) >= FINE_SIZE else b""
    for j in range(0, len(view), FINE_SIZE):
        piece = view[j : j + FINE_SIZE]
        digest = xxhash.xxh3_128_digest(piece)
        zero = (
            full_zero
            if len(piece) == FINE_SIZE
            else zero_digest(size, first + j // FINE_SIZE, FINE_SIZE)
        )
        if digest != zero:
            fines.append((first + j // FINE_SIZE, digest))
    if not fines:
        return zero_digest(size, index, BLOCK_SIZE), fines
    return xxhash.xxh3_128_digest(view), fines


def _scan_one(
    source: SparseSource, index: int, ranges: Ranges, pool: queue.SimpleQueue[bytearray]
) -> BlockScan:
    """Read and hash one block with data (in a worker thread)."""
    size = source.size
    start = index * BLOCK_SIZE
    length = min(BLOCK_SIZE, size - start)
    buf = pool.get()
    try:
        view = memoryview(buf)[:length]
        read = fill_ranges(source, view, start, ranges)
        digest, fines = hash_block(index, view, size)
    except BaseException:
        pool.put(buf)
        raise
    return BlockScan(index, length, digest, fines, view, read, buf, pool)


def _zero_scan(source: SparseSource, index: int) -> BlockScan:
    length = min(BLOCK_SIZE, source.size - index * BLOCK_SIZE)
    return BlockScan(index, length, zero_digest(source.size, index, BLOCK_SIZE), [], None, 0)


def scan(
    source: SparseSource,
    *,
    blocks: Iterable[int] | None = None,
    extra: Iterable[int] = (),
    workers: int = DEFAULT_WORKERS,
    in_flight: int = DEFAULT_IN_FLIGHT,
) -> Iterator[BlockScan]:
    """Yield the scans of ``source``'s MiB blocks in order.

    A scan's ``data`` is valid until the next one is asked for.

    Args:
        source: what to read.
        blocks: exactly these MiB blocks (increasing), data or not; None: every
            block holding data, plus ``extra``.
        extra: blocks to yield even without data (None ``blocks`` only).
        workers: reader/hasher threads.
        in_flight: blocks read ahead of the caller.

    Raises:
        ImageReadError: a data range cannot be read.
    """
    pool: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for _ in range(in_flight + workers + 1):
        pool.put(bytearray(BLOCK_SIZE))
    pending: deque[Future[BlockScan] | BlockScan] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sparsefs-scan") as executor:
        try:
            for index, ranges in _plan(source, blocks, extra):
                if ranges:
                    pending.append(executor.submit(_scan_one, source, index, ranges, pool))
                else:
                    pending.append(_zero_scan(source, index))
                while len(pending) > in_flight:
                    yield from _handed_out(pending.popleft())
            while pending:
                yield from _handed_out(pending.popleft())
        finally:
            for item in pending:
                if isinstance(item, Future):
                    item.cancel()


def _handed_out(item: Future[BlockScan] | BlockScan) -> Iterator[BlockScan]:
    """Yield the scan, then take its buffer back (the caller is done with it)."""
    result = item.result() if isinstance(item, Future) else item
    try:
        yield result
    finally:
        result.release()
