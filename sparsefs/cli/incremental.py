"""``sparsefs backup --since BITMAP``: bring a verified raw copy up to date from a dirty bitmap.

``DEST_DIR/NAME.raw`` must be a copy of the image that ``SPARSEFS-SUMS``
vouches for, of the image's virtual size.  Only the guest ranges the qcow2
persistent bitmap BITMAP marks dirty are read from the image and written to
the copy (all-zero pieces are punched as holes), so the writes are
O(changed).  Every 1 MiB block that was written is then read back from the
copy and compared with the image (the written ranges; the block's digest from the
copy), and the manifest gets the new digest.

What is trusted from the last verified run: the per-block digests it left in
``DEST_DIR/.NAME.raw.sparsefs1-blocks``, bound to the copy by device, inode,
size, mtime and ctime and to the manifest's digest.  When that file is
missing or does not match (first incremental run after a full backup, or the
copy was touched), the copy is hashed once (holes cost nothing) and must
equal the digest in ``SPARSEFS-SUMS``.  The bitmap itself is trusted to hold
every write since that copy was made; see README "Incremental backups".

An interrupted run never leaves a copy the manifests call verified: the
copy's lines are removed from ``SPARSEFS-SUMS`` and ``XXH128SUMS`` and its
block digests deleted before the first write, and the new ``SPARSEFS-SUMS``
line is written only after the verification.  ``XXH128SUMS`` keeps no line
for an incrementally updated copy (its stream hash would need every byte
hashed again); ``sparsefs checksum --stream-xxh128`` makes one.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import xxhash

from sparsefs.checksum import (
    BLOCK_SIZE,
    DIGEST_PREFIX,
    HEADER_MAGIC,
    block_digest,
)
from sparsefs.cli.checksum import format_line, parse_manifest_line
from sparsefs.cli.common import EXIT_OK, libc_call, pwrite_all, raw_name
from sparsefs.errors import SparsefsError
from sparsefs.extents import Extent
from sparsefs.formats.qcow2 import Qcow2Image, dirty_ranges, find_bitmap, open_image
from sparsefs.options import OpenOptions
from sparsefs.raw import RawFile

SPARSEFS_SUMS = "SPARSEFS-SUMS"
XXH128_SUMS = "XXH128SUMS"
BLOCKS_MAGIC = b"sparsefs1-blocks\n"
COPY_CHUNK = 8 * 1024 * 1024
_ZERO_CHUNK = bytes(COPY_CHUNK)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class NotAVerifiedCopyError(SparsefsError):
    """The destination is not a copy of the image that the manifests vouch for."""


@dataclass
class SinceResult:
    """What an incremental run did to one copy (bytes unless named otherwise)."""

    name: str
    size: int
    dirty_bytes: int = 0
    written_bytes: int = 0
    verified_bytes: int = 0
    digest: str = ""
    rehashed: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        """The JSON form."""
        return {
            "file": self.name,
            "ok": True,
            "size": self.size,
            "dirty-bytes": self.dirty_bytes,
            "written-bytes": self.written_bytes,
            "verified-bytes": self.verified_bytes,
            "sparsefs1": self.digest,
            "copy-rehashed": self.rehashed,
            "seconds": round(self.seconds, 3),
        }


def blocks_path(dest_dir: str, name: str) -> str:
    """Where the per-block digests of ``DEST_DIR/NAME`` are kept."""
    return os.path.join(dest_dir, f".{name}.sparsefs1-blocks")


def fold(size: int, digests: list[bytes]) -> str:
    """The sparsefs1 digest from the block digests (README, "The digest (sparsefs1)")."""
    h = xxhash.xxh3_128(
        HEADER_MAGIC + size.to_bytes(8, "little") + BLOCK_SIZE.to_bytes(8, "little")
    )
    h.update(b"".join(digests))
    return DIGEST_PREFIX + h.hexdigest()


def _identity(st: os.stat_result) -> dict[str, int]:
    return {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def read_manifest_digest(dest_dir: str, name: str) -> str | None:
    """The sparsefs1 digest ``DEST_DIR/SPARSEFS-SUMS`` records for ``name``, or None."""
    found = None
    with (
        contextlib.suppress(FileNotFoundError),
        open(os.path.join(dest_dir, SPARSEFS_SUMS), encoding="utf-8") as f,
    ):
        for line in f:
            entry = parse_manifest_line(line)
            if entry is not None and entry.name == name and not entry.stream:
                found = entry.digest
    return found


def _load_blocks(
    path: str, copy_st: os.stat_result, digest: str, nb_blocks: int
) -> list[bytes] | None:
    """The stored block digests when they belong to this copy and digest, else None."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if not raw.startswith(BLOCKS_MAGIC):
        return None
    head_end = raw.find(b"\n", len(BLOCKS_MAGIC))
    if head_end < 0:
        return None
    try:
        head = json.loads(raw[len(BLOCKS_MAGIC) : head_end])
    except ValueError:
        return None
    body = raw[head_end + 1 :]
    if (
        not isinstance(head, dict)
        or head.get("copy") != _identity(copy_st)
        or head.get("digest") != digest
        or head.get("block-size") != BLOCK_SIZE
        or len(body) != 16 * nb_blocks
    ):
        return None
    digests = [body[i : i + 16] for i in range(0, len(body), 16)]
    if fold(copy_st.st_size, digests) != digest:
        return None
    return digests


def store_blocks(
    path: str, copy_st: os.stat_result, digest: str, digests: list[bytes], image_path: str | None
) -> None:
    head = {
        "copy": _identity(copy_st),
        "digest": digest,
        "block-size": BLOCK_SIZE,
        "image": os.path.realpath(image_path) if image_path else None,
    }
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(BLOCKS_MAGIC + json.dumps(head, sort_keys=True).encode() + b"\n")
        f.write(b"".join(digests))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _hash_copy(copy_path: str, size: int) -> list[bytes]:
    """Block digests of the copy, read from the file (holes cost nothing)."""
    digests: list[bytes] = []
    with RawFile(copy_path) as raw:
        if raw.size != size:
            raise NotAVerifiedCopyError(f"{copy_path}: size changed while reading")
        block_digest(raw, on_run=lambda run: digests.extend([run.digest] * run.count))
    return digests


def update_manifest(path: str, entries: dict[str, str | None]) -> None:
    """Rewrite a manifest atomically: names mapped to a digest get that line, to None none.

    Other lines stay as they are.
    """
    kept: list[str] = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            entry = parse_manifest_line(line)
            if entry is not None and entry.name in entries:
                continue
            if line:
                kept.append(line)
    lines = kept + [format_line(d, n) for n, d in sorted(entries.items()) if d is not None]
    if not lines and not os.path.exists(path):
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset + length)`` of ``fd`` (reads zeros); False if unsupported."""
    err = libc_call(
        "fallocate",
        ("int", "int", "off64", "off64"),
        fd,
        _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
        offset,
        length,
    )
    if err == 0:
        return True
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def _clipped_extents(image: Qcow2Image, start: int, end: int) -> Iterator[Extent]:
    for ext in image.iter_extents(start):
        if ext.guest_offset >= end:
            return
        lo = max(ext.guest_offset, start)
        hi = min(ext.end, end)
        yield Extent(lo, hi - lo, ext.data, ext.zero)
        if ext.end >= end:
            return


def _write_zeros(fd: int, offset: int, length: int) -> int:
    """Make ``[offset, offset + length)`` read as zeros: a hole, or written zeros."""
    if _punch_hole(fd, offset, length):
        return 0
    done = 0
    while done < length:
        n = min(COPY_CHUNK, length - done)
        done += os.pwrite(fd, _ZERO_CHUNK[:n], offset + done)
    return done


def _copy_range(image: Qcow2Image, fd: int, start: int, end: int) -> int:
    """Make the copy's ``[start, end)`` equal the image's; return the bytes written."""
    written = 0
    for ext in _clipped_extents(image, start, end):
        if not ext.data:
            written += _write_zeros(fd, ext.guest_offset, ext.length)
            continue
        pos = ext.guest_offset
        while pos < ext.end:
            n = min(COPY_CHUNK, ext.end - pos)
            buf = image.read(pos, n)
            if buf == _ZERO_CHUNK[:n]:
                written += _write_zeros(fd, pos, n)
            else:
                pwrite_all(fd, buf, pos)
                written += n
            pos += n
    return written


def _touched_blocks(ranges: list[tuple[int, int]]) -> dict[int, list[tuple[int, int]]]:
    """Block index -> the [start, end) pieces of ``ranges`` inside that block, in order."""
    blocks: dict[int, list[tuple[int, int]]] = {}
    for start, length in ranges:
        end = start + length
        pos = start
        while pos < end:
            index = pos // BLOCK_SIZE
            stop = min(end, (index + 1) * BLOCK_SIZE)
            blocks.setdefault(index, []).append((pos, stop))
            pos = stop
    return blocks


@dataclass
class _Plan:
    """Everything checked before the destination is touched."""

    image: Qcow2Image
    image_path: str
    dest_dir: str
    copy_path: str
    ranges: list[tuple[int, int]]
    digests: list[bytes]
    digest: str
    copy_st: os.stat_result
    result: SinceResult
    t0: float


def backup_since(
    image: Qcow2Image, image_path: str, dest_dir: str, bitmap_name: str
) -> SinceResult:
    """Bring ``DEST_DIR/NAME.raw`` up to date with ``image`` from bitmap ``bitmap_name``.

    Every refusal happens before the destination is touched (see
    :func:`prepare_since`); then :func:`apply_since`.

    Raises:
        BitmapError: the bitmap is missing, in use, or does not fit the image.
        NotAVerifiedCopyError: the copy is missing, of another size, not in
            SPARSEFS-SUMS, or differs from what SPARSEFS-SUMS records.
        SparsefsError: the verification of the written blocks failed (the
            copy is then left without a manifest line).
        OSError: reading or writing failed (likewise).
    """
    return apply_since(prepare_since(image, image_path, dest_dir, bitmap_name))


def prepare_since(image: Qcow2Image, image_path: str, dest_dir: str, bitmap_name: str) -> _Plan:
    """Check the bitmap and the copy; read, never write.  Raises what :func:`backup_since` does."""
    t0 = time.monotonic()
    name = raw_name(image_path)
    copy_path = os.path.join(dest_dir, name)
    size = image.size
    result = SinceResult(name, size)
    # 1. The bitmap: present, not in use, of a size that fits the image.
    bitmap = find_bitmap(image, bitmap_name)
    ranges = list(dirty_ranges(image, bitmap))
    result.dirty_bytes = sum(length for _, length in ranges)
    # 2. The copy: there, the right size, vouched for by SPARSEFS-SUMS.
    hint = "make a full 'sparsefs backup' first"
    try:
        copy_st = os.stat(copy_path)
    except FileNotFoundError:
        raise NotAVerifiedCopyError(f"{copy_path}: no previous copy to update; {hint}") from None
    if not os.path.isfile(copy_path):
        raise NotAVerifiedCopyError(f"{copy_path}: not a regular file")
    if copy_st.st_size != size:
        raise NotAVerifiedCopyError(
            f"{copy_path}: is {copy_st.st_size} bytes, the image {image_path} is {size}: "
            f"not a copy of this image; {hint}"
        )
    digest = read_manifest_digest(dest_dir, name)
    if digest is None:
        raise NotAVerifiedCopyError(
            f"{copy_path}: {SPARSEFS_SUMS} has no sparsefs1 line for it, so it is not a "
            f"verified copy (an interrupted run?); {hint}"
        )
    nb_blocks = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
    side = blocks_path(dest_dir, name)
    digests = _load_blocks(side, copy_st, digest, nb_blocks)
    if digests is None:
        result.rehashed = True
        digests = _hash_copy(copy_path, size)
        if fold(size, digests) != digest:
            raise NotAVerifiedCopyError(
                f"{copy_path}: differs from the digest {SPARSEFS_SUMS} records for it; "
                f"not a verified copy; {hint}"
            )
        if os.stat(copy_path).st_mtime_ns != copy_st.st_mtime_ns:
            raise NotAVerifiedCopyError(f"{copy_path}: changed while it was being checked")
    return _Plan(
        image, image_path, dest_dir, copy_path, ranges, digests, digest, copy_st, result, t0
    )


def apply_since(plan: _Plan) -> SinceResult:
    """Write the dirty ranges, verify them, record the new digest (steps 3 to 5)."""
    image, image_path, dest_dir, copy_path = (
        plan.image,
        plan.image_path,
        plan.dest_dir,
        plan.copy_path,
    )
    ranges, digests, result = plan.ranges, plan.digests, plan.result
    name, size = result.name, result.size
    side = blocks_path(dest_dir, name)
    if not ranges:
        if result.rehashed:
            store_blocks(side, plan.copy_st, plan.digest, digests, image_path)
        result.digest = plan.digest
        result.seconds = time.monotonic() - plan.t0
        return result
    # 3. From here the copy is not vouched for until the new line is written.
    update_manifest(os.path.join(dest_dir, SPARSEFS_SUMS), {name: None})
    update_manifest(os.path.join(dest_dir, XXH128_SUMS), {name: None})
    with contextlib.suppress(FileNotFoundError):
        os.unlink(side)
    fsync_dir(dest_dir)
    fd = os.open(copy_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for start, length in ranges:
            result.written_bytes += _copy_range(image, fd, start, start + length)
        os.fsync(fd)
        # 4. Verify what was written, as the storage holds it (cached pages dropped):
        # each written range of the copy against the image; the block digest of the
        # whole block comes from the copy.
        touched = _touched_blocks(ranges)
        for index in touched:
            start = index * BLOCK_SIZE
            os.posix_fadvise(fd, start, min(BLOCK_SIZE, size - start), os.POSIX_FADV_DONTNEED)
        for index, pieces in touched.items():
            start = index * BLOCK_SIZE
            n = min(BLOCK_SIZE, size - start)
            ours = os.pread(fd, n, start)
            for lo, hi in pieces:
                if len(ours) != n or ours[lo - start : hi - start] != image.read(lo, hi - lo):
                    raise SparsefsError(
                        f"{copy_path}: verification failed in bytes {lo} to {hi}: the copy "
                        f"differs from the image; the copy is left out of {SPARSEFS_SUMS}"
                    )
                result.verified_bytes += hi - lo
            digests[index] = xxhash.xxh3_128_digest(ours)
        new_st = os.fstat(fd)
    finally:
        os.close(fd)
    # 5. Record: block digests, then the manifest line that vouches for the copy.
    result.digest = fold(size, digests)
    store_blocks(side, new_st, result.digest, digests, image_path)
    update_manifest(os.path.join(dest_dir, SPARSEFS_SUMS), {name: result.digest})
    fsync_dir(dest_dir)
    result.seconds = time.monotonic() - plan.t0
    return result


def run_since(
    images: list[str],
    dest_dir: str,
    bitmap_name: str,
    options: OpenOptions,
    *,
    quiet: bool = False,
    as_json: bool = False,
) -> int:
    """Run ``backup --since`` for each image; print a line per copy; return the exit status.

    Raises:
        SparsefsError: a refusal or failure (the CLI prints its one line).
    """
    if not os.path.isdir(dest_dir):
        raise SparsefsError(f"{dest_dir}: destination directory does not exist")
    results: list[SinceResult] = []
    with contextlib.ExitStack() as stack:
        # Every image and copy is checked before any copy is written.
        plans = []
        for path in images:
            image = stack.enter_context(open_image(path, options))
            plans.append(prepare_since(image, path, dest_dir, bitmap_name))
        names = [p.result.name for p in plans]
        if len(set(names)) != len(names):
            raise SparsefsError(f"{dest_dir}: two images would update the same copy")
        for plan in plans:
            results.append(apply_since(plan))
    if as_json:
        print(json.dumps({"ok": True, "files": [r.as_dict() for r in results]}, indent=2))
    elif not quiet:
        for r in results:
            print(
                f"{r.name}: {r.dirty_bytes} dirty bytes, {r.written_bytes} written, "
                f"{r.verified_bytes} verified  {r.digest}"
            )
    return EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--since`` option of ``backup``."""
    parser.add_argument(
        "--since",
        metavar="BITMAP",
        help="incremental: update an existing verified DEST_DIR/NAME.raw, writing only the "
        "ranges the image's persistent dirty bitmap BITMAP marks dirty, then verify what was "
        "written and update SPARSEFS-SUMS (see README 'Incremental backups')",
    )
