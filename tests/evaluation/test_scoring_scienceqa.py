"""ScienceQA-IMG: LLaVA's option extraction and the image-question accuracy, worked out by hand."""

from __future__ import annotations

import json

import pytest

from cumo_megatron.evaluation.scoring import score_benchmark
from cumo_megatron.evaluation.scoring.scienceqa import extract_option
from tests.evaluation.scoring_files import answer, write_jsonl


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("B. gravity", "B"),
        ("The answer is C.", "C"),
        ("The answer is A, because it floats", "A"),
        ("The answer is A", "FAILED"),  # LLaVA's pattern needs one character after the letter
        ("The answer is B. The answer is C.", "FAILED"),  # two answers: neither
        ("b", "FAILED"),
        ("B.", "FAILED"),  # neither a bare letter nor 'X. '
        (None, "FAILED"),  # a missing answer
    ],
)
def test_extract_option_as_llava(text, letter):
    assert extract_option(text) == letter


def test_scienceqa_accuracy_over_all_and_image_questions(tmp_path):
    # (id, has image, number of choices, right index, answer text or None)
    rows = [
        ("p1", True, 3, 1, "B"),  # right
        ("p2", True, 2, 0, "A. gravity"),  # right
        ("p3", True, 4, 2, "The answer is C."),  # right
        ("p4", True, 2, 1, "C"),  # 'C' is beyond two choices: wrong
        ("p5", False, 3, 0, "The answer is A, since"),  # right
        ("p6", False, 2, 1, "B"),  # right
        ("p7", True, 2, 0, None),  # missing: wrong, still an image question
        ("p8", True, 2, 0, "The answer is A"),  # FAILED: wrong
    ]
    problems = {pid: {"choices": [f"c{i}" for i in range(n)], "answer": right, "image": "image.png" if img else None} for pid, img, n, right, _ in rows}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    questions = [{"id": pid, "conversations": []} | ({"image": f"{pid}/image.png"} if img else {}) for pid, img, *_ in rows]
    (tmp_path / "llava_test_CQM-A.json").write_text(json.dumps(questions))
    answers = write_jsonl(tmp_path / "answers.jsonl", [answer(pid, text) for pid, *_, text in reversed(rows) if text is not None])
    result = score_benchmark("scienceqa", tmp_path / "llava_test_CQM-A.json", answers, tmp_path)
    assert result["metrics"]["accuracy_img"] == pytest.approx(50.0)  # p1 p2 p3 right of p1 p2 p3 p4 p7 p8: 3/6
    assert result["metrics"]["accuracy"] == pytest.approx(62.5)  # p1 p2 p3 p5 p6 right of 8: 5/8
    assert result["counts"]["missing"] == 1 and result["counts"]["image_questions"] == 6
    assert result["counts"]["failed_extraction"] == 2  # p7 (missing) and p8
