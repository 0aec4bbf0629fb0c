"""Core attention on `torch.nn.functional.scaled_dot_product_attention` for the local spec.

megatron-core's `DotProductAttention` allocates a CUDA scratch buffer and its fused softmax builds
the causal mask with ``device="cuda"``; this module is the local-spec replacement. It takes the
same constructor arguments and the same ``[s, b, heads, head_dim]`` inputs, and returns
``[s, b, heads * head_dim]`` like the original, so it drops into `SelfAttentionSubmodules`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPACoreAttention(MegatronModule):
    """Scaled dot-product attention with megatron-core's core-attention interface.

    ``attn_mask_type`` ``causal`` applies a bottom-right aligned causal mask (correct for KV-cache
    decoding where the query is shorter than the key); ``no_mask`` attends everywhere (CLIP ViT).
    An explicit boolean ``attention_mask`` (True = masked out, megatron's convention) overrides it.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism; use the TE spec")
        tp_size = pg_collection.tp.size() if pg_collection is not None else 1
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """Attend ``query`` [sq, b, np, hn] over ``key``/``value`` [sk, b, ng, hn]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed sequences and attention bias need the Transformer Engine spec")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, sk = query.shape[0], key.shape[0]
        q_bhsd = query.permute(1, 2, 0, 3)
        k_bhsd = key.permute(1, 2, 0, 3)
        v_bhsd = value.permute(1, 2, 0, 3)
        repeat = self.heads_per_partition // self.groups_per_partition
        if repeat > 1:
            k_bhsd = k_bhsd.repeat_interleave(repeat, dim=1)
            v_bhsd = v_bhsd.repeat_interleave(repeat, dim=1)

        mask = None
        is_causal = False
        if attention_mask is not None:
            mask = ~attention_mask.bool()  # SDPA's boolean mask marks positions that *may* attend
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk:
                is_causal = True
            else:
                # Query rows are the last sq positions of the key sequence (decoding with a cache).
                mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(diagonal=sk - sq)
        dropout_p = self.dropout_p if self.training else 0.0
        ctx_bhsd = F.scaled_dot_product_attention(
            q_bhsd, k_bhsd, v_bhsd, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=self.softmax_scale,
        )
        ctx_sbhd = ctx_bhsd.permute(2, 0, 1, 3).contiguous()
        return ctx_sbhd.view(sq, ctx_sbhd.shape[1], self.heads_per_partition * self.head_dim)
