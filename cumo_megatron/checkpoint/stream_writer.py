"""The file side of the streaming checkpoint writer: early writeback and no CRC pass.

PyTorch's serial ``FileSystemWriter`` as the streaming save uses it, with two changes that more
than halve a conversion's time (2.2 GB TinyLlama-shaped checkpoint on the 2-core VM, repeated in one
process: 6.4-7.3 s -> 2.4-2.9 s; in a fresh process, as ``bench/convert.py`` runs it, 2.9-3.9 s):

- `WritebackFile` starts the kernel's writeback of every `WRITEBACK_CHUNK` as soon as it is
  written and lets the kernel drop the pages already on disk. The final ``fsync`` (kept: the
  output directory is renamed into place and must survive a crash, as megatron's own writer
  ensures) then finds almost nothing left to write (1.0 s -> 0.05 s here) instead of waiting for
  the whole checkpoint, and the page cache recycles its pages rather than growing by the
  checkpoint's size (writing into recycled pages is also faster than into fresh ones).
- `no_record_crc32` turns off the CRC-32 that ``torch.save`` computes over every record while the
  checkpoint is written: a whole extra pass over the data (~1.2 s of the above). ``torch.load``,
  and so megatron's loader, does not check it; only a zip tool testing a ``.distcp`` member
  would notice.

The checkpoint's keys, shapes, offsets and values are those of megatron's own writer (tested in
``tests/checkpoint/test_streaming.py``).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Iterator

import torch

WRITEBACK_CHUNK = 64 << 20  # bytes written between two writeback requests

_HAS_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")


class WritebackFile(io.FileIO):
    """A file opened for writing that hands each written `WRITEBACK_CHUNK` to the kernel's
    writeback at once and lets the kernel drop the pages written back before.

    On Linux ``posix_fadvise(DONTNEED)`` does both without waiting: it starts writeback of the
    range's dirty pages and drops its clean ones. Where there is no ``posix_fadvise`` (macOS), or
    the file system refuses the advice, this is a plain unbuffered file.
    """

    def __init__(self, path: str | Path, mode: str = "wb"):
        super().__init__(str(path), mode)
        self._kicked = 0  # bytes already handed to writeback
        self._advise = _HAS_FADVISE

    def write(self, data) -> int:
        """Write ``data``; start writeback once a chunk has accumulated."""
        written = super().write(data)
        end = self.tell()
        if self._advise and end - self._kicked >= WRITEBACK_CHUNK:
            try:
                # The earlier chunks are on disk by now: their clean pages can go. A page still
                # under writeback stays, and the next call tries it again. (A length of 0 would
                # mean "to the end of the file".)
                if self._kicked:
                    os.posix_fadvise(self.fileno(), 0, self._kicked, os.POSIX_FADV_DONTNEED)
                os.posix_fadvise(self.fileno(), self._kicked, end - self._kicked, os.POSIX_FADV_DONTNEED)
            except OSError:  # a file system that takes no advice: write on without it
                self._advise = False
            self._kicked = end
        return written


def _filesystem_class():
    from torch.distributed.checkpoint.filesystem import FileSystem

    class WritebackFileSystem(FileSystem):
        """PyTorch's local ``FileSystem`` whose write streams are `WritebackFile`s."""

        @contextlib.contextmanager
        def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
            if mode != "wb":
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with WritebackFile(path, "wb") as stream:
                yield stream

    return WritebackFileSystem


def writeback_writer(path: str | Path):
    """PyTorch's ``FileSystemWriter`` for ``path`` as the streaming save needs it: one file, one
    thread (one tensor in flight), output synced at the end, written through `WritebackFile`."""
    from torch.distributed.checkpoint import FileSystemWriter

    writer = FileSystemWriter(str(path), single_file_per_rank=True, thread_count=1, sync_files=True)
    writer.fs = _filesystem_class()()
    return writer


@contextlib.contextmanager
def no_record_crc32() -> Iterator[None]:
    """``torch.save`` without its per-record CRC-32 for the duration (the setting is restored)."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


__all__ = ["WRITEBACK_CHUNK", "WritebackFile", "writeback_writer", "no_record_crc32"]
