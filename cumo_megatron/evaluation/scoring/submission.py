"""Files for the evaluation servers that score the splits without public annotations, written as
LLaVA's ``convert_vqav2_for_submission.py`` and ``convert_vizwiz_for_submission.py`` write them:
each question's answer through EvalAI's processor, an empty answer for a missing one.

* VQAv2 test-dev (EvalAI): a JSON list of ``{"question_id", "answer"}``.
* VizWiz test (EvalAI): a JSON list of ``{"image", "answer"}``.
* MM-Vet (its GPT-4 grader): a JSON object ``{"v1_<question_id>": answer text}``, as LLaVA's
  ``convert_mmvet_for_eval.py`` writes it (raw text: the grader reads whole answers).
"""

from __future__ import annotations

import json
from pathlib import Path

from cumo_megatron.evaluation.scoring.inputs import pair_answers, read_answers, read_records
from cumo_megatron.evaluation.scoring.vqa_normalize import normalize_answer


def _processed(questions: str | Path, answers: str | Path) -> tuple[list[tuple[dict, str]], dict]:
    """(question, processed answer or "") in question order, and the pairing counts."""
    pairing = pair_answers(read_records(questions), read_answers(answers), source=questions)
    rows = [(q, "" if a is None else normalize_answer(str(a["text"]))) for q, a in pairing.pairs]
    return rows, pairing.counts


def write_vqav2_submission(questions: str | Path, answers: str | Path, out: str | Path) -> dict:
    """Write the VQAv2 EvalAI file for ``answers`` to ``questions`` at ``out``; return the counts."""
    rows, counts = _processed(questions, answers)
    Path(out).write_text(json.dumps([{"question_id": q["question_id"], "answer": text} for q, text in rows]))
    return counts


def write_vizwiz_submission(questions: str | Path, answers: str | Path, out: str | Path) -> dict:
    """Write the VizWiz EvalAI file for ``answers`` to ``questions`` at ``out``; return the counts."""
    rows, counts = _processed(questions, answers)
    Path(out).write_text(json.dumps([{"image": q.get("image"), "answer": text} for q, text in rows]))
    return counts


def write_mmvet_submission(answers: str | Path, out: str | Path) -> int:
    """Write the MM-Vet grader's JSON for ``answers`` at ``out``; return how many answers it holds."""
    graded = {f"v1_{a['question_id']}": str(a["text"]) for a in read_answers(answers).answers}
    Path(out).write_text(json.dumps(graded, indent=2))
    return len(graded)


__all__ = ["write_mmvet_submission", "write_vizwiz_submission", "write_vqav2_submission"]
