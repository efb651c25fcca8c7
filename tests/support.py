"""Test support: build images with qemu's tools, ask qemu for the truth, mount safely.

The oracle is always live: ``qemu-img convert -O raw`` for bytes and
``qemu-img map --output=json`` for the data/hole map.  Nothing here records an
expected answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPARSEFS = [sys.executable, "-m", "sparsefs"]
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def num(value: object) -> int:
    """A number from qemu's JSON (typed ``object``): asserted to be an int."""
    assert isinstance(value, int), value
    return value


def run(cmd: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command; fail the test with its stderr when it fails."""
    proc: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]  # kwargs: subprocess.run's own
        list(cmd), capture_output=True, text=True, **kwargs
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def sparsefs(*args: str, check: bool = False, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run the sparsefs command line (this checkout) and return the completed process."""
    proc: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]  # kwargs: subprocess.run's own
        [*SPARSEFS, *args], capture_output=True, text=True, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sparsefs {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


# -- building images ---------------------------------------------------------------


def qemu_img_create(
    path: Path | str,
    size: int | str | None,
    *options: str,
    fmt: str = "qcow2",
    backing: Path | str | None = None,
    backing_fmt: str | None = "qcow2",
    cwd: Path | None = None,
) -> Path:
    """``qemu-img create -f FMT [-b BACKING [-F BACKING_FMT]] [-o opt]... PATH [SIZE]``.

    ``backing`` is passed as given (a relative name stays relative, as qemu
    stores it); ``backing_fmt`` None leaves the backing format to probing;
    ``size`` None takes the backing file's.  Runs in ``cwd`` when given, and
    returns the image's path (joined to ``cwd`` when relative).
    """
    cmd = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        cmd += ["-b", str(backing)]
        if backing_fmt is not None:
            cmd += ["-F", backing_fmt]
    for opt in options:
        cmd += ["-o", opt]
    cmd.append(str(path))
    if size is not None:
        cmd.append(str(size))
    run(cmd, cwd=cwd)
    return Path(path) if cwd is None else cwd / path


def qemu_io(
    path: Path | str, *commands: str, fmt: str = "qcow2", extra: Sequence[str] = ()
) -> None:
    """Run qemu-io commands (``write -P 0xab 0 64k`` ...) against an image, in one process."""
    if not commands:
        return
    cmd = ["qemu-io", "-f", fmt, *extra]
    for c in commands:
        cmd += ["-c", c]
    run([*cmd, str(path)])


def random_writes(
    rng: random.Random,
    size: int,
    count: int,
    *,
    max_len: int = 256 * KiB,
    align: int = 512,
) -> list[tuple[int, int]]:
    """``count`` (offset, length) pairs at random offsets inside ``size``, aligned."""
    out = []
    for _ in range(count):
        length = rng.randrange(align, max_len + 1, align)
        offset = rng.randrange(0, max(align, size - length), align)
        out.append((offset, min(length, size - offset)))
    return out


def make_image(
    path: Path | str,
    size: int,
    *,
    seed: int,
    options: Sequence[str] = (),
    writes: int = 20,
    zero_writes: int = 4,
    discards: int = 4,
    max_len: int = 256 * KiB,
    backing: str | None = None,
    backing_fmt: str | None = None,
) -> Path:
    """A qcow2 image with random-pattern writes, zero writes and discards at random offsets.

    Data writes use ``write -P`` with a pattern per write; a ``-s`` seeded file
    write would need a file, so the patterns vary by write to catch misplaced
    clusters.  Zero writes and discards exercise the zero flag and unallocation.
    """
    qemu_img_create(path, size, *options, backing=backing, backing_fmt=backing_fmt)
    rng = random.Random(seed)
    commands = []
    for offset, length in random_writes(rng, size, writes, max_len=max_len):
        commands.append(f"write -q -P {rng.randrange(1, 256)} {offset} {length}")
    for offset, length in random_writes(rng, size, zero_writes, max_len=max_len):
        commands.append(f"write -q -z {offset} {length}")
    for offset, length in random_writes(rng, size, discards, max_len=max_len):
        commands.append(f"discard -q {offset} {length}")
    qemu_io(path, *commands)
    return Path(path)


def make_encrypted_image(path: Path | str, method: str = "luks", size: int = MiB) -> Path:
    """A qcow2 image encrypted with ``method`` ("luks" or "aes"), made by qemu-img.

    LUKS creation times its key derivation by thread CPU time and sometimes
    fails ("Unable to get accurate CPU usage"); each try is quick, so retry.
    """
    options = f"encrypt.format={method},encrypt.key-secret=sec0"
    if method == "luks":
        options += ",encrypt.iter-time=10"
    cmd = [
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=x",
        "-o",
        options,
        str(path),
        str(size),
    ]
    for _ in range(20):
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            return Path(path)
    run(cmd)
    return Path(path)


# -- the oracle ---------------------------------------------------------------------


def qemu_compress(src: Path | str, dst: Path | str, compression: str = "zlib") -> Path:
    """``qemu-img convert -c``: ``src`` (qcow2) as a compressed qcow2 ``dst``."""
    run(
        [
            "qemu-img",
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            f"compression_type={compression}",
            str(src),
            str(dst),
        ]
    )
    return Path(dst)


def qemu_raw(
    image: Path | str, out: Path | str, *, snapshot: str | None = None, fmt: str | None = None
) -> Path:
    """``qemu-img convert -O raw`` of an image (or one of its snapshots) to ``out``."""
    cmd = ["qemu-img", "convert", "-O", "raw"]
    if fmt:
        cmd += ["-f", fmt]
    if snapshot is not None:
        cmd += ["-l", snapshot]  # qemu-img reads a plain word as an id or a name
    run([*cmd, str(image), str(out)])
    return Path(out)


def qemu_map(image: Path | str, *, fmt: str | None = None) -> list[dict[str, object]]:
    """``qemu-img map --output=json`` of an image."""
    cmd = ["qemu-img", "map", "--output=json"]
    if fmt:
        cmd += ["-f", fmt]
    out = run([*cmd, str(image)]).stdout
    result: list[dict[str, object]] = json.loads(out)
    return result


def files_equal(a: Path | str, b: Path | str, chunk: int = 8 * MiB) -> bool:
    """True when two files have the same length and bytes."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(chunk)
            y = fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def first_difference(a: Path | str, b: Path | str, chunk: int = MiB) -> int | None:
    """Offset of the first differing byte (or of the shorter file's end), else None."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            x = fa.read(chunk)
            y = fb.read(chunk)
            if x != y:
                for i, (p, q) in enumerate(zip(x, y, strict=False)):
                    if p != q:
                        return pos + i
                return pos + min(len(x), len(y))
            if not x:
                return None
            pos += len(x)


def seek_walk(path: Path | str) -> list[tuple[int, int]]:
    """The data segments [(start, end)] of a file by SEEK_DATA/SEEK_HOLE, as copiers see them."""
    segments = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == 6, f"SEEK_DATA at {pos}: {exc}"  # ENXIO: no more data
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            assert data < hole <= size, (data, hole, size)
            segments.append((data, hole))
            pos = hole
    finally:
        os.close(fd)
    return segments


def check_map_agrees(segments: list[tuple[int, int]], qmap: list[dict[str, object]]) -> None:
    """Assert that data segments agree with a qemu-img map by the project's rule.

    qemu's ``"data": false`` ranges must be holes; ``"data": true, "zero": false``
    ranges must be data; ranges qemu marks both data and zero may be either.
    """
    import bisect

    starts = [s for s, _ in segments]

    def covered(lo: int, hi: int) -> int:
        """Bytes of [lo, hi) inside data segments."""
        total = 0
        i = max(0, bisect.bisect_right(starts, lo) - 1)
        while i < len(segments) and segments[i][0] < hi:
            s, e = segments[i]
            total += max(0, min(e, hi) - max(s, lo))
            i += 1
        return total

    for entry in qmap:
        lo = num(entry["start"])
        hi = lo + num(entry["length"])
        got = covered(lo, hi)
        if not entry["data"]:
            assert got == 0, f"qemu says hole at [{lo}, {hi}), sparsefs reports {got} data bytes"
        elif not entry["zero"]:
            assert got == hi - lo, (
                f"qemu says data at [{lo}, {hi}), sparsefs reports only {got} data bytes"
            )


def qemu_data_bytes(qmap: list[dict[str, object]], *, include_zero: bool = False) -> int:
    """Bytes qemu-img map reports as data (optionally counting data+zero ranges)."""
    return sum(num(e["length"]) for e in qmap if e["data"] and (include_zero or not e["zero"]))


def fiemap_written(path: Path | str) -> list[tuple[int, int]]:
    """Written byte ranges of a host file, by FIEMAP with FIEMAP_FLAG_SYNC (``filefrag -s``).

    Unwritten (fallocated, never written) extents and holes are left out;
    touching ranges are merged.  ``filefrag`` is the independent oracle for
    what the host file stores.
    """
    out = run(["filefrag", "-s", "-v", "-b1", str(path)]).stdout
    ranges: list[tuple[int, int]] = []
    for line in out.splitlines():
        fields = line.replace("..", " ").replace(":", " ").split()
        if len(fields) < 6 or not fields[0].isdigit() or "unwritten" in line:
            continue
        start, end = int(fields[1]), int(fields[2]) + 1  # logical, bytes (-b1)
        if ranges and ranges[-1][1] >= start:
            ranges[-1] = (ranges[-1][0], max(end, ranges[-1][1]))
        else:
            ranges.append((start, end))
    return ranges


def host_files_of(
    image: Path | str, *, cwd: Path | None = None, fmt: str | None = None, no_backing: bool = False
) -> list[Path]:
    """The host file that holds each layer's data (its data file, if external), top first."""
    cmd = ["qemu-img", "info", "--output=json", "--backing-chain"]
    if fmt:
        cmd += ["-f", fmt]
    chain = json.loads(run([*cmd, str(image)], cwd=cwd).stdout)
    base = Path(cwd or ".")
    files = []
    for layer in chain[:1] if no_backing else chain:
        spec = (layer.get("format-specific") or {}).get("data") or {}
        files.append((base / (spec.get("data-file") or layer["filename"])).resolve())
    return files


def stored_segments(
    qmap: list[dict[str, object]], host_files: Sequence[Path]
) -> list[tuple[int, int]]:
    """Guest ranges some layer stores, by the project's rule, merged.

    qemu-img map's ``"data": true, "zero": false`` ranges, cut down to where
    the layer's host file has written bytes (FIEMAP, :func:`fiemap_written`);
    a range without a host offset (compressed) is stored whole.  ``zero`` or
    not-``data`` ranges are never stored.  Bytes past the host file's end
    count as written.
    """
    written = {d: fiemap_written(f) for d, f in enumerate(host_files)}
    sizes = {d: os.path.getsize(f) for d, f in enumerate(host_files)}
    out: list[tuple[int, int]] = []

    def add(lo: int, hi: int) -> None:
        if hi <= lo:
            return
        if out and out[-1][1] >= lo:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))

    for e in qmap:
        if not e["data"] or e["zero"]:
            continue
        start, length = num(e["start"]), num(e["length"])
        if "offset" not in e:
            add(start, start + length)
            continue
        host = num(e["offset"])
        depth = num(e["depth"])
        pieces = [*written[depth], (sizes[depth], max(sizes[depth], host + length))]
        for ws, we in pieces:
            lo, hi = max(ws, host), min(we, host + length)
            add(start + lo - host, start + hi - host)
    return out


def check_stored(
    segments: Sequence[tuple[int, int]], qmap: list[dict[str, object]], host_files: Sequence[Path]
) -> None:
    """Assert that the data segments are exactly :func:`stored_segments` (merged)."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(segments):
        if merged and merged[-1][1] >= lo:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        elif hi > lo:
            merged.append((lo, hi))
    expected = stored_segments(qmap, host_files)
    assert merged == expected, (
        f"data segments differ from qemu map + FIEMAP: first difference "
        f"{next(((a, b) for a, b in zip(merged, expected, strict=False) if a != b), None)}, "
        f"{len(merged)} vs {len(expected)} segments"
    )


def oracle_data_bytes(image: Path | str, *, fmt: str | None = None) -> int:
    """Bytes a sparse copy of ``image`` stores, by :func:`stored_segments`."""
    segs = stored_segments(qemu_map(image, fmt=fmt), host_files_of(image, fmt=fmt))
    return sum(e - s for s, e in segs)


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert a failed command printed exactly one error line, no traceback, holding ``needles``."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- mounting -------------------------------------------------------------------------


def is_mounted(path: Path | str) -> bool:
    """True when ``path`` is a mount point listed in /proc/self/mounts."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def force_unmount(mountpoint: Path | str) -> None:
    """Unmount whatever is at ``mountpoint``, lazily if it is busy; never raises."""
    for cmd in (
        ["fusermount3", "-u", str(mountpoint)],
        ["fusermount3", "-uz", str(mountpoint)],
        ["umount", "-l", str(mountpoint)],
    ):
        if not is_mounted(mountpoint):
            return
        subprocess.run(cmd, capture_output=True)


@contextlib.contextmanager
def mounted(
    mountpoint: Path | str, *images: Path | str, options: Sequence[str] = ()
) -> Iterator[Path]:
    """``sparsefs mount [options] IMAGE... MOUNTPOINT`` for the ``with`` body; always unmounts."""
    mp = Path(mountpoint)
    mp.mkdir(parents=True, exist_ok=True)
    proc = sparsefs("mount", *options, *map(str, images), str(mp))
    try:
        if proc.returncode != 0:
            raise AssertionError(f"sparsefs mount failed ({proc.returncode}): {proc.stderr}")
        assert is_mounted(mp), "sparsefs mount returned before the mount was ready"
        yield mp
    finally:
        if is_mounted(mp):
            sparsefs("umount", str(mp))
        deadline = time.monotonic() + 10
        while is_mounted(mp) and time.monotonic() < deadline:
            time.sleep(0.05)
        force_unmount(mp)


def mount_entry(mountpoint: Path | str) -> tuple[str, list[str]]:
    """(file system type, mount options) of the mount at ``mountpoint``, from /proc/self/mounts."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == target:
                return fields[2], fields[3].split(",")
    raise AssertionError(f"{mountpoint} is not mounted")


def daemon_pid(mountpoint: Path | str) -> int | None:
    """PID of the sparsefs daemon serving ``mountpoint`` (by its command line)."""
    target = str(mountpoint)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in argv if w]
        if "sparsefs" in " ".join(words) and target in words and "umount" not in words:
            return int(entry)
    return None
