"""`models.parallelize`: device, training dtype, TP replicas, expert parallelism, batches.

Unit checks run in this process (world of one); the TP-replica drift check and gloo's averaged
all-reduce run on the shared 2-rank launch (`tests.models.parallelize_workers`).
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.module import Float16Module

import cumo_megatron.platform as platform
from cumo_megatron.config.presets import tiny
from cumo_megatron.config.schema import ParallelConfig
from cumo_megatron.models import parallelize
from cumo_megatron.models.cumo import build_model
from tests.helpers import shared_launch

PART = "models.parallelize"
shared_launch.register(PART, lambda tmp: ("tests.models.parallelize_workers:check_parallelize", {}, None))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Per-rank results of `check_parallelize`."""
    return shared_launch.results(PART, tmp_path_factory)[1]


def test_tp_replicas_stay_equal_when_their_gradients_differ(ranks):
    """At TP=2 the replica gradients are made to differ on the two ranks before reduction; with
    megatron's TP averaging (the marks `place` sets) the towers stay bit-identical after 2 steps,
    and without it (the control) they drift apart."""
    for r in ranks:
        averaged, control = r["drift_averaged"], r["drift_not_averaged"]
        assert averaged["start_spread"] == 0.0  # broadcast at build
        assert averaged["marked"] == averaged["replicated_params"] > 0
        assert averaged["end_spread"] == 0.0
        assert control["marked"] == averaged["marked"]
        assert control["end_spread"] > 1e-4


def test_half_precision_trains_at_tp2_and_pp2(ranks):
    """bf16 at TP=2 (sequence parallel; the replicated towers stay identical) and bf16/fp16 at
    PP=2 (activations and their gradients cross the stages in the training dtype): the model is in
    the training dtype, and the last stage's loss is finite and falls."""
    for key, dtype in (("bf16_tp2", "torch.bfloat16"), ("bf16_pp2", "torch.bfloat16"), ("fp16_pp2", "torch.float16")):
        for r in ranks:
            assert r[key]["dtypes"] == [dtype], key
        losses = [r[key]["losses"] for r in ranks if r[key]["losses"][0] is not None]
        assert losses, key
        for curve in losses:
            assert all(x == x and abs(x) < 1e3 for x in curve), (key, curve)
            assert curve[-1] < curve[0] - 0.3, (key, curve)
    assert all(r["bf16_tp2"]["spread"] == 0.0 for r in ranks)
    assert all(r["bf16_tp2"]["skipped"] == 0 and r["bf16_pp2"]["skipped"] == 0 for r in ranks)


def test_gloo_average_all_reduce(ranks):
    """gloo has no ReduceOp.AVG; the platform runs it as a sum and a division: mean of 1x and 2x."""
    for r in ranks:
        assert r["avg"]["avg"] == [1.5, 4.5]


@pytest.fixture()
def world_of_one():
    platform.initialize(platform.ParallelSizes(), seed=3)


def test_placement_follows_precision():
    cfg = tiny(moe=True)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        cfg.precision = precision
        placement = parallelize.placement_for(cfg)
        assert placement.dtype == dtype and placement.half == (precision != "fp32")
        assert placement.device == torch.device("cpu")  # no CUDA here
    assert parallelize.placement_for(cfg, device="meta").device == torch.device("meta")


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_place_wraps_half_precision_models(world_of_one, precision, dtype):
    """bf16/fp16: every parameter and floating buffer in the training dtype (the ViT stem, norms,
    routers and connector too, which plain torch.nn creates in fp32), in a `Float16Module` whose
    inner module is the model itself (checkpoints keep their keys)."""
    cfg = tiny(moe=True)
    cfg.precision = precision
    model = build_model(cfg, ParallelConfig())
    fp32_before = [n for n, p in model.named_parameters() if p.dtype == torch.float32]
    assert fp32_before  # the plain torch.nn parts: what megatron-LM's Float16Module exists for
    chunk = parallelize.place(model, parallelize.placement_for(cfg))
    assert isinstance(chunk, Float16Module) and chunk.module is model
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} <= {dtype}
    assert set(chunk.sharded_state_dict()) == set(model.sharded_state_dict())


def test_place_keeps_fp32_models_unwrapped(world_of_one):
    cfg = tiny(moe=True)
    model = build_model(cfg, ParallelConfig())
    assert parallelize.place(model, parallelize.placement_for(cfg)) is model


def test_place_refuses_a_model_built_for_another_dtype(world_of_one):
    cfg = tiny(moe=True)
    model = build_model(cfg, ParallelConfig())
    cfg.precision = "bf16"
    with pytest.raises(ValueError, match="built for torch.float32"):
        parallelize.place(model, parallelize.placement_for(cfg))


def test_vision_expert_parallel_rules():
    """Vision experts use EP only at TP = 1 and only when the tower has experts (a dense tower at
    EP = 2, as when a dense stage-2 checkpoint is upcycled, must not ask megatron for EP)."""
    moe, dense = tiny(moe=True, llm_moe=True), tiny(moe=False, llm_moe=True)
    assert parallelize.vision_uses_expert_parallel(moe, ParallelConfig(ep=2))
    assert not parallelize.vision_uses_expert_parallel(moe, ParallelConfig(tp=2, ep=2))
    assert not parallelize.vision_uses_expert_parallel(moe, ParallelConfig())
    assert not parallelize.vision_uses_expert_parallel(dense, ParallelConfig(ep=2))
    assert parallelize.vision_expert_parallel_size(dense, ParallelConfig(ep=2)) == 1
    assert parallelize.language_expert_parallel_size(dense, ParallelConfig(ep=2)) == 2
    assert parallelize.language_expert_parallel_size(tiny(moe=True), ParallelConfig(ep=2)) == 1


def test_aux_loss_scale_follows_device_and_loss_scale():
    """Made on the loss's device, divided by the micro-batches, times fp16's loss scale."""
    scale = parallelize.aux_loss_scale(torch.device("meta"), 4)
    assert scale.device == torch.device("meta") and scale.shape == (1,)
    assert parallelize.aux_loss_scale(torch.device("cpu"), 4).item() == 0.25
    fp16 = parallelize.aux_loss_scale(torch.device("cpu"), 4, grad_scale_func=lambda x: x * 1024.0)
    assert fp16.item() == 256.0


def test_move_batch_moves_every_tensor():
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "images": None, "labels": torch.zeros(2, 3)}
    moved = parallelize.move_batch(batch, torch.device("meta"))
    assert moved["input_ids"].device == torch.device("meta") and moved["labels"].is_meta
    assert moved["input_ids"].dtype == torch.long and moved["images"] is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_placement_audit_on_a_device_other_than_the_cpu(world_of_one, monkeypatch, precision):
    """The GPU contract, checked on a simulated device (real data, reported as another device;
    `tests.helpers.simulated_device`): `place` puts every parameter and buffer there (in the
    training dtype), the training step moves every batch tensor and makes the aux-loss scale
    there, and a whole forward/backward through megatron's schedule runs without one op mixing a
    CPU tensor with device tensors (strict: the first such op raises). Seen to fail when `place`
    skips its device move (88 parameters left behind) and when the aux-loss scale is made on the
    CPU (the op that would crash on CUDA, in `MoEAuxLossAutoScaler.backward`)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    import cumo_megatron.training.step as step
    from cumo_megatron.demo import DemoConfig, synthetic_microbatches
    from tests.helpers.simulated_device import audit_module, simulated_device, where

    cfg = DemoConfig(micro_batch_size=2)
    cfg.model.precision = precision
    batches = synthetic_microbatches(cfg, 2)
    model = build_model(cfg.model, ParallelConfig())
    moved_batches = []

    def recording_move(batch, device):
        moved_batches.append(parallelize.move_batch(batch, device))
        return moved_batches[-1]

    monkeypatch.setattr(step, "move_batch", recording_move)
    monkeypatch.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale", None)
    with simulated_device(strict=True) as sim:
        chunk = parallelize.place(model, parallelize.placement_for(cfg.model, device=sim.device))
        assert audit_module(model) == []
        assert {p.dtype for p in model.parameters()} == {parallelize.DTYPES[precision]}
        loss = step.forward_backward(chunk, batches, 2, seq_length=cfg.seq_length,
                                     micro_batch_size=cfg.micro_batch_size, device=sim.device)
        scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    assert sim.violations == []
    assert loss is not None and torch.isfinite(torch.tensor(loss))
    assert len(moved_batches) == 2
    for moved in moved_batches:
        assert {where(value) for value in moved.values() if value is not None} == {"simulated"}
    assert where(scale) == "simulated" and scale.shape == (1,)
    assert [n for n, p in model.named_parameters() if where(p.grad) != "simulated"] == []


def test_collectives_use_the_gpu_under_nccl(world_of_one, monkeypatch):
    """Small tensors of collectives (and the build-time broadcast of TP replicas, whose plain
    torch.nn parts are still on the CPU) go through the current GPU under NCCL, the CPU under gloo."""
    assert parallelize.comm_device() == torch.device("cpu")
    monkeypatch.setattr(parallelize.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(parallelize, "training_device", lambda: torch.device("cuda", 3))
    assert parallelize.comm_device() == torch.device("cuda", 3)


def test_overlapped_reduce_starts_early_only_buckets_without_skippable_parameters(world_of_one):
    """With small buckets the tiny CuMo gets several bucket groups: those holding only LLM
    parameters start their reduce during the backward, any holding a parameter of the vision
    tower or the connector (which a micro-batch may leave without a gradient) at its end."""
    cfg = tiny(moe=True)
    model = parallelize.place(build_model(cfg, ParallelConfig()), parallelize.placement_for(cfg))
    ddp = parallelize.wrap_ddp(model, use_distributed_optimizer=True, overlap_grad_reduce=True, bucket_size=2000)
    groups = ddp.bucket_groups + ddp.expert_parallel_bucket_groups
    names = {param: name for name, param in model.named_parameters()}
    assert len(groups) > 2
    for group in groups:
        skippable = [names[p] for p in group.params if names[p].split(".")[0] in ("vision", "connector")]
        assert isinstance(group, parallelize._RankOrderedBucketGroup)
        assert group.issue_early == (not skippable) and not group.is_first_batch
    assert {g.issue_early for g in groups} == {True, False}
    # Without the overlaps megatron's groups stay as they are (one reduce after the backward).
    plain = parallelize.wrap_ddp(build_model(cfg, ParallelConfig()), use_distributed_optimizer=True)
    assert not any(isinstance(g, parallelize._RankOrderedBucketGroup) for g in plain.bucket_groups)


def _gather_orders(monkeypatch, ddp, micro_batches, end_step) -> list[list[int]]:
    """Per forward of ``ddp`` on each micro-batch (one step each, closed by ``end_step(ddp)``):
    the bucket groups whose parameter all-gather it dispatched, in dispatch order (indices into
    DDP's group lists)."""
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

    groups = ddp.bucket_groups + ddp.expert_parallel_bucket_groups
    dispatched: list[int] = []
    original = _ParamAndGradBucketGroup.start_param_sync

    def recording(self, force_sync=False):
        if not force_sync:
            dispatched.append(next(i for i, g in enumerate(groups) if g is self))
        return original(self, force_sync=force_sync)

    orders = []
    with monkeypatch.context() as patch:
        patch.setattr(_ParamAndGradBucketGroup, "start_param_sync", recording)
        for batch in micro_batches:
            dispatched.clear()
            ddp(input_ids=batch["input_ids"], images=batch["images"], labels=batch["labels"])
            end_step(ddp)
            orders.append(list(dispatched))
    return orders


def test_overlapped_gathers_run_in_one_order_whichever_modules_run(world_of_one, monkeypatch):
    """Under ``overlap_param_gather`` a rank whose micro-batch is text-only (no tower, no
    connector) and a rank whose micro-batch has images must dispatch the same all-gathers in the
    same order: NCCL and gloo match collectives by order. megatron's own chain (each module's
    pre-hook dispatches the next group) starts them in different orders, and leaves the towers'
    groups out of a text-only step; `order_bucket_collectives` dispatches every group, in one
    order, at the step's first pre-hook."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from cumo_megatron.demo import DemoConfig, synthetic_microbatches

    cfg = DemoConfig(micro_batch_size=2)
    cfg.model = tiny(moe=True)
    with_images = synthetic_microbatches(cfg, 1)[0]
    ids = with_images["input_ids"].masked_fill(with_images["input_ids"] == cfg.model.image_token_id, 5)
    text_only = dict(with_images, input_ids=ids, images=None)
    steps = [text_only, with_images, text_only]

    def ddp(ordered: bool):
        torch.manual_seed(0)
        chunk = parallelize.place(build_model(cfg.model, ParallelConfig()), parallelize.placement_for(cfg.model))
        if ordered:
            return parallelize.wrap_ddp(chunk, use_distributed_optimizer=True, overlap_grad_reduce=True,
                                        overlap_param_gather=True, bucket_size=2000)
        config = DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=True,
                                               overlap_param_gather=True, bucket_size=2000)
        return DistributedDataParallel(config=chunk.config, ddp_config=config, module=chunk)

    ours = ddp(ordered=True)
    groups = len(ours.bucket_groups + ours.expert_parallel_bucket_groups)
    assert groups > 3
    # The step's end as the training step has it (it also waits for the gathers nobody used).
    orders = _gather_orders(monkeypatch, ours, steps, lambda d: d.finish_grad_sync())
    assert orders[0] == orders[1] == orders[2] and sorted(orders[0]) == list(range(groups))

    def megatron_step_end(ddp):  # megatron's finish_grad_sync would assert: no backward ran
        for group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
            if group.param_gather_handle is not None:
                group.param_gather_handle.wait()
                group.param_gather_handle = None
            group.param_gather_dispatched = False

    megatron_orders = _gather_orders(monkeypatch, ddp(ordered=False), steps, megatron_step_end)
    # Where every module runs (images), megatron's chain follows the forward; ours is that order.
    assert orders[1] == megatron_orders[1]
    assert megatron_orders[0] != megatron_orders[1]
    assert len(megatron_orders[0]) < groups == len(megatron_orders[1])
