"""One training step's forward/backward through megatron-core's pipeline schedules.

A batch is a dict: ``input_ids`` [b, s] (images pre-expanded as placeholders), ``images``
[n, 3, H, W] or None, ``labels`` [b, s] (the token after each position), ``loss_mask`` [b, s].

The LM loss of a micro-batch is the mean over its loss tokens; megatron's schedule averages
micro-batches, and DDP averages data-parallel ranks (the reference's HF Trainer + DeepSpeed rule).
Auxiliary MoE losses are attached to the routers' backward (`cumo_megatron.moe.router`); their
gradient scale per micro-batch is set here, because megatron's schedule sets it only when the
*language* model is an MoE.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.utils import get_model_config

from cumo_megatron.models.parallelize import aux_loss_scale, move_batch, training_device


def masked_token_mean_loss(loss_mask_bs: torch.Tensor, output_tensor: torch.Tensor):
    """megatron loss function: ``(sum of masked token losses, token count, report)``.

    The schedule divides the sum by the count and by the number of micro-batches.
    """
    losses_bs = output_tensor.float()
    mask_bs = loss_mask_bs.float()
    loss_sum = (losses_bs * mask_bs).sum()
    num_tokens = mask_bs.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask_bs.sum()])
    return loss_sum, num_tokens, {"lm_loss": report}


def make_forward_step(num_microbatches: int, device: torch.device) -> Callable:
    """A megatron ``forward_step_func`` for `CuMoModel` batches, moved to ``device``."""

    def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
        batch = move_batch(next(data_iterator), device)
        # Scale the aux-loss gradients as the LM loss's (mean over micro-batches, times the fp16
        # loss scale), on the loss's device.
        # Assigned, not `set_loss_scale`d: that copies into an existing scale, which megatron
        # creates 0-dim if a backward ran before any scale was set, and a [1] scale then fails.
        MoEAuxLossAutoScaler.main_loss_backward_scale = aux_loss_scale(
            device, num_microbatches, get_model_config(model).grad_scale_func
        )
        output = model(
            input_ids=batch["input_ids"], images=batch.get("images"), labels=batch["labels"],
            padding_mask=batch.get("padding_mask"),  # keeps padding out of the LLM routers' aux losses
        )
        return output, partial(masked_token_mean_loss, batch["loss_mask"])

    return forward_step


def forward_backward(
    model: torch.nn.Module | list[torch.nn.Module],
    microbatches: Iterable[dict],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    device: torch.device | None = None,
) -> float | None:
    """Run forward (and backward) over ``num_microbatches`` micro-batches with megatron's schedule.

    Batches are moved to ``device`` (default: `parallelize.training_device`) one micro-batch at a
    time. Returns the LM loss (token mean per micro-batch, averaged) on the last pipeline stage,
    None elsewhere. Gradients are left in the DDP buffers (``param.main_grad``), already reduced.
    """
    device = device if device is not None else training_device()
    chunks = model if isinstance(model, list) else [model]
    forward_backward_func = get_forward_backward_func()
    reports = forward_backward_func(
        forward_step_func=make_forward_step(num_microbatches, device),
        data_iterator=iter(microbatches),
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    per_microbatch = [float(r["lm_loss"][0] / r["lm_loss"][1].clamp(min=1)) for r in reports]
    return sum(per_microbatch) / len(per_microbatch)
