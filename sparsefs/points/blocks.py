"""Block digests of a point: what the next run compares against, and how it finds the digest.

Two block sizes over the guest bytes of a point (guest offsets in bytes):

- **MiB blocks** (B = 1 MiB): the sparsefs1 block digests ``D_i`` (README,
  "The digest (sparsefs1)").  Folding them gives the point's sparsefs1
  digest, so a run that re-hashes only the MiB blocks it changed gets the new
  point's digest from the previous point's digests.
- **fine blocks** (F = 64 KiB): XXH3-128 (seed 0, 16 bytes canonical) of each
  64 KiB block ``[j*F, min((j+1)*F, size))``.  64 KiB is the granularity of
  change detection: a delta stores whole 64 KiB blocks.

Only blocks that are not all zeros are stored (a zero block's digest is
implied), so memory and file size follow the data, not the virtual size:
24 bytes (u64le index + digest) per stored block, in sorted arrays.

The file (``NAME/.NAME@ID.blocks``, beside its point)::

    b"SPARSEFS-BLOCKS1\\n"
    one line of JSON: {"digest", "size", "block-size", "fine-size", "blocks", "fines"}
    blocks x u64le MiB block index (increasing), then blocks x 16-byte digest
    fines  x u64le fine block index (increasing), then fines x 16-byte digest
    16 bytes: XXH3-128 of everything before (canonical)

It is bound to its point by the point's sparsefs1 digest and size: loading
checks the trailer, the counts, and that the MiB digests fold to the digest.
"""

from __future__ import annotations

import bisect
import json
import os
import sys
from array import array
from dataclasses import dataclass, field

import xxhash

from sparsefs.checksum import BLOCK_SIZE, DIGEST_PREFIX, HEADER_MAGIC, zero_block_digest
from sparsefs.errors import SparsefsError

FINE_SIZE = 64 * 1024
FINE_PER_BLOCK = BLOCK_SIZE // FINE_SIZE
MAGIC = b"SPARSEFS-BLOCKS1\n"
_RECORD = 24  # u64le index + 16-byte digest
_FOLD_RUN = 65536  # zero digests fed to the fold at once


class BlocksFileError(SparsefsError):
    """A block-digest file is missing, damaged, or belongs to another point."""


def zero_digest(size: int, index: int, block_size: int) -> bytes:
    """The digest of block ``index`` of a ``size``-byte stream if it held only zeros."""
    return zero_block_digest(min(block_size, size - index * block_size))


@dataclass
class BlockDigests:
    """Digests of the non-zero blocks of one guest byte stream of ``size`` bytes.

    Attributes:
        size: the stream's length in bytes.
        block_index: MiB block indexes with a stored digest, increasing.
        block_digests: their digests, 16 bytes each, concatenated.
        fine_index: 64 KiB block indexes with a stored digest, increasing.
        fine_digests: their digests, 16 bytes each.
    """

    size: int
    block_index: array[int] = field(default_factory=lambda: array("Q"))
    block_digests: bytearray = field(default_factory=bytearray)
    fine_index: array[int] = field(default_factory=lambda: array("Q"))
    fine_digests: bytearray = field(default_factory=bytearray)

    @property
    def nb_blocks(self) -> int:
        """MiB blocks of the stream (the last may be short)."""
        return -(-self.size // BLOCK_SIZE)

    def add_block(self, index: int, digest: bytes, fines: list[tuple[int, bytes]]) -> None:
        """Append MiB block ``index`` (after every block added so far) and its fine digests.

        A digest equal to the zero block's is not stored; ``fines`` holds only
        the non-zero 64 KiB blocks of this MiB block.
        """
        if digest != zero_digest(self.size, index, BLOCK_SIZE):
            self.block_index.append(index)
            self.block_digests += digest
        for fine, fine_digest in fines:
            self.fine_index.append(fine)
            self.fine_digests += fine_digest

    def fines_of_block(self, index: int) -> dict[int, bytes]:
        """The stored fine digests inside MiB block ``index``: fine index -> digest."""
        lo = bisect.bisect_left(self.fine_index, index * FINE_PER_BLOCK)
        hi = bisect.bisect_left(self.fine_index, (index + 1) * FINE_PER_BLOCK, lo)
        d = self.fine_digests
        return {self.fine_index[i]: bytes(d[16 * i : 16 * i + 16]) for i in range(lo, hi)}

    def block_digest(self, index: int) -> bytes:
        """The digest of MiB block ``index`` (the zero block's when none is stored)."""
        i = bisect.bisect_left(self.block_index, index)
        if i < len(self.block_index) and self.block_index[i] == index:
            return bytes(self.block_digests[16 * i : 16 * i + 16])
        return zero_digest(self.size, index, BLOCK_SIZE)

    def blocks_with_data(self) -> list[int]:
        """MiB blocks holding a non-zero 64 KiB block, increasing."""
        out: list[int] = []
        for fine in self.fine_index:
            block = fine // FINE_PER_BLOCK
            if not out or out[-1] != block:
                out.append(block)
        return out

    def fold(self) -> str:
        """The sparsefs1 digest of the stream."""
        size = self.size
        h = xxhash.xxh3_128(
            HEADER_MAGIC + size.to_bytes(8, "little") + BLOCK_SIZE.to_bytes(8, "little")
        )
        full = size // BLOCK_SIZE
        zero_full = zero_block_digest(BLOCK_SIZE)
        pos = 0
        for i, index in enumerate([*self.block_index, self.nb_blocks]):
            gap_end = min(index, full)
            while pos < gap_end:
                n = min(gap_end - pos, _FOLD_RUN)
                h.update(zero_full * n)
                pos += n
            if pos < index:  # the short last block, zero
                h.update(zero_digest(size, pos, BLOCK_SIZE))
                pos += 1
            if index < self.nb_blocks:
                h.update(bytes(self.block_digests[16 * i : 16 * i + 16]))
                pos = index + 1
        return DIGEST_PREFIX + h.hexdigest()

    def spliced(self, size: int, updates: BlockDigests, blocks: list[int]) -> BlockDigests:
        """A copy of these digests for a stream of ``size`` bytes, MiB blocks ``blocks`` replaced.

        ``updates`` holds the new digests of exactly ``blocks`` (increasing);
        every other block keeps its digests here.  Blocks at or past this
        stream's last (short) block must be in ``blocks`` or read as zeros.
        """
        out = BlockDigests(size)
        out.block_index, out.block_digests = _splice(
            (self.block_index, self.block_digests),
            (updates.block_index, updates.block_digests),
            blocks,
            1,
            -(-size // BLOCK_SIZE),
        )
        out.fine_index, out.fine_digests = _splice(
            (self.fine_index, self.fine_digests),
            (updates.fine_index, updates.fine_digests),
            blocks,
            FINE_PER_BLOCK,
            -(-size // FINE_SIZE),
        )
        return out

    def save(self, path: str, digest: str) -> None:
        """Write the file atomically (temp file, fsync, rename); the caller fsyncs the dir.

        Raises:
            BlocksFileError: ``digest`` is not what these digests fold to.
            OSError: writing failed.
        """
        if self.fold() != digest:
            raise BlocksFileError(f"{path}: block digests do not fold to {digest}")
        head = {
            "digest": digest,
            "size": self.size,
            "block-size": BLOCK_SIZE,
            "fine-size": FINE_SIZE,
            "blocks": len(self.block_index),
            "fines": len(self.fine_index),
        }
        body = bytearray(MAGIC + json.dumps(head, sort_keys=True).encode() + b"\n")
        body += _pack(self.block_index, self.block_digests)
        body += _pack(self.fine_index, self.fine_digests)
        body += xxhash.xxh3_128_digest(body)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str, digest: str, size: int) -> BlockDigests:
        """Read the file of the point with sparsefs1 ``digest`` and ``size``.

        Raises:
            BlocksFileError: missing, damaged, or another point's (one line, naming it).
        """
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise BlocksFileError(f"{path}: block digests cannot be read: {exc.strerror}") from None
        head = _check_head(path, raw, digest, size)
        out = cls(size)
        start = raw.index(b"\n", len(MAGIC)) + 1
        nb, nf = head["blocks"], head["fines"]
        out.block_index, out.block_digests = _unpack(raw[start : start + nb * _RECORD])
        start += nb * _RECORD
        out.fine_index, out.fine_digests = _unpack(raw[start : start + nf * _RECORD])
        if out.fold() != digest:
            raise BlocksFileError(f"{path}: block digests do not fold to the point's digest")
        return out


def check_head(path: str, digest: str, size: int) -> None:
    """Check the file's header and trailer only (what ``list`` needs); raise as :meth:`load`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise BlocksFileError(f"{path}: block digests cannot be read: {exc.strerror}") from None
    _check_head(path, raw, digest, size)


def _check_head(path: str, raw: bytes, digest: str, size: int) -> dict[str, int]:
    def bad(problem: str) -> BlocksFileError:
        return BlocksFileError(f"{path}: block digests {problem}")

    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 16:
        raise bad("file is not a sparsefs block-digest file")
    if xxhash.xxh3_128_digest(raw[:-16]) != raw[-16:]:
        raise bad("file is damaged (its checksum does not match)")
    end = raw.find(b"\n", len(MAGIC))
    try:
        head = json.loads(raw[len(MAGIC) : end])
    except ValueError:
        raise bad("file has a damaged header") from None
    if not isinstance(head, dict):
        raise bad("file has a damaged header")
    if head.get("digest") != digest or head.get("size") != size:
        raise bad("belong to another point (digest or size differs)")
    nb, nf = head.get("blocks"), head.get("fines")
    if head.get("block-size") != BLOCK_SIZE or head.get("fine-size") != FINE_SIZE:
        raise bad("use other block sizes")
    if not isinstance(nb, int) or not isinstance(nf, int) or nb < 0 or nf < 0:
        raise bad("file has a damaged header")
    if end + 1 + (nb + nf) * _RECORD + 16 != len(raw):
        raise bad("file has the wrong length")
    return head


Records = tuple["array[int]", bytearray]


def _splice(prev: Records, new: Records, blocks: list[int], per: int, limit: int) -> Records:
    """``prev``'s records with those of MiB blocks ``blocks`` (increasing) taken from ``new``.

    Keys are MiB block indexes (``per`` 1) or 64 KiB block indexes (``per``
    16); every key of ``new`` lies in one of ``blocks``.  Keys from ``limit``
    on are dropped.  Slices are copied whole: O(len(blocks) log n).
    """
    (p_idx, p_dig), (n_idx, n_dig) = prev, new
    out_idx: array[int] = array("Q")
    out_dig = bytearray()
    pos = npos = 0
    for block in blocks:
        lo, hi = block * per, (block + 1) * per
        i = bisect.bisect_left(p_idx, lo, pos)
        j = bisect.bisect_left(p_idx, hi, i)
        k = bisect.bisect_left(n_idx, lo, npos)
        m = bisect.bisect_left(n_idx, hi, k)
        out_idx.extend(p_idx[pos:i])
        out_dig += p_dig[16 * pos : 16 * i]
        out_idx.extend(n_idx[k:m])
        out_dig += n_dig[16 * k : 16 * m]
        pos, npos = j, m
    out_idx.extend(p_idx[pos:])
    out_dig += p_dig[16 * pos :]
    cut = bisect.bisect_left(out_idx, limit)
    del out_idx[cut:]
    del out_dig[16 * cut :]
    return out_idx, out_dig


def _pack(index: array[int], digests: bytearray) -> bytes:
    ordered = array("Q", index)
    if sys.byteorder != "little":
        ordered.byteswap()
    return ordered.tobytes() + bytes(digests)


def _unpack(raw: bytes) -> tuple[array[int], bytearray]:
    count = len(raw) // _RECORD
    index: array[int] = array("Q")
    index.frombytes(raw[: 8 * count])
    if sys.byteorder != "little":
        index.byteswap()
    if index.tolist() != sorted(set(index)):  # increasing, no repeats
        raise BlocksFileError("block digests are not in increasing order")
    return index, bytearray(raw[8 * count :])
