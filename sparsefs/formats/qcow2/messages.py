"""Wording shared by the qcow2 modules' one-line error messages."""

from __future__ import annotations


def size_text(nb_bytes: int) -> str:
    """``nb_bytes`` exactly, in the largest binary unit that divides it: "64 KiB", "1000 bytes"."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nb_bytes and not nb_bytes % (1 << shift):
            return f"{nb_bytes >> shift} {unit}"
    return f"{nb_bytes} bytes"


def past_end_text(host_offset: int, length: int, file_size: int) -> str:
    """ "at 0x30000 (64 KiB) runs past the end of the file (0x3c000)", or "is past" when
    the range starts at or after the end."""
    verb = "is" if host_offset >= file_size else "runs"
    return (
        f"at {host_offset:#x} ({size_text(length)}) {verb} past the end of the file "
        f"({file_size:#x})"
    )
