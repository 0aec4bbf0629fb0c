"""VQAv2 and VizWiz: the official VQA accuracy on answers through EvalAI's processor, as LLaVA's
``convert_vqav2_for_submission.py`` / ``convert_vizwiz_for_submission.py`` and the evaluation
servers score them.

The published test-dev (VQAv2) and test (VizWiz) figures come from EvalAI, whose annotations
are not public; here a split with public annotations is scored the same way (VQAv2 val's
``v2_mscoco_val2014_annotations.json``, VizWiz's ``val.json``). ``submission`` writes the files
for the servers.

* VQAv2 annotations: ``{"annotations": [{question_id, answers: [{answer}, ...], answer_type}]}``,
  matched by ``question_id``.
* VizWiz annotations: ``[{image, question, answers: [{answer}, ...], answer_type, answerable}]``,
  matched by the question's ``image`` (VizWiz's key). "unanswerable" is an answer like any other:
  a question most humans could not answer is right when the model says "Unanswerable" (LLaVA's
  prompt asks for that word), and the ``unanswerable`` answer type reports those questions.
"""

from __future__ import annotations

from pathlib import Path

from cumo_megatron.evaluation.scoring.errors import ScoringInputError
from cumo_megatron.evaluation.scoring.inputs import id_key, load_json, pair_answers, percent, read_answers, read_records
from cumo_megatron.evaluation.scoring.vqa_accuracy import vqa_accuracy
from cumo_megatron.evaluation.scoring.vqa_normalize import normalize_answer


def _annotation_list(path: Path, what: str) -> list[dict]:
    """The annotation records: the ``annotations`` list of a VQA file, or a bare list (VizWiz)."""
    data = load_json(path, what)
    records = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise ScoringInputError(f"{path}: expected {what} (a list of annotations, or an object with 'annotations')")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(record.get("answers"), list) or not record["answers"]:
            raise ScoringInputError(f"{path}, annotation {number}: no 'answers' list; expected {what}")
    return records


def _human_answers(record: dict) -> list[str]:
    """The human answers of one annotation (dicts with ``answer``, or plain strings)."""
    return [str(a["answer"] if isinstance(a, dict) else a) for a in record["answers"]]


def _score(name, questions, answers, annotations, *, what, question_key, annotation_key, vizwiz) -> dict:
    """Shared body: pair, look each question's annotation up, average the VQA accuracy, per answer type."""
    records = read_records(questions, f"LLaVA's {name} question file")
    table = {annotation_key(a): a for a in _annotation_list(Path(annotations), what)}
    pairing = pair_answers(records, read_answers(answers), source=questions)
    total, by_type = 0.0, {}
    said_unanswerable = 0
    for question, answer in pairing.pairs:
        annotation = table.get(question_key(question))
        if annotation is None:
            raise ScoringInputError(f"{annotations}: no annotation for question {question.get('question_id')!r}; pass {what}")
        score = 0.0
        if answer is not None:
            processed = normalize_answer(str(answer["text"]))  # what LLaVA's submission file holds
            said_unanswerable += processed == "unanswerable"
            score = vqa_accuracy(processed, _human_answers(annotation), vizwiz=vizwiz)
        total += score
        by_type.setdefault(str(annotation.get("answer_type", "all")), []).append(score)
    metrics = {
        "accuracy": percent(total, len(pairing.pairs)),
        "answer_types": {kind: percent(sum(s), len(s)) for kind, s in sorted(by_type.items())},
    }
    counts = dict(pairing.counts)
    if vizwiz:
        counts["said_unanswerable"] = said_unanswerable
    return {"benchmark": name, "metrics": metrics, "counts": counts}


def score_vqav2(questions: str | Path, answers: str | Path, annotations: str | Path) -> dict:
    """VQAv2 accuracy (percent, overall and per answer type) against VQA-format annotations."""
    return _score(
        "vqav2", questions, answers, annotations,
        what="VQAv2's v2_mscoco_val2014_annotations.json",
        question_key=lambda q: id_key(q["question_id"]),
        annotation_key=lambda a: id_key(a.get("question_id")),
        vizwiz=False,
    )  # fmt: skip


def score_vizwiz(questions: str | Path, answers: str | Path, annotations: str | Path) -> dict:
    """VizWiz accuracy (percent, overall and per answer type) against VizWiz's val.json."""
    return _score(
        "vizwiz", questions, answers, annotations,
        what="VizWiz's val.json",
        question_key=lambda q: Path(str(q.get("image", ""))).name,
        annotation_key=lambda a: Path(str(a.get("image", ""))).name,
        vizwiz=True,
    )  # fmt: skip


__all__ = ["score_vizwiz", "score_vqav2"]
