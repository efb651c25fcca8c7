"""Our qcow2 writer against qemu: images it writes are checked, compared and mapped live.

Each test builds its backing files with qemu-img/qemu-io, writes an image with
:class:`Qcow2Writer`, applies the same writes to a raw reference copy, and asks
qemu: ``qemu-img check`` (no corruption, no leak), ``qemu-img compare`` (same
bytes as the reference) and ``qemu-img map`` (data exactly at the written
clusters, zero-flag clusters exactly at the zeroed ones).  sparsefs's own
reader must read the same bytes and report the same data runs.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsefs.errors import SparsefsError
from sparsefs.formats import open_source
from sparsefs.formats.qcow2 import Compression, ImageWriteError, Qcow2Writer
from sparsefs.options import OpenOptions
from support import KiB, MiB, num, qemu_img_create, qemu_io, qemu_map, run

GiB = 1024 * MiB
TiB = 1024 * GiB

Run = tuple[int, int]  # guest [start, end) in bytes


@dataclass
class Op:
    """One writer call: data (``data`` set) or zeroes at ``offset``, ``length`` bytes."""

    offset: int
    length: int
    data: bytes | None


# -- helpers -------------------------------------------------------------------------


def check_clean(image: Path) -> dict[str, object]:
    """``qemu-img check --output=json``: no corruption, no leak, no check error."""
    proc = subprocess.run(
        ["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True
    )
    report: dict[str, object] = json.loads(proc.stdout)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("leaks", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    return report


def make_backing(path: Path, size: int, seed: int) -> Path:
    """A raw backing file made by qemu: patterned writes over a zero base."""
    qemu_img_create(path, size, fmt="raw")
    rng = random.Random(seed)
    commands = [f"write -q -P {rng.randrange(1, 256)} 0 {size}"] if size else []
    for _ in range(4 if size else 0):
        length = rng.randrange(512, min(size, 256 * KiB) + 1, 512)
        offset = rng.randrange(0, size - length + 1, 512)
        commands.append(f"write -q -P {rng.randrange(1, 256)} {offset} {length}")
    qemu_io(path, *commands, fmt="raw")
    return path


def reference(out: Path, size: int, base: Path | None, ops: Iterable[Op]) -> Path:
    """The raw disk the image must equal: ``base`` cut or grown to ``size``, ``ops`` applied."""
    if base is not None:
        shutil.copyfile(base, out)
    else:
        out.touch()
    with open(out, "r+b") as f:
        f.truncate(size)
        for op in ops:
            f.seek(op.offset)
            f.write(op.data if op.data is not None else bytes(op.length))
    return out


def write_image(
    path: Path, size: int, ops: Sequence[Op], **kwargs: object
) -> tuple[Qcow2Writer, Path]:
    """Write ``ops`` into a new image at ``path``; return the closed writer and the path."""
    with Qcow2Writer(str(path), size, **kwargs) as writer:  # type: ignore[arg-type]  # the writer's keywords
        for op in ops:
            if op.data is None:
                writer.write_zeroes(op.offset, op.length)
            else:
                writer.write(op.offset, op.data)
    return writer, path


def compare(image: Path, ref: Path) -> None:
    """``qemu-img compare``: the image (with its backing chain) reads as ``ref``."""
    run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(image), str(ref)])


def merge(runs: Iterable[Run]) -> list[Run]:
    """Sorted, touching runs joined."""
    out: list[Run] = []
    for lo, hi in sorted(runs):
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def top_layer_runs(image: Path) -> tuple[list[Run], list[Run]]:
    """(data runs, zero-flag runs) that ``qemu-img map`` gives the image itself (depth 0)."""
    data: list[Run] = []
    zero: list[Run] = []
    for e in qemu_map(image):
        if num(e["depth"]) != 0 or not e["present"]:
            continue
        run_ = (num(e["start"]), num(e["start"]) + num(e["length"]))
        (data if e["data"] else zero).append(run_)
    return merge(data), merge(zero)


def check_with_sparsefs(image: Path, ref: Path) -> None:
    """sparsefs reads ``ref``'s bytes; alone, its data runs are qemu's depth-0 data runs."""
    source = open_source(image, "qcow2", OpenOptions())
    try:
        assert source.size == ref.stat().st_size
        assert source.read(0, source.size) == ref.read_bytes()
    finally:
        source.close()  # type: ignore[attr-defined]  # every opened image has close()
    alone = open_source(image, "qcow2", OpenOptions(backing=False))
    try:
        runs = merge((e.guest_offset, e.end) for e in alone.iter_extents() if e.data)
    finally:
        alone.close()  # type: ignore[attr-defined]
    assert runs == top_layer_runs(image)[0]


def expected_runs(ops: Iterable[Op], size: int) -> tuple[list[Run], list[Run]]:
    """(data runs, zero runs) the writer was asked for, cut at the end of the disk."""
    data = [(op.offset, min(op.offset + op.length, size)) for op in ops if op.data is not None]
    zero = [(op.offset, min(op.offset + op.length, size)) for op in ops if op.data is None]
    return merge(data), merge(zero)


def random_ops(rng: random.Random, size: int, cs: int, nb_data: int, nb_zero: int) -> list[Op]:
    """Non-overlapping runs of 1..16 clusters at random cluster offsets, in random order."""
    nb_clusters = -(-size // cs)
    free = set(range(nb_clusters))
    ops = []
    for n in range(nb_data + nb_zero):
        start = rng.choice(sorted(free))
        count = 1
        while count < 16 and start + count in free and rng.random() < 0.85:
            count += 1
        free.difference_update(range(start, start + count))
        offset, length = start * cs, min(count * cs, size - start * cs)
        if n < nb_data:
            data = rng.randbytes(length) if n % 2 else bytes([n % 255 + 1]) * length
            ops.append(Op(offset, length, data))
        else:
            ops.append(Op(offset, length, None))
        if not free:
            break
    rng.shuffle(ops)
    return ops


# -- deltas over qemu-made backing files ---------------------------------------------


@pytest.mark.parametrize("cluster_bits", [9, 16, 21])
def test_delta_over_raw(tmp_path: Path, cluster_bits: int) -> None:
    size = 48 * MiB
    base = make_backing(tmp_path / "base.raw", size, seed=cluster_bits)
    ops = random_ops(random.Random(cluster_bits), size, 1 << cluster_bits, 24, 8)
    delta = tmp_path / "delta.qcow2"
    writer, _ = write_image(
        delta, size, ops, cluster_bits=cluster_bits, backing_file="base.raw", backing_format="raw"
    )
    ref = reference(tmp_path / "ref.raw", size, base, ops)
    check_clean(delta)
    compare(delta, ref)
    assert top_layer_runs(delta) == expected_runs(ops, size)
    check_with_sparsefs(delta, ref)
    stats = writer.stats
    assert stats is not None
    data_runs, zero_runs = expected_runs(ops, size)
    cs = 1 << cluster_bits
    assert stats.data_clusters == sum(-(-(hi - lo) // cs) for lo, hi in data_runs)
    assert stats.zero_clusters == sum(-(-(hi - lo) // cs) for lo, hi in zero_runs)
    assert stats.compressed_clusters == 0
    assert stats.file_size == delta.stat().st_size


def test_chain_of_three_relative_names_survive_a_move(tmp_path: Path) -> None:
    """raw <- delta1 <- delta2 <- delta3, names relative; the directory moves, all still reads."""
    size, cs = 16 * MiB, 64 * KiB
    src = tmp_path / "a"
    src.mkdir()
    base = make_backing(src / "disk@20261201T000000Z.raw", size, seed=3)
    rng = random.Random(3)
    all_ops: list[Op] = []
    backing, fmt = base.name, "raw"
    for n in range(1, 4):
        ops = random_ops(rng, size, cs, 6, 2)
        name = f"disk@2026120{n + 1}T000000Z.qcow2"
        write_image(src / name, size, ops, backing_file=backing, backing_format=fmt)
        all_ops += ops
        backing, fmt = name, "qcow2"
    dst = tmp_path / "moved"
    src.rename(dst)
    top = dst / backing
    ref = reference(tmp_path / "ref.raw", size, dst / base.name, all_ops)
    for image in sorted(dst.glob("*.qcow2")):
        check_clean(image)
    compare(top, ref)
    info = json.loads(run(["qemu-img", "info", "--output=json", str(top)]).stdout)
    assert info["backing-filename"] == "disk@20261203T000000Z.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    check_with_sparsefs(top, ref)


def test_zero_writes_hide_the_backing_file(tmp_path: Path) -> None:
    size = 4 * MiB
    base = make_backing(tmp_path / "base.raw", size, seed=5)
    ops = [Op(0, MiB, None), Op(3 * MiB, MiB, None)]
    _, delta = write_image(
        tmp_path / "d.qcow2", size, ops, backing_file="base.raw", backing_format="raw"
    )
    check_clean(delta)
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-O", "raw", str(delta), str(out)])
    got = out.read_bytes()
    assert got[:MiB] == bytes(MiB)
    assert got[3 * MiB :] == bytes(MiB)
    assert got[MiB : 3 * MiB] == base.read_bytes()[MiB : 3 * MiB] != bytes(2 * MiB)
    assert top_layer_runs(delta) == ([], [(0, MiB), (3 * MiB, 4 * MiB)])
    check_with_sparsefs(delta, out)


def test_size_not_a_multiple_of_the_cluster_size(tmp_path: Path) -> None:
    cs = 64 * KiB
    size = 10 * cs + 3 * 512
    base = make_backing(tmp_path / "base.raw", size, seed=6)
    tail = random.Random(6).randbytes(3 * 512)
    ops = [Op(10 * cs, 3 * 512, tail), Op(2 * cs, cs, b"\x07" * cs), Op(4 * cs, 2 * cs, None)]
    _, delta = write_image(
        tmp_path / "d.qcow2", size, ops, backing_file="base.raw", backing_format="raw"
    )
    ref = reference(tmp_path / "ref.raw", size, base, ops)
    check_clean(delta)
    compare(delta, ref)
    assert top_layer_runs(delta) == expected_runs(ops, size)
    check_with_sparsefs(delta, ref)


def test_grown_disk_reads_zeros_past_the_backing_end(tmp_path: Path) -> None:
    base = make_backing(tmp_path / "base.raw", 3 * MiB + 512, seed=7)
    size = 8 * MiB
    ops = [Op(2 * MiB, 64 * KiB, b"\x01" * 64 * KiB), Op(6 * MiB, 128 * KiB, b"\x02" * 128 * KiB)]
    _, delta = write_image(
        tmp_path / "d.qcow2", size, ops, backing_file="base.raw", backing_format="raw"
    )
    ref = reference(tmp_path / "ref.raw", size, base, ops)
    assert ref.read_bytes()[4 * MiB : 6 * MiB] == bytes(2 * MiB)
    check_clean(delta)
    compare(delta, ref)
    check_with_sparsefs(delta, ref)


def test_one_tib_disk_with_a_few_writes_is_fast_and_small(tmp_path: Path) -> None:
    cs = 64 * KiB
    ops = [Op(k * 97 * GiB // cs * cs, cs, bytes([k + 1]) * cs) for k in range(10)]
    ops.append(Op(TiB - 2 * cs, 2 * cs, None))
    image = tmp_path / "big.qcow2"
    start = time.perf_counter()
    writer, _ = write_image(image, TiB, ops)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, elapsed
    assert image.stat().st_size < 2 * MiB
    assert image.stat().st_blocks * 512 < 2 * MiB
    check_clean(image)
    assert top_layer_runs(image) == expected_runs(ops, TiB)
    assert writer.stats is not None
    assert writer.stats.data_clusters == 10


def test_empty_disk(tmp_path: Path) -> None:
    """No L1 table at all (offset 0, as qemu-img writes it): nothing leaks."""
    writer, image = write_image(tmp_path / "empty.qcow2", 0, [])
    check_clean(image)
    check_with_sparsefs(image, reference(tmp_path / "ref.raw", 0, None, []))
    assert writer.stats is not None
    assert writer.stats.file_size == image.stat().st_size


# -- full images, compressed ---------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", "zlib"])
def test_compressed_full_image(tmp_path: Path, compression: Compression) -> None:
    cs = 64 * KiB
    size = 8 * MiB + 512
    rng = random.Random(8)
    text = b"".join(b"line %d of a compressible log\n" % n for n in range(60000))
    ops = [
        Op(0, 6 * cs, rng.randbytes(6 * cs)),  # incompressible: stored plain
        Op(6 * cs, 20 * cs, text[: 20 * cs]),
        Op(40 * cs, 3 * cs, rng.randbytes(cs) + text[: 2 * cs]),
        Op(60 * cs, 2 * cs, bytes(2 * cs)),
        Op(128 * cs, 512, b"\x5a" * 512),  # the last, partial cluster
    ]
    writer, image = write_image(tmp_path / "full.qcow2", size, ops, compression=compression)
    ref = reference(tmp_path / "ref.raw", size, None, ops)
    report = check_clean(image)
    compare(image, ref)
    check_with_sparsefs(image, ref)
    stats = writer.stats
    assert stats is not None
    assert stats.compressed_clusters == report["compressed-clusters"] == 25
    assert stats.data_clusters == 32
    assert stats.file_size < 2 * MiB
    info = json.loads(run(["qemu-img", "info", "--output=json", str(image)]).stdout)
    assert info["format-specific"]["data"]["compression-type"] == compression


# -- misuse and failure ---------------------------------------------------------------


def test_misuse_raises_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.qcow2"
    cs = 64 * KiB
    writer = Qcow2Writer(str(path), 16 * cs + 512)
    writer.write(cs, bytes(cs))
    writer.write_zeroes(4 * cs, 2 * cs)
    bad: list[tuple[str, int, int]] = [
        ("write", 512, cs),  # unaligned offset
        ("write", 8 * cs, 100),  # partial cluster, not at the end
        ("write", 16 * cs, cs),  # past the end
        ("write", -cs, cs),
        ("write", 0, 2 * cs),  # overlaps the cluster written at cs
        ("write", 5 * cs, cs),  # zeroed already
        ("zero", cs, cs),  # written already
        ("zero", 4 * cs, cs),
    ]
    for what, offset, length in bad:
        call = writer.write_zeroes if what == "zero" else lambda o, n: writer.write(o, bytes(n))
        with pytest.raises(ImageWriteError, match=re.escape(str(path))):
            call(offset, length)
    assert path.read_bytes()[:4] == bytes(4)  # no header before close(): not a qcow2 image
    writer.write(16 * cs, bytes(512))  # the partial last cluster is fine
    writer.close()
    check_clean(path)
    with pytest.raises(ImageWriteError):
        writer.write(2 * cs, bytes(cs))
    with pytest.raises(ImageWriteError, match="File exists"):
        Qcow2Writer(str(path), cs)
    assert path.stat().st_size == writer.stats.file_size  # type: ignore[union-attr]
    with pytest.raises(SparsefsError, match="multiple of 512"):
        Qcow2Writer(str(tmp_path / "x.qcow2"), 1000)
    with pytest.raises(SparsefsError, match="backing"):
        Qcow2Writer(str(tmp_path / "x.qcow2"), cs, backing_file="a.raw")
    with pytest.raises(SparsefsError, match="too long"):
        Qcow2Writer(
            str(tmp_path / "x.qcow2"),
            cs,
            cluster_bits=9,
            backing_file="b" * 500,
            backing_format="raw",
        )
    assert not (tmp_path / "x.qcow2").exists()


def test_abort_and_exceptions_leave_no_file(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    writer = Qcow2Writer(str(path), MiB)
    writer.write(0, bytes(64 * KiB))
    writer.abort()
    assert not path.exists()
    writer.abort()  # idempotent

    def fail_inside() -> None:
        with Qcow2Writer(str(path), MiB) as w:
            w.write(0, bytes(64 * KiB))
            raise RuntimeError("caller failed")

    with pytest.raises(RuntimeError):
        fail_inside()
    assert not path.exists()
    with Qcow2Writer(str(path), MiB) as w:  # a normal exit closes
        w.write(0, b"\1" * 64 * KiB)
    assert w.stats is not None
    assert w.stats.data_clusters == 1
    check_clean(path)


_ENOSPC_SCRIPT = """
import os, resource, signal, sys
from sparsefs.formats.qcow2.writer import ImageWriteError, Qcow2Writer
path = sys.argv[1]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
w = Qcow2Writer(path, 1 << 30)
try:
    w.write(0, bytes(2 << 20))
except ImageWriteError as exc:
    print(exc)
try:
    w.close()
except ImageWriteError as exc:
    print(exc)
print(os.path.exists(path))
"""


def test_write_error_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """A file size limit (EFBIG, as ENOSPC would) fails the write; close() then removes the file."""
    path = tmp_path / "full.qcow2"
    proc = run([sys.executable, "-c", _ENOSPC_SCRIPT, str(path)])
    write_error, close_error, exists = proc.stdout.splitlines()
    assert write_error.startswith(f"{path}: cannot write 2097152 bytes at host offset 65536")
    assert close_error.startswith(f"{path}: close after")
    assert exists == "False"


# -- property -------------------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, int | None, Compression, list[Op]]:
    """(cluster_bits, size, backing size or None, compression, ops)."""
    cluster_bits = draw(st.sampled_from([9, 12, 16]))
    cs = 1 << cluster_bits
    nb_full = draw(st.integers(0, 40))
    size = nb_full * cs + draw(st.integers(0, cs // 512 - 1)) * 512
    if size == 0:
        size = cs
    nb_clusters = -(-size // cs)
    backing = draw(st.none() | st.integers(0, size // 512 + 8).map(lambda n: n * 512))
    compression: Compression = draw(st.sampled_from([None, "zstd", "zlib"]))
    kinds = draw(st.lists(st.sampled_from("dz."), min_size=nb_clusters, max_size=nb_clusters))
    rng = random.Random(draw(st.integers(0, 2**32)))
    ops, n = [], 0
    while n < nb_clusters:
        count = 1
        while n + count < nb_clusters and kinds[n + count] == kinds[n] and rng.random() < 0.7:
            count += 1
        offset, length = n * cs, min(count * cs, size - n * cs)
        if kinds[n] == "d":
            data = rng.randbytes(length) if rng.random() < 0.5 else bytes([n % 7]) * length
            ops.append(Op(offset, length, data))
        elif kinds[n] == "z":
            ops.append(Op(offset, length, None))
        n += count
    rng.shuffle(ops)
    return cluster_bits, size, backing, compression, ops


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_property_check_clean_and_compare_equal(
    scenario: tuple[int, int, int | None, Compression, list[Op]],
) -> None:
    cluster_bits, size, backing_size, compression, ops = scenario
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        base = None
        kwargs: dict[str, object] = {"cluster_bits": cluster_bits, "compression": compression}
        if backing_size is not None:
            base = make_backing(d / "base.raw", backing_size, seed=size)
            kwargs.update(backing_file="base.raw", backing_format="raw")
        writer, image = write_image(d / "img.qcow2", size, ops, **kwargs)
        check_clean(image)
        compare(image, reference(d / "ref.raw", size, base, ops))
        assert writer.stats is not None
        assert writer.stats.file_size == os.path.getsize(image)
