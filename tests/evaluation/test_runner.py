"""The evaluation runner on a tiny random CuMo release: LLaVA answer lines, each answer the model's
answer to that question asked alone, the same answers on 2 ranks (data, tensor or pipeline parallel), and a
resumed run that generates only what is missing."""

from __future__ import annotations

import json

import pytest

from cumo_megatron.evaluation.questions import load_questions
from cumo_megatron.evaluation.runner import load_session, model_id_for, run_questions
from tests.evaluation.runner_workers import count_calls
from tests.fixtures.tiny_models import save_cumo_release, save_images, tiny_sentencepiece
from tests.helpers.distributed import run_distributed
from tests.helpers.tools import load_tool

MAX_NEW = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaMA CuMo release with its tokenizer, 4 images, 7 questions (one text-only)."""
    root = tmp_path_factory.mktemp("runner")
    # A wide initialisation, so that greedy answers differ between questions (at the fixture's
    # default 0.1 every question got the same answer, and equal answers would prove nothing).
    release = save_cumo_release(root / "cumo-llama", llm_kind="llama", scales=(1,),
                                llm_overrides={"initializer_range": 0.5})
    tiny_sentencepiece(release.path)
    images = save_images(root / "images", 4, size=32)
    rows = [{"question_id": i, "image": images[i % 4].name, "text": f"What colour is shape {i}?",
             "category": "c"} for i in range(6)]
    rows.insert(3, {"question_id": "text-only", "text": "How many sides has a square?"})
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A release loads on the fly at TP = PP = 1 only: split over ranks, the converted checkpoint.
    converted = root / "converted"
    assert load_tool("upcycle_checkpoint").main(["--cumo", str(release.path), "--out", str(converted), "--quiet"]) == 0
    session = load_session(release.path)
    return root, release, questions, session


def _texts(path):
    return {json.loads(line)["question_id"]: json.loads(line)["text"] for line in path.read_text().splitlines()}


@pytest.fixture(scope="module")
def world_one(setup):
    """The questions answered at world size 1, in batches of 3."""
    root, _, questions, session = setup
    answers = root / "w1" / "answers.jsonl"
    result = run_questions(session, load_questions(questions, root / "images"), answers, model_id="tiny",
                           batch_size=3, max_new_tokens=MAX_NEW, progress=False)
    return answers, result


def test_answer_lines_are_llavas_and_each_is_the_question_asked_alone(setup, world_one):
    root, _, questions, session = setup
    answers, result = world_one
    assert (result.total, result.already_answered, result.generated) == (7, 0, 7)
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [list(line) for line in lines] == [["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]] * 7
    assert [line["question_id"] for line in lines] == [0, 1, 2, "text-only", 3, 4, 5]  # question order
    assert len({line["answer_id"] for line in lines}) == 7
    assert {line["model_id"] for line in lines} == {"tiny"} and lines[0]["metadata"] == {}
    assert lines[0]["prompt"] == "What colour is shape 0?"
    assert not list(answers.parent.glob("*.part*"))  # merged and removed
    # Reference: the session asked each question alone (no batching, no runner).
    for line in lines:
        q = next(q for q in load_questions(questions, root / "images") if q.question_id == line["question_id"])
        alone = session.answer(q.text, [q.image] if q.image else [], max_new_tokens=MAX_NEW)
        assert line["text"] == alone.text
    assert len({line["text"] for line in lines}) > 1  # random weights still tell the questions apart


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)], ids=["dp2", "tp2", "pp2"])
def test_two_ranks_give_the_same_answers(setup, world_one, tp, pp):
    """Two ranks as data parallel (each asks half the questions) or as one model split by TP or PP
    (both ask all of them), as `tools/evaluate.py run --tp/--pp` lays them out."""
    root, release, questions, _ = setup
    answers = root / f"w2-tp{tp}-pp{pp}" / "answers.jsonl"
    ranks = run_distributed("tests.evaluation.runner_workers:run_sharded", world_size=2, args={
        "load": str(release.path if tp * pp == 1 else root / "converted"), "questions": str(_with_images(questions, root)),
        "answers": str(answers), "batch_size": 2, "max_new_tokens": MAX_NEW, "tp": tp, "pp": pp})
    # 7 questions split over two data-parallel ranks, or all of them on both ranks of one model.
    assert sorted(r["asked"] for r in ranks) == ([3, 4] if tp * pp == 1 else [7, 7])
    assert all(r["generated"] == 7 for r in ranks)
    assert _texts(answers) == _texts(world_one[0])
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == [0, 1, 2, "text-only", 3, 4, 5]


def _with_images(questions, root):
    """The question file next to the images (the worker uses the default image folder)."""
    target = root / "images" / "questions.jsonl"
    target.write_text(questions.read_text())
    return target


def test_resumed_run_generates_only_the_missing_answers(setup, world_one):
    root, _, questions, session = setup
    full = world_one[0].read_text().splitlines()
    answers = root / "resume" / "answers.jsonl"
    answers.parent.mkdir()
    answers.write_text(full[0] + "\n" + full[1] + "\n")
    # A killed run's part file: one whole answer and one cut mid-line.
    answers.with_name("answers.jsonl.part1").write_text(full[2] + "\n" + full[3][:25])
    sizes = count_calls(session)
    try:
        result = run_questions(session, load_questions(questions, root / "images"), answers, model_id="tiny",
                               batch_size=8, max_new_tokens=MAX_NEW, progress=False)
    finally:
        del session.answer_many  # back to the class's method
    assert sizes == [4] and (result.already_answered, result.generated) == (3, 4)
    merged = answers.read_text().splitlines()
    assert merged[:3] == full[:3]  # kept as they were, answer_id included
    assert _texts(answers) == _texts(world_one[0])
    assert not list(answers.parent.glob("*.part*"))
    again = run_questions(session, load_questions(questions, root / "images"), answers, model_id="tiny",
                          progress=False)
    assert again.generated == 0 and answers.read_text().splitlines() == merged


def test_model_id_follows_llava():
    assert model_id_for("/runs/ckpt/stage3/iter_0000120") == "stage3_iter_0000120"
    assert model_id_for("/models/CuMo-mistral-7b/") == "CuMo-mistral-7b"
    assert model_id_for("out/checkpoint-500") == "out_checkpoint-500"
