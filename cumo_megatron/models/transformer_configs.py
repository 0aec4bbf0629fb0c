"""Translate our `ModelConfig` into megatron-core `TransformerConfig`s for each sub-model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from cumo_megatron.config.schema import MoEConfig, ModelConfig, ParallelConfig
from cumo_megatron.models.fp8 import fp8_fields
from cumo_megatron.models.parallelize import language_expert_parallel_size, vision_expert_parallel_size
from cumo_megatron.platform import cpu
from cumo_megatron.training.performance import fusion_fields, resolved_dispatcher

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SHAPE_ONLY = False


@contextlib.contextmanager
def shape_only_build() -> Iterator[None]:
    """Within the block, configs ask megatron for weights without initialisation or a device.

    ``use_cpu_initialization`` makes megatron create weights with ``torch.empty`` and no device
    argument (otherwise it names the CUDA device, which a surrounding ``torch.device("meta")``
    cannot override), and ``perform_initialization=False`` skips its init kernels. Wrapped in
    ``with torch.device("meta")`` this builds any model size without allocating memory
    (`cumo_megatron.models.params.count_from_config`). Weights built this way are garbage:
    only their shapes are meaningful.
    """
    global _SHAPE_ONLY
    previous, _SHAPE_ONLY = _SHAPE_ONLY, True
    try:
        yield
    finally:
        _SHAPE_ONLY = previous


def _common(model: ModelConfig, tower: str) -> dict:
    dtype = _DTYPES[model.precision]
    fields = dict(
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=model.precision == "bf16",
        fp16=model.precision == "fp16",
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_std,
        # Fusions are CUDA kernels or assume shapes we do not have; TE fuses on the GPU path.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        moe_permute_fusion=False,
    )
    # The fusion values above are the CPU ones; with CUDA those the spec supports are switched on.
    fields.update(fusion_fields(model, tower))
    # Only the LLM runs under FP8: the ViT's 577 tokens per crop and the connector's image tokens
    # are not multiples of 16 (models.fp8).
    fields.update(fp8_fields(model, tower))
    if model.recompute == "full":
        fields.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif model.recompute == "selective":
        fields.update(recompute_granularity="selective")
    fields.update(cpu.transformer_config_overrides())
    if _SHAPE_ONLY:
        fields.update(use_cpu_initialization=True, perform_initialization=False)
    return fields


def _moe_fields(model: ModelConfig, moe: MoEConfig | None, ffn: int) -> dict:
    if moe is None:
        return {}
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=ffn,
        moe_token_dispatcher_type=resolved_dispatcher(model, cpu.cuda_available()),
        moe_grouped_gemm=model.spec == "te",
        moe_router_load_balancing_type="none",  # our router computes CuMo's losses itself
        moe_aux_loss_coeff=0.0,
        # megatron insists on pre-softmax routing for top-1; our router ignores the flag (for
        # top-1 the renormalised weight is 1 either way).
        moe_router_pre_softmax=moe.top_k == 1,
    )


def vision_transformer_config(model: ModelConfig, parallel: ParallelConfig) -> TransformerConfig:
    """ViT layers: LayerNorm, biased linears, quick_gelu/gelu MLP, no mask; TP = 1 (replicated)."""
    vision = model.vision
    fields = _common(model, "vision")
    fields.update(
        num_layers=vision.built_layers,
        hidden_size=vision.hidden_size,
        num_attention_heads=vision.num_heads,
        ffn_hidden_size=vision.ffn_hidden_size,
        kv_channels=vision.hidden_size // vision.num_heads,
        normalization="LayerNorm",
        layernorm_epsilon=vision.layernorm_eps,
        activation_func=cpu.quick_gelu_impl() if vision.activation == "quick_gelu" else torch.nn.functional.gelu,
        gated_linear_unit=False,
        add_bias_linear=True,
        add_qkv_bias=True,
        tensor_model_parallel_size=1,
        sequence_parallel=False,
        pipeline_model_parallel_size=1,
        # Only a tower with experts names an EP size (megatron rejects EP without experts): the
        # dense twin `checkpointing.load_weights` builds to co-upcycle a stage-2 checkpoint, or a
        # dense ViT beside an MoE LLM, shares the run's parallel.ep (`parallelize` decides).
        expert_model_parallel_size=vision_expert_parallel_size(model, parallel),
        expert_tensor_parallel_size=1,
    )
    fields.update(_moe_fields(model, vision.moe, vision.ffn_hidden_size))
    return TransformerConfig(**fields)


def connector_transformer_config(model: ModelConfig) -> TransformerConfig:
    """Config handed to the connector's router (hidden size = connector input width)."""
    moe = model.connector.moe
    fields = _common(model, "connector")
    fields.update(
        num_layers=1,
        hidden_size=model.vision.feature_channels,
        num_attention_heads=1,
        ffn_hidden_size=model.connector_hidden,
        add_bias_linear=True,
        tensor_model_parallel_size=1,
        sequence_parallel=False,
    )
    fields.update(_moe_fields(model, moe, model.connector_hidden))
    return TransformerConfig(**fields)


def language_transformer_config(model: ModelConfig, parallel: ParallelConfig) -> TransformerConfig:
    """LLaMA/Mistral/Mixtral: RMSNorm, SwiGLU, RoPE, GQA, no biases; full TP/SP/PP/EP."""
    lang = model.language
    fields = _common(model, "language")
    fields.update(
        num_layers=lang.num_layers,
        hidden_size=lang.hidden_size,
        num_attention_heads=lang.num_heads,
        num_query_groups=lang.kv_heads,
        ffn_hidden_size=lang.ffn_hidden_size,
        kv_channels=lang.hidden_size // lang.num_heads,
        normalization="RMSNorm",
        layernorm_epsilon=lang.rms_norm_eps,
        activation_func=torch.nn.functional.silu,
        gated_linear_unit=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        tensor_model_parallel_size=parallel.tp,
        sequence_parallel=parallel.use_sequence_parallel,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=language_expert_parallel_size(model, parallel),
        expert_tensor_parallel_size=parallel.etp,
    )
    fields.update(_moe_fields(model, lang.moe, lang.ffn_hidden_size))
    return TransformerConfig(**fields)
