"""Errors a user can cause, and how every command-line entry point reports them.

A user error (bad data, a wrong path, a bad configuration, an unusable checkpoint) ends a command as
one or a few lines naming the file, the record and what to do, with an exit status per class of
error, on every rank and without a traceback. ``CUMO_DEBUG=1`` in the environment brings the
traceback back for developers.

The error classes of the package (``ConfigError``, ``DataError``, ``ImageError``, the checkpoint
errors, ``TrainingDiverged``) derive from :class:`UserError` and say their own ``label`` and
``exit_status``; this module imports none of them, so it stays free of heavy imports.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional, Sequence

__all__ = [
    "DEBUG_ENV",
    "EXIT_CHECKPOINT",
    "EXIT_CONFIG",
    "EXIT_DATA",
    "EXIT_DIVERGED",
    "EXIT_FAILURE",
    "UserError",
    "debug_enabled",
    "format_user_error",
    "run_cli",
]

# Exit statuses, one per class of error, so scripts and schedulers can tell them apart.
EXIT_FAILURE = 1  # a check found problems (validate_data, sweeps) or an unclassified user error
EXIT_CONFIG = 2  # configuration / command line: bad key, value, flag or path given on the command line
EXIT_DIVERGED = 3  # training stopped: too many non-finite steps
EXIT_DATA = 4  # training or evaluation data: a record, a data file or an image
EXIT_CHECKPOINT = 5  # a checkpoint or release that cannot be read or used

DEBUG_ENV = "CUMO_DEBUG"


class UserError(Exception):
    """Base of the errors a user can cause and fix; ``label`` prefixes the message on stderr and
    ``exit_status`` is the command's exit status. Subclasses override both as class attributes."""

    label = "error"
    exit_status = EXIT_FAILURE


def debug_enabled() -> bool:
    """Whether ``CUMO_DEBUG`` asks for tracebacks (any value but empty, 0, false or no)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _rank_prefix() -> str:
    """``[rank R] `` under a multi-process launch (torchrun sets RANK and WORLD_SIZE), else empty."""
    world = os.environ.get("WORLD_SIZE")
    rank = os.environ.get("RANK")
    if rank is not None and world is not None and world != "1":
        return f"[rank {rank}] "
    return ""


def format_user_error(exc: UserError) -> str:
    """The lines printed for ``exc``: its label and its message (the README documents ``CUMO_DEBUG``;
    no hint line is added, so the message stays the last line a script reads)."""
    message = str(exc).strip() or type(exc).__name__
    return f"{_rank_prefix()}{exc.label}: {message}"


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Call ``main(argv)`` and turn a :class:`UserError` into its message and exit status.

    Anything else (a bug) keeps its traceback. With ``CUMO_DEBUG`` set, user errors keep theirs too.
    """
    try:
        return main(argv)
    except UserError as exc:
        if debug_enabled():
            traceback.print_exc()
        # One write, newline included: ranks share the launcher's stderr, and print's separate
        # write of the line end lets another rank's message land before it.
        sys.stderr.write(format_user_error(exc) + "\n")
        sys.stderr.flush()
        return exc.exit_status
