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
    from cumo_megatron.jsonl import read_json_lines

    answers = {}
    for line in read_json_lines(path):
        if line.error is not None:
            raise ValueError(f"{path} line {line.number}: not JSON ({line.error})")
        answers[str(line.value.get("id", line.value.get("question_id")))] = line.value.get("text", "")
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
    """Heatmap of each MoE layer's share of tokens per expert over the whole stage-3 run.

    Sums ``expert_load`` (``{layer: [tokens per expert]}``) over every row of ``metrics.jsonl`` and
    draws it with `cumo_megatron.research.expert_plot` (the plot ``tools/expert_load.py`` makes;
    a balanced top-k router gives every expert 1 / num_experts). ``None`` when the file is missing
    or has no MoE rows.
    """
    from cumo_megatron.research.expert_load import load_table, read_metrics_load
    from cumo_megatron.research.expert_plot import plot_expert_heatmap

    metrics_path = Path(metrics_path)
    if not metrics_path.exists():
        return None
    found = read_metrics_load(metrics_path)
    if not found.layers:
        return None
    title = f"stage 3 expert load, steps {found.steps[0]}-{found.steps[-1]}"
    return plot_expert_heatmap(load_table(found.layers), png_path, title)
