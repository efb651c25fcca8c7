"""raw in the registry: the file itself is the guest disk (:class:`sparsefs.raw.RawFile`).

Holes come from the host file.  As a parent (``chain`` not empty) the file
takes qemu's read-side lock of a raw backing file unless ``force_share``.
"""

from __future__ import annotations

from sparsefs import locking
from sparsefs.layered import LayerOptions
from sparsefs.raw import RawFile


def open_image(path: str, options: LayerOptions, chain: tuple[str, ...]) -> RawFile:
    """Open ``path`` as raw.

    Raises:
        MissingFileError: it cannot be opened.
        ImageLockedError: as a parent, a writer holds it.
    """
    raw = RawFile(path)
    if chain and not options.force_share:
        try:
            locking.lock_file(raw.fd, raw.path, locking.ROLE_RAW_BACKING)
        except BaseException:
            raw.close()
            raise
    return raw
