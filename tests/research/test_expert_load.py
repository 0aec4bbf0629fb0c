"""Expert-load analysis: counts from a model run equal a plain top-k over the routers' inputs,
metrics rows are summed over the right steps, the table's MaxVio / entropy are right, and
``tools/expert_load.py`` writes the heatmap, the table and a JSON last line."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cumo_megatron.platform as platform
from cumo_megatron.config.presets import tiny
from cumo_megatron.moe.router import CuMoRouter
from cumo_megatron.research import load_metrics
from cumo_megatron.research.expert_load import (
    collect_model_load,
    conversation_inputs,
    load_table,
    model_load,
    open_checkpoint,
    parse_steps,
    prompt_inputs,
    read_metrics_load,
    summarize,
    trainer_config_path,
    write_table_csv,
)
from tests.training.workers import VOCAB, make_dataset

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "expert_load.py"
NUM_IMAGES, NUM_TEXT = 4, 2
TOP_K = 2  # the tiny preset's MoEConfig default, for vision, connector and the LLM below


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """megatron's parallel state at tp = pp = ep = 1 in this process."""
    platform.initialize(platform.ParallelSizes(), seed=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny dataset (4 image + 2 text conversations) and a checkpoint of ours of a tiny CuMo with
    MoE in all three modules (random weights, 4 experts in vision and connector, 6 in the LLM,
    tokenizer.model inside)."""
    from cumo_megatron.checkpoint import ours
    from cumo_megatron.config.schema import ParallelConfig
    from cumo_megatron.models.cumo import build_model

    root = tmp_path_factory.mktemp("expert-load")
    data = make_dataset(root / "data", num_images=NUM_IMAGES, num_text=NUM_TEXT)
    cfg = tiny(moe=True, llm_moe=True)
    cfg.language.vocab_size = VOCAB
    cfg.language.moe = dataclasses.replace(cfg.language.moe, num_experts=6, top_k=TOP_K)  # panels of two widths
    platform.seed_everything(7)
    model = build_model(cfg, ParallelConfig())
    ckpt = root / "ckpt"
    ours.save_model_checkpoint(model, cfg, ckpt)
    (ckpt / "tokenizer.model").write_bytes(Path(data["tokenizer"]).read_bytes())
    return {"root": root, "data": data, "cfg": cfg, "ckpt": ckpt}


def _router_key(router: CuMoRouter) -> str:
    module = router.settings.module
    return module if router.layer_number is None else f"{module}.layer{router.layer_number - 1}"


def _recount(captured: list[tuple[CuMoRouter, torch.Tensor]]) -> dict[str, list[int]]:
    """Plain PyTorch: logits of the captured router inputs, top-k experts, counted per layer."""
    out: dict[str, np.ndarray] = {}
    for router, hidden in captured:
        logits = hidden.reshape(-1, hidden.shape[-1]).double() @ router.weight.detach().double().t()
        chosen = torch.topk(logits, router.topk, dim=-1).indices.reshape(-1)  # softmax keeps the order
        counts = torch.bincount(chosen, minlength=router.num_experts).numpy()
        key = _router_key(router)
        out[key] = out.get(key, 0) + counts
    return {k: v.tolist() for k, v in out.items()}


def _run_with_hooks(model, inputs):
    """collect_model_load over ``inputs`` while hooks capture every router input; also the lengths
    and image counts of what was fed."""
    captured, fed = [], []
    hooks = [m.register_forward_hook(lambda mod, args, _out: captured.append((mod, args[0].detach().clone())))
             for m in model.modules() if isinstance(m, CuMoRouter)]

    def recorded():
        for batch in inputs:
            images = batch["images"]
            fed.append((batch["input_ids"].shape[1], 0 if images is None else images.shape[0]))
            yield batch

    try:
        layers, samples = collect_model_load(model, recorded())
    finally:
        for hook in hooks:
            hook.remove()
    return layers, samples, captured, fed


@pytest.fixture(scope="module")
def opened(setup):
    """The checkpoint opened as the tool opens it, and the dataset's tokenizer."""
    from cumo_megatron.data.tokenizer import load_tokenizer

    return open_checkpoint(setup["ckpt"]), load_tokenizer(setup["data"]["tokenizer"])


def test_model_counts_equal_an_independent_topk(setup, opened):
    (checkpoint, tok), data = opened, setup["data"]
    model, cfg = checkpoint.model, checkpoint.cfg
    assert checkpoint.kind == "model"
    patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    for name, inputs in (
        ("conversation", conversation_inputs(model, cfg, data["file"], tok, "vicuna_v1", data["image_folder"])),
        ("prompt", prompt_inputs(model, cfg, data["file"], tok, "vicuna_v1", data["image_folder"])),
    ):
        layers, samples, captured, fed = _run_with_hooks(model, inputs)
        assert samples == NUM_IMAGES + NUM_TEXT == len(fed), name
        assert layers == _recount(captured), name
        assert {k.split(".")[0] for k in layers} == {"vision", "connector", "language"}
        assert len(layers) == (cfg.vision.num_layers - 1) + 1 + cfg.language.num_layers
        images = sum(n for _, n in fed)
        assert images == NUM_IMAGES
        # By hand: top-k of every token; the ViT routes the patches and CLS of each image.
        for key, counts in layers.items():
            expected = {"vision": patches + 1, "connector": cfg.vision.tokens_per_image}.get(key.split(".")[0])
            total = TOP_K * (images * expected if expected else sum(length for length, _ in fed))
            assert sum(counts) == total, (name, key)
        if name == "conversation":
            conversation = layers
    # Same images in both modes: identical vision and connector routing; prompts are shorter.
    assert {k: v for k, v in layers.items() if not k.startswith("language")} == {
        k: v for k, v in conversation.items() if not k.startswith("language")}
    assert sum(layers["language.layer0"]) < sum(conversation["language.layer0"])


def test_trainer_checkpoint_gives_the_same_counts(setup, opened, tmp_path):
    from cumo_megatron.config.loader import save_config
    from cumo_megatron.config.schema import DataConfig, ExperimentConfig
    from cumo_megatron.training.checkpointing import save_checkpoint

    (checkpoint, tok), data = opened, setup["data"]
    save = tmp_path / "run"
    iteration = save_checkpoint(save, 3, checkpoint.model, None, None, None, {"iteration": 3})
    experiment = ExperimentConfig(model=setup["cfg"], data=DataConfig(
        files=[data["file"]], tokenizer=data["tokenizer"], template="vicuna_v1", max_length=256))
    save_config(experiment, save / "config.yaml")
    assert trainer_config_path(iteration) == trainer_config_path(save) == save / "config.yaml"
    assert trainer_config_path(setup["ckpt"]) is None
    reference, _ = collect_model_load(checkpoint.model, conversation_inputs(
        checkpoint.model, checkpoint.cfg, data["file"], tok, "vicuna_v1", data["image_folder"], limit=3))
    # A run directory (weights through load_weights), and an iter_N that is also a model checkpoint
    # (the trainer may write model_config.yaml into each): both take the run's data settings.
    as_model = tmp_path / "run2" / "iter_0000005"
    shutil.copytree(setup["ckpt"], as_model)
    shutil.copy(save / "config.yaml", as_model.parent / "config.yaml")
    for load in (save, as_model):
        layers, settings = model_load(load, data["file"], data["image_folder"], limit=3)
        assert settings["checkpoint_kind"] == "trainer" and settings["samples"] == 3
        assert settings["tokenizer"] == data["tokenizer"]  # the run's config.yaml, as are these two:
        assert settings["max_length"] == 256 and settings["template"] == "vicuna_v1"
        assert layers == reference


def _metrics_rows(seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    rows = [{"step": 1, "loss": 2.0, "expert_load": {}}]  # a dense stage logs no load
    for step in range(2, 7):
        rows.append({"step": step, "loss": 1.0, "expert_load": {
            "vision.layer0": [rng.randrange(100) for _ in range(4)],
            "vision.layer1": [rng.randrange(100) for _ in range(4)],
            "connector": [rng.randrange(100) for _ in range(4)],
        }})
    return rows


def test_metrics_sum_the_chosen_steps(tmp_path):
    rows = _metrics_rows()
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')  # cut by a kill
    for spec, steps in (("3:5", [3, 4, 5]), (":3", [2, 3]), ("5:", [5, 6]), ("4", [4]), (None, [2, 3, 4, 5, 6])):
        found = read_metrics_load(path, parse_steps(spec))
        assert found.steps == steps, spec
        assert found.unreadable_lines == [len(rows) + 1]
        chosen = [r["expert_load"] for r in rows if r["step"] in steps]
        expected = {k: np.sum([c[k] for c in chosen], axis=0).tolist() for k in chosen[0]}
        assert found.layers == expected, spec
    assert read_metrics_load(path, parse_steps("1:1")).layers == {}
    for bad in ("a:b", "5:3", "1:2:3"):
        with pytest.raises(ValueError, match="steps"):
            parse_steps(bad)
    twice = tmp_path / "twice.jsonl"
    twice.write_text(json.dumps(rows[2]) + "\n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(ValueError, match="lines 1 and 2 both hold step 3"):
        read_metrics_load(twice)


def test_table_max_vio_and_entropy_on_known_counts(tmp_path):
    counts = {
        "language.layer0": [0, 0, 0, 0, 0, 0, 0, 0],  # nothing routed: balanced by convention
        "vision.layer10": [10, 20, 30, 40],
        "connector": [0, 0, 0, 8],
        "vision.layer2": [25, 25, 25, 25],
    }
    table = load_table(counts)
    assert [r.layer for r in table] == ["vision.layer2", "vision.layer10", "connector", "language.layer0"]
    by_layer = {r.layer: r for r in table}
    assert by_layer["vision.layer10"].max_vio == pytest.approx(40 / 25, rel=1e-12)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert by_layer["vision.layer10"].entropy == pytest.approx(float(-(p * np.log(p)).sum() / np.log(4)), rel=1e-12)
    assert by_layer["vision.layer2"].max_vio == pytest.approx(1.0)
    assert by_layer["vision.layer2"].entropy == pytest.approx(1.0)
    assert by_layer["connector"].max_vio == pytest.approx(4.0) and by_layer["connector"].entropy == pytest.approx(0.0)
    for row in table:  # the library's measures, layer by layer
        assert row.max_vio == load_metrics.max_violation(counts[row.layer])
        assert row.entropy == load_metrics.load_entropy(counts[row.layer])
        assert row.shares == tuple(load_metrics.shares(counts[row.layer]))
    summary = summarize(table)
    assert summary["modules"]["vision"]["mean_max_vio"] == pytest.approx((1.6 + 1.0) / 2)
    assert summary["modules"]["vision"]["worst_layer"] == "vision.layer10"
    assert summary["mean_max_vio"] == pytest.approx((1.6 + 1.0 + 4.0 + 1.0) / 4)
    with open(write_table_csv(table, tmp_path / "t.csv"), newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [r["layer"] for r in read] == [r.layer for r in table]
    assert float(read[1]["share_3"]) == pytest.approx(0.4) and read[1]["share_7"] == ""
    assert int(read[2]["count_3"]) == 8 and float(read[2]["max_vio"]) == pytest.approx(4.0)


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_cli_on_a_checkpoint_writes_heatmap_table_and_json(setup, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("expert_load_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    data, out = setup["data"], tmp_path / "out"
    rc = tool.main(["--load", str(setup["ckpt"]), "--data", data["file"], "--image-folder", data["image_folder"],
                    "--limit", "3", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    summary = _last_json(captured.out)
    assert summary["source"] == "model" and summary["samples"] == 3
    assert set(summary["modules"]) == {"vision", "connector", "language"}
    assert "vision.layer0" in captured.out and "MaxVio" in captured.out  # the printed table
    assert (out / "expert_load.png").stat().st_size > 5000
    assert json.loads((out / "config.json").read_text())["template"] == "mistral_instruct"  # Mixtral-style LLM
    with open(out / "expert_load.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    vision = [float(r["max_vio"]) for r in rows if r["module"] == "vision"]
    assert summary["modules"]["vision"]["mean_max_vio"] == pytest.approx(sum(vision) / len(vision), rel=1e-12)
    for row in rows:  # MaxVio recomputed from the written counts
        counts = [int(row[f"count_{e}"]) for e in range(int(row["experts"]))]
        assert float(row["max_vio"]) == pytest.approx(max(counts) * len(counts) / sum(counts), rel=1e-12)
    layers = json.loads((out / "expert_load.json").read_text())["layers"]
    assert sum(sum(layer["counts"]) for layer in layers if layer["module"] == "connector") == TOP_K * 4 * 3


def test_cli_on_metrics_in_a_subprocess(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    rows = _metrics_rows()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(TOOL), "--metrics", str(path), "--steps", "2:4", "--out",
                           str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = _last_json(proc.stdout)
    assert summary["source"] == "metrics" and summary["num_steps"] == 3
    connector = np.sum([r["expert_load"]["connector"] for r in rows[1:4]], axis=0)
    assert summary["modules"]["connector"]["mean_max_vio"] == pytest.approx(
        connector.max() / connector.mean(), rel=1e-12)
    assert (tmp_path / "out" / "expert_load.png").is_file() and (tmp_path / "out" / "expert_load.csv").is_file()
    assert math.isclose(summary["mean_max_vio"], np.mean([
        np.max(np.sum([r["expert_load"][k] for r in rows[1:4]], axis=0))
        / np.mean(np.sum([r["expert_load"][k] for r in rows[1:4]], axis=0))
        for k in ("vision.layer0", "vision.layer1", "connector")]), rel_tol=1e-12)
    bad = subprocess.run([sys.executable, str(TOOL), "--metrics", str(path), "--steps", "50:60", "--out",
                          str(tmp_path / "none")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error:")
    assert "50:60" in bad.stderr
