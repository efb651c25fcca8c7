"""Compressed qcow2 clusters: zlib (raw deflate) and zstd, decompressed and cached.

A ``zstandard.ZstdDecompressor`` must not be shared between threads
(concurrent use returns wrong bytes): each reading thread gets its own.
"""

from __future__ import annotations

import threading
import zlib
from typing import Any

from sparsefs.errors import ImageReadError
from sparsefs.formats.qcow2 import layout as L
from sparsefs.formats.qcow2.runs import LRU
from sparsefs.raw import RawFile


class CompressedClusters:
    """Decompression of compressed clusters (a part of ``Qcow2File``)."""

    path: str
    file: RawFile
    cluster_size: int
    compression_type: int
    _compressed_cache: LRU
    _zstd: Any
    _zstd_local: threading.local

    def _init_compression(self, cache_bytes: int) -> None:
        """Set up the cache of decompressed clusters and, for zstd, the decoder module."""
        self._compressed_cache = LRU(max(cache_bytes, 2 * self.cluster_size))
        # A ZstdDecompressor must not be shared between threads (concurrent
        # use returns wrong bytes): one per reading thread.
        self._zstd = None
        self._zstd_local = threading.local()
        if self.compression_type == L.COMPRESSION_ZSTD:
            import zstandard

            self._zstd = zstandard

    def decompress(self, descriptor: tuple[int, int]) -> bytes:
        """Return the cluster a compressed descriptor points to (cached).

        Raises:
            ImageReadError: the data is past the end of the file or does not
                decompress to exactly one cluster.
        """
        cached = self._compressed_cache.get(descriptor)
        if cached is not None:
            return cached  # type: ignore[no-any-return]  # the LRU stores Any; only clusters go in
        host_offset, nb_bytes = descriptor
        cs = self.cluster_size
        if host_offset < cs or host_offset >= self.file.file_size:
            raise ImageReadError(
                f"{self.path}: compressed cluster at {host_offset:#x} is outside the file"
            )
        # The last sector may run past the end of the file (qemu reads it short).
        nb_bytes = min(nb_bytes, self.file.file_size - host_offset)
        raw = self.file.pread(host_offset, nb_bytes)
        try:
            if self.compression_type == L.COMPRESSION_ZSTD:
                out = self._zstd_decompress(raw)
            else:
                dec = zlib.decompressobj(-15)
                out = dec.decompress(raw, cs)
        except Exception as exc:
            raise ImageReadError(
                f"{self.path}: compressed cluster at {host_offset:#x} is corrupt: {exc}"
            ) from None
        if len(out) != cs:
            raise ImageReadError(
                f"{self.path}: compressed cluster at {host_offset:#x} decompresses to "
                f"{len(out)} bytes, not one cluster of {cs}"
            )
        self._compressed_cache.put(descriptor, out, cs)
        return out

    def _zstd_decompress(self, raw: bytes) -> bytes:
        """Decompress one zstd frame, stopping after cluster_size + 1 bytes.

        The bound keeps a crafted frame (gigabytes of zeros in a few KiB) from
        using more than a cluster of memory; more than a cluster is an error,
        as in qemu's qcow2_zstd_decompress.
        """
        dctx = getattr(self._zstd_local, "dctx", None)
        if dctx is None:
            dctx = self._zstd_local.dctx = self._zstd.ZstdDecompressor()
        with dctx.stream_reader(raw, read_across_frames=False) as reader:
            out: bytes = reader.read(self.cluster_size + 1)
        return out
