"""The qcow2 snapshot table, read on first use and isolated from the active image.

A damaged table costs the snapshots only: the active disk never depends on
it (qemu: qcow2_read_snapshots).  A snapshot whose L1 table is invalid is
still listed; ``Qcow2File.l1_problem`` says why it cannot be opened.
"""

from __future__ import annotations

from sparsefs.formats.qcow2 import layout as L
from sparsefs.raw import RawFile


class _SnapshotTableError(Exception):
    """The snapshot table cannot be read (the message lacks the file name)."""


def snapshot_label(snap: L.Snapshot) -> str:
    """How messages name a snapshot: ``snapshot 'NAME' (id ID)``."""
    return f"snapshot {snap.name!r} (id {snap.id_str})"


class SnapshotTable:
    """The snapshot table of an image file (a part of ``Qcow2File``)."""

    path: str
    file: RawFile
    header: L.Header
    cluster_size: int
    _snapshot_table: tuple[list[L.Snapshot], str | None] | None

    @property
    def snapshots(self) -> list[L.Snapshot]:
        """The entries of the snapshot table; empty when the table is damaged.

        Read on first use.  An entry is listed even when its L1 table is
        invalid: :meth:`l1_problem` and :meth:`Qcow2Image.open_snapshot` tell.
        """
        return self._load_snapshot_table()[0]

    @property
    def snapshot_table_problem(self) -> str | None:
        """Why the snapshot table cannot be read at all (one line naming the file), or None."""
        return self._load_snapshot_table()[1]

    def _load_snapshot_table(self) -> tuple[list[L.Snapshot], str | None]:
        if self._snapshot_table is None:
            try:
                self._snapshot_table = (self._read_snapshot_table(), None)
            except _SnapshotTableError as exc:
                self._snapshot_table = ([], f"{self.path}: {exc}")
        return self._snapshot_table

    def _read_snapshot_table(self) -> list[L.Snapshot]:
        """Decode the snapshot table (qemu: qcow2_read_snapshots).

        Raises:
            _SnapshotTableError: the table cannot be read: too many entries, an
                offset that is not cluster aligned or past the end of the file,
                an entry running past the end, more than 64 MiB, an invalid
                entry.  Then no snapshot is trusted.
        """
        h = self.header
        if h.nb_snapshots == 0:
            return []  # the offset means nothing then (qemu checks it anyway)
        if h.nb_snapshots > L.MAX_SNAPSHOTS:
            raise _SnapshotTableError(
                f"snapshot table lists {h.nb_snapshots} snapshots "
                f"(qemu allows at most {L.MAX_SNAPSHOTS})"
            )
        offset = h.snapshots_offset
        file_size = self.file.file_size
        if offset % self.cluster_size or offset == 0:
            raise _SnapshotTableError(f"snapshot table offset {offset:#x} is not cluster aligned")
        if offset >= file_size:
            raise _SnapshotTableError(
                f"snapshot table at {offset:#x} is past the end of the file ({file_size:#x})"
            )
        snaps: list[L.Snapshot] = []
        # Read in chunks: entries are variable-length.  Parsed bytes are dropped
        # so memory stays near a chunk; the table itself is bounded like qemu's
        # (QCOW_MAX_SNAPSHOTS_SIZE).
        buf = bytearray()
        base = 0  # table offset of buf[0]
        chunk = 64 * 1024
        pos = 0
        in_file = file_size - offset
        limit = min(in_file, L.MAX_SNAPSHOTS_TABLE_BYTES)
        for index in range(h.nb_snapshots):
            while True:
                try:
                    snap, nxt = L.parse_snapshot(buf, pos)
                    break
                except L.TruncatedError:
                    if base + len(buf) >= limit:
                        entry_at = offset + base + pos
                        if limit < in_file:
                            raise _SnapshotTableError(
                                f"snapshot table at {offset:#x} is larger than "
                                f"{limit >> 20} MiB (entry {index + 1} of {h.nb_snapshots} "
                                f"at {entry_at:#x} ends past that)"
                            ) from None
                        raise _SnapshotTableError(
                            f"snapshot table at {offset:#x} runs past the end of the file "
                            f"({file_size:#x}): entry {index + 1} of {h.nb_snapshots} "
                            f"at {entry_at:#x} does not end in it"
                        ) from None
                    del buf[:pos]
                    base += pos
                    pos = 0
                    more = min(chunk, limit - base - len(buf))
                    if more > 0:
                        buf += self.file.pread(offset + base + len(buf), more)
                    chunk = min(chunk * 2, 4 * 1024 * 1024)
                except ValueError as exc:
                    raise _SnapshotTableError(
                        f"snapshot table entry {index + 1} of {h.nb_snapshots} "
                        f"at {offset + base + pos:#x}: {exc}"
                    ) from None
            snaps.append(snap)
            pos = nxt
        return snaps
