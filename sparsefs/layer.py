"""One layer of a layered image: what each format supplies.

The run kinds, the :class:`Layer` protocol a format implements (its runs of
guest bytes and how to read one), :func:`split_unwritten` for formats whose
blocks the image file stores in part, and :class:`ImageFileLayer`, the opening
every one-file layer shares.  Knows nothing of FUSE or of any format's layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from sparsefs import locking
from sparsefs.errors import ImageFormatError, UnsupportedFeatureError
from sparsefs.hostmap import WRITTEN
from sparsefs.raw import RawFile

# Kinds of runs (spec-neutral; the numbers match qcow2's RUN_* constants).
DATA = 0  # stored in this layer; host = (RawFile, host_offset of the run's start)
OTHER = 1  # stored, needs the layer's decoder; host is the layer's own descriptor
ZERO = 2  # reads as zeros here and hides what is below
BELOW = 3  # not stored here: the source below, zeros past its end or without one
ERROR = 4  # broken metadata; host = one-line message naming the file
# Mapped to host bytes that the host file stores as nothing (a hole or an
# unwritten extent: qcow2 preallocation=metadata/falloc).  Reads as zeros
# without a read and is a hole for copies, yet is "data" in qemu-img map's
# sense; host = (RawFile, host_offset, zero_in_map): qemu-img map says "zero"
# for its file holes only when zero_in_map (the image file itself, not an
# external data file).
UNWRITTEN = 5

KIND_NAMES = {
    DATA: "data",
    OTHER: "other",
    ZERO: "zero",
    BELOW: "below",
    ERROR: "error",
    UNWRITTEN: "unwritten",
}


class LayerOptions(Protocol):
    """What a format reads of the open options (sparsefs.formats.qcow2.OpenOptions has them)."""

    @property
    def backing(self) -> bool:
        """Follow parents / backing files."""
        ...

    @property
    def backing_dir(self) -> str | None:
        """When set, every parent must resolve inside it."""
        ...

    @property
    def force_share(self) -> bool:
        """Take no image locks."""
        ...


class Layer(Protocol):
    """One layer of an image: its own map as runs, and how to read a run."""

    path: str
    size: int
    format_name: str

    def runs(self, guest_start: int, guest_end: int) -> Iterator[tuple[int, int, int, Any]]:
        """Yield ``(start, end, kind, host)`` in order, covering ``[guest_start, guest_end)``.

        ``guest_end`` is at most :attr:`size`.  For DATA, ``host`` is
        ``(raw, host_offset)`` with ``host_offset`` the host byte of ``start``.
        """
        ...

    def read_other(self, start: int, end: int, host: Any) -> bytes:
        """The guest bytes of an OTHER run (or part of one) ``[start, end)``.

        Raises:
            ImageReadError: the run cannot be decoded.
        """
        ...

    def close(self) -> None:
        """Release the layer's files; idempotent."""
        ...

    def describe(self) -> dict[str, Any]:
        """Format-specific facts for ``sparsefs info`` (JSON-ready)."""
        ...


# Optional: splits_host_holes = True asks LayeredImage to split the layer's DATA
# runs by the host file's written map: host bytes stored as nothing become
# UNWRITTEN (holes for copies, data in the map).  For formats that allocate a
# whole block and write only part of it, leaving the rest a hole in the file
# (VHDX).  qcow2 splits its L2 tables itself, once, when it decodes them.
#
# Optional, for read_nowait (looked up with getattr, so a layer may lack them):
#   cached_runs(guest_start, guest_end): runs() from memory only; raises
#       (any exception) where it would have to read metadata from disk.
#   read_other_nowait(start, end, host) -> bytes | None: read_other() from
#       memory only, or None.


def split_unwritten(
    runs: Iterator[tuple[int, int, int, Any]],
) -> Iterator[tuple[int, int, int, Any]]:
    """``runs`` with each DATA run split by its host file's written map.

    Host bytes the file stores as nothing (a hole, an unwritten extent; see
    :mod:`sparsefs.hostmap`) become UNWRITTEN: zeros for reads and copies, yet
    data in the map (zero_in_map False: qemu-img map does not ask the file
    below such formats).  One bisect per DATA run when the file is written
    throughout.
    """
    for run in runs:
        s, e, kind, host = run
        if kind != DATA:
            yield run
            continue
        raw, host_offset = host
        host_map = raw.written_map()
        if host_map.fully_written(host_offset, e - s):
            yield run
            continue
        for rel_s, rel_e, state in host_map.classify(host_offset, e - s):
            if state == WRITTEN:
                yield (s + rel_s, s + rel_e, DATA, (raw, host_offset + rel_s))
            else:
                yield (s + rel_s, s + rel_e, UNWRITTEN, (raw, host_offset + rel_s, False))


class ImageFileLayer:
    """The opening every one-file layer shares (vpc, vdi): the file, qemu's lock, checks.

    Opens ``path`` read-only, takes qemu's read-side image lock unless
    ``force_share``, runs the subclass's ``_open()`` (parse and validate), and
    then makes every later read strict: the metadata maps only host bytes inside
    the file (checked at open, or an ERROR run), so a short read means the file
    shrank.  Closes the file if anything fails.
    """

    def __init__(self, path: str, options: LayerOptions) -> None:
        self.path = path
        self.raw = RawFile(path)
        try:
            if not options.force_share:
                locking.lock_file(self.raw.fd, path, locking.ROLE_IMAGE)
            self._open()
            self.raw.strict_end = True
        except BaseException:
            self.raw.close()
            raise

    def _open(self) -> None:
        raise NotImplementedError

    def _err(self, problem: str) -> ImageFormatError:
        return ImageFormatError(f"{self.path}: {problem}")

    def _refuse(self, problem: str) -> UnsupportedFeatureError:
        return UnsupportedFeatureError(f"{self.path}: {problem}")
