"""How a qcow2 image and its chain are opened: :class:`OpenOptions` and its default bounds."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024
DEFAULT_COMPRESSED_CACHE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class OpenOptions:
    """How to open an image and its chain.

    Attributes:
        backing: follow the backing chain; False presents the top layer alone
            (unallocated ranges read as zeros and are holes).
        backing_dir: when set, every backing file must resolve inside it.
        force: open images marked corrupt.
        force_share: take no qemu image locks (``qemu-img -U``): read images
            that a running VM may be writing.
        l2_cache_bytes: bound of the decoded L2 tables kept in memory, in
            bytes (their estimated size, see ``_TableRuns.cost``), for the
            image and its backing chain together (each file gets an equal
            share, at least two tables).
        compressed_cache_bytes: bound of the decompressed clusters kept, in
            bytes, shared by the chain likewise.
    """

    backing: bool = True
    backing_dir: str | None = None
    force: bool = False
    force_share: bool = False
    l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES
    compressed_cache_bytes: int = DEFAULT_COMPRESSED_CACHE_BYTES
