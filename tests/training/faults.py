"""Fault injection for the training tests, through the trainer's events (`training.events`).

`FaultInjection` SIGKILLs every rank while a checkpoint is written but not committed
(``kill_during_save=N``), right after it is committed (``kill_after_save=N``), and fills the
gradients of chosen steps with NaN (``nan_steps``). In-process tests pass it to `Trainer`;
killed runs go through the real entry point wrapped by this module:

    python -m tests.training.faults --kill-during-save 4 -- --config FILE.yaml [overrides]

trains like ``python -m cumo_megatron.train --config FILE.yaml [overrides]`` with that fault.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cumo_megatron.training.events import TrainingEvents


def kill_self() -> None:
    """SIGKILL this process (output flushed first): no handler, no cleanup, as a node failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class FaultInjection(TrainingEvents):
    """The faults of one run (module docstring); each rank applies them at the same point."""

    kill_after_save: Optional[int] = None
    kill_during_save: Optional[int] = None
    nan_steps: set[int] = field(default_factory=set)

    def gradients_ready(self, trainer, step: int) -> None:
        """Poison this step's gradients (the first buffer is enough to make the norm NaN)."""
        if step in self.nan_steps:
            buffers = list(trainer.ddp.buffers) + list(trainer.ddp.expert_parallel_buffers)
            buffers[0].grad_data.fill_(float("nan"))

    def checkpoint_written(self, trainer, iteration: int, tmp: Path) -> None:
        """Die with checkpoint ``iteration`` complete under ``tmp`` and not ``latest``."""
        if iteration == self.kill_during_save:
            kill_self()

    def checkpoint_committed(self, trainer, iteration: int, path: Path) -> None:
        """Die right after checkpoint ``iteration`` became ``latest``."""
        if iteration == self.kill_after_save:
            kill_self()


def main() -> int:
    """Parse the faults, then train with the arguments after them (``--`` optional)."""
    parser = argparse.ArgumentParser(allow_abbrev=False)  # the rest holds the trainer's own options
    parser.add_argument("--kill-after-save", type=int)
    parser.add_argument("--kill-during-save", type=int)
    parser.add_argument("--nan-steps", default="")
    args, rest = parser.parse_known_args()
    faults = FaultInjection(args.kill_after_save, args.kill_during_save,
                            {int(s) for s in args.nan_steps.split(",") if s.strip()})
    from cumo_megatron.train import main as train_main

    return train_main([a for a in rest if a != "--"], events=faults)


# megatron's checkpoint writer starts processes that re-import __main__: keep this guard.
if __name__ == "__main__":
    sys.exit(main())
