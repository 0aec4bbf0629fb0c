"""CLIP ViT vision tower on megatron-core, with CLIP-MoE layers and optional S2 multi-scale.

Layout follows CLIP: patch embedding (conv, no bias), class token, learned positions, pre-LayerNorm,
pre-LN transformer layers with quick_gelu (OpenAI) or gelu (OpenCLIP LAION) MLPs. Only the layers
up to the feature layer (penultimate by default) are built; their output, CLS dropped and without
post-LayerNorm, is the image feature map.

The original CuMo code runs all N layers and averages the aux losses over N although the last
layer's output is unused; we build N-1 layers and average over those, saving that layer's compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from cumo_megatron.config.schema import ModelConfig, ParallelConfig
from cumo_megatron.models.parallelize import (
    mark_replicated_over_tp,
    mark_tp_replicas,
    replicated_pg_collection,
    vision_uses_expert_parallel,
)
from cumo_megatron.models.specs import layer_spec, norm_module
from cumo_megatron.models.transformer_configs import vision_transformer_config
from cumo_megatron.moe.router import RouterSettings


class CLIPViT(CLIPViTModel):
    """megatron's `CLIPViTModel` with its position ids as a (non-persistent) buffer.

    The original keeps them in a plain attribute created with ``.cuda()``, which neither follows
    ``module.to(device)`` nor exists without CUDA.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        position_ids = torch.arange(self.seq_length).expand(1, -1)
        del self.position_ids
        self.register_buffer("position_ids", position_ids, persistent=False)


def split_chessboard(x_bchw: torch.Tensor, splits: int) -> torch.Tensor:
    """Cut each image into ``splits x splits`` tiles, stacked on the batch axis tile-major (S2)."""
    _, _, h, w = x_bchw.shape
    th, tw = h // splits, w // splits
    tiles = [x_bchw[:, :, i * th:(i + 1) * th, j * tw:(j + 1) * tw] for i in range(splits) for j in range(splits)]
    return torch.cat(tiles, dim=0)


def merge_chessboard(x_bchw: torch.Tensor, splits: int) -> torch.Tensor:
    """Inverse of `split_chessboard`: stitch tile-major stacked tiles back into whole maps."""
    b = x_bchw.shape[0] // (splits * splits)
    rows = [
        torch.cat([x_bchw[(i * splits + j) * b:(i * splits + j + 1) * b] for j in range(splits)], dim=-1)
        for i in range(splits)
    ]
    return torch.cat(rows, dim=-2)


class CLIPVisionTower(MegatronModule):
    """Images ``[b, 3, H, W]`` -> features ``[b, tokens, hidden * len(s2_scales)]``."""

    def __init__(self, model: ModelConfig, parallel: ParallelConfig):
        config = vision_transformer_config(model, parallel)
        super().__init__(config=config)
        self.cfg = model.vision
        moe_layers = set(self.cfg.moe_layer_indices())
        router = None
        if moe_layers:
            router = RouterSettings(
                module="vision",
                balance_coeff=self.cfg.moe.balance_coeff,
                z_loss_coeff=self.cfg.moe.z_loss_coeff,
                # The module loss is the mean over MoE layers and over S2 passes (as the reference).
                call_share=1.0 / (len(moe_layers) * len(self.cfg.s2_scales)),
            )
        specs = [
            layer_spec(model.spec, causal=False, router=router if i in moe_layers else None)
            for i in range(self.cfg.built_layers)
        ]
        use_ep = vision_uses_expert_parallel(model, parallel)
        self.vit = CLIPViT(
            transformer_config=config,
            transformer_layer_spec=TransformerBlockSubmodules(layer_specs=specs),
            ln_pre_impl=norm_module(model.spec),
            add_class_token=True,
            class_token_len=1,
            patch_dim=self.cfg.patch_size,
            img_h=self.cfg.image_size,
            img_w=self.cfg.image_size,
            model_subtype="clip",
            pg_collection=replicated_pg_collection(use_ep),
        )
        if parallel.tp > 1:
            mark_replicated_over_tp(self, experts_are_dense=not use_ep)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """megatron's sharded state dict, with replica ids telling TP copies apart."""
        return mark_tp_replicas(super().sharded_state_dict(prefix, sharded_offsets, metadata))

    def encode(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """One ViT pass: ``[b, patches(+cls), hidden]`` from the feature layer."""
        # The stem's dtype, not the config's: `parallelize.place` may have cast the tower.
        features_bnc = self.vit(images_bchw.to(self.vit.conv1.weight.dtype))
        return features_bnc[:, 1:] if self.cfg.drop_cls else features_bnc

    def forward(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """Encode, with the S2 pyramid when more than one scale is configured."""
        base_bnc = self.encode(images_bchw)
        if len(self.cfg.s2_scales) == 1:
            return base_bnc
        grid = self.cfg.patches_per_side
        scales = [base_bnc]
        for scale in self.cfg.s2_scales[1:]:
            size = self.cfg.image_size * scale
            big = F.interpolate(images_bchw.float(), size=(size, size), mode="bicubic").to(images_bchw.dtype)
            tiles_bnc = self.encode(split_chessboard(big, scale))
            tiles_bchw = tiles_bnc.transpose(1, 2).reshape(tiles_bnc.shape[0], -1, grid, grid)
            stitched = merge_chessboard(tiles_bchw, scale)
            pooled = F.interpolate(stitched.float(), size=(grid, grid), mode="area").to(tiles_bnc.dtype)
            scales.append(pooled.flatten(2).transpose(1, 2))
        return torch.cat(scales, dim=-1)
