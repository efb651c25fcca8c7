"""The FUSE filesystem: a read-only directory of raw files over SparseSources.

Knows nothing of any image format: each file is a
:class:`~sparsefs.extents.SparseSource`.  At mount, one walk of each file's
extents builds its :class:`~sparsefs.extents.DataIndex` (``st_blocks``, and
the data extents as one sorted array).  ``lseek(SEEK_DATA/SEEK_HOLE)`` is
answered from that index by bisection, on the event loop and without I/O (a
file with too many extents for the index, or not yet surveyed, is answered in
a worker thread, so a cold metadata read never blocks the loop); it needs
pyfuse3 built with the lseek handler (tools/pyfuse3-lseek.patch).  Reads that
fall entirely in a hole are answered from a shared zero buffer, found by the
index; reads of data in memory (page cache, caches) on the event loop; the
rest in worker threads (``os.pread`` and decompression release the GIL).

Files are opened with ``direct_io`` (no page cache, no kernel readahead):
the kernel sends each read(2) as one request of the reader's size (up to 1
MiB) and copies the reply straight into the reader's buffer.  A full-stream
reader (cat, rsync) gets its holes with one copy per byte and no page cache
churn, and a seeking copier (cp) never has the kernel read ahead past a data
extent into the hole behind it.  What readahead would give a sequential
reader, the daemon does itself: after answering a read of data it reads the
next range of the same size from memory while the reader is busy (see
:meth:`SparseFS._want_ahead`).  ``page_cache`` serves every file through the
page cache instead (``keep_cache``: kernel readahead, and shared maps work).

Errors: a :class:`~sparsefs.errors.SparsefsError` from a source becomes EIO
for that request (logged once per message); the mount keeps serving.
"""

from sparsefs.fusefs.node import has_lseek_support
from sparsefs.fusefs.ops import SparseFS

__all__ = ["SparseFS", "has_lseek_support"]
