"""Plain-PyTorch LayerNorm / RMSNorm usable with sequence parallelism (local spec).

megatron-core's `WrappedTorchNorm` refuses ``sequence_parallel``, yet megatron's MoE layer requires
sequence parallelism whenever TP > 1. A norm is replicated across tensor-parallel ranks; under
sequence parallelism each rank sees a different slice of tokens, so its gradients must be summed
over the TP group. megatron's ``finalize_model_grads`` does exactly that for parameters carrying
the ``sequence_parallel`` attribute, which this module sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelTorchNorm(torch.nn.Module):
    """LayerNorm or RMSNorm (from ``config.normalization``) whose parameters follow SP rules.

    Parameters are ``weight`` (and ``bias`` for LayerNorm) directly on this module, so state-dict
    keys match megatron's (``input_layernorm.weight``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ):
        super().__init__()
        self.kind = normalization or config.normalization
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma needs the Transformer Engine spec")
        if self.kind not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"unsupported normalization {self.kind!r}: use LayerNorm or RMSNorm")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = (
            torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            if self.kind == "LayerNorm"
            else None
        )
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension."""
        if self.kind == "LayerNorm":
            return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
