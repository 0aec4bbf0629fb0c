"""Files that appear complete or not at all, readable as the user's umask says."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_UMASK_RE = re.compile(r"^Umask:\s*([0-7]+)\s*$", re.MULTILINE)


def current_umask() -> int:
    """The process's file-creation mask.

    Read from ``/proc/self/status`` where Linux reports it (no side effect, safe with threads); the
    portable fallback sets it and puts it back at once, because ``os.umask`` only reads by writing.
    """
    try:
        match = _UMASK_RE.search(Path("/proc/self/status").read_text())
    except OSError:
        match = None
    if match:
        return int(match.group(1), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the umask (``mkstemp`` would give 0600)."""
    return 0o666 & ~current_umask()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` as it is (no newline translation) through a temporary file in the
    same directory, renamed over ``path``: a crash, or a reader at the same moment, never sees a
    half-written file. The directory is created if needed; the temporary file is removed on failure.

    The file gets the mode a plain ``open()`` would give it (``0o666 & ~umask``), not the private
    0600 of ``mkstemp``: checkpoint and result directories are often shared between users.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


__all__ = ["current_umask", "default_file_mode", "write_text_atomic"]
