"""Our config reaches megatron-core's TransformerConfig: precision, FP8, recompute, SP, dispatcher."""

from __future__ import annotations

import pytest
import torch

import cumo_megatron.platform as platform
from cumo_megatron.config.loader import ConfigError
from cumo_megatron.config.presets import tiny
from cumo_megatron.config.schema import MoEConfig, ParallelConfig
from cumo_megatron.models import transformer_configs as tc
from cumo_megatron.models.cumo import build_model
from cumo_megatron.models.specs import layer_spec
from cumo_megatron.models.parallelize import wrap_ddp
from cumo_megatron.training.step import forward_backward


def test_language_config_passes_layout_and_switches():
    model = tiny(moe=True, llm_moe=True)
    model.recompute = "full"
    config = tc.language_transformer_config(model, ParallelConfig(tp=2, pp=2, ep=2))
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size) == (2, 2)
    assert config.expert_model_parallel_size == 2
    assert config.sequence_parallel is True  # on by default when tp > 1
    assert config.recompute_granularity == "full" and config.recompute_method == "uniform"
    assert config.num_moe_experts == 4 and config.moe_router_topk == 2
    assert config.normalization == "RMSNorm" and config.gated_linear_unit
    assert config.num_query_groups == model.language.kv_heads


def test_dispatcher_is_allgather_without_cuda_and_can_be_forced():
    model = tiny(moe=True)
    assert tc.vision_transformer_config(model, ParallelConfig()).moe_token_dispatcher_type == "allgather"
    model.token_dispatcher = "alltoall"
    assert tc.vision_transformer_config(model, ParallelConfig()).moe_token_dispatcher_type == "alltoall"


def test_precision_and_fp8_fields():
    model = tiny(moe=False)
    model.precision = "bf16"
    config = tc.language_transformer_config(model, ParallelConfig())
    assert config.bf16 and config.params_dtype == torch.bfloat16 and config.pipeline_dtype == torch.bfloat16
    model.spec, model.fp8, model.fp8_recipe = "te", "hybrid", "delayed"
    config = tc.language_transformer_config(model, ParallelConfig())
    assert config.fp8 == "hybrid" and config.fp8_recipe == "delayed"


def test_vision_is_replicated_over_tp_and_uses_ep_only_at_tp1():
    model = tiny(moe=True)
    at_tp2 = tc.vision_transformer_config(model, ParallelConfig(tp=2, ep=2))
    assert at_tp2.tensor_model_parallel_size == 1 and at_tp2.expert_model_parallel_size == 1
    at_tp1 = tc.vision_transformer_config(model, ParallelConfig(tp=1, ep=2))
    assert at_tp1.expert_model_parallel_size == 2
    assert at_tp1.activation_func.__name__ == "quick_gelu" and at_tp1.add_bias_linear


def test_unknown_spec_is_refused():
    with pytest.raises(ConfigError, match="unknown layer spec"):
        layer_spec("cuda-magic", causal=True, router=None)


def test_te_spec_needs_transformer_engine():
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError):
            layer_spec("te", causal=True, router=None)
    else:  # pragma: no cover - GPU machines only
        assert layer_spec("te", causal=True, router=None) is not None


def test_full_recompute_gives_identical_loss_and_gradients():
    """Activation recompute re-runs forward in backward: results must not change (CPU RNG path)."""
    grads, losses = [], []
    for recompute in (None, "full"):
        platform.initialize(platform.ParallelSizes(), seed=3)
        model_cfg = tiny(moe=True, llm_moe=True)
        model_cfg.recompute = recompute
        model = build_model(model_cfg, ParallelConfig())
        ddp = wrap_ddp(model)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 128, (2, 12), generator=gen)
        ids[:, 1:1 + model_cfg.vision.tokens_per_image] = model_cfg.image_token_id
        batch = dict(input_ids=ids, images=torch.randn(2, 3, 28, 28, generator=gen),
                     labels=torch.randint(0, 128, (2, 12), generator=gen), loss_mask=torch.ones(2, 12))
        ddp.zero_grad_buffer()
        losses.append(forward_backward(ddp, [batch], 1, seq_length=12, micro_batch_size=2))
        grads.append({n: p.main_grad.clone() for n, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
