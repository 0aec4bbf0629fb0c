"""Orchestrates the quickstart; every heavy step runs as its own subprocess, as a user would run it.

Steps (each prints one progress line and its wall time; outputs under ``OUT``):

1. ``assets``: shapes dataset (``OUT/data``), tokenizer (``OUT/tokenizer``), tiny HF CLIP (pre-trained
   on the training images) / LLaMA (``OUT/hf``), the JSON files validated with `cumo_megatron.data.validate.validate_sources`;
2. ``convert``: ``tools/upcycle_checkpoint.py --vision --language`` -> ``OUT/ckpt/init``;
3. ``stage1`` / ``stage2``: ``python -m cumo_megatron.train`` with ``examples/configs/quickstart``;
4. ``upcycle``: ``tools/upcycle_checkpoint.py --from-checkpoint`` on stage 2's newest checkpoint
   (4 experts, top-2) -> ``OUT/ckpt/stage3-init``;
5. ``stage3``: the MoE stage;
6. ``generate``: ``python -m cumo_megatron.generate --batch OUT/data/eval.json`` -> ``OUT/answers.jsonl``;
7. ``evaluate``: ``OUT/eval.json`` (exact-match accuracy, chance level) and ``OUT/expert_load.png``;
8. ``benchmarks`` (assets with benchmark turns, as the quickstart builds them): ``tools/evaluate.py
   suite`` on the held-out images' POPE-style yes/no split and
   ScienceQA-style multiple-choice split (``OUT/eval_suite.yaml``) -> ``OUT/benchmarks/results.md``
   and ``results.json`` (the CuMo paper's table layout), printed.

A step whose output already exists is skipped, so an interrupted quickstart continues where it
stopped (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "configs" / "quickstart"


def _step(name: str, message: str):
    print(f"[quickstart] {name}: {message}", flush=True)


def run_step(name: str, cmd: list[str], log_path: Path) -> None:
    """Run ``cmd`` (output to ``log_path``); raise with the log's tail when it fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(max(1, min(4, os.cpu_count() or 1))))
    with log_path.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"step {name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")


def build_assets(out: Path, n_train: int, n_eval: int, seed: int, benchmark_turns: bool = False) -> dict:
    """Dataset, tokenizer and tiny HF models under ``out``; returns paths and the vocabulary size.
    ``benchmark_turns``: the training conversations also ask yes/no and multiple-choice questions
    (the quickstart's own run; the research tools call this without)."""
    from cumo_megatron.data.records import DataSource
    from cumo_megatron.data.templates import get_template
    from cumo_megatron.data.tokenizer import load_tokenizer
    from cumo_megatron.data.validate import TokenizerCheck, validate_sources
    from cumo_megatron.quickstart import assets

    data = out / "data"
    files = assets.make_shapes_dataset(data, n_train, n_eval, assets.TINY["image_size"], seed,
                                       benchmark_turns=benchmark_turns)
    tok_path = assets.train_tokenizer(out / "tokenizer", assets.dataset_corpus(benchmark_turns=benchmark_turns),
                                      vocab_size=512)
    tokenizer = load_tokenizer(tok_path)
    tokens_per_image = (assets.TINY["image_size"] // assets.TINY["patch_size"]) ** 2
    for fname, template in (("stage1_captions.json", "plain"), ("stage2.json", "vicuna_v1"),
                            ("stage3.json", "vicuna_v1"), ("eval.json", "vicuna_v1"),
                            ("mc/llava_test_CQM-A.json", "vicuna_v1")):
        check = TokenizerCheck(tokenizer, get_template(template), 128, tokens_per_image)
        report = validate_sources([DataSource(str(files[fname]))], str(data), check)
        if not report.ok:
            raise RuntimeError(f"generated {files[fname]} is invalid:\n{report.format()}")
    models = assets.make_tiny_models(out / "hf", tokenizer.vocab_size, seed, dataset_dir=data)
    _step("assets", f"tiny CLIP pre-trained on the training images: accuracy {models['clip_pretrain_accuracy']:.2f}")
    info = {"data": str(data), "tokenizer": str(tok_path), "vocab_size": tokenizer.vocab_size,
            "clip": str(models["clip"]), "llm": str(models["llm"]), "files": {k: str(v) for k, v in files.items()},
            "benchmark_turns": benchmark_turns}
    (out / "assets.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def train_stage(stage: int, out: Path, info: dict, load: Path, data_file: str, extra: Sequence[str]) -> Path:
    """Run training stage ``stage`` (``examples/configs/quickstart/stage<N>.yaml``) on the assets
    ``info`` from ``load`` with ``extra`` overrides; returns its save directory ``out/ckpt/stage<N>``."""
    save = out / "ckpt" / f"stage{stage}"
    cmd = [sys.executable, "-m", "cumo_megatron.train", "--config", str(CONFIGS / f"stage{stage}.yaml"),
           f"model.language.vocab_size={info['vocab_size']}",
           f"data.files=[{info['files'][data_file]}]", f"data.image_folder={info['data']}",
           f"data.tokenizer={info['tokenizer']}", f"train.load={load}", f"train.save={save}", *extra]
    run_step(f"stage{stage}", cmd, out / "logs" / f"stage{stage}.log")
    return save


def _trained_checkpoint(save_dir: Path) -> Path:
    """The newest checkpoint of a training run; the trainer writes each as a model checkpoint,
    which the upcycling tool and generate load as it is."""
    from cumo_megatron.checkpoint import ours
    from cumo_megatron.training.pointers import read_latest

    latest = read_latest(save_dir)
    if latest is None or not ours.is_model_checkpoint(latest):
        raise RuntimeError(
            f"{save_dir} has no checkpoint with a {ours.MODEL_CONFIG} (an unfinished run, or one written by an "
            "older trainer); start the quickstart over with --fresh"
        )
    return latest


STEP_TIMES: dict[str, float] = {}  # seconds per step run in this process (reported in eval.json)


def timed_step(name: str, what: str, done: bool, fn) -> None:
    """Run ``fn()`` as step ``name`` with a progress line and its wall time (kept in `STEP_TIMES`);
    a step already ``done`` is reported and skipped."""
    if done:
        _step(name, f"already done ({what}), skipped")
        return
    _step(name, what + " ...")
    t0 = time.time()
    fn()
    STEP_TIMES[name] = round(time.time() - t0, 1)
    _step(name, f"done in {STEP_TIMES[name]:.0f} s")


def run(out: Path, n_train: int = 1600, n_eval: int = 100, seed: int = 0, fresh: bool = False,
        overrides: Optional[dict] = None, precision: str = "fp32") -> dict:
    """The whole quickstart into ``out``; returns the evaluation summary (also in ``out/eval.json``).

    ``precision`` (fp32, bf16, fp16) is the training dtype of the three stages (megatron's mixed
    precision: fp32 main weights in the optimizer); generation runs in the checkpoint's dtype.
    """
    from cumo_megatron.quickstart.evaluate import evaluate, plot_expert_load

    overrides = {stage: [f"model.precision={precision}", *(overrides or {}).get(stage, ())] for stage in (1, 2, 3)}
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    info_path = out / "assets.json"
    info: dict = {}

    def assets_step():
        info.update(build_assets(out, n_train, n_eval, seed, benchmark_turns=True))

    timed_step("assets", "dataset, tokenizer, tiny CLIP + LLaMA", info_path.exists(), assets_step)
    info.update(json.loads(info_path.read_text()))
    ckpt = out / "ckpt"
    tool = [sys.executable, str(REPO / "tools" / "upcycle_checkpoint.py")]

    init = ckpt / "init"
    timed_step("convert", f"HF checkpoints -> {init}", init.exists(), lambda: run_step(
        "convert", tool + ["--vision", info["clip"], "--language", info["llm"], "--out", str(init), "--quiet"],
        out / "logs" / "convert.log"))

    s1, s2, s3 = ckpt / "stage1", ckpt / "stage2", ckpt / "stage3"
    done = lambda d: (d / "latest").exists()  # noqa: E731
    timed_step("stage1", "connector only, captions (plain)", done(s1),
           lambda: train_stage(1, out, info, init, "stage1_captions.json", overrides.get(1, ())))
    timed_step("stage2", "everything, dense, questions (vicuna_v1)", done(s2),
           lambda: train_stage(2, out, info, s1, "stage2.json", overrides.get(2, ())))
    up = ckpt / "stage3-init"
    timed_step("upcycle", "co-upcycling: CLIP-MoE + MLP-MoE, 4 experts, top-2", up.exists(), lambda: run_step(
        "upcycle", tool + ["--from-checkpoint", str(_trained_checkpoint(s2)), "--vision-experts", "4",
                           "--connector-experts", "4", "--top-k", "2", "--router-seed", str(seed),
                           "--out", str(up), "--quiet"],
        out / "logs" / "upcycle.log"))
    timed_step("stage3", "everything, MoE + aux losses", done(s3),
           lambda: train_stage(3, out, info, up, "stage3.json", overrides.get(3, ())))

    answers = out / "answers.jsonl"
    timed_step("generate", f"held-out questions -> {answers}", answers.exists(), lambda: run_step(
        "generate", [sys.executable, "-m", "cumo_megatron.generate", "--load", str(_trained_checkpoint(s3)),
                     "--batch", info["files"]["eval.json"], "--out", str(answers),
                     "--tokenizer", info["tokenizer"], "--template", "vicuna_v1", "--max-new-tokens", "4"],
        out / "logs" / "generate.log"))

    summary = evaluate(answers, info["files"]["eval.json"])
    summary["wall_time_s"] = round(time.time() - start, 1)  # this invocation (skipped steps excluded)
    summary["step_times_s"] = dict(STEP_TIMES)
    plot = plot_expert_load(s3 / "metrics.jsonl", out / "expert_load.png")
    summary["expert_load_plot"] = str(plot) if plot else None
    _step("evaluate", f"accuracy {summary['accuracy']:.3f} on {summary['n']} held-out questions "
          f"(chance {summary['chance']:.3f}); per type {summary['per_type']}")
    (out / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")  # again below, with the table
    if not info.get("benchmark_turns"):
        # Assets built without the benchmark turns (the research tools' runs through this function)
        # never saw the benchmark questions: their scores would say nothing, so they are not run.
        return summary

    results = out / "benchmarks" / "results.md"
    timed_step("benchmarks", "tools/evaluate.py suite: POPE-style yes/no + multiple-choice splits",
               results.exists(), lambda: run_step(
                   "benchmarks", [sys.executable, str(REPO / "tools" / "evaluate.py"), "suite", "--config",
                                  str(write_suite(out, info, _trained_checkpoint(s3)))],
                   out / "logs" / "benchmarks.log"))
    summary["wall_time_s"] = round(time.time() - start, 1)
    summary["step_times_s"] = dict(STEP_TIMES)
    summary["benchmarks"] = json.loads(results.with_suffix(".json").read_text())
    (out / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")
    _step("benchmarks", f"{results} (and .json); wrote {out / 'eval.json'}\n" + results.read_text())
    return summary


def write_suite(out: Path, info: dict, checkpoint: Path) -> Path:
    """``out/eval_suite.yaml``: the trained model and the held-out benchmark splits (`assets.benchmark_splits`)."""
    import yaml

    data = Path(info["data"])
    suite = {
        "model": {"load": str(checkpoint), "tokenizer": info["tokenizer"], "template": "vicuna_v1",
                  "name": "quickstart (stage 3)"},
        "out": str(out / "benchmarks"),
        # Answers are one word or one letter: 4 new tokens hold the answer and its end.
        "generation": {"batch_size": 8, "max_new_tokens": 4},
        "benchmarks": [
            {"name": "scienceqa", "questions": str(data / "mc" / "llava_test_CQM-A.json"), "images": str(data),
             "annotations": str(data / "mc" / "problems.json")},
            {"name": "pope", "questions": str(data / "pope" / "llava_pope_test.jsonl"), "images": str(data),
             "annotations": str(data / "pope")},
        ],
    }
    path = out / "eval_suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m cumo_megatron.quickstart [OUT] [--fresh]``."""
    p = argparse.ArgumentParser(prog="python -m cumo_megatron.quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default="runs/quickstart", help="output directory (default runs/quickstart)")
    p.add_argument("--fresh", action="store_true", help="delete OUT first instead of continuing")
    p.add_argument("--n-train", type=int, default=1600)
    p.add_argument("--n-eval", type=int, default=100, help="held-out images (2 questions each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="training dtype of the three stages (default fp32)")
    args = p.parse_args(argv)
    try:
        run(Path(args.out).resolve(), args.n_train, args.n_eval, args.seed, args.fresh, precision=args.precision)
    except RuntimeError as exc:
        print(f"[quickstart] FAILED: {exc}", file=sys.stderr)
        return 1
    return 0
