"""Hostile images: qemu-made images, their metadata located by the test, and mutations.

The base images are made by qemu-img/qemu-io at test time.  :func:`locate`
finds the header fields, L1/L2 entries, compressed descriptors, snapshot
table entries and header extensions with plain ``struct`` reads that follow
docs/interop/qcow2.txt, independently of sparsefs's own parser, so a bug in
sparsefs cannot hide a mutation target.  :class:`Mutator` turns a located image
into seeded mutants (one described change each) for the fuzz tests.
"""

from __future__ import annotations

import random
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from support import KiB, MiB, make_image, qemu_compress, qemu_img_create, qemu_io, run

OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1

# spec, "Header": name -> (byte offset, struct format)
HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}
# spec, "Snapshots": field -> (offset inside the entry, struct format)
SNAPSHOT_FIELDS: dict[str, tuple[int, str]] = {
    "l1_table_offset": (0, ">Q"),
    "l1_size": (8, ">I"),
    "id_str_size": (12, ">H"),
    "name_size": (14, ">H"),
    "vm_state_size": (32, ">I"),
    "extra_data_size": (36, ">I"),
    "extra_vm_state_size_large": (40, ">Q"),
    "extra_disk_size": (48, ">Q"),
}


@dataclass
class L2Entry:
    """One L2 entry: where it is in the file and what it says."""

    pos: int  # byte offset of the entry in the file
    value: int
    bitmap: int | None = None  # extended L2 only
    guest_offset: int = 0


@dataclass
class Located:
    """The metadata of a qcow2 file, found by the test."""

    path: Path
    file_size: int
    version: int
    cluster_bits: int
    size: int
    l1_table_offset: int
    l1_size: int
    header_length: int
    extended_l2: bool
    refcount_table_offset: int
    snapshots_offset: int
    nb_snapshots: int
    l1: list[int] = field(default_factory=list)
    l2_tables: list[int] = field(default_factory=list)  # host offsets
    l2_entries: list[L2Entry] = field(default_factory=list)  # allocated ones only
    snapshot_entries: list[int] = field(default_factory=list)  # positions
    extensions: list[tuple[int, int, int]] = field(default_factory=list)  # (pos, type, length)
    raw: bytes = b""  # the whole file

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    def compressed(self) -> list[L2Entry]:
        return [e for e in self.l2_entries if e.value & COMPRESSED]

    def normal(self) -> list[L2Entry]:
        return [e for e in self.l2_entries if not e.value & COMPRESSED and e.value & OFFSET_MASK]

    def descriptor(self, entry: int) -> tuple[int, int]:
        """(host_offset, nb_sectors) of a compressed cluster descriptor."""
        x = 62 - (self.cluster_bits - 8)
        return entry & ((1 << x) - 1), ((entry >> x) & ((1 << (self.cluster_bits - 8)) - 1)) + 1

    def make_descriptor(self, host_offset: int, nb_sectors: int) -> int:
        x = 62 - (self.cluster_bits - 8)
        return COMPRESSED | ((nb_sectors - 1) << x) | host_offset


def locate(path: Path | str) -> Located:
    """Find the metadata of a valid qcow2 file with plain struct reads."""
    data = Path(path).read_bytes()

    def u(fmt: str, pos: int) -> int:
        return int(struct.unpack_from(fmt, data, pos)[0])

    version = u(">I", 4)
    cluster_bits = u(">I", 20)
    header_length = u(">I", 100) if version >= 3 else 72
    incompat = u(">Q", 72) if version >= 3 else 0
    loc = Located(
        path=Path(path),
        file_size=len(data),
        version=version,
        cluster_bits=cluster_bits,
        size=u(">Q", 24),
        l1_table_offset=u(">Q", 40),
        l1_size=u(">I", 36),
        header_length=header_length,
        extended_l2=bool(incompat & 16),
        refcount_table_offset=u(">Q", 48),
        snapshots_offset=u(">Q", 64),
        nb_snapshots=u(">I", 60),
    )
    loc.raw = data
    cs = loc.cluster_size
    loc.l1 = [u(">Q", loc.l1_table_offset + 8 * i) for i in range(loc.l1_size)]
    per_table = cs // loc.l2_entry_size
    for index, l1e in enumerate(loc.l1):
        l2 = l1e & OFFSET_MASK
        if not l2:
            continue
        loc.l2_tables.append(l2)
        for j in range(per_table):
            pos = l2 + j * loc.l2_entry_size
            value = u(">Q", pos)
            bitmap = u(">Q", pos + 8) if loc.extended_l2 else None
            if value or bitmap:
                guest = (index * per_table + j) * cs
                loc.l2_entries.append(L2Entry(pos, value, bitmap, guest))
    pos = loc.snapshots_offset
    for _ in range(loc.nb_snapshots):
        loc.snapshot_entries.append(pos)
        extra, id_len, name_len = u(">I", pos + 36), u(">H", pos + 12), u(">H", pos + 14)
        pos = (pos + 40 + extra + id_len + name_len + 7) & ~7
    pos = header_length
    while pos + 8 <= cs:
        ext_type, length = u(">I", pos), u(">I", pos + 4)
        if ext_type == 0:
            break
        loc.extensions.append((pos, ext_type, length))
        pos += 8 + ((length + 7) & ~7)
    return loc


def put(buf: bytearray, pos: int, fmt: str, value: int) -> None:
    """Store ``value`` at ``pos`` with ``fmt``, truncated to the field's width."""
    width = struct.calcsize(fmt)
    if pos + width > len(buf):  # an earlier change truncated the file
        return
    struct.pack_into(fmt, buf, pos, value & ((1 << (8 * width)) - 1))


# -- base images ----------------------------------------------------------------------


def build_bases(directory: Path) -> dict[str, Path]:
    """The small qemu-made images the fuzz and hostile tests mutate, by kind.

    Kinds: plain (4 KiB clusters, two L2 tables), v2, zlib, zstd (compressed),
    snapshots (two internal snapshots), extl2 (subclusters), overlay (over a
    qcow2 base that is never mutated), datafile (external data file).
    """
    d = directory
    out: dict[str, Path] = {}
    out["plain"] = make_image(
        d / "plain.qcow2",
        4 * MiB,
        seed=1,
        options=["cluster_size=4096"],
        writes=24,
        max_len=96 * KiB,
    )
    out["v2"] = make_image(
        d / "v2.qcow2", 2 * MiB, seed=2, options=["compat=0.10"], writes=12, zero_writes=0
    )
    src = make_image(d / "compress-src.qcow2", 2 * MiB, seed=3, writes=16, max_len=128 * KiB)
    for kind in ("zlib", "zstd"):
        out[kind] = qemu_compress(src, d / f"{kind}.qcow2", kind)
    out["snapshots"] = build_snapshots(d)
    out["extl2"] = make_image(
        d / "extl2.qcow2",
        2 * MiB,
        seed=5,
        options=["extended_l2=on", "cluster_size=65536"],
        writes=16,
        max_len=40 * KiB,
    )
    base = make_image(d / "base.qcow2", 2 * MiB, seed=6, writes=10)
    out["overlay"] = make_image(
        d / "overlay.qcow2", 2 * MiB, seed=7, writes=8, backing=base.name, backing_fmt="qcow2"
    )
    # An absolute name: qemu resolves a relative one against its working directory.
    qemu_img_create(d / "datafile.qcow2", 2 * MiB, f"data_file={d / 'datafile.data'}")
    qemu_io(
        d / "datafile.qcow2",
        "write -q -P 0x33 0 192k",
        "write -q -P 0x44 1M 64k",
        "write -q -z 1536k 64k",
    )
    out["datafile"] = d / "datafile.qcow2"
    return out


def build_snapshots(directory: Path) -> Path:
    """``snapshots.qcow2``: 2 MiB, 64 KiB clusters, internal snapshots 'first' and 'second'."""
    snap = make_image(directory / "snapshots.qcow2", 2 * MiB, seed=4, writes=8)
    run(["qemu-img", "snapshot", "-c", "first", str(snap)])
    qemu_io(snap, "write -q -P 0x5a 64k 192k", "discard -q 1M 128k")
    run(["qemu-img", "snapshot", "-c", "second", str(snap)])
    qemu_io(snap, "write -q -P 0x6b 1536k 64k")
    return snap


# -- seeded mutations ------------------------------------------------------------------


def interesting(rng: random.Random, orig: int, width: int, loc: Located) -> int:
    """A value for a field of ``width`` bytes that is likely to upset a parser."""
    top = (1 << (8 * width)) - 1
    cs = loc.cluster_size
    choices = [
        0,
        1,
        top,
        top >> 1,
        orig + 1,
        orig - 1,
        orig ^ (1 << rng.randrange(8 * width)),
        orig * 2,
        orig << 8,
        rng.randrange(top + 1),
        loc.file_size,
        loc.file_size - cs,
        loc.file_size + cs,
        cs,
        cs - 1,
        rng.randrange(0, loc.file_size + 4 * cs) & ~(cs - 1),
        1 << rng.randrange(8 * width),
        0x7FFFFFFF,
        512,
        513,
    ]
    return rng.choice(choices) & top


class Mutator:
    """Seeded mutants of one located base image: ``(description, change)`` pairs."""

    def __init__(self, loc: Located, rng: random.Random) -> None:
        self.loc = loc
        self.rng = rng
        self.kinds: list[Callable[[], tuple[str, Callable[[bytearray], None]]]] = [
            self.header_field,
            self.header_field,
            self.l1_entry,
            self.truncate,
            self.metadata_bytes,
        ]
        if loc.l2_entries:
            self.kinds += [self.l2_entry, self.l2_entry]
        if loc.compressed():
            self.kinds += [
                self.compressed_descriptor,
                self.compressed_descriptor,
                self.compressed_payload,
            ]
        if loc.snapshot_entries:
            self.kinds += [self.snapshot_field, self.snapshot_field]
        if loc.extensions:
            self.kinds += [self.extension]

    def next(self) -> tuple[str, Callable[[bytearray], None]]:
        return self.rng.choice(self.kinds)()

    def _value_for(self, pos: int, fmt: str) -> int:
        orig = int(struct.unpack_from(fmt, self.loc.raw, pos)[0])
        return interesting(self.rng, orig, struct.calcsize(fmt), self.loc)

    def header_field(self) -> tuple[str, Callable[[bytearray], None]]:
        names = [n for n in HEADER_FIELDS if n != "magic"]
        if self.loc.version < 3:
            names = [n for n in names if HEADER_FIELDS[n][0] < 72]
        name = self.rng.choice(names)
        pos, fmt = HEADER_FIELDS[name]
        value = self._value_for(pos, fmt)
        return f"header {name} = {value:#x}", lambda b: put(b, pos, fmt, value)

    def l1_entry(self) -> tuple[str, Callable[[bytearray], None]]:
        loc = self.loc
        index = self.rng.randrange(max(1, loc.l1_size))
        pos = loc.l1_table_offset + 8 * index
        cs = loc.cluster_size
        orig = loc.l1[index] if index < len(loc.l1) else 0
        value = self.rng.choice(
            [
                0,
                orig ^ (1 << self.rng.randrange(64)),
                orig + 512,
                COPIED | cs * 0,
                COPIED | (loc.file_size & ~(cs - 1)) + cs,
                COPIED | loc.l1_table_offset,
                COPIED | loc.refcount_table_offset,
                COPIED | self.rng.choice(loc.l2_tables or [cs]),
                self.rng.randrange(1 << 64),
                COPIED | (1 << 55),
            ]
        )
        return f"L1[{index}] = {value:#x}", lambda b: put(b, pos, ">Q", value)

    def l2_entry(self) -> tuple[str, Callable[[bytearray], None]]:
        loc = self.loc
        entry = self.rng.choice(loc.l2_entries)
        cs = loc.cluster_size
        orig = entry.value
        host = orig & OFFSET_MASK
        value = self.rng.choice(
            [
                0,
                orig | ZERO,
                orig ^ COMPRESSED,
                orig + 512,
                COPIED | 0 | ZERO,
                COPIED | cs * self.rng.randrange(0, loc.file_size // cs + 4),
                COPIED | (host + cs),
                COPIED | loc.l1_table_offset,
                COPIED | (1 << 55),
                orig ^ (1 << self.rng.randrange(64)),
                self.rng.randrange(1 << 64),
            ]
        )
        changes = [(entry.pos, value)]
        desc = f"L2 entry at {entry.pos:#x} (guest {entry.guest_offset:#x}) = {value:#x}"
        if loc.extended_l2 and self.rng.random() < 0.5:
            bitmap = self.rng.choice(
                [
                    0xFFFFFFFF_FFFFFFFF,
                    0xFFFFFFFF,
                    0xFFFFFFFF_00000000,
                    1 | 1 << 32,
                    self.rng.randrange(1 << 64),
                    (entry.bitmap or 0) ^ (1 << self.rng.randrange(64)),
                ]
            )
            changes = [(entry.pos + 8, bitmap)]
            desc = f"L2 bitmap at {entry.pos + 8:#x} = {bitmap:#x}"

        def change(b: bytearray) -> None:
            for pos, v in changes:
                put(b, pos, ">Q", v)

        return desc, change

    def compressed_descriptor(self) -> tuple[str, Callable[[bytearray], None]]:
        loc = self.loc
        entry = self.rng.choice(loc.compressed())
        host, nb = loc.descriptor(entry.value)
        max_sectors = 1 << (loc.cluster_bits - 8)
        new_host, new_nb = self.rng.choice(
            [
                (host, max_sectors),
                (host, 1),
                (0, nb),
                (72, nb),
                (loc.l1_table_offset, nb),
                (loc.file_size - 1, nb),
                (loc.file_size + 512, nb),
                (host + 1, nb),
                (host + self.rng.randrange(1, 600), nb),
                (self.rng.randrange(loc.file_size), nb),
                (
                    self.rng.choice(loc.compressed()).value
                    & ((1 << (62 - loc.cluster_bits + 8)) - 1),
                    nb,
                ),
            ]
        )
        new_host &= (1 << (62 - (loc.cluster_bits - 8))) - 1
        value = loc.make_descriptor(new_host, new_nb)
        return (
            f"compressed descriptor at {entry.pos:#x} (guest {entry.guest_offset:#x}) = "
            f"host {new_host:#x}, {new_nb} sectors"
        ), lambda b: put(b, entry.pos, ">Q", value)

    def compressed_payload(self) -> tuple[str, Callable[[bytearray], None]]:
        loc = self.loc
        entry = self.rng.choice(loc.compressed())
        host, nb = loc.descriptor(entry.value)
        n = self.rng.randrange(1, 9)
        spots = [
            (
                host + self.rng.randrange(min(nb * 512, loc.file_size - host)),
                1 << self.rng.randrange(8),
            )
            for _ in range(n)
        ]

        def change(b: bytearray) -> None:
            for p, bit in spots:
                if p < len(b):
                    b[p] ^= bit

        return f"compressed payload of guest {entry.guest_offset:#x}: {n} bit flips", change

    def snapshot_field(self) -> tuple[str, Callable[[bytearray], None]]:
        loc = self.loc
        entry_pos = self.rng.choice(loc.snapshot_entries)
        name = self.rng.choice(list(SNAPSHOT_FIELDS))
        off, fmt = SNAPSHOT_FIELDS[name]
        pos = entry_pos + off
        value = self._value_for(pos, fmt)
        return f"snapshot entry at {entry_pos:#x}: {name} = {value:#x}", (
            lambda b: put(b, pos, fmt, value)
        )

    def extension(self) -> tuple[str, Callable[[bytearray], None]]:
        loc = self.loc
        pos, ext_type, length = self.rng.choice(loc.extensions)
        what = self.rng.choice(["length", "type", "data"])
        if what == "length":
            value = interesting(self.rng, length, 4, loc)
            return (
                f"extension {ext_type:#x} at {pos}: length = {value:#x}",
                lambda b: put(b, pos + 4, ">I", value),
            )
        if what == "type":
            value = self.rng.choice(
                [0, 0xE2792ACA, 0x44415441, 0x6803F857, 0x0537BE77, self.rng.randrange(1 << 32)]
            )
            return (
                f"extension {ext_type:#x} at {pos}: type = {value:#x}",
                lambda b: put(b, pos, ">I", value),
            )
        text = self.rng.choice(
            [b"raw", b"vmdk", b"qcow2", b"\xff\xfe", b"nbd:x:1", b"/etc/passwd", b"\x00"]
        )

        def change(b: bytearray) -> None:
            data = (text * (length // len(text) + 1))[:length]
            b[pos + 8 : pos + 8 + length] = data

        return f"extension {ext_type:#x} at {pos}: data = {text!r}...", change

    def truncate(self) -> tuple[str, Callable[[bytearray], None]]:
        loc = self.loc
        cut = self.rng.choice(
            [
                self.rng.randrange(loc.file_size),
                loc.l1_table_offset + 4,
                self.rng.choice(loc.l2_tables or [loc.cluster_size]) + 8,
                loc.file_size - loc.cluster_size // 2,
                loc.file_size - 1,
                100,
                4096,
            ]
        )

        def change(b: bytearray) -> None:
            del b[cut:]

        return f"truncated to {cut} bytes", change

    def metadata_bytes(self) -> tuple[str, Callable[[bytearray], None]]:
        loc = self.loc
        regions = [(0, min(loc.cluster_size, 4096)), (loc.l1_table_offset, 8 * loc.l1_size)]
        regions += [(t, loc.cluster_size) for t in loc.l2_tables]
        regions += [(p, 64) for p in loc.snapshot_entries]
        start, length = self.rng.choice([r for r in regions if r[1] > 0])
        n = self.rng.randrange(1, 9)
        spots = [(start + self.rng.randrange(length), self.rng.randrange(256)) for _ in range(n)]

        def change(b: bytearray) -> None:
            for p, v in spots:
                if p < len(b):
                    b[p] = v

        return f"{n} random bytes in metadata at {start:#x}: {spots}", change


# -- qemu's answer for one range ----------------------------------------------------------


def qemu_dd_range(image: Path, start: int, length: int, scratch: Path) -> bytes | None:
    """``qemu-img dd`` of guest bytes ``[start, start + length)``; None when qemu fails (EIO).

    ``start`` must be a multiple of ``length``.  qemu-img dd (7.2) counts
    ``count`` from the start of the image, not from ``skip``.
    """
    assert start % length == 0
    out = scratch / f"dd-{start}-{length}.raw"
    out.unlink(missing_ok=True)
    block = start // length
    proc = subprocess.run(
        [
            "qemu-img",
            "dd",
            "-f",
            "qcow2",
            "-O",
            "raw",
            f"if={image}",
            f"of={out}",
            f"bs={length}",
            f"skip={block}",
            f"count={block + 1}",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        assert "Input/output error" in proc.stderr, proc.stderr
        return None
    data = out.read_bytes()
    assert len(data) == length, (len(data), proc.stderr)
    return data


# -- damaged snapshots (the "snapshots" base: snapshots 'first' and 'second') --------------


@dataclass(frozen=True)
class SnapshotDamage:
    """One way to damage the snapshot metadata of the "snapshots" base image.

    ``damaged`` names the snapshots sparsefs must refuse ("*": the whole
    table); ``qemu_opens`` tells whether QEMU 7.2 still opens the image (else
    sparsefs keeps a deliberate difference: the active disk is served);
    ``qemu_reads_damaged`` whether qemu-img convert -l still reads a damaged
    snapshot (then it serves zeros, see the README); ``words`` must appear in
    sparsefs's message.
    """

    name: str
    damaged: tuple[str, ...]
    qemu_opens: bool
    qemu_reads_damaged: bool
    words: str
    change: Callable[[bytearray, Located], None]


def _put_snapshot(
    index: int, name: str, value: Callable[[Located], int]
) -> Callable[[bytearray, Located], None]:
    off, fmt = SNAPSHOT_FIELDS[name]

    def change(buf: bytearray, loc: Located) -> None:
        put(buf, loc.snapshot_entries[index] + off, fmt, value(loc))

    return change


def _put_header(name: str, value: Callable[[Located], int]) -> Callable[[bytearray, Located], None]:
    pos, fmt = HEADER_FIELDS[name]

    def change(buf: bytearray, loc: Located) -> None:
        put(buf, pos, fmt, value(loc))

    return change


def _snapshot_l1(loc: Located, index: int) -> int:
    return int(struct.unpack_from(">Q", loc.raw, loc.snapshot_entries[index])[0])


def _move_table_cut(buf: bytearray, loc: Located) -> None:
    """Copy the snapshot table to the end of the file without its last 8 bytes."""
    last = loc.snapshot_entries[-1]
    extra, id_len, name_len = (
        struct.unpack_from(">I", loc.raw, last + 36)[0],
        *struct.unpack_from(">HH", loc.raw, last + 12),
    )
    table = loc.raw[loc.snapshots_offset : last + 40 + extra + id_len + name_len]
    new = -(-len(buf) // loc.cluster_size) * loc.cluster_size
    buf.extend(bytes(new - len(buf)))
    buf.extend(table[:-8])
    put(buf, HEADER_FIELDS["snapshots_offset"][0], ">Q", new)


SNAPSHOT_DAMAGES = [
    SnapshotDamage(
        "l1-offset-unaligned",
        ("first",),
        True,
        False,
        "is not cluster aligned",
        _put_snapshot(0, "l1_table_offset", lambda loc: _snapshot_l1(loc, 0) + 512),
    ),
    SnapshotDamage(
        "l1-size-too-large",
        ("first",),
        True,
        False,
        "L1 table too large",
        _put_snapshot(0, "l1_size", lambda loc: 0x1000000),
    ),
    SnapshotDamage(
        "l1-past-end",
        ("second",),
        True,
        True,
        "is past the end of the file",
        _put_snapshot(
            1,
            "l1_table_offset",
            lambda loc: -(-loc.file_size // loc.cluster_size) * loc.cluster_size,
        ),
    ),
    SnapshotDamage(
        "table-past-end",
        ("*",),
        True,
        False,
        "is past the end of the file",
        _put_header("snapshots_offset", lambda loc: 1 << 45),
    ),
    SnapshotDamage(
        "zero-entry",
        ("snapshot-3",),
        True,
        False,
        "too few for a virtual size",
        _put_header("nb_snapshots", lambda loc: loc.nb_snapshots + 1),
    ),
    SnapshotDamage(
        "table-runs-past-end",
        ("*",),
        True,
        False,
        "runs past the end of the file",
        lambda buf, loc: _move_table_cut(buf, loc),
    ),
    SnapshotDamage(
        "table-offset-unaligned",
        ("*",),
        False,
        False,
        "is not cluster aligned",
        _put_header("snapshots_offset", lambda loc: loc.snapshots_offset + 512),
    ),
    SnapshotDamage(
        "too-many-snapshots",
        ("*",),
        False,
        False,
        "qemu allows at most 65536",
        _put_header("nb_snapshots", lambda loc: 0xFFFFFFFF),
    ),
]


def damage_snapshots(src: Path, dst: Path, damage: SnapshotDamage) -> Located:
    """Copy the intact "snapshots" image ``src`` to ``dst`` with ``damage``.

    Returns the intact image, located.
    """
    loc = locate(src)
    buf = bytearray(loc.raw)
    damage.change(buf, loc)
    dst.write_bytes(buf)
    return loc
