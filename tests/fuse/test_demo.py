"""The README's first command runs the whole job on the embedded demo image."""

from __future__ import annotations

import re
from pathlib import Path

from support import run, sparsefs


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = sparsefs("demo", "--workdir", str(work))
    assert proc.returncode == 0, proc.stderr
    assert "identical content" in proc.stdout
    m = re.search(r"bytes stored by the copy (\d+) MiB", proc.stdout)
    assert m is not None
    assert int(m.group(1)) < 200
    # The demo's claims hold: qemu-img compare (hole-aware) finds the copy equal to the image.
    run(
        [
            "qemu-img",
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            str(work / "demo.qcow2"),
            str(work / "demo-backup.raw"),
        ]
    )
    assert not any(str(work) in line for line in Path("/proc/self/mounts").read_text().splitlines())
