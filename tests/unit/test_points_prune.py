"""Prune over a real set: kept points read exactly as their night, and a killed prune is harmless.

The set is made over nine nights by the run API with a faked clock (two
chains: a full raw point with four deltas, then a full qcow2 point with three
deltas; qemu-io writes, zero writes and discards between nights; one night's
``qemu-img convert -O raw`` kept per point).  After a prune every kept point
must equal its night (``qemu-img compare``), every qcow2 point pass ``qemu-img
check``, ``checksum --check SPARSEFS-SUMS`` pass, ``list`` find nothing
damaged, and nothing but the kept points' files remain.  SIGKILL at random
moments (real time: the run is forked and killed after a seeded delay within
the length of a whole run) must leave every point the manifest names
verifiable, and a second prune must finish the job.
"""

from __future__ import annotations

import calendar
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from points_support import list_json, manifest, qemu_check, qemu_compare
from sparsefs.checksum import block_digest
from sparsefs.cli import main
from sparsefs.formats import opened
from sparsefs.points.policy import Rules
from sparsefs.points.prune import plan
from sparsefs.points.run import RunOptions, add_point
from sparsefs.points.set import BackupSet
from support import MiB, make_image, qemu_io, qemu_raw, run, sparsefs

SIZE = 32 * MiB
# (day of December 2026, hour, options of the run)
NIGHTS = [
    (1, 2, RunOptions()),
    (2, 2, RunOptions()),
    (2, 14, RunOptions()),
    (3, 2, RunOptions()),
    (3, 14, RunOptions()),
    (10, 2, RunOptions(full=True, fmt="qcow2")),
    (10, 14, RunOptions()),
    (11, 2, RunOptions()),
    (12, 2, RunOptions()),
]
CRASH_SEEDS = 24


def _night(image: Path, rng: random.Random, night: int) -> None:
    commands = []
    for i in range(5):
        length = rng.choice([4096, 64 * 1024, 300 * 1024, MiB + 4096])
        offset = rng.randrange(0, SIZE - length, 512)
        if i == 3:
            commands.append(f"write -q -z {offset} {length}")
        elif i == 4:
            commands.append(f"discard -q {offset} {length}")
        else:
            commands.append(f"write -q -P {(night * 16 + i) % 255 + 1} {offset} {length}")
    qemu_io(image, *commands)


@pytest.fixture(scope="module")
def nights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/set: the set over the nights; ROOT/ID.raw: each point's night, converted."""
    root = tmp_path_factory.mktemp("prune-nights")
    image = make_image(root / "vm.qcow2", SIZE, seed=11, writes=30, max_len=2 * MiB)
    dest = root / "set"
    dest.mkdir()
    rng = random.Random(42)
    for night, (day, hour, options) in enumerate(NIGHTS):
        if night:
            _night(image, rng, night)
        now = calendar.timegm((2026, 12, day, hour, 0, 0))
        with (
            BackupSet.open(str(dest), lock=True, create=True) as bset,
            opened(str(image), "qcow2") as src,
        ):
            result = add_point(bset, "vm", src, RunOptions(**{**options.__dict__}), now=now)
        assert result.point is not None
        qemu_raw(image, root / f"{result.point.id}.raw")
    return root


def _copy(nights: Path, tmp_path: Path) -> Path:
    shutil.copytree(nights / "set", tmp_path / "set")
    return tmp_path / "set"


def _expected_kept(dest: Path, rules: Rules) -> list[str]:
    with BackupSet.open(str(dest)) as bset:
        return [d.point.id for d in plan(bset.points("vm"), rules) if d.keep]


def _check_set(dest: Path, nights: Path, kept: list[str]) -> None:
    """The set holds exactly ``kept``, each equal to its night, and nothing else."""
    pts = manifest(dest)["disks"]["vm"]["points"]
    assert [p["id"] for p in pts] == kept
    for p in pts:
        path = dest / p["file"]
        assert qemu_compare(path, nights / f"{p['id']}.raw"), p["file"]
        if p["format"] == "qcow2":
            qemu_check(path)
    status, doc = list_json(dest)
    assert status == 0, doc
    proc = sparsefs("checksum", "--check", "SPARSEFS-SUMS", cwd=dest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    named = {Path(p["file"]).name for p in pts} | {Path(p["blocks"]).name for p in pts}
    assert set(os.listdir(dest / "vm")) == named


def _prune(dest: Path, *rules: str) -> int:
    return main(["prune", "-q", str(dest), *rules])


def test_dropping_the_full_points_and_their_deltas(nights: Path, tmp_path: Path) -> None:
    dest = _copy(nights, tmp_path)
    kept = _expected_kept(dest, Rules(last=1, daily=3))
    ids = [p["id"] for p in manifest(dest)["disks"]["vm"]["points"]]
    # Both full points go.  Chain 1's (raw) and its three deltas fold into night 4 in the
    # raw file's own inode: night 4 becomes a full raw point.  Chain 2's full point is
    # qcow2: it merges into night 6, which becomes a full qcow2 point under its own name.
    assert kept == [ids[4], ids[6], ids[7], ids[8]]
    raw_inode = (dest / manifest(dest)["disks"]["vm"]["points"][0]["file"]).stat().st_ino
    assert _prune(dest, "--keep-last", "1", "--keep-daily", "3") == 0
    _check_set(dest, nights, kept)
    pts = manifest(dest)["disks"]["vm"]["points"]
    assert [p["kind"] for p in pts] == ["full", "full", "delta", "delta"]
    assert [p["format"] for p in pts] == ["raw", "qcow2", "qcow2", "qcow2"]
    assert pts[0]["file"] == f"vm/vm@{ids[4]}.raw"
    assert (dest / pts[0]["file"]).stat().st_ino == raw_inode  # folded, not copied
    assert [p["backing"] for p in pts] == [None, None, pts[1]["file"], pts[2]["file"]]


def test_a_fold_rebases_the_point_above_and_merges_go_on_over_it(
    nights: Path, tmp_path: Path
) -> None:
    """Night 2 takes over the raw full point; night 3 above it is rebased, then merged."""
    dest = _copy(nights, tmp_path)
    kept = _expected_kept(dest, Rules(daily=5))
    ids = [p["id"] for p in manifest(dest)["disks"]["vm"]["points"]]
    assert kept == [ids[2], ids[4], ids[6], ids[7], ids[8]]
    assert _prune(dest, "--keep-daily", "5") == 0
    _check_set(dest, nights, kept)
    pts = manifest(dest)["disks"]["vm"]["points"]
    assert [(p["kind"], p["format"]) for p in pts[:2]] == [("full", "raw"), ("delta", "qcow2")]
    assert pts[1]["backing"] == pts[0]["file"]


def test_a_set_being_read_is_merged_not_folded(nights: Path, tmp_path: Path) -> None:
    """While a mount or restore holds the readers' lock, no point's file changes in place."""
    dest = _copy(nights, tmp_path)
    first = manifest(dest)["disks"]["vm"]["points"][0]
    before = (dest / first["file"]).read_bytes()
    with BackupSet.open(str(dest), reading=True):
        assert _prune(dest, "--keep-last", "1", "--keep-daily", "3") == 0
        assert not (dest / first["file"]).exists()
    pts = manifest(dest)["disks"]["vm"]["points"]
    assert [(p["kind"], p["format"]) for p in pts[:2]] == [("full", "qcow2"), ("full", "qcow2")]
    _check_set(dest, nights, [p["id"] for p in pts])
    assert len(before) == first["size"]


def test_a_fold_killed_after_its_writes_leaves_only_kept_points_visible(
    nights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retired points are no points (list, SUMS); the kept one reads; prune finishes."""
    dest = _copy(nights, tmp_path)
    from sparsefs.points import absorb
    from sparsefs.points import prune as prune_mod

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(absorb, "_verify", killed)
    rules = Rules(daily=5)
    with BackupSet.open(str(dest), lock=True) as bset, pytest.raises(KeyboardInterrupt):
        prune_mod.prune(bset, rules)
    monkeypatch.undo()
    doc = manifest(dest)["disks"]["vm"]
    ids = [p["id"] for p in manifest(nights / "set")["disks"]["vm"]["points"]]
    assert [p["id"] for p in doc["retired"]] == ids[:2]
    assert [p["id"] for p in doc["points"]] == ids[2:]
    _every_point_verifies(dest)
    status, listed = list_json(dest)
    assert status == 0, listed
    assert [p["id"] for p in listed["disks"][0]["points"]] == ids[2:]
    assert all(p["status"] == "ok" for p in listed["disks"][0]["points"])
    sums = (dest / "SPARSEFS-SUMS").read_text()
    assert doc["retired"][0]["file"] not in sums
    proc = sparsefs("checksum", "--check", "SPARSEFS-SUMS", cwd=dest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _prune(dest, "--keep-daily", "5") == 0
    _check_set(dest, nights, _expected_kept(nights / "set", rules))
    assert "retired" not in manifest(dest)["disks"]["vm"]


def test_dropping_points_in_the_middle_of_a_chain(nights: Path, tmp_path: Path) -> None:
    dest = _copy(nights, tmp_path)
    kept = _expected_kept(dest, Rules(daily=6))
    ids = [p["id"] for p in manifest(dest)["disks"]["vm"]["points"]]
    assert kept == [ids[0], ids[2], ids[4], ids[6], ids[7], ids[8]]
    assert _prune(dest, "--keep-daily", "6") == 0
    _check_set(dest, nights, kept)
    pts = manifest(dest)["disks"]["vm"]["points"]
    assert pts[1]["backing"] == pts[0]["file"]  # over the raw full point
    # A second prune drops more of what the first kept: weeks 50 (night 8, kept by last
    # already) and 49 (night 4) hold points; weekly 2 is short of weeks, so the oldest
    # point stays too (borg's rule), and the middle of the chain goes.
    kept = [ids[0], ids[4], ids[8]]
    assert _prune(dest, "--keep-last", "1", "--keep-weekly", "2") == 0
    _check_set(dest, nights, kept)


def test_dry_run_changes_nothing_and_json_lists_every_point(nights: Path, tmp_path: Path) -> None:
    dest = _copy(nights, tmp_path)
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    proc = sparsefs("prune", "--dry-run", "--json", str(dest), "--keep-last", "2")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    actions = [(p["action"], p["rule"]) for p in doc["disks"][0]["points"]]
    assert actions == [("prune", None)] * 7 + [("keep", "last 2"), ("keep", "last 1")]
    assert doc["dry_run"] is True
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    text = sparsefs("prune", "-n", str(dest), "--keep-last", "2").stdout
    assert [line.split()[0] for line in text.splitlines()] == ["prune"] * 7 + ["keep"] * 2 + [
        "would"
    ]
    assert "keep   (last 1)" in text


def test_rules_that_keep_nothing_are_refused(nights: Path, tmp_path: Path) -> None:
    dest = _copy(nights, tmp_path)
    proc = sparsefs("prune", str(dest))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert "keeps something" in proc.stderr
    assert sparsefs("prune", str(tmp_path / "none"), "--keep-last", "1").returncode == 1


# -- SIGKILL at random moments ------------------------------------------------------


def _fork_prune(dest: Path, rules: list[str], delay: float | None) -> tuple[int, float]:
    """Run prune in a forked child; SIGKILL it after ``delay`` s.  (wait status, seconds)."""
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = main(["prune", "-q", str(dest), *rules])
        finally:
            os._exit(code)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return status, time.monotonic() - t0


def _every_point_verifies(dest: Path) -> None:
    for point in manifest(dest)["disks"]["vm"]["points"]:
        with opened(str(dest / point["file"]), point["format"]) as source:
            assert block_digest(source).digest == point["digest"], point["file"]


@pytest.mark.parametrize(
    "rules",
    [
        ["--keep-last", "1", "--keep-daily", "3"],  # two full points go: a fold and a merge
        ["--keep-daily", "5"],  # a fold rebasing the point above, then a merge over it
    ],
)
def test_sigkill_at_random_moments(nights: Path, tmp_path: Path, rules: list[str]) -> None:
    probe = _copy(nights, tmp_path / "probe")
    status, whole = _fork_prune(probe, rules, None)
    assert os.waitstatus_to_exitcode(status) == 0
    kept = [p["id"] for p in manifest(probe)["disks"]["vm"]["points"]]
    rng = random.Random(f"prune-crash {rules}")
    killed = 0
    digests = {p["id"]: p["digest"] for p in manifest(nights / "set")["disks"]["vm"]["points"]}
    for seed in range(CRASH_SEEDS):
        dest = _copy(nights, tmp_path / f"seed{seed}")
        status, _ = _fork_prune(dest, rules, rng.uniform(0, whole * 1.1))
        killed += os.WIFSIGNALED(status)
        # Every point the manifest names (kept or not yet dropped) reads as its night did
        # (the digest recorded when it was made, read through its chain as it is now).
        _every_point_verifies(dest)
        assert all(p["digest"] == digests[p["id"]] for p in manifest(dest)["disks"]["vm"]["points"])
        assert _prune(dest, *rules) == 0, seed
        assert [p["id"] for p in manifest(dest)["disks"]["vm"]["points"]] == kept
        _every_point_verifies(dest)
        if seed % 8 == 7:  # the whole check (qemu, list, checksum --check) now and then
            _check_set(dest, nights, kept)
        shutil.rmtree(dest)
    assert killed >= CRASH_SEEDS // 2, killed


def test_a_prune_killed_between_rename_and_manifest_is_finished(
    nights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one window where the manifest lags the files: the next prune completes it."""
    dest = _copy(nights, tmp_path)
    rules = Rules(last=1, daily=3)
    from sparsefs.points import prune as prune_mod

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(prune_mod, "_record", killed)
    with BackupSet.open(str(dest), lock=True) as bset, pytest.raises(KeyboardInterrupt):
        prune_mod.prune(bset, rules)
    monkeypatch.undo()
    _every_point_verifies(dest)
    with BackupSet.open(str(dest), lock=True) as bset:
        results = prune_mod.prune(bset, Rules(last=20))  # keeps all: only the finishing
    assert [len(m.dropped) for m in results[0].finished] == [4]
    kept = _expected_kept(nights / "set", Rules(last=20))
    _check_set(dest, nights, [i for i in kept if i not in results[0].finished[0].dropped])


def test_backing_name_reads_the_header_only(nights: Path, tmp_path: Path) -> None:
    from sparsefs.formats.qcow2 import backing_name

    pts = manifest(nights / "set")["disks"]["vm"]["points"]
    assert backing_name(nights / "set" / pts[1]["file"]) == Path(pts[0]["file"]).name
    assert backing_name(nights / "set" / pts[5]["file"]) is None  # the full qcow2 point
    # No backing file is opened: a missing one does not matter.
    lone = tmp_path / "lone.qcow2"
    shutil.copy(nights / "set" / pts[2]["file"], lone)
    assert backing_name(lone) == Path(pts[1]["file"]).name


def test_a_rebased_point_that_does_not_read_its_digest_is_left_alone(
    nights: Path, tmp_path: Path
) -> None:
    """Only a merged file (it reads its digest) is taken for a killed prune's work."""
    dest = _copy(nights, tmp_path)
    pts = manifest(dest)["disks"]["vm"]["points"]
    first = Path(pts[0]["file"]).name
    run(["qemu-img", "rebase", "-u", "-b", first, "-F", "raw", str(dest / pts[2]["file"])])
    assert _prune(dest, "--keep-last", "20") == 0
    assert [p["id"] for p in manifest(dest)["disks"]["vm"]["points"]] == [p["id"] for p in pts]
    assert all((dest / p["file"]).exists() for p in pts)
    status, doc = list_json(dest)
    assert status == 1
    assert [p["status"] for p in doc["disks"][0]["points"]][1:3] == ["ok", "damaged"]
