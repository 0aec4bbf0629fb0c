"""Stage rules (issue 4, test 4): stage 1 trains only the connector; stage 3 starts from the
co-upcycled stage-2 model with identical outputs, then trains routers and experts apart.

In-process, world of one: each `Trainer` brings up megatron's groups itself.
"""

from __future__ import annotations

import pytest
import torch

from cumo_megatron.config.loader import ConfigError
from cumo_megatron.moe.stats import collect_moe_stats
from cumo_megatron.training import stages
from cumo_megatron.training.loop import Trainer
from tests.training.workers import experiment, tiny_model


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_trains_by_stage():
    assert stages.trains(1, "connector.linear_fc1.weight")
    assert stages.trains(1, "module.connector.linear_fc1.weight")
    assert not stages.trains(1, "vision.vit.conv1.weight")
    assert not stages.trains(1, "language_model.embedding.word_embeddings.weight")
    assert stages.trains(2, "vision.vit.conv1.weight") and stages.trains(3, "language_model.output_layer.weight")
    with pytest.raises(ConfigError, match="train.stage=4"):
        stages.trains(4, "connector.linear_fc1.weight")


def test_stage_config_checks():
    with pytest.raises(ConfigError, match="upcycled from the stage-2 weights"):
        stages.check_stage_config(1, tiny_model(stage=3))
    with pytest.raises(ConfigError, match="no MoE module"):
        stages.check_stage_config(3, tiny_model(stage=2))
    stages.check_stage_config(2, tiny_model(stage=2))
    stages.check_stage_config(3, tiny_model(stage=3))


def test_verify_frozen_sees_one_bit():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    snap = stages.snapshot_frozen(model)
    fingerprint = stages.frozen_fingerprint(model)
    assert stages.verify_frozen(model, snap) == [] and stages.verify_fingerprint(model, fingerprint) == []
    with torch.no_grad():
        bits = model.bias.data.view(torch.int32)
        bits[0] ^= 1  # flip the lowest mantissa bit
    assert stages.verify_frozen(model, snap) == ["bias"]
    assert stages.verify_fingerprint(model, fingerprint) == ["bias"]


def test_stage1_updates_only_the_connector(dataset, tmp_path):
    cfg = experiment(dataset, str(tmp_path / "s1"), stage=1, train_steps=1, save_interval=0, lr=1e-2,
                     warmup_fraction=0.0)
    trainer = Trainer(cfg).setup()
    before = _params(trainer.model)
    frozen = stages.snapshot_frozen(trainer.model)
    assert frozen and all(not name.startswith("connector.") for name in frozen)
    in_optimizer = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    connector = sum(p.numel() for p in trainer.model.connector.parameters())
    assert in_optimizer == connector
    rows = trainer.train()
    assert rows[0]["grad_norm"] > 0
    assert stages.verify_frozen(trainer.model, frozen) == []
    after = _params(trainer.model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.startswith("connector.")}


def test_stage1_resumes_exactly_with_frozen_weights_from_the_checkpoint(dataset, tmp_path):
    """A stage with frozen parameters resumes: the frozen-weights guard fingerprints the weights the
    resumed run loaded (not the random ones it was built with), and steps 3-4 after resuming from
    checkpoint 2 equal those of the run that went straight through."""
    from cumo_megatron.training.pointers import iteration_dir
    from tests.training.workers import left_after_save, read_metrics

    from megatron.core import dist_checkpointing

    import cumo_megatron.platform as platform
    from cumo_megatron.config.schema import ParallelConfig
    from cumo_megatron.models.cumo import build_model

    # Start from weights of their own (as stage 1 starts from converted CLIP + LLM): a resumed run
    # is built with the seed's random weights and only then loads its checkpoint.
    init = tmp_path / "init"
    init.mkdir()
    platform.initialize(platform.ParallelSizes(), seed=7)
    dist_checkpointing.save(build_model(tiny_model(stage=1), ParallelConfig()).sharded_state_dict(), str(init))
    steps = dict(stage=1, train_steps=4, save_interval=2, keep_last=2, lr=1e-2, warmup_fraction=0.0, load=str(init))
    straight = Trainer(experiment(dataset, str(tmp_path / "straight"), **steps))
    straight.train()
    resumed_dir = tmp_path / "resumed"
    left_after_save(tmp_path / "straight", resumed_dir, 2)  # as a run killed after checkpoint 2
    resumed = Trainer(experiment(dataset, str(resumed_dir), **steps))
    resumed.train()
    assert resumed.resume_from == iteration_dir(resumed_dir, 2)
    want, got = read_metrics(tmp_path / "straight"), read_metrics(resumed_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(want, got):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), a["step"]
    final, again = _params(straight.model), _params(resumed.model)
    assert all(torch.equal(final[name], again[name]) for name in final)


def test_stage3_starts_from_upcycled_stage2_and_trains_experts_apart(dataset, tmp_path):
    stage2 = Trainer(experiment(dataset, str(tmp_path / "s2"), stage=2, train_steps=1, save_interval=0,
                                warmup_fraction=0.0))
    stage2.train()
    dense = stage2.model
    cfg3 = experiment(dataset, str(tmp_path / "s3"), stage=3, train_steps=2, save_interval=0,
                      warmup_fraction=0.0, load=str(tmp_path / "s2"))
    stage3 = Trainer(cfg3).setup()
    assert sorted(stage3.load_report["upcycled"]) == ["connector", "vision"]
    moe = stage3.model
    batch = next(iter(stage3.loader.epoch()))
    stage3.loader.sampler.position = 0  # give the batch back: training starts at the beginning
    with torch.no_grad():
        want = dense(batch["input_ids"], batch["images"], batch["labels"])
        got = moe(batch["input_ids"], batch["images"], batch["labels"])
    collect_moe_stats(moe)  # drop the statistics of this forward
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    routers_before = {n: p.detach().clone() for n, p in moe.named_parameters() if n.endswith("router.weight")}
    assert len(routers_before) == 3  # two ViT layers and the connector
    stage3.train()
    for name, before in routers_before.items():
        assert not torch.equal(before, moe.get_parameter(name)), f"router {name} did not train"
    experts = [moe.connector.experts[j].linear_fc1.weight for j in range(4)]
    assert any(not torch.equal(experts[0], e) for e in experts[1:]), "connector experts are still copies"
    layer = moe.vision.vit.decoder.layers[0].mlp.experts.local_experts
    vit_experts = [layer[j].linear_fc1.weight for j in range(4)]
    assert any(not torch.equal(vit_experts[0], e) for e in vit_experts[1:]), "ViT experts are still copies"


def test_dense_vision_tower_names_no_expert_parallel_size():
    """Issue 10, fix 7: at EP = 2 a ViT without experts (the dense twin co-upcycling builds, or a
    dense ViT beside an MoE LLM) is configured without EP; megatron refuses EP without experts."""
    from cumo_megatron.config.schema import ParallelConfig
    from cumo_megatron.models.transformer_configs import vision_transformer_config

    ep2 = ParallelConfig(ep=2)
    assert vision_transformer_config(tiny_model(stage=2), ep2).expert_model_parallel_size == 1
    assert vision_transformer_config(tiny_model(stage=3), ep2).expert_model_parallel_size == 2
