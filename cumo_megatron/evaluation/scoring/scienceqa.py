"""ScienceQA-IMG: option accuracy with LLaVA's answer extraction (``eval_science_qa.py``).

Inputs: LLaVA's ``llava_test_CQM-A.json`` (a JSON list of ``id``, optional ``image``,
``conversations``), the answers (``question_id`` is the problem id), and ScienceQA's
``problems.json`` (or the folder holding it) for each problem's ``choices`` and ``answer`` index.

Extraction, as LLaVA: the whole answer is a letter (``"B"``); or it starts with a letter and ". "
(``"B. gravity"``); or it holds exactly one "The answer is X." (one character after the letter);
anything else is FAILED and counted wrong, as is a letter beyond the problem's choices. A missing
answer is FAILED too. ``accuracy_img`` (the published SQA-IMG figure) is over the questions with
an image; LLaVA tells those by ``<image>`` in the answer's prompt, here by the question's
``image`` field, which the LLaVA question file sets for exactly those questions and which a
missing answer does not lose.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from cumo_megatron.evaluation.scoring.errors import ScoringInputError
from cumo_megatron.evaluation.scoring.inputs import id_key, load_json, pair_answers, percent, read_answers, read_records

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
# LLaVA's pattern, its unescaped '.' included: it needs one more character after the letter.
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def extract_option(text: Optional[str]) -> str:
    """The option letter LLaVA reads from an answer, or ``"FAILED"``."""
    if text is None:
        return FAILED
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def _problems(annotations: Path) -> dict:
    """ScienceQA's problems, from ``problems.json`` or the folder that holds it."""
    path = annotations / "problems.json" if annotations.is_dir() else annotations
    problems = load_json(path, "ScienceQA's problems.json")
    if not isinstance(problems, dict):
        raise ScoringInputError(f"{path}: expected ScienceQA's problems.json (an object of problems by id)")
    return problems


def score_scienceqa(questions: str | Path, answers: str | Path, annotations: str | Path) -> dict:
    """ScienceQA accuracy over all questions and over image questions (percent)."""
    records = read_records(questions, "LLaVA's llava_test_CQM-A.json")
    problems = _problems(Path(annotations))
    # LLaVA's file names the problem "id"; a question file converted to JSON lines may say "question_id"
    id_field = "id" if all("id" in r for r in records) else "question_id"
    pairing = pair_answers(records, read_answers(answers), source=questions, id_field=id_field)
    correct = total = img_correct = img_total = failed = 0
    for question, answer in pairing.pairs:
        problem = problems.get(id_key(question[id_field]))
        if problem is None or "answer" not in problem or "choices" not in problem:
            raise ScoringInputError(f"{annotations}: no problem {question[id_field]!r} with choices and answer; pass ScienceQA's problems.json")
        letter = extract_option(None if answer is None else str(answer["text"]))
        failed += letter == FAILED
        hit = letter in OPTIONS[: len(problem["choices"])] and OPTIONS.index(letter) == problem["answer"]
        total += 1
        correct += hit
        if question.get("image"):
            img_total += 1
            img_correct += hit
    metrics = {"accuracy_img": percent(img_correct, img_total), "accuracy": percent(correct, total)}
    counts = {**pairing.counts, "image_questions": img_total, "failed_extraction": failed}
    return {"benchmark": "scienceqa", "metrics": metrics, "counts": counts}


__all__ = ["FAILED", "extract_option", "score_scienceqa"]
