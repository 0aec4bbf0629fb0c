"""CuMo routing and auxiliary losses as small pure functions.

Semantics (../shared/DESIGN.md, section 1): a bias-free linear gives logits; the softmax over
experts is taken in fp32; the top-k probabilities are kept and renormalised to sum to 1; no noise,
no capacity, no token dropping. Balance loss per sample is ``E^2 * mean_e(P_e * f_e)`` with ``P_e``
the sample's mean router probability and ``f_e`` the fraction of its tokens whose *top-1* expert
is e, averaged over samples; the router z-loss is the token mean of ``logsumexp(logits)^2``.

The statistics are split into sums and counts so that callers holding only a slice of each
sample's tokens (sequence parallelism) can all-reduce them before forming the losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def topk_renormalized(probs_te: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of router probabilities, the k weights renormalised to sum to 1.

    Returns ``(weights_tk, experts_tk)``; ``experts_tk[:, 0]`` is each token's top-1 expert.
    """
    weights_tk, experts_tk = torch.topk(probs_te, k, dim=-1)
    weights_tk = weights_tk / weights_tk.sum(dim=-1, keepdim=True)
    return weights_tk, experts_tk


def scatter_routing(
    weights_tk: torch.Tensor, experts_tk: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron-core's routing format: dense ``probs_te`` (zero off the top-k) and a bool map."""
    probs_te = torch.zeros(
        weights_tk.shape[0], num_experts, dtype=weights_tk.dtype, device=weights_tk.device
    ).scatter(1, experts_tk, weights_tk)
    routing_map_te = torch.zeros(
        weights_tk.shape[0], num_experts, dtype=torch.bool, device=weights_tk.device
    ).scatter(1, experts_tk, True)
    return probs_te, routing_map_te


@dataclass
class BalanceStats:
    """Per-sample sums behind the balance loss (all ``[num_samples, E]`` except ``tokens``)."""

    prob_sum: torch.Tensor  # sum over the sample's tokens of router probabilities (carries grad)
    top1_count: torch.Tensor  # number of the sample's tokens whose top-1 expert is e
    tokens: torch.Tensor  # [num_samples] number of tokens counted per sample


def balance_stats(
    probs_sbe: torch.Tensor, top1_sb: torch.Tensor, valid_sb: torch.Tensor | None = None
) -> BalanceStats:
    """Per-sample sums for the balance loss from ``[s, b, E]`` probabilities and top-1 choices.

    ``valid_sb`` (bool) excludes padding tokens from every statistic.
    """
    num_experts = probs_sbe.shape[-1]
    top1_onehot_sbe = torch.nn.functional.one_hot(top1_sb, num_experts).to(probs_sbe.dtype)
    if valid_sb is not None:
        weight_sb1 = valid_sb.to(probs_sbe.dtype).unsqueeze(-1)
        probs_sbe = probs_sbe * weight_sb1
        top1_onehot_sbe = top1_onehot_sbe * weight_sb1
        tokens_b = valid_sb.to(probs_sbe.dtype).sum(dim=0)
    else:
        tokens_b = torch.full(
            (probs_sbe.shape[1],), probs_sbe.shape[0], dtype=probs_sbe.dtype, device=probs_sbe.device
        )
    return BalanceStats(probs_sbe.sum(dim=0), top1_onehot_sbe.sum(dim=0), tokens_b)


def balance_loss(stats: BalanceStats) -> torch.Tensor:
    """``mean_b( E^2 * mean_e(P_be * f_be) )`` over samples that have at least one token."""
    num_experts = stats.prob_sum.shape[-1]
    has_tokens_b = stats.tokens > 0
    tokens_b1 = stats.tokens.clamp(min=1).unsqueeze(-1)
    per_sample_b = (stats.prob_sum / tokens_b1 * (stats.top1_count / tokens_b1)).mean(dim=-1)
    per_sample_b = per_sample_b * float(num_experts**2)
    return per_sample_b[has_tokens_b].mean() if has_tokens_b.any() else per_sample_b.sum() * 0.0


def z_loss_sum(logits_te: torch.Tensor, valid_t: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over tokens of ``logsumexp(logits)^2`` (divide by the token count for the loss)."""
    lse_sq_t = torch.logsumexp(logits_te.float(), dim=-1).square()
    if valid_t is not None:
        lse_sq_t = lse_sq_t * valid_t.to(lse_sq_t.dtype)
    return lse_sq_t.sum()
