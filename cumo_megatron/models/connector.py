"""The vision -> language connector: LLaVA's 2-layer GELU MLP, or CuMo's MLP-MoE.

megatron's `MoELayer` assumes input width == output width == hidden size, which a connector
(e.g. 2048 -> 4096 with S2) does not satisfy, so the MoE connector is its own module; it shares the
router and losses with every other MoE module. The connector is small (0.1B at CuMo-7B): it runs
replicated over TP ranks and its experts stay local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cumo_megatron.config.schema import ModelConfig
from cumo_megatron.models.transformer_configs import connector_transformer_config
from cumo_megatron.moe.router import CuMoRouter, RouterSettings


class ConnectorMLP(torch.nn.Module):
    """``Linear(in, hidden) -> GELU -> Linear(hidden, hidden)`` with biases (nn.Linear init)."""

    def __init__(self, in_features: int, hidden: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.linear_fc1 = torch.nn.Linear(in_features, hidden, dtype=dtype)
        self.linear_fc2 = torch.nn.Linear(hidden, hidden, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map features to the LLM width."""
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class MoEConnector(torch.nn.Module):
    """Top-k MoE of `ConnectorMLP` experts with a `CuMoRouter` (per-image balance loss)."""

    def __init__(self, model: ModelConfig):
        super().__init__()
        moe = model.connector.moe
        config = connector_transformer_config(model)
        self.router = CuMoRouter(
            config,
            pg_collection=None,
            settings=RouterSettings("connector", moe.balance_coeff, moe.z_loss_coeff, call_share=1.0),
        )
        self.experts = torch.nn.ModuleList(
            ConnectorMLP(model.vision.feature_channels, model.connector_hidden, config.params_dtype)
            for _ in range(moe.num_experts)
        )

    def forward(self, x_bnc: torch.Tensor) -> torch.Tensor:
        """``[images, tokens, in]`` -> ``[images, tokens, hidden]``."""
        b, n, c = x_bnc.shape
        # The router wants megatron's [s, b, h]: sequence first, one "sample" per image.
        x_nbc = x_bnc.transpose(0, 1)
        probs_te, routing_map_te = self.router(x_nbc)
        x_tc = x_nbc.reshape(n * b, c)
        out_th = None
        for e, expert in enumerate(self.experts):
            token_idx = routing_map_te[:, e].nonzero().squeeze(1)
            if token_idx.numel() == 0:
                continue
            y_th = expert(x_tc.index_select(0, token_idx)) * probs_te[token_idx, e].unsqueeze(1)
            if out_th is None:
                out_th = y_th.new_zeros(n * b, y_th.shape[1])
            out_th = out_th.index_add(0, token_idx, y_th)
        return out_th.view(n, b, -1).transpose(0, 1)


def build_connector(model: ModelConfig) -> torch.nn.Module:
    """Dense or MoE connector from the configuration."""
    if model.connector.moe is None:
        dtype = connector_transformer_config(model).params_dtype
        return ConnectorMLP(model.vision.feature_channels, model.connector_hidden, dtype)
    return MoEConnector(model)
