"""The scaling sweep (cumo_megatron.research.sweep, tools/scaling_sweep.py): grid validation, cell
planning, sharding and resume, and a real tiny sweep (2 tiny CLIPs x 3 data sizes x 1 tiny LLaMA on
CPU) whose numbers are checked against independent re-computations."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cumo_megatron.research import sweep
from cumo_megatron.research.results_csv import SweepRow, append_row, read_rows

ROOT = Path(__file__).resolve().parents[2]
TINY_GRID = ROOT / "examples" / "configs" / "scaling" / "tiny_cpu.yaml"
REAL_GRID = ROOT / "examples" / "configs" / "scaling" / "clip_vicuna.yaml"


def _tiny_raw() -> dict:
    return yaml.safe_load(TINY_GRID.read_text())


def _write_grid(directory: Path, raw: dict, name: str = "grid.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _row(cell: sweep.Cell, loss: float = 1.0) -> SweepRow:
    return SweepRow(cell.vision.name, 10, cell.llm.name, 20, cell.data_size, loss, 1.0, 0.1)


# ------------------------------------------------------------------------------------------------
# Grid validation, planning, sharding (no training)
# ------------------------------------------------------------------------------------------------


_DROP = object()  # `_set` value: delete the key


def _set(raw: dict, dotted: str, value) -> dict:
    """``raw`` with the value at ``dotted`` (list indices as digits) replaced, or deleted."""
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DROP:
        del node[parts[-1]]
    elif isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return raw


# (key, bad value, what the error must say after "<grid file>: ")
BAD_GRIDS = [
    ("vision.0.path", "/nonexistent/clip", r"vision\[0\]: give exactly one of `size`"),
    ("vision.1.size.num_heads", 5, r"vision\[1\]\.size: hidden_size=64 is not divisible by num_heads=5"),
    ("vision.1.name", "vit-w32-d2", r"vision: duplicate name\(s\) \['vit-w32-d2'\]"),
    ("vision.0.size.depth", 3, r"vision\[0\]\.size: unknown key\(s\) \['depth'\]"),
    ("llm", [], r"llm: expected a non-empty list"),
    ("data_sizes", [32, 0], r"data_sizes\[1\]: expected an integer >= 1, got 0"),
    ("data.eval_size", _DROP, r"data: no held-out set"),
    ("train.stage", 2, r"train: \['stage'\] are set by the sweep"),
    ("train.global_batch_size", "many", r"train: .*global_batch_size"),
    ("launch.mode", "slurm", r"launch\.mode: 'slurm' is unknown"),
    ("datasizes", [1], r"top level: unknown key\(s\) \['datasizes'\]"),
]


@pytest.mark.parametrize("key,value,message", BAD_GRIDS, ids=[b[0] for b in BAD_GRIDS])
def test_grid_validation_names_file_key_and_fix(tmp_path, key, value, message):
    path = _write_grid(tmp_path, _set(_tiny_raw(), key, value))
    with pytest.raises(sweep.GridError, match=message) as err:
        sweep.load_grid(path)
    assert str(err.value).startswith(f"{path}: ")


def test_missing_checkpoint_path_is_reported(tmp_path):
    raw = _tiny_raw()
    raw["llm"].append({"name": "vicuna", "path": "ckpt/vicuna-7b"})
    path = _write_grid(tmp_path, raw)
    missing = re.escape(str(tmp_path.resolve() / "ckpt" / "vicuna-7b"))
    with pytest.raises(sweep.GridError, match=rf"llm\[1\]\.path: {missing} does not exist"):
        sweep.load_grid(path)


def test_real_checkpoint_example_is_a_valid_grid(tmp_path):
    """examples/configs/scaling/clip_vicuna.yaml parses once its paths exist (placeholders here)."""
    raw = yaml.safe_load(REAL_GRID.read_text())
    for entry in raw["vision"] + raw["llm"]:
        entry["path"] = str(tmp_path / entry["name"])
        (tmp_path / entry["name"]).mkdir()
    for key in ("train", "image_folder"):
        raw["data"][key] = str(tmp_path / key)
        (tmp_path / key).touch()
    grid = sweep.load_grid(_write_grid(tmp_path, raw))
    assert [m.name for m in grid.vision] == ["clip-vit-b16", "clip-vit-l14"]
    assert [m.name for m in grid.llm] == ["vicuna-7b", "vicuna-13b"]
    assert len(sweep.plan_cells(grid)) == 2 * 4 * 2
    assert grid.steps(1_000_000) == math.ceil(1_000_000 / 256)
    assert grid.launch_command == ("torchrun", "--nproc_per_node", "8")
    assert grid.train["lr"] == 1e-3 and grid.train["distributed_optimizer"] is True


def _file_grid(tmp_path: Path, seed: int, sizes: list[int]) -> sweep.Grid:
    records = [{"id": f"r{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": f"caption {i}"}]} for i in range(20)]
    (tmp_path / "pool.json").write_text(json.dumps(records))
    for name in ("clip", "llm"):
        (tmp_path / name).mkdir(exist_ok=True)
    raw = {"seed": seed, "data_sizes": sizes, "data": {"train": "pool.json", "image_folder": ".", "eval_size": 4},
           "vision": [{"path": "clip"}], "llm": [{"path": "llm"}]}
    return sweep.load_grid(_write_grid(tmp_path, raw, f"grid{seed}.yaml"))


def test_caption_file_is_split_into_held_out_and_nested_subsets(tmp_path):
    def split(seed, out):
        data = sweep.prepare_data(_file_grid(tmp_path, seed, [4, 8, 16]), tmp_path / out)
        read = lambda path: [r["id"] for r in json.loads(Path(path).read_text())]  # noqa: E731
        return read(data.eval), [read(data.train[d]) for d in (4, 8, 16)]

    held_out, (small, mid, big) = split(0, "a")
    assert len(held_out) == 4 and [len(small), len(mid), len(big)] == [4, 8, 16]
    assert mid[:4] == small and big[:8] == mid
    assert not set(held_out) & set(big) and len(set(big)) == 16
    assert split(0, "b") == (held_out, [small, mid, big])  # deterministic from the seed
    assert split(1, "c")[0] != held_out
    with pytest.raises(sweep.GridError, match=r"the largest size 17 exceeds the 16 training records of .*pool\.json"):
        sweep.prepare_data(_file_grid(tmp_path, 0, [17]), tmp_path / "d")


def test_shards_partition_the_cells():
    cells = sweep.plan_cells(sweep.load_grid(TINY_GRID))
    assert len({c.key for c in cells}) == len(cells) == 6
    for count in (1, 2, 4, 7):
        shards = [sweep.shard_cells(cells, i, count) for i in range(count)]
        assert sorted(c.name for s in shards for c in s) == sorted(c.name for c in cells)
        for i, shard in enumerate(shards):
            assert [cells.index(c) for c in shard] == list(range(i, len(cells), count))
    assert sweep.parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "1", "-1/2", "a/b"):
        with pytest.raises(ValueError, match="expected i/n with 0 <= i < n"):
            sweep.parse_shard(bad)


def test_resume_with_every_cell_done_does_nothing(tmp_path):
    """A finished sweep re-run through the CLI: no data, model, conversion or training at all."""
    out = tmp_path / "out"
    grid = sweep.load_grid(TINY_GRID)
    for cell in sweep.plan_cells(grid):
        append_row(out / "results.csv", _row(cell))
    before = (out / "results.csv").read_bytes()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "scaling_sweep.py"), "--grid", str(TINY_GRID), "--out", str(out), "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "6 cells, 6 already done, 0 finished, 0 failed" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["grid.yaml", "results.csv"]
    assert (out / "results.csv").read_bytes() == before


def test_resume_runs_missing_cells_and_survives_a_failed_one(tmp_path, monkeypatch):
    """Orchestration only (cells faked): done cells skipped, a failure reported with its log, the rest run."""
    grid = sweep.load_grid(TINY_GRID)
    cells = sweep.plan_cells(grid)
    out = tmp_path / "out"
    for cell in cells[:2]:
        append_row(out / "results.csv", _row(cell))
    ran, crashed = [], []

    def fake_cell(grid_, cell, out_, data):
        ran.append(cell.name)
        if cell == cells[3] and not crashed:
            crashed.append(cell.name)
            raise sweep.StepFailed("trainer exited 3", out_ / "cells" / cell.name / "train.log")
        return _row(cell, loss=2.0)

    monkeypatch.setattr(sweep, "prepare_data", lambda grid_, out_: None)
    monkeypatch.setattr(sweep, "_prepare_starts", lambda *args: {})
    monkeypatch.setattr(sweep, "run_cell", fake_cell)
    report = sweep.run_sweep(grid, out, progress=False)
    assert ran == [c.name for c in cells[2:]]
    assert report.skipped == 2 and report.finished == [c.name for c in cells[2:] if c is not cells[3]]
    assert [(f.cell, f.log) for f in report.failed] == [(cells[3].name, str(out / "cells" / cells[3].name / "train.log"))]
    assert "trainer exited 3" in report.failed[0].error
    assert {r.cell for r in read_rows(out / "results.csv")} == {c.key for c in cells if c is not cells[3]}
    ran.clear()
    again = sweep.run_sweep(grid, out, progress=False)  # the crashed cell, and only it, runs again
    assert ran == [cells[3].name] and again.ok and again.skipped == 5
    assert len(read_rows(out / "results.csv")) == 6


def test_a_different_grid_in_the_same_out_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "out"
    grid = sweep.load_grid(TINY_GRID)
    for cell in sweep.plan_cells(grid):
        append_row(out / "results.csv", _row(cell))
    sweep.run_sweep(grid, out, progress=False)
    resolved = yaml.safe_load((out / "grid.yaml").read_text())
    assert resolved["cells"] == [c.name for c in sweep.plan_cells(grid)]
    assert resolved["steps"] == {32: 2, 96: 6, 288: 18}  # ceil(2 epochs * N / 32)
    changed = _tiny_raw()
    changed["train"]["lr"] = 1e-2
    with pytest.raises(sweep.GridError, match=r"grid\.yaml holds a different grid \(differs in \['train'\]\)"):
        sweep.run_sweep(sweep.load_grid(_write_grid(tmp_path, changed)), out, progress=False)


def test_subprocess_launch_failure_names_its_log(tmp_path):
    grid = sweep.load_grid(TINY_GRID)
    grid = dataclasses.replace(grid, launch_mode="subprocess")
    log = tmp_path / "cell" / "eval.log"
    with pytest.raises(sweep.StepFailed, match=rf"step eval x failed \(exit 1\); log {re.escape(str(log))}") as err:
        sweep._launch(grid, "eval x", "cumo_megatron.research.eval_loss", ["--run", str(tmp_path / "none")], log)
    assert err.value.log == log
    text = log.read_text()
    assert "-m cumo_megatron.research.eval_loss --run" in text.splitlines()[0]
    assert "is not a training output directory" in text


# ------------------------------------------------------------------------------------------------
# A real tiny sweep, run as two shards into one directory
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    grid = sweep.load_grid(TINY_GRID)
    reports = [sweep.run_sweep(grid, out, shard=(i, 2), progress=False) for i in range(2)]
    for report in reports:
        assert report.ok, [(f.cell, f.log, f.error[-2000:]) for f in report.failed]
    rows = {row.cell: row for row in read_rows(out / "results.csv")}
    return grid, out, rows, reports


def _hf_params(path: Path, vision: bool) -> int:
    from transformers import CLIPVisionModel, LlamaForCausalLM

    if not vision:
        return sum(p.numel() for p in LlamaForCausalLM.from_pretrained(path).parameters())
    clip = CLIPVisionModel.from_pretrained(path)
    tower = getattr(clip, "vision_model", clip)  # transformers 4 wraps the tower, 5 does not
    # The features come from the penultimate layer: its last layer and post-LayerNorm are not built.
    unused = list(tower.encoder.layers[-1].parameters()) + list(tower.post_layernorm.parameters())
    return sum(p.numel() for p in clip.parameters()) - sum(p.numel() for p in unused)


def test_tiny_sweep_writes_one_finite_row_per_cell(tiny_sweep):
    grid, out, rows, reports = tiny_sweep
    assert [len(r.finished) for r in reports] == [3, 3]
    assert set(rows) == {c.key for c in sweep.plan_cells(grid)} and len(read_rows(out / "results.csv")) == 6
    for row in rows.values():
        assert math.isfinite(row.final_eval_loss) and row.final_eval_loss > 0
        assert row.wall_time_s > 0
        assert row.vision_params == _hf_params(out / "assets" / "vision" / row.vision, vision=True)
        assert row.llm_params == _hf_params(out / "assets" / "llm" / row.llm, vision=False)
        cell = out / "cells" / f"{row.vision}__{row.llm}__d{row.data_size}"
        assert (cell / "config.yaml").is_file() and (cell / "train.log").is_file() and (cell / "eval.log").is_file()


def test_eval_loss_falls_with_data_size_for_each_encoder(tiny_sweep):
    grid, _, rows, _ = tiny_sweep
    for vision in grid.vision:
        losses = [rows[(vision.name, grid.llm[0].name, d)].final_eval_loss for d in grid.data_sizes]
        assert losses[-1] < losses[0], (vision.name, losses)
        assert losses == sorted(losses, reverse=True), (vision.name, losses)


def _metrics(out: Path, cell: tuple, split: str = "train") -> list[dict]:
    """The cell's training rows (``split="validation"``: its validation rows)."""
    path = out / "cells" / f"{cell[0]}__{cell[1]}__d{cell[2]}" / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split", "train") == split]


def test_trainer_validation_agrees_with_the_held_out_loss(tiny_sweep):
    """The trainer's own validation after the last step (forward-only through megatron's schedule)
    and `research.eval_loss` (the checkpoint reloaded, a plain forward) measure the same held-out set."""
    _, out, rows, _ = tiny_sweep
    for cell, row in rows.items():
        (validation,) = _metrics(out, cell, "validation")
        assert validation["step"] == _metrics(out, cell)[-1]["step"]
        assert validation["lm_loss"] == pytest.approx(row.final_eval_loss, rel=1e-5), cell


def test_cells_run_a_cosine_schedule_sized_to_their_data(tiny_sweep):
    grid, out, rows, _ = tiny_sweep
    lr, warmup_fraction = grid.train["lr"], grid.train["warmup_fraction"]
    for cell in rows:
        steps = math.ceil(grid.train["epochs"] * cell[2] / grid.train["global_batch_size"])
        metrics = _metrics(out, cell)
        assert [m["step"] for m in metrics] == list(range(1, steps + 1))
        warmup = math.ceil(warmup_fraction * steps)
        for m in metrics:  # the lr a step used: linear warm-up, then cosine to 0 at the run's own end
            done = m["step"] - 1
            expected = lr * done / warmup if done <= warmup else (
                0.5 * lr * (1 + math.cos(math.pi * (done - warmup) / (steps - warmup))))
            assert m["lr"] == pytest.approx(expected, rel=1e-6, abs=1e-12), (cell, m["step"])


def test_compute_flops_count_the_tokens_of_the_run(tiny_sweep):
    """2 N_vit D_img + 6 N_llm (D_img + D_txt), tokens re-derived from the samples each cell consumed."""
    from cumo_megatron.data.templates import tokenize_conversation
    from cumo_megatron.data.tokenizer import load_tokenizer

    grid, out, rows, _ = tiny_sweep
    tokenizer = load_tokenizer(out / "assets" / "tokenizer" / "tokenizer.model")
    tokens_per_image = (28 // 14) ** 2
    for cell, row in rows.items():
        records = json.loads((out / "data" / f"train_{cell[2]}.json").read_text())
        assert len(records) == cell[2]
        lengths = {len(tokenize_conversation("plain", r["conversations"], tokenizer, tokens_per_image, None,
                                             has_image=True).input_ids) for r in records}
        batch = grid.train["global_batch_size"]
        samples = math.ceil(grid.train["epochs"] * cell[2] / batch) * batch  # every step is a full global batch
        d_img = samples * tokens_per_image
        # Micro-batches are right-padded to their longest sample: text tokens lie in this range.
        low, high = samples * min(lengths) - d_img, samples * max(lengths) - d_img
        flops = lambda d_txt: 2 * row.vision_params * d_img + 6 * row.llm_params * (d_img + d_txt)  # noqa: E731
        assert flops(low) * (1 - 1e-12) <= row.compute_flops <= flops(high) * (1 + 1e-12), cell


def test_held_out_set_is_shared_disjoint_and_subsets_nested(tiny_sweep):
    from cumo_megatron.config.loader import load_config
    from cumo_megatron.config.schema import ExperimentConfig

    grid, out, rows, _ = tiny_sweep
    eval_file = str(out / "data" / "eval.json")
    held_out = json.loads(Path(eval_file).read_text())
    assert len(held_out) == grid.data.eval_size
    # CLIP pre-training saw the generated training split only (stage1_captions.json).
    seen = {r["image"] for r in json.loads((out / "assets" / "shapes" / "stage1_captions.json").read_text())}
    assert not seen & {r["image"] for r in held_out}
    subsets = [json.loads((out / "data" / f"train_{d}.json").read_text()) for d in grid.data_sizes]
    for small, big in zip(subsets, subsets[1:]):
        assert big[: len(small)] == small
    tokens = set()
    for cell in rows:
        cell_dir = out / "cells" / f"{cell[0]}__{cell[1]}__d{cell[2]}"
        cfg = load_config(ExperimentConfig, cell_dir / "config.yaml")
        assert cfg.data.eval_files == [eval_file] and cfg.data.files == [str(out / "data" / f"train_{cell[2]}.json")]
        assert cfg.train.stage == 1 and cfg.model.vision.moe is None and cfg.model.connector.moe is None
        result = json.loads((cell_dir / "eval.json").read_text())
        assert result["samples"] == len(held_out) and result["skipped"] == 0
        tokens.add(result["tokens"])
    assert len(tokens) == 1


def test_eval_loss_matches_an_independent_recomputation(tiny_sweep):
    """Per-sample logits -> cross entropy on the supervised tokens, pooled over the whole held-out set."""
    import torch

    import cumo_megatron.platform as platform
    from cumo_megatron.config.loader import load_config
    from cumo_megatron.config.schema import ExperimentConfig, ParallelConfig
    from cumo_megatron.models.cumo import build_model
    from cumo_megatron.research.eval_loss import heldout_dataset
    from cumo_megatron.training.checkpointing import load_weights

    grid, out, rows, _ = tiny_sweep
    cell = (grid.vision[1].name, grid.llm[0].name, grid.data_sizes[-1])
    run = out / "cells" / f"{cell[0]}__{cell[1]}__d{cell[2]}" / "run"
    cfg = load_config(ExperimentConfig, run / "config.yaml")
    platform.initialize(platform.ParallelSizes(), seed=0)
    try:
        model = build_model(cfg.model, ParallelConfig()).eval()
        load_weights(model, run, cfg.model, ParallelConfig())
        dataset = heldout_dataset(cfg, cfg.data.eval_files)
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(len(dataset)):
                sample = dataset[i]
                logits = model(input_ids=sample.input_ids[None], images=sample.images)[0].double()
                mask = sample.loss_mask.bool()
                nll = torch.nn.functional.cross_entropy(logits[mask], sample.labels[mask], reduction="sum")
                total, count = total + float(nll), count + int(mask.sum())
    finally:
        platform.destroy()
    assert rows[cell].final_eval_loss == pytest.approx(total / count, rel=1e-5)
