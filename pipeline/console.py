"""What a run shows on the terminal: one progress bar, and one-line messages above it.

Rank 0 shows one bar for the whole run (the epoch, batches done, the overall ETA) on stderr,
on a terminal or with --progress-bar, and otherwise the same as a plain line on stdout every
half minute; epoch summaries and messages are written above the bar, never into it. Every message is one line that starts with ``localpipe:`` and, with no bar to redraw,
goes to stderr in a single write, so that the lines of several ranks never interleave.
"""
from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm


def say(text: str) -> None:
    """Write ``localpipe: text`` on stderr, whole, above the progress bar if there is one."""
    line = f"localpipe: {text}"
    if _bar_shown():
        tqdm.write(line, file=sys.stderr)
        return
    data = (line + "\n").encode(errors="replace")
    try:
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), data)
    except (OSError, ValueError):  # no real file behind stderr (a test's capture)
        sys.stderr.write(data.decode())
        sys.stderr.flush()


def _bar_shown() -> bool:
    return any(not bar.disable for bar in list(getattr(tqdm, "_instances", ())))


def show(text: str) -> None:
    """Write a block of text (an epoch's summary) on stdout, above the progress bar."""
    if _bar_shown():
        for line in text.splitlines():
            tqdm.write(line, file=sys.stdout)
    else:
        print(text, flush=True)


class Progress:
    """The run's bar: training batches of the whole run, so its ETA is the run's. Where no bar
    is shown (output to a file, a batch job's log), a plain line every ``every`` seconds says
    the same, so that a long first epoch is never silent."""

    def __init__(self, shown: bool, epochs: int, total: int, lines: bool = True,
                 every: float = 30.0) -> None:
        self.epochs, self.total, self.done, self.text = epochs, total, 0, ""
        self.bar = tqdm(total=total, unit="batch", file=sys.stderr,
                        disable=not shown, dynamic_ncols=True, leave=False,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                   "batches [{elapsed}<{remaining}, {rate_fmt}]{postfix}")
        self.every = every if lines and not shown else None
        self.since = time.monotonic()
        self.next = self.since + every

    def epoch(self, epoch: int, phase: str = "") -> None:
        self.text = f"epoch {epoch}/{self.epochs}" + (f" {phase}" if phase else "")
        self.bar.set_description_str(self.text)

    def advance(self) -> None:
        self.bar.update()
        self.done += 1
        if self.every is not None and time.monotonic() >= self.next:
            self.next = time.monotonic() + self.every
            rate = self.done / (time.monotonic() - self.since)
            left = (self.total - self.done) / rate
            show(f"{self.text}: {self.done:,}/{self.total:,} batches of the run, "
                 f"{rate:,.1f} batches/s, about {_duration(left)} left")

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d}"


def shown(requested: bool) -> bool:
    """Whether to show a bar: asked for, or stderr is a terminal."""
    return requested or sys.stderr.isatty()
