"""Expert load of a CuMo model: tokens per expert of every MoE layer, and how balanced they are.

Two sources give the same thing, ``{layer: [top-k assignments per expert]}`` keyed as
`cumo_megatron.moe.stats.collect_moe_stats` keys them (``"vision.layer0"``, ..., ``"connector"``,
``"language.layer3"``):

* a model run (`collect_model_load`): a checkpoint (`open_checkpoint`) runs forward over the
  records of a LLaVA file, one sample per forward pass so that no padding token is ever routed.
  `conversation_inputs` feeds whole conversations through the training data pipeline (template,
  image preprocessing, truncation); `prompt_inputs` feeds only the first question as
  ``generate`` prompts it (benchmark question files have no answers). The routers count the
  top-k choices themselves; this module only drains and sums their counters.
* the trainer's ``metrics.jsonl`` (`read_metrics_load`): the ``expert_load`` of each step's row,
  summed over the chosen steps. Those counts are what the routers saw in training: for an MoE
  LLM they include the right padding of micro-batches of several samples (the trainer gives the
  LLM no padding mask).

`load_table` turns counts into one `LayerLoad` per layer (shares, MaxVio, normalised entropy from
`cumo_megatron.research.load_metrics`); `summarize` averages them per module.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from cumo_megatron.jsonl import read_json_lines
from cumo_megatron.training.metrics import is_training_row
from cumo_megatron.research.load_metrics import load_entropy, max_violation, shares

PathLike = Union[str, Path]
MODULES = ("vision", "connector", "language")  # panel and table order
TABLE_CSV = "expert_load.csv"
TABLE_JSON = "expert_load.json"
HEATMAP_PNG = "expert_load.png"

log = logging.getLogger(__name__)
_LAYER_NUMBER_RE = re.compile(r"\.layer(\d+)")


# --------------------------------------------------------------------------- layer keys


def module_of(layer: str) -> str:
    """The MoE module a layer key belongs to (``"vision.layer3"`` -> ``"vision"``)."""
    return layer.split(".", 1)[0]


def layer_sort_key(layer: str) -> tuple:
    """Module order of `MODULES`, then the layer number numerically (``layer10`` after ``layer9``)."""
    module = module_of(layer)
    rank = MODULES.index(module) if module in MODULES else len(MODULES)
    match = _LAYER_NUMBER_RE.search(layer)
    return (rank, module, int(match.group(1)) if match else -1, layer)


def add_counts(total: dict[str, list[int]], layers: Mapping[str, Sequence[int]], where: str = "") -> None:
    """Add ``layers``' counts into ``total`` in place (new layers are added).

    Raises ``ValueError`` (naming ``where``) when a layer's number of experts changes.
    """
    for layer, counts in layers.items():
        counts = [int(c) for c in counts]
        if layer not in total:
            total[layer] = counts
            continue
        if len(total[layer]) != len(counts):
            raise ValueError(
                f"{where}: layer {layer} has {len(counts)} experts here but {len(total[layer])} before; "
                "the counts come from different models and cannot be summed"
            )
        total[layer] = [a + b for a, b in zip(total[layer], counts)]


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class LayerLoad:
    """One MoE layer's load: counts per expert, their shares, MaxVio and normalised entropy."""

    layer: str
    module: str
    counts: tuple[int, ...]
    shares: tuple[float, ...]
    max_vio: float  # busiest expert over the mean load (1 = balanced)
    entropy: float  # entropy of the shares over log(E) (1 = balanced)

    @property
    def num_experts(self) -> int:
        """Experts of the layer."""
        return len(self.counts)

    @property
    def assignments(self) -> int:
        """Top-k assignments counted in the layer (tokens x k)."""
        return sum(self.counts)


def load_table(layers: Mapping[str, Sequence[int]]) -> list[LayerLoad]:
    """One `LayerLoad` per layer, in `layer_sort_key` order."""
    rows = []
    for layer in sorted(layers, key=layer_sort_key):
        counts = tuple(int(c) for c in layers[layer])
        rows.append(LayerLoad(
            layer=layer,
            module=module_of(layer),
            counts=counts,
            shares=tuple(shares(counts)),
            max_vio=max_violation(counts),
            entropy=load_entropy(counts),
        ))
    return rows


def summarize(table: Sequence[LayerLoad]) -> dict:
    """Per module: layers, experts, mean / worst MaxVio, mean / lowest entropy; and overall means.

    Returns ``{"modules": {module: {...}}, "mean_max_vio": float, "mean_entropy": float,
    "layers": int}`` (the overall means are over all layers).
    """
    modules: dict[str, dict] = {}
    for module in sorted({row.module for row in table}, key=lambda m: layer_sort_key(m)):
        rows = [row for row in table if row.module == module]
        modules[module] = {
            "layers": len(rows),
            "experts": sorted({row.num_experts for row in rows}),
            "assignments": sum(row.assignments for row in rows),
            "mean_max_vio": _mean(row.max_vio for row in rows),
            "max_max_vio": max(row.max_vio for row in rows),
            "worst_layer": max(rows, key=lambda row: row.max_vio).layer,
            "mean_entropy": _mean(row.entropy for row in rows),
            "min_entropy": min(row.entropy for row in rows),
        }
    return {
        "modules": modules,
        "layers": len(table),
        "mean_max_vio": _mean(row.max_vio for row in table) if table else None,
        "mean_entropy": _mean(row.entropy for row in table) if table else None,
    }


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def format_table(table: Sequence[LayerLoad]) -> str:
    """The table as aligned text: layer, assignments, MaxVio, entropy, each expert's share in %."""
    width = max((row.num_experts for row in table), default=0)
    name_width = max([len("layer")] + [len(row.layer) for row in table])
    header = f"{'layer':<{name_width}}  {'assigned':>10}  {'MaxVio':>6}  {'entropy':>7}  " + " ".join(
        f"{'e' + str(e):>6}" for e in range(width)
    )
    lines = [header, "-" * len(header)]
    for row in table:
        cells = " ".join(f"{100 * s:5.1f}%" for s in row.shares)
        lines.append(f"{row.layer:<{name_width}}  {row.assignments:>10}  {row.max_vio:6.3f}  "
                     f"{row.entropy:7.4f}  {cells}")
    return "\n".join(lines)


def write_table_csv(table: Sequence[LayerLoad], path: PathLike) -> Path:
    """``layer,module,experts,assignments,max_vio,entropy,share_0..,count_0..`` (blank where a layer
    has fewer experts than the widest one)."""
    path = Path(path)
    width = max((row.num_experts for row in table), default=0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", "module", "experts", "assignments", "max_vio", "entropy"]
                        + [f"share_{e}" for e in range(width)] + [f"count_{e}" for e in range(width)])
        for row in table:
            pad = [""] * (width - row.num_experts)
            writer.writerow([row.layer, row.module, row.num_experts, row.assignments, repr(row.max_vio),
                             repr(row.entropy)] + [repr(s) for s in row.shares] + pad + list(row.counts) + pad)
    return path


def write_table_json(table: Sequence[LayerLoad], summary: dict, path: PathLike, source: Optional[dict] = None) -> Path:
    """``{"source", "summary", "layers": [{layer, module, counts, shares, max_vio, entropy}]}``."""
    path = Path(path)
    doc = {
        "source": source or {},
        "summary": summary,
        "layers": [
            {"layer": r.layer, "module": r.module, "counts": list(r.counts), "shares": list(r.shares),
             "max_vio": r.max_vio, "entropy": r.entropy}
            for r in table
        ],
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def write_report(
    layers: Mapping[str, Sequence[int]], out_dir: PathLike, title: str, source: Optional[dict] = None,
) -> tuple[list[LayerLoad], dict]:
    """Write `HEATMAP_PNG`, `TABLE_CSV` and `TABLE_JSON` for ``layers`` into ``out_dir``.

    Returns the table and its `summarize` summary with the written paths added (``png``, ``csv``,
    ``json``). Raises ``ValueError`` when ``layers`` is empty.
    """
    from cumo_megatron.research.expert_plot import plot_expert_heatmap

    out_dir = Path(out_dir)
    if not layers:
        raise ValueError(f"no MoE layer to report in {out_dir}: the model or the chosen metrics rows have no "
                         "expert load")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = load_table(layers)
    summary = summarize(table)
    summary["png"] = str(plot_expert_heatmap(table, out_dir / HEATMAP_PNG, title))
    summary["csv"] = str(write_table_csv(table, out_dir / TABLE_CSV))
    summary["json"] = str(out_dir / TABLE_JSON)
    write_table_json(table, summary, out_dir / TABLE_JSON, source)
    return table, summary


# --------------------------------------------------------------------------- trainer metrics


def parse_steps(spec: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """``"A:B"`` -> ``(A, B)``, both ends included; ``"A:"``, ``":B"``, ``"A"`` (one step) and None work.

    Raises ``ValueError`` for anything else or when A > B.
    """
    if spec is None or spec.strip() in ("", ":"):
        return None, None
    text = spec.strip()
    try:
        if ":" not in text:
            step = int(text)
            return step, step
        lo_text, hi_text = text.split(":", 1)
        lo = int(lo_text) if lo_text.strip() else None
        hi = int(hi_text) if hi_text.strip() else None
    except ValueError:
        raise ValueError(f"steps {spec!r}: expected A:B (integers, either may be left out, both included)") from None
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"steps {spec!r}: the first step {lo} is after the last {hi}")
    return lo, hi


@dataclass
class MetricsLoad:
    """Expert load summed over steps of a ``metrics.jsonl``, and which steps went into it."""

    layers: dict[str, list[int]] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)  # steps whose rows had expert load, ascending
    unreadable_lines: list[int] = field(default_factory=list)  # e.g. a line cut by a kill


def read_metrics_load(path: PathLike, steps: tuple[Optional[int], Optional[int]] = (None, None)) -> MetricsLoad:
    """Sum the ``expert_load`` of the rows of ``path`` whose ``step`` lies in ``steps`` (inclusive).

    Rows without MoE layers (dense stages) are ignored. A line that is not JSON (a run killed
    mid-write) is skipped with a warning; a step found twice raises ``ValueError`` naming the
    file and lines. The result's ``layers`` is empty when no row qualifies.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give the metrics.jsonl a training run wrote "
                                "(<train.save>/metrics.jsonl)")
    lo, hi = steps
    out = MetricsLoad()
    seen: dict[int, int] = {}
    for number, _, row, error in read_json_lines(path):
        if error is not None:
            log.warning("%s line %d is not JSON (cut by a kill?); skipped", path, number)
            out.unreadable_lines.append(number)
            continue
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path} line {number}: not a metrics row (a JSON object with 'step'); "
                             "is this a metrics.jsonl?")
        if not is_training_row(row):  # a validation or checkpoint row (same step as its training row, no load)
            continue
        step = int(row["step"])
        if step in seen:
            raise ValueError(
                f"{path} lines {seen[step]} and {number} both hold step {step}; the file mixes runs. "
                "Keep one run's rows (the trainer rewrites the file on resume)"
            )
        seen[step] = number
        load = row.get("expert_load") or {}
        if not load or (lo is not None and step < lo) or (hi is not None and step > hi):
            continue
        add_counts(out.layers, load, where=f"{path} line {number} (step {step})")
        out.steps.append(step)
    out.steps.sort()
    return out


# --------------------------------------------------------------------------- model run


@dataclass
class OpenedCheckpoint:
    """A model ready for analysis (eval mode, world of one) and where its settings came from."""

    model: Any  # CuMoModel
    cfg: Any  # ModelConfig
    kind: str  # "model" (ours), "release" (an original CuMo release) or "trainer"
    experiment: Any = None  # the trainer's ExperimentConfig (kind "trainer"): data defaults


def trainer_config_path(directory: PathLike) -> Optional[Path]:
    """``<save>/config.yaml`` when ``directory`` is a trainer's save directory (with ``latest``) or
    one of its ``iter_N`` checkpoints, else None."""
    directory = Path(directory)
    if (directory / "latest").is_file() and (directory / "config.yaml").is_file():
        return directory / "config.yaml"
    if re.fullmatch(r"iter_\d+", directory.name) and (directory.parent / "config.yaml").is_file():
        return directory.parent / "config.yaml"
    return None


def open_checkpoint(load: PathLike) -> OpenedCheckpoint:
    """Build and load a model from ``load`` in eval mode (parallel state initialised, world of one).

    ``load`` is our model checkpoint or an original CuMo release (`inference.session.load_model`),
    or a trainer's save directory (``latest`` is followed) / ``iter_N`` directory. For the
    latter the run's ``config.yaml`` is read too (its data settings are the defaults of
    `model_load`); an ``iter_N`` that is not itself a model checkpoint (no ``model_config.yaml``)
    and a save directory are loaded with the run's model config through
    `training.checkpointing.load_weights`.
    """
    from cumo_megatron.checkpoint import ours
    from cumo_megatron.checkpoint.adapters.common import CheckpointError
    from cumo_megatron.inference.session import load_model

    directory = Path(load)
    config = trainer_config_path(directory)
    experiment = None
    if config is not None:
        from cumo_megatron.config.loader import load_config
        from cumo_megatron.config.schema import ExperimentConfig

        experiment = load_config(ExperimentConfig, config)
    if config is None or ours.is_model_checkpoint(directory):
        model, cfg = load_model(directory)
        kind = "trainer" if experiment is not None else "model" if ours.is_model_checkpoint(directory) else "release"
        return OpenedCheckpoint(model, cfg, kind, experiment)
    from cumo_megatron.config.schema import ParallelConfig
    from cumo_megatron.models.cumo import build_model
    from cumo_megatron.models.parallelize import place_for_inference, placement_for
    from cumo_megatron.training.checkpointing import load_weights

    model = build_model(experiment.model, ParallelConfig())
    report = load_weights(model, directory, experiment.model, ParallelConfig(), seed=experiment.seed)
    if report["upcycled"]:
        raise CheckpointError(
            f"{report['path']} holds dense {', '.join(report['upcycled'])} weights but {config} describes MoE "
            "there: its experts would be fresh copies, not trained ones. Give the checkpoint of the MoE run"
        )
    model = place_for_inference(model, placement_for(experiment.model))  # the run's device and dtype
    return OpenedCheckpoint(model.eval(), experiment.model, "trainer", experiment)


def _on_model(model, input_ids: list[int] | Any, images):
    import torch

    param = next(model.parameters())
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, dtype=torch.long)
    ids = ids.view(1, -1).to(param.device)
    if images is not None:
        images = images.to(device=param.device, dtype=param.dtype)
    return {"input_ids": ids, "images": images}


def conversation_inputs(
    model, cfg, data: PathLike, tokenizer, template: str, image_folder: Optional[PathLike] = None,
    limit: Optional[int] = None, max_length: Optional[int] = None, aspect: str = "pad", health=None,
    progress=None,
) -> Iterator[dict]:
    """``{"input_ids" [1, s], "images"}`` per usable record of ``data``: whole conversations through
    the training pipeline (`LlavaDataset`). Bad records are skipped and counted in ``health``
    (a `DataHealth`). ``progress`` (a tqdm bar, optional) advances once per record handled."""
    from cumo_megatron.data.dataset import DataHealth, LlavaDataset, Sample
    from cumo_megatron.data.images import ImageProcessor
    from cumo_megatron.data.records import DataSource, Mixture

    health = health if health is not None else DataHealth()
    folder = str(image_folder) if image_folder is not None else str(Path(data).parent)
    dataset = LlavaDataset(
        Mixture([DataSource(str(data), 1.0, folder)]),
        tokenizer,
        template,
        tokens_per_image=cfg.vision.tokens_per_image,
        max_length=max_length or cfg.language.max_position_embeddings,
        image_processor=ImageProcessor.from_vision_config(cfg.vision, aspect=aspect),
        policy="skip",
        image_token_id=cfg.image_token_id,
    )
    for index in range(len(dataset) if limit is None else min(limit, len(dataset))):
        item = dataset[index]
        if not isinstance(item, Sample):
            health.record(item)
        else:
            if item.truncated is not None:
                health.record_truncated(item.truncated)
            yield _on_model(model, item.input_ids, item.images)
        if progress is not None:  # after the consumer's forward pass: the bar shows finished records
            progress.update(1)


def prompt_inputs(
    model, cfg, data: PathLike, tokenizer, template: str, image_folder: Optional[PathLike] = None,
    limit: Optional[int] = None, aspect: str = "pad", progress=None,
) -> Iterator[dict]:
    """``{"input_ids" [1, s], "images"}`` per record of ``data``: the first question only, prompted
    as ``python -m cumo_megatron.generate --batch`` prompts it (LLaVA evaluation lines
    ``{question_id, image, text}`` work too). A bad record raises ``ValueError`` naming it.
    ``progress`` (a tqdm bar, optional) advances once per record."""
    import torch

    from cumo_megatron.data.images import ImageProcessor
    from cumo_megatron.generate import batch_items
    from cumo_megatron.inference.prompts import generation_prompt, prompt_input_ids

    processor = ImageProcessor.from_vision_config(cfg.vision, aspect=aspect)
    folder = Path(image_folder) if image_folder is not None else Path(data).parent
    for n, (rid, question, paths, _) in enumerate(batch_items(Path(data), folder)):
        if limit is not None and n >= limit:
            return
        prompt = generation_prompt(template, question, has_image=bool(paths))
        ids = prompt_input_ids(prompt, tokenizer, cfg.vision.tokens_per_image, cfg.image_token_id)
        placeholders = sum(1 for i in ids if i == cfg.image_token_id) // cfg.vision.tokens_per_image
        if placeholders != len(paths):
            raise ValueError(f"{data} record id={rid!r}: the prompt holds {placeholders} <image> but the record "
                             f"names {len(paths)} image(s)")
        images = torch.stack([processor.load(p) for p in paths]) if paths else None
        yield _on_model(model, ids, images)
        if progress is not None:
            progress.update(1)


def collect_model_load(model, inputs: Iterable[dict]) -> tuple[dict[str, list[int]], int]:
    """Run ``model`` forward (eval, no grad) on each input; return (summed counts per layer, samples).

    Counts are the routers' own: top-k assignments of every routed token (`collect_moe_stats`).
    Whatever the routers held before is drained first and not counted.
    """
    import torch

    from cumo_megatron.moe.stats import collect_moe_stats

    model.eval()  # a training-mode router skips the no-grad pass (the recompute convention)
    collect_moe_stats(model)
    total: dict[str, list[int]] = {}
    samples = 0
    with torch.no_grad():
        for batch in inputs:
            model(input_ids=batch["input_ids"], images=batch["images"])
            add_counts(total, collect_moe_stats(model)["layers"], where=f"sample {samples}")
            samples += 1
    return total, samples



def model_load(
    load: PathLike,
    data: PathLike,
    image_folder: Optional[PathLike] = None,
    template: Optional[str] = None,
    tokenizer: Optional[PathLike] = None,
    limit: Optional[int] = None,
    max_length: Optional[int] = None,
    aspect: Optional[str] = None,
    prompt_only: bool = False,
    progress=None,
) -> tuple[dict[str, list[int]], dict]:
    """Open ``load`` (`open_checkpoint`), run it over ``data``; return (counts per layer, settings).

    Unset options come from the trainer's ``config.yaml`` (``data.template``, ``data.tokenizer``,
    ``data.max_length``, ``data.aspect``) for a trainer checkpoint, else from the model: the
    template of its LLM family, ``tokenizer.model`` in or beside the checkpoint, the LLM's
    position limit, ``pad``. The settings dict holds every resolved option, the number of samples
    run and the skipped records per problem kind. Parallel state must be initialised (world of one).
    """
    from cumo_megatron.data.dataset import DataHealth
    from cumo_megatron.data.tokenizer import load_tokenizer
    from cumo_megatron.inference.session import default_template, default_tokenizer_path

    opened = open_checkpoint(load)
    cfg, run_data = opened.cfg, opened.experiment.data if opened.experiment is not None else None
    template = template or (run_data.template if run_data else default_template(cfg))
    tokenizer = tokenizer or (run_data.tokenizer if run_data and run_data.tokenizer else default_tokenizer_path(load))
    max_length = max_length or (run_data.max_length if run_data else cfg.language.max_position_embeddings)
    aspect = aspect or (run_data.aspect if run_data else "pad")
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > cfg.language.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer} has {tok.vocab_size} tokens but the model {load} has "
                         f"{cfg.language.vocab_size}: they do not belong together; pass --tokenizer")
    health = DataHealth()
    if prompt_only:
        inputs = prompt_inputs(opened.model, cfg, data, tok, template, image_folder, limit, aspect, progress)
    else:
        inputs = conversation_inputs(opened.model, cfg, data, tok, template, image_folder, limit, max_length,
                                     aspect, health, progress)
    layers, samples = collect_model_load(opened.model, inputs)
    settings = {
        "load": str(load), "checkpoint_kind": opened.kind, "data": str(data),
        "image_folder": str(image_folder) if image_folder is not None else str(Path(data).parent),
        "template": template, "tokenizer": str(tokenizer), "limit": limit,
        "max_length": None if prompt_only else max_length, "aspect": aspect, "prompt_only": prompt_only,
        "samples": samples, "skipped": health.counts, "truncated": len(health.truncated),
    }
    return layers, settings

__all__ = [
    "MODULES", "TABLE_CSV", "TABLE_JSON", "HEATMAP_PNG", "module_of", "layer_sort_key", "add_counts",
    "LayerLoad", "load_table", "summarize", "format_table", "write_table_csv", "write_table_json",
    "write_report",
    "parse_steps", "MetricsLoad", "read_metrics_load", "OpenedCheckpoint", "trainer_config_path",
    "open_checkpoint", "conversation_inputs", "prompt_inputs", "collect_model_load", "model_load",
]
