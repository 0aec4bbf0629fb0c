"""Reading LLaVA question and answer files and pairing each question with its answer.

Answers are LLaVA answer lines (``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``,
``metadata``) in any order. Policy, the same for every benchmark:

* the question file defines what is scored; a question without an answer is **scored as wrong**
  (its answer is ``None``) and counted in ``counts["missing"]``;
* an answer whose question is not in the question file is ignored and counted in ``extra``;
* two answers to one question: the last one wins (as LLaVA's dict-building scripts do, and a
  resumed run appends), counted in ``duplicate``;
* a damaged answer line (one cut by a kill) is skipped and counted in ``unreadable_lines``.

Keys: a question's key is its ``question_id`` (as a string, so ``7`` and ``"7"`` match, as
LLaVA's SEED script allows). Some LLaVA question files repeat a ``question_id`` (MME uses the
image path for both questions of an image, TextVQA the image id); there the key is
``(question_id, text)`` and an answer's is ``(question_id, prompt)``, since LLaVA's answer
``prompt`` is the question's ``text`` verbatim.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Optional

from cumo_megatron.evaluation.scoring.errors import ScoringInputError
from cumo_megatron.jsonl import read_json_lines


def id_key(value: Any) -> str:
    """A question id as a string, so integer and string spellings of one id match."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def load_json(path: str | Path, what: str) -> Any:
    """The JSON value of ``path``; a missing or broken file is a :class:`ScoringInputError`
    naming ``what`` it should be."""
    path = Path(path)
    if not path.is_file():
        raise ScoringInputError(f"{path}: no such file (expected {what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ScoringInputError(f"{path}: not JSON ({err}); expected {what}") from None


def read_records(path: str | Path, what: str = "a LLaVA question file") -> list[dict]:
    """The records of a JSON list or of JSON lines, whatever the suffix (POPE's ``.json``
    annotations are JSON lines), each a dict."""
    path = Path(path)
    if not path.is_file():
        raise ScoringInputError(f"{path}: no such file (expected {what})")
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
        if isinstance(records, dict):  # a JSON-lines file of one line
            records = [records]
    except json.JSONDecodeError:
        records = []
        for line in read_json_lines(path):
            if line.error is not None:
                raise ScoringInputError(f"{path}, line {line.number}: not JSON ({line.error}); expected {what}")
            records.append(line.value)
    if not isinstance(records, list):
        raise ScoringInputError(f"{path}: expected a list of records ({what}), got {type(records).__name__}")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise ScoringInputError(f"{path}, record {number}: expected an object ({what}), got {type(record).__name__}")
    return records


def read_tsv(path: str | Path, what: str) -> list[dict]:
    """The rows of a tab-separated file with a header (MMBench), each a dict of strings."""
    path = Path(path)
    if not path.is_file():
        raise ScoringInputError(f"{path}: no such file (expected {what})")
    # MMBench rows hold base64 images far longer than csv's default field limit.
    csv.field_size_limit(1 << 30)
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@dataclass
class AnswerFile:
    """The readable answer lines of one file, and how many lines were damaged."""

    path: Path
    answers: list[dict]
    unreadable_lines: int = 0


def read_answers(path: str | Path) -> AnswerFile:
    """The LLaVA answer lines of ``path``; each must have ``question_id`` and ``text``."""
    path = Path(path)
    if not path.is_file():
        raise ScoringInputError(f"{path}: no such file (expected LLaVA answer lines written by `run`)")
    answers, unreadable = [], 0
    for line in read_json_lines(path):
        if line.error is not None:
            unreadable += 1
            continue
        value = line.value
        if not isinstance(value, dict) or "question_id" not in value or "text" not in value:
            raise ScoringInputError(
                f"{path}, line {line.number}: not a LLaVA answer (needs question_id and text); "
                "score the file `run` wrote"
            )
        answers.append(value)
    return AnswerFile(path, answers, unreadable)


@dataclass
class Pairing:
    """Questions in question-file order, each with its answer record or ``None``, and the counts."""

    pairs: list[tuple[dict, Optional[dict]]]
    counts: dict = field(default_factory=dict)


def default_key(questions: list[dict], id_field: str = "question_id", text_field: str = "text") -> Callable:
    """The key function ``key(record, is_answer)`` for this question file: the id, or (id, text)
    when ids repeat (an answer's id is its ``question_id`` and its text its ``prompt``)."""
    ids = [id_key(q.get(id_field)) for q in questions]
    unique = len(set(ids)) == len(ids)

    def key(record: dict, is_answer: bool) -> Hashable:
        qid = id_key(record.get("question_id" if is_answer else id_field))
        if unique:
            return qid
        return qid, str(record.get("prompt" if is_answer else text_field, "")).strip()

    return key


def pair_answers(
    questions: list[dict],
    answer_file: AnswerFile,
    *,
    source: str | Path = "the question file",
    id_field: str = "question_id",
    text_field: str = "text",
    key: Optional[Callable[[dict, bool], Hashable]] = None,
) -> Pairing:
    """Pair each question with its answer (see the module docstring for the policy).

    ``key(record, is_answer)`` overrides :func:`default_key` (MMBench keys rounds too).
    """
    for number, question in enumerate(questions, 1):
        if id_field not in question:
            raise ScoringInputError(f"{source}, record {number}: no {id_field!r}; use the benchmark's LLaVA question file")
    if key is None:
        ids = [id_key(q[id_field]) for q in questions]
        if len(set(ids)) < len(ids) and any("prompt" not in a for a in answer_file.answers):
            raise ScoringInputError(
                f"{source}: question ids repeat (as in LLaVA's MME and TextVQA files), so answers are matched "
                f"by id and prompt, but {answer_file.path} has answers without 'prompt'; write each "
                "question's text as its answer's prompt"
            )
        key = default_key(questions, id_field, text_field)
    wanted = {}
    for question in questions:
        wanted.setdefault(key(question, False), question)
    found: dict[Hashable, dict] = {}
    extra = duplicate = 0
    for answer in answer_file.answers:
        k = key(answer, True)
        if k not in wanted:
            extra += 1
            continue
        if k in found:
            duplicate += 1
        found[k] = answer
    pairs = [(q, found.get(key(q, False))) for q in questions]
    missing = sum(answer is None for _, answer in pairs)
    counts = {
        "questions": len(questions),
        "answered": len(questions) - missing,
        "missing": missing,
        "extra": extra,
        "duplicate": duplicate,
        "unreadable_lines": answer_file.unreadable_lines,
    }
    return Pairing(pairs, counts)


def percent(numerator: float, denominator: float) -> float:
    """``100 * numerator / denominator``, or 0.0 for an empty denominator (nothing to score)."""
    return 100.0 * numerator / denominator if denominator else 0.0


__all__ = [
    "AnswerFile",
    "Pairing",
    "id_key",
    "load_json",
    "pair_answers",
    "percent",
    "default_key",
    "read_answers",
    "read_records",
    "read_tsv",
]
