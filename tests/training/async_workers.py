"""A slow checkpoint writer for the asynchronous-save tests, and an entry point that trains with it.

`stall_writes` wraps megatron's per-file writer (`FileSystemWriterAsync.write_preloaded_data`, run
in the helper processes that the forked checkpoint writer starts) so that the files of chosen
checkpoints are written only after a sleep. Each stalled helper first leaves a marker
``<markers>/iter<N>-pid<helper>-ppid<writer>`` so a test knows the write is under way and which
processes do it. Test-side only: the trainer knows nothing of it.

    python -m tests.training.async_workers --stall 4:60 --markers DIR -- --config FILE.yaml ...

trains like ``python -m cumo_megatron.train --config FILE.yaml ...`` with checkpoint 4's files
stalled for 60 s.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

_ITER = re.compile(r"iter_(\d{7})\.tmp")


def stall_writes(stalls: dict[int, float], markers: str | Path) -> None:
    """Make the files of checkpoint ``N`` wait ``stalls[N]`` seconds before they are written."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    FileSystemWriterAsync.write_preloaded_data = stalled_writer(stalls, markers)


def stalled_writer(stalls: dict[int, float], markers: str | Path) -> staticmethod:
    """The stalling replacement of `FileSystemWriterAsync.write_preloaded_data` (`stall_writes`)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.write_preloaded_data
    markers = Path(markers)

    def stalled(transform_list, local_proc_idx, write_bucket, *args, **kwargs):
        found = _ITER.search(str(write_bucket[0]))  # the file's path, under iter_N.tmp
        iteration = int(found.group(1)) if found else None
        if iteration in stalls:
            markers.mkdir(parents=True, exist_ok=True)
            (markers / f"iter{iteration}-pid{os.getpid()}-ppid{os.getppid()}").touch()
            time.sleep(stalls[iteration])
        return original(transform_list, local_proc_idx, write_bucket, *args, **kwargs)

    return staticmethod(stalled)


def stalled_writers(markers: str | Path, iteration: int) -> list[tuple[int, int]]:
    """``(helper pid, writer pid)`` of each stalled file of checkpoint ``iteration`` so far."""
    found = []
    for marker in Path(markers).glob(f"iter{iteration}-pid*-ppid*"):
        pid, ppid = re.match(r"iter\d+-pid(\d+)-ppid(\d+)$", marker.name).groups()
        found.append((int(pid), int(ppid)))
    return found


def main() -> int:
    """Parse ``--stall N:SECONDS`` (repeatable) and ``--markers``, then train with the rest."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--stall", action="append", default=[])
    parser.add_argument("--markers", required=True)
    args, rest = parser.parse_known_args()
    stall_writes({int(n): float(s) for n, s in (item.split(":") for item in args.stall)}, args.markers)
    from cumo_megatron.train import main as train_main

    return train_main([a for a in rest if a != "--"])


# megatron's checkpoint writer starts processes that re-import __main__: keep this guard.
if __name__ == "__main__":
    sys.exit(main())
