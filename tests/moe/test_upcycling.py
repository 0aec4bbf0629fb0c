"""Co-upcycling a dense CuMo state dict: exact expert copies, fresh seeded routers, same LM loss."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from cumo_megatron.config.loader import ConfigError
from cumo_megatron.config.presets import tiny
from cumo_megatron.config.schema import ModelConfig, MoEConfig, ParallelConfig
from cumo_megatron.models.cumo import build_model
from cumo_megatron.moe.router import CuMoRouter
from cumo_megatron.moe.stats import collect_moe_stats
from cumo_megatron.moe.upcycling import upcycle_state_dict
from cumo_megatron.platform import ParallelSizes, initialize

VISION_MLP = "vision.vit.decoder.layers.{i}.mlp."
LLM_MLP = "language_model.decoder.layers.{i}.mlp."
MLP_PARTS = ("linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias")


def _mixed() -> ModelConfig:
    """Only the second ViT layer is MoE; 3-expert connector."""
    cfg = tiny(moe=True)
    return dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, moe_layers=[1]),
        connector=dataclasses.replace(cfg.connector, moe=MoEConfig(num_experts=3, top_k=2)),
    )


TARGETS = {
    "vision+connector": lambda: tiny(moe=True),
    "mixed": _mixed,
    "with_llm": lambda: tiny(moe=True, llm_moe=True),
}


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """megatron's parallel state at tp = pp = ep = 1 in this process."""
    initialize(ParallelSizes(), seed=0)


@pytest.fixture(autouse=True)
def unit_aux_scale():
    """Pin megatron's process-wide aux-loss backward scale, and leave it as found.

    A backward with the scale unset makes megatron create a 0-dim one, which a later
    ``set_loss_scale(torch.ones(1))`` (megatron's schedules) cannot copy into.
    """
    saved = MoEAuxLossAutoScaler.main_loss_backward_scale
    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.ones(1)
    yield
    MoEAuxLossAutoScaler.main_loss_backward_scale = saved


@pytest.fixture(scope="module")
def dense():
    """A dense tiny CuMo (stage 2) and its state dict."""
    torch.manual_seed(1)
    model = build_model(tiny(moe=False), ParallelConfig())
    return model, model.state_dict()


def _batch():
    generator = torch.Generator().manual_seed(2)
    b, s, n_img = 2, 12, tiny().vision.tokens_per_image
    input_ids = torch.randint(1, 128, (b, s), generator=generator)
    input_ids[:, 1:1 + n_img] = tiny().image_token_id  # one image per sample
    images = torch.randn(b, 3, 28, 28, generator=generator)
    labels = torch.randint(0, 128, (b, s), generator=generator)
    return input_ids, images, labels


def _expert_prefixes(cfg: ModelConfig) -> list[tuple[str, str, int]]:
    """(dense prefix, expert prefix format, experts) of every MLP the config upcycles."""
    out = [(VISION_MLP.format(i=i), "experts.local_experts.{j}.", cfg.vision.moe.num_experts)
           for i in cfg.vision.moe_layer_indices()]
    out.append(("connector.", "experts.{j}.", cfg.connector.moe.num_experts))
    if cfg.language.moe is not None:
        out += [(LLM_MLP.format(i=i), "experts.local_experts.{j}.", cfg.language.moe.num_experts)
                for i in range(cfg.language.num_layers)]
    return out


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_experts_are_exact_copies_and_everything_else_passes_through(dense, name):
    cfg = TARGETS[name]()
    _, dense_sd = dense
    up = upcycle_state_dict(dense_sd, cfg, seed=0)
    upcycled = set()
    for prefix, expert_fmt, experts in _expert_prefixes(cfg):
        parts = [p for p in MLP_PARTS if prefix + p in dense_sd]
        assert parts, prefix
        for part in parts:
            source = dense_sd[prefix + part]
            upcycled.add(prefix + part)
            assert prefix + part not in up  # the dense MLP is gone
            copies = [up[prefix + expert_fmt.format(j=j) + part] for j in range(experts)]
            assert all(torch.equal(c, source) and c.dtype == source.dtype for c in copies)
            # Independent storage: experts must be free to diverge in training.
            assert len({c.data_ptr() for c in copies} | {source.data_ptr()}) == experts + 1
        assert up[prefix + "router.weight"].shape == (experts, dense_sd[prefix + "linear_fc1.weight"].shape[1])
    for key, value in dense_sd.items():
        if key not in upcycled and not key.endswith("_extra_state"):
            assert up[key] is value, key
    if name == "mixed":  # layer 0 is dense in this config: untouched
        key = VISION_MLP.format(i=0) + "linear_fc1.weight"
        assert up[key] is dense_sd[key]


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_upcycled_model_has_the_dense_lm_loss_and_live_aux_losses(dense, name):
    cfg = TARGETS[name]()
    dense_model, dense_sd = dense
    moe_model = build_model(cfg, ParallelConfig())
    up = upcycle_state_dict(dense_sd, cfg, seed=0)
    assert list(up) == list(moe_model.state_dict())  # same names, same order as a built MoE model
    moe_model.load_state_dict(up, strict=True)
    input_ids, images, labels = _batch()
    dense_model.train()
    moe_model.train()
    with torch.no_grad():
        dense_loss = dense_model(input_ids, images, labels)
    collect_moe_stats(moe_model)  # start from clean statistics
    moe_loss = moe_model(input_ids, images, labels)
    assert moe_loss.shape == dense_loss.shape == labels.shape
    assert (moe_loss.detach() - dense_loss).abs().max() <= 1e-5

    stats = collect_moe_stats(moe_model)
    modules = {"vision", "connector"} | ({"language"} if cfg.language.moe else set())
    assert set(stats["modules"]) == modules
    for module in modules:
        assert stats["modules"][module]["balance"] > 0.1 and stats["modules"][module]["z_loss"] > 0.0
    # Top-k assignments: every ViT layer sees the patches and the CLS token, the connector the patches.
    patches = images.shape[0] * cfg.vision.tokens_per_image
    for i in cfg.vision.moe_layer_indices():
        assert sum(stats["layers"][f"vision.layer{i}"]) == cfg.vision.moe.top_k * (patches + images.shape[0])
    assert sum(stats["layers"]["connector"]) == cfg.connector.moe.top_k * patches

    # The aux losses reach every router: with identical experts the LM loss does not depend on
    # the routing, so these gradients come from the balance and z losses.
    moe_loss.sum().backward()
    for path, module in moe_model.named_modules():
        if isinstance(module, CuMoRouter):
            assert module.weight.grad is not None and module.weight.grad.abs().max() > 1e-6, path


def test_routers_are_fresh_and_seeded(dense):
    cfg = tiny(moe=True)
    _, dense_sd = dense
    a, a_again, other = (upcycle_state_dict(dense_sd, cfg, seed=s) for s in (7, 7, 8))
    routers = [k for k in a if k.endswith("router.weight")]
    assert len(routers) == len(cfg.vision.moe_layer_indices()) + 1
    for key in routers:
        assert torch.equal(a[key], a_again[key])
        assert not torch.equal(a[key], other[key])
        # nn.Linear's default init: kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(a[key].shape[1])
        assert a[key].abs().max() <= bound and a[key].abs().max() > 0.8 * bound
        assert a[key].std() == pytest.approx(bound / math.sqrt(3), rel=0.3)
    assert not torch.equal(a[routers[0]], a[routers[1]])  # each router its own draw


def test_router_dtype_follows_the_source(dense):
    _, dense_sd = dense
    bf16 = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v for k, v in dense_sd.items()}
    up = upcycle_state_dict(bf16, tiny(moe=True), seed=0)
    assert up["connector.router.weight"].dtype == torch.bfloat16
    assert up[VISION_MLP.format(i=1) + "router.weight"].dtype == torch.bfloat16


def test_existing_moe_llm_passes_through():
    torch.manual_seed(3)
    source = build_model(tiny(moe=False, llm_moe=True), ParallelConfig()).state_dict()  # Mixtral-like
    up = upcycle_state_dict(source, tiny(moe=True, llm_moe=True), seed=0)
    llm_keys = [k for k in source if k.startswith("language_model.")]
    assert all(up[k] is source[k] for k in llm_keys)
    assert "connector.router.weight" in up
    eight = tiny(moe=True, llm_moe=True)
    eight = dataclasses.replace(eight, language=dataclasses.replace(eight.language, moe=MoEConfig(8, 2)))
    with pytest.raises(ConfigError, match="language.moe.num_experts=8"):
        upcycle_state_dict(source, eight, seed=0)
    with pytest.raises(ConfigError, match="language.moe is not set"):
        upcycle_state_dict(source, tiny(moe=True), seed=0)


def test_errors_name_the_problem(dense):
    _, dense_sd = dense
    cfg = tiny(moe=True)
    up = upcycle_state_dict(dense_sd, cfg, seed=0)
    with pytest.raises(ConfigError, match="already MoE"):
        upcycle_state_dict(up, cfg, seed=0)
    wider = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, ffn_hidden_size=96))
    with pytest.raises(ConfigError, match=r"linear_fc1\.weight has shape \[64, 32\].*\[96, 32\]"):
        upcycle_state_dict(dense_sd, wider, seed=0)
    deeper = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_layers=4))
    with pytest.raises(ConfigError, match="builds 3"):
        upcycle_state_dict(dense_sd, deeper, seed=0)
    missing = {k: v for k, v in dense_sd.items() if k != "connector.linear_fc2.bias"}
    with pytest.raises(ConfigError, match=r"connector\.linear_fc2\.bias is missing"):
        upcycle_state_dict(missing, cfg, seed=0)
    big_connector = dataclasses.replace(
        cfg, language=dataclasses.replace(cfg.language, hidden_size=128), connector=cfg.connector
    )
    with pytest.raises(ConfigError, match="connector"):
        upcycle_state_dict(dense_sd, big_connector, seed=0)
