"""megatron-core's optimizer (Adam/AdamW, optional distributed optimizer, grad clipping)."""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer


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
):
    """AdamW (decoupled weight decay) over the DDP-wrapped model chunks."""
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
        params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision],
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, ddp_models)
