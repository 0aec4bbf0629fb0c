"""Score the quickstart: exact-match accuracy of generated answers, and an expert-load plot."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

__all__ = ["normalize_answer", "evaluate", "plot_expert_load"]


def normalize_answer(text: str) -> str:
    """Lower case, the first word only, punctuation stripped (answers are single words)."""
    words = re.findall(r"[a-z]+", (text or "").lower())
    return words[0] if words else ""


def _load_answers(path: Path) -> dict:
    answers = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {n}: not JSON ({exc})") from None
            answers[str(row.get("id", row.get("question_id")))] = row.get("text", "")
    return answers


def evaluate(answers_path, eval_path) -> dict:
    """Exact-match accuracy of ``answers_path`` (generate's JSONL) against ``eval_path`` (eval.json).

    A question without an answer counts as wrong. Chance level is the mean over questions of 1 / the
    number of distinct answers of that question's type. Returns ``{"accuracy", "correct", "n",
    "chance", "per_type": {type: accuracy}, "missing"}``.
    """
    records = json.loads(Path(eval_path).read_text())
    answers = _load_answers(Path(answers_path))
    options: dict[str, set] = {}
    for rec in records:
        options.setdefault(rec.get("type", "all"), set()).add(normalize_answer(rec["conversations"][1]["value"]))
    correct, missing, chance = 0, 0, 0.0
    per_type: dict[str, list[int]] = {}
    for rec in records:
        kind = rec.get("type", "all")
        expected = normalize_answer(rec["conversations"][1]["value"])
        rid = str(rec["id"])
        if rid not in answers:
            missing += 1
        ok = int(rid in answers and normalize_answer(answers[rid]) == expected)
        correct += ok
        chance += 1.0 / len(options[kind])
        per_type.setdefault(kind, [0, 0])
        per_type[kind][0] += ok
        per_type[kind][1] += 1
    n = len(records)
    if n == 0:
        raise ValueError(f"{eval_path} holds no questions")
    return {
        "accuracy": correct / n,
        "correct": correct,
        "n": n,
        "chance": chance / n,
        "per_type": {k: v[0] / v[1] for k, v in sorted(per_type.items())},
        "missing": missing,
    }


def plot_expert_load(metrics_path, png_path) -> Optional[Path]:
    """Plot each MoE layer's share of tokens per expert over the stage-3 run; ``None`` without MoE rows.

    Reads ``expert_load`` (``{layer: [tokens per expert]}``) from every row of ``metrics.jsonl``;
    one panel per layer shows each expert's share over the steps (moving average), the last panel
    the share over the whole run per layer (a balanced top-k router gives every expert 1 / num_experts).
    """
    metrics_path = Path(metrics_path)
    if not metrics_path.exists():
        return None
    steps, loads = [], {}
    for line in metrics_path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        load = row.get("expert_load") or {}
        if not load:
            continue
        steps.append(row.get("step", len(steps) + 1))
        for layer, counts in load.items():
            loads.setdefault(layer, []).append(counts)
    if not loads:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted(loads)
    fig, axes = plt.subplots(1, len(layers) + 1, figsize=(4.2 * (len(layers) + 1), 4), squeeze=False)
    axes = axes[0]
    window = max(1, len(steps) // 20)  # moving average: per-step counts of a small batch are noisy
    for ax, layer in zip(axes, layers):
        counts = np.asarray(loads[layer], dtype=float)  # [steps, experts]
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        kernel = np.ones(window) / window
        for e in range(share.shape[1]):
            smooth = np.convolve(share[:, e], kernel, mode="valid")
            ax.plot(steps[window - 1: window - 1 + len(smooth)], smooth, lw=1.2, label=f"expert {e}")
        ax.axhline(1.0 / share.shape[1], color="k", ls="--", lw=0.8)
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel(f"share of routed tokens (mean of {window} steps)")
    axes[0].legend(fontsize=7)
    ax_tot = axes[-1]
    totals = [np.asarray(loads[layer], dtype=float).sum(axis=0) for layer in layers]
    n_exp = max(len(t) for t in totals)
    width = 0.8 / n_exp
    x = np.arange(len(layers))
    for e in range(n_exp):
        shares = [t[e] / max(t.sum(), 1) if e < len(t) else 0 for t in totals]
        ax_tot.bar(x + e * width, shares, width, label=f"expert {e}")
    ax_tot.axhline(1.0 / n_exp, color="k", ls="--", lw=0.8, label="balanced")
    ax_tot.set_xticks(x + width * (n_exp - 1) / 2)
    ax_tot.set_xticklabels(layers, rotation=20, ha="right", fontsize=8)
    ax_tot.set_ylabel("share over the whole run")
    ax_tot.set_title("stage 3 expert load per MoE layer", fontsize=9)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
