"""TextVQA: VQA accuracy with EvalAI's normalisation, as LLaVA's ``eval_textvqa.py`` scores it.

Inputs: LLaVA's ``llava_textvqa_val_v051_ocr.jsonl`` (its ``question_id`` is TextVQA's image id,
shared by the questions of one image), the answers, and TextVQA's ``TextVQA_0.5.1_val.json``
(``data``: ``image_id``, ``question``, ``question_id``, ten ``answers``). As in LLaVA, a question
finds its annotation by (image id, lower-cased question), the question being read out of the
prompt (the line before the OCR tokens and the answer instruction); a question file that uses
TextVQA's own question ids is matched by those instead.
"""

from __future__ import annotations

import re
from pathlib import Path

from cumo_megatron.evaluation.scoring.errors import ScoringInputError
from cumo_megatron.evaluation.scoring.inputs import id_key, load_json, pair_answers, percent, read_answers, read_records
from cumo_megatron.evaluation.scoring.vqa_accuracy import textvqa_accuracy

_OCR_PROMPT = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)
_REFERENCE = "Reference OCR token:"


def prompt_question(prompt: str) -> str:
    """The question inside a TextVQA prompt, lower-cased, read as LLaVA's ``prompt_processor``:
    after "Question: " in an "OCR tokens: " prompt; else the line that is not the OCR reference
    in a three-line prompt; else the first line."""
    if prompt.startswith("OCR tokens: "):
        found = _OCR_PROMPT.search(prompt)
        if found:
            return found.group(1).lower()
    lines = prompt.split("\n")
    if _REFERENCE + " " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith(_REFERENCE) else lines[0]).lower()
    return lines[0].lower()


def _annotations(path: Path) -> tuple[dict, dict]:
    """(image id, question) -> answers and question id -> answers, from TextVQA's annotations."""
    data = load_json(path, "TextVQA's TextVQA_0.5.1_val.json")
    records = data.get("data") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise ScoringInputError(f"{path}: expected TextVQA's annotation JSON with a 'data' list")
    by_image_question, by_id = {}, {}
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not record.get("answers"):
            raise ScoringInputError(f"{path}, data record {number}: no 'answers'; use TextVQA's val annotations")
        answers = [str(a) for a in record["answers"]]
        by_image_question[(id_key(record.get("image_id")), str(record.get("question", "")).lower())] = answers
        if "question_id" in record:
            by_id[id_key(record["question_id"])] = answers
    return by_image_question, by_id


def score_textvqa(questions: str | Path, answers: str | Path, annotations: str | Path) -> dict:
    """TextVQA accuracy (percent) of ``answers``."""
    records = read_records(questions, "LLaVA's llava_textvqa_val_v051_ocr.jsonl")
    by_image_question, by_id = _annotations(Path(annotations))
    pairing = pair_answers(records, read_answers(answers), source=questions)
    total = 0.0
    for question, answer in pairing.pairs:
        qid = id_key(question["question_id"])
        humans = by_image_question.get((qid, prompt_question(str(question.get("text", ""))))) or by_id.get(qid)
        if humans is None:
            raise ScoringInputError(f"{annotations}: no annotation for question {question['question_id']!r}; pass TextVQA's val annotations")
        if answer is not None:
            total += textvqa_accuracy(str(answer["text"]), humans)
    metrics = {"accuracy": percent(total, len(pairing.pairs))}
    return {"benchmark": "textvqa", "metrics": metrics, "counts": pairing.counts}


__all__ = ["prompt_question", "score_textvqa"]
