"""POPE: LLaVA's yes/no reading and per-category metrics, worked out by hand."""

from __future__ import annotations

import pytest

from cumo_megatron.evaluation.scoring import ScoringInputError, score_benchmark
from cumo_megatron.evaluation.scoring.pope import pope_says_no
from tests.evaluation.scoring_files import answer, write_jsonl

SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.mark.parametrize(
    "text, no",
    [
        ("Yes", False),
        ("No.", True),
        ("Yes, but not clearly.", True),  # 'not' in the first sentence makes it a no
        ("NO, there is none", False),  # LLaVA matches 'No'/'no' exactly: 'NO' reads as yes
        ("Yes. No, wait.", False),  # only the first sentence counts
        ("There is no cat.", True),
        ("Yes,no", False),  # commas are dropped, not split on: one word 'Yesno'
        ("Nothing", False),
    ],
)
def test_pope_reads_yes_and_no_as_llava(text, no):
    assert pope_says_no(text) is no


def _write_pope(tmp_path):
    coco = tmp_path / "coco"
    coco.mkdir()
    # POPE's annotation files number their questions from 1 in each category, as the real ones do.
    adversarial = [("a.jpg", "dog", "yes"), ("a.jpg", "cat", "yes"), ("b.jpg", "car", "no"), ("b.jpg", "bus", "no"), ("c.jpg", "cup", "yes")]
    random_ = [("d.jpg", "dog", "yes"), ("d.jpg", "cat", "no"), ("e.jpg", "car", "no"), ("e.jpg", "bus", "yes")]
    questions = []
    for category, rows in (("adversarial", adversarial), ("random", random_)):
        write_jsonl(
            coco / f"coco_pope_{category}.json",
            [{"question_id": i, "image": im, "text": f"Is there a {obj} in the image?", "label": lab} for i, (im, obj, lab) in enumerate(rows, 1)],
        )
        for im, obj, _ in rows:
            questions.append({"question_id": len(questions) + 1, "image": im, "text": f"Is there a {obj} in the image?" + SUFFIX, "category": category})
    return write_jsonl(tmp_path / "llava_pope_test.jsonl", questions), coco


def test_pope_metrics_per_category_and_mean(tmp_path):
    questions, coco = _write_pope(tmp_path)
    answers = [
        # adversarial: ids 1..5
        answer(2, "Yes, but not clearly visible."),  # label yes, read no   -> FN
        answer(4, "NO, there is none"),  # label no,  read yes  -> FP
        answer(3, "Yes"),  # duplicate of id 3: the later line wins
        answer(1, "Yes, there is a dog."),  # label yes, read yes  -> TP
        answer(3, "No."),  # label no,  read no   -> TN
        # id 5 (label yes) missing                          -> FN, counted wrong
        # random: ids 6..9
        answer(9, "Yes,no"),  # label yes, 'Yesno' is a yes -> TP
        answer(8, "Yes. No, wait."),  # label no, first sentence yes -> FP
        answer(7, "There is no cat."),  # label no, read no -> TN
        answer(6, "Yes"),  # label yes, read yes -> TP
        answer(999, "Yes"),  # no such question: extra
    ]
    result = score_benchmark("pope", questions, write_jsonl(tmp_path / "answers.jsonl", answers), coco)
    adv, rnd = result["metrics"]["categories"]["adversarial"], result["metrics"]["categories"]["random"]
    # adversarial: TP=1 FP=1 TN=1 FN=2 (one of them the missing answer)
    assert (adv["tp"], adv["fp"], adv["tn"], adv["fn"]) == (1, 1, 1, 2)
    assert adv["accuracy"] == pytest.approx(100 * 2 / 5)  # (TP+TN)/5 = 40
    assert adv["precision"] == pytest.approx(50.0)  # 1/(1+1)
    assert adv["recall"] == pytest.approx(100 / 3)  # 1/(1+2)
    assert adv["f1"] == pytest.approx(40.0)  # 2*50*33.33/(50+33.33) = 40
    assert adv["yes_ratio"] == pytest.approx(40.0)  # 2 yes out of 5
    # random: TP=2 FP=1 TN=1 FN=0
    assert (rnd["tp"], rnd["fp"], rnd["tn"], rnd["fn"]) == (2, 1, 1, 0)
    assert rnd["accuracy"] == pytest.approx(75.0)  # 3/4
    assert rnd["precision"] == pytest.approx(200 / 3)  # 2/3
    assert rnd["recall"] == pytest.approx(100.0)
    assert rnd["f1"] == pytest.approx(80.0)  # 2*66.67*100/166.67
    assert rnd["yes_ratio"] == pytest.approx(75.0)
    # headline: mean over categories, as CuMo's eval_pope.py prints it
    assert result["metrics"]["f1"] == pytest.approx(60.0)  # (40+80)/2
    assert result["metrics"]["accuracy"] == pytest.approx(57.5)  # (40+75)/2
    assert result["counts"] == {"questions": 9, "answered": 8, "missing": 1, "extra": 1, "duplicate": 1, "unreadable_lines": 0}


def test_pope_question_without_label_is_refused(tmp_path):
    questions, coco = _write_pope(tmp_path)
    (coco / "coco_pope_random.json").unlink()
    with pytest.raises(ScoringInputError, match="category 'random'.*no label"):
        score_benchmark("pope", questions, write_jsonl(tmp_path / "a.jsonl", [answer(1, "Yes")]), coco)
    with pytest.raises(ScoringInputError, match="coco_pope_<category>.json"):
        (tmp_path / "empty").mkdir()
        score_benchmark("pope", questions, tmp_path / "a.jsonl", tmp_path / "empty")
