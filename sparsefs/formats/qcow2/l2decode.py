"""Pure L2 decoding (qemu: qcow2_get_host_offset, qcow2_get_subcluster_type).

An L2 table (standard 8-byte entries, or extended entries with subcluster
bitmaps) becomes a :class:`~sparsefs.formats.qcow2.runs.TableRuns`, runs
relative to the table's first guest byte.  :class:`L2Decoder` is the part of
:class:`~sparsefs.formats.qcow2.file.Qcow2File` that does it; nothing else
interprets an L2 entry.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator, Sequence
from itertools import compress, islice, repeat
from operator import add, ne
from typing import Any

from sparsefs.formats.qcow2 import layout as L
from sparsefs.formats.qcow2.runs import (
    RUN_COMPRESSED,
    RUN_DATA,
    RUN_ERROR,
    RUN_UNALLOCATED,
    RUN_ZERO,
    TableRuns,
)
from sparsefs.raw import RawFile

# L2 entries decoded as a block (512 bytes of a standard table): see _decode_l2.
_L2_BLOCK_ENTRIES = 64


class L2Decoder:
    """Decoding of L2 tables; the attributes are set by ``Qcow2File`` while it opens."""

    path: str
    file: RawFile
    header: L.Header
    cluster_bits: int
    cluster_size: int
    subcluster_bits: int
    external_data: bool

    def _data_problem(self, host_offset: int, length: int) -> str | None:
        """Why a data cluster at ``host_offset`` cannot be read, or None."""
        if host_offset % self.cluster_size:
            return f"data cluster offset {host_offset:#x} is not cluster aligned"
        if not self.external_data:
            if host_offset < self.cluster_size:
                return f"data cluster offset {host_offset:#x} overlaps the header"
            if host_offset >= self.file.file_size:
                return f"data cluster at {host_offset:#x} is past the end of the file"
        return None

    def _decode_l2(self, buf: bytes, runs: TableRuns) -> None:
        """Decode a standard L2 table (8-byte entries) into ``runs``.

        The Python work grows with the allocated clusters, not with the
        table: all-zero blocks of ``_L2_BLOCK_ENTRIES`` entries are skipped at
        memcmp speed and the zero entries of the other blocks by
        ``itertools.compress``; what is left are stretches of non-zero
        entries, which :meth:`_decode_l2_stretch` decodes.
        """
        cb = self.cluster_bits
        nb_entries = len(buf) // 8
        if self._decode_l2_contiguous(buf, runs):
            return
        indices: list[int] = []  # of the non-zero entries, ascending
        values: list[int] = []  # their entries
        for first in _nonzero_blocks(buf, 8):
            entries = _unpack_block(buf, first * 8)
            indices.extend(compress(range(first, first + _L2_BLOCK_ENTRIES), entries))
            values.extend(compress(entries, entries))
        # Stretches of consecutive indices: break where indices[i] != indices[i - 1] + 1.
        n = len(indices)
        breaks = list(
            compress(range(1, n), map(ne, islice(indices, 1, None), map(add, indices, repeat(1))))
        )
        if n:
            breaks.append(n)
        done = 0  # entries [0, done) of the table are in runs
        lo = 0
        for hi in breaks:
            start = indices[lo]
            if start > done:
                runs.add(done << cb, start << cb, RUN_UNALLOCATED, None)
            self._decode_l2_stretch(start, values[lo:hi], runs)
            done = start + hi - lo
            lo = hi
        if done < nb_entries:
            runs.add(done << cb, nb_entries << cb, RUN_UNALLOCATED, None)

    def _decode_l2_contiguous(self, buf: bytes, runs: TableRuns) -> bool:
        """Decode a table whose every entry maps the next cluster (a preallocated image).

        True (and one run added) when all entries step by exactly one cluster
        from the first, with equal flags, and the first and last decode to
        data (or to preallocated zeros): checked at C speed, an array compare
        against the expected entries.  False (nothing added) otherwise.
        """
        cs = self.cluster_size
        nb_entries = len(buf) // 8
        first = int.from_bytes(buf[:8], "big")
        last = int.from_bytes(buf[-8:], "big")
        if (
            nb_entries < 2
            or not first & L.L2E_OFFSET_MASK
            or last - first != (nb_entries - 1) * cs
            or (first ^ last) & ~L.L2E_OFFSET_MASK
        ):
            return False
        # The table as one big-endian integer must equal first*R + cs*S, with R
        # and S the digit patterns (1, 1, ..., 1) and (0, 1, ..., n-1) in base
        # 2**64: every entry is first + i*cs < 2**64, so no digit carries.
        repunit, ramp = _contiguous_patterns(nb_entries)
        if int.from_bytes(buf, "big") != first * repunit + cs * ramp:
            return False
        kind, host = self._probe_l2_segment(0, first, last, nb_entries, cs)
        if kind not in (RUN_DATA, RUN_ZERO):
            return False
        runs.add(0, nb_entries << self.cluster_bits, kind, host)
        return True

    def _decode_l2_stretch(self, first_index: int, entries: list[int], runs: TableRuns) -> None:
        """Decode consecutive non-zero L2 entries, starting at ``first_index``.

        Entries that step by exactly one cluster (contiguous data, or
        preallocated zeros) form segments, found at C speed; a segment whose
        first and last entries decode to data with the matching host offsets,
        or both to zeros, is one run without looking at the entries between:
        their flags equal the first's (the bits outside the offset mask only
        change by a carry, and the first and last agree on them) and their
        validity is monotonic in the host offset (alignment, above the header,
        below the end of the file).  Everything else goes entry by entry
        through :meth:`_decode_l2_entries`, the one place that interprets an
        entry.  Equal entries (zero clusters) are handled likewise.
        """
        cs = self.cluster_size
        cb = self.cluster_bits
        decode_entries = self._decode_l2_entries
        n = len(entries)
        if n >= 2 and entries[-1] == entries[0] and entries.count(entries[0]) == n:
            kind, host = self._probe_l2_segment(first_index, entries[0], entries[0], n, 0)
            if kind in (RUN_ZERO, RUN_UNALLOCATED):
                runs.add(first_index << cb, (first_index + n) << cb, kind, host)
                return
        if n < 3:
            decode_entries(first_index, entries, runs)
            return
        # Segment boundaries: i where entries[i] != entries[i - 1] + cluster_size.
        breaks = list(
            compress(range(1, n), map(ne, islice(entries, 1, None), map(add, entries, repeat(cs))))
        )
        breaks.append(n)
        pending = 0  # entries[pending:seg_start] still to decode one by one
        seg_start = 0
        for seg_end in breaks:
            length = seg_end - seg_start
            if length >= 2:
                e0 = entries[seg_start]
                e_last = entries[seg_end - 1]
                if not (e0 ^ e_last) & ~L.L2E_OFFSET_MASK:
                    kind, host = self._probe_l2_segment(
                        first_index + seg_start, e0, e_last, length, cs
                    )
                    if kind in (RUN_DATA, RUN_ZERO):
                        if pending < seg_start:
                            decode_entries(first_index + pending, entries[pending:seg_start], runs)
                        runs.add(
                            (first_index + seg_start) << cb,
                            (first_index + seg_end) << cb,
                            kind,
                            host,
                        )
                        pending = seg_end
            seg_start = seg_end
        if pending < n:
            decode_entries(first_index + pending, entries[pending:], runs)

    def _probe_l2_segment(
        self, first_index: int, e0: int, e_last: int, length: int, step: int
    ) -> tuple[int, Any]:
        """The kind and host of a uniform segment of L2 entries, or (-1, None).

        Decodes its first and last entries; they must give the same kind, and
        for data, host offsets ``(length - 1) * step`` apart.
        """
        probe = TableRuns()
        self._decode_l2_entries(first_index, (e0,), probe)
        self._decode_l2_entries(first_index + length - 1, (e_last,), probe)
        if len(probe.kinds) != 2 or probe.kinds[0] != probe.kinds[1]:
            return -1, None
        kind = probe.kinds[0]
        if kind == RUN_DATA:
            if not step or probe.hosts[1] != probe.hosts[0] + (length - 1) * step:
                return -1, None
        elif kind not in (RUN_ZERO, RUN_UNALLOCATED):
            return -1, None
        return kind, probe.hosts[0]

    def _decode_l2_entries(self, first_index: int, entries: Sequence[int], runs: TableRuns) -> None:
        """Decode standard L2 entries one by one into ``runs``.

        ``entries[0]`` is entry ``first_index`` of its table; guest offsets
        in ``runs`` are relative to the table's first byte.
        """
        cb = self.cluster_bits
        cs = self.cluster_size
        v3 = self.header.version >= 3
        external = self.external_data
        for index, entry in enumerate(entries, first_index):
            start = index << cb
            if entry & L.QCOW_OFLAG_COMPRESSED:
                self._add_compressed(runs, start, entry)
                continue
            if entry & L.QCOW_OFLAG_ZERO:
                if v3:
                    runs.add(start, start + cs, RUN_ZERO, None)
                else:  # qemu: "Zero cluster entry found in pre-v3 image", EIO
                    runs.add(
                        start,
                        start + cs,
                        RUN_ERROR,
                        f"{self.path}: zero cluster entry in a version 2 image",
                    )
                continue
            host = entry & L.L2E_OFFSET_MASK
            if host == 0 and not (external and entry & L.QCOW_OFLAG_COPIED):
                runs.add(start, start + cs, RUN_UNALLOCATED, None)
                continue
            problem = self._data_problem(host, cs)
            if problem is not None:
                runs.add(start, start + cs, RUN_ERROR, f"{self.path}: {problem}")
            else:
                runs.add(start, start + cs, RUN_DATA, host)

    def _add_compressed(self, runs: TableRuns, start: int, entry: int) -> None:
        """Add the run of a compressed-cluster entry (standard or extended L2)."""
        cs = self.cluster_size
        if self.external_data:
            runs.add(
                start,
                start + cs,
                RUN_ERROR,
                f"{self.path}: compressed cluster in an image with an external data file",
            )
        else:
            runs.add(
                start, start + cs, RUN_COMPRESSED, L.compressed_descriptor(self.cluster_bits, entry)
            )

    def _decode_extended_l2(self, buf: bytes, runs: TableRuns) -> None:
        cb = self.cluster_bits
        cs = self.cluster_size
        scb = self.subcluster_bits
        external = self.external_data
        for index, entry, bitmap in _extended_entries(buf, runs, cb):
            start = index << cb
            if entry & L.QCOW_OFLAG_COMPRESSED:
                self._add_compressed(runs, start, entry)
                continue
            alloc = bitmap & L.SUBCLUSTER_ALLOC_MASK
            zero = bitmap >> 32
            host = entry & L.L2E_OFFSET_MASK
            allocated = host != 0 or bool(external and entry & L.QCOW_OFLAG_COPIED)
            problem = None
            if alloc & zero:
                problem = "subcluster marked both allocated and zero"
            elif alloc and not allocated:
                problem = "allocated subcluster in a cluster with no host offset"
            elif alloc:
                problem = self._data_problem(host, cs)
            if problem is not None:
                runs.add(start, start + cs, RUN_ERROR, f"{self.path}: {problem}")
                continue
            if alloc == 0xFFFFFFFF:
                runs.add(start, start + cs, RUN_DATA, host)
                continue
            if zero == 0xFFFFFFFF:
                runs.add(start, start + cs, RUN_ZERO, None)
                continue
            if alloc == 0 and zero == 0:
                runs.add(start, start + cs, RUN_UNALLOCATED, None)
                continue
            for sc in range(L.SUBCLUSTERS_PER_CLUSTER):
                sc_start = start + (sc << scb)
                sc_end = sc_start + (1 << scb)
                if alloc >> sc & 1:
                    runs.add(sc_start, sc_end, RUN_DATA, host + (sc << scb))
                elif zero >> sc & 1:
                    runs.add(sc_start, sc_end, RUN_ZERO, None)
                else:
                    runs.add(sc_start, sc_end, RUN_UNALLOCATED, None)


_ZERO_BLOCK = bytes(_L2_BLOCK_ENTRIES * 8)
_ZERO_CHUNK = bytes(_L2_BLOCK_ENTRIES * 64)
_unpack_block = struct.Struct(f">{_L2_BLOCK_ENTRIES}Q").unpack_from


@functools.lru_cache(maxsize=4)
def _contiguous_patterns(nb_entries: int) -> tuple[int, int]:
    """(R, S) for :meth:`ClusterMap._decode_l2_contiguous`: sums of 2**(64*k) and of
    i * 2**(64*k), k = nb_entries - 1 - i, over i in [0, nb_entries)."""
    repunit = int.from_bytes(b"\0\0\0\0\0\0\0\1" * nb_entries, "big")
    ramp = int.from_bytes(b"".join(i.to_bytes(8, "big") for i in range(nb_entries)), "big")
    return repunit, ramp


def _nonzero_blocks(buf: bytes, entry_size: int) -> Iterator[int]:
    """Table index of the first entry of each 512-byte block of ``buf`` not all zero.

    ``entry_size`` is 8 (standard L2) or 16 (extended L2).  Chunks of 8
    blocks are compared first, then the blocks of the chunks that are not
    zero: an empty 64 KiB table costs 16 memcmps.
    """
    block = len(_ZERO_BLOCK)
    chunk = len(_ZERO_CHUNK) if len(buf) >= len(_ZERO_CHUNK) else block
    zero_chunk = _ZERO_CHUNK if chunk > block else _ZERO_BLOCK
    per_block = block // entry_size
    for cpos in range(0, len(buf), chunk):
        if buf[cpos : cpos + chunk] == zero_chunk:
            continue
        for pos in range(cpos, cpos + chunk, block):
            if chunk == block or buf[pos : pos + block] != _ZERO_BLOCK:
                yield pos // block * per_block


def _extended_entries(
    buf: bytes, runs: TableRuns, cluster_bits: int
) -> Iterator[tuple[int, int, int]]:
    """Yield (l2_index, entry, bitmap) of an extended L2 table, skipping zero blocks.

    The entries of all-zero 512-byte blocks (unallocated, nothing in their
    bitmaps) are added to ``runs`` here as unallocated runs, in order
    between the entries the caller decodes.
    """
    per_block = len(_ZERO_BLOCK) // 16
    nb_entries = len(buf) // 16
    done = 0
    for first in _nonzero_blocks(buf, 16):
        if first > done:
            runs.add(done << cluster_bits, first << cluster_bits, RUN_UNALLOCATED, None)
        words = _unpack_block(buf, first * 16)
        for i in range(per_block):
            yield first + i, words[2 * i], words[2 * i + 1]
        done = first + per_block
    if done < nb_entries:
        runs.add(done << cluster_bits, nb_entries << cluster_bits, RUN_UNALLOCATED, None)
