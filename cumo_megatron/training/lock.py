"""One trainer per save directory: an exclusive ``flock`` on ``<train.save>/.lock``.

Two trainings writing one directory (a re-run started while orphaned ranks of a killed torchrun
still train) would interleave checkpoints, ``latest`` and metrics. Global rank 0 takes a
non-blocking exclusive `fcntl.flock` on ``<save>/.lock`` and writes its pid, host and start time
into it; the lock lives as long as the trainer holds the file open. The kernel drops a flock when
the last descriptor of the open file goes away, so a SIGKILLed holder never leaves a stale lock
behind (the file stays, its content is only read while someone holds the lock).

Forked children (DataLoader workers, megatron's checkpoint-writer helpers) would inherit the
descriptor and with it the lock, keeping it after the trainer was SIGKILLed: an at-fork hook
closes their copy.

Rank 0 broadcasts the outcome over the world group, so every rank of a refused trainer raises the
same `SaveDirLocked` (a `ConfigError`: the entry point prints it as one line).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO, Optional

import torch
import torch.distributed as dist

from cumo_megatron.config.loader import ConfigError
from cumo_megatron.models.parallelize import comm_device

LOCK_NAME = ".lock"

# Open lock files of this process; the at-fork hook closes the child's copies.
_HELD: list[IO] = []


def _close_in_child() -> None:
    # Closing one descriptor of the shared open file does not unlock it (only the last one, or
    # LOCK_UN, does): the parent keeps its lock, and the child no longer props it up.
    for handle in _HELD:
        try:
            handle.close()
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class SaveDirLocked(ConfigError):
    """Another training holds the save directory's lock."""


def _holder_text(path: Path) -> str:
    """``pid 123@host since 2026-...`` from the lock file (best effort: it may be mid-write)."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if "pid" not in info:
        return "another process (no holder recorded yet)"
    return f"pid {info['pid']}@{info.get('host', '?')} since {info.get('since', '?')}"


def _broadcast_message(message: str) -> str:
    """Rank 0's ``message`` ("" for success) on every rank: a length, then the UTF-8 bytes."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return message
    device = comm_device()
    payload = message.encode() if dist.get_rank() == 0 else b""
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    if int(length.item()) == 0:
        return ""
    data = torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(data, src=0)
    return bytes(data.cpu().tolist()).decode()


class SaveDirLock:
    """The lock of one save directory; `acquire` takes it (collective), `release` lets it go."""

    def __init__(self, directory: Path, handle: Optional[IO]):
        self.directory = directory
        self.path = directory / LOCK_NAME
        self._handle = handle  # rank 0 only

    @classmethod
    def acquire(cls, directory: str | os.PathLike) -> "SaveDirLock":
        """Create ``directory`` and lock it on global rank 0; every rank raises `SaveDirLocked` if taken.

        Collective when torch.distributed is initialised: every rank must call it.
        """
        directory = Path(directory)
        rank = dist.get_rank() if dist.is_initialized() else 0
        handle, message = None, ""
        if rank == 0:
            handle, message = cls._try_lock(directory)
        message = _broadcast_message(message)
        if message:
            raise SaveDirLocked(message)
        return cls(directory, handle)

    @staticmethod
    def _try_lock(directory: Path) -> tuple[Optional[IO], str]:
        path = directory / LOCK_NAME
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # "a+": never truncate before holding the lock (the holder's record would be lost).
            handle = open(path, "a+")
        except OSError as exc:
            return None, f"train.save={directory}: cannot create the lock file {path}: {exc}"
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None, (
                f"train.save={directory} is in use by another training ({_holder_text(path)}, lock {path}): "
                "wait for it to finish, kill it, or choose another train.save"
            )
        _HELD.append(handle)
        since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n")
        handle.flush()
        return handle, ""

    @property
    def held(self) -> bool:
        """Whether this process holds the lock (rank 0 between `acquire` and `release`)."""
        return self._handle is not None

    def release(self) -> None:
        """Let the lock go (idempotent; a no-op on ranks other than 0)."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        if handle in _HELD:
            _HELD.remove(handle)
        handle.close()  # closing the only descriptor drops the flock
