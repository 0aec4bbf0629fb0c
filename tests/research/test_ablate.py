"""Ablations in miniature: each variant's config differs from the quickstart's stage 3 in exactly its
one factor, scratch experts are fresh where upcycled ones copy the dense MLP, and a tiny end-to-end
run of two variants writes a table whose numbers match a re-computation from the runs' own files;
re-running skips finished variants (and finished steps of an unfinished one)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cumo_megatron.platform as platform
from cumo_megatron.config.loader import load_config, save_config, to_dict
from cumo_megatron.config.presets import tiny
from cumo_megatron.config.schema import ExperimentConfig, ParallelConfig
from cumo_megatron.quickstart import run as quickstart
from cumo_megatron.research import ablate
from cumo_megatron.training.metrics import is_training_row

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "ablate.py"
VOCAB = 512
SETTINGS = ablate.Settings(steps=3, seed=5, stage2_steps=1, n_train=32, n_eval=2, last_steps=2)


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """megatron's parallel state at tp = pp = ep = 1 in this process."""
    platform.initialize(platform.ParallelSizes(), seed=0)


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _diff(a: ExperimentConfig, b: ExperimentConfig) -> dict:
    """Dotted keys whose values differ (a key absent on one side, e.g. under a null MoE, counts)."""
    fa, fb = _flat(to_dict(a)), _flat(to_dict(b))
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


# ----------------------------------------------------------------------------------------- configs


def test_each_variant_changes_exactly_its_factor():
    quickstart_stage3 = load_config(ExperimentConfig, quickstart.CONFIGS / "stage3.yaml",
                                    [f"model.language.vocab_size={VOCAB}", f"seed={SETTINGS.seed}",
                                     f"train.train_steps={SETTINGS.steps}"])
    configs = {v.name: ablate.variant_config(v, SETTINGS, VOCAB) for v in ablate.VARIANTS if v.stage3}
    assert set(configs) == {v.name for v in ablate.VARIANTS} - {"stage2_start"}
    assert _diff(configs["upcycled_aux"], quickstart_stage3) == {}  # the reference is the quickstart's stage 3
    assert _diff(configs["scratch_aux"], quickstart_stage3) == {}  # differs only in its initial weights

    noaux = _diff(configs["upcycled_noaux"], quickstart_stage3)
    coefficients = ("balance_coeff", "z_loss_coeff")
    assert set(noaux) == {f"model.{m}.moe.{c}" for m in ("vision", "connector") for c in coefficients}
    assert all(new == 0.0 and old > 0 for new, old in noaux.values())

    assert {k: v[0] for k, v in _diff(configs["top2_of_8"], quickstart_stage3).items()} == {
        "model.vision.moe.num_experts": 8, "model.connector.moe.num_experts": 8}
    assert configs["top2_of_8"].model.vision.moe.top_k == configs["top2_of_8"].model.connector.moe.top_k == 2

    clip_only = configs["clip_moe_only"]
    assert clip_only.model.connector.moe is None and clip_only.model.vision.moe == quickstart_stage3.model.vision.moe
    assert all(k.startswith("model.connector.moe") for k in _diff(clip_only, quickstart_stage3))
    conn_only = configs["connector_moe_only"]
    assert conn_only.model.vision.moe is None and conn_only.model.connector.moe == quickstart_stage3.model.connector.moe
    assert all(k.startswith("model.vision.moe") for k in _diff(conn_only, quickstart_stage3))

    dense = configs["dense"]
    assert dense.model.vision.moe is None and dense.model.connector.moe is None
    moe_keys = ("model.vision.moe", "model.connector.moe")
    # stage 2 = stage 3 without MoE: same steps, lr, data, seed
    assert {k for k in _diff(dense, quickstart_stage3) if not k.startswith(moe_keys)} == {"train.stage"}
    for cfg in configs.values():
        assert (cfg.train.train_steps, cfg.seed, cfg.data) == (SETTINGS.steps, SETTINGS.seed, quickstart_stage3.data)


def test_variant_selection():
    assert [v.name for v in ablate.select_variants(["top2_of_8", "dense"])] == ["dense", "top2_of_8"]
    assert len(ablate.select_variants(None)) == len(ablate.VARIANTS) == 8
    start = ablate.select_variants(["stage2_start"])[0]
    assert ablate.stage3_overrides(start, SETTINGS) == [] and not start.stage3
    with pytest.raises(ValueError, match="no stage 3"):
        ablate.variant_config(start, SETTINGS)
    assert ablate.select_variants(["upcycled_aux"]) == [ablate.REFERENCE]
    with pytest.raises(ValueError, match="unknown variant"):
        ablate.select_variants(["dense", "moe_everywhere"])
    with pytest.raises(ValueError, match="steps=0"):
        dataclasses.replace(SETTINGS, steps=0).check()


# ------------------------------------------------------------------------------- initial weights

_VISION_EXPERT = re.compile(r"^(vision\..*\.mlp\.)experts\.local_experts\.(\d+)\.(.+)$")
_CONNECTOR_EXPERT = re.compile(r"^connector\.experts\.(\d+)\.(.+)$")


def _dense_source(name: str):
    """The dense parameter an expert parameter was upcycled from, and the expert index (None: not an expert)."""
    if m := _VISION_EXPERT.match(name):
        return m.group(1) + m.group(3), int(m.group(2))
    if m := _CONNECTOR_EXPERT.match(name):
        return "connector." + m.group(2), int(m.group(1))
    return None, None


def test_scratch_experts_are_fresh_and_upcycled_ones_copy_the_dense_mlp(tmp_path):
    from cumo_megatron.checkpoint import ours
    from cumo_megatron.models.cumo import build_model

    platform.seed_everything(1)
    dense = build_model(tiny(moe=False), ParallelConfig())
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # like a trained stage 2: no weight (or zero bias) equals a fresh init
        for p in dense.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ours.save_model_checkpoint(dense, tiny(moe=False), tmp_path / "stage2")
    dense_params = {n: p.detach().clone() for n, p in dense.named_parameters()}

    moe_cfg = tiny(moe=True)
    copied = dict(ablate.initial_moe_model(tmp_path / "stage2", moe_cfg, seed=3, experts="copied").named_parameters())
    scratch = dict(ablate.initial_moe_model(tmp_path / "stage2", moe_cfg, seed=3, experts="scratch").named_parameters())
    experts = [n for n in copied if _dense_source(n)[0] is not None]
    assert {n for n in experts if n.startswith("vision.")} and {n for n in experts if n.startswith("connector.")}
    assert set(experts) == {n for n in copied if ablate.is_expert_param(n)}
    for name in experts:
        source, index = _dense_source(name)
        assert torch.equal(copied[name], dense_params[source]), name
        assert not torch.allclose(scratch[name], dense_params[source], atol=1e-3), name
        if index > 0:  # fresh draws per expert, where copies are all alike
            first = re.sub(rf"experts\.{index}\.", "experts.0.", name)
            if scratch[name].abs().sum() > 0:  # megatron zero-initialises expert biases
                assert not torch.equal(scratch[name], scratch[first]), name
    for name in copied:
        if name not in experts:  # routers (fresh, seeded) and every dense weight: the same in both
            assert torch.equal(copied[name], scratch[name]), name
            if "router" not in name:
                assert torch.equal(copied[name], dense_params[name]), name

    config = tmp_path / "stage3.yaml"
    save_config(ExperimentConfig(model=moe_cfg), config)
    out = ablate.write_scratch_init(tmp_path / "stage2", config, [], tmp_path / "scratch", seed=3)
    reloaded = build_model(moe_cfg, ParallelConfig())
    ours.load_model_checkpoint(reloaded, out)
    for name, param in reloaded.named_parameters():
        assert torch.equal(param, scratch[name]), name
    platform.initialize(platform.ParallelSizes(), seed=0)


# ------------------------------------------------------------------------------------ end to end


def _stage2_base(base: Path) -> None:
    """The ablation's base as `prepare_base` leaves it, without training: the quickstart's dataset and
    tokenizer, random dense models as the stage-1 / stage-2 checkpoints (trainer layout, ``latest``)
    and a stage-2 ``metrics.jsonl`` of made-up losses. Stages 1-2 themselves are the quickstart's;
    here they are skipped as already done."""
    from cumo_megatron.checkpoint import ours
    from cumo_megatron.data.tokenizer import load_tokenizer
    from cumo_megatron.models.cumo import build_model
    from cumo_megatron.quickstart import assets
    from cumo_megatron.training.pointers import iteration_dir, write_latest

    files = assets.make_shapes_dataset(base / "data", SETTINGS.n_train, SETTINGS.n_eval, 28, SETTINGS.seed)
    tok = assets.train_tokenizer(base / "tokenizer", assets.dataset_corpus(), vocab_size=VOCAB)
    vocab = load_tokenizer(tok).vocab_size
    (base / "assets.json").write_text(json.dumps({
        "data": str(base / "data"), "tokenizer": str(tok), "vocab_size": vocab, "clip": "", "llm": "",
        "files": {k: str(v) for k, v in files.items()}}))
    (base / "ckpt" / "init").mkdir(parents=True)
    cfg = load_config(ExperimentConfig, quickstart.CONFIGS / "stage2.yaml", [f"model.language.vocab_size={vocab}"])
    platform.seed_everything(4)
    model = build_model(cfg.model, ParallelConfig())
    for stage in ("stage1", "stage2"):
        ours.save_model_checkpoint(model, cfg.model, iteration_dir(base / "ckpt" / stage, 1))
        write_latest(base / "ckpt" / stage, 1)
    rows = [{"step": i, "loss": 3.0 / i, "lm_loss": 3.0 / i, "expert_load": {}} for i in range(1, 5)]
    (base / "ckpt" / "stage2" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    _stage2_base(out / "base")
    rows = ablate.run_ablation(out, ["upcycled_aux", "stage2_start"], SETTINGS, progress=False)
    return out, rows


def _accuracy(answers: Path, eval_json: Path) -> float:
    given = {}
    for line in answers.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            given[str(row["id"])] = row["text"]
    records = json.loads(eval_json.read_text())
    first_word = lambda text: (re.findall(r"[a-z]+", text.lower()) or [""])[0]  # noqa: E731
    hits = [first_word(given.get(r["id"], "")) == first_word(r["conversations"][1]["value"]) for r in records]
    return sum(hits) / len(hits)


def test_end_to_end_table_matches_the_runs(ablation):
    out, rows = ablation
    assert [r["variant"] for r in rows] == ["stage2_start", "upcycled_aux"]
    info = json.loads((out / "base" / "assets.json").read_text())
    for row in rows:
        vdir = out / "variants" / row["variant"]
        expected_accuracy = _accuracy(vdir / "answers.jsonl", Path(info["files"]["eval.json"]))
        assert row["accuracy"] == pytest.approx(expected_accuracy, abs=1e-12)
        assert row["n"] == 2 * SETTINGS.n_eval
        metrics = [m for m in (json.loads(x) for x in (vdir / "ckpt" / "stage3" / "metrics.jsonl").read_text().splitlines()
                               if x) if is_training_row(m)]  # not the validation and checkpoint rows
        last = metrics[-SETTINGS.last_steps:]
        assert row["final_lm_loss"] == pytest.approx(np.mean([m["lm_loss"] for m in last]), rel=1e-12)
        if row["variant"] == "stage2_start":  # the stage-2 checkpoint, scored without any stage 3
            assert (vdir / "ckpt" / "stage3").resolve() == (out / "base" / "ckpt" / "stage2").resolve()
            assert not (vdir / "logs" / "stage3.log").exists()
            assert row["final_lm_loss"] == pytest.approx((3.0 / 3 + 3.0 / 4) / 2, rel=1e-12)
            assert row["vision_maxvio"] is None and row["connector_maxvio"] is None
            continue
        assert [m["step"] for m in metrics] == list(range(1, SETTINGS.steps + 1))
        run_cfg = load_config(ExperimentConfig, vdir / "ckpt" / "stage3" / "config.yaml")
        assert (run_cfg.seed, run_cfg.train.train_steps, run_cfg.train.stage) == (SETTINGS.seed, SETTINGS.steps, 3)
        assert run_cfg.model.vision.moe.num_experts == run_cfg.model.connector.moe.num_experts == 4
        expected = {}
        for layer in last[0]["expert_load"]:
            counts = np.sum([m["expert_load"][layer] for m in last], axis=0).astype(float)
            expected.setdefault(layer.split(".")[0], []).append(counts.max() / counts.mean())
        assert len(expected["vision"]) == 2  # the quickstart's ViT: 3 layers, 2 built
        assert row["vision_maxvio"] == pytest.approx(np.mean(expected["vision"]), rel=1e-12)
        assert row["connector_maxvio"] == pytest.approx(expected["connector"][0], rel=1e-12)
        assert 1.0 <= row["connector_maxvio"] <= 4.0

    table = json.loads((out / "table.json").read_text())
    assert table["rows"] == rows and table["settings"]["steps"] == SETTINGS.steps
    with (out / "table.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["variant"] for r in csv_rows] == ["stage2_start", "upcycled_aux"]
    for parsed, row in zip(csv_rows, rows):
        assert float(parsed["accuracy"]) == pytest.approx(row["accuracy"], rel=1e-12)
        assert float(parsed["final_lm_loss"]) == pytest.approx(row["final_lm_loss"], rel=1e-12)
        assert parsed["vision_maxvio"] == ("" if row["vision_maxvio"] is None else str(row["vision_maxvio"]))
    markdown = (out / "table.md").read_text()
    assert sum(line.startswith("| ") for line in markdown.splitlines()) == 1 + len(rows)  # header + a line per variant
    assert f"| upcycled_aux | {ablate.REFERENCE.label} | {rows[1]['accuracy']:.3f}" in markdown


def test_rerun_skips_finished_variants_and_steps(ablation, monkeypatch):
    out, rows = ablation
    result = out / "variants" / "stage2_start" / ablate.RESULT
    before = result.read_text()

    def no_subprocess(name, cmd, log_path):
        raise AssertionError(f"re-run started step {name}")

    monkeypatch.setattr(quickstart, "run_step", no_subprocess)
    assert ablate.run_ablation(out, ["stage2_start", "upcycled_aux"], SETTINGS, progress=False) == rows
    assert result.read_text() == before
    # A variant whose result was lost: its finished quickstart steps are skipped, it is scored again.
    result.unlink()
    again = ablate.run_ablation(out, ["stage2_start"], SETTINGS, progress=False)
    timeless = lambda r: {k: v for k, v in r.items() if k != "wall_time_s"}  # noqa: E731
    assert [timeless(r) for r in again] == [timeless(rows[0])]
    assert json.loads(result.read_text())["eval"] == json.loads(before)["eval"]
    with pytest.raises(ValueError, match="other settings"):
        ablate.run_ablation(out, ["stage2_start"], dataclasses.replace(SETTINGS, steps=4), progress=False)


def test_tool_prints_the_table_and_a_json_last_line(ablation):
    out, rows = ablation
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--out", str(out), "--variants", "stage2_start,upcycled_aux", "--quiet",
         "--steps", str(SETTINGS.steps), "--seed", str(SETTINGS.seed), "--stage2-steps", str(SETTINGS.stage2_steps),
         "--n-train", str(SETTINGS.n_train), "--n-eval", str(SETTINGS.n_eval), "--last-steps", "1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    last = json.loads(lines[-1])
    assert [r["variant"] for r in last["rows"]] == ["stage2_start", "upcycled_aux"]
    assert [r["accuracy"] for r in last["rows"]] == [r["accuracy"] for r in rows]
    # --last-steps is analysis only: the same runs, re-read over the last step alone.
    metrics = [m for m in (json.loads(x) for x in (out / "variants" / "upcycled_aux" / "ckpt" / "stage3" / "metrics.jsonl")
                           .read_text().splitlines() if x) if is_training_row(m)]
    assert last["rows"][1]["final_lm_loss"] == pytest.approx(metrics[-1]["lm_loss"], rel=1e-12)
    assert lines[0].startswith("| variant |")
    bad = subprocess.run([sys.executable, str(TOOL), "--out", str(out), "--variants", "nope", "--quiet"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "unknown variant" in bad.stderr
    assert math.isfinite(last["rows"][0]["final_lm_loss"])
