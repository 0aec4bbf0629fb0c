"""The suite file: one model and the benchmark files to run and score it on.

    model:
      load: runs/ckpt/stage3/iter_0000100   # our checkpoint or an original CuMo release
      tokenizer: runs/tokenizer/tokenizer.model   # optional (default: beside the checkpoint)
      template: vicuna_v1                   # optional (default: the LLM family's)
      name: CuMo-tiny                       # the table's row name (default: the model_id)
    out: runs/eval                          # optional; --out on the command line wins
    generation: {batch_size: 8, max_new_tokens: 128}   # optional
    benchmarks:
      - {name: pope, questions: pope/llava_pope_test.jsonl, images: coco/val2014, annotations: pope/coco}
      - {name: mmvet, questions: mm-vet/llava-mm-vet.jsonl, images: mm-vet/images}

Relative paths are relative to the suite file's folder. A benchmark entry may add ``all_rounds:
true`` (MMBench's CircularEval rotations) and ``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from cumo_megatron.config.loader import ConfigError

__all__ = ["SuiteBenchmark", "Suite", "read_suite"]

_BENCH_KEYS = {"name", "questions", "images", "annotations", "all_rounds", "max_new_tokens"}


@dataclass(frozen=True)
class SuiteBenchmark:
    """One benchmark of a suite: its registry name and files."""

    name: str
    questions: Path
    images: Optional[Path] = None
    annotations: Optional[Path] = None
    all_rounds: bool = False
    max_new_tokens: Optional[int] = None


@dataclass(frozen=True)
class Suite:
    """A parsed suite file."""

    path: Path
    load: Path
    tokenizer: Optional[Path] = None
    template: Optional[str] = None
    model_name: Optional[str] = None
    out: Optional[Path] = None
    batch_size: int = 8
    max_new_tokens: int = 128
    benchmarks: list[SuiteBenchmark] = field(default_factory=list)


def _path(base: Path, value) -> Optional[Path]:
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else base / path


def _mapping(path: Path, where: str, value, allowed: set) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: '{where}' must be a mapping, got {type(value).__name__}")
    unknown = set(value) - allowed
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)} in '{where}'; allowed: {sorted(allowed)}")
    return value


def _positive(path: Path, where: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{path}: '{where}' must be a positive integer, got {value!r}")
    return value


def read_suite(path, known_benchmarks=None) -> Suite:
    """Parse the suite file ``path``; `ConfigError` naming the file and key when it is not usable.
    ``known_benchmarks`` (names) checks each entry's ``name``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"suite file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    data = _mapping(path, "the file", data, {"model", "out", "generation", "benchmarks"})
    base = path.parent
    model = _mapping(path, "model", data.get("model"), {"load", "tokenizer", "template", "name"})
    if not model.get("load"):
        raise ConfigError(f"{path}: 'model.load' is required (a checkpoint directory)")
    generation = _mapping(path, "generation", data.get("generation") or {}, {"batch_size", "max_new_tokens"})
    entries = data.get("benchmarks")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: 'benchmarks' must be a non-empty list of {{name, questions, images, annotations}}")
    benchmarks, names = [], set()
    for i, entry in enumerate(entries):
        where = f"benchmarks[{i}]"
        entry = _mapping(path, where, entry, _BENCH_KEYS)
        name = entry.get("name")
        if not isinstance(name, str) or not entry.get("questions"):
            raise ConfigError(f"{path}: '{where}' needs a 'name' and a 'questions' file")
        if known_benchmarks is not None and name not in known_benchmarks:
            raise ConfigError(f"{path}: '{where}.name' is {name!r}; known benchmarks: {', '.join(known_benchmarks)}")
        if name in names:
            raise ConfigError(f"{path}: benchmark {name!r} is listed twice; each writes {name}.jsonl")
        names.add(name)
        benchmarks.append(SuiteBenchmark(
            name=name, questions=_path(base, entry["questions"]), images=_path(base, entry.get("images")),
            annotations=_path(base, entry.get("annotations")), all_rounds=bool(entry.get("all_rounds", False)),
            max_new_tokens=(None if entry.get("max_new_tokens") is None
                            else _positive(path, f"{where}.max_new_tokens", entry["max_new_tokens"])),
        ))
    return Suite(
        path=path, load=_path(base, model["load"]), tokenizer=_path(base, model.get("tokenizer")),
        template=model.get("template"), model_name=model.get("name"), out=_path(base, data.get("out")),
        batch_size=_positive(path, "generation.batch_size", generation.get("batch_size", 8)),
        max_new_tokens=_positive(path, "generation.max_new_tokens", generation.get("max_new_tokens", 128)),
        benchmarks=benchmarks,
    )
