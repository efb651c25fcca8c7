"""Block digests: the fold is sparsefs1, a splice equals a fresh scan, files round-trip."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from sparsefs.checksum import block_digest
from sparsefs.points.blocks import FINE_SIZE, BlockDigests
from sparsefs.points.engine import all_digests
from sparsefs.points.scan import scan
from sparsefs.raw import RawFile
from support import MiB


def _write(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)


@pytest.mark.parametrize("size", [5 * MiB, 5 * MiB + 4096, 3 * MiB + 70 * 1024 + 512])
def test_fold_is_sparsefs1_and_a_splice_equals_a_scan(tmp_path: Path, size: int) -> None:
    rng = random.Random(size)
    path = tmp_path / "disk.raw"
    pieces = [(rng.randrange(0, size - 8192), rng.randbytes(8192)) for _ in range(12)]
    pieces.append((size - 100, b"\x01" * 100))  # the short last blocks hold data
    _write(path, size, pieces)
    with RawFile(path) as raw:
        before = all_digests(raw)
        assert before.fold() == block_digest(raw).digest
    # Change, zero and add 64 KiB blocks in three MiB blocks; splice those blocks in.
    with open(path, "r+b") as f:
        f.seek(MiB + 3 * FINE_SIZE)
        f.write(b"\x07" * FINE_SIZE)
        f.seek(pieces[0][0])
        f.write(bytes(8192))
        f.seek(size - 100)
        f.write(b"\x02" * 100)
    changed = sorted({1, pieces[0][0] // MiB, (size - 1) // MiB})
    with RawFile(path) as raw:
        after = all_digests(raw)
        updates = BlockDigests(size)
        for block in scan(raw, blocks=changed):
            updates.add_block(block.index, block.digest, block.fines)
        spliced = before.spliced(size, updates, changed)
        assert spliced.fold() == after.fold() == block_digest(raw).digest
    assert spliced.block_index == after.block_index
    assert spliced.block_digests == after.block_digests
    assert spliced.fine_index == after.fine_index
    assert spliced.fine_digests == after.fine_digests
    blocks = tmp_path / "disk.blocks"
    spliced.save(str(blocks), after.fold())
    loaded = BlockDigests.load(str(blocks), after.fold(), size)
    assert loaded.fine_index == after.fine_index
    assert os.path.getsize(blocks) < 24 * (len(after.fine_index) + len(after.block_index)) + 300


def test_only_non_zero_blocks_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    _write(path, 64 * MiB, [(40 * MiB + 5, b"x")])
    with RawFile(path) as raw:
        digests = all_digests(raw)
        assert digests.fold() == block_digest(raw).digest
    assert list(digests.block_index) == [40]
    assert list(digests.fine_index) == [40 * 16]
    assert digests.blocks_with_data() == [40]
