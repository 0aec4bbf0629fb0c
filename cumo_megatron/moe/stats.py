"""Per-step MoE statistics for logging: aux losses per MoE module and expert load per layer.

Every `CuMoRouter` accumulates detached, share-weighted statistics over the forward calls of a
step (see `router.RouterStats`); `collect_moe_stats` drains them. Summing a module's share-weighted
values over its routers gives that module's loss for one microbatch, so the sum is divided by the
number of microbatches. With pipeline parallelism a rank only holds (and reports) its own stages'
routers; nothing here communicates.
"""

from __future__ import annotations

import torch

from cumo_megatron.moe.router import CuMoRouter


def _as_float(value: torch.Tensor | float) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _layer_key(router: CuMoRouter, path: str) -> str:
    """``"<module>.layer<i>"`` (0-based, from megatron's 1-based global layer number), else the module."""
    if router.layer_number is not None:
        return f"{router.settings.module}.layer{router.layer_number - 1}"
    return router.settings.module


def collect_moe_stats(model: torch.nn.Module, num_microbatches: int = 1) -> dict:
    """Drain every router's statistics (resetting them) into a JSON-friendly dict.

    Returns ``{"modules": {module: {"balance": float, "z_loss": float}},
    "layers": {"vision.layer0": [tokens per expert, ...], ...}}``. Module values are the sums of
    the routers' share-weighted losses divided by ``num_microbatches``; token counts are the top-k
    assignments of real (non-padding) tokens summed over all calls since the last collection.
    """
    if num_microbatches < 1:
        raise ValueError(f"collect_moe_stats: num_microbatches must be >= 1, got {num_microbatches}")
    modules: dict[str, dict[str, float]] = {}
    layers: dict[str, list[int]] = {}
    for path, sub in model.named_modules():
        if not isinstance(sub, CuMoRouter):
            continue
        stats = sub.take_stats()
        name = sub.settings.module
        entry = modules.setdefault(name, {"balance": 0.0, "z_loss": 0.0})
        entry["balance"] += _as_float(stats.balance) / num_microbatches
        entry["z_loss"] += _as_float(stats.z_loss) / num_microbatches
        key = _layer_key(sub, path)
        if key in layers:  # two routers without distinct layer numbers: tell them apart by path
            key = f"{key}.{path}"
        counts = stats.tokens_per_expert
        layers[key] = [0] * sub.num_experts if counts is None else [int(c) for c in counts.tolist()]
    return {"modules": modules, "layers": layers}
