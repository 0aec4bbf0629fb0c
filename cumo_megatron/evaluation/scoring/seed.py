"""SEED-Bench: option accuracy, per question type and per data type, as LLaVA's
``convert_seed_for_submission.py`` scores it.

Inputs: LLaVA's ``llava-seed-bench.jsonl`` (``question_id``, ``image``, ``text``), the answers,
and SEED's ``SEED-Bench.json`` (``question_type``: name -> id; ``questions``: ``question_id``,
``answer`` letter, ``question_type_id``, ``data_type`` image/video). An answer is right when its
text is exactly the letter (LLaVA compares the whole text; answers are stripped, as LLaVA's
generation strips them). The published SEED column is the image accuracy.
"""

from __future__ import annotations

from pathlib import Path

from cumo_megatron.evaluation.scoring.errors import ScoringInputError
from cumo_megatron.evaluation.scoring.inputs import id_key, load_json, pair_answers, percent, read_answers, read_records


def score_seed(questions: str | Path, answers: str | Path, annotations: str | Path) -> dict:
    """SEED-Bench accuracy (percent): all, image, video, and per question type."""
    records = read_records(questions, "LLaVA's llava-seed-bench.jsonl")
    data = load_json(annotations, "SEED's SEED-Bench.json")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ScoringInputError(f"{annotations}: expected SEED's SEED-Bench.json (with 'questions' and 'question_type')")
    type_names = {id_key(v): k for k, v in (data.get("question_type") or {}).items()}
    gold = {id_key(q.get("question_id")): q for q in data["questions"] if isinstance(q, dict)}
    pairing = pair_answers(records, read_answers(answers), source=questions)
    everything, by_data, by_type = [], {}, {}
    for question, answer in pairing.pairs:
        entry = gold.get(id_key(question["question_id"]))
        if entry is None or "answer" not in entry:
            raise ScoringInputError(f"{annotations}: no question {question['question_id']!r} with an answer; pass SEED-Bench.json")
        right = answer is not None and str(answer["text"]).strip() == str(entry["answer"]).strip()
        everything.append(right)
        by_data.setdefault(str(entry.get("data_type", "image")), []).append(right)
        type_id = entry.get("question_type_id")
        if type_id is not None:
            by_type.setdefault(type_names.get(id_key(type_id), str(type_id)), []).append(right)
    metrics = {
        "accuracy_image": percent(sum(by_data.get("image", [])), len(by_data.get("image", []))),
        "accuracy": percent(sum(everything), len(everything)),
        **{f"accuracy_{kind}": percent(sum(v), len(v)) for kind, v in by_data.items() if kind != "image"},
        "question_types": {name: percent(sum(v), len(v)) for name, v in sorted(by_type.items())},
    }
    return {"benchmark": "seed", "metrics": metrics, "counts": pairing.counts}


__all__ = ["score_seed"]
