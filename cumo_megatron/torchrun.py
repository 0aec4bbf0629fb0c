"""torchrun, ending a failed job the way our ranks end: its report, the failed rank's exit status.

    python -m cumo_megatron.torchrun [torchrun's arguments]

The stage scripts launch through this (bash style, unless ``TORCHRUN`` names another launcher).
It is torch's own ``torch.distributed.run.main`` with one difference: when a rank fails, torchrun
raises ``ChildFailedError`` out of its ``main``, so the user reads a Python traceback of the
launcher's frames under the rank's one-line message, and the job exits 1 whatever the rank's exit
status said (4 for bad data, 2 for a bad config: `cumo_megatron.errors`). Here the exception's
own report (the table of failed ranks, their exit codes and times) is printed without the
traceback, and the process exits with the first failed rank's status (128 + N for a rank killed
by signal N, as a shell reports it). ``CUMO_DEBUG=1`` re-raises, for the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def exit_status(exitcode: int) -> int:
    """A process's exit status as a shell reports it: the code itself, 128 + N for signal N, and 1
    for a failure with no code (status 0 would read as success)."""
    if exitcode > 0:
        return min(exitcode, 255)
    if exitcode < 0:
        return 128 + min(-exitcode, 127)
    return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run torchrun with ``argv``; 0 on success, else the first failed rank's exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(list(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as err:
        if os.environ.get("CUMO_DEBUG") == "1":
            raise
        print(str(err), file=sys.stderr, flush=True)
        _rank, failure = err.get_first_failure()
        return exit_status(failure.exitcode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
