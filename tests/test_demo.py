"""`python -m cumo_megatron.demo`: the tiny model trains in fp32, bf16 and fp16 on the CPU."""

from __future__ import annotations

import json
import math

import pytest

from cumo_megatron.demo import DemoConfig, run


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory) -> dict:
    """12 steps of the demo in each precision, from the same seed and batches."""
    runs = {}
    for precision in ("fp32", "bf16", "fp16"):
        cfg = DemoConfig(steps=12, out=str(tmp_path_factory.mktemp(f"demo-{precision}")))
        cfg.model.precision = precision
        runs[precision] = (cfg, run(cfg))
    return runs


def test_every_precision_trains(demo_runs):
    """The loss falls by more than half in each precision, as in fp32 (4.64 -> ~1.2 at step 12)."""
    for precision, (_, rows) in demo_runs.items():
        losses = [row["lm_loss"] for row in rows]
        assert all(math.isfinite(x) for x in losses), precision
        assert losses[-1] < 0.5 * losses[0], (precision, losses)


def test_half_precision_follows_fp32(demo_runs):
    """Same weights and batches: bf16's step-1 loss within bf16's resolution of fp32's (8 mantissa
    bits: ~0.4% per rounding) and its curve close throughout; fp16 (10 bits) closer still."""
    fp32 = [row["lm_loss"] for row in demo_runs["fp32"][1]]
    bf16 = [row["lm_loss"] for row in demo_runs["bf16"][1]]
    fp16 = [row["lm_loss"] for row in demo_runs["fp16"][1]]
    assert abs(bf16[0] - fp32[0]) / fp32[0] < 1e-2
    assert abs(fp16[0] - fp32[0]) / fp32[0] < 2e-3
    assert max(abs(a - b) / b for a, b in zip(bf16, fp32)) < 0.1


def test_fp16_overflows_are_reported(demo_runs):
    """At the default starting scale (2^16) the tiny model overflows twice (hysteresis 2), then
    the scale settles at 2^15: skipped steps are flagged with the scale they had."""
    cfg, rows = demo_runs["fp16"]
    assert [row["skipped"] for row in rows[:3]] == [True, True, False]
    assert [row["loss_scale"] for row in rows[:3]] == [2.0**16, 2.0**16, 2.0**15]
    assert not any(row["skipped"] for row in demo_runs["bf16"][1] + demo_runs["fp32"][1])
    written = [json.loads(line) for line in open(f"{cfg.out}/metrics.jsonl")]
    assert [row["lm_loss"] for row in written] == [row["lm_loss"] for row in rows]
