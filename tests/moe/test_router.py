"""`CuMoRouter` against the oracle: routing, aux-loss gradients, call shares, statistics, padding,
per-sample and per-micro-batch balance groups."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from cumo_megatron.config.presets import tiny
from cumo_megatron.models.transformer_configs import connector_transformer_config
from cumo_megatron.moe.router import CuMoRouter, RouterSettings
from tests.reference import cumo_reference as ref

S, B = 7, 3  # tokens per sample, samples
SHARE, BAL, Z = 0.25, 0.3, 0.05  # call share and coefficients (not the defaults, so that mixing them up shows)


def _router(share=SHARE, bal=BAL, z=Z, group="sample") -> CuMoRouter:
    config = connector_transformer_config(tiny())  # hidden 32 -> 4 experts, top-2
    router = CuMoRouter(config, settings=RouterSettings("vision", bal, z, call_share=share, group=group))
    with torch.no_grad():  # larger than the default init, so routing is far from uniform
        router.weight.copy_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(5)))
    return router


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(S, B, 32, generator=torch.Generator().manual_seed(seed))


def _reference_losses(x_sbh, weight, valid_sb=None):
    """Per-sample balance (mean over samples with tokens) and token-mean z-loss, by the oracle."""
    logits_sbe = x_sbh @ weight.t()
    if valid_sb is None:
        valid_sb = torch.ones(x_sbh.shape[:2], dtype=torch.bool)
    balances, real = [], []
    for b in range(x_sbh.shape[1]):
        lg = logits_sbe[valid_sb[:, b], b]
        if lg.shape[0]:
            _, indices, probs = ref.route_topk(lg, 2)
            balances.append(ref.balance_loss(probs, indices[:, 0], weight.shape[0]))
            real.append(lg)
    return torch.stack(balances).mean(), ref.z_loss(torch.cat(real))


def _aux_grad_of_reference(x_sbh, weight, valid_sb=None, share=SHARE):
    w = weight.detach().clone().requires_grad_(True)
    balance, z = _reference_losses(x_sbh, w, valid_sb)
    (share * (BAL * balance + Z * z)).backward()
    return w.grad


def test_routing_output_format_and_values():
    router = _router()
    x = _x()
    probs_te, map_te = router(x)
    assert probs_te.shape == map_te.shape == (S * B, 4) and map_te.dtype == torch.bool
    assert torch.equal(map_te.sum(-1), torch.full((S * B,), 2))
    assert torch.equal(probs_te != 0, map_te)
    torch.testing.assert_close(probs_te.sum(-1), torch.ones(S * B), rtol=0, atol=1e-6)
    # Token order is megatron's flattened [s, b]; values are the oracle's renormalised top-2.
    weights, indices, _ = ref.route_topk(x @ router.weight.detach().t(), 2)
    torch.testing.assert_close(
        probs_te.view(S, B, 4).gather(-1, indices), weights, rtol=0, atol=1e-6
    )


def test_aux_gradient_equals_autograd_of_the_weighted_losses():
    router = _router()
    x = _x(1)
    probs_te, _ = router(x)
    # The main path contributes nothing: only the MoEAuxLossAutoScaler path reaches the weight.
    (probs_te * 0).sum().backward()
    expected = _aux_grad_of_reference(x, router.weight)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(router.weight.grad, expected, rtol=1e-5, atol=1e-7)

    # megatron scales the aux gradient like the main loss (e.g. 1 / micro-batches).
    router.weight.grad = None
    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.full((1,), 0.5)
    (router(x)[0] * 0).sum().backward()
    torch.testing.assert_close(router.weight.grad, 0.5 * expected, rtol=1e-5, atol=1e-7)


def test_call_share_scales_losses_and_gradient():
    x = _x(2)
    grads = {}
    for share in (1.0, 1.0 / 6):
        router = _router(share=share)
        (router(x)[0] * 0).sum().backward()
        grads[share] = router.weight.grad
        stats = router.take_stats()
        balance, z = _reference_losses(x, router.weight.detach())
        torch.testing.assert_close(stats.balance, share * balance, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stats.z_loss, share * z, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1.0 / 6], grads[1.0] / 6, rtol=1e-5, atol=1e-8)


def test_stats_accumulate_until_taken():
    router = _router()
    xs = [_x(3), _x(4)]
    for x in xs:
        router(x)
    stats = router.take_stats()
    assert stats.calls == 2
    losses = [_reference_losses(x, router.weight.detach()) for x in xs]
    torch.testing.assert_close(stats.balance, SHARE * (losses[0][0] + losses[1][0]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.z_loss, SHARE * (losses[0][1] + losses[1][1]), rtol=1e-5, atol=1e-7)
    assert not stats.balance.requires_grad  # detached: logging never holds the graph
    counts = sum(
        torch.nn.functional.one_hot(ref.route_topk(x @ router.weight.detach().t(), 2)[1], 4).sum((0, 1, 2))
        for x in xs
    )
    assert torch.equal(stats.tokens_per_expert, counts)
    assert int(stats.tokens_per_expert.sum()) == 2 * 2 * S * B

    fresh = router.take_stats()
    assert fresh.calls == 0 and fresh.balance == 0.0 and fresh.z_loss == 0.0
    assert fresh.tokens_per_expert is None


def test_padding_tokens_are_excluded():
    router = _router()
    x = _x(5)
    valid_sb = torch.ones(S, B, dtype=torch.bool)  # True = real token (the router takes the inverse)
    valid_sb[4:, 0] = False
    valid_sb[1::2, 2] = False
    probs_te, _ = router(x, ~valid_sb)  # megatron's convention: True = padding
    (probs_te * 0).sum().backward()
    stats = router.take_stats()
    balance, z = _reference_losses(x, router.weight.detach(), valid_sb)
    torch.testing.assert_close(stats.balance, SHARE * balance, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.z_loss, SHARE * z, rtol=1e-5, atol=1e-7)
    assert int(stats.tokens_per_expert.sum()) == 2 * int(valid_sb.sum())
    torch.testing.assert_close(
        router.weight.grad, _aux_grad_of_reference(x, router.weight, valid_sb), rtol=1e-5, atol=1e-7
    )
    # Without the mask the numbers differ (the test can fail).
    unmasked, _ = _reference_losses(x, router.weight.detach())
    assert abs(float(unmasked - balance)) > 1e-4


def test_eval_and_no_grad_attach_nothing():
    x = _x(6)
    router = _router().eval()
    (router(x)[0] * 0).sum().backward()
    assert router.weight.grad is None or not router.weight.grad.any()
    stats = router.take_stats()  # eval still reports the losses (validation logging)
    assert stats.calls == 1
    torch.testing.assert_close(stats.balance, SHARE * _reference_losses(x, router.weight.detach())[0])

    router.train()
    with torch.no_grad():  # e.g. the discarded first pass of activation recompute
        router(x)
    assert router.take_stats().calls == 0


def test_zero_coefficients_attach_nothing_but_still_report():
    router = _router(bal=0.0, z=0.0)
    x = _x(7)
    (router(x)[0] * 0).sum().backward()
    assert router.weight.grad is None or not router.weight.grad.any()
    assert router.take_stats().calls == 1


def test_flat_tokens_are_one_sample():
    router = _router()
    x = _x(8)[:, 0]  # [tokens, h]
    probs_te, map_te = router(x)
    assert probs_te.shape == (S, 4)
    stats = router.take_stats()
    torch.testing.assert_close(
        stats.balance, SHARE * _reference_losses(x.unsqueeze(1), router.weight.detach())[0]
    )


def _reference_micro_batch_losses(x_sbh, weight, valid_sb):
    """The original Mixtral block's grouping, by the oracle: one balance over all real tokens."""
    real_te = (x_sbh @ weight.t())[valid_sb]
    _, indices, probs = ref.route_topk(real_te, 2)
    return ref.balance_loss(probs, indices[:, 0], weight.shape[0]), ref.z_loss(real_te)


def test_micro_batch_group_is_one_balance_over_the_real_tokens():
    router = _router(group="micro_batch")
    x = _x(9)
    valid_sb = torch.ones(S, B, dtype=torch.bool)
    valid_sb[3:, 1] = False
    probs_te, _ = router(x, ~valid_sb)
    (probs_te * 0).sum().backward()
    stats = router.take_stats()
    balance, z = _reference_micro_batch_losses(x, router.weight.detach(), valid_sb)
    torch.testing.assert_close(stats.balance, SHARE * balance, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.z_loss, SHARE * z, rtol=1e-5, atol=1e-7)
    w = router.weight.detach().clone().requires_grad_(True)
    balance_w, z_w = _reference_micro_batch_losses(x, w, valid_sb)
    (SHARE * (BAL * balance_w + Z * z_w)).backward()
    torch.testing.assert_close(router.weight.grad, w.grad, rtol=1e-5, atol=1e-7)
    # Per sample the same tokens give another balance (so the check can fail).
    per_sample, _ = _reference_losses(x, router.weight.detach(), valid_sb)
    assert abs(float(per_sample - balance)) > 1e-3


def test_unknown_group_is_refused():
    with pytest.raises(ValueError, match="group"):
        RouterSettings("language", group="batch")
