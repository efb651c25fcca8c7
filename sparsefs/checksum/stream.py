"""Stream XXH128: what ``xxh128sum`` prints for the raw byte stream, holes from one zero buffer."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import xxhash

from sparsefs.bulkread import fill_from_host, read_exact
from sparsefs.checksum.digest import (
    DEFAULT_IN_FLIGHT,
    STREAM_CHUNK_SIZE,
    ZERO_CHUNK,
    DigestResult,
    ProgressCallback,
)
from sparsefs.extents import SparseSource

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


def _stream_read(
    source: SparseSource, offset: int, length: int, buf: bytearray
) -> tuple[bytes | memoryview, bytearray]:
    """Read a data piece: into ``buf`` where the source names its host ranges, else as
    fresh bytes; return it and buf."""
    if length <= len(buf):
        view = memoryview(buf)[:length]
        if fill_from_host(source, view, offset):
            return view, buf
    return read_exact(source, offset, length), buf


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
    zero_view = memoryview(ZERO_CHUNK)
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
