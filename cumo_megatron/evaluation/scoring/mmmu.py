"""MMMU (validation): instance-level accuracy overall, per subject and per discipline, as the
MMMU evaluation that CuMo's ``main_eval_only.py`` runs.

Inputs: a question file of MMMU questions (JSON lines or list: ``question_id`` the MMMU id such
as ``validation_Art_1``, ``text`` the prompt, ``question_type``, and for multiple choice the
``options``, a list or MMMU's string of one; without ``options`` the "(A) ..." lines of the prompt
are read), the answers (raw responses), and MMMU's ``answer_dict_val.json`` (id ->
``question_type``, ``ground_truth``). Responses are read as ``mmmu_parse`` says; the random
guesses for unreadable multiple-choice responses are drawn in question-file order (MMMU's order
when the file lists the subjects as MMMU does) and counted. A missing answer is wrong.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from cumo_megatron.evaluation.scoring.errors import ScoringInputError
from cumo_megatron.evaluation.scoring.inputs import id_key, load_json, pair_answers, percent, read_answers, read_records
from cumo_megatron.evaluation.scoring.mmmu_parse import choice_right, new_guesser, open_right, read_choice, read_open

DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics", "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}  # fmt: skip
MULTIPLE_CHOICE = "multiple-choice"
_OPTION_LINE = re.compile(r"^\(([A-Z])\) (.*)$", re.MULTILINE)


def subject_of(mmmu_id: str) -> str:
    """The subject in an MMMU id: ``validation_Art_Theory_3`` -> ``Art_Theory``."""
    return "_".join(mmmu_id.split("_")[1:-1])


def _options(question: dict) -> list[str]:
    """A multiple-choice question's options: its ``options`` field, or the prompt's "(A) ..." lines."""
    options = question.get("options")
    if isinstance(options, str):
        try:
            options = ast.literal_eval(options)  # MMMU stores the list as its Python repr
        except (ValueError, SyntaxError):
            options = None
    if isinstance(options, list) and options:
        return [str(o) for o in options]
    return [text for _, text in _OPTION_LINE.findall(str(question.get("text", "")))]


def score_mmmu(questions: str | Path, answers: str | Path, annotations: str | Path) -> dict:
    """MMMU accuracy (percent) of ``answers``."""
    records = read_records(questions, "an MMMU question file")
    gold = load_json(annotations, "MMMU's answer_dict_val.json")
    if not isinstance(gold, dict):
        raise ScoringInputError(f"{annotations}: expected MMMU's answer dict (id -> question_type, ground_truth)")
    pairing = pair_answers(records, read_answers(answers), source=questions)
    guesser = new_guesser()
    per_subject: dict[str, list[bool]] = {}
    guesses = 0
    for question, answer in pairing.pairs:
        qid = id_key(question["question_id"])
        entry = gold.get(qid)
        if not isinstance(entry, dict) or "ground_truth" not in entry:
            raise ScoringInputError(f"{annotations}: no ground truth for {qid!r}; pass MMMU's answer_dict_val.json")
        kind = entry.get("question_type", question.get("question_type"))
        right = False
        if answer is not None and kind == MULTIPLE_CHOICE:
            options = _options(question)
            if not options:
                raise ScoringInputError(f"{questions}: multiple-choice question {qid!r} has no options (an 'options' list or '(A) ...' lines)")
            letters = [chr(ord("A") + i) for i in range(len(options))]
            letter, guessed = read_choice(str(answer["text"]).strip(), letters, dict(zip(letters, options)), guesser)
            guesses += guessed
            right = choice_right(entry["ground_truth"], letter)
        elif answer is not None:
            right = open_right(entry["ground_truth"], read_open(str(answer["text"])))
        per_subject.setdefault(subject_of(qid), []).append(right)

    def accuracy(subjects) -> float:
        scores = [r for s in subjects for r in per_subject.get(s, [])]
        return percent(sum(scores), len(scores))

    metrics = {
        "accuracy": accuracy(per_subject),
        "disciplines": {d: accuracy(subjects) for d, subjects in DISCIPLINES.items() if any(s in per_subject for s in subjects)},
        "subjects": {s: accuracy([s]) for s in sorted(per_subject)},
    }
    return {"benchmark": "mmmu", "metrics": metrics, "counts": {**pairing.counts, "random_guesses": guesses}}


__all__ = ["DISCIPLINES", "score_mmmu", "subject_of"]
