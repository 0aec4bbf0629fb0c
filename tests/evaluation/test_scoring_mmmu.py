"""MMMU: MMMU's reading of multiple-choice and open responses, accuracy per subject and discipline."""

from __future__ import annotations

import json

import pytest

from cumo_megatron.evaluation.scoring import score_benchmark
from cumo_megatron.evaluation.scoring.mmmu_parse import new_guesser, open_right, read_choice, read_open
from tests.evaluation.scoring_files import answer, write_jsonl

OPTIONS = {"A": "cat", "B": "dog", "C": "bird"}


@pytest.mark.parametrize(
    "response, letter",
    [
        ("(B) dog", "B"),
        ("The answer is C.", "C"),  # ' C ' once the final period is stripped
        ("A or (C)", "C"),  # a bracketed letter wins over a bare one
        ("(A) is wrong, (B) is right", "B"),  # several: the last mentioned
        ("I would say that it is a dog here", "B"),  # > 5 words: the option text
    ],
)
def test_read_choice(response, letter):
    assert read_choice(response, ["A", "B", "C"], OPTIONS, new_guesser()) == (letter, False)


def test_unreadable_choice_is_mmmu_s_seeded_guess():
    # MMMU seeds Python's random with 42 and draws one choice per unreadable response
    assert read_choice("a dog", ["A", "B", "C"], OPTIONS, new_guesser()) == (new_guesser().choice(["A", "B", "C"]), True)


def test_read_open_and_open_right():
    assert read_open("So the total is 12.50.") == [12.5]  # the tail after "is" is a number: 12.5
    assert read_open("It is a puppy.") == ["a puppy"]
    assert open_right("12.5", read_open("So the total is 12.50."))
    assert not open_right("4", read_open("I think 5"))  # candidates 'i think 5' and 5.0
    assert open_right(["dog", "puppy"], read_open("It is a puppy."))  # 'puppy' inside the tail 'a puppy'
    assert open_right("1000", read_open("The result is 1,000"))  # commas out of numbers


def test_mmmu_accuracy(tmp_path):
    gold = {
        "validation_Art_1": {"question_type": "multiple-choice", "ground_truth": "B"},
        "validation_Art_2": {"question_type": "multiple-choice", "ground_truth": "A"},
        "validation_Math_1": {"question_type": "open", "ground_truth": "12.5"},
        "validation_Math_2": {"question_type": "open", "ground_truth": "4"},
        "validation_Math_3": {"question_type": "multiple-choice", "ground_truth": "A"},
        "validation_Math_4": {"question_type": "multiple-choice", "ground_truth": "A"},
    }
    (tmp_path / "answer_dict_val.json").write_text(json.dumps(gold))
    questions = write_jsonl(
        tmp_path / "mmmu.jsonl",
        [
            {"question_id": "validation_Art_1", "text": "Which?", "options": ["cat", "dog", "bird"]},
            {"question_id": "validation_Art_2", "text": "Which?", "options": "['red', 'blue']"},  # MMMU's string form
            {"question_id": "validation_Math_1", "text": "Total?"},
            {"question_id": "validation_Math_2", "text": "How many?"},
            {"question_id": "validation_Math_3", "text": "Which?\n(A) 3\n(B) 4\nAnswer with the option's letter."},  # options from the prompt
            {"question_id": "validation_Math_4", "text": "Which?\n(A) 3\n(B) 4"},
        ],
    )
    answers = write_jsonl(
        tmp_path / "a.jsonl",
        [
            answer("validation_Math_4", "hmm"),  # unreadable: Random(42).choice(['A', 'B']) is 'A': right
            answer("validation_Math_2", "I think 5"),  # wrong
            answer("validation_Math_1", "So the total is 12.50."),  # 12.5: right
            answer("validation_Art_2", "The answer is B."),  # B: wrong
            answer("validation_Art_1", "(B) dog"),  # right
            # validation_Math_3 missing: wrong
        ],
    )
    result = score_benchmark("mmmu", questions, answers, tmp_path / "answer_dict_val.json")
    m = result["metrics"]
    assert m["accuracy"] == pytest.approx(50.0)  # Art_1, Math_1, Math_4 of 6
    assert m["subjects"] == pytest.approx({"Art": 50.0, "Math": 50.0})  # 1/2 and 2/4
    assert m["disciplines"] == pytest.approx({"Art and Design": 50.0, "Science": 50.0})
    assert result["counts"]["random_guesses"] == 1 and result["counts"]["missing"] == 1
