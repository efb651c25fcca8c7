"""Load on one mount: concurrent random readers and copiers get exact bytes, memory stays bounded.

One mount serves three images (64 KiB clusters, 4 KiB clusters, zstd
compressed).  Eight reader threads read random ranges of random files and
compare every byte with ``qemu-img convert -O raw``, dropping the page cache
of their file now and then (``posix_fadvise(DONTNEED)``) so that the daemon,
not the kernel, answers.  At the same time four ``cp --sparse=always`` run:
two of the same image, two of the others.  Everything must be exact, nothing
may hang (a generous timeout turns a deadlock into a failure), the daemon must
still serve afterwards, and its peak RSS (VmHWM) must stay under a bound that
does not grow with the bytes served.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
from pathlib import Path

import pytest

from support import (
    KiB,
    MiB,
    daemon_pid,
    files_equal,
    make_image,
    mounted,
    qemu_compress,
    qemu_raw,
)

READERS = 8
READS_PER_READER = int(os.environ.get("SPARSEFS_LOAD_READS", "250"))
DEADLOCK_TIMEOUT = 600  # seconds; only a hang comes near it
# Python and pyfuse3 (~40 MiB), the per-image caches (L2 tables and decompressed
# clusters, bounded by OpenOptions), a few MiB per worker thread: a leak of the
# bytes served (hundreds of MiB here) would blow through it.
RSS_BOUND = 128 * MiB


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, bytes]]:
    d = tmp_path_factory.mktemp("load")
    out: dict[str, Path] = {}
    out["disk64k"] = make_image(
        d / "disk64k.qcow2", 64 * MiB, seed=51, writes=60, max_len=768 * KiB
    )
    out["disk4k"] = make_image(
        d / "disk4k.qcow2",
        24 * MiB,
        seed=52,
        writes=50,
        options=["cluster_size=4096"],
        max_len=256 * KiB,
    )
    src = make_image(d / "src.qcow2", 24 * MiB, seed=53, writes=40, max_len=512 * KiB)
    out["zstd"] = qemu_compress(src, d / "zstd.qcow2", "zstd")
    return {k: (p, qemu_raw(p, d / f"{k}.raw").read_bytes()) for k, p in out.items()}


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    buf = b""
    while len(buf) < length:
        part = os.pread(fd, length - len(buf), offset + len(buf))
        if not part:
            break
        buf += part
    return buf


def _vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_concurrent_readers_and_copiers(
    images: dict[str, tuple[Path, bytes]], tmp_path: Path
) -> None:
    names = sorted(images)
    with mounted(tmp_path / "mnt", *(p for p, _ in images.values())) as mp:
        pid = daemon_pid(mp)
        assert pid is not None
        rss_before = _vm_hwm(pid)
        errors: list[str] = []

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            name = names[seed % len(names)]
            expected = images[name][1]
            fd = os.open(mp / f"{name}.raw", os.O_RDONLY)
            try:
                for i in range(READS_PER_READER):
                    if i % 16 == 0:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    length = rng.randrange(1, 1024 * KiB)
                    offset = rng.randrange(0, len(expected))
                    got = _pread_full(fd, length, offset)
                    if got != expected[offset : offset + length]:
                        errors.append(f"reader {seed}: {name} [{offset}, +{length}) differs")
                        return
            except OSError as exc:
                errors.append(f"reader {seed}: {name}: {exc}")
            finally:
                os.close(fd)

        copies = [("disk64k", 0), ("disk64k", 1), ("disk4k", 2), ("zstd", 3)]
        for name in names:
            fd = os.open(mp / f"{name}.raw", os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        cps = [
            subprocess.Popen(
                ["cp", "--sparse=always", str(mp / f"{name}.raw"), str(tmp_path / f"copy{i}.raw")],
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, i in copies
        ]
        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(READERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=DEADLOCK_TIMEOUT)
        hung = [t.name for t in threads if t.is_alive()]
        results = []
        for cp in cps:
            try:
                _, err = cp.communicate(timeout=DEADLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                cp.kill()
                _, err = cp.communicate()
                err = "hung: " + err
            results.append((cp.returncode, err))
        assert not hung, f"readers did not finish (deadlock?): {hung}"
        assert not errors, errors[:5]
        for (name, i), (code, err) in zip(copies, results, strict=True):
            assert code == 0, f"cp of {name}: {err}"
            assert files_equal(tmp_path / f"copy{i}.raw", mp / f"{name}.raw")
            assert files_equal(tmp_path / f"copy{i}.raw", images[name][0].with_suffix(".raw"))
        # Still serving, and memory did not follow the bytes served.
        assert (mp / "zstd.raw").stat().st_size == len(images["zstd"][1])
        rss = _vm_hwm(pid)
        print(f"daemon VmHWM: {rss_before / MiB:.1f} MiB before, {rss / MiB:.1f} MiB after")
        assert rss < RSS_BOUND, f"daemon peak RSS {rss / MiB:.1f} MiB"
