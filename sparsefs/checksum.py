"""Digests of a source's guest-visible bytes that cost nothing for holes.

Two digests of the same byte stream (all offsets are guest offsets in bytes):

**sparsefs1** (the default), printed as ``sparsefs1:`` + 32 lowercase hex digits::

    B      = 1 MiB (1048576 bytes), the block size
    L      = length of the content in bytes
    n      = ceil(L / B) blocks; block i is bytes [i*B, min((i+1)*B, L)),
             so the last block may be short (L = 0 gives no blocks)
    D_i    = XXH3-128 (seed 0) of block i, as its 16-byte canonical
             (big-endian) form -- the bytes whose hex xxh128sum prints
    H      = XXH3-128 (seed 0) of
               b"sparsefs1\\0" || u64le(L) || u64le(B) || D_0 || D_1 || ... || D_(n-1)
    digest = "sparsefs1:" + hex(canonical H)

The definition never mentions holes: a block that is all zeros has the digest
of that many zero bytes whether it is a hole (not read, the digest comes from a
table), stored zeros (read, found zero by a compare, not hashed), or hashed.
So an image, its mounted raw file, a sparse copy and a fully written copy all
give the same digest.

**stream XXH128** (``--stream-xxh128``): XXH3-128 (seed 0) of the whole byte
stream, 32 hex digits, exactly what ``xxh128sum`` prints for a raw file with
that content.  It must hash the zeros of the holes too (from one zero buffer).

Blocks with data are read and hashed in worker threads (xxhash releases the
GIL for inputs over 64 KiB), into one reused buffer per thread: a block that
is all data with one read (raw files: ``preadv`` straight into the buffer),
then a memcmp against zeros before hashing; a block that is partly data is
hashed as a stream of its data ranges and, for its holes, slices of a shared
zero buffer.  At most a few blocks per source are in flight, so memory stays
bounded.

Imports flow one way: this module knows sources only through
:class:`~sparsefs.extents.SparseSource`; never FUSE, never qcow2.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import xxhash

from sparsefs.errors import ImageReadError
from sparsefs.extents import SparseSource

DIGEST_NAME = "sparsefs1"
DIGEST_PREFIX = f"{DIGEST_NAME}:"
BLOCK_SIZE = 1024 * 1024
HEADER_MAGIC = b"sparsefs1\0"

# Stream mode: data is read in chunks of this size; holes are fed from one
# zero buffer of this size (calloc'd, so it maps the kernel's zero page).
STREAM_CHUNK_SIZE = 4 * 1024 * 1024
_ZERO_CHUNK = bytes(STREAM_CHUNK_SIZE)

# Sources other than raw files are read in pieces of at most this size.
READ_PIECE_SIZE = 1024 * 1024

# Worker threads and the blocks each stream may have in flight.
DEFAULT_WORKERS = 2
DEFAULT_IN_FLIGHT = 4

# A batch of data blocks (one task for a worker) closes at this much data, or
# at this many plans.
BATCH_DATA_BYTES = 1024 * 1024
BATCH_PLANS = 64

# Digests of zero runs are fed to the folding hash in pieces of this many blocks.
_FOLD_BATCH = 65536

ProgressCallback = Callable[[int], None]
"""Called with the guest bytes done so far (monotonic, ends at the source size)."""

DataSink = Callable[[int, "bytes | bytearray | memoryview"], None]
"""Called in a worker thread with (guest offset, bytes) of every piece of data read,
before it is hashed; the bytes are valid only during the call.  Pieces of a data
block found to be all zeros are not passed (a copy leaves them as holes)."""


@functools.lru_cache(maxsize=8)
def zero_bytes(length: int) -> bytes:
    """``length`` zero bytes, shared (compare buffer for zero detection)."""
    return bytes(length)


@functools.lru_cache(maxsize=8)
def zero_block_digest(length: int) -> bytes:
    """The block digest (16 bytes, canonical) of ``length`` zero bytes."""
    return xxhash.xxh3_128_digest(zero_bytes(length))


@dataclass(frozen=True, slots=True)
class BlockRun:
    """``count`` consecutive blocks from block ``index`` that all have block digest ``digest``.

    Attributes:
        index: first block (block i covers guest bytes [i*B, min((i+1)*B, size))).
        count: number of blocks, > 0.  Blocks with data come one per run.
        digest: the 16-byte canonical XXH3-128 of each block's bytes.
        bytes_read: bytes read from storage for the run (the data ranges of a
            data block; 0 for blocks known to be zero from the source's map).
    """

    index: int
    count: int
    digest: bytes
    bytes_read: int = 0


@dataclass(frozen=True, slots=True)
class DigestResult:
    """The outcome of hashing one source.

    Attributes:
        digest: ``sparsefs1:<32 hex>`` or, in stream mode, ``<32 hex>``.
        size: length of the content in bytes.
        bytes_read: bytes read from storage (data ranges; for a comparison,
            both sides summed); the rest were holes or known zeros.
    """

    digest: str
    size: int
    bytes_read: int


@dataclass(frozen=True, slots=True)
class Difference:
    """Why two sources differ.

    Attributes:
        size_a: length of the first source (the image), bytes.
        size_b: length of the second source (the copy), bytes.
        block: index of the first block whose digests differ (None when
            only the lengths were compared).
        start: first guest byte of that block (None with ``block``).
        end: first guest byte after that block (None with ``block``).
        offset: first differing byte inside the block (None with ``block``).
    """

    size_a: int
    size_b: int
    block: int | None = None
    start: int | None = None
    end: int | None = None
    offset: int | None = None

    @property
    def length_differs(self) -> bool:
        """True when the two contents have different lengths."""
        return self.size_a != self.size_b


# -- planning: which blocks hold data ------------------------------------------------


Plan = tuple[int, int, list[tuple[int, int]] | None]
"""(first block, block count, data ranges): ranges None means ``count`` zero blocks;
otherwise one block (count 1) and its data ranges as [guest start, guest end)."""


def _plan_blocks(source: SparseSource, block_size: int) -> Iterator[Plan]:
    """Cut the source's extent map into blocks.

    Yields zero runs and single data blocks in block order, covering every
    block exactly once.  Extents marked ``zero`` (holes, known-zero data) need
    no reading; every other extent is data.
    """
    size = source.size
    nb_blocks = -(-size // block_size)
    next_block = 0  # first block not yet yielded
    cur = -1  # block being collected
    ranges: list[tuple[int, int]] = []
    for ext in source.iter_extents(0):
        if not ext.data or ext.zero:
            continue
        pos, end = ext.guest_offset, min(ext.end, size)
        while pos < end:
            block = pos // block_size
            stop = min((block + 1) * block_size, end)
            if block != cur:
                if cur >= 0:
                    yield (cur, 1, ranges)
                    next_block = cur + 1
                if block > next_block:
                    yield (next_block, block - next_block, None)
                cur, ranges, next_block = block, [], block
            if ranges and ranges[-1][1] == pos:
                ranges[-1] = (ranges[-1][0], stop)
            else:
                ranges.append((pos, stop))
            pos = stop
    if cur >= 0:
        yield (cur, 1, ranges)
        next_block = cur + 1
    if nb_blocks > next_block:
        yield (next_block, nb_blocks - next_block, None)


def _fill_from_host(source: SparseSource, view: memoryview, offset: int) -> bool:
    """Fill ``view`` with guest bytes from ``offset`` by positional reads of the host files.

    For sources that name their host ranges (``iter_host_ranges``: qcow2,
    raw): data goes straight into ``view`` (no intermediate bytes objects),
    zeros fill the rest, pieces the source cannot name come from ``read()``.
    Returns False (nothing done) for other sources.

    Raises:
        ImageReadError: a read failed (``RawFile.pread_into``'s rule).
    """
    host_ranges = getattr(source, "iter_host_ranges", None)
    if host_ranges is None:
        return False
    end = offset + len(view)
    pos = offset
    for start, stop, raw, host in host_ranges(offset, end):
        if start > pos:
            view[pos - offset : start - offset] = zero_bytes(start - pos)
        part = view[start - offset : stop - offset]
        if raw is None:
            part[:] = _read_exact(source, start, stop - start)
        else:
            raw.pread_into(part, host)
        pos = stop
    if pos < end:
        view[pos - offset :] = zero_bytes(end - pos)
    return True


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
        if _fill_from_host(source, view, offset):
            yield view
            return
    done = 0
    while done < length:
        n = min(READ_PIECE_SIZE, length - done)
        yield _read_exact(source, offset + done, n)
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
        return BlockRun(index, 1, xxhash.xxh3_128_digest(data), nbytes)
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


# -- sparsefs1 -----------------------------------------------------------------------


def _digest_batch(
    source: SparseSource,
    plans: list[Plan],
    size: int,
    block_size: int,
    sink: DataSink | None,
) -> list[BlockRun]:
    """The runs of consecutive plans, in order (in a worker thread)."""
    runs: list[BlockRun] = []
    for index, count, ranges in plans:
        if ranges is None:
            runs.extend(_zero_runs(index, count, size, block_size))
        else:
            start = index * block_size
            length = min(block_size, size - start)
            runs.append(_digest_block(source, index, start, length, ranges, block_size, sink))
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
                    executor.submit(_digest_batch, source, plans, size, block_size, sink)
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


class _Folder:
    """Folds block digests into the final sparsefs1 digest (streamed)."""

    def __init__(self, size: int, block_size: int) -> None:
        self._hash = xxhash.xxh3_128()
        self._hash.update(
            HEADER_MAGIC + size.to_bytes(8, "little") + block_size.to_bytes(8, "little")
        )
        self.next_block = 0

    def add(self, run: BlockRun) -> None:
        if run.index != self.next_block:
            raise AssertionError(f"block {run.index} out of order (expected {self.next_block})")
        left = run.count
        while left:
            n = min(left, _FOLD_BATCH)
            self._hash.update(run.digest * n)
            left -= n
        self.next_block += run.count

    def hexdigest(self) -> str:
        return DIGEST_PREFIX + self._hash.hexdigest()


def _new_executor(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sparsefs-hash")


def block_digest(
    source: SparseSource,
    *,
    progress: ProgressCallback | None = None,
    block_size: int = BLOCK_SIZE,
    workers: int = DEFAULT_WORKERS,
    sink: DataSink | None = None,
    on_run: Callable[[BlockRun], None] | None = None,
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

    Raises:
        ImageReadError: a data block cannot be read.
        Exception: whatever ``sink`` raises.
    """
    size = source.size
    folder = _Folder(size, block_size)
    bytes_read = 0
    with _new_executor(workers) as executor:
        runs = iter_block_digests(source, executor, block_size=block_size, sink=sink)
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


# -- stream XXH128 -------------------------------------------------------------------


def _stream_pieces(source: SparseSource) -> Iterator[tuple[int, int, bool]]:
    """(guest offset, length, data) pieces of at most STREAM_CHUNK_SIZE for data."""
    size = source.size
    for ext in source.iter_extents(0):
        pos, end = ext.guest_offset, min(ext.end, size)
        if not ext.data or ext.zero:
            if end > pos:
                yield (pos, end - pos, False)
            continue
        while pos < end:
            n = min(STREAM_CHUNK_SIZE, end - pos)
            yield (pos, n, True)
            pos += n


def _read_exact(source: SparseSource, offset: int, length: int) -> bytes:
    buf = source.read(offset, length)
    if len(buf) != length:
        raise ImageReadError(
            f"short read of {length} bytes at guest offset {offset} ({len(buf)} bytes)"
        )
    return buf


def _stream_read(
    source: SparseSource, offset: int, length: int, buf: bytearray
) -> tuple[bytes | memoryview, bytearray]:
    """Read a data piece: into ``buf`` where the source names its host ranges, else as
    fresh bytes; return it and buf."""
    if length <= len(buf):
        view = memoryview(buf)[:length]
        if _fill_from_host(source, view, offset):
            return view, buf
    return _read_exact(source, offset, length), buf


def stream_xxh128(
    source: SparseSource,
    *,
    progress: ProgressCallback | None = None,
    in_flight: int = DEFAULT_IN_FLIGHT,
) -> DigestResult:
    """XXH3-128 of the whole byte stream, as ``xxh128sum`` prints it (32 hex digits).

    Data is read ahead by one worker thread while this thread hashes; holes
    are hashed from one zero buffer.

    Raises:
        ImageReadError: a data range cannot be read.
    """
    h = xxhash.xxh3_128()
    size = source.size
    zero_view = memoryview(_ZERO_CHUNK)
    bytes_read = 0
    # One reusable buffer per piece in flight (a piece in flight holds at most one).
    free = [bytearray(STREAM_CHUNK_SIZE) for _ in range(in_flight)]
    pending: deque[tuple[int, int, Future[tuple[bytes | memoryview, bytearray]] | None]]
    pending = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparsefs-read") as executor:
        try:
            pieces = _stream_pieces(source)
            exhausted = False
            while True:
                while not exhausted and len(pending) < in_flight:
                    piece = next(pieces, None)
                    if piece is None:
                        exhausted = True
                        break
                    off, n, data = piece
                    fut = None
                    if data:
                        fut = executor.submit(_stream_read, source, off, n, free.pop())
                    pending.append((off, n, fut))
                if not pending:
                    break
                off, n, fut = pending.popleft()
                if fut is None:
                    left = n
                    while left:
                        k = min(left, STREAM_CHUNK_SIZE)
                        h.update(zero_view[:k])
                        left -= k
                        if progress is not None and left:
                            progress(off + n - left)
                else:
                    got, buf = fut.result()
                    h.update(got)
                    free.append(buf)
                    bytes_read += n
                if progress is not None:
                    progress(off + n)
        finally:
            for _, _, fut in pending:
                if fut is not None:
                    fut.cancel()
    if progress is not None:
        progress(size)
    return DigestResult(h.hexdigest(), size, bytes_read)


# -- comparing two sources -----------------------------------------------------------


def _first_differing_byte(a: SparseSource, b: SparseSource, start: int, length: int) -> int:
    """Guest offset of the first byte in [start, start+length) where a and b differ."""
    x = _read_exact(a, start, length)
    y = _read_exact(b, start, length)
    if x == y:  # digests differed but bytes agree: only on a read changing under us
        raise ImageReadError(
            f"block at guest offset {start} read differently twice (is a file changing?)"
        )
    lo, hi = 0, length  # binary search on prefix equality: memcmp-fast
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x[lo:mid] == y[lo:mid]:
            lo = mid
        else:
            hi = mid
    return start + lo


def compare(
    a: SparseSource,
    b: SparseSource,
    *,
    progress: ProgressCallback | None = None,
    block_size: int = BLOCK_SIZE,
    workers: int = DEFAULT_WORKERS,
) -> tuple[Difference | None, DigestResult | None]:
    """Compare the guest content of two sources block by block.

    Both sides are read and hashed at the same time by a shared pool of
    ``workers`` threads.  Stops at the first differing block and finds the
    first differing byte in it.  A length difference is reported without
    reading anything.

    Returns:
        (None, the sparsefs1 digest of the common content) when equal;
        (the difference, None) otherwise.

    Raises:
        ImageReadError: a data block of either side cannot be read.
    """
    size = a.size
    if b.size != size:
        return Difference(size_a=size, size_b=b.size), None
    folder = _Folder(size, block_size)
    bytes_read = 0
    with _new_executor(workers) as executor:
        runs_a = iter_block_digests(a, executor, block_size=block_size)
        runs_b = iter_block_digests(b, executor, block_size=block_size)
        try:
            ra = next(runs_a, None)
            rb = next(runs_b, None)
            while ra is not None and rb is not None:
                # ra and rb both start at folder.next_block (after trimming).
                if ra.digest != rb.digest:
                    block = max(ra.index, rb.index)
                    start = block * block_size
                    end = min(start + block_size, size)
                    offset = _first_differing_byte(a, b, start, end - start)
                    return Difference(size, size, block, start, end, offset), None
                n = min(ra.count, rb.count)
                folder.add(BlockRun(folder.next_block, n, ra.digest))
                bytes_read += ra.bytes_read + rb.bytes_read
                ra = _trim(ra, n) or next(runs_a, None)
                rb = _trim(rb, n) or next(runs_b, None)
                if progress is not None:
                    progress(min(size, folder.next_block * block_size))
            if ra is not None or rb is not None:  # cannot happen with equal sizes
                raise AssertionError("block streams of equal-size sources ended apart")
        finally:
            runs_a.close()
            runs_b.close()
    return None, DigestResult(folder.hexdigest(), size, bytes_read)


def _trim(run: BlockRun, n: int) -> BlockRun | None:
    """The part of ``run`` after its first ``n`` blocks, or None."""
    if n >= run.count:
        return None
    return BlockRun(run.index + n, run.count - n, run.digest)
