"""The qcow2 cluster map: L2 tables decoded into runs of one kind, and their caches.

An L2 table becomes a :class:`~sparsefs.formats.qcow2.runs.TableRuns` (the
decoding is :mod:`sparsefs.formats.qcow2.l2decode`), a sorted list of runs
relative to the table's first guest byte (stored data, compressed cluster,
zeros, unallocated, unwritten, broken).  :class:`ClusterMap` is the part of
:class:`~sparsefs.formats.qcow2.file.Qcow2File` that reads, checks, decodes and
caches the tables; nothing else interprets an L2 entry.
"""

from __future__ import annotations

import os

from sparsefs.formats.qcow2 import layout as L
from sparsefs.formats.qcow2.l2decode import L2Decoder
from sparsefs.formats.qcow2.messages import past_end_text, size_text
from sparsefs.formats.qcow2.runs import (
    LRU,
    RUN_DATA,
    RUN_ERROR,
    RUN_UNALLOCATED,
    RUN_UNWRITTEN,
    TableRuns,
)
from sparsefs.hostmap import WRITTEN
from sparsefs.raw import RawFile


class ClusterMap(L2Decoder):
    """Reading, checking, decoding and caching L2 tables (a part of ``Qcow2File``).

    The attributes below are set by ``Qcow2File`` while it opens the image.
    """

    path: str
    file: RawFile
    data: RawFile
    header: L.Header
    cluster_bits: int
    cluster_size: int
    subcluster_bits: int
    table_shift: int
    extended_l2: bool
    external_data: bool
    _zero_table: bytes
    _l2_cache: LRU

    def cached_table_runs(self, l1_entry: int) -> TableRuns | None:
        """The decoded runs of an L2 table when they are in the cache, else None; no I/O."""
        runs: TableRuns | None = self._l2_cache.get(l1_entry & L.L1E_OFFSET_MASK)
        return runs

    def table_runs(self, l1_entry: int) -> TableRuns:
        """The decoded runs of the L2 table an L1 entry points to (cached)."""
        l2_offset = l1_entry & L.L1E_OFFSET_MASK
        runs = self._l2_cache.get(l2_offset)
        if runs is not None:
            return runs  # type: ignore[no-any-return]  # the LRU stores Any; only tables go in
        table_span = 1 << self.table_shift
        cs = self.cluster_size
        problem = None
        if l2_offset % cs:
            problem = f"L2 table offset {l2_offset:#x} is not cluster aligned"
        elif l2_offset < cs:
            problem = f"L2 table offset {l2_offset:#x} overlaps the header"
        elif l2_offset + cs > self.file.file_size:
            problem = f"L2 table {past_end_text(l2_offset, cs, self.file.file_size)}"
        if problem is None:
            # Not RawFile.pread: a short read (the file shrank since open) must
            # not turn into a zero table, which would serve holes for data.
            try:
                buf = os.pread(self.file.fd, cs, l2_offset)
            except OSError as exc:
                problem = f"read of the L2 table at {l2_offset:#x} failed: {exc.strerror}"
            else:
                if len(buf) != cs:
                    problem = (
                        f"L2 table at {l2_offset:#x} ({size_text(cs)}) runs past the end "
                        "of the file (was the image truncated?)"
                    )
        runs = TableRuns()
        if problem is not None:
            runs.add(0, table_span, RUN_ERROR, f"{self.path}: {problem}")
            return runs  # not cached: a transient error may clear
        if buf == self._zero_table:
            runs.add(0, table_span, RUN_UNALLOCATED, None)
        elif self.extended_l2:
            self._decode_extended_l2(buf, runs)
        else:
            self._decode_l2(buf, runs)
        if RUN_DATA in runs.kinds:
            runs = self._split_unwritten(runs)
        self._l2_cache.put(l2_offset, runs, runs.cost())
        return runs

    def _split_unwritten(self, runs: TableRuns) -> TableRuns:
        """Split the RUN_DATA runs of a table by the data file's written map.

        Host bytes that the data file stores as nothing (a hole or an
        unwritten extent, see :mod:`sparsefs.hostmap`) become RUN_UNWRITTEN.
        Costs one bisect per data run when the file is written throughout.
        """
        host_map = self.data.written_map()
        fully_written = host_map.fully_written
        if all(
            kind != RUN_DATA or fully_written(host, end - start)
            for start, end, kind, host in zip(
                runs.starts, runs.ends, runs.kinds, runs.hosts, strict=True
            )
        ):
            return runs
        out = TableRuns()
        for start, end, kind, host in zip(
            runs.starts, runs.ends, runs.kinds, runs.hosts, strict=True
        ):
            if kind != RUN_DATA or fully_written(host, end - start):
                out.add(start, end, kind, host)
                continue
            for rel_start, rel_end, state in host_map.classify(host, end - start):
                out.add(
                    start + rel_start,
                    start + rel_end,
                    RUN_DATA if state == WRITTEN else RUN_UNWRITTEN,
                    host + rel_start,
                )
        return out
