"""The CuMo router as a megatron-core MoE router module.

Plugged into megatron's `MoELayer` through ``MoESubmodules(router=...)``. It replaces
`TopKRouter`, whose gating moves weights to CUDA and, without Transformer Engine, fails in
megatron-core 0.16.1; CuMo's routing and losses are ours anyway (see `routing.py`).

Auxiliary losses reach the backward pass through megatron's `MoEAuxLossAutoScaler`, which attaches
the loss gradient to the routing probabilities. That works on every pipeline stage, where the LM
loss is not available (the vision tower lives on the first stage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.transformer_config import TransformerConfig

from cumo_megatron.moe import routing


# How a router groups tokens for its balance loss: per-sample statistics -> the groups' statistics.
GROUPS = {"sample": lambda stats: stats, "micro_batch": routing.pool_samples}


@dataclass
class RouterSettings:
    """What a router needs beyond megatron's config: whose it is and how its losses are weighted."""

    module: str  # "vision", "connector" or "language": the MoE module the router belongs to
    balance_coeff: float = 0.1
    z_loss_coeff: float = 0.01
    # Share of the module's loss that one forward call of this router carries: 1 / (number of MoE
    # layers in the module * forward passes per step through them, e.g. 2 for S2 scales).
    call_share: float = 1.0
    # Which tokens one balance loss is taken over, as the original CuMo code groups them for the
    # module: "sample" (each sample's tokens, losses averaged over samples: its CLIP and connector
    # MoE) or "micro_batch" (all the micro-batch's non-padding tokens on this rank at once: its
    # Mixtral block, which flattens batch x sequence before routing).
    group: str = "sample"

    def __post_init__(self):
        if self.group not in GROUPS:
            raise ValueError(f"RouterSettings.group must be one of {sorted(GROUPS)}, got {self.group!r}")


@dataclass
class RouterStats:
    """Detached statistics a router accumulates until `take()` is called (for logging)."""

    # Share-weighted, detached tensors (no device sync per layer): summing over a module's routers
    # gives the module's loss.
    balance: torch.Tensor | float = 0.0
    z_loss: torch.Tensor | float = 0.0
    tokens_per_expert: Optional[torch.Tensor] = None  # top-k assignments counted per expert
    calls: int = 0


def default_linear_init_(weight: torch.Tensor) -> torch.Tensor:
    """PyTorch's `nn.Linear` default init (kaiming-uniform, a=sqrt(5)): the reference's router init."""
    return torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class CuMoRouter(MegatronModule):
    """Bias-free linear router: fp32 softmax -> top-k -> renormalise; dropless, no noise.

    ``forward(hidden_sbh, padding_mask)`` returns megatron's ``(probs_te, routing_map_te)`` for
    the flattened ``s*b`` tokens, and, when the module's coefficients are non-zero, attaches
    ``balance_coeff * balance + z_loss_coeff * z`` (times ``call_share``) to the backward pass.
    The balance is taken per sample or over the whole micro-batch (``settings.group``); the z-loss
    is the mean over all the call's counted tokens either way, as in the original.
    """

    # How a token picks its experts from the router probabilities: ``(probs_te, k) -> (weights_tk,
    # experts_tk)``. A class attribute, so an instance may shadow it for a while (the weak routing
    # of `cumo_megatron.inference.contrast`) without a branch in `forward`.
    select_experts = staticmethod(routing.topk_renormalized)

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection=None,
        settings: RouterSettings | None = None,
    ):
        super().__init__(config)
        self.settings = settings or RouterSettings(module="language", group="micro_batch")
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.layer_number = None
        self.tp_group = pg_collection.tp if pg_collection is not None else None
        self.weight = torch.nn.Parameter(
            torch.empty(config.num_moe_experts, config.hidden_size, dtype=config.params_dtype)
        )
        if config.perform_initialization:
            # The reference starts routers with nn.Linear's default init, not megatron's init_method.
            with torch.no_grad():
                default_linear_init_(self.weight)
        # Replicated across TP ranks; under SP each rank routes different tokens, so the gradient
        # is summed over TP by finalize_model_grads.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
        self.stats = RouterStats()

    def set_layer_number(self, layer_number: int) -> None:
        """Called by megatron's transformer layer."""
        self.layer_number = layer_number

    def _tokens_split_over_tp(self) -> bool:
        return (
            self.config.sequence_parallel
            and self.tp_group is not None
            and self.tp_group.size() > 1
        )

    def forward(self, hidden_sbh: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Route ``[s, b, h]`` tokens; ``padding_mask`` ``[s, b]`` is True for padding tokens.

        megatron-core's convention (its ``GPTModel``/``MoELayer`` hand the mask on as given):
        padding is routed (its outputs are masked by the loss) but left out of the aux losses and
        the load counts. A deliberate difference: the original's Mixtral block sees no attention
        mask and counts padding in the LLM's losses, so they drift with how much a batch is padded.
        """
        if hidden_sbh.dim() == 2:  # callers outside MoELayer may pass flat tokens: one sample
            hidden_sbh = hidden_sbh.unsqueeze(1)
        s, b, h = hidden_sbh.shape
        logits_sbe = torch.matmul(hidden_sbh.float(), self.weight.float().t())
        probs_sbe = torch.softmax(logits_sbe, dim=-1)
        weights_tk, experts_tk = self.select_experts(probs_sbe.view(s * b, -1), self.topk)
        probs_te, routing_map_te = routing.scatter_routing(weights_tk, experts_tk, self.num_experts)

        valid_sb = ~padding_mask.bool() if padding_mask is not None else None
        wants_aux = self.settings.balance_coeff != 0.0 or self.settings.z_loss_coeff != 0.0
        # Under activation recompute a training forward runs twice: once without grad (discarded)
        # and again in backward. Count it once, on the pass that builds the graph.
        counts = not self.training or torch.is_grad_enabled()
        if counts:
            probs_te = self._attach_aux_losses(
                probs_te, logits_sbe, probs_sbe, experts_tk[:, 0].view(s, b), valid_sb, wants_aux
            )
            self._record_load(routing_map_te, valid_sb)
        return probs_te.to(hidden_sbh.dtype), routing_map_te

    def _attach_aux_losses(self, probs_te, logits_sbe, probs_sbe, top1_sb, valid_sb, wants_aux):
        stats = GROUPS[self.settings.group](routing.balance_stats(probs_sbe, top1_sb, valid_sb))
        z_sum = routing.z_loss_sum(logits_sbe.view(-1, self.num_experts),
                                   None if valid_sb is None else valid_sb.reshape(-1))
        z_count = stats.tokens.sum()
        if self._tokens_split_over_tp():
            # Each TP rank holds a slice of every sample's tokens: sum the statistics over TP
            # (per group, so a micro-batch group also gathers every TP rank's tokens).
            # The reduction's backward is the identity, which is right because every TP rank
            # computes (and back-propagates) the same loss from the same reduced statistics.
            stats = routing.BalanceStats(
                reduce_from_tensor_model_parallel_region(stats.prob_sum, self.tp_group),
                reduce_from_tensor_model_parallel_region(stats.top1_count, self.tp_group),
                reduce_from_tensor_model_parallel_region(stats.tokens, self.tp_group),
            )
            z_sum = reduce_from_tensor_model_parallel_region(z_sum, self.tp_group)
            z_count = reduce_from_tensor_model_parallel_region(z_count, self.tp_group)
        balance = routing.balance_loss(stats)
        z_loss = z_sum / z_count.clamp(min=1)
        share = self.settings.call_share
        self.stats.balance = self.stats.balance + share * balance.detach()
        self.stats.z_loss = self.stats.z_loss + share * z_loss.detach()
        if wants_aux and self.training and torch.is_grad_enabled():
            aux = share * (self.settings.balance_coeff * balance + self.settings.z_loss_coeff * z_loss)
            probs_te = MoEAuxLossAutoScaler.apply(probs_te, aux)
        return probs_te

    def _record_load(self, routing_map_te, valid_sb):
        with torch.no_grad():
            chosen_te = routing_map_te
            if valid_sb is not None:
                chosen_te = chosen_te & valid_sb.reshape(-1, 1)
            counts_e = chosen_te.sum(dim=0)
            if self._tokens_split_over_tp():
                # Each TP rank routed a slice of the sequence: the layer's load is their sum (the
                # same on every TP rank, as the aux statistics are).
                torch.distributed.all_reduce(counts_e, group=self.tp_group)
        self.stats.tokens_per_expert = (
            counts_e if self.stats.tokens_per_expert is None else self.stats.tokens_per_expert + counts_e
        )
        self.stats.calls += 1

    def take_stats(self) -> RouterStats:
        """Return the statistics accumulated since the last call and start afresh."""
        stats, self.stats = self.stats, RouterStats()
        return stats
