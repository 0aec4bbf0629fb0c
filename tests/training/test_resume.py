"""Exact resume after SIGKILL, interrupted saves, and parallel layouts (issue 4, tests 2, 3 and 6).

All runs go through the real entry point (``python -m cumo_megatron.train`` / ``torchrun``) in
subprocesses. The world-of-one runs start from the shared ``init_weights`` so that the 2-process
TP=2 and PP=2 runs (loading the same weights, resharded) can be compared with them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cumo_megatron.training.checkpointing import list_checkpoints, load_latest
from tests.training.workers import check, experiment, launch, read_metrics, write_config

KILLED = -9  # SIGKILL
EXACT_KEYS = ("loss", "lm_loss", "grad_norm", "lr", "vision_balance", "connector_z_loss", "expert_load")


def _same_rows(a: list[dict], b: list[dict]) -> None:
    """Bit-identical metrics (JSON floats round-trip exactly) step by step."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in EXACT_KEYS:
            assert x[key] == y[key], f"step {x['step']} {key}: {x[key]!r} != {y[key]!r}"


STEPS = dict(train_steps=4, save_interval=2, keep_last=1, global_batch_size=2)


@pytest.fixture(scope="module")
def world_one(dataset, init_weights, tmp_path_factory) -> dict:
    """An uninterrupted run of 4 steps, a run killed right after checkpoint 2, and its resume,
    killed while it saves checkpoint 4."""
    root = tmp_path_factory.mktemp("resume1")
    cfg = experiment(dataset, str(root / "straight"), load=init_weights, **STEPS)
    config = write_config(cfg, root / "config.yaml")
    out: dict = {"root": root, "config": config}
    check(launch(config))
    out["straight"] = read_metrics(root / "straight")
    killed = [f"train.save={root / 'killed'}"]
    out["kill_after_save"] = launch(config, killed, env={"CUMO_TEST_KILL_AFTER_SAVE": "2"})
    out["latest_after_kill"] = load_latest(root / "killed")
    out["resume"] = launch(config, killed, env={"CUMO_TEST_KILL_DURING_SAVE": "4"})
    out["latest_after_interrupted_save"] = load_latest(root / "killed")
    out["dirs_after_interrupted_save"] = sorted(p.name for p in (root / "killed").iterdir())
    out["resumed"] = read_metrics(root / "killed")
    return out


def test_uninterrupted_run_learns_and_keeps_last_checkpoints(world_one):
    rows = world_one["straight"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 0.1
    straight = world_one["root"] / "straight"
    assert list_checkpoints(straight) == [4]  # keep_last=1 pruned iter_2
    assert load_latest(straight).name == "iter_0000004"
    assert (straight / "config.yaml").is_file()
    row = rows[0]
    for key in ("loss", "lm_loss", "vision_balance", "vision_z_loss", "connector_balance", "connector_z_loss",
                "lr", "grad_norm", "tokens_per_s", "tflops"):
        assert isinstance(row[key], float), key
    # Expert load: token counts per expert, per MoE layer; every image token is routed top-2.
    assert set(row["expert_load"]) == {"vision.layer0", "vision.layer1", "connector"}
    assert sum(row["expert_load"]["connector"]) == 2 * row["images"] * 4  # top-2 x 4 tokens per image
    assert sum(row["expert_load"]["vision.layer0"]) == 2 * row["images"] * 5  # + the CLS token


def test_resume_after_sigkill_is_bit_exact(world_one):
    assert world_one["kill_after_save"].returncode == KILLED
    assert world_one["latest_after_kill"].name == "iter_0000002"
    assert "resumed from" in world_one["resume"].stdout
    # Steps 1-2 from the killed run, 3-4 from the resumed one: all bit-identical.
    _same_rows(world_one["resumed"], world_one["straight"])


def test_interrupted_save_leaves_previous_checkpoint(world_one):
    assert world_one["resume"].returncode == KILLED  # killed after writing iter 4, before committing it
    assert world_one["latest_after_interrupted_save"].name == "iter_0000002"
    assert "iter_0000004.tmp" in world_one["dirs_after_interrupted_save"]
    assert "iter_0000004" not in world_one["dirs_after_interrupted_save"]
    killed = world_one["root"] / "killed"
    assert list_checkpoints(killed) == [2]


def test_resume_bit_exact_with_two_processes_ep2(dataset, init_weights, tmp_path):
    cfg = experiment(dataset, str(tmp_path / "straight"), load=init_weights, **STEPS)
    cfg.parallel.ep = 2
    config = write_config(cfg, tmp_path / "config.yaml")
    check(launch(config, ["train.save_interval=0"], nproc=2))  # its checkpoints are not needed
    killed = [f"train.save={tmp_path / 'killed'}"]
    assert launch(config, killed, nproc=2, env={"CUMO_TEST_KILL_AFTER_SAVE": "2"}).returncode != 0
    assert load_latest(tmp_path / "killed").name == "iter_0000002"
    check(launch(config, killed, nproc=2))
    _same_rows(read_metrics(tmp_path / "killed"), read_metrics(tmp_path / "straight"))


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_two_process_layouts_match_world_of_one(world_one, layout, tmp_path):
    # Same config (weights, schedule, data) as the world-of-one run; only the layout differs.
    check(launch(world_one["config"], [layout, f"train.save={tmp_path}", "train.save_interval=0"], nproc=2))
    rows = read_metrics(tmp_path)
    reference = world_one["straight"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for got, want in zip(rows, reference):
        for key in ("lm_loss", "loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (layout, got["step"], key)
