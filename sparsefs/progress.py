"""A one-line terminal progress bar: bytes done / total, rate, ETA.

Drawn on stderr (or any text stream) only when that stream is a terminal and
the caller did not ask for quiet; redrawn at most ``max_rate`` times a second
however often :meth:`Progress.update` is called, so callers can report every
block; the first draw also waits one interval, so short jobs draw nothing.
Used by ``sparsefs checksum``, ``verify`` and ``backup``.

Imports nothing from sparsefs.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """``n`` bytes with a binary unit, 3 significant digits: ``1.5 GiB``, ``512 B``."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``seconds`` as ``m:ss`` or ``h:mm:ss``."""
    total = max(0, int(seconds + 0.5))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A progress line for a job of ``total`` bytes.

    Args:
        total: bytes the job covers (0 is allowed: the bar shows 100%).
        label: text in front of the bar (a file name).
        stream: where to draw; default ``sys.stderr``.
        enabled: draw at all; default: when ``stream`` is a terminal.
        max_rate: redraws per second at most.
        clock: monotonic seconds; tests pass a fake one.
        width: columns to use; default: the terminal width.
    """

    def __init__(
        self,
        total: int,
        *,
        label: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        max_rate: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        width: int | None = None,
    ) -> None:
        self.total = max(0, total)
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self._min_interval = 1.0 / max_rate if max_rate > 0 else 0.0
        self._clock = clock
        self._width = width
        self._start = clock()
        # The first draw waits one interval too: jobs shorter than that never draw.
        self._last_draw: float | None = self._start
        self._drawn = False
        self.done = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, done: int) -> None:
        """Set the bytes done so far; redraw if the last redraw is old enough."""
        self.done = min(max(done, 0), self.total) if self.total else done
        if not self.enabled:
            return
        now = self._clock()
        if self._last_draw is not None and now - self._last_draw < self._min_interval:
            return
        self._draw(now)

    def advance(self, nbytes: int) -> None:
        """Add ``nbytes`` to the bytes done."""
        self.update(self.done + nbytes)

    def line(self, now: float | None = None) -> str:
        """The progress line as it would be drawn now (no terminal codes)."""
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 0.0)
        fraction = 1.0 if self.total == 0 else self.done / self.total
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.done >= self.total:
            eta = "0:00"
        elif rate > 0:
            eta = human_duration((self.total - self.done) / rate)
        else:
            eta = "--:--"
        stats = (
            f" {fraction * 100:3.0f}% {human_bytes(self.done)} / {human_bytes(self.total)}"
            f"  {human_bytes(rate)}/s  ETA {eta}"
        )
        width = self._width or self._columns()
        width = max(width - 1, 20)  # never touch the last column (no wrap)
        label = self.label
        bar_space = width - len(stats) - 2  # "[...]"
        if label:
            room = max(bar_space - 12, 0)  # keep at least 10 columns of bar
            if len(label) > room:
                label = "..." + label[-(room - 3) :] if room > 3 else ""
            bar_space -= len(label) + 1 if label else 0
        bar_space = max(bar_space, 0)
        filled = int(bar_space * fraction)
        bar = "[" + "#" * filled + "-" * (bar_space - filled) + "]"
        text = (f"{label} " if label else "") + bar + stats
        return text[:width]

    def _columns(self) -> int:
        """Width of the terminal the stream writes to (80 when unknown)."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
            import shutil  # rarely needed: not at every command's start-up

            return shutil.get_terminal_size((80, 24)).columns

    def _draw(self, now: float) -> None:
        self.stream.write("\r" + self.line(now) + "\x1b[K")
        self.stream.flush()
        self._last_draw = now
        self._drawn = True

    def clear(self) -> None:
        """Erase the line (before printing something else on the terminal)."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def close(self) -> None:
        """Erase the line; the caller prints the result.  Idempotent."""
        self.clear()
