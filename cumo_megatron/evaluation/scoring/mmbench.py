"""MMBench: circular evaluation of option answers, overall and per category.

Inputs: MMBench's TSV (``index``, ``question``, ``hint``, ``A``..``D``, ``answer``, ``category``,
``l2-category``; LLaVA's ``mmbench_dev_20230712.tsv``) and the answers (``question_id`` is the
row's ``index``; LLaVA's ``model_vqa_mmbench.py --all-rounds`` adds ``round_id``).

Circular evaluation: a question counts as right only if every pass over it is right. The passes
are the TSV rows of one question (MMBench's circular TSVs repeat a question with its options
shifted, at ``index`` + k * 1e6) and, in answers written with ``--all-rounds``, the rounds of a
row: round r shows the row's options shifted left by r under the same letters A, B, ..., so the
right letter moves from position a to (a - r) mod n. With round ids in the answers every row
expects all its rounds, and a missing one is wrong.

Reading an answer (MMBench's exact matching, without its ChatGPT fallback): the option letter when
exactly one letter of the row's options stands alone in the answer (punctuation aside); else the
option whose text alone appears in the answer; else unreadable, counted wrong and in
``counts["unreadable"]``. The test split has no answers in its TSV: it is scored by the MMBench
server.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from cumo_megatron.evaluation.scoring.errors import NotScorable, ScoringInputError
from cumo_megatron.evaluation.scoring.inputs import AnswerFile, id_key, pair_answers, percent, read_answers, read_tsv

LETTERS = ("A", "B", "C", "D")
CIRCULAR_STRIDE = 1_000_000  # MMBench's circular copies of question i have index i + k * 1e6
_SEPARATORS = ".()[],:;!*#{}"


def _is_none(value) -> bool:
    """LLaVA's test for an absent option: empty, NaN, or the strings 'nan' / 'none'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return str(value).strip().lower() in ("", "nan", "none")


def row_options(row: dict) -> list[str]:
    """The options of a row, A, B, ... up to the first absent one (as LLaVA's ``get_options``)."""
    options = []
    for letter in LETTERS:
        if _is_none(row.get(letter)):
            break
        options.append(str(row[letter]))
    return options


def read_option(text: str, options: list[str]) -> Optional[str]:
    """The letter an answer gives among ``options`` (shown as A, B, ...), or None."""
    letters = LETTERS[: len(options)]
    spaced = text
    for char in _SEPARATORS:
        spaced = spaced.replace(char, " ")
    tokens = set(spaced.split())
    named = [letter for letter in letters if letter in tokens]
    if len(named) == 1:
        return named[0]
    lowered = text.lower()
    quoted = [letter for letter, option in zip(letters, options) if option.lower() in lowered]
    return quoted[0] if len(quoted) == 1 else None


def _rounds(answers: AnswerFile) -> bool:
    """Whether the answers were written with ``--all-rounds`` (some round id above 0)."""
    return any(int(a.get("round_id", 0) or 0) > 0 for a in answers.answers)


def score_mmbench(questions: str | Path, answers: str | Path, annotations: str | Path | None = None) -> dict:
    """MMBench circular accuracy (percent), overall, per category and per l2-category."""
    rows = read_tsv(questions, "an MMBench TSV (index, question, A..D, answer, category)")
    if rows and ("answer" not in rows[0] or all(_is_none(r.get("answer")) for r in rows)):
        raise NotScorable(f"{questions} has no answers (MMBench's test split): the MMBench server scores it; the answers `run` wrote are in {answers}")
    answer_file = read_answers(answers)
    all_rounds = _rounds(answer_file)
    attempts = []  # one per (row, round): the pass, with its row and round
    for number, row in enumerate(rows, 1):
        options = row_options(row)
        if "index" not in row or not options or str(row.get("answer", "")).strip() not in LETTERS[: len(options)]:
            raise ScoringInputError(f"{questions}, row {number}: needs an index, options A.. and an answer among them")
        for round_id in range(len(options) if all_rounds else 1):
            attempts.append({"question_id": row["index"], "round_id": round_id, "row": row, "options": options})
    pairing = pair_answers(
        attempts, answer_file, source=questions,
        key=lambda record, is_answer: (id_key(record["question_id"]), int(record.get("round_id", 0) or 0)),
    )  # fmt: skip
    groups: dict[int, list[bool]] = {}
    group_row: dict[int, dict] = {}
    unreadable = 0
    for attempt, answer in pairing.pairs:
        row, r, options = attempt["row"], attempt["round_id"], attempt["options"]
        n = len(options)
        shown = options[r:] + options[:r]  # what round r showed under A, B, ...
        right = LETTERS[(LETTERS.index(row["answer"].strip()) - r) % n]
        letter = None if answer is None else read_option(str(answer["text"]), shown)
        unreadable += answer is not None and letter is None
        group = int(float(row["index"])) % CIRCULAR_STRIDE
        groups.setdefault(group, []).append(letter == right)
        if group not in group_row or int(float(row["index"])) < CIRCULAR_STRIDE:
            group_row[group] = row  # the category of the original question
    def breakdown(field: str) -> dict:
        per: dict[str, list[bool]] = {}
        for group, passes in groups.items():
            per.setdefault(str(group_row[group].get(field, "")), []).append(all(passes))
        return {name: percent(sum(v), len(v)) for name, v in sorted(per.items())}

    metrics = {
        "accuracy": percent(sum(all(p) for p in groups.values()), len(groups)),
        "categories": breakdown("category"),
    }
    if rows and "l2-category" in rows[0]:
        metrics["l2_categories"] = breakdown("l2-category")
    counts = {**pairing.counts, "circular_questions": len(groups), "unreadable": unreadable, "all_rounds": all_rounds}
    return {"benchmark": "mmbench", "metrics": metrics, "counts": counts}


__all__ = ["CIRCULAR_STRIDE", "read_option", "row_options", "score_mmbench"]
