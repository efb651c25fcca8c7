"""Runs of guest bytes of one kind, as qcow2 decodes them: the run kinds (the
layered kinds by number), :class:`Run`, the decoded runs of one L2 table
(:class:`TableRuns`) and the cost-bounded cache (:class:`LRU`) that holds them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from sparsefs import layered

# Kinds of runs in the cluster map (mirroring qemu's QCow2SubclusterType), the
# layered kinds by number, so that the decoded tables feed LayeredImage as they are.
RUN_DATA = layered.DATA  # stored at a host offset in the data file (NORMAL)
RUN_COMPRESSED = layered.OTHER  # one compressed cluster; host is (host_offset, nb_bytes)
RUN_ZERO = layered.ZERO  # reads as zeros, nothing read from below (ZERO_PLAIN / ZERO_ALLOC)
RUN_UNALLOCATED = layered.BELOW  # not in this layer: the backing file, or zeros
RUN_ERROR = layered.ERROR  # metadata is invalid for this range; host is the message
# Mapped to a host range that the host file stores as nothing (a hole, or an
# unwritten extent: preallocation=metadata/falloc); host as RUN_DATA.  Reads as
# zeros without a read; a hole for copies; still "data" in qemu-img map's sense.
RUN_UNWRITTEN = layered.UNWRITTEN

RUN_KIND_NAMES = {
    RUN_DATA: "data",
    RUN_COMPRESSED: "compressed",
    RUN_ZERO: "zero",
    RUN_UNALLOCATED: "unallocated",
    RUN_ERROR: "error",
    RUN_UNWRITTEN: "unwritten",
}


# What a run's ``host`` holds: see :class:`Run`.
RunHost = int | tuple[int, int] | str | None


@dataclass(frozen=True, slots=True)
class Run:
    """A run of one kind: guest bytes ``[guest_offset, guest_end)``.

    ``host`` is the host offset of ``guest_offset`` for RUN_DATA, the
    (host_offset, nb_bytes) descriptor for RUN_COMPRESSED, the error message
    for RUN_ERROR, and None otherwise.
    """

    guest_offset: int
    guest_end: int
    kind: int
    host: RunHost


class LRU:
    """A small thread-safe LRU cache bounded by the summed cost of its values."""

    def __init__(self, max_cost: int) -> None:
        self._max_cost = max_cost
        self._cost = 0
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Any, value: Any, cost: int) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (value, cost)
            self._cost += cost
            self._evict()

    def set_max_cost(self, max_cost: int) -> None:
        """Change the bound, evicting what no longer fits."""
        with self._lock:
            self._max_cost = max_cost
            self._evict()

    def _evict(self) -> None:
        while self._cost > self._max_cost and len(self._items) > 1:
            _, (_, old_cost) = self._items.popitem(last=False)
            self._cost -= old_cost

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._cost = 0


class TableRuns:
    """The runs of one L2 table, relative to the table's first guest byte."""

    __slots__ = ("ends", "hosts", "kinds", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.kinds: list[int] = []
        self.hosts: list[Any] = []

    def add(self, start: int, end: int, kind: int, host: Any) -> None:
        """Append a run, merging it into the last one when they continue each other."""
        if self.kinds and self.ends[-1] == start and kind != RUN_COMPRESSED:
            last = self.kinds[-1]
            if last == kind:
                if kind == RUN_DATA or kind == RUN_UNWRITTEN:  # noqa: SIM109 (hot path)
                    if self.hosts[-1] + (start - self.starts[-1]) == host:
                        self.ends[-1] = end
                        return
                elif kind != RUN_ERROR:
                    self.ends[-1] = end
                    return
        self.starts.append(start)
        self.ends.append(end)
        self.kinds.append(kind)
        self.hosts.append(host)

    def cost(self) -> int:
        """Approximate bytes these runs hold in memory (what the L2 cache charges).

        Measured with tracemalloc: about 115 bytes per run (four list slots,
        the int objects) plus the object itself.  A decoded table can be far
        larger than the 1 cluster on disk (extended L2 with alternating
        subclusters), or far smaller (a sparse table): charge what it holds.
        """
        return 512 + 128 * len(self.starts)
