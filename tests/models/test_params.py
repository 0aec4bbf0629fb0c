"""Parameter accounting: built model == formulas == meta-device build, and the published sizes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cumo_megatron.config.presets import cumo_7b_mistral, cumo_8x7b_mixtral, tiny
from cumo_megatron.config.schema import MoEConfig, ParallelConfig
from cumo_megatron.models.cumo import build_model
from cumo_megatron.models.params import (
    Count,
    ParamCounts,
    count_from_config,
    count_parameters,
    format_counts,
    hand_count,
)
from cumo_megatron.platform import ParallelSizes, initialize
from tests.helpers.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

B = 1e9
# Published figures (CuMo paper), in parameters.
PUBLISHED = {
    "cumo-7b": {"total": 8.26 * B, "active": 7.80 * B},
    "cumo-8x7b": {"total": 47.7 * B, "active": 13.5 * B},
}
CLIP_MOE = {"total": 0.91 * B, "active": 0.50 * B}
CONNECTOR_MOE = {"total": 0.10 * B, "active": 0.05 * B}


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """megatron's parallel state at tp = pp = ep = 1 in this process."""
    initialize(ParallelSizes(), seed=1234)


def _mixed_tiny():
    """Tiny CuMo exercising every path: one MoE ViT layer of two, 3-expert top-2 connector, tied LM."""
    cfg = tiny(moe=True, llm_moe=True)
    return dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, moe_layers=[1]),
        connector=dataclasses.replace(cfg.connector, moe=MoEConfig(num_experts=3, top_k=2)),
        language=dataclasses.replace(cfg.language, tie_embeddings=True),
    )


TINY = {
    "moe+llm_moe": lambda: tiny(moe=True, llm_moe=True),
    "dense": lambda: tiny(moe=False),
    "mixed": _mixed_tiny,
}


def _rel(value: float, reference: float) -> float:
    return abs(value / reference - 1.0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_built_equals_hand_equals_meta(name):
    cfg = TINY[name]()
    model = build_model(cfg, ParallelConfig())
    built = count_parameters(model)
    assert built == hand_count(cfg)
    assert built == count_from_config(cfg)
    # Sanity of the definition itself, independent of the formulas.
    assert built.total.total == sum(p.numel() for p in model.parameters())
    if cfg.vision.moe is None and cfg.connector.moe is None and cfg.language.moe is None:
        assert built.total.active == built.total.total
    else:
        assert built.total.active < built.total.total


def test_tiny_moe_active_by_hand():
    """The MoE tiny model's counts written out number by number (not through `hand_count`)."""
    counts = count_parameters(build_model(tiny(moe=True, llm_moe=True), ParallelConfig()))
    # ViT h=32, f=64, 2 built layers, 4 patches; expert = 32*64+64 + 64*32+32 = 4192.
    stem = 3 * 14 * 14 * 32 + 32 + 5 * 32 + 2 * 32
    layer_dense = (3 * 32 * 32 + 96) + (32 * 32 + 32) + 4 * 32 + 4 * 32  # attn + norms + router
    assert counts.vision == Count(stem + 2 * (layer_dense + 4 * 4192), stem + 2 * (layer_dense + 2 * 4192))
    # Connector 32 -> 64 -> 64: expert = 32*64+64 + 64*64+64 = 6272; router 4*32.
    assert counts.connector == Count(4 * 6272 + 128, 2 * 6272 + 128)
    # LLM h=64, GQA 4 heads / 2 kv (head 16), ffn 128, vocab 128; expert = 64*256 + 128*64.
    attn_norm_router = 64 * (64 + 2 * 32) + 64 * 64 + 2 * 64 + 4 * 64
    outer = 128 * 64 * 2 + 64
    expert = 64 * 256 + 128 * 64
    assert counts.language == Count(outer + 2 * (attn_norm_router + 4 * expert),
                                    outer + 2 * (attn_norm_router + 2 * expert))


def test_count_parameters_sees_through_wrappers_and_rejects_strays():
    cfg = tiny(moe=True)
    model = build_model(cfg, ParallelConfig())

    class Wrapper(torch.nn.Module):  # like megatron's DDP / Float16Module: `module.` prefix
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert count_parameters(Wrapper(model)) == count_parameters(model)
    model.stray = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="stray.weight"):
        count_parameters(model)


def _published_shapes():
    return {"cumo-7b": cumo_7b_mistral(), "cumo-8x7b": cumo_8x7b_mixtral()}


@pytest.mark.parametrize("name", ["cumo-7b", "cumo-8x7b"])
def test_published_model_sizes_within_one_percent(name):
    cfg = _published_shapes()[name]
    counts = count_from_config(cfg)
    assert counts == hand_count(cfg)
    published = PUBLISHED[name]
    # Measured: CuMo-7B 8.213B / 7.776B, CuMo-8x7B 47.674B / 13.414B.
    assert _rel(counts.total.total, published["total"]) < 0.01, format_counts(counts)
    assert _rel(counts.total.active, published["active"]) < 0.01, format_counts(counts)
    # Connector MoE (2048 -> 4096 -> 4096, 4 experts top-2): 0.1007B / 0.0504B.
    assert _rel(counts.connector.total, CONNECTOR_MOE["total"]) < 0.01
    assert _rel(counts.connector.active, CONNECTOR_MOE["active"]) < 0.01


def test_clip_moe_size_built_and_checkpoint():
    """We build 23 of CLIP-L's 24 layers (penultimate features); the paper counts all 24.

    Built: 0.870B total / 0.484B active (4.4% under 0.91B). The checkpoint's 24 layers:
    0.908B total (0.2% from 0.91B) / 0.5051B active (1.0% over 0.50B, which is that figure
    rounded down at two decimals).
    """
    cfg = cumo_7b_mistral()
    built = count_from_config(cfg).vision
    full_cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, feature_layer=-1))
    full = count_from_config(full_cfg).vision
    assert full == hand_count(full_cfg).vision
    assert cfg.vision.built_layers == 23 and full_cfg.vision.built_layers == 24
    # One CLIP-MoE layer: attention + 2 LayerNorms + router + 4 (2 active) experts of 1024-4096-1024.
    attn_norms_router = (3 * 1024 * 1024 + 3 * 1024) + (1024 * 1024 + 1024) + 4 * 1024 + 4 * 1024
    expert = 1024 * 4096 + 4096 + 4096 * 1024 + 1024
    assert full.total - built.total == attn_norms_router + 4 * expert
    assert full.active - built.active == attn_norms_router + 2 * expert
    assert _rel(built.total, CLIP_MOE["total"]) > 0.01  # why the 24-layer count is the comparison
    assert _rel(full.total, CLIP_MOE["total"]) < 0.01
    assert _rel(full.active, CLIP_MOE["active"]) < 0.015


def test_meta_build_of_8x7b_allocates_nothing():
    cfg = cumo_8x7b_mixtral()
    count_from_config(tiny())  # first build pays one-off import and cache costs
    peak_measurable = reset_peak_rss()
    rss_before, peak_before = rss_bytes(), peak_rss_bytes()
    counts = count_from_config(cfg)  # raises if any parameter is not on the meta device
    grown = rss_bytes() - rss_before
    peak_grown = peak_rss_bytes() - peak_before
    # 47.7B parameters would be 95 GB in bf16; building must cost only Python objects (~3 MB here).
    assert counts.total.total > 47e9
    assert grown < 200e6, f"RSS grew by {grown / 1e6:.0f} MB"
    if peak_measurable:
        assert peak_grown < 200e6, f"peak RSS grew by {peak_grown / 1e6:.0f} MB"


def test_format_counts_table():
    counts = ParamCounts(
        vision=Count(870_170_624, 484_059_136),
        connector=Count(100_704_256, 50_356_224),
        language=Count(46_702_792_704, 12_879_925_248),
    )
    lines = format_counts(counts).splitlines()
    assert lines[0].split() == ["module", "total", "(B)", "active", "(B)"]
    assert [line.split() for line in lines[1:]] == [
        ["vision", "0.87", "0.48"],
        ["connector", "0.10", "0.05"],
        ["language", "46.70", "12.88"],
        ["total", "47.67", "13.41"],
    ]
    assert counts.as_dict()["total"] == {"total": 47_673_667_584, "active": 13_414_340_608}
