"""One qcow2 layer (the active state or an internal snapshot) as a :class:`~sparsefs.layered.Layer`.

Its runs come from the L1 table and the decoded L2 tables
(:mod:`sparsefs.formats.qcow2.clustermap`), in the spec-neutral kinds of
:mod:`sparsefs.layered`: stored data as ``(RawFile, host_offset)``,
compressed clusters as OTHER (the layer decompresses them), zero clusters,
unallocated ranges (BELOW: the backing file), broken ranges, and mapped host
ranges the data file stores as nothing (UNWRITTEN).  The qcow2 run kinds
have the same numbers as the layered kinds.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from sparsefs.formats.qcow2 import layout as L
from sparsefs.formats.qcow2.file import Qcow2File
from sparsefs.formats.qcow2.runs import (
    RUN_DATA,
    RUN_UNALLOCATED,
    RUN_UNWRITTEN,
    TableRuns,
)


class _NotCached(LookupError):
    """An L2 table needed for a range is not in the cache (``cached_runs``)."""


class Qcow2Layer:
    """The cluster map of one L1 table of a qcow2 file, as runs.

    Args:
        qfile: the open file (shared by the active image and its snapshots).
        l1: the L1 table's entries (those the virtual size needs).
        size: the virtual size in bytes.
        owns_file: :meth:`close` closes ``qfile`` (the active image does,
            snapshot views do not).
    """

    format_name = "qcow2"

    def __init__(self, qfile: Qcow2File, l1: list[int], size: int, owns_file: bool) -> None:
        self.qfile = qfile
        self.path = qfile.path
        self.size = size
        self._l1 = l1
        self._owns_file = owns_file
        self._table_shift = qfile.table_shift
        self._table_span = 1 << qfile.table_shift
        self._l1_allocated = [i for i, e in enumerate(l1) if e & L.L1E_OFFSET_MASK]

    def runs(self, guest_start: int, guest_end: int) -> Iterator[tuple[int, int, int, Any]]:
        """The walk of the cluster map over ``[guest_start, guest_end)`` (reads L2 tables).

        Yields ``(start, end, kind, host)`` in order covering the range; a run
        never crosses an L2 table boundary, and a compressed run never crosses
        a cluster boundary.
        """
        return self._walk(guest_start, guest_end, self.qfile.table_runs)

    def cached_runs(self, guest_start: int, guest_end: int) -> Iterator[tuple[int, int, int, Any]]:
        """:meth:`runs` from memory only.

        Raises:
            LookupError: (while iterating) an L2 table the range needs is not
                in the cache; reading it would block.
        """
        return self._walk(guest_start, guest_end, self._cached_table)

    def _cached_table(self, l1_entry: int) -> TableRuns:
        runs = self.qfile.cached_table_runs(l1_entry)
        if runs is None:
            raise _NotCached(l1_entry)
        return runs

    def _walk(
        self, guest_offset: int, guest_end: int, tables: Callable[[int], TableRuns]
    ) -> Iterator[tuple[int, int, int, Any]]:
        """The one walk of the cluster map, with ``tables`` decoding an L1 entry's table."""
        guest_end = min(guest_end, self.size)
        pos = guest_offset
        shift = self._table_shift
        span = self._table_span
        l1 = self._l1
        data = self.qfile.data
        zero_in_map = not self.qfile.external_data
        while pos < guest_end:
            l1_index = pos >> shift
            table_base = l1_index << shift
            entry = l1[l1_index]
            if not entry & L.L1E_OFFSET_MASK:
                # Jump over all unallocated L1 entries at once.
                nxt = bisect.bisect_right(self._l1_allocated, l1_index)
                stop = (
                    self._l1_allocated[nxt] << shift if nxt < len(self._l1_allocated) else guest_end
                )
                stop = min(stop, guest_end)
                yield (pos, stop, RUN_UNALLOCATED, None)
                pos = stop
                continue
            runs = tables(entry)
            stop = min(table_base + span, guest_end)
            rel = pos - table_base
            i = bisect.bisect_right(runs.starts, rel) - 1
            starts, ends, kinds, hosts = runs.starts, runs.ends, runs.kinds, runs.hosts
            n = len(starts)
            while i < n:
                run_start = table_base + starts[i]
                if run_start >= stop:
                    break
                s = max(pos, run_start)
                e = min(table_base + ends[i], stop)
                kind = kinds[i]
                host = hosts[i]
                if kind == RUN_DATA:
                    host = (data, host + (s - run_start))
                elif kind == RUN_UNWRITTEN:
                    host = (data, host + (s - run_start), zero_in_map)
                yield (s, e, kind, host)
                i += 1
            pos = stop

    def read_other(self, start: int, end: int, host: Any) -> bytes:
        """Guest bytes ``[start, end)`` of the compressed cluster ``host`` describes.

        Raises:
            ImageReadError: the cluster is outside the file or corrupt.
        """
        cluster = self.qfile.decompress(host)
        base = start & ~(self.qfile.cluster_size - 1)
        return cluster[start - base : end - base]

    def read_other_nowait(self, start: int, end: int, host: Any) -> bytes | None:
        """:meth:`read_other` when the decompressed cluster is cached, else None; no I/O."""
        cluster: bytes | None = self.qfile._compressed_cache.get(host)
        if cluster is None:
            return None
        base = start & ~(self.qfile.cluster_size - 1)
        return cluster[start - base : end - base]

    def close(self) -> None:
        """Close the image file and its chain when this layer owns them; idempotent."""
        if self._owns_file:
            self.qfile.close()

    def describe(self) -> dict[str, Any]:
        """A few facts of the file (``sparsefs info`` describes qcow2 itself)."""
        return {
            "cluster_size": self.qfile.cluster_size,
            "compression_type": L.COMPRESSION_NAMES.get(self.qfile.compression_type, "?"),
        }
