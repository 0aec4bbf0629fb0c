"""MME: MME's yes/no reading, acc and acc+ per subtask, perception and cognition totals."""

from __future__ import annotations

import pytest

from cumo_megatron.evaluation.scoring import score_benchmark
from cumo_megatron.evaluation.scoring.mme import mme_reading
from tests.evaluation.scoring_files import answer, write_jsonl

SHORT = "\nAnswer the question using a single word or phrase."


@pytest.mark.parametrize(
    "text, reading",
    [
        ("Yes", "yes"),
        ("NO", "no"),
        ("Yes.", "yes"),  # the first four characters hold 'yes'
        ("No, it is not.", "no"),
        ("nope", "no"),  # 'no' in the first four characters
        ("The answer is yes", "other"),  # 'the ' holds neither
        ("", "other"),
    ],
)
def test_mme_reading(text, reading):
    assert mme_reading(text) == reading


def test_mme_scores(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    # 'existence' in the images/ + questions_answers_YN/ layout, 'code_reasoning' flat
    (root / "existence" / "images").mkdir(parents=True)
    qa = root / "existence" / "questions_answers_YN"
    qa.mkdir()
    (qa / "1.txt").write_text("Is there a dog in this image? Please answer yes or no.\tYes\nIs there a cat in this image? Please answer yes or no.\tNo\n")
    # MME's files sometimes have two spaces before "Please": LLaVA's converter tries that too
    (qa / "2.txt").write_text("Is there a car in this image? Please answer yes or no.\tYes\nIs there a bus in this image?  Please answer yes or no.\tNo\n")
    (root / "code_reasoning").mkdir()
    (root / "code_reasoning" / "0001.txt").write_text("Is the output 3? Please answer yes or no.\tNo\nIs the output 5? Please answer yes or no.\tYes\n")
    texts = [
        ("existence/1.jpg", "Is there a dog in this image? Please answer yes or no." + SHORT, "Yes"),  # right
        ("existence/1.jpg", "Is there a cat in this image?" + SHORT, "No, there is not."),  # right
        ("existence/2.jpg", "Is there a car in this image?" + SHORT, "yes."),  # right
        ("existence/2.jpg", "Is there a bus in this image?" + SHORT, "There is a bus"),  # 'other': wrong
        ("code_reasoning/0001.png", "Is the output 3? Please answer yes or no.", "no"),  # right
        ("code_reasoning/0001.png", "Is the output 5? Please answer yes or no.", None),  # missing: wrong
    ]
    questions = write_jsonl(tmp_path / "llava_mme.jsonl", [{"question_id": q, "image": q, "text": t, "category": q.split("/")[0]} for q, t, _ in texts])
    # both questions of an image share the question id: answers are told apart by their prompt
    answers = write_jsonl(tmp_path / "a.jsonl", [answer(q, a, t) for q, t, a in reversed(texts) if a is not None])
    result = score_benchmark("mme", questions, answers, root)
    sub = result["metrics"]["subtasks"]
    assert sub["existence"] == pytest.approx({"acc": 75.0, "acc_plus": 50.0, "score": 125.0})  # 3/4; image 1 only
    assert sub["code_reasoning"] == pytest.approx({"acc": 50.0, "acc_plus": 0.0, "score": 50.0})
    assert result["metrics"]["perception"] == pytest.approx(125.0)
    assert result["metrics"]["cognition"] == pytest.approx(50.0)
    assert result["counts"]["missing"] == 1 and result["counts"]["other_answers"] == 2  # 'There is a bus' and the missing one


def test_repeated_question_ids_need_prompts(tmp_path):
    from cumo_megatron.evaluation.scoring import ScoringInputError

    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": "count/1.jpg", "text": t} for t in ("Two? Please answer yes or no.", "Three? Please answer yes or no.")])
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "count/1.jpg", "text": "Yes"}])
    (tmp_path / "count").mkdir()
    (tmp_path / "count" / "1.txt").write_text("Two? Please answer yes or no.\tYes\nThree? Please answer yes or no.\tNo\n")
    with pytest.raises(ScoringInputError, match="answers without 'prompt'"):
        score_benchmark("mme", questions, answers, tmp_path)
