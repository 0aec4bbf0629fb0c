"""Points of a training run where code outside the trainer may act: `TrainingEvents`.

The trainer calls these at moments where its state is well defined; the default does nothing.
A subclass passed to `training.loop.Trainer` (or `training.loop.run`, `cumo_megatron.train.main`)
can watch a run from inside its processes: start a profiler at step N, upload each committed
checkpoint, log gradient statistics. The tests inject their faults through the same points
(tests/training/faults.py: SIGKILL while a checkpoint is uncommitted, NaN gradients), so the
production loop carries no test hook.
"""

from __future__ import annotations

from pathlib import Path


class TrainingEvents:
    """Callbacks of one run; every method runs on every rank, in the same order, and may be
    collective (it is called at the same point everywhere). The default does nothing."""

    def gradients_ready(self, trainer, step: int) -> None:
        """Step ``step``'s gradients are reduced into DDP's buffers (``trainer.ddp``), before the
        trainer checks that they are finite and the optimizer applies them."""

    def checkpoint_written(self, trainer, iteration: int, tmp: Path) -> None:
        """Checkpoint ``iteration`` is complete under ``tmp`` (every rank's write is done) and not
        yet ``latest``. With ``train.async_save`` this comes when its write finishes, possibly
        some steps after it started."""

    def checkpoint_committed(self, trainer, iteration: int, path: Path) -> None:
        """Checkpoint ``iteration`` is renamed to ``path`` and ``latest`` names it."""
