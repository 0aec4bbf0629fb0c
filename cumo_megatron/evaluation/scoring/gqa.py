"""GQA: exact match after LLaVA's normalisation, scored as GQA's ``eval.py`` scores a tier.

Inputs: LLaVA's ``llava_gqa_testdev_balanced.jsonl`` (``question_id`` is GQA's), the answers,
and GQA's ``testdev_balanced_questions.json`` (question id -> ``answer``, ``isBalanced``,
``types``). LLaVA's ``convert_gqa_for_eval.py`` turns an answer into its prediction by dropping
trailing periods and lower-casing; ``eval.py`` then counts a prediction right when it equals the
answer, over the balanced questions only, and breaks accuracy down into binary / open questions
(open: structural type "query") and per structural and semantic type.
"""

from __future__ import annotations

from pathlib import Path

from cumo_megatron.evaluation.scoring.errors import ScoringInputError
from cumo_megatron.evaluation.scoring.inputs import id_key, load_json, pair_answers, percent, read_answers, read_records


def gqa_prediction(text: str) -> str:
    """LLaVA's GQA prediction: the answer without trailing periods, lower-cased."""
    return text.rstrip(".").lower()


def _mean(scores: list[int]) -> float:
    """Percent of ones in a list of 0/1 scores."""
    return percent(sum(scores), len(scores))


def score_gqa(questions: str | Path, answers: str | Path, annotations: str | Path) -> dict:
    """GQA accuracy (percent) over the balanced questions, with GQA's breakdowns."""
    records = read_records(questions, "LLaVA's llava_gqa_testdev_balanced.jsonl")
    gold = load_json(annotations, "GQA's testdev_balanced_questions.json")
    if not isinstance(gold, dict):
        raise ScoringInputError(f"{annotations}: expected GQA's questions JSON (an object of questions by id)")
    gold = {id_key(k): v for k, v in gold.items()}
    pairing = pair_answers(records, read_answers(answers), source=questions)
    scores, by_kind, structural, semantic = [], {"binary": [], "open": []}, {}, {}
    unbalanced = 0
    for question, answer in pairing.pairs:
        entry = gold.get(id_key(question["question_id"]))
        if not isinstance(entry, dict) or "answer" not in entry:
            raise ScoringInputError(f"{annotations}: no question {question['question_id']!r} with an answer; pass the GQA questions file of this split")
        if not entry.get("isBalanced", True):
            unbalanced += 1  # eval.py scores the balanced questions only
            continue
        score = int(answer is not None and gqa_prediction(str(answer["text"])) == entry["answer"])
        scores.append(score)
        types = entry.get("types") or {}
        if "structural" in types:
            by_kind["open" if types["structural"] == "query" else "binary"].append(score)
            structural.setdefault(types["structural"], []).append(score)
        if "semantic" in types:
            semantic.setdefault(types["semantic"], []).append(score)
    metrics = {
        "accuracy": _mean(scores),
        **{kind: _mean(s) for kind, s in by_kind.items() if s},
        "structural_types": {k: _mean(s) for k, s in sorted(structural.items())},
        "semantic_types": {k: _mean(s) for k, s in sorted(semantic.items())},
    }
    return {"benchmark": "gqa", "metrics": metrics, "counts": {**pairing.counts, "unbalanced_skipped": unbalanced}}


__all__ = ["gqa_prediction", "score_gqa"]
