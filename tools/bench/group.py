"""The backup/checksum group (issue 22): ``sparsefs backup``, ``checksum`` and ``verify``
against qemu's tools on one image, run by tools/bench/bench.py (``--backup-group``, and
always with ``--cold``).

The commands are tools/bench/backup_bench.py's and checksum_bench.py's:

    backup           ``sparsefs backup -q IMAGE DEST`` (copy, read-back verify, sums)
                     into a fresh empty DEST on /dev/shm, deleted after: a full backup
    convert+compare  ``qemu-img convert -O raw`` then ``qemu-img compare`` of image and copy
    checksum         ``sparsefs checksum -q IMAGE``
    verify           ``sparsefs verify -q IMAGE REF`` (REF: qemu's raw copy, in /dev/shm)
    compare          ``qemu-img compare -f qcow2 -F raw IMAGE REF``
    xxh128sum        ``xxh128sum REF``: REF is on /dev/shm, so this row is warm even cold

``convert`` (``qemu-img convert -O raw``) is the cp workloads' own contender.

This is a tool, not a test: it is never imported by the package or the tests.
"""

from __future__ import annotations

from pathlib import Path

from probes import window

GROUP = ("backup", "convert+compare", "checksum", "verify", "compare", "xxh128sum")
# checksum_bench.py's names of the commands it shares with the group.
_CHECKSUM_BENCH = {"compare": "qemu-img compare IMAGE COPY", "xxh128sum": "xxh128sum COPY"}


def run_member(
    who: str, image: Path, ref: Path, dest: Path, disk: str | None
) -> tuple[dict[str, float], Path | None]:
    """Run one member of the group once; its metrics and the copy it wrote, if any.

    Args:
        who: one of :data:`GROUP`.
        image: the qcow2 image.
        ref: qemu's raw copy of the image, on /dev/shm.
        dest: an empty directory on /dev/shm for the member's output; the caller
            removes it.
        disk: the disk holding the image (cold mode), for :func:`probes.window`.

    Returns:
        ``copy_s`` (wall seconds of the command) with the window's disk metrics, and
        the copy to check against ``ref`` (backup, convert+compare) or None.
    """
    # Imported here: backup_bench imports bench, the entry point, which imports this.
    import backup_bench
    import checksum_bench

    if who in _CHECKSUM_BENCH:
        cmd, ok_codes = checksum_bench.contenders(image, ref)[_CHECKSUM_BENCH[who]]
        with window(disk, None) as got:
            seconds, _ = checksum_bench.timed(cmd, ok_codes)
        out = None
    else:
        with window(disk, None) as got:
            seconds = backup_bench.run_one(who, image, dest, ref)
        out = backup_bench.output_of(who, dest, image)
    got["copy_s"] = seconds
    return got, out
