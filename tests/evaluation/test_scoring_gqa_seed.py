"""GQA (exact match after LLaVA's normalisation, balanced questions only) and SEED-Bench (exact
option letter), with the figures worked out by hand."""

from __future__ import annotations

import json

import pytest

from cumo_megatron.evaluation.scoring import score_benchmark
from cumo_megatron.evaluation.scoring.gqa import gqa_prediction
from tests.evaluation.scoring_files import answer, write_jsonl


def test_gqa_prediction_drops_trailing_periods_and_case():
    assert gqa_prediction("Left..") == "left"
    assert gqa_prediction("The white one.") == "the white one"  # no article removal in GQA


def test_gqa_accuracy_and_breakdowns(tmp_path):
    def q(answer_, structural, semantic, balanced=True):
        return {"answer": answer_, "isBalanced": balanced, "types": {"structural": structural, "semantic": semantic, "detailed": "x"}}

    gold = {
        "1": q("yes", "verify", "attr"),  # 'Yes.' -> 'yes': right
        "2": q("left", "query", "rel"),  # 'Left' -> 'left': right
        "3": q("white", "query", "attr"),  # 'The white one.' -> wrong
        "4": q("no", "verify", "obj"),  # missing: wrong
        "5": q("red", "query", "attr", balanced=False),  # not balanced: not scored
        "6": q("table", "query", "rel"),  # 'table..' -> 'table': right
    }
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(gold))
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": k, "image": "n1.jpg", "text": "q?"} for k in gold])
    answers = write_jsonl(tmp_path / "a.jsonl", [answer("6", "table.."), answer("5", "red"), answer("3", "The white one."), answer("2", "Left"), answer("1", "Yes.")])
    result = score_benchmark("gqa", questions, answers, tmp_path / "testdev_balanced_questions.json")
    m = result["metrics"]
    assert m["accuracy"] == pytest.approx(60.0)  # 1, 2, 6 right of 1, 2, 3, 4, 6
    assert m["binary"] == pytest.approx(50.0)  # verify: 1 right, 4 wrong
    assert m["open"] == pytest.approx(200 / 3)  # query: 2, 6 right, 3 wrong
    assert m["semantic_types"] == pytest.approx({"attr": 50.0, "obj": 0.0, "rel": 100.0})
    assert result["counts"]["unbalanced_skipped"] == 1 and result["counts"]["missing"] == 1


def test_seed_accuracy_per_data_and_question_type(tmp_path):
    seed = {
        "question_type": {"Scene Understanding": 1, "Instance Identity": 2},
        "questions": [
            {"question_id": "101", "answer": "A", "question_type_id": 1, "data_type": "image"},  # 'A': right
            {"question_id": "102", "answer": "B", "question_type_id": 1, "data_type": "image"},  # 'B.': wrong (exact)
            {"question_id": "103", "answer": "C", "question_type_id": 2, "data_type": "image"},  # ' C\n': right once stripped
            {"question_id": "104", "answer": "D", "question_type_id": 2, "data_type": "image"},  # missing: wrong
            {"question_id": "v1", "answer": "A", "question_type_id": 2, "data_type": "video"},  # 'A': right
        ],
    }
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(seed))
    # LLaVA's question file may spell ids as numbers where SEED-Bench.json has strings
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": int(i) if i.isdigit() else i, "image": "x.jpg", "text": "q"} for i in ("101", "102", "103", "104", "v1")])
    answers = write_jsonl(tmp_path / "a.jsonl", [answer("v1", "A"), answer(103, " C\n"), answer(102, "B."), answer(101, "A")])
    result = score_benchmark("seed", questions, answers, tmp_path / "SEED-Bench.json")
    m = result["metrics"]
    assert m["accuracy_image"] == pytest.approx(50.0)  # 101, 103 of 101..104
    assert m["accuracy"] == pytest.approx(60.0)  # 3 of 5
    assert m["accuracy_video"] == pytest.approx(100.0)
    assert m["question_types"] == pytest.approx({"Instance Identity": 200 / 3, "Scene Understanding": 50.0})  # 103, v1 of 103, 104, v1
    assert result["counts"]["missing"] == 1
