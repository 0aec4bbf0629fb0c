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
    counts = {name: len(json.loads(files[name].read_text())) for name in files}
    assert counts == {"stage1_captions.json": 32, "stage2.json": 32, "stage3.json": 32, "eval.json": 16}


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
