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

Imports flow one way: this package knows sources only through
:class:`~sparsefs.extents.SparseSource`; never FUSE, never qcow2.
"""

from sparsefs.checksum.blocks import block_digest, data_blocks, iter_block_digests
from sparsefs.checksum.compare import Difference, compare
from sparsefs.checksum.digest import (
    BLOCK_SIZE,
    DIGEST_NAME,
    DIGEST_PREFIX,
    HEADER_MAGIC,
    BlockRun,
    DataSink,
    DigestResult,
    ProgressCallback,
    zero_block_digest,
    zero_bytes,
)
from sparsefs.checksum.stream import stream_xxh128

__all__ = [
    "BLOCK_SIZE",
    "DIGEST_NAME",
    "DIGEST_PREFIX",
    "HEADER_MAGIC",
    "BlockRun",
    "DataSink",
    "Difference",
    "DigestResult",
    "ProgressCallback",
    "block_digest",
    "compare",
    "data_blocks",
    "iter_block_digests",
    "stream_xxh128",
    "zero_block_digest",
    "zero_bytes",
]
