"""bench/gpu_smoke.py on the CPU (``--device cpu``): the GPU smoke run's code path cannot rot.

One run of the script as a subprocess (as on the GPU machine: its own process, CUDA hidden),
then assertions on its last output line, the JSON report.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_smoke.py"
STEPS = 3


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The JSON report of ``gpu_smoke.py --device cpu --steps 3`` (its exit status must be 0)."""
    out = tmp_path_factory.mktemp("gpu_smoke")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--steps", str(STEPS), "--out", str(out)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_check_passes(report):
    assert report["pass"] is True
    assert set(report["checks"]) == {"tiny_bf16_vs_fp32", "save_reload", "1b-cpu-standin_local_finite"}
    assert all(report["checks"].values())


def test_environment_is_reported(report):
    assert report["device"] == "cpu"
    for key in ("device_name", "python", "torch", "megatron_core", "startup_s", "wall_s"):
        assert report[key]
    assert report["wall_s"] >= report["startup_s"] > 0


def test_tiny_bf16_tracks_the_fp32_reference(report):
    tiny = report["tiny_vs_fp32"]
    assert len(tiny["lm_loss_bf16"]) == len(tiny["lm_loss_fp32"]) == len(tiny["tolerance"]) == tiny["steps"]
    assert tiny["lm_loss_bf16"] != tiny["lm_loss_fp32"]  # really two precisions
    assert all(d <= t for d, t in zip(tiny["rel_diff"], tiny["tolerance"]))
    assert tiny["max_rel_diff"] == max(tiny["rel_diff"])


def test_save_and_reload_reproduce_the_losses_exactly(report):
    reload = report["save_reload"]
    assert reload["steps"] == [3, 4]
    assert reload["lm_loss_continued"] == reload["lm_loss_reloaded"]
    assert reload["max_abs_diff"] == 0.0 and reload["bit_exact"] is True  # on the CPU: exact
    # The asynchronous save, written while steps 3-4 changed the weights, holds step 2's state.
    assert reload["async"]["lm_loss_reloaded"] == reload["lm_loss_continued"] and reload["async"]["bit_exact"]
    assert 0 < reload["async"]["blocked_s"] <= reload["async"]["save_s"]


def test_throughput_figures_of_the_cpu_standin(report):
    (result,) = report["throughput"]
    assert result["shape"] == "1b-cpu-standin" and result["spec"] == "local"
    assert result["steps"] == STEPS and result["finite"]
    assert 0 < result["params_active"] < result["params_total"]  # MoE: top-2 of 4 experts
    for key in ("lm_loss_first", "lm_loss_last", "step_s", "tokens_per_s", "tflops"):
        assert math.isfinite(result[key]) and result[key] > 0
    assert result["tokens_per_step"] == result["micro_batch_size"] * result["num_microbatches"] * result["seq_length"]
    # No GPU: no bf16 peak to compare against, no device memory to report.
    assert result["mfu"] is None and result["peak_mem_gib"] is None
