"""Where a run's checkpoints are: ``iter_N`` directories, the ``latest`` pointer, keep-last-N.

Plain file operations (no torch, no megatron), so that light processes (the quickstart's
orchestrator, tools reading a run) can find a run's newest checkpoint cheaply.

Layout of ``<save>/``: ``latest`` names the newest *complete* ``iter_XXXXXXX`` directory;
``iter_N.tmp`` is a save in progress or one that was interrupted (never listed, never loaded).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

from cumo_megatron.errors import EXIT_CHECKPOINT, UserError

LATEST = "latest"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used, with what to do about it."""

    label = "checkpoint error"
    exit_status = EXIT_CHECKPOINT


def iteration_dir(save_dir: str | os.PathLike, iteration: int) -> Path:
    """``<save_dir>/iter_XXXXXXX``."""
    return Path(save_dir) / f"iter_{iteration:07d}"


def read_latest(save_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint ``latest`` names, or None when there is none yet.

    Raises `CheckpointError` when ``latest`` names a directory that is missing or incomplete.
    """
    pointer = Path(save_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _ITER_RE.match(name):
        raise CheckpointError(f"{pointer} holds {name!r}, not an iter_XXXXXXX name; fix or delete the file")
    path = Path(save_dir) / name
    if not (path / "metadata.json").is_file():
        raise CheckpointError(
            f"{pointer} names {path}, which is missing or incomplete (no metadata.json); "
            "point `latest` at an earlier iter_* directory or remove it to start afresh"
        )
    return path


def load_latest(save_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint a resumed run continues from (``latest``), or None for a fresh start."""
    return read_latest(save_dir)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_latest(save_dir: Path, iteration: int) -> None:
    """Point ``latest`` at ``iter_<iteration>`` atomically (temp file, fsync, ``os.replace``)."""
    tmp = save_dir / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(iteration_dir(save_dir, iteration).name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, save_dir / LATEST)
    fsync_dir(save_dir)


def list_checkpoints(save_dir: str | os.PathLike) -> list[int]:
    """Iterations of the complete (renamed) checkpoints in ``save_dir``, ascending."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER_RE.match(p.name))]
    return sorted(found)


def prune_checkpoints(save_dir: str | os.PathLike, keep_last: int, protect: int) -> list[int]:
    """Delete all but the newest ``keep_last`` checkpoints (never ``protect``); return what went."""
    if keep_last <= 0:
        return []
    its = list_checkpoints(save_dir)
    doomed = [it for it in its[:-keep_last] if it != protect]
    for it in doomed:
        shutil.rmtree(iteration_dir(save_dir, it), ignore_errors=True)
    return doomed
