"""bf16 and fp16 training through megatron-core's mixed precision (issue 10).

The model computes in its training dtype inside megatron's ``Float16Module``, the distributed
optimizer keeps fp32 main weights, fp16 scales its loss dynamically (overflowing steps skipped by
the scaler and counted, never mistaken for divergence), and a resumed half-precision run repeats
the straight run bit for bit. World of one, in this process, from the shared tiny initial weights.
"""

from __future__ import annotations

import math

import pytest
import torch

from cumo_megatron.training.loop import Trainer
from tests.training.workers import experiment, left_after_save, read_metrics

STEPS = dict(train_steps=8, save_interval=2, keep_last=4, global_batch_size=4)


def _train(cfg) -> tuple[Trainer, list[dict]]:
    trainer = Trainer(cfg).setup()
    try:
        rows = trainer.train()
    finally:
        import cumo_megatron.platform as platform

        platform.destroy()
    return trainer, rows


@pytest.fixture(scope="module")
def runs(dataset, init_weights, tmp_path_factory) -> dict:
    """The same stage-3 run in fp32, bf16 and fp16 (fp16 starting at a loss scale that overflows)."""
    out = {}
    for precision, extra in (("fp32", {}), ("bf16", {}),
                             ("fp16", dict(initial_loss_scale=2.0**22, loss_scale_hysteresis=1, max_bad_steps=1))):
        save = tmp_path_factory.mktemp(f"mp-{precision}")
        cfg = experiment(dataset, str(save), load=init_weights, **STEPS, **extra)
        cfg.model.precision = precision
        trainer, rows = _train(cfg)
        out[precision] = {"trainer": trainer, "rows": rows, "cfg": cfg, "save": save}
    return out


def test_half_precision_trains_like_fp32(runs):
    """Same weights and data: the first step's loss agrees with fp32 to bf16/fp16 precision, and
    every run's loss falls over 8 steps."""
    fp32 = [r["lm_loss"] for r in runs["fp32"]["rows"]]
    for precision, tolerance in (("bf16", 2e-2), ("fp16", 5e-3)):
        losses = [r["lm_loss"] for r in runs[precision]["rows"]]
        assert all(math.isfinite(x) for x in losses)
        assert abs(losses[0] - fp32[0]) / fp32[0] < tolerance, (precision, losses[0], fp32[0])
        assert losses[-1] < losses[0] - 0.1, (precision, losses)
    assert fp32[-1] < fp32[0] - 0.1


def test_half_precision_model_with_fp32_main_weights(runs):
    """The model's weights are in the training dtype; the optimizer steps fp32 copies of them."""
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        trainer = runs[precision]["trainer"]
        assert {p.dtype for p in trainer.model.parameters()} == {dtype}
        main = [p for group in trainer.optimizer.param_groups for p in group["params"]]
        assert main and {p.dtype for p in main} == {torch.float32}
    fp32 = runs["fp32"]["trainer"]
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}


def test_fp16_overflows_are_skipped_and_counted_not_bad(runs):
    """Starting at 2^22 the scaler overflows and halves the scale (hysteresis 1) until the
    gradients fit; those steps are skipped and counted as overflows; none is a bad step, so the
    run (max_bad_steps=1: one bad step would stop it) goes on."""
    rows = runs["fp16"]["rows"]
    overflow = [r["overflow"] for r in rows]
    assert overflow[0] and not overflow[-1]
    assert rows[-1]["overflow_total"] == sum(overflow)
    assert all(r["bad_steps"] == 0 and r["skipped_total"] == 0 for r in rows)
    scales = [r["loss_scale"] for r in rows]
    assert scales[0] == 2.0**22
    for before, after, skipped in zip(scales, scales[1:], overflow):
        assert after == (before / 2 if skipped else before)
    fp32_rows = runs["fp32"]["rows"]
    assert all(r["loss_scale"] == 1.0 and not r["overflow"] for r in fp32_rows + runs["bf16"]["rows"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_resume_is_exact(runs, tmp_path, precision):
    """Restarted from checkpoint 2 (what a kill right after it leaves), steps 3-8 repeat the
    straight run bit for bit: fp32 main weights, Adam moments and fp16's loss-scaler state are in
    the checkpoint."""
    straight = runs[precision]
    save = tmp_path / "resumed"
    left_after_save(straight["save"], save, 2)
    cfg = experiment({"file": straight["cfg"].data.files[0], "image_folder": straight["cfg"].data.image_folder,
                      "tokenizer": straight["cfg"].data.tokenizer}, str(save), load=straight["cfg"].train.load,
                     **STEPS, initial_loss_scale=straight["cfg"].train.initial_loss_scale,
                     loss_scale_hysteresis=straight["cfg"].train.loss_scale_hysteresis,
                     max_bad_steps=straight["cfg"].train.max_bad_steps)
    cfg.model.precision = precision
    trainer, rows = _train(cfg)
    assert trainer.resume_from is not None
    expected = [r for r in read_metrics(straight["save"]) if r["step"] > 2]
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == [3, 4, 5, 6, 7, 8]
    for got, want in zip(rows, expected):
        for key in ("lm_loss", "loss", "grad_norm", "lr", "loss_scale", "overflow", "expert_load"):
            same = got[key] == want[key] or (isinstance(want[key], float) and math.isnan(want[key])
                                             and math.isnan(got[key]))  # a skipped step has no norm
            assert same, (precision, got["step"], key, got[key], want[key])
