"""Files for the evaluation servers and the MM-Vet grader, as LLaVA's converters write them."""

from __future__ import annotations

import json

from cumo_megatron.evaluation.scoring.submission import write_mmvet_submission, write_vizwiz_submission, write_vqav2_submission
from tests.evaluation.scoring_files import answer, write_jsonl


def test_server_submission_files(tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 7, "image": "VizWiz_test_1.jpg", "text": "q?"}, {"question_id": 8, "image": "VizWiz_test_2.jpg", "text": "q?"}])
    answers = write_jsonl(tmp_path / "a.jsonl", [answer(7, "Two dogs.")])
    counts = write_vqav2_submission(questions, answers, tmp_path / "vqav2.json")
    assert json.loads((tmp_path / "vqav2.json").read_text()) == [{"question_id": 7, "answer": "2 dogs"}, {"question_id": 8, "answer": ""}]
    assert counts["missing"] == 1
    write_vizwiz_submission(questions, answers, tmp_path / "vizwiz.json")
    assert json.loads((tmp_path / "vizwiz.json").read_text())[0] == {"image": "VizWiz_test_1.jpg", "answer": "2 dogs"}


def test_mmvet_grader_file(tmp_path):
    answers = write_jsonl(tmp_path / "a.jsonl", [answer(3, "A red car, parked."), answer(1, "Two")])
    assert write_mmvet_submission(answers, tmp_path / "mmvet.json") == 2
    assert json.loads((tmp_path / "mmvet.json").read_text()) == {"v1_3": "A red car, parked.", "v1_1": "Two"}  # raw text
