"""Every trainer checkpoint is a model checkpoint: `ours` loads its weights, the tools open it.

One in-process stage-1 run (world of one) starts from a conversion of the tiny HF CLIP (a whole
``CLIPModel``: the text tower is passed through) and the tiny HF LLaMA. Stage 1 trains only the
connector, so an export of the trained checkpoint must give back both HF sources bit for bit,
passthrough tensors included, and the trained connector. Loading at other layouts (written by 2
processes at TP=2 / PP=2 / EP=2) is checked in `test_resume.py`.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch

import cumo_megatron.platform as platform
from cumo_megatron.checkpoint import open_checkpoint, ours
from cumo_megatron.checkpoint.convert import Sources, import_checkpoint
from cumo_megatron.config.loader import to_dict
from cumo_megatron.config.schema import ParallelConfig
from cumo_megatron.models.cumo import build_model
from cumo_megatron.training.checkpointing import load_latest
from cumo_megatron.training.loop import Trainer
from tests.fixtures.tiny_models import save_hf_clip_vision, save_hf_lm
from tests.helpers.tools import load_tool
from tests.training.workers import experiment


def _tensors(path) -> dict[str, torch.Tensor]:
    src = open_checkpoint(path)
    return {k: src[k] for k in src.keys()}


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:10]}"
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{what}: {key} differs"


def _load(directory) -> torch.nn.Module:
    """A world-of-one model built from the checkpoint's config, loaded with `ours`."""
    platform.initialize(platform.ParallelSizes(), seed=0)
    model = build_model(ours.read_model_config(directory), ParallelConfig())
    ours.load_model_checkpoint(model, directory)
    return model


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> dict:
    """HF sources, their conversion (``init``), and one stage-1 step from it (the trainer's checkpoint)."""
    tmp = tmp_path_factory.mktemp("model-ckpt")
    save_hf_clip_vision(tmp / "clip", "clip_full")
    save_hf_lm(tmp / "llama", "llama", "safetensors")
    init = tmp / "init"
    import_checkpoint(Sources(vision=tmp / "clip", language=tmp / "llama"), init)
    cfg = experiment(dataset, str(tmp / "run"), stage=1, train_steps=1, save_interval=0, lr=1e-2,
                     warmup_fraction=0.0, global_batch_size=2, load=str(init))
    cfg.model = ours.read_model_config(init)
    trainer = Trainer(cfg)
    trainer.train()
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return dict(tmp=tmp, init=init, cfg=cfg, params=params, ckpt=load_latest(tmp / "run"))


def test_load_model_checkpoint_gives_the_trained_weights(trained):
    ckpt = trained["ckpt"]
    assert ours.is_model_checkpoint(ckpt)
    assert to_dict(ours.read_model_config(ckpt)) == to_dict(trained["cfg"].model)
    loaded = dict(_load(ckpt).named_parameters())
    assert loaded.keys() == trained["params"].keys()
    for name, want in trained["params"].items():
        assert torch.equal(loaded[name], want), name
    # The comparison tells trained from initial weights: the step moved the connector.
    initial = dict(_load(trained["init"]).named_parameters())
    moved = [n for n, p in trained["params"].items() if not torch.equal(initial[n], p)]
    assert moved and all(n.startswith("connector.") for n in moved)


def test_a_save_directory_stands_for_its_latest_checkpoint(trained):
    save_dir = trained["tmp"] / "run"  # holds `latest` and iter_N, the trainer's layout
    assert ours.resolve_checkpoint_dir(save_dir) == trained["ckpt"]
    assert ours.is_model_checkpoint(save_dir)
    assert to_dict(ours.read_model_config(save_dir)) == to_dict(trained["cfg"].model)
    loaded = dict(_load(save_dir).named_parameters())
    assert all(torch.equal(loaded[n], p) for n, p in trained["params"].items())


def test_conversion_records_are_carried_from_train_load(trained):
    ckpt, init = trained["ckpt"], trained["init"]
    assert json.loads((ckpt / ours.CONVERSION_INFO).read_text()) == json.loads((init / ours.CONVERSION_INFO).read_text())
    assert filecmp.cmp(ckpt / ours.PASSTHROUGH, init / ours.PASSTHROUGH, shallow=False)
    sources = sorted(p.relative_to(init).as_posix() for p in (init / ours.SOURCE_DIR).rglob("*") if p.is_file())
    assert sources and sources == sorted(
        p.relative_to(ckpt).as_posix() for p in (ckpt / ours.SOURCE_DIR).rglob("*") if p.is_file())


def test_export_of_a_trained_checkpoint_is_exact_for_untouched_tensors(trained, tmp_path):
    out = tmp_path / "export"
    assert load_tool("export_checkpoint").main(["--checkpoint", str(trained["ckpt"]), "--out", str(out), "--quiet"]) == 0
    # Stage 1 froze the CLIP and the LLM: both come back as the HF sources were, text tower included.
    _assert_same(_tensors(trained["tmp"] / "clip"), _tensors(out / "vision"), "vision")
    _assert_same(_tensors(trained["tmp"] / "llama"), _tensors(out / "language"), "language")
    projector = torch.load(out / "mm_projector.bin", weights_only=True)
    fc1 = [t for name, t in projector.items() if name.endswith("0.weight")]
    assert len(fc1) == 1 and torch.equal(fc1[0], trained["params"]["connector.linear_fc1.weight"])


def test_upcycling_tool_and_generate_open_a_trained_checkpoint(trained, dataset, tmp_path, capsys):
    ckpt = trained["ckpt"]
    up = tmp_path / "stage3-init"
    assert load_tool("upcycle_checkpoint").main(["--from-checkpoint", str(ckpt), "--vision-experts", "2", "--connector-experts", "2",
                             "--out", str(up), "--quiet"]) == 0
    moe = dict(_load(up).named_parameters())
    for j in range(2):  # experts are copies of the trained dense MLPs
        assert torch.equal(moe[f"connector.experts.{j}.linear_fc1.weight"],
                           trained["params"]["connector.linear_fc1.weight"])
    assert json.loads((up / ours.CONVERSION_INFO).read_text())["from_checkpoint"] == str(ckpt)

    from cumo_megatron.data.tokenizer import load_tokenizer
    from cumo_megatron.generate import main as generate
    from cumo_megatron.inference.session import InferenceSession

    # The checkpoint carries the run's tokenizer and template: generate needs no other flag.
    from cumo_megatron.checkpoint import assets

    assert filecmp.cmp(assets.carried_tokenizer(ckpt) / "tokenizer.model", dataset["tokenizer"], shallow=False)
    assert assets.read_generation_settings(ckpt) == assets.GenerationSettings(trained["cfg"].data.template,
                                                                             trained["cfg"].data.aspect)
    image = sorted(Path(dataset["image_folder"]).iterdir())[0]
    capsys.readouterr()
    assert generate(["--load", str(ckpt), "--image", str(image), "--prompt", "What is shown?",
                     "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    # The same question to the trained weights as they were in memory.
    model = _load(trained["init"]).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(trained["params"][name])
    session = InferenceSession(model, trained["cfg"].model, load_tokenizer(dataset["tokenizer"]))
    assert printed == session.answer("What is shown?", [image], max_new_tokens=4).text + "\n"
