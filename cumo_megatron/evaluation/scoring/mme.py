"""MME: per-subtask acc and acc+ and the perception / cognition totals, as MME's ``calculation.py``
scores the files LLaVA's ``convert_answer_to_mme.py`` writes.

Inputs: LLaVA's ``llava_mme.jsonl`` (``question_id`` is "<subtask>/<image>", the same for both
questions of an image, so answers are matched by question id and prompt), the answers, and the
``MME_Benchmark_release_version`` folder: per subtask, ``<image stem>.txt`` files of
"question<TAB>yes|no" lines, in the subtask folder or its ``questions_answers_YN``.

A subtask scores ``100 * acc + 100 * acc+`` (acc over questions, acc+ over images whose two
questions are both right); perception sums its ten subtasks (out of 2000), cognition its four
(out of 800). A missing answer reads as "other": wrong.
"""

from __future__ import annotations

from pathlib import Path

from cumo_megatron.evaluation.scoring.errors import ScoringInputError
from cumo_megatron.evaluation.scoring.inputs import pair_answers, percent, read_answers, read_records

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_SHORT = "Answer the question using a single word or phrase."
_YES_NO = " Please answer yes or no."


def mme_reading(text: str) -> str:
    """MME's reading of an answer: "yes" or "no" when it is that word (any case), else the first
    four characters decide: holding "yes" -> yes, else holding "no" -> no, else "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def _ground_truth(root: Path) -> dict[tuple[str, str, str], str]:
    """(subtask, "<image stem>.txt", question) -> "yes"/"no", from MME's release folder."""
    if not root.is_dir():
        raise ScoringInputError(f"{root}: not a folder; pass MME's MME_Benchmark_release_version folder")
    truth = {}
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = task_dir / "questions_answers_YN" if (task_dir / "images").is_dir() else task_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                question, sep, label = line.strip().partition("\t")
                if not sep:
                    raise ScoringInputError(f"{txt}, line {number}: expected 'question<TAB>answer'")
                truth[(task_dir.name, txt.name, question)] = label.strip().lower()
    if not truth:
        raise ScoringInputError(f"{root}: no <subtask>/*.txt question files; pass MME's MME_Benchmark_release_version folder")
    return truth


def _label(truth: dict, task: str, txt: str, prompt: str) -> str | None:
    """The label of one question, found as LLaVA's converter finds it: without the short-answer
    suffix, with " Please answer yes or no." (or its two-space variant) appended when absent."""
    prompt = prompt.replace(_SHORT, "").strip() if _SHORT in prompt else prompt
    if "Please answer yes or no." not in prompt:
        plain = prompt + _YES_NO
        return truth.get((task, txt, plain)) or truth.get((task, txt, plain.replace(_YES_NO, " " + _YES_NO)))
    return truth.get((task, txt, prompt))


def score_mme(questions: str | Path, answers: str | Path, annotations: str | Path) -> dict:
    """MME totals and per-subtask scores (points) of ``answers``."""
    records = read_records(questions, "LLaVA's llava_mme.jsonl")
    truth = _ground_truth(Path(annotations))
    pairing = pair_answers(records, read_answers(answers), source=questions)
    images: dict[str, dict[str, list[bool]]] = {}  # subtask -> image -> [right?]
    other = 0
    for question, answer in pairing.pairs:
        qid = str(question["question_id"])
        task = qid.split("/")[0]
        image = qid.split("/")[-1]
        label = _label(truth, task, image.split(".")[0] + ".txt", str(question.get("text", "")))
        if label not in ("yes", "no"):
            raise ScoringInputError(f"{annotations}: no yes/no label for {qid!r} {question.get('text', '')!r}; pass MME's release folder")
        reading = "other" if answer is None else mme_reading(str(answer["text"]))
        other += reading == "other"
        images.setdefault(task, {}).setdefault(image, []).append(reading == label)
    subtasks = {}
    for task, per_image in images.items():
        answers_right = [r for rights in per_image.values() for r in rights]
        acc = percent(sum(answers_right), len(answers_right))
        acc_plus = percent(sum(all(rights) for rights in per_image.values()), len(per_image))
        subtasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    metrics = {
        "perception": sum(subtasks[t]["score"] for t in PERCEPTION if t in subtasks),
        "cognition": sum(subtasks[t]["score"] for t in COGNITION if t in subtasks),
        "subtasks": subtasks,
    }
    counts = {**pairing.counts, "other_answers": other, "images": sum(len(v) for v in images.values())}
    return {"benchmark": "mme", "metrics": metrics, "counts": counts}


__all__ = ["COGNITION", "PERCEPTION", "mme_reading", "score_mme"]
