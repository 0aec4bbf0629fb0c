"""megatron-core's optimizer (Adam/AdamW, optional distributed optimizer, grad clipping, mixed
precision with fp32 main parameters and, for fp16, dynamic loss scaling)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.utils import get_model_config

from cumo_megatron.models.parallelize import DTYPES


@dataclass(frozen=True)
class LossScaling:
    """fp16 loss scaling: a fixed ``loss_scale``, or dynamic (None) starting at ``initial``.

    Dynamic scaling halves the scale after ``hysteresis`` overflowing steps (each skipped) and
    doubles it after ``window`` clean ones. The default start is 2^16 (PyTorch's GradScaler's)
    rather than megatron's 2^32, whose first ~32 steps would all be skipped.
    """

    loss_scale: Optional[float] = None
    initial: float = 2.0**16
    window: int = 1000
    hysteresis: int = 2
    minimum: float = 1.0


def build_optimizer(
    ddp_models: list,
    lr: float,
    weight_decay: float = 0.0,
    clip_grad: float = 1.0,
    use_distributed_optimizer: bool = False,
    precision: str = "fp32",
    betas: tuple[float, float] = (0.9, 0.999),
    min_lr: float = 0.0,
    eps: float = 1e-8,
    loss_scaling: LossScaling = LossScaling(),
    overlap_param_gather: bool = False,
):
    """AdamW (decoupled weight decay) over the DDP-wrapped model chunks.

    With bf16/fp16 megatron keeps fp32 main parameters (and Adam moments) and copies them back to
    the model's half-precision weights after each step. The optimizer's ``scale_loss`` becomes
    every chunk's ``grad_scale_func``, as megatron-LM wires it: the schedule multiplies the LM
    loss by it before backward, and the aux losses follow (`parallelize.aux_loss_scale`).
    """
    config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=min_lr,
        adam_eps=eps,
        weight_decay=weight_decay,
        adam_beta1=betas[0],
        adam_beta2=betas[1],
        clip_grad=clip_grad,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype=DTYPES[precision],
        loss_scale=loss_scaling.loss_scale,
        initial_loss_scale=loss_scaling.initial,
        loss_scale_window=loss_scaling.window,
        hysteresis=loss_scaling.hysteresis,
        min_loss_scale=loss_scaling.minimum,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_param_gather=overlap_param_gather and use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, ddp_models)
    for chunk in ddp_models:
        get_model_config(chunk).grad_scale_func = optimizer.scale_loss
    return optimizer


def current_loss_scale(optimizer) -> float:
    """The loss scale the next step's backward uses (1.0 without fp16 scaling)."""
    scale = optimizer.get_loss_scale()
    return float(scale.item()) if isinstance(scale, torch.Tensor) else float(scale)
