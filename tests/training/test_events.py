"""The trainer's events (`training.events`): called at the points and with the state they promise."""

from __future__ import annotations

import math

import torch

from cumo_megatron.training.checkpointing import read_latest
from cumo_megatron.training.events import TrainingEvents
from cumo_megatron.training.loop import Trainer
from tests.training.workers import experiment, read_metrics


class _Recorder(TrainingEvents):
    """Notes each event with what the run looked like at that moment."""

    def __init__(self):
        self.seen = []

    def gradients_ready(self, trainer, step):
        grads = [b.grad_data for b in list(trainer.ddp.buffers) + list(trainer.ddp.expert_parallel_buffers)]
        norm = math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads))
        self.seen.append(("gradients", step, trainer.iteration, norm))

    def checkpoint_written(self, trainer, iteration, tmp):
        latest = read_latest(trainer.out)
        self.seen.append(("written", iteration, tmp.name, (tmp / "metadata.json").is_file(),
                          latest.name if latest else None))

    def checkpoint_committed(self, trainer, iteration, path):
        self.seen.append(("committed", iteration, path.name, read_latest(trainer.out).name))


def test_events_come_in_order_with_the_state_they_promise(dataset, tmp_path):
    events = _Recorder()
    cfg = experiment(dataset, str(tmp_path / "run"), stage=2, train_steps=3, save_interval=2,
                     global_batch_size=1, warmup_fraction=0.0)
    Trainer(cfg, events=events).train()
    gradients = [e for e in events.seen if e[0] == "gradients"]
    # Each step's gradients, before its update (the iteration has not moved yet), and reduced:
    # the norm the optimizer then reports for the step (clipping happens after).
    assert [(step, iteration) for _, step, iteration, _ in gradients] == [(1, 0), (2, 1), (3, 2)]
    rows = read_metrics(tmp_path / "run")
    for (_, _, _, norm), row in zip(gradients, rows):
        assert norm > 0 and torch.isclose(torch.tensor(norm), torch.tensor(row["grad_norm"]), rtol=1e-4)
    checkpoints = [e for e in events.seen if e[0] != "gradients"]
    assert checkpoints == [
        ("written", 2, "iter_0000002.tmp", True, None),  # complete on disk, not `latest` yet
        ("committed", 2, "iter_0000002", "iter_0000002"),
        ("written", 3, "iter_0000003.tmp", True, "iter_0000002"),
        ("committed", 3, "iter_0000003", "iter_0000003"),
    ]
    # Checkpoint 2's events between step 2's gradients and step 3's.
    order = [e[:2] for e in events.seen]
    assert order.index(("gradients", 2)) < order.index(("written", 2)) < order.index(("gradients", 3))
