"""VQA-family scoring: the official normalisation, the leave-one-out accuracy, and the TextVQA,
VQAv2 and VizWiz scorers on small files, with the figures worked out by hand."""

from __future__ import annotations

import json

import pytest

from cumo_megatron.evaluation.scoring import NotScorable, score_benchmark
from cumo_megatron.evaluation.scoring.textvqa import prompt_question
from cumo_megatron.evaluation.scoring.vqa_accuracy import leave_one_out_accuracy, vqa_accuracy
from cumo_megatron.evaluation.scoring.vqa_normalize import normalize_answer
from tests.evaluation.scoring_files import answer, write_jsonl


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("Two", "2"),  # number words become digits
        ("none", "0"),
        ("The dog.", "dog"),  # articles go, the final period goes
        ("an apple", "apple"),
        ("2.5", "2.5"),  # a period before a digit stays
        ("Coca-Cola", "coca cola"),  # a mark not next to a space becomes a space
        ("red - white", "red white"),  # a mark next to a space vanishes
        ("1,000", "1000"),  # commas go first
        ("yes!", "yes"),
        ("dont", "don't"),  # contractions get their apostrophe back
        ("couldnt've", "couldn't've"),
        ("shes", "shes"),  # ... but not 'shes': the official table maps only "she's" to itself
        ("the dog's bone", "dog 's bone"),  # EvalAI splits off 's
        ("What?\n", "what"),
    ],
)
def test_normalize_answer_follows_the_official_rules(raw, normal):
    assert normalize_answer(raw) == normal


@pytest.mark.parametrize(
    "matches, expected",
    [
        (0, 0.0),
        (1, 0.3),  # 1 left out: 0/3; 9 left out: 1/3 each -> (0 + 9/3) / 10
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10: three humans are not quite enough
        (4, 1.0),  # (4 * 1 + 6 * 1) / 10
        (10, 1.0),
    ],
)
def test_leave_one_out_accuracy(matches, expected):
    humans = ["cat"] * matches + ["dog"] * (10 - matches)
    assert leave_one_out_accuracy("cat", humans) == pytest.approx(expected)


def test_vqa_accuracy_processes_human_answers_only_when_they_disagree():
    # they disagree: "red, white" loses its comma -> "red white", matched 3 times
    assert vqa_accuracy("red white", ["red, white"] * 3 + ["red"] * 7) == pytest.approx(0.9)
    # all agree: left as they are, so "red, white" never equals the processed "red white"
    assert vqa_accuracy("red white", ["red, white"] * 10) == 0.0
    # VizWiz compares human answers raw, always
    assert vqa_accuracy("red white", ["red, white"] * 3 + ["red"] * 7, vizwiz=True) == 0.0


@pytest.mark.parametrize(
    "prompt, question",
    [
        ("What is it?\nReference OCR token: A, B\nAnswer the question using a single word or phrase.", "what is it?"),
        ("Reference OCR token: A\nWhat is it?\nAnswer briefly.", "what is it?"),
        ("What is it?\nAnswer the question using a single word or phrase.", "what is it?"),
        ("OCR tokens: a b Question: What is it? Short answer:", "what is it?"),
    ],
)
def test_textvqa_reads_the_question_out_of_the_prompt(prompt, question):
    assert prompt_question(prompt) == question


SHORT = "\nAnswer the question using a single word or phrase."


def test_textvqa_accuracy(tmp_path):
    # LLaVA's TextVQA question ids are image ids: img1 has two questions, told apart by their text
    qs = [
        ("img1", "what number is on the bus?\nReference OCR token: 12, bus" + SHORT, ["two", "two", "2"] + ["bus"] * 7),
        ("img1", "what is the brand?" + SHORT, ["coca-cola", "the coca-cola"] + ["coke"] * 8),
        ("img2", "who is there?" + SHORT, ["i dont know"] * 4 + ["nobody"] * 6),
        ("img3", "what color?" + SHORT, ["red"] * 10),
    ]
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": f"{i}.jpg", "text": t} for i, t, _ in qs])
    data = [{"image_id": i, "question_id": n, "question": t.split("\n")[0].capitalize(), "answers": a} for n, (i, t, a) in enumerate(qs)]
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    answers = write_jsonl(
        tmp_path / "a.jsonl",
        [
            answer("img2", "I don't know", qs[2][1]),  # 'dont' -> "don't": 4 humans -> 1.0
            answer("img1", "Coca Cola", qs[1][1]),  # 'coca-cola' and 'the coca-cola' -> 'coca cola': 2 -> 0.6
            answer("img1", "Two.", qs[0][1]),  # 'two', 'two', '2' -> '2': 3 humans -> 0.9
            # img3 missing -> 0
        ],
    )
    result = score_benchmark("textvqa", questions, answers, tmp_path / "TextVQA_0.5.1_val.json")
    assert result["metrics"]["accuracy"] == pytest.approx(100 * (1.0 + 0.6 + 0.9 + 0.0) / 4)  # 62.5
    assert result["counts"]["missing"] == 1 and result["counts"]["answered"] == 3


def test_vqav2_accuracy_per_answer_type(tmp_path):
    def ann(qid, answers, kind):
        return {"question_id": qid, "answer_type": kind, "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]}

    annotations = {
        "annotations": [
            ann(1, ["2"] * 10, "number"),
            ann(2, ["yes"] + ["no"] * 9, "yes/no"),
            ann(3, ["red, white"] * 3 + ["red"] * 7, "other"),
            ann(4, ["dog"] * 10, "other"),
        ]
    }
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": f"{i}.jpg", "text": "q?" + SHORT} for i in (1, 2, 3, 4)])
    answers = write_jsonl(
        tmp_path / "a.jsonl",
        [
            answer(3, "Red, white."),  # -> 'red white'; humans disagree so 'red, white' -> 'red white': 3 -> 0.9
            answer(1, "two"),  # -> '2', all ten -> 1.0
            answer(2, "Yes."),  # -> 'yes', one human -> 0.3
            # 4 missing -> 0
        ],
    )
    result = score_benchmark("vqav2", questions, answers, tmp_path / "ann.json")
    assert result["metrics"]["accuracy"] == pytest.approx(100 * (1.0 + 0.3 + 0.9 + 0.0) / 4)  # 55.0
    assert result["metrics"]["answer_types"] == pytest.approx({"number": 100.0, "yes/no": 30.0, "other": 45.0})  # other: (0.9+0)/2
    with pytest.raises(NotScorable, match="EvalAI VQAv2 server.*a.jsonl"):
        score_benchmark("vqav2", questions, answers, None)


def test_vizwiz_accuracy_with_unanswerable(tmp_path):
    rows = [
        ("VizWiz_val_00000001.jpg", ["unanswerable"] * 6 + ["blue"] * 4, "unanswerable", "Unanswerable."),  # 6 -> 1.0
        ("VizWiz_val_00000002.jpg", ["blue"] * 2 + ["dark blue"] * 8, "other", "Blue"),  # 2 -> 0.6
        ("VizWiz_val_00000003.jpg", ["ten"] * 8 + ["10"] * 2, "number", "ten"),  # '10' vs raw humans: 2 -> 0.6
    ]
    (tmp_path / "val.json").write_text(json.dumps([{"image": im, "question": "q?", "answers": [{"answer": a, "answer_confidence": "yes"} for a in ans], "answer_type": kind, "answerable": int(kind != "unanswerable")} for im, ans, kind, _ in rows]))
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": n, "image": im, "text": "q?"} for n, (im, *_) in enumerate(rows)])
    answers = write_jsonl(tmp_path / "a.jsonl", [answer(n, text) for n, (*_, text) in reversed(list(enumerate(rows)))])
    result = score_benchmark("vizwiz", questions, answers, tmp_path / "val.json")
    assert result["metrics"]["accuracy"] == pytest.approx(100 * (1.0 + 0.6 + 0.6) / 3)  # 73.33
    assert result["metrics"]["answer_types"] == pytest.approx({"number": 60.0, "other": 60.0, "unanswerable": 100.0})
    assert result["counts"]["said_unanswerable"] == 1

