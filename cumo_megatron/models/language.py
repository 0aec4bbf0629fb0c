"""The language model: megatron-core `GPTModel` configured as LLaMA / Vicuna / Mistral / Mixtral."""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from cumo_megatron.config.schema import ModelConfig, ParallelConfig
from cumo_megatron.models.specs import layer_spec, norm_module
from cumo_megatron.models.transformer_configs import language_transformer_config
from cumo_megatron.moe.router import RouterSettings


def build_language_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
) -> GPTModel:
    """GPTModel with RMSNorm, SwiGLU, RoPE, GQA and an untied head; MoE MLPs for Mixtral.

    The embedding does not scatter to sequence-parallel ranks: the CuMo model first splices image
    features into the full sequence, then scatters.
    """
    config = language_transformer_config(model, parallel)
    lang = model.language
    router = None
    if lang.moe is not None:
        router = RouterSettings(
            module="language",
            balance_coeff=lang.moe.balance_coeff,
            z_loss_coeff=lang.moe.z_loss_coeff,
            call_share=1.0 / lang.num_layers,
            # The original's Mixtral block (smoe_mixtral_helper.py) routes the flattened
            # micro-batch: one balance loss over all its tokens, not one per sample.
            group="micro_batch",
        )
    spec = layer_spec(model.spec, causal=True, router=router)
    block = TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=norm_module(model.spec)
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=lang.vocab_size,
        max_sequence_length=lang.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=lang.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(lang.rope_theta),
        scatter_embedding_sequence_parallel=False,
        vp_stage=vp_stage,
    )
