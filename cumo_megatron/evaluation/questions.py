"""Benchmark question files in LLaVA's formats, read into one question record.

LLaVA (and CuMo, which reuses its evaluation scripts) ships each benchmark's questions in one of
three shapes, and its scripts build the asked text from them as follows; we do the same:

* JSON lines ``{question_id, image, text, category?}`` (``model_vqa_loader.py`` / ``model_vqa.py``:
  VQAv2, GQA, VizWiz, TextVQA, POPE, MME, SEED-Bench, MM-Vet, LLaVA-Wild). ``text`` is asked as it
  is; most files already end with the benchmark's instruction ("Answer the question using a single
  word or phrase.", "Answer with the option's letter from the given choices directly.").
* A JSON list of LLaVA conversations (``model_vqa_science.py``: ScienceQA's
  ``llava_test_CQM-A.json``): the first human turn without ``<image>``, plus the option-letter
  instruction (``--single-pred-prompt``); a record without ``image`` is a text-only question.
* A TSV with base64 images (``model_vqa_mmbench.py``: MMBench): ``hint + "\\n" + question`` and one
  ``"\\nA. option"`` line per non-empty option, the instruction after it; with ``all_rounds`` the
  question is asked once per option, the options rotated by one each round (CircularEval).

A benchmark's instruction (``suffix``) is appended only when the text does not already end with
it, so files that carry it (all of LLaVA-1.5's question-line files) are asked as they are; the
answer's ``prompt`` is always the file's text.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cumo_megatron.data.records import DataError

__all__ = ["OPTION_LETTERS", "Question", "answer_key", "decode_image", "load_questions", "with_suffix"]

OPTION_LETTERS = ("A", "B", "C", "D")  # model_vqa_mmbench.py's all_options
_OPTION_LINE = re.compile(r"^([A-Z])\. (.*)$")


@dataclass(frozen=True)
class Question:
    """One question as the model is asked it.

    ``text``: the question with options and instruction, without ``<image>`` (the prompt builder
    puts ``<image>\\n`` first, as LLaVA's scripts do). ``prompt``: what LLaVA records in the
    answer line's ``prompt``. ``image``: an image file, or None; ``image_base64``: the image itself
    (MMBench). ``round_id``: the MMBench rotation (None elsewhere). ``answer_fields``: extra fields
    LLaVA writes into this benchmark's answer lines (MMBench: ``round_id``, ``options``,
    ``option_char``).
    """

    question_id: Any
    text: str
    prompt: str
    image: Optional[Path] = None
    image_base64: Optional[str] = None
    options: tuple[str, ...] = ()
    category: Optional[str] = None
    round_id: Optional[int] = None
    answer_fields: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The identity of this question in an answer file: ``question_id``, the MMBench round and the
        recorded prompt (some LLaVA files give two questions one id: MME the image path)."""
        return answer_key(self.question_id, self.round_id, self.prompt)

    @property
    def has_image(self) -> bool:
        """Whether the question is asked about an image."""
        return self.image is not None or self.image_base64 is not None


def answer_key(question_id: Any, round_id: Optional[int], prompt: Optional[str]) -> str:
    """A string key for ``(question_id, round_id, prompt)``; an answer line's ``prompt`` is its
    question's, so the key of an answer is that of its question."""
    return json.dumps([question_id, round_id, prompt])


def with_suffix(text: str, suffix: Optional[str]) -> str:
    """``text`` + ``"\\n" + suffix``, unless ``suffix`` is empty or the text already ends with it."""
    if not suffix or text.rstrip().endswith(suffix.strip()):
        return text
    return text + "\n" + suffix


def load_questions(path, image_folder=None, suffix: Optional[str] = None, all_rounds: bool = False) -> list[Question]:
    """The questions of ``path`` in file order (MMBench rounds after their question).

    The format follows the file: ``.tsv`` is MMBench's table, a ``.json`` list of conversations
    ScienceQA's, anything else JSON lines. ``image_folder`` (default: the file's folder) is where
    image names are looked up; ``suffix`` is the benchmark's instruction (see `with_suffix`);
    ``all_rounds`` asks each MMBench question once per option rotation.
    Raises `DataError` naming the file and record when a record cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"question file not found: {path}")
    folder = Path(image_folder) if image_folder is not None else path.parent
    if path.suffix.lower() == ".tsv":
        questions = _read_mmbench(path, suffix, all_rounds)
    else:
        records = _read_json_records(path)
        if records and all(isinstance(r, dict) and "conversations" in r for _, r in records):
            questions = _read_conversations(path, records, folder, suffix)
        else:
            questions = _read_question_lines(path, records, folder, suffix)
    _check_unique(path, questions)
    return questions


def _read_json_records(path: Path) -> list[tuple[int, Any]]:
    """``(line or index, record)`` of a JSON list file or a JSON-lines file."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err}); fix the file or give the benchmark's "
                            "LLaVA question file") from None
        return list(enumerate(data))
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: not JSON ({err}); fix or remove the line") from None
    return records


def _field(path: Path, where: str, record: Any, name: str, kind=str):
    if not isinstance(record, dict) or name not in record:
        raise DataError(f"{path} {where}: no '{name}' field; LLaVA's question lines have question_id, image, text")
    value = record[name]
    if kind is not None and not isinstance(value, kind):
        raise DataError(f"{path} {where}: '{name}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _read_question_lines(path: Path, records, folder: Path, suffix: Optional[str]) -> list[Question]:
    """``{question_id, image, text, category?}`` lines (model_vqa_loader.py)."""
    questions = []
    for number, rec in records:
        where = f"line {number}"
        qid = _field(path, where, rec, "question_id", kind=None)
        original = _field(path, where, rec, "text")
        image = rec.get("image")
        # The prompt stays the file's text, as LLaVA records it: scorers pair answers with questions
        # by (question_id, prompt) where a file repeats ids (MME, TextVQA).
        questions.append(Question(
            question_id=qid, text=with_suffix(original, suffix), prompt=original,
            image=folder / image if image else None,
            options=_options_in(original), category=rec.get("category"),
        ))
    return questions


def _options_in(text: str) -> tuple[str, ...]:
    """The ``"A. ..."`` lines of a question (SEED-Bench's files write the options so)."""
    found = [m.group(2) for m in map(_OPTION_LINE.match, text.splitlines()) if m]
    return tuple(found)


def _read_conversations(path: Path, records, folder: Path, suffix: Optional[str]) -> list[Question]:
    """ScienceQA's conversation records (model_vqa_science.py with --single-pred-prompt)."""
    questions = []
    for index, rec in records:
        where = f"record {index} (id={rec.get('id')!r})"
        qid = _field(path, where, rec, "id", kind=None)
        turns = rec["conversations"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) \
                or not isinstance(turns[0].get("value"), str):
            raise DataError(f"{path} {where}: 'conversations' must start with a {{from, value}} turn")
        text = with_suffix(turns[0]["value"].replace("<image>", "").strip(), suffix)
        image = rec.get("image")
        # LLaVA records '<image>\n' in the prompt of image questions (cur_prompt).
        prompt = ("<image>\n" + text) if image else text
        questions.append(Question(question_id=qid, text=text, prompt=prompt,
                                  image=folder / image if image else None))
    return questions


def _is_none(value) -> bool:
    """model_vqa_mmbench.py's is_none: missing, NaN, or the strings nan/none (pandas' empty cells)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip().lower() in (
        "", "nan", "none")


def _read_mmbench(path: Path, suffix: Optional[str], all_rounds: bool) -> list[Question]:
    """MMBench's TSV (model_vqa_mmbench.py); csv rather than pandas, which the package does not need otherwise."""
    csv.field_size_limit(sys.maxsize)  # base64 images are longer than csv's default field limit
    questions = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = {"index", "question", "image"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: no column(s) {sorted(missing)}; MMBench's TSV has index, question, "
                            "hint, A-D, image")
        for number, row in enumerate(reader, 2):
            options = []
            for letter in OPTION_LETTERS:
                if _is_none(row.get(letter)):
                    break
                options.append(row[letter])
            qid = int(row["index"]) if row["index"].strip().lstrip("-").isdigit() else row["index"]
            chars = list(OPTION_LETTERS[: len(options)])
            for round_id in range(len(options) if all_rounds and options else 1):
                question = row["question"]
                if not _is_none(row.get("hint")):
                    question = row["hint"] + "\n" + question
                # The letters stay A, B, ... in order; the options rotate under them.
                for letter, option in zip(OPTION_LETTERS, options):
                    question = question + "\n" + letter + ". " + option
                questions.append(Question(
                    question_id=qid, text=with_suffix(question, suffix), prompt=question,
                    image_base64=row["image"], options=tuple(options), category=row.get("category"),
                    round_id=round_id,
                    answer_fields={"round_id": round_id, "options": list(options), "option_char": list(chars)},
                ))
                options = options[1:] + options[:1]
                chars = chars[1:] + chars[:1]
    return questions


def _check_unique(path: Path, questions: list[Question]) -> None:
    seen = set()
    for q in questions:
        if q.key in seen:
            raise DataError(f"{path}: question_id {q.question_id!r} appears twice with the same text; answers "
                            "are matched by id and text, so remove the repeated question")
        seen.add(q.key)


def decode_image(question: Question, target: Path) -> Path:
    """The image file of ``question``: its path, or its base64 image written to ``target``."""
    if question.image is not None:
        return question.image
    if question.image_base64 is None:
        raise ValueError(f"question {question.question_id!r} has no image")
    try:
        data = base64.b64decode(question.image_base64, validate=False)
    except ValueError as err:
        raise DataError(f"question {question.question_id!r}: its image is not base64 ({err})") from None
    target.write_bytes(data)
    return target
