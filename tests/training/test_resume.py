"""Exact resume after SIGKILL, interrupted saves, and parallel layouts (issue 4, tests 2, 3 and 6).

Each world size has one run through the real entry point (``python -m cumo_megatron.train`` /
``torchrun``) that saves at step 2, trains on to step 4 and is SIGKILLed while it saves checkpoint
4: its metrics are the uninterrupted reference for steps 1-4, and its directory is what a run
killed mid-save leaves (``latest`` still names checkpoint 2). The same command's configuration is
then restarted from there, and steps 3-4 must come out bit-identical: in this process for the
world of one, and on the 2 ranks of one `run_distributed` launch for EP=2, which goes on to train
the TP=2 and PP=2 layouts (compared with the world-of-one loss curve; each is restarted from its
checkpoint 2 and must repeat steps 3-4 bit for bit; PP=2 with variable sequence lengths, the
default) and a stage-1 run at PP=2 with fixed-length micro-batches, whose last stage has nothing
to train, saved and resumed. The stage-3 runs start from the
shared ``init_weights``, so the layouts load the same weights, resharded. Every final checkpoint is
a model checkpoint: `ours.load_model_checkpoint` loads the 2-process ones at world of one.

Issue 10: the world-of-one kill and resume again with dropout on (steps draw random numbers); the
same launch also trains stage 3 at EP=2 from a dense checkpoint (co-upcycled on load) and starts a
2-process trainer on a save directory another process holds (`training.lock`), which both ranks
refuse with the same message.
"""

from __future__ import annotations

import math

import pytest
import torch

import cumo_megatron.platform as platform
from cumo_megatron.checkpoint import ours
from cumo_megatron.config.loader import load_config
from cumo_megatron.config.schema import ExperimentConfig, ParallelConfig
from cumo_megatron.models.cumo import build_model
from cumo_megatron.platform.distributed import set_cpu_threads
from cumo_megatron.training.checkpointing import list_checkpoints, load_latest
from cumo_megatron.training.loop import Trainer
from tests.helpers.distributed import run_distributed
from tests.training.workers import (
    MAX_LENGTH, experiment, hold_lock, launch, model_shards, read_metrics, write_config,
)

KILLED = -9  # SIGKILL
EXACT_KEYS = ("loss", "lm_loss", "grad_norm", "lr", "vision_balance", "connector_z_loss", "expert_load")
# Checkpoint 2, then two later steps; the save of step 4 is the one interrupted.
STEPS = dict(train_steps=4, save_interval=2, keep_last=1, global_batch_size=2)
KILL_DURING_LAST_SAVE = ["--kill-during-save", "4"]


def _same_rows(a: list[dict], b: list[dict]) -> None:
    """Bit-identical metrics (JSON floats round-trip exactly) step by step."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in EXACT_KEYS:
            assert x[key] == y[key], f"step {x['step']} {key}: {x[key]!r} != {y[key]!r}"


def _killed_mid_save(config, save_dir, nproc: int) -> dict:
    """Run ``config`` until SIGKILLed while saving checkpoint 4; what it left behind."""
    proc = launch(config, nproc=nproc, faults=KILL_DURING_LAST_SAVE)
    return {
        "returncode": proc.returncode,
        "output": proc.stdout + proc.stderr,
        "straight": read_metrics(save_dir),  # steps 1-4: metrics are written before each save
        "latest": load_latest(save_dir),
        "dirs": sorted(p.name for p in save_dir.iterdir()),
        "checkpoints": list_checkpoints(save_dir),
    }


def _killed_then_resumed(cfg: ExperimentConfig, root) -> dict:
    """``cfg`` (saving to ``root/run``) killed while saving checkpoint 4, then resumed here to the end."""
    save = root / "run"
    cfg.train.save = str(save)
    config = write_config(cfg, root / "config.yaml")
    out = dict(root=root, config=config, save=save, **_killed_mid_save(config, save, nproc=1))
    assert out["returncode"] == KILLED, out["output"][-4000:]
    set_cpu_threads()  # the threads the entry point gives a world of one (results depend on them)
    trainer = Trainer(load_config(ExperimentConfig, config))
    trainer.train()
    out["resumed_from"] = trainer.resume_from
    out["resumed"] = read_metrics(save)  # steps 1-2 of the killed run, 3-4 of the resumed one
    return out


@pytest.fixture(scope="module")
def world_one(dataset, init_weights, tmp_path_factory) -> dict:
    """The world-of-one run killed while saving checkpoint 4, then resumed here to the end."""
    root = tmp_path_factory.mktemp("resume1")
    return _killed_then_resumed(experiment(dataset, "", load=init_weights, **STEPS), root)


@pytest.fixture(scope="module")
def with_dropout(dataset, init_weights, tmp_path_factory) -> dict:
    """`world_one` with dropout 0.1 in every layer: steps now draw random numbers."""
    cfg = experiment(dataset, "", load=init_weights, **STEPS)
    cfg.model.hidden_dropout = cfg.model.attention_dropout = 0.1
    return _killed_then_resumed(cfg, tmp_path_factory.mktemp("resume-dropout"))


@pytest.fixture(scope="module")
def two_processes(dataset, init_weights, world_one) -> dict:
    """EP=2 killed mid-save (torchrun), then one launch: its resume, the TP=2 and PP=2 runs, and a
    stage-1 run at PP=2 trained for 2 steps and resumed to 4."""
    root = world_one["root"]
    ep2 = experiment(dataset, str(root / "ep2"), load=init_weights, **STEPS)
    ep2.parallel.ep = 2
    ep2_config = write_config(ep2, root / "ep2.yaml")
    out = {"ep2": _killed_mid_save(ep2_config, root / "ep2", nproc=2)}
    # torchrun exits 1 and reports the ranks' signal.
    assert out["ep2"]["returncode"] != 0 and "SIGKILL" in out["ep2"]["output"], out["ep2"]["output"][-4000:]
    layouts = {"tp2": "parallel.tp=2", "pp2": "parallel.pp=2"}
    runs = [{"config": str(ep2_config)}] + [
        {"config": str(world_one["config"]),
         "overrides": [layout, f"train.save={root / name}", "train.save_interval=2", "train.keep_last=2"]}
        for name, layout in layouts.items()
    ]
    # Stage 1 at PP = 2 (the last stage has nothing to train): 2 steps, then resumed to 4.
    stage1_init = _stage1_init(root / "stage1-init")
    stage1 = experiment(dataset, str(root / "stage1-pp2"), stage=1, load=str(stage1_init), train_steps=2,
                        save_interval=2, keep_last=2, global_batch_size=2, lr=1e-2, warmup_fraction=0.0)
    stage1.parallel.pp = 2
    stage1_config = write_config(stage1, root / "stage1-pp2.yaml")
    fixed = "train.variable_seq_lengths=false"  # every micro-batch padded to data.max_length
    runs += [{"config": str(stage1_config), "overrides": [fixed]},
             {"config": str(stage1_config), "overrides": [fixed, "train.train_steps=4"]}]
    # The TP = 2 and PP = 2 runs restarted from what a kill right after their checkpoint 2 would have left.
    for name, layout in layouts.items():
        runs.append({"config": str(world_one["config"]), "restart_from": {"dir": str(root / name), "iteration": 2},
                     "overrides": [layout, f"train.save={root / f'{name}-resumed'}", "train.save_interval=2",
                                   "train.keep_last=2"]})
    # Stage 3 at EP = 2 from a dense checkpoint (stage-1 and stage-2 models are the same dense
    # architecture): the dense twin co-upcycling builds has a vision tower without experts.
    from_dense = experiment(dataset, str(root / "ep2-from-dense"), load=str(stage1_init), train_steps=2,
                            save_interval=0, global_batch_size=2)
    from_dense.parallel.ep = 2
    runs.append({"config": str(write_config(from_dense, root / "ep2-from-dense.yaml"))})
    # A 2-process trainer on a directory another training holds: refused on both ranks.
    runs.append({"config": str(ep2_config), "overrides": [f"train.save={root / 'locked'}"], "expect_error": True})
    holder, _ = hold_lock(root / "locked")
    try:
        ranks = run_distributed("tests.training.workers:train_in_process", world_size=2, args={"runs": runs})
    finally:
        holder.kill()
        holder.wait()
    out["ep2-from-dense"] = {"rows": read_metrics(root / "ep2-from-dense"), "runs": [rank[7] for rank in ranks]}
    out["locked"] = {"dir": root / "locked", "holder": holder.pid, "runs": [rank[8] for rank in ranks]}
    out["stage1-pp2"] = {"init": stage1_init, "save": root / "stage1-pp2",
                         "runs": [[rank[i] for rank in ranks] for i in (3, 4)]}
    for i, name in enumerate(layouts, start=5):
        out[f"{name}-resumed"] = {"rows": read_metrics(root / f"{name}-resumed"),
                                  "resumed_from": ranks[0][i]["resumed_from"]}
    for i, name in enumerate(["ep2", *layouts]):
        run = out.setdefault(name, {})
        run.update(rows=read_metrics(root / name), final=load_latest(root / name),
                   resumed_from=ranks[0][i]["resumed_from"], shards=[rank[i]["shards"] for rank in ranks])
    return out


def _stage1_init(directory):
    """A world-of-one checkpoint of the tiny dense stage-1 model (weights other than a fresh build's)."""
    from megatron.core import dist_checkpointing

    from tests.training.workers import tiny_model

    directory.mkdir(parents=True)
    platform.initialize(platform.ParallelSizes(), seed=5)
    dist_checkpointing.save(build_model(tiny_model(stage=1), ParallelConfig()).sharded_state_dict(), str(directory))
    return directory


def test_stage3_at_ep2_from_a_dense_checkpoint(two_processes):
    """Issue 10, fix 7: the dense twin that co-upcycling builds at EP = 2 has no vision experts and
    must not name an expert-parallel size (megatron refused it: "num_moe_experts must be non None
    to use expert-parallel")."""
    run = two_processes["ep2-from-dense"]
    assert [r["upcycled"] for r in run["runs"]] == [["vision", "connector"]] * 2
    assert [r["iteration"] for r in run["runs"]] == [2, 2]
    rows = run["rows"]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert set(rows[0]["expert_load"]) == {"vision.layer0", "vision.layer1", "connector"}


def test_second_trainer_is_refused_on_every_rank(two_processes):
    """Rank 0 takes the save-directory lock and tells every rank: both raise the same message."""
    locked = two_processes["locked"]
    errors = locked["runs"]
    assert [e["error"] for e in errors] == ["SaveDirLocked"] * 2
    assert errors[0]["message"] == errors[1]["message"]
    assert f"train.save={locked['dir']} is in use by another training (pid {locked['holder']}@" in errors[0]["message"]
    assert not (locked["dir"] / "config.yaml").exists()


def test_stage1_at_pp2_trains_the_connector_only_and_resumes(two_processes):
    """With PP = 2 the last stage has no trainable parameter; training, saving and resuming still
    work, and after 4 steps only the connector differs from the initial weights."""
    run = two_processes["stage1-pp2"]
    first, second = run["runs"]
    assert [r["resumed_from"] for r in first] == [None, None]
    assert all(r["resumed_from"].name == "iter_0000002" and r["iteration"] == 4 for r in second)
    rows = read_metrics(run["save"])
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 and r["loss"] == r["loss"] for r in rows)
    from megatron.core import dist_checkpointing

    from tests.training.workers import tiny_model

    final = _global_tensors(load_latest(run["save"]))
    init_model = build_model(tiny_model(stage=1), ParallelConfig())
    init_model.load_state_dict(dist_checkpointing.load(init_model.sharded_state_dict(), str(run["init"])))
    initial = _assembled(init_model)
    changed = {key for key, value in final.items() if not torch.equal(value, initial[key])}
    assert changed and all("connector" in key for key in changed), sorted(changed)


def test_pipeline_micro_batches_have_variable_or_fixed_lengths(two_processes):
    """PP = 2 pads each micro-batch to its own longest sample by default (megatron sends shapes),
    or every one to data.max_length with variable_seq_lengths off; tokens count no padding."""
    samples_per_step = 2  # global batch
    variable = two_processes["pp2"]["rows"]
    fixed = read_metrics(two_processes["stage1-pp2"]["save"])
    assert all(r["tokens"] <= r["tokens_padded"] < samples_per_step * MAX_LENGTH for r in variable)
    assert all(r["tokens"] < r["tokens_padded"] == samples_per_step * MAX_LENGTH for r in fixed)


def test_uninterrupted_run_learns_and_keeps_last_checkpoints(world_one):
    rows = world_one["straight"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 0.1
    save = world_one["save"]
    assert list_checkpoints(save) == [4]  # after the resumed save: keep_last=1 pruned iter_2
    assert load_latest(save).name == "iter_0000004"
    assert (save / "config.yaml").is_file()
    row = rows[0]
    for key in ("loss", "lm_loss", "vision_balance", "vision_z_loss", "connector_balance", "connector_z_loss",
                "lr", "grad_norm", "tokens_per_s", "tflops"):
        assert isinstance(row[key], float), key
    # Expert load: token counts per expert, per MoE layer; every image token is routed top-2.
    assert set(row["expert_load"]) == {"vision.layer0", "vision.layer1", "connector"}
    assert sum(row["expert_load"]["connector"]) == 2 * row["images"] * 4  # top-2 x 4 tokens per image
    assert sum(row["expert_load"]["vision.layer0"]) == 2 * row["images"] * 5  # + the CLS token


def test_interrupted_save_leaves_previous_checkpoint(world_one, two_processes):
    for run in (world_one, two_processes["ep2"]):
        assert run["latest"].name == "iter_0000002"  # killed after writing iter 4, before committing it
        assert "iter_0000004.tmp" in run["dirs"] and "iter_0000004" not in run["dirs"]
        assert run["checkpoints"] == [2]
    assert world_one["returncode"] == KILLED


def test_resume_after_sigkill_is_bit_exact(world_one):
    assert world_one["resumed_from"].name == "iter_0000002"
    # Steps 1-2 from the killed run, 3-4 from the resumed one: all bit-identical.
    _same_rows(world_one["resumed"], world_one["straight"])


def test_resume_with_dropout_is_bit_exact(with_dropout, world_one):
    """Every stream a step draws from is restored (python, numpy, torch, megatron's tracker), and
    iterating the data does not advance torch's default generator (`data.sampler`)."""
    straight = with_dropout["straight"]
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    # Dropout is on: the same run without it has another loss from the first step.
    assert straight[0]["lm_loss"] != world_one["straight"][0]["lm_loss"]
    assert with_dropout["resumed_from"].name == "iter_0000002"
    _same_rows(with_dropout["resumed"], straight)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_resume_bit_exact_with_two_processes_tp2_pp2(two_processes, layout):
    resumed = two_processes[f"{layout}-resumed"]
    assert resumed["resumed_from"].name == "iter_0000002"
    _same_rows(resumed["rows"], two_processes[layout]["rows"])


def test_resume_bit_exact_with_two_processes_ep2(two_processes):
    ep2 = two_processes["ep2"]
    assert ep2["resumed_from"].name == "iter_0000002"
    assert [r["step"] for r in ep2["straight"]] == [1, 2, 3, 4]
    _same_rows(ep2["rows"], ep2["straight"])


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_two_process_layouts_match_world_of_one(world_one, two_processes, layout):
    # Same config (weights, schedule, data) as the world-of-one run; only the layout differs.
    run = two_processes[layout]
    assert run["resumed_from"] is None
    rows, reference = run["rows"], world_one["straight"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for got, want in zip(rows, reference):
        for key in ("lm_loss", "loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (layout, got["step"], key)


def _global_tensors(directory) -> dict[str, torch.Tensor]:
    """A trainer checkpoint loaded as a model checkpoint at world of one, as global tensors by key."""
    platform.initialize(platform.ParallelSizes(), seed=0)
    model = build_model(ours.read_model_config(directory), ParallelConfig())
    ours.load_model_checkpoint(model, directory)
    return _assembled(model)


def _assembled(model) -> dict[str, torch.Tensor]:
    """The model's sharded tensors put together as global tensors by checkpoint key."""
    tensors: dict[str, torch.Tensor] = {}
    for key, shape, where, data in model_shards(model):
        if key not in tensors:
            tensors[key] = torch.full(shape, float("nan"))  # NaN: a part no shard filled
        tensors[key][where] = data
    assert not any(t.isnan().any() for t in tensors.values())
    return tensors


@pytest.mark.parametrize("layout", ["ep2", "tp2", "pp2"])
def test_checkpoint_written_by_two_processes_loads_at_world_of_one(two_processes, layout):
    """`ours.load_model_checkpoint` gives, at world of one, exactly what each rank held."""
    run = two_processes[layout]
    assert run["final"].name == "iter_0000004"
    tensors = _global_tensors(run["final"])
    covered = set()
    for rank in run["shards"]:
        for key, _, where, data in rank:
            assert torch.equal(tensors[key][where], data), (layout, key, where)
            covered.add(key)
    assert covered == set(tensors)
