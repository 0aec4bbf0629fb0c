"""Imbalance measures of expert load (token counts per expert of one MoE layer)."""

from __future__ import annotations

import math
from typing import Sequence


def shares(counts: Sequence[float]) -> list[float]:
    """Each expert's share of the layer's routed tokens (uniform when nothing was routed)."""
    total = float(sum(counts))
    if not counts:
        raise ValueError("expert load: a layer needs at least one expert")
    if total <= 0:
        return [1.0 / len(counts)] * len(counts)
    return [float(c) / total for c in counts]


def max_violation(counts: Sequence[float]) -> float:
    """MaxVio: the busiest expert's load over the mean load (1.0 = perfectly balanced).

    A layer that routed nothing counts as balanced (1.0).
    """
    total = float(sum(counts))
    if not counts:
        raise ValueError("expert load: a layer needs at least one expert")
    if total <= 0:
        return 1.0
    return max(counts) / (total / len(counts))


def load_entropy(counts: Sequence[float], normalized: bool = True) -> float:
    """Entropy of the load distribution in nats; ``normalized`` divides by ``log(E)`` (1.0 = uniform)."""
    probs = shares(counts)
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    if not normalized:
        return entropy
    return entropy / math.log(len(probs)) if len(probs) > 1 else 1.0


__all__ = ["shares", "max_violation", "load_entropy"]
