"""Rank-side halves of `test_parallel_equivalence.py` (run under `run_distributed`).

A launch costs more than a layout's work, so one launch goes through every layout
(`loss_and_grads_per_layout`), re-initialising megatron's groups in between.
"""

from __future__ import annotations

import os

import torch
from megatron.core import dist_checkpointing, parallel_state

import cumo_megatron.platform as platform
from cumo_megatron.config.presets import tiny
from cumo_megatron.config.schema import ParallelConfig
from cumo_megatron.models.cumo import build_model
from cumo_megatron.moe.stats import collect_moe_stats
from cumo_megatron.models.parallelize import wrap_ddp
from cumo_megatron.training.step import forward_backward


def equivalence_model_config():
    """Full CuMo: CLIP-MoE, MoE connector, Mixtral-style LLM (shared with the test)."""
    return tiny(moe=True, llm_moe=True)


def save_gradients(model, out_dir: str) -> None:
    """Write each parameter's reduced gradient as a distributed checkpoint of the model's layout.

    Loading it with a world-of-one model as template gathers the gradients, whatever the layout.
    """
    for param in model.parameters():
        param.data.copy_(param.main_grad)
    os.makedirs(out_dir, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), out_dir)


def loss_and_grads(tp: int, pp: int, ep: int, weights: str, batches: str, out_dir: str, seq_length: int,
                   micro_batch_size: int):
    """Load ``weights`` at the layout, run the micro-batches of this DP rank, save gradients.

    Returns the LM loss averaged over data-parallel ranks (None off the last pipeline stage), the
    routers' token counts per expert and aux losses per module of this rank's layers
    (`collect_moe_stats`), and the DP and PP ranks.
    """
    platform.initialize(platform.ParallelSizes(tp=tp, pp=pp, ep=ep), seed=7)
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep)
    model = build_model(equivalence_model_config(), parallel)
    replicas_identical = _tp_replicas_identical(model)
    state = dist_checkpointing.load(model.sharded_state_dict(), weights)
    model.load_state_dict(state)
    ddp = wrap_ddp(model)
    microbatches = torch.load(batches, weights_only=False)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = microbatches[dp_rank::dp_size]
    ddp.zero_grad_buffer()
    loss = forward_backward(ddp, mine, len(mine), seq_length=seq_length, micro_batch_size=micro_batch_size)
    moe_stats = collect_moe_stats(model, len(mine))
    save_gradients(model, out_dir)
    out = {"loss": None, "replicas_identical": replicas_identical, "expert_load": moe_stats["layers"],
           "moe_losses": moe_stats["modules"], "dp_rank": dp_rank,
           "pp_rank": parallel_state.get_pipeline_model_parallel_rank()}
    if loss is None:
        return out
    loss_t = torch.tensor([loss], dtype=torch.float64)
    torch.distributed.all_reduce(loss_t, group=parallel_state.get_data_parallel_group())
    return dict(out, loss=float(loss_t) / dp_size)


def _tp_replicas_identical(model) -> bool:
    """Whether the TP-replicated vision tower and connector are equal across TP ranks."""
    if not model.pre_process:
        return True
    group = parallel_state.get_tensor_model_parallel_group()
    for tensor in list(model.vision.parameters()) + list(model.connector.parameters()):
        lowest = tensor.detach().clone()
        highest = tensor.detach().clone()
        torch.distributed.all_reduce(lowest, op=torch.distributed.ReduceOp.MIN, group=group)
        torch.distributed.all_reduce(highest, op=torch.distributed.ReduceOp.MAX, group=group)
        if not torch.equal(lowest, highest):
            return False
    return True


def loss_and_grads_per_layout(layouts: list[dict], weights: str, batches: str, out_dirs: list[str],
                              seq_length: int, micro_batch_size: int) -> list[dict]:
    """`loss_and_grads` for each of ``layouts`` (``{"tp", "pp", "ep"}``) in turn, gradients to ``out_dirs``."""
    return [loss_and_grads(**layout, weights=weights, batches=batches, out_dir=out_dir, seq_length=seq_length,
                           micro_batch_size=micro_batch_size)
            for layout, out_dir in zip(layouts, out_dirs)]
