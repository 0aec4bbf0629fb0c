"""Ablations in miniature: matched stage-3 variants of the quickstart from one shared stage-2 checkpoint.

The quickstart (`cumo_megatron.quickstart`) builds a shapes/colours task, trains stages 1-2 and
co-upcycles; here its stage 3 is re-run once per `Variant` (dense, co-upcycled with and without
aux losses, experts from scratch, CLIP-MoE only, MLP-MoE only, top-2 of 8), every variant with the
same data, steps and seeds, and each scored like the quickstart (held-out exact match) plus its
training's final LM loss and expert-load imbalance (MaxVio, `load_metrics.max_violation`). The
shared stage-2 checkpoint itself is scored too (``stage2_start``: what stage 3 starts from).

Layout of ``OUT``::

    config.json              the resolved settings (a re-run with other training settings is refused)
    base/                    assets, stage 1 and the shared stage-2 checkpoint (``base/ckpt/stage2``)
    variants/<name>/         one quickstart directory per variant: links to base's assets and
                             stages 1-2, ``ckpt/stage3-init`` (the dense stage 2, co-upcycled by the
                             trainer on load, or the scratch-expert checkpoint), ``ckpt/stage3``
                             (``metrics.jsonl``), ``answers.jsonl``, ``eval.json``, ``expert_load.png``,
                             ``logs/``, and ``result.json`` once the variant is finished
    table.md, table.csv, table.json

The variants run through the quickstart's own `run`, which skips every step whose output exists:
the links make it skip assets and stages 1-2 and start at stage 3. A finished variant (its
``result.json``) is not run again; an interrupted one continues at its first missing step.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from cumo_megatron.files import write_text_atomic
from cumo_megatron.research.load_metrics import max_violation
from cumo_megatron.training.metrics import is_training_row

PathLike = Union[str, Path]

__all__ = [
    "Variant",
    "VARIANTS",
    "REFERENCE",
    "Settings",
    "select_variants",
    "stage3_overrides",
    "variant_config",
    "is_expert_param",
    "initial_moe_model",
    "write_scratch_init",
    "final_metrics",
    "prepare_base",
    "run_variant",
    "run_ablation",
    "table_rows",
    "format_markdown",
    "write_tables",
]

RESULT = "result.json"
CONFIG = "config.json"
# Experts of the vision tower (megatron's SequentialMLP) and of our MoE connector.
_EXPERT_RE = re.compile(r"^(vision\..*\.mlp\.experts\.local_experts\.\d+\.|connector\.experts\.\d+\.)")


# ------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One stage-3 configuration; everything not named here is the quickstart's stage 3."""

    name: str
    label: str  # what differs from the reference, for the table
    vision_moe: bool = True  # CLIP-MoE in every built ViT layer
    connector_moe: bool = True  # MLP-MoE connector
    num_experts: int = 4
    top_k: int = 2
    aux: bool = True  # balance (0.1) and z-loss (0.01) as in CuMo; False: both 0
    scratch: bool = False  # experts freshly initialised instead of copies of the dense MLPs
    stage3: bool = True  # False: no stage 3 at all, the shared stage-2 checkpoint is scored as it is

    @property
    def dense(self) -> bool:
        """No MoE module at all: stage 3 trains the dense stage-2 model further."""
        return not (self.vision_moe or self.connector_moe)

    def model_overrides(self) -> list[str]:
        """Dotted overrides of the quickstart's stage-3 config that make this variant.

        Every routing field is set explicitly, so the variant does not depend on the YAML's defaults.
        The dense variant runs as ``train.stage=2``: the trainer's stage 3 requires an MoE module,
        and stages 2 and 3 differ only in it (both train every parameter).
        """
        out = ["train.stage=2"] if self.dense else []
        balance, z_loss = (0.1, 0.01) if self.aux else (0.0, 0.0)
        for module, enabled in (("vision", self.vision_moe), ("connector", self.connector_moe)):
            if not enabled:
                out.append(f"model.{module}.moe=null")
                continue
            out += [
                f"model.{module}.moe.num_experts={self.num_experts}",
                f"model.{module}.moe.top_k={self.top_k}",
                f"model.{module}.moe.balance_coeff={balance}",
                f"model.{module}.moe.z_loss_coeff={z_loss}",
            ]
        return out


# The reference is the quickstart's stage 3 (CLIP-MoE + MLP-MoE, top-2 of 4, co-upcycled, aux
# losses); it is also the "top-2 of 4" side of the expert-count comparison.
REFERENCE = Variant("upcycled_aux", "reference: co-upcycled CLIP-MoE + MLP-MoE, top-2 of 4, aux losses")
VARIANTS: tuple[Variant, ...] = (
    Variant("stage2_start", "starting point: the shared stage-2 checkpoint, no stage 3", vision_moe=False,
            connector_moe=False, stage3=False),
    Variant("dense", "no MoE (dense stage 3, same steps)", vision_moe=False, connector_moe=False),
    REFERENCE,
    Variant("upcycled_noaux", "no aux losses (balance and z-loss coefficients 0)", aux=False),
    Variant("scratch_aux", "experts freshly initialised, not upcycled", scratch=True),
    Variant("clip_moe_only", "CLIP-MoE only (dense connector)", connector_moe=False),
    Variant("connector_moe_only", "MLP-MoE connector only (dense ViT)", vision_moe=False),
    Variant("top2_of_8", "top-2 of 8 experts", num_experts=8),
)


def select_variants(names: Optional[Iterable[str]] = None) -> list[Variant]:
    """The variants named (all when ``names`` is None), in the table's order; unknown names raise."""
    if names is None:
        return list(VARIANTS)
    wanted = [n.strip() for n in names if n.strip()]
    known = {v.name for v in VARIANTS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {[v.name for v in VARIANTS]}")
    if not wanted:
        raise ValueError(f"no variant selected; choose from {[v.name for v in VARIANTS]}")
    return [v for v in VARIANTS if v.name in wanted]


@dataclass(frozen=True)
class Settings:
    """What every variant shares. All fields but ``last_steps`` change training."""

    steps: int = 30  # stage-3 steps of every variant
    seed: int = 0  # assets, data order, model init, routers
    stage2_steps: int = 40  # the shared stage 2 (short, so that stage 3 still has something to learn)
    n_train: int = 1600  # training images (the quickstart's default)
    n_eval: int = 50  # held-out images, 2 questions each (generation costs ~0.3 s of CPU per question)
    last_steps: int = 10  # window of the final-loss and MaxVio averages (analysis only)

    def training(self) -> dict:
        """The fields that must match for a finished variant to be reused."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "last_steps"}

    def check(self) -> None:
        """Reject settings no run can have."""
        for name in ("steps", "stage2_steps", "n_train", "n_eval", "last_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"ablation setting {name}={getattr(self, name)} must be >= 1")


def stage3_overrides(variant: Variant, settings: Settings) -> list[str]:
    """Overrides the variant's stage-3 run gets on top of the quickstart's ``stage3.yaml`` ([] without stage 3)."""
    if not variant.stage3:
        return []
    return [f"seed={settings.seed}", f"train.train_steps={settings.steps}", *variant.model_overrides()]


def variant_config(variant: Variant, settings: Settings, vocab_size: int = 512):
    """The resolved `ExperimentConfig` of a variant's stage 3 (without the run's paths); pure."""
    if not variant.stage3:
        raise ValueError(f"variant {variant.name} has no stage 3; it scores the shared stage-2 checkpoint")
    from cumo_megatron.config.loader import load_config
    from cumo_megatron.config.schema import ExperimentConfig
    from cumo_megatron.quickstart.run import CONFIGS

    overrides = [f"model.language.vocab_size={vocab_size}", *stage3_overrides(variant, settings)]
    return load_config(ExperimentConfig, CONFIGS / "stage3.yaml", overrides)


# ------------------------------------------------------------------------------------------------
# Scratch experts (runs in its own process: megatron, a world of one)
# ------------------------------------------------------------------------------------------------


def is_expert_param(name: str) -> bool:
    """Whether a `CuMoModel` parameter belongs to a vision or connector expert (not a router)."""
    return bool(_EXPERT_RE.match(name))


def initial_moe_model(stage2_dir: PathLike, model_cfg, seed: int, experts: str = "copied"):
    """The variant's stage-3 starting model from the dense stage-2 checkpoint ``stage2_dir``.

    ``experts="copied"``: co-upcycled as the trainer does on load (`load_weights`: experts are
    copies of the dense MLPs, routers fresh and seeded by ``seed`` and their names).
    ``experts="scratch"``: the same, then every vision / connector expert tensor is replaced by
    the value a freshly built model draws (the model's own init, seeded by ``seed``); routers and
    every dense weight stay as in the co-upcycled model. Needs megatron's parallel state (a world
    of one). Returns the world-of-one `CuMoModel`.
    """
    import torch

    import cumo_megatron.platform as platform
    from cumo_megatron.config.schema import ParallelConfig
    from cumo_megatron.models.cumo import build_model
    from cumo_megatron.training.checkpointing import load_weights

    if experts not in ("copied", "scratch"):
        raise ValueError(f"experts={experts!r}: choose 'copied' or 'scratch'")
    platform.seed_everything(seed)
    model = build_model(model_cfg, ParallelConfig())
    fresh = {n: p.detach().clone() for n, p in model.named_parameters() if is_expert_param(n)}
    if not fresh:
        raise ValueError("the model config has no vision or connector experts to initialise")
    report = load_weights(model, stage2_dir, model_cfg, ParallelConfig(), seed=seed)
    if not report["upcycled"]:
        raise ValueError(f"{stage2_dir} is not a dense stage-2 checkpoint for this MoE config (nothing was upcycled)")
    if experts == "scratch":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in fresh:
                    param.copy_(fresh[name])
    return model


def write_scratch_init(stage2_dir: PathLike, config_path: PathLike, overrides: Sequence[str], out_dir: PathLike,
                       seed: int) -> Path:
    """Write the scratch-expert starting checkpoint of a variant's stage 3 to ``out_dir`` (atomically).

    The model is the one ``config_path`` + ``overrides`` (the variant's stage-3 config) describes;
    see `initial_moe_model`. Brings up a world of one.
    """
    import cumo_megatron.platform as platform
    from cumo_megatron.checkpoint import ours
    from cumo_megatron.config.loader import load_config
    from cumo_megatron.config.schema import ExperimentConfig

    cfg = load_config(ExperimentConfig, config_path, list(overrides))
    platform.initialize(platform.ParallelSizes(), seed=seed)
    model = initial_moe_model(stage2_dir, cfg.model, seed, experts="scratch")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    ours.save_model_checkpoint(model, cfg.model, tmp, info={
        "kind": "ablation-scratch-experts", "source": str(stage2_dir), "seed": seed,
        "note": "dense weights and routers as co-upcycling gives; vision/connector experts freshly initialised",
    })
    tmp.rename(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------------
# Reading a finished stage 3
# ------------------------------------------------------------------------------------------------


def _metrics_rows(path: Path) -> list[dict]:
    from cumo_megatron.jsonl import read_json_lines

    rows = []
    for line in read_json_lines(path):
        if line.error is not None:
            raise ValueError(
                f"{path} line {line.number} is not JSON ({line.error}); re-run the variant (delete its directory)")
        rows.append(line.value)
    return rows


def final_metrics(metrics_path: PathLike, last_steps: int) -> dict:
    """Final LM / total loss and MaxVio of a stage-3 run, from the last ``last_steps`` rows.

    Losses are the mean of those rows. Expert loads are summed per layer over the same rows (the
    mean load up to a constant, so the same MaxVio), then `max_violation` per layer; a module's
    MaxVio is the mean over its layers (``None`` when the module has no MoE layer).
    """
    path = Path(metrics_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the variant's stage 3 did not finish; re-run the ablation")
    rows = [r for r in _metrics_rows(path) if r.get("lm_loss") is not None and is_training_row(r)]
    if not rows:
        raise ValueError(f"{path} holds no training step; re-run the variant (delete its directory)")
    rows.sort(key=lambda r: r["step"])
    window = rows[-last_steps:]
    layers: dict[str, list[float]] = {}
    for row in window:
        for layer, counts in (row.get("expert_load") or {}).items():
            total = layers.setdefault(layer, [0.0] * len(counts))
            if len(total) != len(counts):
                raise ValueError(f"{path} step {row['step']}: layer {layer} changes its number of experts")
            for e, c in enumerate(counts):
                total[e] += c
    per_layer = {layer: max_violation(counts) for layer, counts in sorted(layers.items())}
    modules: dict[str, list[float]] = {}
    for layer, value in per_layer.items():
        modules.setdefault(layer.split(".")[0], []).append(value)
    return {
        "steps": [window[0]["step"], window[-1]["step"]],
        "final_lm_loss": sum(r["lm_loss"] for r in window) / len(window),
        "final_loss": sum(r["loss"] for r in window) / len(window),
        "maxvio_layers": per_layer,
        "vision_maxvio": _mean(modules.get("vision")),
        "connector_maxvio": _mean(modules.get("connector")),
    }


def _mean(values: Optional[list[float]]) -> Optional[float]:
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------------
# Orchestration (each heavy step is a subprocess, through the quickstart's functions)
# ------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def _check_settings(out: Path, settings: Settings) -> None:
    """Record the training settings in ``out/config.json``; refuse a directory made with others."""
    path = out / CONFIG
    wanted = settings.training()
    if path.is_file():
        recorded = json.loads(path.read_text()).get("settings", {})
        differ = {k: (recorded.get(k), v) for k, v in wanted.items() if recorded.get(k) != v}
        if differ:
            listed = ", ".join(f"{k}: {a} there, {b} now" for k, (a, b) in differ.items())
            raise ValueError(f"{path}: this ablation was run with other settings ({listed}); "
                             "pass the same options, or choose another --out")
    _write_json(path, {"settings": dataclasses.asdict(settings), "variants": [dataclasses.asdict(v) for v in VARIANTS]})


def _base_overrides(settings: Settings) -> dict[int, list[str]]:
    return {1: [f"seed={settings.seed}"], 2: [f"seed={settings.seed}", f"train.train_steps={settings.stage2_steps}"]}


def prepare_base(base: Path, settings: Settings) -> dict:
    """Assets, conversion, stage 1 and the shared stage 2 under ``base`` (each skipped when done).

    The quickstart's steps with the ablation's seed and stage-2 length; returns the assets' info
    (``base/assets.json``).
    """
    from cumo_megatron.quickstart import run as quickstart

    base.mkdir(parents=True, exist_ok=True)
    info_path = base / "assets.json"
    quickstart.timed_step("assets", "dataset, tokenizer, tiny CLIP + LLaMA", info_path.exists(),
                      lambda: quickstart.build_assets(base, settings.n_train, settings.n_eval, settings.seed))
    info = json.loads(info_path.read_text())
    init, s1, s2 = base / "ckpt" / "init", base / "ckpt" / "stage1", base / "ckpt" / "stage2"
    tool = [sys.executable, str(quickstart.REPO / "tools" / "upcycle_checkpoint.py")]
    quickstart.timed_step("convert", f"HF checkpoints -> {init}", init.exists(), lambda: quickstart.run_step(
        "convert", tool + ["--vision", info["clip"], "--language", info["llm"], "--out", str(init), "--quiet"],
        base / "logs" / "convert.log"))
    overrides = _base_overrides(settings)
    quickstart.timed_step("stage1", "connector only, captions (plain)", (s1 / "latest").exists(),
                      lambda: quickstart.train_stage(1, base, info, init, "stage1_captions.json", overrides[1]))
    quickstart.timed_step("stage2", f"shared dense stage 2, {settings.stage2_steps} steps", (s2 / "latest").exists(),
                      lambda: quickstart.train_stage(2, base, info, s1, "stage2.json", overrides[2]))
    return info


def _link(target: Path, link: Path) -> None:
    """A relative symlink ``link`` -> ``target`` (kept when it already points there)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(target, link.parent)
    if link.is_symlink():
        if os.readlink(link) == relative:
            return
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} exists and is not the link to {target}; delete it to re-run this variant")
    link.symlink_to(relative)


def _variant_dir_ready(base: Path, vdir: Path, variant: Variant, settings: Settings, info: dict) -> None:
    """Link base's assets and stages 1-2 into ``vdir`` and provide ``ckpt/stage3-init``."""
    from cumo_megatron.quickstart import run as quickstart

    for rel in ("assets.json", "ckpt/init", "ckpt/stage1", "ckpt/stage2"):
        _link(base / rel, vdir / rel)
    init = vdir / "ckpt" / "stage3-init"
    if not variant.stage3:  # the quickstart finds "stage 3" done and scores the stage-2 checkpoint
        _link(base / "ckpt" / "stage2", init)
        _link(base / "ckpt" / "stage2", vdir / "ckpt" / "stage3")
        return
    if not variant.scratch:
        # The dense stage 2 itself: the trainer co-upcycles it on load into the variant's MoE
        # (routers seeded by the run's seed and their names, as tools/upcycle_checkpoint.py does).
        _link(base / "ckpt" / "stage2", init)
        return
    if init.exists():
        return
    config = quickstart.CONFIGS / "stage3.yaml"
    overrides = [f"model.language.vocab_size={info['vocab_size']}", *stage3_overrides(variant, settings)]
    cmd = [sys.executable, "-m", "cumo_megatron.research.ablate", "scratch-init",
           "--stage2", str(base / "ckpt" / "stage2"), "--config", str(config), "--out", str(init),
           "--seed", str(settings.seed), *overrides]
    quickstart.timed_step(f"scratch init {variant.name}", f"stage 2 with fresh experts -> {init}", False,
                      lambda: quickstart.run_step("scratch-init", cmd, vdir / "logs" / "scratch_init.log"))


def _finished(vdir: Path, variant: Variant, settings: Settings) -> Optional[dict]:
    path = vdir / RESULT
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    same = result.get("settings") == settings.training() and result.get("variant") == dataclasses.asdict(variant)
    return result if same else None


def run_variant(out: Path, variant: Variant, settings: Settings, info: dict) -> dict:
    """Run one variant's stage 3, generation and scoring (skipped when finished); its ``result.json``."""
    from cumo_megatron.quickstart import run as quickstart

    vdir = out / "variants" / variant.name
    done = _finished(vdir, variant, settings)
    if done is not None:
        return done
    if (vdir / RESULT).exists():
        raise ValueError(f"{vdir / RESULT} was written for another variant definition or settings; delete {vdir}")
    start = time.time()
    _variant_dir_ready(out / "base", vdir, variant, settings, info)
    summary = quickstart.run(vdir, settings.n_train, settings.n_eval, settings.seed,
                             overrides={3: stage3_overrides(variant, settings)})
    result = {
        "variant": dataclasses.asdict(variant),
        "settings": settings.training(),
        "overrides": stage3_overrides(variant, settings),
        "eval": {k: summary[k] for k in ("accuracy", "correct", "n", "chance", "per_type", "missing")},
        "wall_time_s": round(time.time() - start, 1),  # this invocation only (a resumed variant: its rest)
    }
    _write_json(vdir / RESULT, result)
    return result


def table_rows(out: Path, variants: Sequence[Variant], settings: Settings) -> list[dict]:
    """One row per finished variant: held-out accuracy (overall and per question type), final
    losses and MaxVio over the last ``settings.last_steps`` steps."""
    rows = []
    for variant in variants:
        vdir = out / "variants" / variant.name
        result = _finished(vdir, variant, settings)
        if result is None:
            continue
        metrics = final_metrics(vdir / "ckpt" / "stage3" / "metrics.jsonl", settings.last_steps)
        ev = result["eval"]
        rows.append({
            "variant": variant.name,
            "label": variant.label,
            "accuracy": ev["accuracy"],
            **{f"accuracy_{k}": v for k, v in sorted(ev["per_type"].items())},
            "correct": ev["correct"],
            "n": ev["n"],
            **{k: metrics[k] for k in ("final_lm_loss", "final_loss", "vision_maxvio", "connector_maxvio")},
            "metrics_steps": metrics["steps"],
            "maxvio_layers": metrics["maxvio_layers"],
            "wall_time_s": result["wall_time_s"],
        })
    return rows


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_markdown(rows: Sequence[dict], settings: Settings) -> str:
    """The table as Markdown (MaxVio: busiest expert / mean load, 1.00 = balanced)."""
    types = sorted({k[len("accuracy_"):] for r in rows for k in r if k.startswith("accuracy_")})
    acc_head = "held-out acc." + (f" ({' / '.join(types)})" if types else "")
    lines = [
        f"| variant | change | {acc_head} | final LM loss | vision MaxVio | connector MaxVio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_type = " / ".join(_fmt(r.get(f"accuracy_{t}"), 2) for t in types)
        acc = f"{r['accuracy']:.3f}" + (f" ({per_type})" if types else "")
        lines.append(f"| {r['variant']} | {r['label']} | {acc} | {_fmt(r['final_lm_loss'], 4)} | "
                     f"{_fmt(r['vision_maxvio'], 2)} | {_fmt(r['connector_maxvio'], 2)} |")
    lines.append("")
    lines.append(f"Stage 3: {settings.steps} steps from one shared stage 2 ({settings.stage2_steps} steps), seed "
                 f"{settings.seed}; held-out questions: {2 * settings.n_eval}. Losses and MaxVio: last "
                 f"{settings.last_steps} steps (MaxVio = busiest expert's tokens / mean, 1.00 = balanced; "
                 "a module's value is the mean over its MoE layers).")
    return "\n".join(lines)


_CSV_FIXED = ("variant", "label", "accuracy")
_CSV_TAIL = ("correct", "n", "final_lm_loss", "final_loss", "vision_maxvio", "connector_maxvio", "wall_time_s")


def write_tables(out: Path, rows: Sequence[dict], settings: Settings) -> dict[str, Path]:
    """``table.md``, ``table.csv`` and ``table.json`` under ``out``; returns their paths."""
    types = sorted({k for r in rows for k in r if k.startswith("accuracy_")})
    columns = [*_CSV_FIXED, *types, *_CSV_TAIL]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    paths = {"md": out / "table.md", "csv": out / "table.csv", "json": out / "table.json"}
    paths["md"].write_text(format_markdown(rows, settings) + "\n")
    paths["csv"].write_text(buf.getvalue())
    _write_json(paths["json"], {"settings": dataclasses.asdict(settings), "rows": list(rows)})
    return paths


def run_ablation(out: PathLike, variant_names: Optional[Iterable[str]] = None, settings: Settings = Settings(),
                 progress: bool = True) -> list[dict]:
    """Run the selected variants (finished ones are skipped) and write the tables; returns the rows.

    The quickstart's progress lines go to stdout; the bar over variants to stderr.
    """
    from tqdm import tqdm

    settings.check()
    variants = select_variants(variant_names)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)
    info = prepare_base(out / "base", settings)
    bar = tqdm(variants, desc="ablation", unit="variant", file=sys.stderr, disable=not progress)
    for variant in bar:
        bar.set_postfix_str(variant.name)
        run_variant(out, variant, settings, info)
    rows = table_rows(out, variants, settings)
    write_tables(out, rows, settings)
    return rows


# ------------------------------------------------------------------------------------------------
# Subprocess entry: python -m cumo_megatron.research.ablate scratch-init ...
# ------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``scratch-init --stage2 DIR --config FILE --out DIR --seed N [key=value ...]`` (`write_scratch_init`)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m cumo_megatron.research.ablate")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scratch-init", help="the stage-2 checkpoint co-upcycled, with freshly initialised experts")
    s.add_argument("--stage2", required=True, help="dense stage-2 checkpoint (trainer save dir or model checkpoint)")
    s.add_argument("--config", required=True, help="the variant's stage-3 YAML")
    s.add_argument("--out", required=True, help="output directory (must not exist)")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    with contextlib.suppress(AttributeError):
        sys.stdout.reconfigure(line_buffering=True)
    print(f"wrote {write_scratch_init(args.stage2, args.config, args.overrides, args.out, args.seed)}")
    return 0


if __name__ == "__main__":  # megatron's checkpoint writer may re-import __main__ in workers
    sys.exit(main())
