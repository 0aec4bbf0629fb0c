"""Rank-side half of `test_parallelize.py` (run in the shared 2-rank launch)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import cumo_megatron.platform as platform
from cumo_megatron.config.presets import tiny
from cumo_megatron.config.schema import ParallelConfig
from cumo_megatron.models import parallelize
from cumo_megatron.models.cumo import build_model
from cumo_megatron.training.optimizer import build_optimizer
from cumo_megatron.training.step import forward_backward


def _replicas_spread(model) -> float:
    """Largest difference between the TP ranks' copies of the vision tower and connector."""
    group = parallel_state.get_tensor_model_parallel_group()
    spread = 0.0
    for module in parallelize.tp_replicated_modules(model):
        for param in module.parameters():
            low, high = param.detach().float().clone(), param.detach().float().clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
            spread = max(spread, float((high - low).max()))
    return spread


def _batches(cfg, count: int, seed: int) -> list[dict]:
    from cumo_megatron.demo import DemoConfig, synthetic_microbatches

    return synthetic_microbatches(DemoConfig(model=cfg, seed=seed, micro_batch_size=1), count)


def replicas_under_drift(steps: int = 2, average: bool = True) -> dict:
    """Train at TP=2 while each TP rank's replica gradients are pushed apart before reduction.

    ``average=False`` removes the ``average_gradients_across_tp_domain`` marks after placement
    (the negative control: the replicas must then drift).
    """
    platform.initialize(platform.ParallelSizes(tp=2), seed=11)
    cfg = tiny(moe=True)
    model = build_model(cfg, ParallelConfig(tp=2))
    start_spread = _replicas_spread(model)
    chunk = parallelize.place(model, parallelize.placement_for(cfg))
    marked = [p for m in parallelize.tp_replicated_modules(model) for p in m.parameters()
              if getattr(p, "average_gradients_across_tp_domain", False)]
    if not average:
        for param in marked:
            param.average_gradients_across_tp_domain = False
    ddp = parallelize.wrap_ddp(chunk, use_distributed_optimizer=True)
    optimizer = build_optimizer([ddp], lr=1e-2, use_distributed_optimizer=True)
    finalize = model.config.finalize_model_grads_func
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    def drifting_finalize(chunks, *args, **kwargs):
        # What non-deterministic kernels do in the last bits, made large: each TP rank's replica
        # gradient differs before megatron's reduction.
        for module in parallelize.tp_replicated_modules(model):
            for param in module.parameters():
                param.main_grad.add_(0.01 * (tp_rank + 1))
        return finalize(chunks, *args, **kwargs)

    model.config.finalize_model_grads_func = drifting_finalize
    for step in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(ddp, _batches(cfg, 1, seed=step), 1, seq_length=24, micro_batch_size=1)
        optimizer.step()
    return {"start_spread": start_spread, "end_spread": _replicas_spread(model), "marked": len(marked),
            "replicated_params": sum(1 for m in parallelize.tp_replicated_modules(model) for _ in m.parameters())}


def gloo_average() -> dict:
    """``ReduceOp.AVG`` through the platform's gloo emulation."""
    platform.initialize(platform.ParallelSizes(), seed=1)
    value = torch.tensor([1.0, 3.0]) * (dist.get_rank() + 1)
    dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return {"avg": value.tolist()}


def half_precision_layout(precision: str, tp: int = 1, pp: int = 1, steps: int = 4) -> dict:
    """Train the tiny CuMo (CLIP-MoE, MoE connector, Mixtral-style LLM) in ``precision`` at a
    2-rank layout: TP=2 (sequence parallel, replicated towers) or PP=2 (activations sent between
    stages in the training dtype)."""
    platform.initialize(platform.ParallelSizes(tp=tp, pp=pp), seed=5)
    cfg = tiny(moe=True, llm_moe=True)
    cfg.precision = precision
    model = build_model(cfg, ParallelConfig(tp=tp, pp=pp))
    chunk = parallelize.place(model, parallelize.placement_for(cfg))
    ddp = parallelize.wrap_ddp(chunk, use_distributed_optimizer=True)
    optimizer = build_optimizer([ddp], lr=3e-3, use_distributed_optimizer=True, precision=precision)
    batches = _batches(cfg, 2, seed=0)
    losses, skipped = [], 0
    for _ in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses.append(forward_backward(ddp, batches, 2, seq_length=24, micro_batch_size=1))
        ok, _, _ = optimizer.step()
        skipped += not ok
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    return {"losses": losses, "skipped": skipped, "dtypes": dtypes,
            "spread": _replicas_spread(model) if tp > 1 else 0.0}


def check_parallelize() -> dict:
    """Everything the shared launch asks of this module, in one call."""
    return {
        "bf16_tp2": half_precision_layout("bf16", tp=2),
        "bf16_pp2": half_precision_layout("bf16", pp=2),
        "fp16_pp2": half_precision_layout("fp16", pp=2, steps=5),
        "avg": gloo_average(),
        "drift_averaged": replicas_under_drift(average=True),
        "drift_not_averaged": replicas_under_drift(average=False),
    }
