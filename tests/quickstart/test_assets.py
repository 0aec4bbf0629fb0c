"""The quickstart's generated assets and its scorer (the end-to-end run is too slow for CI)."""

import json
import random

import pytest
import torch

from cumo_megatron.data.records import DataSource
from cumo_megatron.data.templates import get_template, tokenize_conversation
from cumo_megatron.data.tokenizer import load_tokenizer
from cumo_megatron.data.validate import TokenizerCheck, validate_sources
from cumo_megatron.quickstart import assets
from cumo_megatron.quickstart.evaluate import evaluate, normalize_answer, plot_expert_load

TOKENS_PER_IMAGE = (assets.TINY["image_size"] // assets.TINY["patch_size"]) ** 2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    files = assets.make_shapes_dataset(root / "data", n_train=32, n_eval=8, image_size=28, seed=0)
    tok = assets.train_tokenizer(root / "tok", assets.dataset_corpus(), vocab_size=512)
    return root, files, tok


def test_dataset_files_are_valid_and_tokenize(built):
    root, files, tok = built
    tokenizer = load_tokenizer(tok)
    for name, template in (("stage1_captions.json", "plain"), ("stage2.json", "vicuna_v1"),
                           ("stage3.json", "vicuna_v1"), ("eval.json", "vicuna_v1")):
        check = TokenizerCheck(tokenizer, get_template(template), 128, TOKENS_PER_IMAGE)
        report = validate_sources([DataSource(str(files[name]))], str(root / "data"), check)
        assert report.ok, report.format()
    counts = {name: len(json.loads(files[name].read_text())) for name in
              ("stage1_captions.json", "stage2.json", "stage3.json", "eval.json", "mc/llava_test_CQM-A.json")}
    assert counts == {"stage1_captions.json": 32, "stage2.json": 32, "stage3.json": 32, "eval.json": 16,
                      "mc/llava_test_CQM-A.json": 16}


def test_answers_are_supervised_single_tokens(built):
    root, files, tok = built
    tokenizer = load_tokenizer(tok)
    rec = json.loads(files["stage2.json"].read_text())[0]
    sample = tokenize_conversation("vicuna_v1", rec["conversations"], tokenizer, TOKENS_PER_IMAGE, 128,
                                   has_image=True, sample_id=rec["id"])
    supervised = [int(t) for t, m in zip(sample.labels, sample.loss_mask) if m]
    answers = [turn["value"] for turn in rec["conversations"][1::2]]
    expected = []
    for a in answers:
        ids = tokenizer.encode(a)
        assert len(ids) == 1, (a, ids)  # each answer word is one token: exact match is one decision
        expected += ids + [tokenizer.eos_id]
    assert supervised == expected


def test_eval_split_is_held_out_and_balanced(built):
    root, files, _ = built
    train_images = {r["image"] for r in json.loads(files["stage2.json"].read_text())}
    evaluation = json.loads(files["eval.json"].read_text())
    assert not train_images & {r["image"] for r in evaluation}
    assert {r["type"] for r in evaluation} == set(assets.QUESTIONS)
    for r in evaluation:
        answer = r["conversations"][1]["value"]
        assert answer in (assets.COLOURS if r["type"] == "colour" else assets.SHAPES)
        assert (root / "data" / r["image"]).is_file()


def test_images_show_the_named_colour():
    rng = random.Random(1)
    for colour, rgb in assets.COLOURS.items():
        for shape in assets.SHAPES:
            img = assets.draw_shape(28, colour, shape, rng)
            pixels = torch.tensor(list(img.getdata()), dtype=torch.float32)
            dist = (pixels - torch.tensor(rgb, dtype=torch.float32)).abs().max(dim=1).values
            assert (dist <= 20).sum() >= 40, (colour, shape)  # the shape covers >= 40 px in its colour


def test_tokenizer_round_trips_and_has_llama_specials(built):
    _, _, tok = built
    tokenizer = load_tokenizer(tok)
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    for text in ["a red circle", "What shape is it?", "yellow", "Ünïcode 123 falls back to bytes"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tiny_models_load_with_transformers(tmp_path):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    paths = assets.make_tiny_models(tmp_path, vocab_size=512, seed=0)
    clip = CLIPVisionModel.from_pretrained(paths["clip"])
    llm = LlamaForCausalLM.from_pretrained(paths["llm"])
    assert (paths["clip"] / "preprocessor_config.json").is_file()
    out = clip(pixel_values=torch.zeros(1, 3, 28, 28), output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, TOKENS_PER_IMAGE + 1, assets.TINY["vision_hidden"])
    logits = llm(torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, 512)


def test_evaluate_exact_match_and_chance(tmp_path):
    records = [
        {"id": "a", "type": "colour", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "red"}]},
        {"id": "b", "type": "colour", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "blue"}]},
        {"id": "c", "type": "shape", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "circle"}]},
        {"id": "d", "type": "shape", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "square"}]},
    ]
    (tmp_path / "eval.json").write_text(json.dumps(records))
    rows = [{"id": "a", "text": "Red."}, {"id": "b", "text": "green"}, {"id": "c", "text": " circle</s>"}]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = evaluate(tmp_path / "answers.jsonl", tmp_path / "eval.json")
    assert summary["correct"] == 2 and summary["n"] == 4 and summary["missing"] == 1
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["per_type"] == {"colour": 0.5, "shape": 0.5}
    assert summary["chance"] == pytest.approx(0.5)  # two distinct answers per type here
    assert normalize_answer("  Yellow!") == "yellow"


def test_expert_load_plot(tmp_path):
    rows = [{"step": s, "expert_load": {"vision.layer0": [10 + s, 20, 30, 40], "connector": [25, 25, 25, 25]}}
            for s in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot_expert_load(tmp_path / "metrics.jsonl", tmp_path / "load.png")
    assert png is not None and png.stat().st_size > 1000
    (tmp_path / "dense.jsonl").write_text(json.dumps({"step": 1, "expert_load": {}}) + "\n")
    assert plot_expert_load(tmp_path / "dense.jsonl", tmp_path / "none.png") is None


def test_trained_checkpoint_is_the_latest_iteration(tmp_path):
    from cumo_megatron.quickstart.run import _trained_checkpoint

    with pytest.raises(RuntimeError, match="--fresh"):
        _trained_checkpoint(tmp_path)  # no `latest`
    it = tmp_path / "iter_0000007"
    it.mkdir()
    (it / "metadata.json").write_text("{}")
    (tmp_path / "latest").write_text("iter_0000007\n")
    with pytest.raises(RuntimeError, match="model_config.yaml"):
        _trained_checkpoint(tmp_path)  # written by a trainer that did not make model checkpoints
    (it / "model_config.yaml").write_text("{}\n")
    assert _trained_checkpoint(tmp_path) == it


def test_vision_pretraining_changes_the_tower(built):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root, _, _ = built
    t = assets.TINY
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=t["vision_hidden"], intermediate_size=t["vision_ffn"], num_hidden_layers=t["vision_layers"],
        num_attention_heads=t["vision_heads"], image_size=t["image_size"], patch_size=t["patch_size"],
        hidden_act="quick_gelu"))
    before = clip.embeddings.patch_embedding.weight.detach().clone()
    accuracy = assets.pretrain_vision(clip, root / "data", steps=3, batch=8)
    assert 0.0 <= accuracy <= 1.0
    assert not torch.equal(before, clip.embeddings.patch_embedding.weight)
    assert not clip.training


def _truth(files) -> dict:
    """Each held-out image's colour and shape, read from eval.json's answers."""
    truth: dict = {}
    for r in json.loads(files["eval.json"].read_text()):
        truth.setdefault(r["image"], {})[r["type"]] = r["conversations"][1]["value"]
    return truth


def test_pope_split_is_balanced_and_labelled_from_the_images(built):
    from cumo_megatron.evaluation.questions import load_questions
    from cumo_megatron.evaluation.scoring.registry import SHORT_ANSWER

    root, files, _ = built
    truth = _truth(files)
    questions = [json.loads(line) for line in files["pope/llava_pope_test.jsonl"].read_text().splitlines()]
    assert len(questions) == 8 * 4 and len({q["question_id"] for q in questions}) == 32
    labels = {}
    for kind in ("colour", "shape"):
        for line in files[f"pope/coco_pope_{kind}.json"].read_text().splitlines():
            rec = json.loads(line)
            labels[rec["question_id"]] = (kind, rec)
    for q in questions:
        kind, rec = labels[q["question_id"]]
        assert q["category"] == kind and rec["image"] == q["image"] and q["text"] == rec["text"] + "\n" + SHORT_ANSWER
        value = truth[q["image"]][kind]
        present = (f"a {value} shape" if kind == "colour" else f"a {value} in") in rec["text"]
        assert rec["label"] == ("yes" if present else "no"), rec
    per_image = {}
    for kind, rec in labels.values():
        per_image.setdefault((rec["image"], kind), []).append(rec["label"])
    assert all(sorted(v) == ["no", "yes"] for v in per_image.values())
    asked = load_questions(files["pope/llava_pope_test.jsonl"], root / "data", suffix=SHORT_ANSWER)
    assert all(q.image.is_file() for q in asked) and asked[0].text == questions[0]["text"]


def test_multiple_choice_split_answers_point_at_the_truth(built):
    from cumo_megatron.evaluation.questions import load_questions
    from cumo_megatron.evaluation.scoring.registry import OPTION_LETTER

    root, files, _ = built
    truth = _truth(files)
    problems = json.loads(files["mc/problems.json"].read_text())
    records = json.loads(files["mc/llava_test_CQM-A.json"].read_text())
    letters = []
    for rec in records:
        problem = problems[rec["id"]]
        kind = rec["id"].split("_")[1]
        values = assets.COLOURS if kind == "colour" else assets.SHAPES
        assert sorted(problem["choices"]) == sorted(values)
        assert problem["choices"][problem["answer"]] == truth[rec["image"]][kind]
        assert rec["conversations"][1]["value"] == "ABCD"[problem["answer"]]
        letters.append(problem["answer"])
    assert len(set(letters)) > 1  # shuffled options: the answer is not always the same letter
    asked = load_questions(files["mc/llava_test_CQM-A.json"], root / "data", suffix=OPTION_LETTER)
    assert asked[0].text.endswith("\nD. " + problems[records[0]["id"]]["choices"][3] + "\n" + OPTION_LETTER)


def test_benchmark_turns_extend_the_conversations_only(built, tmp_path):
    root, files, _ = built
    with_turns = assets.make_shapes_dataset(tmp_path / "data", n_train=32, n_eval=8, image_size=28, seed=0,
                                            benchmark_turns=True)
    tok = load_tokenizer(assets.train_tokenizer(tmp_path / "tok", assets.dataset_corpus(benchmark_turns=True),
                                                vocab_size=512))
    plain = json.loads(files["stage3.json"].read_text())
    extended = json.loads(with_turns["stage3.json"].read_text())
    kinds, places = set(), set()
    for a, b in zip(plain, extended):
        turns = b["conversations"]
        assert b["image"] == a["image"] and turns[0]["value"].startswith("<image>\n")
        at = next(i for i in range(0, 6, 2) if turns[i]["value"].replace("<image>\n", "") not in
                  [t["value"].replace("<image>\n", "") for t in a["conversations"]])
        places.add(at)
        rest = [t["value"].replace("<image>\n", "") for t in turns[:at] + turns[at + 2:]]
        assert rest == [t["value"].replace("<image>\n", "") for t in a["conversations"]]  # the original turns, in order
        question, answer = turns[at]["value"].replace("<image>\n", ""), turns[at + 1]["value"]
        colour, shape = (a["conversations"][1 + 2 * (a["conversations"][0]["value"].endswith(q))]["value"]
                         for q in (assets.QUESTIONS["shape"], assets.QUESTIONS["colour"]))
        if question.startswith("Is there"):
            kinds.add("yes_no")
            assert answer == ("Yes" if f"a {colour} shape" in question or f"a {shape} in" in question else "No")
        else:
            kinds.add("choice")
            options = dict(line.split(". ", 1) for line in question.splitlines()[1:5])
            assert options[answer] in (colour, shape)
    assert kinds == {"yes_no", "choice"} and places == {0, 2, 4}
    assert (tmp_path / "data" / plain[0]["image"]).read_bytes() == (root / "data" / plain[0]["image"]).read_bytes()
    check = TokenizerCheck(tok, get_template("vicuna_v1"), 128, TOKENS_PER_IMAGE)
    report = validate_sources([DataSource(str(with_turns["stage3.json"]))], str(tmp_path / "data"), check)
    assert report.ok, report.format()  # within the quickstart's data.max_length


def test_quickstart_suite_file_reads_back(built, tmp_path):
    from cumo_megatron.evaluation.scoring import BENCHMARKS
    from cumo_megatron.evaluation.suite import read_suite
    from cumo_megatron.quickstart.run import write_suite

    root, _, tok = built
    info = {"data": str(root / "data"), "tokenizer": str(tok)}
    suite = read_suite(write_suite(tmp_path, info, tmp_path / "ckpt" / "iter_0000001"), list(BENCHMARKS))
    assert [b.name for b in suite.benchmarks] == ["scienceqa", "pope"]
    assert all(b.questions.is_file() and b.annotations.exists() for b in suite.benchmarks)
    assert suite.max_new_tokens == 4 and suite.out == tmp_path / "benchmarks"
