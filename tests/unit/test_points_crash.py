"""SIGKILL of a backup run at random moments: earlier points intact, the next run succeeds.

The run is forked from the test process (no interpreter start-up per seed) with
the file-changing calls of ``os`` wrapped: at the N-th one (N random per seed,
up to the number a whole run makes) the child kills itself with SIGKILL before
the call.  Afterwards every point of the manifest must still hash to its
digest, and a plain next run (no ``--full``) must add a verified point, equal
to the image, with nothing of the killed run left behind.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from points_support import manifest, qemu_check, qemu_compare
from sparsefs.checksum import block_digest
from sparsefs.cli import main
from sparsefs.formats import opened
from support import MiB, make_image, qemu_io, qemu_raw, run

SIZE = 16 * MiB
SEEDS = 24
_CALLS = ("pwrite", "fsync", "rename", "replace", "unlink", "ftruncate", "mkdir", "rmdir")


def _run_child(args: list[str], kill_at: int | None, report: int | None = None) -> int:
    """Fork a ``sparsefs ARGS`` run; kill it before its ``kill_at``-th file-changing call.

    Returns the wait status.  With ``report``, the child writes its call count there.
    """
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        return status
    code = 70
    try:
        calls = [0]

        def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(*a: Any, **k: Any) -> Any:
                calls[0] += 1
                if kill_at is not None and calls[0] >= kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*a, **k)

            return wrapped

        for name in _CALLS:
            setattr(os, name, wrap(getattr(os, name)))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        code = main(args)
        if report is not None:
            os.write(report, str(calls[0]).encode())
    finally:
        os._exit(code)


def _check_points(dest: Path) -> None:
    """Every point the manifest names reads back with its digest."""
    for disk in manifest(dest)["disks"].values():
        for point in disk["points"]:
            with opened(str(dest / point["file"]), point["format"]) as source:
                assert block_digest(source).digest == point["digest"], point["file"]


def _no_leftovers(dest: Path) -> None:
    named = set()
    for disk in manifest(dest)["disks"].values():
        for point in disk["points"]:
            named |= {Path(point["file"]).name, Path(point["blocks"]).name}
    assert set(os.listdir(dest / "vm")) == named
    assert not [n for n in os.listdir(dest) if re.search(r"\.tmp-\d+$", n)]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image with a bitmap and a set holding one full point of it."""
    root = tmp_path_factory.mktemp("crash-template")
    image = make_image(root / "vm.qcow2", SIZE, seed=3, writes=24, max_len=MiB)
    dest = root / "set"
    dest.mkdir()
    assert main(["backup", "-q", str(image), str(dest)]) == 0
    run(["qemu-img", "bitmap", "--add", str(image), "b"])
    return root


def _calls_of_a_run(args: list[str]) -> int:
    read_end, write_end = os.pipe()
    status = _run_child(args, None, report=write_end)
    os.close(write_end)
    count = int(os.read(read_end, 64) or b"0")
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    return count


@pytest.mark.parametrize("mode", ["digest", "bitmap", "first"])
def test_sigkill_at_random_moments(
    mode: str, template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(f"crash-{mode}")
    totals: dict[str, int] = {}
    for seed in range(SEEDS // 3):
        work = tmp_path / f"seed{seed}"
        shutil.copytree(template, work)
        image, dest = work / "vm.qcow2", work / "set"
        if mode == "first":  # the killed run is the disk's first, full point
            shutil.rmtree(dest)
            dest.mkdir()
        cmds = [f"write -q -P {seed + 1} {rng.randrange(0, SIZE - MiB, 4096)} 300k"]
        cmds.append(f"write -q -z {rng.randrange(0, SIZE - MiB, 65536)} 128k")
        qemu_io(image, *cmds)
        since = ["--since", "b"] if mode == "bitmap" else []
        args = ["backup", *since, str(image), str(dest)]
        if mode not in totals:  # how many calls a whole run makes, on a copy
            probe = tmp_path / "probe"
            shutil.copytree(work, probe)
            probe_args = ["backup", *since, str(probe / "vm.qcow2"), str(probe / "set")]
            totals[mode] = _calls_of_a_run(probe_args)
            shutil.rmtree(probe)
        before = manifest(dest) if (dest / "SPARSEFS-SET.json").exists() else None
        kill_at = rng.randint(1, totals[mode])
        status = _run_child(args, kill_at)
        assert os.WIFSIGNALED(status) or os.waitstatus_to_exitcode(status) == 0
        if os.WIFSIGNALED(status):
            assert os.WTERMSIG(status) == signal.SIGKILL
        if before is not None:
            after = manifest(dest)["disks"]["vm"]["points"]
            earlier = before["disks"]["vm"]["points"]
            assert after[: len(earlier)] == earlier
        if (dest / "SPARSEFS-SET.json").exists():
            _check_points(dest)
        # The next run, as cron would start it: no --full.
        assert main(["backup", "-q", str(image), str(dest)]) == 0, capsys.readouterr().err
        _check_points(dest)
        _no_leftovers(dest)
        newest = dest / manifest(dest)["disks"]["vm"]["points"][-1]["file"]
        assert qemu_compare(newest, qemu_raw(image, work / "ref.raw"))
        if newest.suffix == ".qcow2":
            qemu_check(newest)
        shutil.rmtree(work)
