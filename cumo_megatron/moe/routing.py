"""CuMo routing and auxiliary losses as small pure functions.

Semantics (../shared/DESIGN.md, section 1): a bias-free linear gives logits; the softmax over
experts is taken in fp32; the top-k probabilities are kept and renormalised to sum to 1; no noise,
no capacity, no token dropping. The balance loss of a group of tokens is ``E^2 * mean_e(P_e * f_e)``
with ``P_e`` the group's mean router probability and ``f_e`` the fraction of its tokens whose
*top-1* expert is e, averaged over groups; the router z-loss is the token mean of
``logsumexp(logits)^2``.

What a group is follows the original CuMo code, module by module: each sample for the vision tower
and the connector (``clip_smoe.py`` and ``multimodal_projector/builder.py`` reduce ``'... n e ->
... e'`` per image), the whole micro-batch for a Mixtral LLM (``smoe_mixtral_helper.py`` flattens
``batch x sequence`` before routing). `balance_stats` gives per-sample statistics;
`pool_samples` merges them into one micro-batch group.

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
    """Per-group sums behind the balance loss (all ``[num_groups, E]`` except ``tokens``).

    A group is one sample (`balance_stats`) or the whole micro-batch (`pool_samples`).
    """

    prob_sum: torch.Tensor  # sum over the group's tokens of router probabilities (carries grad)
    top1_count: torch.Tensor  # number of the group's tokens whose top-1 expert is e
    tokens: torch.Tensor  # [num_groups] number of tokens counted per group


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


def pool_samples(stats: BalanceStats) -> BalanceStats:
    """Merge every sample's statistics into one group (``[1, E]`` sums, ``[1]`` tokens).

    `balance_loss` of the result is the balance of all the counted tokens taken together, as the
    original computes it over a flattened micro-batch. Summing is exact, so pooling before or
    after an all-reduce of the sums over sequence-parallel ranks gives the same statistics.
    """
    return BalanceStats(
        stats.prob_sum.sum(dim=0, keepdim=True),
        stats.top1_count.sum(dim=0, keepdim=True),
        stats.tokens.sum(dim=0, keepdim=True),
    )


def balance_loss(stats: BalanceStats) -> torch.Tensor:
    """``mean_g( E^2 * mean_e(P_ge * f_ge) )`` over groups (rows of ``stats``) with a token."""
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
