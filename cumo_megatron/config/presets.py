"""Named model shapes: the built-in tiny default and the published CuMo shapes."""

from __future__ import annotations

from cumo_megatron.config.schema import (
    ConnectorConfig,
    LanguageConfig,
    MoEConfig,
    ModelConfig,
    VisionConfig,
)


def tiny(moe: bool = True, llm_moe: bool = False) -> ModelConfig:
    """A few-KB CuMo for tests and the CPU quickstart: 3-layer ViT (2 built), width 32-64."""
    return ModelConfig(
        vision=VisionConfig(
            hidden_size=32, num_layers=3, num_heads=4, ffn_hidden_size=64, image_size=28,
            patch_size=14, moe=MoEConfig() if moe else None,
        ),
        connector=ConnectorConfig(moe=MoEConfig() if moe else None),
        language=LanguageConfig(
            arch="mixtral" if llm_moe else "llama", vocab_size=128, hidden_size=64, num_layers=2,
            num_heads=4, num_kv_heads=2, ffn_hidden_size=128, max_position_embeddings=256,
            moe=MoEConfig(num_experts=4, top_k=2) if llm_moe else None,
        ),
    )


def _clip_l336(moe: bool) -> VisionConfig:
    return VisionConfig(
        hidden_size=1024, num_layers=24, num_heads=16, ffn_hidden_size=4096, image_size=336,
        patch_size=14, s2_scales=[1, 3], moe=MoEConfig() if moe else None,
    )


def cumo_7b_mistral(moe: bool = True) -> ModelConfig:
    """CuMo-7B: CLIP-L/336 (CLIP-MoE 4x top-2, S2), MLP-MoE connector, Mistral-7B."""
    return ModelConfig(
        vision=_clip_l336(moe),
        connector=ConnectorConfig(moe=MoEConfig() if moe else None),
        language=LanguageConfig(
            arch="mistral", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
            num_kv_heads=8, ffn_hidden_size=14336, rope_theta=1e6, max_position_embeddings=32768,
        ),
        precision="bf16",
    )


def cumo_8x7b_mixtral(moe: bool = True) -> ModelConfig:
    """CuMo-8x7B: CLIP-L/336 (CLIP-MoE 4x top-2, S2), MLP-MoE connector, Mixtral-8x7B."""
    return ModelConfig(
        vision=_clip_l336(moe),
        connector=ConnectorConfig(moe=MoEConfig() if moe else None),
        language=LanguageConfig(
            arch="mixtral", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
            num_kv_heads=8, ffn_hidden_size=14336, rope_theta=1e6, max_position_embeddings=32768,
            moe=MoEConfig(num_experts=8, top_k=2),
        ),
        precision="bf16",
    )


PRESETS = {"tiny": tiny, "cumo-7b": cumo_7b_mistral, "cumo-8x7b": cumo_8x7b_mixtral}
