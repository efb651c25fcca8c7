"""A private libvirtd + virtlogd for the tests, and TCG domains on it.

The daemons run as root in a mount namespace of their own (``unshare``)
where /run, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and
/etc/libvirt are directories under a temporary root: their state, logs,
pid files and sockets collide with nothing on the machine.  libvirtd's
client socket is in that temporary root too, outside the namespace's view
of /run, so the tests (and sparsefs) reach it by ``qemu:///system?socket=``.
QEMU runs as root with no security driver (dynamic ownership off).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from points_support import latest_file, qemu_compare
from support import SPARSEFS, MiB, make_image, qemu_io, run

START_TIMEOUT = 30.0


@dataclass
class Libvirtd:
    """A running private daemon pair."""

    root: Path
    uri: str

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``virsh -c URI ARGS``."""
        proc = subprocess.run(
            ["virsh", "-c", self.uri, *args], capture_output=True, text=True, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {proc.stderr.strip()}")
        return proc


def _pids(root: Path) -> list[int]:
    pids = []
    files = [root / "libvirtd.pid", root / "virtlogd.pid"]
    files += sorted((root / "run" / "libvirt" / "qemu").glob("*.pid"))
    for path in files:
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(path.read_text().strip()))
    return pids


def _stop(daemon: Libvirtd) -> None:
    """Stop every domain, then the daemons (by their pid files); remove the root."""
    with contextlib.suppress(Exception):
        names = daemon.virsh("list", "--all", "--name", check=False).stdout.split()
        for name in names:
            daemon.virsh("destroy", name, check=False)
    qemu_pids = _pids(daemon.root)
    for pid in qemu_pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for pid in qemu_pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(daemon.root, ignore_errors=True)


def _configure(root: Path) -> None:
    for sub in ("run/libvirt", "lib", "cache", "log", "sock"):
        (root / sub).mkdir(parents=True)
    shutil.copytree("/etc/libvirt", root / "etc")
    (root / "etc" / "libvirtd.conf").write_text(
        f'unix_sock_dir = "{root}/sock"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
        'unix_sock_group = "root"\n'
    )
    (root / "etc" / "qemu.conf").write_text(
        'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
        'security_driver = "none"\n'
    )


@contextlib.contextmanager
def libvirtd() -> Iterator[Libvirtd]:
    """Start the private daemons; stop them and clean up after (also on failure).

    Raises:
        AssertionError: they could not be started (the message says why).
    """
    for tool in ("libvirtd", "virtlogd", "virsh", "unshare", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            raise AssertionError(f"{tool} is not installed: run tools/setup as root")
    if os.geteuid() != 0:
        raise AssertionError("the libvirt tests start libvirtd as root: run them as root")
    root = Path(tempfile.mkdtemp(prefix="sparsefs-libvirtd-"))
    daemon = Libvirtd(root, f"qemu:///system?socket={root}/sock/libvirt-sock")
    try:
        _configure(root)
        binds = {
            "run": "/run",
            "lib": "/var/lib/libvirt",
            "cache": "/var/cache/libvirt",
            "log": "/var/log/libvirt",
            "etc": "/etc/libvirt",
        }
        script = " && ".join(f"mount --bind {root}/{src} {dst}" for src, dst in binds.items())
        script += f" && virtlogd -d -p {root}/virtlogd.pid"
        script += f" && exec libvirtd -d -f {root}/etc/libvirtd.conf -p {root}/libvirtd.pid"
        proc = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
        if proc.returncode != 0:
            raise AssertionError(f"libvirtd could not be started: {proc.stderr.strip()}")
        deadline = time.monotonic() + START_TIMEOUT
        while daemon.virsh("version", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"libvirtd did not answer on {daemon.uri} within {START_TIMEOUT:.0f} s"
                )
            time.sleep(0.1)
        yield daemon
    finally:
        _stop(daemon)


DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='{qcow2}'/><target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/><source file='{raw}'/><target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/><target dev='hdc' bus='ide'/><readonly/>
    </disk>
  </devices>
</domain>
"""


def define_domain(daemon: Libvirtd, name: str, qcow2: Path, raw: Path, start: bool = True) -> None:
    """Define (and start) a TCG domain: vda the qcow2, vdb the raw file, an empty CD-ROM."""
    xml = qcow2.parent / f"{name}.xml"
    xml.write_text(DOMAIN_XML.format(name=name, qcow2=qcow2, raw=raw))
    daemon.virsh("define", str(xml))
    if start:
        daemon.virsh("start", name)


def monitor_write(daemon: Libvirtd, name: str, disk: int, command: str) -> None:
    """Run a qemu-io command on the domain's virtio-disk``disk`` through the monitor."""
    path = f"/machine/peripheral/virtio-disk{disk}/virtio-backend"
    out = daemon.virsh("qemu-monitor-command", name, "--hmp", f'qemu-io -d {path} "{command}"')
    assert "error" not in out.stdout.lower(), out.stdout
    assert "failed" not in out.stdout.lower(), out.stdout


def blklist(daemon: Libvirtd, name: str) -> list[tuple[str, str]]:
    """``virsh domblklist``: (target, source) rows."""
    out = daemon.virsh("domblklist", name).stdout.splitlines()[2:]
    return [(row.split()[0], row.split()[1]) for row in out if row.strip()]


def checkpoints(daemon: Libvirtd, name: str) -> list[str]:
    """``virsh checkpoint-list --name``."""
    return sorted(daemon.virsh("checkpoint-list", name, "--name").stdout.split())


def wait_unlocked(dest: Path, timeout: float = 60.0) -> None:
    """Wait until no process (a killed run's guardian) holds the set's lock."""
    deadline = time.monotonic() + timeout
    fd = os.open(dest / ".SPARSEFS-SET.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{dest}: the set stayed locked {timeout} s") from None
                time.sleep(0.05)
    finally:
        os.close(fd)


TARGETS = {"vda": 0, "vdb": 1}


def make_disks(tmp: Path) -> tuple[Path, Path]:
    """vda: a 128 MiB qcow2 with random data; vdb: a 64 MiB sparse raw file with some."""
    qcow2 = make_image(tmp / "vm-a.qcow2", 128 * MiB, seed=3, writes=40, max_len=4 * MiB)
    raw = tmp / "vm-b.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", str(raw), str(64 * MiB)])
    qemu_io(raw, "write -q -P 0x21 0 3M", "write -q -P 0x22 40M 5M", fmt="raw")
    return qcow2, raw


def write_round(daemon: Libvirtd, name: str, rng: random.Random) -> None:
    """Random data and zero writes on both disks through the monitor, then flush."""
    for disk, size in ((0, 128 * MiB), (1, 64 * MiB)):
        for _ in range(6):
            length = rng.choice((4096, 65536, 300 * 1024, MiB))
            offset = rng.randrange(0, size - length) // 512 * 512
            zero = rng.random() < 0.25
            what = "-z" if zero else f"-P {rng.randrange(1, 256)}"
            monitor_write(daemon, name, disk, f"write {what} {offset} {length}")
        monitor_write(daemon, name, disk, "flush")


def reference(daemon: Libvirtd, name: str, out: Path) -> dict[str, Path]:
    """Each disk as it is now: paused, flushed, ``qemu-img convert -U``, resumed."""
    out.mkdir()
    daemon.virsh("suspend", name)
    refs = {}
    try:
        for target, source in blklist(daemon, name):
            if target in TARGETS:
                monitor_write(daemon, name, TARGETS[target], "flush")
                refs[target] = out / f"{target}.raw"
                run(["qemu-img", "convert", "-U", "-O", "raw", source, str(refs[target])])
    finally:
        daemon.virsh("resume", name)
    return refs


def backup_run(
    daemon: Libvirtd, name: str, dest: Path, rng: random.Random | None
) -> tuple[subprocess.CompletedProcess[str], bool]:
    """``backup --domain``; with ``rng``, write while the domain is on its overlays."""
    cmd = [*SPARSEFS, "backup", "--domain", name, "--connect", daemon.uri, str(dest)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    windowed = False
    while rng is not None and proc.poll() is None and not windowed:
        if any(".sparsefs-" in source for _, source in blklist(daemon, name)):
            write_round(daemon, name, rng)
            windowed = True
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), windowed


def check_points(dest: Path, name: str, refs: dict[str, Path]) -> None:
    for target, ref in refs.items():
        point = latest_file(dest, f"{name}-{target}")
        assert qemu_compare(point, ref), f"{point} differs from the disk at its instant"


def runs(dest: Path, name: str) -> list[dict[str, object]]:
    doc = json.loads((dest / f"{name}.libvirt.json").read_text())
    out: list[dict[str, object]] = doc["runs"]
    return out


def stderr_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in proc.stderr
    return [line for line in proc.stderr.splitlines() if line.strip()]


def check_domain_state(daemon: Libvirtd, name: str, dest: Path, before: object) -> None:
    """On its original files, running, no overlay file, checkpoints = the newest run's."""
    assert blklist(daemon, name) == before
    assert daemon.virsh("domstate", name).stdout.strip() == "running"
    newest = runs(dest, name)[-1]["checkpoint"]
    assert checkpoints(daemon, name) == ([newest] if newest else [])
    disk_dir = Path(dict(blklist(daemon, name))["vda"]).parent
    assert not list(disk_dir.glob(".*.sparsefs-*"))
