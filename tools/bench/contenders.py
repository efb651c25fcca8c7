"""The contenders: mounting sparsefs and qemu-storage-daemon, the copies through them
(cp, rsync, cat), ``qemu-img convert`` and the backup/checksum group (group.py), each
measured with what the daemons cost (CPU, peak RSS) and, cold, what the disk did.

This is a tool, not a test: it is never imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    REPO,
    MiB,
    compact_memory,
    data_segments,
    drop_caches,
    log,
    run,
    same_content,
    timed,
)
from group import GROUP, run_member
from probes import cpu_seconds, cpus_allowed, is_mounted, peak_rss, process_alive, window
from workloads import Workload, image_format


def wait_gone(pid: int | None, mountpoint: Path, timeout: float = 30.0) -> None:
    """Wait until the daemon exited and the mount is gone; force the unmount if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (pid is None or not process_alive(pid)) and not is_mounted(mountpoint):
            return
        time.sleep(0.01)
    log(f"{mountpoint}: daemon did not exit, unmounting lazily")
    subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
    if pid is not None and process_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def daemon_pid(mountpoint: Path) -> int | None:
    """PID of the sparsefs daemon serving ``mountpoint`` (found by its command line)."""
    target = str(mountpoint)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                words = [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
        except OSError:
            continue
        if "sparsefs" in words and "mount" in words and target in words:
            found.append(int(entry))
    live = [p for p in found if process_alive(p)]
    return max(live) if live else None


def seek_walk(path: Path) -> int:
    """Walk a file with SEEK_DATA/SEEK_HOLE to the end; return the lseek calls made."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        segments = data_segments(fd, size)
    finally:
        os.close(fd)
    # Two calls a segment, and a last SEEK_DATA (ENXIO) unless data ends the file.
    end = segments[-1][1] if segments else 0
    return 2 * len(segments) + (end < size)


# -- mounts ----------------------------------------------------------------------------


@dataclass
class Mounted:
    """A live mount: the raw file to read, the daemon, how long the mount took."""

    file: Path
    pid: int | None
    ready_s: float


@contextlib.contextmanager
def sparsefs_mount(image: Path, base: Path, extra: Sequence[str]) -> Iterator[Mounted]:
    """``sparsefs mount IMAGE MP`` (timed until the command returns); always unmounts."""
    mp = Path(tempfile.mkdtemp(prefix="sparsefs-", dir=base))
    cmd = [sys.executable, "-m", "sparsefs", "mount", *extra, str(image), str(mp)]
    pid = None
    try:
        t0 = time.perf_counter()
        run(cmd, cwd=REPO)
        ready = time.perf_counter() - t0
        pid = daemon_pid(mp)
        yield Mounted(mp / f"{image.stem}.raw", pid, ready)
    finally:
        if is_mounted(mp):
            subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        wait_gone(pid, mp)
        with contextlib.suppress(OSError):
            mp.rmdir()


@contextlib.contextmanager
def qsd_mount(image: Path, base: Path) -> Iterator[Mounted]:
    """qemu-storage-daemon's FUSE export of IMAGE onto a file; always stopped."""
    work = Path(tempfile.mkdtemp(prefix="qsd-", dir=base))
    export = work / "export.raw"
    export.touch()
    pidfile = work / "qsd.pid"
    cmd = [
        "qemu-storage-daemon", "--daemonize", "--pidfile", str(pidfile),
        "--blockdev", f"driver=file,node-name=f,filename={image},read-only=on",
        "--blockdev", f"driver={image_format(image)},node-name=q,file=f,read-only=on",
        "--export", f"type=fuse,id=e,node-name=q,mountpoint={export}",
    ]  # fmt: skip
    pid = None
    try:
        t0 = time.perf_counter()
        run(cmd)
        ready = time.perf_counter() - t0
        pid = int(pidfile.read_text().strip())
        yield Mounted(export, pid, ready)
    finally:
        if pid is not None and process_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        wait_gone(pid, export)
        shutil.rmtree(work, ignore_errors=True)


# -- running ---------------------------------------------------------------------------


@dataclass
class Samples:
    """Per-round measurements of one contender on one workload, by metric."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, metric: str, value: float) -> None:
        self.values.setdefault(metric, []).append(value)

    def add_all(self, metrics: dict[str, float]) -> None:
        for metric, value in metrics.items():
            self.add(metric, value)

    def median(self, metric: str) -> float | None:
        vals = self.values.get(metric)
        return statistics.median(vals) if vals else None


@dataclass
class Bench:
    """One benchmark run: options, work directories, results.

    ``disk`` (cold mode): the disk holding the images, whose counters every timed
    command is measured with; ``pins``: the CPUs each daemon was seen allowed on.
    """

    args: argparse.Namespace
    work_dir: Path
    mount_base: Path
    out_dir: Path
    results: dict[str, dict[str, Samples]] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    disk: str | None = None
    pins: dict[str, str] = field(default_factory=dict)

    def out_path(self, name: str) -> Path:
        return self.out_dir / name

    def check(self, wl: str, who: str, out: Path, ref: Path, first_round: bool) -> None:
        if first_round and not self.args.no_verify:
            problem = same_content(out, ref)
            if problem is not None:
                raise SystemExit(f"bench: {wl} {who}: the copy is wrong: {problem}")

    def run_contender(self, wl: Workload, who: str, image: Path, ref: Path, rnd: int) -> None:
        """One round of one contender; cold mode drops the page cache first."""
        samples = self.results.setdefault(wl.name, {}).setdefault(who, Samples())
        if self.args.cold:
            drop_caches(strict=True)
        compact_memory()
        if who in GROUP:
            self.run_member(wl.name, who, image, ref, rnd, samples)
            return
        out = self.out_path(f"{wl.name}-{who.replace('+', '-')}.raw")
        out.unlink(missing_ok=True)
        try:
            if who == "convert":
                cmd = ["qemu-img", "convert", "-f", image_format(image), "-O", "raw"]
                with window(self.disk, None) as got:
                    samples.add("copy_s", timed([*cmd, str(image), str(out)]))
                samples.add_all(got)
                self.check(wl.name, who, out, ref, rnd == 0)
            else:
                self.through_mount(wl.name, who, image, out, ref, rnd, samples)
        finally:
            out.unlink(missing_ok=True)

    def run_member(
        self, wl: str, who: str, image: Path, ref: Path, rnd: int, samples: Samples
    ) -> None:
        """A member of the backup/checksum group, writing into a fresh directory."""
        dest = Path(tempfile.mkdtemp(prefix=f"{wl}-{who.replace('+', '-')}-", dir=self.out_dir))
        try:
            got, out = run_member(who, image, ref, dest, self.disk)
            samples.add_all(got)
            if out is not None:
                self.check(wl, who, out, ref, rnd == 0)
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    def through_mount(
        self, wl: str, who: str, image: Path, out: Path, ref: Path, rnd: int, samples: Samples
    ) -> None:
        """cp, rsync or cat of the file of a fresh sparsefs or qemu-storage-daemon mount."""
        system, tool = who.split("+")
        mount: Callable[[], contextlib.AbstractContextManager[Mounted]]
        if system == "sparsefs":
            mount = lambda: sparsefs_mount(image, self.mount_base, self.args.sparsefs_opt)  # noqa: E731  # deferred, like its twin below
        else:
            mount = lambda: qsd_mount(image, self.mount_base)  # noqa: E731  # deferred mount
        with mount() as m:
            samples.add("mount_s", m.ready_s)
            if wl == "W3":
                t0 = time.perf_counter()
                calls = seek_walk(m.file)
                samples.add("walk_s", time.perf_counter() - t0)
                self.info.setdefault(wl, {})["lseek_calls"] = calls
            if tool == "cp":
                cmd = ["cp", "--sparse=always", str(m.file), str(out)]
            elif tool == "cat":
                cmd = ["sh", "-c", f"cat {shlex.quote(str(m.file))} > /dev/null"]
            else:
                cmd = ["rsync", "--sparse", str(m.file), str(out)]
            with window(self.disk, m.pid) as got:
                samples.add("copy_s", timed(cmd))
            samples.add_all(got)
            if m.pid is not None:
                self.daemon_costs(system, m.pid, samples)
            # Untimed, after the CPU sample: what cat read must be the image's bytes.
            verify_cat = tool == "cat" and rnd == 0 and not self.args.no_verify
            if verify_cat and subprocess.run(["cmp", "-s", str(m.file), str(ref)]).returncode:
                raise SystemExit(f"bench: {wl} {who}: the bytes read are wrong")
        if tool != "cat":
            self.check(wl, who, out, ref, rnd == 0)

    def daemon_costs(self, system: str, pid: int, samples: Samples) -> None:
        """Peak RSS and CPU over the daemon's life so far; the CPUs it may run on."""
        rss = peak_rss(pid)
        if rss is not None:
            samples.add("rss_mib", rss / MiB)
        cpu = cpu_seconds(pid)
        if cpu is not None:
            samples.add("cpu_s", cpu)
        cpus = cpus_allowed(pid)
        if cpus is not None:
            self.pins[system] = cpus
