"""MoE blocks against oracles: 1 expert == dense, copied experts == dense, and the plain re-statement.

The CLIP-MoE block is megatron's `MoELayer` (CuMoRouter, all-gather dispatcher, SequentialMLP
experts) as our vision tower builds it; the connector is our `MoEConnector`. The oracle is
`tests/reference/cumo_reference.ReferenceMoE` with `ReferenceCLIPMLP` / `ReferenceConnectorExpert`
experts (a per-sample, per-expert loop sharing no code with the package).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cumo_megatron.config.presets import tiny
from cumo_megatron.config.schema import ConnectorConfig, ModelConfig, MoEConfig, ParallelConfig
from cumo_megatron.models.connector import ConnectorMLP, MoEConnector
from cumo_megatron.models.vision import CLIPVisionTower
from cumo_megatron.moe.upcycling import upcycle_state_dict
from tests.reference import cumo_reference as ref

H, FFN = 32, 64  # tiny ViT width and MLP width


def _cfg(vision_moe: MoEConfig | None, connector_moe: MoEConfig | None = None) -> ModelConfig:
    """Tiny CuMo with 56 px images (16 patches + CLS per image), so that routing has some variety."""
    cfg = tiny(moe=False)
    return dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, image_size=56, moe=vision_moe),
        connector=ConnectorConfig(moe=connector_moe),
    )


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Every parameter random (biases too: megatron zero-inits them, which would hide bias bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _images(seed: int = 0, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def _scale(t: torch.Tensor) -> float:
    """Magnitude for an fp32 tolerance: max |t|, at least 1."""
    return max(1.0, float(t.abs().max()))


def _prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def _unprefixed(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ------------------------------------------------------------------ (a) one expert == dense MLP


def test_single_expert_top1_equals_dense_mlp():
    torch.manual_seed(0)
    dense = CLIPVisionTower(_cfg(None), ParallelConfig())
    _randomize(dense, seed=1)
    moe = CLIPVisionTower(_cfg(MoEConfig(num_experts=1, top_k=1)), ParallelConfig())
    moe_sd = moe.state_dict()
    for key, value in dense.state_dict().items():  # copy by hand (independent of upcycling.py)
        target = key.replace(".mlp.", ".mlp.experts.local_experts.0.") if ".mlp.linear_fc" in key else key
        moe_sd[target] = value
    moe.load_state_dict(moe_sd, strict=True)
    images = _images()
    with torch.no_grad():
        expected = dense(images)
        got = moe(images)
    assert got.shape == expected.shape == (3, 16, H)
    assert (got - expected).abs().max() <= 1e-6


# ------------------------------------------- (b) upcycled copies == dense, whatever the router says


def test_upcycled_clip_moe_tower_equals_dense_for_any_router():
    torch.manual_seed(0)
    dense = CLIPVisionTower(_cfg(None), ParallelConfig())
    _randomize(dense, seed=2)
    moe_cfg = _cfg(MoEConfig(num_experts=4, top_k=2))
    moe = CLIPVisionTower(moe_cfg, ParallelConfig())
    up = upcycle_state_dict(_prefixed(dense.state_dict(), "vision."), moe_cfg, seed=0)
    moe.load_state_dict(_unprefixed(up, "vision."), strict=True)
    routers = [layer.mlp.router for layer in moe.vit.decoder.layers]
    images = _images(1)
    x_sbh = torch.randn(17, 3, H, generator=torch.Generator().manual_seed(9))
    moe.eval()  # routers report statistics without a graph in eval
    with torch.no_grad():
        expected = dense(images)
        expected_block = dense.vit.decoder.layers[0].mlp(x_sbh)[0]
        expected_block = expected_block + dense.vit.decoder.layers[0].mlp.linear_fc2.bias
        for seed in (3, 4):
            _randomize(torch.nn.ModuleList(routers), seed=seed, scale=5.0)  # peaked, far from uniform
            # The block alone: sum_k p_k * MLP(x) with sum_k p_k = 1, to fp32 rounding. megatron
            # scales the activation by p_k before fc2, so the sums differ by a few ulps of the
            # output (values up to ~5 here): the bound is 1e-6 relative to the output's scale.
            got_block, no_bias = moe.vit.decoder.layers[0].mlp(x_sbh)
            assert no_bias is None
            assert (got_block - expected_block).abs().max() <= 1e-6 * _scale(expected_block)
            got = moe(images)  # the whole tower
            assert (got - expected).abs().max() <= 1e-6 * _scale(expected)
    # The routers really did spread the tokens (otherwise the test would prove little).
    loads = routers[0].take_stats().tokens_per_expert
    assert int((loads > 0).sum()) >= 3


def test_upcycled_moe_connector_equals_dense_for_any_router():
    torch.manual_seed(0)
    cfg = _cfg(None, MoEConfig(num_experts=4, top_k=2))
    dense = ConnectorMLP(cfg.vision.feature_channels, cfg.connector_hidden)
    _randomize(dense, seed=5)
    moe = MoEConnector(cfg)
    up = upcycle_state_dict(_prefixed(dense.state_dict(), "connector."), cfg, seed=0)
    moe.load_state_dict(_unprefixed(up, "connector."), strict=True)
    x_bnc = torch.randn(3, 16, cfg.vision.feature_channels, generator=torch.Generator().manual_seed(6))
    moe.eval()
    with torch.no_grad():
        expected = dense(x_bnc)
        for seed in (7, 8):
            _randomize(moe.router, seed=seed, scale=5.0)
            assert (moe(x_bnc) - expected).abs().max() <= 1e-6 * _scale(expected)
    assert int((moe.router.take_stats().tokens_per_expert > 0).sum()) >= 3


# --------------------------------------- (c, d) the plain re-statement: outputs, losses, gradients


def _clip_pair(seed: int):
    """One CLIP-MoE layer's megatron MoELayer and the oracle with the same (random) weights."""
    torch.manual_seed(seed)
    tower = CLIPVisionTower(_cfg(MoEConfig(num_experts=4, top_k=2)), ParallelConfig())
    layer = tower.vit.decoder.layers[0].mlp
    _randomize(layer, seed=seed)
    oracle = ref.ReferenceMoE(H, [ref.ReferenceCLIPMLP(H, FFN, "quick_gelu") for _ in range(4)], top_k=2)
    with torch.no_grad():
        oracle.gate.weight.copy_(layer.router.weight)
        for ours, theirs in zip(layer.experts.local_experts, oracle.experts):
            for a, b in (("linear_fc1", "fc1"), ("linear_fc2", "fc2")):
                getattr(theirs, b).weight.copy_(getattr(ours, a).weight)
                getattr(theirs, b).bias.copy_(getattr(ours, a).bias)
    pairs = [(layer.router.weight, oracle.gate.weight)]
    for ours, theirs in zip(layer.experts.local_experts, oracle.experts):
        for a, b in (("linear_fc1", "fc1"), ("linear_fc2", "fc2")):
            pairs += [(getattr(ours, a).weight, getattr(theirs, b).weight),
                      (getattr(ours, a).bias, getattr(theirs, b).bias)]
    return layer, oracle, pairs


def _connector_pair(seed: int):
    """Our MoE connector and the oracle with the same (random) weights."""
    cfg = _cfg(None, MoEConfig(num_experts=4, top_k=2))
    torch.manual_seed(seed)
    ours = MoEConnector(cfg)
    _randomize(ours, seed=seed)
    c_in, c_out = cfg.vision.feature_channels, cfg.connector_hidden
    oracle = ref.ReferenceConnector(c_in, c_out, num_experts=4, top_k=2).net
    with torch.no_grad():
        oracle.gate.weight.copy_(ours.router.weight)
        for expert, theirs in zip(ours.experts, oracle.experts):
            for a, b in (("linear_fc1", 0), ("linear_fc2", 2)):
                theirs[b].weight.copy_(getattr(expert, a).weight)
                theirs[b].bias.copy_(getattr(expert, a).bias)
    pairs = [(ours.router.weight, oracle.gate.weight)]
    for expert, theirs in zip(ours.experts, oracle.experts):
        for a, b in (("linear_fc1", 0), ("linear_fc2", 2)):
            pairs += [(getattr(expert, a).weight, theirs[b].weight), (getattr(expert, a).bias, theirs[b].bias)]
    return ours, oracle, pairs, c_in


def _run_ours_clip(layer, x_bsh):
    out_sbh, bias = layer(x_bsh.transpose(0, 1).contiguous())  # megatron wants contiguous [s, b, h]
    assert bias is None
    return out_sbh.transpose(0, 1)


@pytest.mark.parametrize("block", ["clip_moe_layer", "moe_connector"])
def test_block_matches_reference_outputs_losses_and_gradients(block):
    if block == "clip_moe_layer":
        ours, oracle, pairs = _clip_pair(seed=11)
        x_bsh = torch.randn(3, 17, H, generator=torch.Generator().manual_seed(12))
        run = lambda x: _run_ours_clip(ours, x)  # noqa: E731
    else:
        ours, oracle, pairs, c_in = _connector_pair(seed=13)
        x_bsh = torch.randn(3, 16, c_in, generator=torch.Generator().manual_seed(14))
        run = ours
    router = ours.router
    ours.train()
    share = router.settings.call_share
    coeffs = router.settings.balance_coeff, router.settings.z_loss_coeff
    assert coeffs == (0.1, 0.01)

    x_ours = x_bsh.clone().requires_grad_(True)
    x_ref = x_bsh.clone().requires_grad_(True)
    out = run(x_ours)
    out_ref, balance_ref, z_ref = oracle(x_ref)

    # (c) outputs and the aux losses (ours are share-weighted in the router's statistics).
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    stats = router.take_stats()
    assert stats.calls == 1
    torch.testing.assert_close(stats.balance / share, balance_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.z_loss / share, z_ref.detach(), rtol=1e-5, atol=1e-6)
    assert abs(float(balance_ref) - 1.0) > 1e-3  # not trivially balanced

    # (d) gradients of output.sum() + the module's share of the weighted aux losses.
    out.sum().backward()  # ours: the aux losses ride along through MoEAuxLossAutoScaler
    (out_ref.sum() + share * (coeffs[0] * balance_ref + coeffs[1] * z_ref)).backward(retain_graph=True)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for mine, theirs in pairs:
        assert mine.grad is not None
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-5)

    # The router's gradient above is dominated by the output term (~1e2 vs ~1e-2), so check the
    # aux path on its own: through the block, only the aux losses reach the router here.
    router.weight.grad = None
    (run(x_bsh) * 0).sum().backward()
    router.take_stats()
    aux_ref = torch.autograd.grad(
        share * (coeffs[0] * balance_ref + coeffs[1] * z_ref), oracle.gate.weight
    )[0]
    assert aux_ref.abs().max() > 1e-4
    torch.testing.assert_close(router.weight.grad, aux_ref, rtol=1e-5, atol=1e-8)
