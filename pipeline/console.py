"""What a run tells its user on the terminal, apart from the per-epoch records.

Every message is one line that starts with ``localpipe:`` and goes to stderr in a single
write, so that the lines of several ranks sharing a terminal never interleave.
"""
from __future__ import annotations

import os
import sys


def say(text: str) -> None:
    """Write ``localpipe: text`` on stderr, whole."""
    data = f"localpipe: {text}\n".encode(errors="replace")
    try:
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), data)
    except (OSError, ValueError):  # no real file behind stderr (a test's capture)
        sys.stderr.write(data.decode())
        sys.stderr.flush()
