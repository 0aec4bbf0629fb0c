"""Throughput settings (training.performance): the CUDA branch decided and checked on a CPU."""

from __future__ import annotations

import dataclasses

import pytest

from cumo_megatron.config.loader import ConfigError
from cumo_megatron.config.presets import tiny
from cumo_megatron.config.schema import ExperimentConfig, ParallelConfig
from cumo_megatron.models import transformer_configs as tc
from cumo_megatron.training.performance import throughput_settings


def _cfg(pp=1, llm_moe=False, **train) -> ExperimentConfig:
    cfg = ExperimentConfig(model=tiny(moe=True, llm_moe=llm_moe), parallel=ParallelConfig(pp=pp))
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_cpu_keeps_everything_off_but_variable_lengths_under_pp():
    assert throughput_settings(_cfg(), cuda=False, te=False) == throughput_settings(_cfg(), cuda=False, te=True)
    off = throughput_settings(_cfg(pp=2), cuda=False, te=False)
    assert off.variable_seq_lengths
    assert not any([off.bias_activation_fusion, off.bias_dropout_fusion, off.apply_rope_fusion,
                    off.gradient_accumulation_fusion, off.moe_permute_fusion, off.overlap_grad_reduce,
                    off.overlap_param_gather, off.async_save])
    assert not throughput_settings(_cfg(pp=1), cuda=False, te=False).variable_seq_lengths


def test_cuda_with_te_turns_on_what_the_specs_support():
    on = throughput_settings(_cfg(pp=2), cuda=True, te=True, apex=True)
    assert on.bias_activation_fusion and on.bias_dropout_fusion and on.apply_rope_fusion
    assert on.gradient_accumulation_fusion and on.moe_permute_fusion
    assert on.variable_seq_lengths
    # Both overlaps with CUDA (the order of their collectives: parallelize.order_bucket_collectives),
    # and asynchronous saves (tests/training/test_async_save.py).
    assert on.overlap_grad_reduce and on.overlap_param_gather and on.async_save
    # No kernel of ours reads these two.
    assert not on.masked_softmax_fusion and not on.persist_layer_norm
    without = throughput_settings(_cfg(), cuda=True, te=False)
    assert not without.apply_rope_fusion and not without.moe_permute_fusion  # TE kernels
    assert not without.gradient_accumulation_fusion  # ColumnParallelLinear needs apex's extension
    assert without.bias_dropout_fusion


def test_knobs_override_the_automatic_choice():
    cfg = _cfg(pp=2, overlap_grad_reduce=False, overlap_param_gather=False, variable_seq_lengths=False,
               async_save=False)
    cfg.model.fusions = False
    forced_off = throughput_settings(cfg, cuda=True, te=True, apex=True)
    assert forced_off == throughput_settings(_cfg(pp=2, variable_seq_lengths=False), cuda=False, te=False)
    forced_on = throughput_settings(_cfg(overlap_grad_reduce=True, overlap_param_gather=True), cuda=False, te=False)
    assert forced_on.overlap_grad_reduce and forced_on.overlap_param_gather
    # The parameter gather overlap belongs to the distributed optimizer.
    assert not throughput_settings(_cfg(distributed_optimizer=False, overlap_param_gather=True),
                                   cuda=True, te=True).overlap_param_gather


def test_moe_llm_with_allgather_keeps_fixed_lengths():
    cfg = _cfg(pp=2, llm_moe=True)
    assert not throughput_settings(cfg, cuda=False, te=False).variable_seq_lengths  # auto: all-gather
    assert throughput_settings(cfg, cuda=True, te=True).variable_seq_lengths  # auto: all-to-all
    cfg.train.variable_seq_lengths = True
    with pytest.raises(ConfigError, match="train.variable_seq_lengths=true .* model.token_dispatcher=alltoall"):
        throughput_settings(cfg, cuda=False, te=False)


def test_cuda_fusion_fields_per_tower_are_accepted_by_megatron():
    """The fused fields that need neither TE nor apex, applied per tower, pass TransformerConfig's
    checks (built here with the CUDA branch's fields; quick_gelu is not fusable outside a GLU)."""
    model = tiny(moe=False)
    settings = throughput_settings(ExperimentConfig(model=model), cuda=True, te=False)
    assert not settings.fusion_fields(model, "vision")["bias_activation_fusion"]  # quick_gelu
    assert settings.fusion_fields(model, "vision")["bias_dropout_fusion"]
    assert not any(settings.fusion_fields(model, "connector").values())
    language = settings.fusion_fields(model, "language")
    assert language["bias_activation_fusion"] and language["bias_dropout_fusion"]
    model.vision.activation = "gelu"
    vision = settings.fusion_fields(model, "vision")
    assert vision["bias_activation_fusion"] and not vision["apply_rope_fusion"]
    for fields, base in ((vision, tc.vision_transformer_config(model, ParallelConfig())),
                         (language, tc.language_transformer_config(model, ParallelConfig()))):
        fused = dataclasses.replace(base, **fields)  # runs megatron's __post_init__ checks again
        assert fused.bias_activation_fusion and fused.bias_dropout_fusion


def test_cpu_transformer_configs_keep_fusions_off():
    model = tiny(moe=True)
    for config in (tc.vision_transformer_config(model, ParallelConfig()), tc.connector_transformer_config(model),
                   tc.language_transformer_config(model, ParallelConfig())):
        assert not (config.bias_activation_fusion or config.bias_dropout_fusion or config.apply_rope_fusion
                    or config.gradient_accumulation_fusion or config.moe_permute_fusion)
