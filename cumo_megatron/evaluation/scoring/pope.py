"""POPE (object hallucination): yes/no answers scored per category as LLaVA's ``eval_pope.py`` does.

Inputs: LLaVA's ``llava_pope_test.jsonl`` (``question_id``, ``image``, ``text``, ``category``), the
answers, and POPE's annotations: a folder of ``coco_pope_<category>.json`` files (JSON lines with
``image``, ``text``, ``label``), or one such file. LLaVA pairs labels with answers by position;
here each question finds its label by (category, image, question's first line), so answers and
question subsets may come in any order.

Metrics (percent): per category accuracy, precision, recall, F1 and yes ratio, and their means
over categories (CuMo's ``eval_pope.py`` prints the mean accuracy and F1; the papers' POPE column
is the mean F1). A missing answer is wrong: it is neither a yes nor a no, so it lowers accuracy
and, for a "yes" question, recall; it never counts as a true or false positive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from cumo_megatron.evaluation.scoring.errors import ScoringInputError
from cumo_megatron.evaluation.scoring.inputs import pair_answers, percent, read_answers, read_records

PREFIX, SUFFIX = "coco_pope_", ".json"


def pope_says_no(text: str) -> bool:
    """LLaVA's POPE reading of an answer: keep the first sentence, drop commas, split on spaces;
    the answer is "no" when a word is exactly ``No``, ``no`` or ``not``, else "yes".

    So "Yes, but not fully." is a no (it holds ``not``) and "NO" is a yes (LLaVA matches case).
    """
    first = text.split(".")[0]
    words = first.replace(",", "").split(" ")
    return any(word in ("No", "no", "not") for word in words)


def _question_line(text: str) -> str:
    """The question itself: its first line, so LLaVA's appended prompt suffix does not matter."""
    return str(text).split("\n")[0].strip().lower()


def _annotation_files(annotations: Path) -> dict[str, Path]:
    """Category name -> annotation file, from a folder of ``coco_pope_<category>.json`` or one file."""
    files = [annotations] if annotations.is_file() else sorted(annotations.glob(f"{PREFIX}*{SUFFIX}"))
    found = {f.name[len(PREFIX) : -len(SUFFIX)]: f for f in files if f.name.startswith(PREFIX) and f.name.endswith(SUFFIX)}
    if not found:
        raise ScoringInputError(
            f"{annotations}: no {PREFIX}<category>{SUFFIX} annotation files; pass POPE's coco folder "
            "(coco_pope_adversarial.json, coco_pope_popular.json, coco_pope_random.json)"
        )
    return found


def _labels(files: dict[str, Path]) -> dict[tuple, str]:
    """(category, image, question) -> "yes"/"no" from the annotation files."""
    labels = {}
    for category, path in files.items():
        for number, record in enumerate(read_records(path, "POPE annotations"), 1):
            label = str(record.get("label", "")).strip().lower()
            if label not in ("yes", "no") or "image" not in record or "text" not in record:
                raise ScoringInputError(f"{path}, record {number}: expected image, text and a yes/no label")
            labels[(category, Path(str(record["image"])).name, _question_line(record["text"]))] = label
    return labels


def _category_metrics(rows: list[tuple[str, Optional[bool]]]) -> dict:
    """Metrics of one category from (label, said_no or None when missing) rows."""
    tp = sum(label == "yes" and said_no is False for label, said_no in rows)
    fp = sum(label == "no" and said_no is False for label, said_no in rows)
    tn = sum(label == "no" and said_no is True for label, said_no in rows)
    fn = sum(label == "yes" and said_no is not False for label, said_no in rows)  # a missing answer misses a yes
    precision = percent(tp, tp + fp)
    recall = percent(tp, tp + fn)
    return {
        "accuracy": percent(tp + tn, len(rows)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": percent(tp + fp, len(rows)),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "samples": len(rows),
    }


def score_pope(questions: str | Path, answers: str | Path, annotations: str | Path) -> dict:
    """POPE metrics and counts for ``answers`` to ``questions`` (see the module docstring)."""
    question_records = read_records(questions, "LLaVA's llava_pope_test.jsonl")
    files = _annotation_files(Path(annotations))
    labels = _labels(files)
    pairing = pair_answers(question_records, read_answers(answers), source=questions)
    rows: dict[str, list] = {category: [] for category in files}
    for question, answer in pairing.pairs:
        category = question.get("category") or (next(iter(files)) if len(files) == 1 else None)
        # by file name: a question file may keep the images under a folder (val2014/...)
        label = labels.get((category, Path(str(question.get("image"))).name, _question_line(question.get("text", ""))))
        if label is None:
            raise ScoringInputError(
                f"{questions}: question {question.get('question_id')!r} (category {category!r}, image "
                f"{question.get('image')!r}) has no label in {annotations}; pass the matching POPE annotations"
            )
        rows[category].append((label, None if answer is None else pope_says_no(str(answer["text"]))))
    categories = {category: _category_metrics(r) for category, r in rows.items() if r}
    metrics = {
        name: sum(c[name] for c in categories.values()) / len(categories) if categories else 0.0
        for name in ("f1", "accuracy", "precision", "recall", "yes_ratio")
    }
    metrics["categories"] = categories
    return {"benchmark": "pope", "metrics": metrics, "counts": pairing.counts}


__all__ = ["pope_says_no", "score_pope"]
