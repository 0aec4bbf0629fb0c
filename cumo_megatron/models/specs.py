"""Layer specs: which megatron-core modules build each transformer layer, local or Transformer Engine.

Implementations are swapped here, through `ModuleSpec`s, and nowhere else: the model code never
asks which backend it runs on. ``local`` uses plain PyTorch / megatron modules and runs anywhere
(tests, CPU); ``te`` uses Transformer Engine (fused kernels, FP8) and needs a GPU.

Every spec routes MoE through megatron's `MoELayer` with our `CuMoRouter`.
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from cumo_megatron.config.loader import ConfigError
from cumo_megatron.models.attention import SDPACoreAttention
from cumo_megatron.models.linear import ExpertRowParallelLinear
from cumo_megatron.models.norms import SequenceParallelTorchNorm
from cumo_megatron.moe.router import CuMoRouter, RouterSettings

# Local modules keep megatron's TE-style names in distributed checkpoints, so a checkpoint written
# with one spec loads with the other (the same map megatron's own local GPT spec declares).
_FUSED_NORM_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
_FUSED_MLP_NORM_KEYS = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def _router(settings: RouterSettings):
    return partial(CuMoRouter, settings=settings)


def _local_layer(mask_type: AttnMaskType, mlp: ModuleSpec, moe: bool) -> ModuleSpec:
    keys_map = dict(_FUSED_NORM_KEYS)
    if not moe:
        keys_map.update(_FUSED_MLP_NORM_KEYS)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=SequenceParallelTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPACoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SequenceParallelTorchNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def _local_mlp(router: RouterSettings | None) -> ModuleSpec:
    dense = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    if router is None:
        return ModuleSpec(module=MLP, submodules=dense)
    experts = ModuleSpec(
        module=SequentialMLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=ExpertRowParallelLinear),
    )
    return ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(experts=experts, router=_router(router)),
    )


def _te_layer(mask_type: AttnMaskType, router: RouterSettings | None) -> ModuleSpec:
    # Imported here: Transformer Engine exists only on GPU machines. Not run on our CPU CI.
    try:
        import transformer_engine  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "model.spec=te needs Transformer Engine (a GPU machine and `pip install -e .[gpu]`); "
            "use model.spec=local on CPU"
        ) from error
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    if router is None:
        mlp = ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(
                linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear
            ),
        )
        pre_mlp_norm = IdentityOp
    else:
        expert_module, expert_submodules = TESpecProvider().grouped_mlp_modules(True, False)
        mlp = ModuleSpec(
            module=MoELayer,
            submodules=MoESubmodules(
                experts=ModuleSpec(module=expert_module, submodules=expert_submodules),
                router=_router(router),
            ),
        )
        pre_mlp_norm = TENorm
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=TEDotProductAttention,
                    linear_proj=TERowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def layer_spec(spec: str, causal: bool, router: RouterSettings | None) -> ModuleSpec:
    """One transformer layer: causal (LLM) or unmasked (ViT); dense MLP, or MoE when ``router``."""
    mask_type = AttnMaskType.causal if causal else AttnMaskType.no_mask
    if spec == "local":
        return _local_layer(mask_type, _local_mlp(router), moe=router is not None)
    if spec == "te":
        return _te_layer(mask_type, router)
    raise ConfigError(f"unknown layer spec {spec!r}: choose 'local' or 'te'")


def norm_module(spec: str):
    """Stand-alone norm (ViT ln_pre, LLM final norm) for the spec."""
    if spec == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return SequenceParallelTorchNorm
