"""Scaling sweep of stage-1 connector pre-training: vision encoders x data sizes x LLMs.

Every cell of the grid trains the 2-layer GELU connector from scratch (ViT and LLM frozen: the
project's stage 1) on its own training subset of ``data_size`` samples, with a cosine schedule of
``ceil(epochs * data_size / global_batch_size)`` steps, and is then scored on the held-out set
(`cumo_megatron.research.eval_loss`; the trainer's own validation row at the end measures the
same set). One row per
cell goes to ``OUT/results.csv`` (`cumo_megatron.research.results_csv`).

The grid is a YAML file (`load_grid`; examples in ``examples/configs/scaling/``)::

    seed: 0
    data_sizes: [64, 128, 256]              # training samples per cell
    data:                                    # either the generated shapes dataset ...
      shapes: true
      eval_size: 48                          # held-out images
      # ... or LLaVA caption files: train: FILE, image_folder: DIR, eval: FILE or eval_size: N,
      # tokenizer: FILE_OR_DIR (for LLMs given by size), template: plain
    vision:                                  # a tiny CLIP built here (size) or a checkpoint (path)
      - {name: vit-s, size: {hidden_size: 32, num_layers: 2, num_heads: 2, ffn_hidden_size: 64}}
      - {name: clip-b16, path: /ckpt/clip-vit-base-patch16}
    llm:                                     # a tiny LLaMA built here (size) or a checkpoint (path)
      - {size: {hidden_size: 64, num_layers: 2, num_heads: 4, ffn_hidden_size: 128}}
      - {name: vicuna-7b, path: /ckpt/vicuna-7b-v1.5}
    train: {epochs: 1, global_batch_size: 256, micro_batch_size: 32, lr: 1.0e-3}   # TrainConfig fields
    base_config: stage1.yaml                 # the trainer config every cell starts from (optional)
    overrides: [parallel.tp=2]               # dotted trainer overrides for every cell (optional)
    model_overrides: [precision=bf16]        # converter --set options (optional)
    launch: {mode: subprocess, command: [torchrun, --nproc_per_node, "8"]}
    keep_checkpoints: true

Tiny models stand in for pre-trained ones, so that stage 1 measures something: a tiny CLIP
(``size``: hidden_size, num_layers, num_heads, ffn_hidden_size, image_size=28, patch_size=14,
pretrain_steps=150) learns the shapes dataset's classes first (`assets.pretrain_vision`, as the
quickstart's CLIP), and a tiny LLaMA (hidden_size, num_layers, num_heads, num_kv_heads=num_heads,
ffn_hidden_size, max_position_embeddings=256, pretrain_steps=300) learns to read captions placed
where the image tokens go (`caption_sequences`), as a real LLM reads what it is shown; with
``pretrain_steps: 0`` it stays random. Relative paths are relative to the grid file. Layout of ``OUT``::

    grid.yaml           the resolved grid (absolute paths, defaults, steps per data size, cell names)
    results.csv         one row per finished cell (appended under a lock as each cell finishes)
    data/               train_<N>.json (nested subsets: each is a prefix of the next), eval.json
    assets/             generated dataset, tokenizer, tiny CLIPs / LLaMAs (HF layouts)
    inits/<v>__<l>/     converted start checkpoint of each (vision, llm) pair (fresh seeded connector)
    cells/<cell>/       config.yaml (what the trainer ran), train.log, eval.log, eval.json, run/

Held-out set: the same file for every cell (so every encoder / LLM / data size is scored on the same
samples), drawn deterministically from ``seed``. Cells already in ``results.csv`` are skipped, so a
crashed sweep resumes; ``shard=(i, n)`` runs every n-th cell from the i-th (processes may share
``OUT``: shared assets are built once under file locks). A failed cell is reported with its log and
the sweep goes on. Launch modes: ``subprocess`` (default; the trainer as
``[command] -m cumo_megatron.train``, evaluation and conversion as their own processes) and
``in_process`` (the same entry points called in this process: for tiny CPU grids, where importing
megatron per step would cost more than training; the calling script needs an
``if __name__ == "__main__":`` guard, since megatron's checkpoint writer starts a helper process
that re-imports ``__main__``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import random
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import yaml

from cumo_megatron.files import write_text_atomic
from cumo_megatron.research.results_csv import SweepRow, append_row, compute_flops, read_rows

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BASE_CONFIG = REPO / "examples" / "configs" / "scaling" / "stage1.yaml"
CONVERT_TOOL = REPO / "tools" / "upcycle_checkpoint.py"
LAUNCH_MODES = ("subprocess", "in_process")
# Fields of `TrainConfig` the sweep sets per cell; a grid may not set them.
CELL_TRAIN_KEYS = ("stage", "train_steps", "load", "save")
# Tiny models built by the sweep: accepted size keys and their defaults (None: required).
VISION_SIZE = {"hidden_size": None, "num_layers": None, "num_heads": None, "ffn_hidden_size": None,
               "image_size": 28, "patch_size": 14, "pretrain_steps": 150}
LLM_SIZE = {"hidden_size": None, "num_layers": None, "num_heads": None, "num_kv_heads": None,
            "ffn_hidden_size": None, "max_position_embeddings": 256, "pretrain_steps": 300}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

__all__ = [
    "GridError", "ModelSpec", "DataSpec", "Grid", "load_grid", "parse_grid",
    "Cell", "plan_cells", "parse_shard", "shard_cells", "pending_cells",
    "SweepData", "prepare_data", "build_tiny_clip", "build_tiny_llama",
    "cell_config", "token_counts", "run_cell", "CellFailure", "SweepReport", "run_sweep",
]


class GridError(ValueError):
    """A grid file that cannot be run; the message names the file, the key and what to do."""


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One vision encoder or LLM of the grid: a tiny model built by the sweep, or a checkpoint."""

    role: str  # "vision" or "llm"
    name: str
    size: Optional[dict] = None  # keys of VISION_SIZE / LLM_SIZE, defaults filled
    path: Optional[str] = None  # HF CLIP / OpenCLIP / HF LLaMA-style directory (absolute)
    tokenizer: Optional[str] = None  # LLMs only: tokenizer file or directory (absolute)


@dataclass(frozen=True)
class DataSpec:
    """Where training and held-out samples come from."""

    shapes: bool = False  # generate the quickstart's shapes dataset
    train: Optional[str] = None  # LLaVA caption file (the pool subsets are drawn from)
    image_folder: Optional[str] = None
    eval: Optional[str] = None  # held-out file; else ``eval_size`` records held out of ``train``
    eval_size: Optional[int] = None
    tokenizer: Optional[str] = None  # for LLMs given by size (shapes: generated)
    template: str = "plain"


@dataclass(frozen=True)
class Grid:
    """A parsed, validated grid (see the module docstring for the file format)."""

    source: str  # the grid file
    seed: int
    data: DataSpec
    data_sizes: tuple[int, ...]
    vision: tuple[ModelSpec, ...]
    llm: tuple[ModelSpec, ...]
    train: dict  # `TrainConfig` fields over the base config (resolved: base values included)
    base_config: str
    overrides: tuple[str, ...] = ()
    model_overrides: tuple[str, ...] = ()
    launch_mode: str = "subprocess"
    launch_command: tuple[str, ...] = ()
    keep_checkpoints: bool = True

    def steps(self, data_size: int) -> int:
        """Optimizer steps of a cell: ``ceil(epochs * data_size / global_batch_size)``."""
        return max(1, math.ceil(self.train["epochs"] * data_size / self.train["global_batch_size"]))

    def resolved(self) -> dict:
        """What ``OUT/grid.yaml`` holds: everything that decides the results, plus the cell list."""
        def spec(m: ModelSpec) -> dict:
            return {k: v for k, v in dataclasses.asdict(m).items() if k != "role" and v is not None}

        return {
            "seed": self.seed,
            "data": {k: v for k, v in dataclasses.asdict(self.data).items() if v is not None},
            "data_sizes": list(self.data_sizes),
            "vision": [spec(m) for m in self.vision],
            "llm": [spec(m) for m in self.llm],
            "train": dict(self.train),
            "base_config": self.base_config,
            "overrides": list(self.overrides),
            "model_overrides": list(self.model_overrides),
            "steps": {int(d): self.steps(d) for d in self.data_sizes},
            "cells": [c.name for c in plan_cells(self)],
        }


def _fail(source: str, where: str, message: str) -> GridError:
    return GridError(f"{source}: {where}: {message}")


def _check_keys(source: str, where: str, node: dict, allowed: Sequence[str]) -> None:
    unknown = sorted(set(node) - set(allowed))
    if unknown:
        raise _fail(source, where, f"unknown key(s) {unknown}; allowed: {', '.join(allowed)}")


def _mapping(source: str, where: str, value, required: bool = True) -> dict:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise _fail(source, where, f"expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _int(source: str, where: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(source, where, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _path(source: str, where: str, value, base: Path, must_exist: bool = True) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(source, where, f"expected a path, got {value!r}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else (base / path)
    if must_exist and not path.exists():
        raise _fail(source, where, f"{path} does not exist; fix the path (relative paths are relative to the grid file)")
    return str(path.resolve())


def _strings(source: str, where: str, value) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(source, where, f"expected a list of strings, got {value!r}")
    return tuple(value)


def _parse_size(source: str, where: str, value, role: str) -> dict:
    defaults = VISION_SIZE if role == "vision" else LLM_SIZE
    size = _mapping(source, where, value)
    _check_keys(source, where, size, list(defaults))
    out = {}
    required = [k for k, d in defaults.items() if d is None and k != "num_kv_heads"]
    for key, default in defaults.items():
        if key not in size and key in required:
            raise _fail(source, where, f"missing {key} (a tiny {role} needs {', '.join(required)})")
        raw = size.get(key, default)
        if key == "num_kv_heads" and raw is None:
            raw = size["num_heads"]
        out[key] = _int(source, f"{where}.{key}", raw, minimum=0 if key == "pretrain_steps" else 1)
    if out["hidden_size"] % out["num_heads"]:
        raise _fail(source, where, f"hidden_size={out['hidden_size']} is not divisible by num_heads={out['num_heads']}")
    if role == "vision":
        if out["num_layers"] < 2:
            raise _fail(source, f"{where}.num_layers", "needs >= 2 (features come from the penultimate layer)")
        if out["image_size"] % out["patch_size"]:
            raise _fail(source, where, f"image_size={out['image_size']} is not divisible by patch_size={out['patch_size']}")
    elif out["num_heads"] % out["num_kv_heads"]:
        raise _fail(source, where, f"num_heads={out['num_heads']} is not divisible by num_kv_heads={out['num_kv_heads']}")
    return out


def _parse_models(source: str, role: str, value, base: Path) -> tuple[ModelSpec, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(source, role, f"expected a non-empty list of {{size: ...}} or {{path: ...}} entries, got {value!r}")
    allowed = ["name", "size", "path"] + (["tokenizer"] if role == "llm" else [])
    specs = []
    for i, entry in enumerate(value):
        where = f"{role}[{i}]"
        entry = _mapping(source, where, entry)
        _check_keys(source, where, entry, allowed)
        if ("size" in entry) == ("path" in entry):
            raise _fail(source, where, "give exactly one of `size` (a tiny model built by the sweep) "
                                       "or `path` (a checkpoint directory)")
        size = _parse_size(source, f"{where}.size", entry["size"], role) if "size" in entry else None
        path = _path(source, f"{where}.path", entry["path"], base) if "path" in entry else None
        if "name" in entry:
            name = entry["name"]
        elif size is not None:
            name = f"{'vit' if role == 'vision' else 'llama'}-w{size['hidden_size']}-d{size['num_layers']}"
        else:
            name = Path(path).name
        if not isinstance(name, str) or not _NAME_RE.match(name) or "__" in name:
            raise _fail(source, f"{where}.name", f"{name!r} is not a usable name (letters, digits, '.', '_', '-'; no '__')")
        tokenizer = _path(source, f"{where}.tokenizer", entry["tokenizer"], base) if "tokenizer" in entry else None
        specs.append(ModelSpec(role, name, size, path, tokenizer))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _fail(source, role, f"duplicate name(s) {dupes}; give each entry its own `name`")
    return tuple(specs)


def _parse_data(source: str, value, base: Path) -> DataSpec:
    data = _mapping(source, "data", value)
    allowed = ["shapes", "train", "image_folder", "eval", "eval_size", "tokenizer", "template"]
    _check_keys(source, "data", data, allowed)
    shapes = data.get("shapes", False)
    if not isinstance(shapes, bool):
        raise _fail(source, "data.shapes", f"expected true or false, got {shapes!r}")
    if shapes == ("train" in data):
        raise _fail(source, "data", "give either `shapes: true` (generated dataset) or `train: FILE` (LLaVA captions)")
    eval_size = _int(source, "data.eval_size", data["eval_size"]) if "eval_size" in data else None
    if "eval" in data and eval_size is not None:
        raise _fail(source, "data", "give `eval: FILE` or `eval_size: N` (held out of `train`), not both")
    if shapes and ("eval" in data or "image_folder" in data or "tokenizer" in data):
        raise _fail(source, "data", "`shapes: true` generates its images, held-out set and tokenizer; "
                                    "drop eval/image_folder/tokenizer")
    if eval_size is None and "eval" not in data:
        raise _fail(source, "data", "no held-out set: give `eval_size: N` (or `eval: FILE` with `train`)")
    template = data.get("template", "plain")
    from cumo_megatron.config.schema import TEMPLATES

    if template not in TEMPLATES:
        raise _fail(source, "data.template", f"{template!r} is unknown; choose one of {', '.join(TEMPLATES)}")
    opt = lambda key: _path(source, f"data.{key}", data[key], base) if key in data else None  # noqa: E731
    return DataSpec(shapes, opt("train"), opt("image_folder"), opt("eval"), eval_size, opt("tokenizer"), template)


def _parse_train(source: str, value, base_config: str) -> dict:
    from cumo_megatron.config.loader import ConfigError, from_dict, load_config, to_dict
    from cumo_megatron.config.schema import ExperimentConfig, TrainConfig

    train = _mapping(source, "train", value, required=False)
    fixed = sorted(set(train) & set(CELL_TRAIN_KEYS))
    if fixed:
        raise _fail(source, "train", f"{fixed} are set by the sweep per cell (stage 1, steps from data_size); remove them")
    try:
        base = load_config(ExperimentConfig, base_config)
    except ConfigError as err:
        raise _fail(source, "base_config", str(err)) from None
    merged = dict(to_dict(base.train), **train)
    try:
        resolved = from_dict(TrainConfig, merged, path="train")
        resolved.validate()
    except ConfigError as err:
        raise _fail(source, "train", str(err)) from None
    return {k: v for k, v in to_dict(resolved).items() if k not in CELL_TRAIN_KEYS}


def parse_grid(raw, source: str = "<grid>", base_dir: Optional[Path] = None) -> Grid:
    """Validate the mapping ``raw`` (a loaded grid file) into a `Grid`; `GridError` names what is wrong."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    top = _mapping(source, "top level", raw)
    allowed = ["seed", "data", "data_sizes", "vision", "llm", "train", "base_config", "overrides",
               "model_overrides", "launch", "keep_checkpoints"]
    _check_keys(source, "top level", top, allowed)
    for key in ("data", "data_sizes", "vision", "llm"):
        if key not in top:
            raise _fail(source, "top level", f"missing `{key}`")
    seed = _int(source, "seed", top.get("seed", 0), minimum=0)
    sizes = top["data_sizes"]
    if not isinstance(sizes, list) or not sizes:
        raise _fail(source, "data_sizes", f"expected a non-empty list of sample counts, got {sizes!r}")
    sizes = [_int(source, f"data_sizes[{i}]", d) for i, d in enumerate(sizes)]
    if len(set(sizes)) != len(sizes):
        raise _fail(source, "data_sizes", f"{sizes} repeats a size")
    data = _parse_data(source, top["data"], base)
    vision = _parse_models(source, "vision", top["vision"], base)
    llm = _parse_models(source, "llm", top["llm"], base)
    for m in llm:
        if m.size is not None and not data.shapes and data.tokenizer is None and m.tokenizer is None:
            raise _fail(source, f"llm {m.name}", "a tiny LLM on files needs a tokenizer: "
                                                 "set data.tokenizer or its `tokenizer`")
    base_config = str(DEFAULT_BASE_CONFIG)
    if "base_config" in top:
        base_config = _path(source, "base_config", top["base_config"], base)
    launch = _mapping(source, "launch", top.get("launch"), required=False)
    _check_keys(source, "launch", launch, ["mode", "command"])
    mode = launch.get("mode", "subprocess")
    if mode not in LAUNCH_MODES:
        raise _fail(source, "launch.mode", f"{mode!r} is unknown; choose one of {', '.join(LAUNCH_MODES)}")
    command = _strings(source, "launch.command", launch.get("command"))
    if command and mode != "subprocess":
        raise _fail(source, "launch.command", "only the subprocess mode launches a command")
    keep = top.get("keep_checkpoints", True)
    if not isinstance(keep, bool):
        raise _fail(source, "keep_checkpoints", f"expected true or false, got {keep!r}")
    return Grid(
        source=source, seed=seed, data=data, data_sizes=tuple(sorted(sizes)), vision=vision, llm=llm,
        train=_parse_train(source, top.get("train"), base_config), base_config=base_config,
        overrides=_strings(source, "overrides", top.get("overrides")),
        model_overrides=_strings(source, "model_overrides", top.get("model_overrides")),
        launch_mode=mode, launch_command=command, keep_checkpoints=keep,
    )


def load_grid(path) -> Grid:
    """Read and validate a grid YAML file (relative paths in it are relative to the file)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GridError(f"{path}: grid file not found") from None
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML ({err})") from None
    return parse_grid(raw, str(path), path.resolve().parent)


# ------------------------------------------------------------------------------------------------
# Cells
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One (vision, llm, data size) combination: one training run and one row of results."""

    vision: ModelSpec
    llm: ModelSpec
    data_size: int

    @property
    def key(self) -> tuple[str, str, int]:
        """The row key in ``results.csv`` (`SweepRow.cell`)."""
        return (self.vision.name, self.llm.name, self.data_size)

    @property
    def pair(self) -> str:
        """Name of the (vision, llm) start checkpoint under ``OUT/inits``."""
        return f"{self.vision.name}__{self.llm.name}"

    @property
    def name(self) -> str:
        """Directory name under ``OUT/cells``."""
        return f"{self.pair}__d{self.data_size}"


def plan_cells(grid: Grid) -> list[Cell]:
    """Every cell, vision-major, then LLM, then data size ascending (a pair's cells share its start)."""
    return [Cell(v, m, d) for v in grid.vision for m in grid.llm for d in grid.data_sizes]


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> ``(i, n)``; ``ValueError`` says what a shard looks like."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"--shard {text!r}: expected i/n with 0 <= i < n (e.g. 0/4 ... 3/4)")
    return int(match.group(1)), int(match.group(2))


def shard_cells(cells: Sequence[Cell], index: int, count: int) -> list[Cell]:
    """Shard ``index`` of ``count``: every ``count``-th cell starting at ``index``."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: expected 0 <= i < n")
    return list(cells[index::count])


def pending_cells(cells: Sequence[Cell], results_csv) -> list[Cell]:
    """The cells of ``cells`` that have no row in ``results_csv`` yet."""
    done = {row.cell for row in read_rows(results_csv)}
    return [c for c in cells if c.key not in done]


# ------------------------------------------------------------------------------------------------
# Shared assets: data files, tokenizer, tiny models, converted start checkpoints
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` (shards sharing ``OUT`` build each asset once)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """``target`` if it exists; else ``build(tmp)`` then rename ``tmp`` to ``target`` (under a lock)."""
    if target.exists():
        return target
    with _locked(target.parent / f".{target.name}.lock"):
        if target.exists():  # another shard built it while we waited
            return target
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj) + "\n")


@dataclass(frozen=True)
class SweepData:
    """The files every cell reads: one training subset per data size and the held-out set."""

    train: dict  # data size -> LLaVA JSON file
    eval: str
    image_folder: Optional[str]
    tokenizer: Optional[str]  # for LLMs built by the sweep
    shapes_dir: Optional[str]  # generated dataset (tiny CLIPs are pre-trained on its training images)


def _shapes_assets(grid: Grid, out: Path) -> tuple[Path, list, list, str]:
    """Generate the shapes dataset and tokenizer once; (dataset dir, pool, held-out, tokenizer)."""
    from cumo_megatron.quickstart import assets

    image_size = max([m.size["image_size"] for m in grid.vision if m.size] or [assets.TINY["image_size"]])
    dataset = _build_once(out / "assets" / "shapes", lambda tmp: assets.make_shapes_dataset(
        tmp, max(grid.data_sizes), grid.data.eval_size, image_size, grid.seed))
    tok_dir = _build_once(out / "assets" / "tokenizer", lambda tmp: assets.train_tokenizer(
        tmp, assets.dataset_corpus(), vocab_size=512))
    pool = json.loads((dataset / "stage1_captions.json").read_text())
    # Held out: the generator's eval images, captioned as the training images are (their two
    # questions give the colour and the shape); those images never reach CLIP pre-training.
    prompt = pool[0]["conversations"][0]
    by_image: dict = {}
    for rec in json.loads((dataset / "eval.json").read_text()):
        by_image.setdefault(rec["image"], {})[rec["type"]] = rec["conversations"][1]["value"]
    held_out = [
        {"id": f"heldout{i}", "image": image, "conversations": [
            dict(prompt), {"from": "gpt", "value": f"a {kinds['colour']} {kinds['shape']}"}]}
        for i, (image, kinds) in enumerate(sorted(by_image.items()))
    ]
    return dataset, pool, held_out, str(tok_dir / "tokenizer.model")


def prepare_data(grid: Grid, out: Path) -> SweepData:
    """Write ``OUT/data/train_<N>.json`` (nested, seeded subsets) and ``OUT/data/eval.json`` once."""
    from cumo_megatron.data.records import load_file

    data_dir = out / "data"
    biggest = max(grid.data_sizes)
    if grid.data.shapes:
        shapes_dir, pool, held_out, tokenizer = _shapes_assets(grid, out)
        image_folder = str(shapes_dir)
    else:
        shapes_dir, tokenizer, image_folder = None, grid.data.tokenizer, grid.data.image_folder
        pool = [r.data for r in load_file(grid.data.train)]
        held_out = None
        if grid.data.eval is not None:
            held_out = [r.data for r in load_file(grid.data.eval)]
    rng = random.Random(grid.seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    if held_out is None:  # held out of the training file itself, before any subset is drawn
        held_out = [pool[i] for i in order[: grid.data.eval_size]]
        order = order[grid.data.eval_size:]
    if biggest > len(order):
        source = grid.data.train or "the generated shapes dataset"
        raise GridError(f"{grid.source}: data_sizes: the largest size {biggest} exceeds the {len(order)} training "
                        f"records of {source} (after holding out the eval set); lower it or add data")
    train = {}
    with _locked(data_dir / ".lock"):
        for size in grid.data_sizes:
            path = data_dir / f"train_{size}.json"
            if not path.exists():
                _write_json(path, [pool[i] for i in order[:size]])
            train[size] = str(path)
        eval_path = data_dir / "eval.json"
        if not eval_path.exists():
            _write_json(eval_path, held_out)
    return SweepData(train, str(eval_path), image_folder, tokenizer, str(shapes_dir) if shapes_dir else None)


def build_tiny_clip(out_dir, size: dict, dataset_dir, seed: int = 0) -> float:
    """A tiny HF ``CLIPVisionModel`` of ``size`` in ``out_dir``, pre-trained on the dataset's training
    images as the quickstart's CLIP is (`assets.pretrain_vision`); returns its pre-training accuracy."""
    from cumo_megatron.quickstart import assets

    clip = assets.new_tiny_clip(**{key: size[key] for key in _CLIP_SIZE_KEYS}, seed=seed)
    accuracy = 0.0
    if size["pretrain_steps"] > 0:
        accuracy = assets.pretrain_vision(clip, dataset_dir, steps=size["pretrain_steps"], seed=seed)
    clip.save_pretrained(out_dir)
    return accuracy


_CLIP_SIZE_KEYS = ("hidden_size", "ffn_hidden_size", "num_layers", "num_heads", "image_size", "patch_size")
_LLAMA_SIZE_KEYS = ("hidden_size", "ffn_hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "max_position_embeddings")


def caption_sequences(records: Sequence[dict], tokenizer, template: str,
                      tokens_per_image: Sequence[int] = (1,)) -> list[tuple[list[int], list[int]]]:
    """Training text of LLaVA ``records`` with each image *shown as its caption*: ``(ids, supervised)``.

    Each sample is tokenised as the trainer does it; each image's placeholder run (one per entry of
    ``tokens_per_image``, one sequence each) holds the sample's caption tokens instead, repeated to
    the run's length. ``supervised[j]`` is 1 where ``ids[j]`` is a token the trainer's loss predicts.
    A language model pre-trained on these learns to read what stands where an image goes, the way a
    real LLM uses what it is shown: stage 1 then has to make the connector *say* the image.
    """
    from cumo_megatron.config.schema import IMAGE_TOKEN_ID
    from cumo_megatron.data.records import record_images
    from cumo_megatron.data.templates import tokenize_conversation

    out = []
    for rec in records:
        for per_image in tokens_per_image:
            sample = tokenize_conversation(template, rec["conversations"], tokenizer, per_image, None,
                                           has_image=bool(record_images(rec)), sample_id=rec.get("id"))
            if not sample:
                continue
            # loss_mask[t] says whether the token at t + 1 is predicted.
            supervised = [0] + list(sample.loss_mask[:-1])
            caption = [t for t, sup in zip(sample.input_ids, supervised) if sup]
            ids, k = [], 0
            for tok in sample.input_ids:
                if tok == IMAGE_TOKEN_ID:
                    tok, k = caption[k % len(caption)], k + 1
                else:
                    k = 0
                ids.append(int(tok))
            out.append((ids, supervised))
    return out


def pretrain_language(llm, sequences: Sequence[tuple[list[int], list[int]]], steps: int, batch: int = 64,
                      lr: float = 3e-3, seed: int = 0) -> float:
    """Stand-in for an LLM's pre-training: teach the tiny HF ``llm`` the captions' text (`caption_sequences`).

    A random frozen LLM would leave stage 1 measuring how well a connector steers noise; a real
    study's LLM knows the language. Loss on the supervised tokens only; returns the mean loss of the
    last 10 steps.
    """
    import torch

    if not sequences:
        raise ValueError("no caption text to pre-train the LLM on")
    gen = torch.Generator().manual_seed(seed)
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    weight = torch.zeros(len(sequences), width)
    for row, (tokens, supervised) in enumerate(sequences):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        weight[row, : len(tokens)] = torch.tensor(supervised, dtype=torch.float32)
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    llm.train()
    losses = []
    for _ in range(steps):
        pick = torch.randint(0, len(sequences), (batch,), generator=gen)
        logits = llm(input_ids=ids[pick]).logits[:, :-1]
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[pick][:, 1:], reduction="none")
        w = weight[pick][:, 1:]
        loss = (per_token * w).sum() / w.sum().clamp(min=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    llm.eval()
    return sum(losses[-10:]) / len(losses[-10:])


def build_tiny_llama(out_dir, size: dict, vocab_size: int, seed: int = 0, sequences=None) -> Optional[float]:
    """A tiny seeded HF ``LlamaForCausalLM`` of ``size`` in ``out_dir`` (as `make_tiny_models`), pre-trained
    for ``size["pretrain_steps"]`` steps on ``sequences`` (`pretrain_language`); returns that loss or None."""
    from cumo_megatron.quickstart import assets

    llm = assets.new_tiny_llama(vocab_size=vocab_size, **{key: size[key] for key in _LLAMA_SIZE_KEYS}, seed=seed)
    loss = None
    if size["pretrain_steps"] > 0:
        loss = pretrain_language(llm, sequences or [], size["pretrain_steps"], seed=seed)
    llm.save_pretrained(out_dir)
    return loss


def _model_dir(grid: Grid, spec: ModelSpec, out: Path, data: SweepData) -> str:
    """The HF directory of ``spec``: its path, or the tiny model built (once) under ``OUT/assets``."""
    if spec.path is not None:
        return spec.path
    from cumo_megatron.quickstart.assets import quiet_transformers

    quiet_transformers()
    target = out / "assets" / spec.role / spec.name
    if spec.role == "vision":
        if data.shapes_dir is None and spec.size["pretrain_steps"] > 0:
            raise GridError(f"{grid.source}: vision {spec.name}: tiny CLIPs are pre-trained on the generated shapes "
                            "dataset; with `data.train` set size.pretrain_steps: 0 or give a checkpoint `path`")
        _build_once(target, lambda tmp: build_tiny_clip(tmp, spec.size, data.shapes_dir, grid.seed))
    else:
        from cumo_megatron.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(_tokenizer_of(spec, data))
        # The captions of the largest training subset: the text every cell's LLM reads.
        records = json.loads(Path(data.train[max(grid.data_sizes)]).read_text())
        spans = sorted({(m.size["image_size"] // m.size["patch_size"]) ** 2 for m in grid.vision if m.size}) or [1]
        sequences = None
        if spec.size["pretrain_steps"]:
            sequences = caption_sequences(records, tokenizer, grid.data.template, spans)
        _build_once(target, lambda tmp: build_tiny_llama(tmp, spec.size, tokenizer.vocab_size, grid.seed + 1,
                                                         sequences))
    return str(target)


def _tokenizer_of(llm: ModelSpec, data: SweepData) -> str:
    """The tokenizer of an LLM: its own, else the checkpoint directory's, else the sweep's."""
    return llm.tokenizer or llm.path or data.tokenizer


# ------------------------------------------------------------------------------------------------
# Launching the project's entry points (trainer, converter, evaluation)
# ------------------------------------------------------------------------------------------------


class StepFailed(RuntimeError):
    """A trainer / converter / evaluation step exited non-zero; ``log`` holds its output."""

    def __init__(self, message: str, log: Path):
        super().__init__(message)
        self.log = log


def _launch(grid: Grid, step: str, entry: str, argv: list[str], log: Path, prefix: Sequence[str] = ()) -> None:
    """Run ``entry`` (a module's ``main(argv)``) with output to ``log``; raise `StepFailed` on failure.

    subprocess: ``[prefix or python] -m entry argv`` (the converter tool is a script); in_process:
    ``entry.main(argv)`` here, stdout/stderr redirected to ``log``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    if grid.launch_mode == "subprocess":
        from cumo_megatron.quickstart.run import run_step

        if entry == "convert":
            head = [sys.executable, str(CONVERT_TOOL)]
        else:
            head = [*(prefix or [sys.executable]), "-m", entry]
        try:
            run_step(step, head + argv, log)
        except RuntimeError as err:
            raise StepFailed(str(err), log) from None
        return
    with log.open("w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        print(f"$ {entry}.main({argv})", flush=True)
        try:
            rc = _in_process_main(entry)(argv)
        except SystemExit as stop:  # argparse and friends: an exit status, as from a process
            rc = stop.code if isinstance(stop.code, int) else 1
        except Exception:  # a crash of the step fails the cell, not the sweep (Ctrl-C still stops it)
            traceback.print_exc()
            rc = 1
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise StepFailed(f"step {step} failed (exit {rc}); log {log}:\n{tail}", log)


def _in_process_main(entry: str) -> Callable[[list[str]], int]:
    if entry == "convert":
        return _convert_main
    import importlib

    return importlib.import_module(entry).main


def _convert_main(argv: list[str]) -> int:
    """``tools/upcycle_checkpoint.py``'s main, loaded from the script (tools/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cumo_upcycle_checkpoint_tool", CONVERT_TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _init_checkpoint(grid: Grid, cell: Cell, out: Path, data: SweepData) -> Path:
    """The converted start checkpoint of ``cell``'s (vision, llm) pair, built once under ``OUT/inits``."""
    vision = _model_dir(grid, cell.vision, out, data)
    language = _model_dir(grid, cell.llm, out, data)
    log = out / "inits" / f"{cell.pair}.log"

    def convert(tmp: Path) -> None:
        argv = ["--vision", vision, "--language", language, "--out", str(tmp),
                "--router-seed", str(grid.seed), "--quiet"]
        for setting in grid.model_overrides:
            argv += ["--set", setting]
        _launch(grid, f"convert {cell.pair}", "convert", argv, log)

    return _build_once(out / "inits" / cell.pair, convert)


# ------------------------------------------------------------------------------------------------
# One cell
# ------------------------------------------------------------------------------------------------


def cell_config(grid: Grid, cell: Cell, data: SweepData, init: Path, save: Path):
    """The trainer's `ExperimentConfig` for ``cell``: base config <- grid <- the cell's data and steps.

    The model is the start checkpoint's own config; stage 1 with ``train_steps`` from the data size.
    """
    from cumo_megatron.checkpoint.ours import read_model_config
    from cumo_megatron.config.loader import apply_overrides, from_dict, load_config, to_dict, validate_tree
    from cumo_megatron.config.schema import ExperimentConfig

    tree = to_dict(load_config(ExperimentConfig, grid.base_config))
    tree["seed"] = grid.seed
    tree["model"] = to_dict(read_model_config(init))
    tree["train"].update(grid.train, stage=1, train_steps=grid.steps(cell.data_size), load=str(init), save=str(save))
    tree["data"].update(files=[data.train[cell.data_size]], eval_files=[data.eval], image_folder=data.image_folder,
                        tokenizer=_tokenizer_of(cell.llm, data), template=grid.data.template)
    cfg = from_dict(ExperimentConfig, apply_overrides(tree, list(grid.overrides)))
    validate_tree(cfg)
    return cfg


def token_counts(metrics_path, tokens_per_image: int) -> tuple[int, int]:
    """``(D_img, D_txt)`` over a run from its ``metrics.jsonl``.

    ``D_img``: images x tokens per image (the image tokens the LLM sees); ``D_txt``: every other
    LLM sequence position processed (text and the micro-batches' right padding, which costs compute).
    """
    from cumo_megatron.jsonl import read_json_lines
    from cumo_megatron.training.metrics import is_training_row

    images = tokens = 0
    for line in read_json_lines(metrics_path):
        if line.error is not None:
            raise ValueError(f"{metrics_path} line {line.number} is not JSON ({line.error})")
        if not is_training_row(line.value):  # a validation or checkpoint row: no training tokens
            continue
        images += int(line.value["images"])
        # Padded positions: padding costs compute (``tokens`` counts real tokens only; older files lack it).
        tokens += int(line.value.get("tokens_padded", line.value["tokens"]))
    d_img = images * tokens_per_image
    return d_img, tokens - d_img


def run_cell(grid: Grid, cell: Cell, out: Path, data: SweepData) -> SweepRow:
    """Convert (once per pair), train and evaluate ``cell``; return its row (not yet written).

    ``wall_time_s`` is the cell's training and evaluation in this call (the shared start checkpoint's
    conversion excluded); ``OUT/cells/<cell>/result.json`` adds the token counts and step count.
    """
    from cumo_megatron.config.loader import save_config
    from cumo_megatron.models.params import hand_count

    init = _init_checkpoint(grid, cell, out, data)
    cell_dir = out / "cells" / cell.name
    save = cell_dir / "run"
    cfg = cell_config(grid, cell, data, init, save)
    config_path = cell_dir / "config.yaml"
    save_config(cfg, config_path)
    start = time.perf_counter()
    # Re-running after a crash resumes the trainer from <save>/latest (exact resume).
    _launch(grid, f"train {cell.name}", "cumo_megatron.train", ["--config", str(config_path)],
            cell_dir / "train.log", prefix=grid.launch_command)
    eval_json = cell_dir / "eval.json"
    _launch(grid, f"eval {cell.name}", "cumo_megatron.research.eval_loss",
            ["--run", str(save), "--out", str(eval_json)], cell_dir / "eval.log")
    wall = time.perf_counter() - start
    result = json.loads(eval_json.read_text())
    if not math.isfinite(result["loss"]):
        raise StepFailed(f"cell {cell.name}: held-out loss {result['loss']} over {result['tokens']} tokens "
                         f"(see {cell_dir / 'eval.log'})", cell_dir / "eval.log")
    counts = hand_count(cfg.model)
    d_img, d_txt = token_counts(save / "metrics.jsonl", cfg.model.vision.tokens_per_image)
    row = SweepRow(
        vision=cell.vision.name, vision_params=counts.vision.total, llm=cell.llm.name,
        llm_params=counts.language.total, data_size=cell.data_size, final_eval_loss=float(result["loss"]),
        compute_flops=compute_flops(counts.vision.total, counts.language.total, d_img, d_txt),
        wall_time_s=round(wall, 3),
    )
    _write_json(cell_dir / "result.json", dict(dataclasses.asdict(row), image_tokens=d_img, text_tokens=d_txt,
                                                steps=cfg.train.train_steps, eval=result))
    if not grid.keep_checkpoints:
        for ckpt in save.glob("iter_*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    return row


# ------------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------------


@dataclass
class CellFailure:
    """A cell that did not finish: its name, the log to read, and the error."""

    cell: str
    log: str
    error: str


@dataclass
class SweepReport:
    """What one `run_sweep` call did."""

    planned: int  # cells of this shard
    skipped: int  # already in results.csv
    finished: list[str] = field(default_factory=list)
    failed: list[CellFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no cell failed."""
        return not self.failed


def _write_resolved_grid(grid: Grid, out: Path) -> None:
    """``OUT/grid.yaml``; refuse a different grid in an ``OUT`` that already holds one (mixed results)."""
    path = out / "grid.yaml"
    resolved = grid.resolved()
    if path.is_file():
        existing = yaml.safe_load(path.read_text()) or {}
        differs = sorted(k for k in set(existing) | set(resolved) if existing.get(k) != resolved.get(k))
        if differs:
            raise GridError(f"{path} holds a different grid (differs in {differs}) than {grid.source}; "
                            "results would mix: use another --out, or delete that directory to start over")
        return
    write_text_atomic(path, yaml.safe_dump(resolved, sort_keys=False))


def _prepare_starts(grid: Grid, todo: Sequence[Cell], out: Path, data: SweepData, progress: bool) -> dict:
    """Build the tiny models, then convert each (vision, llm) start checkpoint, before any cell trains.

    Done up front so the models' small pre-training loops run before a trainer has installed
    megatron's CPU adaptations in this process (in_process mode). Returns ``{pair: CellFailure}``
    for the pairs that could not be prepared (their cells fail; the other pairs go on).
    """
    from tqdm import tqdm

    pairs = {c.pair: c for c in todo}
    models = {(m.role, m.name): m for c in todo for m in (c.vision, c.llm)}
    steps = [("model", m, [p for p, c in pairs.items() if m in (c.vision, c.llm)]) for m in models.values()]
    steps += [("pair", c, [p]) for p, c in pairs.items()]
    broken: dict[str, CellFailure] = {}
    for kind, item, affected in tqdm(steps, desc="models and start checkpoints", unit="step", file=sys.stderr,
                                     disable=not progress):
        if all(p in broken for p in affected):
            continue
        try:
            if kind == "model":
                _model_dir(grid, item, out, data)
            else:
                _init_checkpoint(grid, item, out, data)
        except Exception as err:  # noqa: BLE001 - reported per cell, the sweep goes on
            log = getattr(err, "log", None) or out / ("assets" if kind == "model" else "inits")
            for pair in affected:
                broken.setdefault(pair, CellFailure("", str(log), f"{type(err).__name__}: {err}"))
    return broken


def run_sweep(grid: Grid, out, shard: tuple[int, int] = (0, 1), progress: bool = True) -> SweepReport:
    """Run this shard's pending cells of ``grid`` into ``out``; see the module docstring."""
    from tqdm import tqdm

    out = Path(out).resolve()
    _write_resolved_grid(grid, out)
    results = out / "results.csv"
    mine = shard_cells(plan_cells(grid), *shard)
    todo = pending_cells(mine, results)
    report = SweepReport(planned=len(mine), skipped=len(mine) - len(todo))
    if not todo:
        return report
    data = prepare_data(grid, out)
    broken = _prepare_starts(grid, todo, out, data, progress)
    bar = tqdm(todo, desc=f"sweep {shard[0]}/{shard[1]}", unit="cell", file=sys.stderr, disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.name)
        if cell.pair in broken:
            report.failed.append(dataclasses.replace(broken[cell.pair], cell=cell.name))
            continue
        try:
            row = run_cell(grid, cell, out, data)
        except Exception as err:  # one failed cell must not stop the sweep
            log = getattr(err, "log", None) or out / "cells" / cell.name
            report.failed.append(CellFailure(cell.name, str(log), f"{type(err).__name__}: {err}"))
            bar.write(f"cell {cell.name} FAILED: see {log}", file=sys.stderr)
            continue
        append_row(results, row)
        report.finished.append(cell.name)
    bar.close()
    return report
