"""Checkpoint pointers, pruning, RNG capture, and NaN/Inf step handling (in-process, world of one)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from cumo_megatron.training import checkpointing as ckpt
from cumo_megatron.training.loop import Trainer, TrainingDiverged
from cumo_megatron.training.metrics import truncate_jsonl
from tests.training.faults import FaultInjection
from tests.training.workers import experiment, read_metrics


def _fake_checkpoint(root, iteration: int, complete: bool = True):
    path = ckpt.iteration_dir(root, iteration)
    if not complete:
        path = path.with_name(path.name + ".tmp")
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    return path


def test_latest_pointer_and_pruning(tmp_path):
    assert ckpt.load_latest(tmp_path) is None
    for it in (2, 4, 6):
        _fake_checkpoint(tmp_path, it)
    _fake_checkpoint(tmp_path, 8, complete=False)  # an interrupted save
    assert ckpt.list_checkpoints(tmp_path) == [2, 4, 6]
    ckpt.write_latest(tmp_path, 6)
    assert ckpt.load_latest(tmp_path) == tmp_path / "iter_0000006"
    assert ckpt.prune_checkpoints(tmp_path, keep_last=2, protect=6) == [2]
    assert ckpt.list_checkpoints(tmp_path) == [4, 6]
    assert (tmp_path / "iter_0000008.tmp").is_dir()  # never listed, never loaded


def test_latest_naming_a_missing_checkpoint_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("iter_0000010\n")
    with pytest.raises(ckpt.CheckpointError, match="missing or incomplete"):
        ckpt.load_latest(tmp_path)
    (tmp_path / "latest").write_text("garbage")
    with pytest.raises(ckpt.CheckpointError, match="not an iter_XXXXXXX"):
        ckpt.load_latest(tmp_path)


def test_resume_refuses_checkpoints_it_cannot_continue_exactly(tmp_path):
    path = _fake_checkpoint(tmp_path, 2)  # no train_state.json: not written by this trainer
    with pytest.raises(ckpt.CheckpointError, match="cannot be resumed; start a new run with train.load="):
        ckpt.load_checkpoint(path, None, None, None, None)
    (path / ckpt.TRAIN_STATE).write_text(json.dumps({"iteration": 2, "world_size": 2}))
    with pytest.raises(ckpt.CheckpointError, match="saved by 2 processes, this run has 1"):
        ckpt.load_checkpoint(path, None, None, None, None)


def test_rng_state_round_trip():
    import cumo_megatron.platform as platform
    from megatron.core import tensor_parallel

    platform.initialize(platform.ParallelSizes(), seed=5)
    state = ckpt.rng_state()

    def draw():
        with tensor_parallel.get_cuda_rng_tracker().fork():
            tracked = torch.rand(3)
        return torch.rand(3), tracked, np.random.rand(), random.random()

    first = draw()
    ckpt.set_rng_state(state)
    second = draw()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[2:] == second[2:]


def test_truncate_jsonl_drops_rows_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    truncate_jsonl(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_non_finite_steps_are_skipped_then_stop_the_run(dataset, tmp_path):
    # One poisoned step: skipped (no update, schedule not advanced), counted, training goes on.
    cfg = experiment(dataset, str(tmp_path / "one"), stage=2, train_steps=3, save_interval=0,
                     global_batch_size=1, warmup_fraction=0.0)
    trainer = Trainer(cfg, events=FaultInjection(nan_steps={2})).setup()
    rows = trainer.train()
    assert [r["skipped"] for r in rows] == [False, True, False]
    assert rows[1]["skipped_total"] == 1 and rows[2]["bad_steps"] == 0
    assert rows[2]["lr"] == rows[1]["lr"]  # the scheduler did not move on the skipped step
    assert all(np.isfinite(r["lm_loss"]) for r in rows)
    # max_bad_steps in a row: a clear error, and the last good checkpoint stays `latest`.
    cfg = experiment(dataset, str(tmp_path / "many"), stage=2, train_steps=4, save_interval=1,
                     global_batch_size=1, max_bad_steps=2)
    with pytest.raises(TrainingDiverged, match=r"2 consecutive steps .*iter_0000001"):
        Trainer(cfg, events=FaultInjection(nan_steps={2, 3, 4})).train()
    rows = read_metrics(tmp_path / "many")
    assert [r["skipped"] for r in rows] == [False, True, True]
    assert ckpt.load_latest(tmp_path / "many").name == "iter_0000001"
