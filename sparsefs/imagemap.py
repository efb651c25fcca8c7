"""``sparsefs map`` entries, shaped like ``qemu-img map --output=json``: one
entry, how entries merge, and the map of the source below a layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sparsefs.extents import SparseSource, clip_extents


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One entry of ``sparsefs map``, shaped like ``qemu-img map --output=json``."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    compressed: bool
    offset: int | None

    def as_dict(self) -> dict[str, Any]:
        """The qemu-img map JSON object for this entry."""
        d: dict[str, Any] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
            "compressed": self.compressed,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        return d


def map_continues(a: MapEntry, b: MapEntry) -> bool:
    """True when ``b`` extends ``a`` into one qemu-img map entry."""
    if (a.depth, a.present, a.zero, a.data, a.compressed) != (
        b.depth,
        b.present,
        b.zero,
        b.data,
        b.compressed,
    ) or a.start + a.length != b.start:
        return False
    if a.offset is None or b.offset is None:
        return a.offset is None and b.offset is None and not a.compressed
    return a.offset + a.length == b.offset


def merge_map(entries: Iterator[MapEntry]) -> Iterator[MapEntry]:
    """Merge touching entries that qemu-img map would print as one."""
    pending: MapEntry | None = None
    for entry in entries:
        if pending is not None and map_continues(pending, entry):
            pending = MapEntry(
                pending.start,
                pending.length + entry.length,
                pending.depth,
                pending.present,
                pending.zero,
                pending.data,
                pending.compressed,
                pending.offset,
            )
            continue
        if pending is not None:
            yield pending
        pending = entry
    if pending is not None:
        yield pending


def below_map(below: SparseSource | None, s: int, e: int, depth: int) -> Iterator[MapEntry]:
    """Map entries of ``[s, e)`` not stored in a layer at ``depth``: from ``below``.

    Past the end of ``below`` (or without one) the layer itself answers
    "zero, not present", as qemu does.
    """
    if below is None or s >= below.size:
        yield MapEntry(s, e - s, depth, False, True, False, False, None)
        return
    stop = min(e, below.size)
    deeper = getattr(below, "_iter_map_raw", None)
    if deeper is not None:
        yield from deeper(s, stop, depth + 1)
    else:
        for x in clip_extents(below, s, stop):
            yield MapEntry(
                x.guest_offset,
                x.length,
                depth + 1,
                True,
                not x.data,
                x.data,
                False,
                x.guest_offset if x.data else None,
            )
    if e > stop:
        yield MapEntry(stop, e - stop, depth, False, True, False, False, None)
