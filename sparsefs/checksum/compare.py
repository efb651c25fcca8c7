"""Compare two sources block by block: the first differing block and byte."""

from __future__ import annotations

from dataclasses import dataclass

from sparsefs.bulkread import read_exact
from sparsefs.checksum.blocks import iter_block_digests, new_executor
from sparsefs.checksum.digest import (
    BLOCK_SIZE,
    DEFAULT_WORKERS,
    BlockRun,
    DigestResult,
    Folder,
    ProgressCallback,
)
from sparsefs.errors import ImageReadError
from sparsefs.extents import SparseSource


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


def _first_differing_byte(a: SparseSource, b: SparseSource, start: int, length: int) -> int:
    """Guest offset of the first byte in [start, start+length) where a and b differ."""
    x = read_exact(a, start, length)
    y = read_exact(b, start, length)
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
    folder = Folder(size, block_size)
    bytes_read = 0
    with new_executor(workers) as executor:
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
