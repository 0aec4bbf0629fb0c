"""LLaVA answer files: one JSON line per answer, per-rank part files, resume and merge.

An evaluation run writes ``<answers>.part<R>`` (one per data-parallel rank, appended to and
flushed batch by batch) and rank 0 merges them into ``<answers>`` in question order at the end.
What is already in ``<answers>`` or any part file (a run that was killed, or one at another world
size) counts as answered and is not generated again; a line cut by a kill does not count.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

from cumo_megatron.evaluation.questions import answer_key
from cumo_megatron.files import write_text_atomic
from cumo_megatron.jsonl import read_json_lines

__all__ = ["part_path", "part_paths", "read_answers", "answered_keys", "repair_tail", "merge_answers"]

log = logging.getLogger(__name__)


def part_path(answers: Path, shard: int) -> Path:
    """The part file data-parallel rank ``shard`` appends to."""
    return answers.with_name(f"{answers.name}.part{shard}")


def part_paths(answers: Path) -> list[Path]:
    """Every part file of ``answers`` on disk (from this run or an earlier one at any world size)."""
    return sorted(answers.parent.glob(f"{answers.name}.part*"))


def read_answers(path: Path) -> dict[str, dict]:
    """``{key: answer line}`` of one answer file (`questions.answer_key`: question_id, round, prompt);
    lines that are not JSON objects with a ``question_id`` (a line cut by a kill) are left out."""
    if not path.is_file():
        return {}
    answers, bad = {}, 0
    for line in read_json_lines(path):
        if line.error is not None or not isinstance(line.value, dict) or "question_id" not in line.value:
            bad += 1
            continue
        value = line.value
        answers.setdefault(answer_key(value["question_id"], value.get("round_id"), value.get("prompt")), value)
    if bad:
        log.warning("%s: %d line(s) are not answers (cut by a kill?); their questions are asked again", path, bad)
    return answers


def answered_keys(answers: Path) -> set[str]:
    """Keys of every question answered in ``answers`` or its part files."""
    keys = set(read_answers(answers))
    for part in part_paths(answers):
        keys |= set(read_answers(part))
    return keys


def repair_tail(path: Path) -> None:
    """Cut an unfinished last line (a kill during a write) so that appending starts a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def merge_answers(answers: Path, order: Iterable[str]) -> int:
    """Write ``answers`` with every answer of it and its part files, in the question ``order`` (keys),
    then delete the part files. Answers to questions not in ``order`` are kept, after the others.
    Returns the number of lines written."""
    found = read_answers(answers)
    parts = part_paths(answers)
    for part in parts:
        for key, line in read_answers(part).items():
            found.setdefault(key, line)
    lines = [found.pop(key) for key in order if key in found]
    if found:
        log.warning("%s: %d answer(s) are to questions not in the question file; kept at the end", answers, len(found))
        lines.extend(found.values())
    write_text_atomic(answers, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    for part in parts:
        os.remove(part)
    return len(lines)
