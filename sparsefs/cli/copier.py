"""Copy one source into a new raw file and verify the copy from the storage, as one pipeline.

The copy is written in guest order.  Every SETTLE_BYTES of data, the range
written since the last time is *settled*: written to the storage
(``sync_file_range``, or ``fdatasync`` where libc lacks it) and its cached
pages dropped (``POSIX_FADV_DONTNEED``).  Only then does the watermark move
past it.  A second thread digests the copy behind the watermark, through the
copy's own holes (SEEK_DATA / SEEK_HOLE of the new file), so every byte it
hashes comes from the storage, never from the buffers that were written, and
verification overlaps the copy instead of following it.  At the end the copy
is fsynced (data and metadata) before it may be renamed.

Two copy paths, one contract (the image's sparsefs1 digest comes back):

- kernel copy: ``copy_file_range`` from the image (or data / backing) file
  for plain data, the reader for the rest; the image's digest by a third
  thread that reads the image.
- read-hash-write: every data block read once, hashed, written (all-zero
  blocks left as holes), by the digest's worker threads.

Imports flow one way: this module knows sources only as
:class:`~sparsefs.extents.SparseSource` (plus the optional
``iter_host_ranges``), never FUSE, never a format.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sparsefs.checksum import BLOCK_SIZE, BlockRun, DigestResult, block_digest
from sparsefs.errors import SparsefsError
from sparsefs.extents import Extent, SparseSource
from sparsefs.libc import libc_call, pwrite_all
from sparsefs.raw import RawFile

# Bytes per copy_file_range call (the kernel may do fewer).
KERNEL_COPY_CHUNK = 64 * 1024 * 1024
# Data written between two settles: large enough that the syscalls cost
# nothing, small enough that the verifier follows closely.
SETTLE_BYTES = 16 * 1024 * 1024
# copy_file_range errnos that mean "not here": fall back to read-hash-write.
KERNEL_COPY_REFUSED = (
    errno.EXDEV,
    errno.EINVAL,
    errno.ENOSYS,
    errno.EOPNOTSUPP,
    errno.EBADF,
    errno.EPERM,
)

Advance = Callable[[int], None]


class CopyFailed(SparsefsError):
    """The copy cannot be made or does not verify; the message says why."""


class KernelCopyRefused(Exception):
    """copy_file_range is not possible here; use read-hash-write."""


class _Aborted(Exception):
    """The copy stopped: the verifier has nothing more to read."""


# -- settling: the written range to the storage, its cache dropped --------------------

_SYNC_FILE_RANGE_FLAGS = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER


def _sync_range(fd: int, start: int, length: int) -> None:
    """Write ``[start, start + length)`` of ``fd`` to the storage and wait for it."""
    err = libc_call(
        "sync_file_range",
        ("int", "off64", "off64", "uint"),
        fd,
        start,
        length,
        _SYNC_FILE_RANGE_FLAGS,
    )
    if err == 0:
        return
    if err not in (errno.EINVAL, errno.ENOSYS, errno.ESPIPE, errno.EOPNOTSUPP):
        raise OSError(err, os.strerror(err))
    os.fdatasync(fd)  # where the kernel or libc has no sync_file_range


def settle(fd: int, start: int, end: int) -> None:
    """Put ``[start, end)`` of the new file on the storage and drop its cached pages.

    What is read there afterwards comes from the storage.  (Tests wrap this
    to change bytes "on the storage" after they were written.)
    """
    if end > start:
        _sync_range(fd, start, end - start)
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)


class Watermark:
    """Guest bytes ``[0, mark)`` of the copy are final and settled."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._mark = 0
        self._aborted = False

    def advance(self, mark: int) -> None:
        with self._cond:
            if mark > self._mark:
                self._mark = mark
                self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def wait_past(self, pos: int) -> int:
        """Block until the mark is past ``pos``; return it.

        Raises:
            _Aborted: the copy stopped first.
        """
        with self._cond:
            while self._mark <= pos and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise _Aborted
            return self._mark


class _Settler:
    """Moves the watermark as the copy advances, settling every SETTLE_BYTES of data."""

    def __init__(self, fd: int, size: int, watermark: Watermark, overlap: bool) -> None:
        self._fd = fd
        self._size = size
        self._watermark = watermark
        # Without overlap, data is settled once, at the end (holes before the
        # first data still pass: that costs nothing).
        self._settle_bytes = SETTLE_BYTES if overlap else 1 << 62
        self._settled = 0  # [0, settled) is on the storage
        self._pending = 0  # data bytes written since

    def reached(self, mark: int, written: int) -> None:
        """The copy is final up to guest byte ``mark``, with ``written`` more data bytes."""
        mark = min(mark, self._size)
        self._pending += written
        if self._pending >= self._settle_bytes:
            settle(self._fd, self._settled, mark)
        elif self._pending:
            return
        self._settled = mark
        self._pending = 0
        self._watermark.advance(mark)

    def finish(self) -> None:
        """The copy is complete: settle the rest, fsync, release the verifier to the end."""
        settle(self._fd, self._settled, self._size)
        os.fsync(self._fd)  # data and metadata, before the file may be renamed
        self._watermark.advance(self._size)


class SettledCopy:
    """The new file as a SparseSource, readable only behind the watermark.

    Its extents come from the file's own SEEK_DATA / SEEK_HOLE, walked as the
    watermark moves (a run may be cut at a mark; runs of the same kind can
    touch).  ``iter_host_ranges`` is given only the data ranges of that
    walk (block_digest's use), so each is one range of the file.
    """

    def __init__(self, path: str, size: int, watermark: Watermark) -> None:
        self._raw = RawFile(path, size)
        self._watermark = watermark

    @property
    def size(self) -> int:
        return self._raw.size

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> SettledCopy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, guest_offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - guest_offset))
        if length:
            self._watermark.wait_past(guest_offset + length - 1)
        return self._raw.read(guest_offset, length)

    def iter_host_ranges(
        self, guest_offset: int, guest_end: int
    ) -> Iterator[tuple[int, int, RawFile | None, int]]:
        end = min(guest_end, self.size)
        if guest_offset < end:
            self._watermark.wait_past(end - 1)
            yield (guest_offset, end, self._raw, guest_offset)

    def iter_extents(self, guest_offset: int = 0) -> Iterator[Extent]:
        fd, size, pos = self._raw.fd, self.size, guest_offset
        while pos < size:
            mark = self._watermark.wait_past(pos)
            while pos < mark:
                try:
                    start = min(os.lseek(fd, pos, os.SEEK_DATA), mark)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    start = mark  # no data from pos to the end of the file
                if start > pos:
                    yield Extent(pos, start - pos, data=False, zero=True)
                    pos = start
                if pos < mark:
                    stop = min(os.lseek(fd, pos, os.SEEK_HOLE), mark)
                    yield Extent(pos, stop - pos, data=True)
                    pos = stop


# -- the two copy paths --------------------------------------------------------------


def copy_read_hash_write(
    source: SparseSource,
    dst: int,
    advance: Advance,
    settler: _Settler,
    fine_size: int = 0,
    fines: list[tuple[int, bytes]] | None = None,
) -> DigestResult:
    """Copy the data of ``source`` into ``dst`` (already sized); return the image digest.

    Each data block is read once, hashed and written; all-zero blocks are
    not written (holes).  With ``fine_size``, the blocks' sub-block digests
    are appended to ``fines``.

    Raises:
        ImageReadError: a data range of the image cannot be read.
        OSError: writing failed.
    """

    def sink(offset: int, piece: bytes | bytearray | memoryview) -> None:
        pwrite_all(dst, piece, offset)

    def on_run(run: BlockRun) -> None:
        # In block order, after the run's writes: everything before its end is final.
        if run.bytes_read:
            advance(run.bytes_read)
        if fines is not None:
            fines.extend(run.fines)
        settler.reached((run.index + run.count) * BLOCK_SIZE, run.bytes_read)

    return block_digest(source, sink=sink, on_run=on_run, fine_size=fine_size)


def copy_kernel(source: SparseSource, dst: int, advance: Advance, settler: _Settler) -> None:
    """Copy the data of ``source`` into ``dst`` with copy_file_range where it can.

    Pieces the source cannot hand over as file bytes come from ``read()``.

    Raises:
        KernelCopyRefused: the kernel refused copy_file_range (nothing to undo
            but the partial file).
        ImageReadError: a data range of the image cannot be read.
        OSError: reading or writing failed.
    """
    host_ranges = getattr(source, "iter_host_ranges", None)
    if host_ranges is None:
        raise KernelCopyRefused("the source has no host ranges")
    for ext in source.iter_extents(0):
        if not ext.data:
            settler.reached(ext.end, 0)
            continue
        for start, end, raw, host in host_ranges(ext.guest_offset, ext.end):
            pos = start
            if raw is not None:
                while pos < end:
                    try:
                        n = os.copy_file_range(
                            raw.fd, dst, min(KERNEL_COPY_CHUNK, end - pos), host + pos - start, pos
                        )
                    except OSError as exc:
                        if exc.errno in KERNEL_COPY_REFUSED:
                            raise KernelCopyRefused(exc.strerror) from exc
                        raise
                    if n == 0:  # the host file ends early: the reader knows what follows
                        break
                    pos += n
                    advance(n)
            if pos < end:
                data = source.read(pos, end - pos)
                if len(data) != end - pos:
                    raise CopyFailed(f"short read at byte {pos}")
                if data.count(0) != len(data):
                    pwrite_all(dst, data, pos)
                advance(end - pos)
        settler.reached(ext.end, ext.length)


# -- the pipeline --------------------------------------------------------------------


@dataclass
class Outcome:
    """What one copy-and-verify produced.

    Attributes:
        image: the image's sparsefs1 digest (computed while copying).
        copy: the copy's, read back from the storage.
        block_digests: the copy's block digests, one per block.
        image_fines: with ``fine_size``, the image's sub-block digests (every
            data block's non-zero sub-blocks, in order; see ``BlockRun.fines``).
        method: "copy_file_range" or "read-hash-write".
        phases: seconds: "copy" (until the copy is on the storage) and
            "verify" (what the verification took beyond that).
    """

    image: DigestResult
    copy: DigestResult
    block_digests: list[bytes]
    method: str
    image_fines: list[tuple[int, bytes]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)


class _Verifier(threading.Thread):
    """Digests the copy behind the watermark."""

    def __init__(self, path: str, size: int, advance: Advance) -> None:
        super().__init__(name="sparsefs-verify", daemon=True)
        self.watermark = Watermark()
        self._path = path
        self._size = size
        self._advance = advance
        self.result: DigestResult | None = None
        self.error: BaseException | None = None
        self.block_digests: list[bytes] = []

    def run(self) -> None:
        def on_run(r: BlockRun) -> None:
            self.block_digests.extend([r.digest] * r.count)
            if r.bytes_read:
                self._advance(r.bytes_read)

        try:
            with SettledCopy(self._path, self._size, self.watermark) as copy:
                self.result = block_digest(copy, on_run=on_run)
        except _Aborted:
            pass
        except BaseException as exc:  # handed to the caller by finish()
            self.error = exc

    def finish(self) -> DigestResult:
        """Wait for the digest of the whole copy.

        Raises:
            Exception: whatever reading the copy raised.
        """
        self.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def stop(self) -> None:
        self.watermark.abort()
        self.join()


def copy_and_verify(
    source: SparseSource,
    partial: str,
    *,
    kernel: bool,
    overlap: bool,
    advance: Advance,
    fine_size: int = 0,
) -> Outcome:
    """Write ``source`` to the new file ``partial`` and digest the copy from the storage.

    ``overlap``: verify behind the copy, range by range, instead of after it.
    That pays where settling waits for a device (measured on ext4 on a
    virtio disk: 5-12% less time); on a memory filesystem there is nothing
    to wait for, and two pipelines on two cores only contend (measured on
    tmpfs: up to 20% more time), so the backup turns it off there.

    ``fine_size``: also digest the image's sub-blocks of that size while
    copying (a backup set keeps them; once the copy's digest equals the
    image's, they are the copy's too).  The caller compares ``image`` and
    ``copy`` of the outcome.

    Raises:
        ImageReadError, OSError: reading the image, or writing or reading the copy, failed.
    """
    t0 = time.monotonic()
    dst = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    verifier: _Verifier | None = None
    try:
        os.ftruncate(dst, source.size)
        image: DigestResult | None = None
        fines: list[tuple[int, bytes]] = []
        method = "read-hash-write"
        if kernel:
            verifier = _Verifier(partial, source.size, advance)
            verifier.start()
            try:
                image = _kernel_pass(source, dst, advance, verifier, overlap, fine_size, fines)
                method = "copy_file_range"
            except KernelCopyRefused:
                verifier.stop()  # what it read is about to be redone
                verifier = None
                fines.clear()
                os.ftruncate(dst, 0)  # start again, the other way
                os.ftruncate(dst, source.size)
        if image is None:
            verifier = _Verifier(partial, source.size, advance)
            verifier.start()
            settler = _Settler(dst, source.size, verifier.watermark, overlap)
            image = copy_read_hash_write(source, dst, advance, settler, fine_size, fines)
            settler.finish()
        t1 = time.monotonic()
        assert verifier is not None  # started by whichever path copied
        copy = verifier.finish()
        t2 = time.monotonic()
        return Outcome(
            image,
            copy,
            verifier.block_digests,
            method,
            fines,
            {"copy": t1 - t0, "verify": t2 - t1},
        )
    finally:
        if verifier is not None and verifier.is_alive():
            verifier.stop()
        os.close(dst)


def _kernel_pass(
    source: SparseSource,
    dst: int,
    advance: Advance,
    verifier: _Verifier,
    overlap: bool,
    fine_size: int,
    fines: list[tuple[int, bytes]],
) -> DigestResult:
    """copy_file_range the source while another thread digests the image; its digest.

    Raises:
        KernelCopyRefused: the kernel refused (progress reported is taken back).
    """
    box: dict[str, DigestResult | BaseException] = {}

    def hash_image() -> None:
        try:
            box["digest"] = block_digest(
                source, fine_size=fine_size, on_run=lambda run: fines.extend(run.fines)
            )
        except BaseException as exc:  # re-raised below
            box["error"] = exc

    hasher = threading.Thread(target=hash_image, name="sparsefs-image-digest")
    hasher.start()
    copied = [0]

    def counted(n: int) -> None:
        copied[0] += n
        advance(n)

    settler = _Settler(dst, source.size, verifier.watermark, overlap)
    try:
        copy_kernel(source, dst, counted, settler)
        settler.finish()
    except KernelCopyRefused:
        advance(-copied[0])
        raise
    finally:
        hasher.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]  # the box holds the exception the thread raised
    result = box["digest"]
    assert isinstance(result, DigestResult)
    return result
