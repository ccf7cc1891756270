"""Writing the run's files so that a reader never sees half of one, and a failure is one line
naming the file. Free of torch, for the sidecar process too."""
from __future__ import annotations

import os
import tempfile
import time
from typing import BinaryIO, Callable


def _file_mode() -> int:
    """What a plain ``open`` would give a new file: 0666 less this process's umask."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = 0o022
    return 0o666 & ~umask


FILE_MODE = _file_mode()


class WriteError(RuntimeError):
    """A file of the run could not be written (disk full, permissions): one line naming it."""


def atomic_write(path: str, write: Callable[[BinaryIO], None], pause: float = 0.0) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then rename it over
    ``path``: a reader sees the old file or the whole new one, never a part."""
    folder = os.path.dirname(path) or "."
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 would hide results from the rest of a team
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        time.sleep(pause)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
