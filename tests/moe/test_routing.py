"""The pure routing functions against the plain-PyTorch oracle (tests/reference/cumo_reference.py)."""

from __future__ import annotations

import pytest
import torch

from cumo_megatron.moe import routing
from tests.reference import cumo_reference as ref

E, K = 4, 2


def _logits(s: int, b: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(s, b, E, generator=torch.Generator().manual_seed(seed)) * scale


def _ours(logits_sbe: torch.Tensor, valid_sb: torch.Tensor | None = None):
    """(balance, z-loss) from our functions on ``[s, b, E]`` logits."""
    probs_sbe = torch.softmax(logits_sbe.float(), dim=-1)
    _, experts_tk = routing.topk_renormalized(probs_sbe.reshape(-1, E), K)
    top1_sb = experts_tk[:, 0].view(logits_sbe.shape[:2])
    stats = routing.balance_stats(probs_sbe, top1_sb, valid_sb)
    valid_t = None if valid_sb is None else valid_sb.reshape(-1)
    z_sum = routing.z_loss_sum(logits_sbe.reshape(-1, E), valid_t)
    return routing.balance_loss(stats), z_sum / stats.tokens.sum()


def test_topk_renormalized_matches_reference():
    logits_te = _logits(64, 1, seed=0)[:, 0]
    weights_ref, experts_ref, probs_ref = ref.route_topk(logits_te, K)
    weights, experts = routing.topk_renormalized(torch.softmax(logits_te, dim=-1), K)
    assert torch.equal(experts, experts_ref)
    torch.testing.assert_close(weights, weights_ref, rtol=0, atol=1e-7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(64), rtol=0, atol=1e-6)
    # The first column is the top-1 expert.
    assert torch.equal(experts[:, 0], probs_ref.argmax(-1))


def test_scatter_routing_is_megatrons_dense_format():
    logits_te = _logits(32, 1, seed=1)[:, 0]
    weights, experts = routing.topk_renormalized(torch.softmax(logits_te, dim=-1), K)
    probs_te, map_te = routing.scatter_routing(weights, experts, E)
    assert probs_te.shape == map_te.shape == (32, E) and map_te.dtype == torch.bool
    assert torch.equal(map_te.sum(-1), torch.full((32,), K))
    assert torch.equal(probs_te != 0, map_te)
    assert torch.equal(probs_te.gather(1, experts), weights)


@pytest.mark.parametrize("s,b", [(16, 1), (9, 3)])
def test_balance_and_z_loss_match_reference(s, b):
    logits_sbe = _logits(s, b, seed=s + b)
    balance, z = _ours(logits_sbe)
    logits_bse = logits_sbe.transpose(0, 1)
    _, indices, probs = ref.route_topk(logits_bse, K)
    balance_ref = ref.balance_loss(probs, indices[..., 0], E)
    torch.testing.assert_close(balance, balance_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, ref.z_loss(logits_bse), rtol=1e-6, atol=1e-6)


def test_padding_is_excluded_from_every_statistic():
    s, b = 10, 4
    logits_sbe = _logits(s, b, seed=7)
    valid_sb = torch.ones(s, b, dtype=torch.bool)
    valid_sb[6:, 0] = False  # sample 0: 6 real tokens
    valid_sb[::2, 2] = False  # sample 2: holes in the middle
    valid_sb[:, 3] = False  # sample 3: all padding, must not count as a sample
    balance, z = _ours(logits_sbe, valid_sb)

    per_sample, real_logits = [], []
    for i in range(b):
        lg = logits_sbe[valid_sb[:, i], i]  # [tokens, E]: the sample alone, without its padding
        if lg.shape[0] == 0:
            continue
        _, indices, probs = ref.route_topk(lg, K)
        per_sample.append(ref.balance_loss(probs, indices[:, 0], E))
        real_logits.append(lg)
    torch.testing.assert_close(balance, torch.stack(per_sample).mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, ref.z_loss(torch.cat(real_logits)), rtol=1e-6, atol=1e-6)
    # Changing what sits in the padding changes nothing.
    noisy = logits_sbe.masked_fill(~valid_sb.unsqueeze(-1), 50.0)
    balance2, z2 = _ours(noisy, valid_sb)
    assert torch.equal(balance, balance2) and torch.equal(z, z2)


def test_balance_is_one_for_uniform_routing_and_e_for_collapse():
    # Uniform: token t strongly prefers expert t % E by the same margin, so f_e = 1/E and, by
    # symmetry, P_e = 1/E: E^2 * mean_e(1/E * 1/E) = 1.
    tokens = 8 * E
    logits_te = torch.zeros(tokens, E)
    logits_te[torch.arange(tokens), torch.arange(tokens) % E] = 3.0
    balance, _ = _ours(logits_te.unsqueeze(1))
    torch.testing.assert_close(balance, torch.tensor(1.0), rtol=0, atol=1e-6)
    # Collapsed: every token sends (almost) all probability to expert 0: E^2 * (1 * 1) / E = E.
    collapsed = torch.zeros(tokens, E)
    collapsed[:, 0] = 40.0
    balance, _ = _ours(collapsed.unsqueeze(1))
    torch.testing.assert_close(balance, torch.tensor(float(E)), rtol=0, atol=1e-5)
    # A wrong normalisation (e.g. E instead of E^2, or a sum instead of a mean) would miss both.


def test_balance_gradient_flows_only_through_mean_probabilities():
    s, b = 12, 2
    probs_sbe = torch.softmax(_logits(s, b, seed=3), dim=-1).requires_grad_(True)
    top1_sb = probs_sbe.detach().argmax(-1)
    stats = routing.balance_stats(probs_sbe, top1_sb)
    assert not stats.top1_count.requires_grad and stats.prob_sum.requires_grad
    routing.balance_loss(stats).backward()
    # d/dp[t, b, e] of mean_b E^2 * mean_e(mean_t p * f_be) = E * f_be / (s * b): f is a constant.
    f_be = torch.nn.functional.one_hot(top1_sb, E).float().mean(0)
    expected = (E * f_be / (s * b)).unsqueeze(0).expand(s, b, E)
    torch.testing.assert_close(probs_sbe.grad, expected, rtol=1e-6, atol=1e-7)

    # The same through the reference (autograd on probs only).
    probs_ref = probs_sbe.detach().transpose(0, 1).clone().requires_grad_(True)
    ref.balance_loss(probs_ref, top1_sb.t(), E).backward()
    torch.testing.assert_close(probs_ref.grad.transpose(0, 1), expected, rtol=1e-6, atol=1e-7)


def test_z_loss_sum_is_fp32_and_masked():
    logits_te = _logits(6, 1, seed=4)[:, 0].to(torch.bfloat16)
    valid_t = torch.tensor([True, True, False, True, False, True])
    z = routing.z_loss_sum(logits_te, valid_t)
    assert z.dtype == torch.float32
    expected = torch.logsumexp(logits_te.float()[valid_t], -1).square().sum()
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)


def test_pooled_samples_are_one_group_over_the_real_tokens():
    """`pool_samples`: the balance of all the micro-batch's real tokens at once, as the original's
    Mixtral block computes it on the flattened ``batch x sequence`` tokens."""
    s, b = 9, 3
    logits_sbe = _logits(s, b, seed=11)
    valid_sb = torch.ones(s, b, dtype=torch.bool)
    valid_sb[5:, 1] = False  # sample 1: 5 real tokens, 4 padding
    probs_sbe = torch.softmax(logits_sbe, dim=-1)
    _, experts_tk = routing.topk_renormalized(probs_sbe.reshape(-1, E), K)
    stats = routing.balance_stats(probs_sbe, experts_tk[:, 0].view(s, b), valid_sb)
    pooled = routing.pool_samples(stats)
    assert pooled.prob_sum.shape == (1, E) and pooled.tokens.tolist() == [float(valid_sb.sum())]

    real_te = logits_sbe[valid_sb]  # [real tokens, E], padding gone
    _, indices, probs = ref.route_topk(real_te, K)
    expected = ref.balance_loss(probs, indices[:, 0], E)  # 2-D: one group
    torch.testing.assert_close(routing.balance_loss(pooled), expected, rtol=1e-6, atol=1e-6)
    # The per-sample balance of the same tokens is another number (so the check can fail).
    assert abs(float(routing.balance_loss(stats) - expected)) > 1e-3
