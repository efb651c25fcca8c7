"""The sparsefs1 digest, its constants and its parts: block runs, zero-block digests, the fold.

See the package docstring for the definition.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

DIGEST_NAME = "sparsefs1"
DIGEST_PREFIX = f"{DIGEST_NAME}:"
BLOCK_SIZE = 1024 * 1024
HEADER_MAGIC = b"sparsefs1\0"

# Stream mode: data is read in chunks of this size; holes are fed from one
# zero buffer of this size (calloc'd, so it maps the kernel's zero page).
STREAM_CHUNK_SIZE = 4 * 1024 * 1024
ZERO_CHUNK = bytes(STREAM_CHUNK_SIZE)

# Sources other than raw files are read in pieces of at most this size.
READ_PIECE_SIZE = 1024 * 1024

# Worker threads and the batches each stream may have in flight: cold images are
# read with O_DIRECT (RawFile.pread_into_uncached), so the threads blocked in
# reads are what keeps the disk's queue full.
DEFAULT_WORKERS = 8
DEFAULT_IN_FLIGHT = 16

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
        fines: with a fine size asked for (:func:`~sparsefs.checksum.block_digest`),
            (sub-block index, XXH3-128 digest) of each sub-block of a data
            block that is not all zeros; sub-block k covers guest bytes
            [k*F, min((k+1)*F, size)).
    """

    index: int
    count: int
    digest: bytes
    bytes_read: int = 0
    fines: tuple[tuple[int, bytes], ...] = ()


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


class Folder:
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
