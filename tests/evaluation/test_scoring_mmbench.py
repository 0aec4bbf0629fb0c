"""MMBench: option reading, circular evaluation over TSV copies and over LLaVA's rounds."""

from __future__ import annotations

import csv

import pytest

from cumo_megatron.evaluation.scoring import NotScorable, score_benchmark
from cumo_megatron.evaluation.scoring.mmbench import read_option
from tests.evaluation.scoring_files import answer, write_jsonl

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def write_tsv(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, delimiter="\t")
        writer.writeheader()
        for row in rows:
            writer.writerow({"hint": "nan", "question": "Which?", "image": "aGVsbG8=", "D": "", "C": "", **row})
    return path


@pytest.mark.parametrize(
    "text, options, letter",
    [
        ("A", ["cat", "dog"], "A"),
        ("The answer is C.", ["cat", "dog", "bird"], "C"),
        ("(B) dog", ["cat", "dog"], "B"),
        ("dog", ["cat", "dog"], "B"),  # no letter: the one option quoted
        ("A or B", ["red", "blue"], None),  # two letters, no option text
        ("C", ["cat", "dog"], None),  # beyond the options
    ],
)
def test_read_option(text, options, letter):
    assert read_option(text, options) == letter


def test_circular_tsv_copies(tmp_path):
    tsv = write_tsv(
        tmp_path / "mmbench_dev.tsv",
        [
            # question 0 and its two shifted copies (index + k * 1e6)
            {"index": 0, "A": "cat", "B": "dog", "C": "bird", "answer": "A", "category": "attribute", "l2-category": "perception"},
            {"index": 1000000, "A": "dog", "B": "bird", "C": "cat", "answer": "C", "category": "attribute", "l2-category": "perception"},
            {"index": 2000000, "A": "bird", "B": "cat", "C": "dog", "answer": "B", "category": "attribute", "l2-category": "perception"},
            # question 1, two options, and its copy
            {"index": 1, "A": "yes", "B": "no", "answer": "B", "category": "logic", "l2-category": "reasoning"},
            {"index": 1000001, "A": "no", "B": "yes", "answer": "A", "category": "logic", "l2-category": "reasoning"},
            # question 2, no copy
            {"index": 2, "A": "red", "B": "blue", "answer": "A", "category": "logic", "l2-category": "reasoning"},
        ],
    )
    answers = write_jsonl(
        tmp_path / "a.jsonl",
        [
            answer(2000000, "cat"),  # option text 'cat' is B here: right
            answer(1000001, "B"),  # wrong (A): question 1 fails
            answer(0, "A"),  # right
            answer(1, "B. no"),  # right
            answer(1000000, "The answer is C."),  # right: question 0 passes all three
            answer(2, "A or B"),  # unreadable: question 2 fails
        ],
    )
    result = score_benchmark("mmbench", tsv, answers, None)
    assert result["metrics"]["accuracy"] == pytest.approx(100 / 3)  # question 0 of 0, 1, 2
    assert result["metrics"]["categories"] == pytest.approx({"attribute": 100.0, "logic": 0.0})
    assert result["metrics"]["l2_categories"] == pytest.approx({"perception": 100.0, "reasoning": 0.0})
    assert result["counts"]["circular_questions"] == 3 and result["counts"]["unreadable"] == 1


def test_llava_all_rounds(tmp_path):
    tsv = write_tsv(
        tmp_path / "mmbench_dev.tsv",
        [
            {"index": 5, "A": "cat", "B": "dog", "C": "bird", "answer": "B", "category": "attribute"},
            {"index": 6, "A": "yes", "B": "no", "answer": "A", "category": "logic"},
        ],
    )
    rounds = [
        # row 5, answer 'dog' (B). Round r shows the options shifted left by r under A, B, C:
        answer(5, "B") | {"round_id": 0},  # cat dog bird: B
        answer(5, "A") | {"round_id": 1},  # dog bird cat: A
        answer(5, "dog") | {"round_id": 2},  # bird cat dog: 'dog' is C, right
        answer(6, "A") | {"round_id": 0},  # yes no: A, right; its round 1 is missing: wrong
    ]
    result = score_benchmark("mmbench", tsv, write_jsonl(tmp_path / "a.jsonl", rounds[::-1]), None)
    assert result["metrics"]["accuracy"] == pytest.approx(50.0)  # row 5 of rows 5, 6
    assert result["counts"]["missing"] == 1 and result["counts"]["all_rounds"] is True
    assert result["counts"]["questions"] == 5  # 3 rounds + 2 rounds


def test_test_split_without_answers_is_not_scorable(tmp_path):
    tsv = write_tsv(tmp_path / "mmbench_test.tsv", [{"index": 0, "A": "cat", "B": "dog", "answer": "", "category": "x"}])
    with pytest.raises(NotScorable, match="MMBench server"):
        score_benchmark("mmbench", tsv, write_jsonl(tmp_path / "a.jsonl", [answer(0, "A")]), None)
