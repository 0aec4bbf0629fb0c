"""Self-contrast decoding of an MoE model: its normal routing against a weaker routing of itself.

The idea is SCMoE (Shi et al. 2024, "Unchosen Experts Can Contribute Too: Unleashing MoE Models'
Power by Self-Contrast", NeurIPS 2024, arXiv:2405.14507): the same MoE weights run twice per
token, once with the configured ("strong") routing and once with a weaker routing, and the next
token is chosen from the contrast of the two, as contrastive decoding does with a large and a small
model (Li et al. 2023, "Contrastive Decoding: Open-ended Text Generation as Optimization",
ACL 2023, arXiv:2210.15097)::

    score(v) = log p_strong(v) + alpha * (log p_strong(v) - log p_weak(v))
               if p_strong(v) >= beta * max_u p_strong(u), else -inf

The second line is contrastive decoding's adaptive plausibility constraint: only tokens the strong
routing finds plausible may win, so the contrast cannot promote a token both routings reject.
Greedy / temperature / top-p sampling then act on the scores as they act on logits.
``alpha = 0`` leaves the strong log-probabilities; ``beta = 0`` disables the constraint.

The weak routing (``--contrast-weak-routing``), applied to every MoE router (vision, connector,
language), with ``K`` = ``--contrast-weak-topk``; selected probabilities are renormalised as usual:

* ``top`` (default): the ``K' = min(K, top_k)`` highest-scored experts, i.e. the model as if it
  were configured with top-K' (K = 1: one expert per token instead of CuMo's two);
* ``bottom``: the K' lowest-scored experts, the ones the router trusts least;
* ``rank``: the K-th highest-scored expert alone, SCMoE's own weak activation ("rank-k routing",
  contrasted there with Mixtral's top-2).

The weak routing is switched in for the weak forward only (`weak_routing`), by overriding the
routers' ``topk`` and ``select_experts`` (and megatron's ``moe_router_topk``, which the all-to-all
dispatcher reads) and restoring them afterwards: normal forwards run the router's code unchanged.
The weak forward sees other MLP outputs, hence other hidden states and other keys and values, so it
keeps its own KV cache (see `generation.generate`). The routers' load statistics of the weak
forwards are dropped, so expert-load reports stay those of the model as configured.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Optional

import torch

from cumo_megatron.moe.router import CuMoRouter, RouterStats

WeakRouting = Literal["top", "bottom", "rank"]
WEAK_ROUTINGS = ("top", "bottom", "rank")


@dataclass(frozen=True)
class ContrastSettings:
    """Self-contrast decoding: the weak routing (``weak_routing`` with ``weak_topk``), the contrast
    strength ``alpha`` and the plausibility threshold ``beta``."""

    weak_topk: int
    alpha: float
    beta: float = 0.1
    weak_routing: WeakRouting = "top"

    def __post_init__(self):
        if self.weak_topk < 1:
            raise ValueError(f"weak_topk must be >= 1, got {self.weak_topk}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0.0):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {self.beta}")
        if self.weak_routing not in WEAK_ROUTINGS:
            raise ValueError(f"weak_routing must be one of {', '.join(WEAK_ROUTINGS)}, got {self.weak_routing!r}")


def bottomk_renormalized(probs_te: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` lowest router probabilities, renormalised to sum to 1 (a router's ``select_experts``).

    Returns ``(weights_tk, experts_tk)`` like `routing.topk_renormalized`, least probable first.
    """
    weights_tk, experts_tk = torch.topk(probs_te, k, dim=-1, largest=False)
    # A softmax underflows to 0 only for absurd logits; the clamp keeps the division finite anyway.
    weights_tk = weights_tk / weights_tk.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights_tk.dtype).tiny)
    return weights_tk, experts_tk


def rank_expert(probs_te: torch.Tensor, k: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank``-th most probable expert alone, weight 1 (a router's ``select_experts`` with k = 1)."""
    _, experts_tr = torch.topk(probs_te, rank, dim=-1)
    experts_t1 = experts_tr[:, rank - 1 :]
    return torch.ones_like(experts_t1, dtype=probs_te.dtype), experts_t1


SelectExperts = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def moe_routers(model: torch.nn.Module) -> list[CuMoRouter]:
    """Every `CuMoRouter` of ``model`` (vision tower, connector and language model)."""
    return [m for m in model.modules() if isinstance(m, CuMoRouter)]


def _weak_choice(router: CuMoRouter, settings: ContrastSettings) -> tuple[int, Optional[SelectExperts]]:
    """The weak routing of one router: (its k, its ``select_experts``; None keeps the router's own)."""
    if settings.weak_routing == "rank":
        return 1, functools.partial(rank_expert, rank=settings.weak_topk)
    k = min(settings.weak_topk, router.topk)
    return k, (bottomk_renormalized if settings.weak_routing == "bottom" else None)


def _changes_routing(router: CuMoRouter, settings: ContrastSettings) -> bool:
    """Whether the weak routing of ``router`` picks other experts or weights than its own routing."""
    k, _ = _weak_choice(router, settings)
    if settings.weak_routing == "top":
        return k < router.topk
    if settings.weak_routing == "bottom":
        return k < router.num_experts  # the bottom k of k experts are the top k
    return not (settings.weak_topk == 1 and router.topk == 1)


def check_contrast(model: torch.nn.Module, settings: ContrastSettings) -> None:
    """Raise ValueError (saying what to change) when ``settings`` cannot weaken ``model``: it has no
    MoE module, a rank exceeds a module's expert count, or no router would route differently."""
    routers = moe_routers(model)
    if not routers:
        raise ValueError(
            "self-contrast decoding needs a model with MoE modules (vision, connector or language), and "
            "this model has none; drop the --contrast-* options"
        )
    if settings.weak_routing == "rank":
        for router in routers:
            if settings.weak_topk > router.num_experts:
                raise ValueError(
                    f"--contrast-weak-topk {settings.weak_topk} with rank routing needs that many experts, but "
                    f"the {router.settings.module} MoE has {router.num_experts}; choose a smaller rank"
                )
    if not any(_changes_routing(r, settings) for r in routers):
        listed = ", ".join(sorted({f"{r.settings.module} top-{r.topk} of {r.num_experts}" for r in routers}))
        raise ValueError(
            f"the weak routing ({settings.weak_routing}, K={settings.weak_topk}) routes exactly as the model does "
            f"({listed}); choose a --contrast-weak-topk below the configured top-k"
        )


_MISSING = object()


@contextlib.contextmanager
def weak_routing(model: torch.nn.Module, settings: ContrastSettings) -> Iterator[None]:
    """Within the block every MoE router of ``model`` routes weakly (see the module docstring);
    everything is restored on exit, and the routers' statistics of the block are dropped."""
    routers = moe_routers(model)
    saved = [(r, r.topk, r.stats, vars(r).get("select_experts", _MISSING)) for r in routers]
    configs = {id(r.config): (r.config, r.config.moe_router_topk) for r in routers}
    try:
        for router in routers:
            k, select = _weak_choice(router, settings)
            router.topk = k
            # megatron's all-to-all dispatcher sizes its buffers from the config's top-k. Routers
            # sharing a config have the same top-k, hence the same weak k.
            router.config.moe_router_topk = k
            router.stats = RouterStats()
            if select is not None:
                router.select_experts = select
        yield
    finally:
        for router, topk, stats, own_select in saved:
            router.topk = topk
            router.stats = stats
            if own_select is _MISSING:
                vars(router).pop("select_experts", None)  # back to the class's top-k selection
            else:
                router.select_experts = own_select
        for config, topk in configs.values():
            config.moe_router_topk = topk


def contrast_scores(strong_bv: torch.Tensor, weak_bv: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Contrasted next-token scores ``[b, vocab]`` (fp32) from the strong and weak logits.

    ``log p_s + alpha * (log p_s - log p_w)`` where ``p_s >= beta * max p_s``, ``-inf`` elsewhere.
    """
    log_strong_bv = torch.log_softmax(strong_bv.float(), dim=-1)
    log_weak_bv = torch.log_softmax(weak_bv.float(), dim=-1)
    scores_bv = log_strong_bv + alpha * (log_strong_bv - log_weak_bv)
    if beta > 0.0:
        floor_b1 = log_strong_bv.max(dim=-1, keepdim=True).values + math.log(beta)
        scores_bv = scores_bv.masked_fill(log_strong_bv < floor_b1, float("-inf"))
    return scores_bv


__all__ = [
    "ContrastSettings",
    "WEAK_ROUTINGS",
    "bottomk_renormalized",
    "rank_expert",
    "moe_routers",
    "check_contrast",
    "weak_routing",
    "contrast_scores",
]
