"""The block walk: plan the blocks of a source from its extent map, read and hash
the data blocks in worker threads, in batches, and fold them (:func:`block_digest`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import xxhash

from sparsefs.bulkread import fill_from_host, read_exact
from sparsefs.checksum.digest import (
    BATCH_DATA_BYTES,
    BATCH_PLANS,
    BLOCK_SIZE,
    DEFAULT_IN_FLIGHT,
    DEFAULT_WORKERS,
    READ_PIECE_SIZE,
    BlockRun,
    DataSink,
    DigestResult,
    Folder,
    ProgressCallback,
    zero_block_digest,
    zero_bytes,
)
from sparsefs.extents import SparseSource

# -- planning: which blocks hold data ------------------------------------------------


Plan = tuple[int, int, list[tuple[int, int]] | None]
"""(first block, block count, data ranges): ranges None means ``count`` zero blocks;
otherwise one block (count 1) and its data ranges as [guest start, guest end)."""


def data_blocks(
    source: SparseSource, block_size: int = BLOCK_SIZE, start_block: int = 0
) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """(block, its data ranges) for every block holding data, in order, from one walk.

    Ranges are [guest start, guest end), merged where they touch.  Extents
    marked ``zero`` (holes, known-zero data) need no reading and count as no
    data.
    """
    size = source.size
    cur = -1  # block being collected
    ranges: list[tuple[int, int]] = []
    for ext in source.iter_extents(start_block * block_size):
        if not ext.data or ext.zero:
            continue
        pos, end = ext.guest_offset, min(ext.end, size)
        while pos < end:
            block = pos // block_size
            stop = min((block + 1) * block_size, end)
            if block != cur:
                if cur >= 0:
                    yield cur, ranges
                cur, ranges = block, []
            if ranges and ranges[-1][1] == pos:
                ranges[-1] = (ranges[-1][0], stop)
            else:
                ranges.append((pos, stop))
            pos = stop
    if cur >= 0:
        yield cur, ranges


def _plan_blocks(source: SparseSource, block_size: int) -> Iterator[Plan]:
    """Cut the source's extent map into blocks.

    Yields zero runs and single data blocks in block order, covering every
    block exactly once.
    """
    nb_blocks = -(-source.size // block_size)
    next_block = 0  # first block not yet yielded
    for block, ranges in data_blocks(source, block_size):
        if block > next_block:
            yield (next_block, block - next_block, None)
        yield (block, 1, ranges)
        next_block = block + 1
    if nb_blocks > next_block:
        yield (next_block, nb_blocks - next_block, None)


def _iter_pieces(
    source: SparseSource, offset: int, length: int, buf: bytearray
) -> Iterator[bytes | bytearray | memoryview]:
    """The guest bytes ``[offset, offset + length)`` as consecutive pieces.

    Sources that name their host ranges (raw files, qcow2) are read straight
    into ``buf`` (one piece, valid until the next use of ``buf``); others
    through ``read()``, in pieces of at most READ_PIECE_SIZE, hashed as they
    come (no copy).

    Raises:
        ImageReadError: a read failed or came back short.
    """
    if length <= len(buf):
        view = memoryview(buf)[:length]
        if fill_from_host(source, view, offset):
            yield view
            return
    done = 0
    while done < length:
        n = min(READ_PIECE_SIZE, length - done)
        yield read_exact(source, offset + done, n)
        done += n


_local = threading.local()


def _thread_buffer(size: int) -> bytearray:
    """This thread's reusable buffer of exactly ``size`` bytes.

    Reuse matters: a fresh multi-MiB buffer per block costs a page fault per
    4 KiB (measured: 370k faults, 1 s of system time for 600 MiB of data).
    """
    bufs: dict[int, bytearray] | None = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(size)
    if buf is None:
        if len(bufs) >= 2:  # callers use one block size; keep the last ones only
            bufs.clear()
        buf = bufs[size] = bytearray(size)
    return buf


def _digest_block(
    source: SparseSource,
    index: int,
    start: int,
    length: int,
    ranges: list[tuple[int, int]],
    block_size: int,
    sink: DataSink | None = None,
    fine_size: int = 0,
) -> BlockRun:
    """The run of one block with data: read, zero-checked, hashed (in a worker thread).

    A block that is all data and read in one piece is compared with zeros
    first (memcmp, stops at the first non-zero byte).  Otherwise the block is
    hashed as a stream: its data pieces as read, its holes from slices of the
    shared zero buffer (never copied).  Either way the digest is the XXH3-128
    of the block's bytes.
    """
    nbytes = sum(hi - lo for lo, hi in ranges)
    buf = _thread_buffer(block_size)
    whole = len(ranges) == 1 and ranges[0] == (start, start + length)
    if whole and (length <= READ_PIECE_SIZE or hasattr(source, "iter_host_ranges")):
        (data,) = _iter_pieces(source, start, length, buf)
        # memcmp needs an object of the block's length (a memoryview compares
        # item by item, 100x slower): the buffer itself for a full raw block.
        probe = buf if isinstance(data, memoryview) else data
        if len(probe) == length and probe == zero_bytes(length):
            return BlockRun(index, 1, zero_block_digest(length), nbytes)
        if sink is not None:
            sink(start, data)
        fines = _fines(data, start, fine_size) if fine_size else ()
        return BlockRun(index, 1, xxhash.xxh3_128_digest(data), nbytes, fines)
    if fine_size:
        return _digest_assembled(source, index, start, length, ranges, sink, fine_size)
    zeros = memoryview(zero_bytes(block_size))
    h = xxhash.xxh3_128()
    pos = start
    for lo, hi in ranges:
        if lo > pos:
            h.update(zeros[: lo - pos])
        piece_pos = lo
        for piece in _iter_pieces(source, lo, hi - lo, buf):
            if sink is not None:
                sink(piece_pos, piece)
            piece_pos += len(piece)
            h.update(piece)
        pos = hi
    if pos < start + length:
        h.update(zeros[: start + length - pos])
    return BlockRun(index, 1, h.digest(), nbytes)


def _fines(
    data: bytes | bytearray | memoryview, start: int, fine_size: int
) -> tuple[tuple[int, bytes], ...]:
    """(sub-block index, digest) of each sub-block of ``data`` (at guest ``start``) not all zero."""
    out = []
    view = memoryview(data)
    for rel in range(0, len(view), fine_size):
        piece = view[rel : rel + fine_size]
        digest = xxhash.xxh3_128_digest(piece)
        if digest != zero_block_digest(len(piece)):
            out.append(((start + rel) // fine_size, digest))
    return tuple(out)


def _digest_assembled(
    source: SparseSource,
    index: int,
    start: int,
    length: int,
    ranges: list[tuple[int, int]],
    sink: DataSink | None,
    fine_size: int,
) -> BlockRun:
    """:func:`_digest_block` for a block with holes when sub-block digests are wanted:
    the block is put together in a buffer (data read, holes zeroed), then hashed."""
    block = bytearray(length)
    piece_buf = _thread_buffer(length)
    with memoryview(block) as view:
        for lo, hi in ranges:
            pos = lo
            for piece in _iter_pieces(source, lo, hi - lo, piece_buf):
                if sink is not None:
                    sink(pos, piece)
                view[pos - start : pos - start + len(piece)] = piece
                pos += len(piece)
    nbytes = sum(hi - lo for lo, hi in ranges)
    return BlockRun(
        index, 1, xxhash.xxh3_128_digest(block), nbytes, _fines(block, start, fine_size)
    )


# -- sparsefs1 -----------------------------------------------------------------------


def _digest_batch(
    source: SparseSource,
    plans: list[Plan],
    size: int,
    block_size: int,
    sink: DataSink | None,
    fine_size: int = 0,
) -> list[BlockRun]:
    """The runs of consecutive plans, in order (in a worker thread)."""
    runs: list[BlockRun] = []
    for index, count, ranges in plans:
        if ranges is None:
            runs.extend(_zero_runs(index, count, size, block_size))
        else:
            start = index * block_size
            length = min(block_size, size - start)
            runs.append(
                _digest_block(source, index, start, length, ranges, block_size, sink, fine_size)
            )
    return runs


def _zero_runs(index: int, count: int, size: int, block_size: int) -> Iterator[BlockRun]:
    """``count`` zero blocks from ``index``: one run, two if it ends with the short last block."""
    full_blocks = size // block_size
    stop = index + count
    if index < full_blocks:
        n = min(stop, full_blocks) - index
        yield BlockRun(index, n, zero_block_digest(block_size))
    if stop > full_blocks:  # ends with the short last block
        yield BlockRun(full_blocks, 1, zero_block_digest(size - full_blocks * block_size))


def _batches(source: SparseSource, block_size: int) -> Iterator[tuple[list[Plan], bool]]:
    """The plans, grouped: (plans, has data).

    A batch of data blocks closes once it holds BATCH_DATA_BYTES of data (a
    full block alone makes one), so that blocks with little data (a
    fragmented disk: 64 KiB in each MiB) cost one task per batch, not one per
    block.  Zero runs before any data pass alone, without a task; zero runs
    between data blocks of a batch ride along.
    """
    batch: list[Plan] = []
    data = 0
    for plan in _plan_blocks(source, block_size):
        ranges = plan[2]
        if ranges is None:
            if batch:
                batch.append(plan)
            else:
                yield [plan], False
            continue
        batch.append(plan)
        data += sum(hi - lo for lo, hi in ranges)
        if data >= BATCH_DATA_BYTES or len(batch) >= BATCH_PLANS:
            yield batch, True
            batch, data = [], 0
    if batch:
        yield batch, True


def iter_block_digests(
    source: SparseSource,
    executor: ThreadPoolExecutor,
    *,
    block_size: int = BLOCK_SIZE,
    in_flight: int = DEFAULT_IN_FLIGHT,
    sink: DataSink | None = None,
    fine_size: int = 0,
) -> Generator[BlockRun, None, None]:
    """Yield the block digests of ``source`` in block order, as runs.

    Zero runs never touch storage; data blocks are read and hashed by
    ``executor`` in batches, with at most ``in_flight`` batches submitted
    ahead.  Runs never mix full blocks with the short last block.

    Raises:
        ImageReadError: a data block cannot be read.
    """
    size = source.size
    pending: deque[Future[list[BlockRun]] | list[Plan]] = deque()
    # a batch being worked on, or zero runs (plans) waiting for their turn

    def drain_one() -> Iterator[BlockRun]:
        item = pending.popleft()
        if isinstance(item, list):
            for index, count, _ in item:
                yield from _zero_runs(index, count, size, block_size)
        else:
            yield from item.result()

    try:
        busy = 0  # batches submitted and not drained
        for plans, has_data in _batches(source, block_size):
            if not has_data:
                pending.append(plans)
            else:
                pending.append(
                    executor.submit(_digest_batch, source, plans, size, block_size, sink, fine_size)
                )
                busy += 1
            while pending and (busy >= in_flight or isinstance(pending[0], list)):
                if not isinstance(pending[0], list):
                    busy -= 1
                yield from drain_one()
        while pending:
            yield from drain_one()
    finally:
        for queued in pending:
            if not isinstance(queued, list):
                queued.cancel()


def new_executor(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sparsefs-hash")


def block_digest(
    source: SparseSource,
    *,
    progress: ProgressCallback | None = None,
    block_size: int = BLOCK_SIZE,
    workers: int = DEFAULT_WORKERS,
    sink: DataSink | None = None,
    on_run: Callable[[BlockRun], None] | None = None,
    fine_size: int = 0,
) -> DigestResult:
    """The sparsefs1 digest of ``source`` (see the module docstring).

    Args:
        source: what to hash.
        progress: called with the guest bytes done so far.
        block_size: B of the definition (tests vary it).
        workers: threads that read and hash data blocks.
        sink: given every data piece as it is read (a copy that hashes what
            it reads, see :data:`DataSink`).
        on_run: called with each block run in order, in the calling thread
            (its ``bytes_read`` is the data read for it).
        fine_size: also digest each data block's sub-blocks of this many bytes
            (a divisor of ``block_size``; 0: none): ``BlockRun.fines``.

    Raises:
        ImageReadError: a data block cannot be read.
        Exception: whatever ``sink`` raises.
    """
    size = source.size
    folder = Folder(size, block_size)
    bytes_read = 0
    with new_executor(workers) as executor:
        runs = iter_block_digests(
            source, executor, block_size=block_size, sink=sink, fine_size=fine_size
        )
        try:
            for run in runs:
                folder.add(run)
                bytes_read += run.bytes_read
                if on_run is not None:
                    on_run(run)
                if progress is not None:
                    progress(min(size, folder.next_block * block_size))
        finally:
            runs.close()
    return DigestResult(folder.hexdigest(), size, bytes_read)
