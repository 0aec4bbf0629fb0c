"""Conversions between publishers' checkpoints and ours (library side of the two tools).

* `import_checkpoint`: HF CLIP / OpenCLIP + HF LLaMA/Mistral/Mixtral (+ LLaVA ``mm_projector.bin``),
  an original CuMo release, or one of our (dense, stage-2) checkpoints -> optionally co-upcycled
  -> our checkpoint directory (`cumo_megatron.checkpoint.ours`), loadable at any layout.
* `export_checkpoint`: our checkpoint (written at any layout) -> the LLM as a HF ``*ForCausalLM``
  directory; a dense vision tower as a HF ``CLIPVisionModel`` (or the source's own CLIP layout) and
  a dense connector as LLaVA's ``mm_projector.bin``; MoE vision tower and connector in the original
  CuMo release layout (or, with ``fmt="release"``, a whole CuMo release directory). Exports hold
  every tensor of the source, built or not (`export_release` puts the unbuilt ViT layers and
  ``post_layernorm`` in release names), and a release names its real CLIP.

Round trips are bit-exact: tensors the model does not use are kept in ``passthrough.safetensors``
and the sources' dtypes and JSON configs are recorded, so an export rewrites the source.

Memory: a small multiple of the largest tensor, never the model's size. Sources are read tensor
by tensor (`io.open_checkpoint`, `streaming.LazyCheckpointState`); converted tensors are checked
against a model built on the meta device and parked in a spill file inside the output's temp
directory, from which megatron's writer fetches them one at a time (`streaming.save_streaming`).
Upcycling parks the dense tensors first and copies experts from the spill. Exports read our
checkpoints one tensor at a time too.

Outputs are atomic (`atomic_output`): written to a hidden sibling temp directory and renamed into
place at the end; on any error, SIGINT or SIGTERM nothing is left behind.

Imports carry what generation needs (`assets`: the source's tokenizer, the chat template and the
image aspect handling); exports write the carried tokenizer as ``AutoTokenizer`` loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

from cumo_megatron.checkpoint.adapters.common import CheckpointError
from cumo_megatron.checkpoint.adapters.connector import (
    DEFAULT_SOURCE_PREFIX as CONNECTOR_PREFIX,
    connector_to_megatron,
    locate_connector,
    megatron_to_connector,
)
from cumo_megatron.checkpoint.adapters.cumo_release import (
    BUNDLED_CLIP_DIR,
    PROJECTOR_PREFIX,
    VISION_PREFIX,
    megatron_to_release,
    model_config_from_release,
    release_config,
    release_to_megatron,
    release_unused_keys,
)
from cumo_megatron.checkpoint.adapters.language import (
    hf_config_from_language,
    hf_lm_to_megatron,
    hf_lm_unused_keys,
    language_config_from_hf,
    megatron_to_hf_lm,
)
from cumo_megatron.checkpoint.adapters.vision import (
    RELEASE_PREFIX,
    _locate_tower,
    clip_to_megatron,
    clip_unused_keys,
    megatron_to_clip,
    tower_tail_to_layout,
    vision_config_from_hf,
    vision_config_from_open_clip,
)
from cumo_megatron.checkpoint.export_release import (
    clip_preprocessor_config,
    clip_vision_config,
    fill_missing_layers,
    release_tower_name,
    release_vision_tail,
    write_clip_config,
)
from cumo_megatron.checkpoint.io import open_checkpoint, read_json, write_safetensors
from cumo_megatron.checkpoint import assets, ours
from cumo_megatron.config.loader import ConfigError, apply_overrides, from_dict, to_dict, validate_tree
from cumo_megatron.config.schema import (
    ConnectorConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    check_parallel_layout,
)
from cumo_megatron.errors import EXIT_FAILURE, UserError

PathLike = Union[str, Path]
Progress = Optional[Callable[[int, int, str], None]]  # (done, total, current tensor name)

# Modules of a CuMoModel state dict, by key prefix.
MODULES = {"vision": "vision.vit.", "connector": "connector.", "language": "language_model."}
# JSON files of a source worth keeping for exports (configs, tokenizer settings).
_SOURCE_JSONS = (
    "config.json", "preprocessor_config.json", "generation_config.json", "open_clip_config.json",
    "tokenizer_config.json", "special_tokens_map.json",
)
# Testing hook: seconds to sleep after each tensor (lets tests interrupt a conversion half-way).
DELAY_ENV = "CUMO_CONVERT_DELAY_S"


# ------------------------------------------------------------------------------------------------
# Options and results
# ------------------------------------------------------------------------------------------------


@dataclass
class UpcycleOptions:
    """How to make the target model sparse (co-upcycling; experts = copies of the dense MLP).

    ``vision_experts``/``connector_experts``/``llm_experts``: experts per MoE module (None: that
    module is not upcycled; it stays as the source has it). ``top_k`` applies to all of them.
    ``vision_layers``: built ViT layers made MoE (None: all). ``seed`` seeds the fresh routers.
    """

    vision_experts: Optional[int] = None
    connector_experts: Optional[int] = None
    llm_experts: Optional[int] = None
    top_k: int = 2
    vision_layers: Optional[list[int]] = None
    seed: int = 0

    @property
    def any(self) -> bool:
        """Whether any module is upcycled."""
        return any(e is not None for e in (self.vision_experts, self.connector_experts, self.llm_experts))


@dataclass
class Sources:
    """Where the weights come from: a CuMo release, one of our checkpoints, or per-module sources."""

    vision: Optional[Path] = None
    language: Optional[Path] = None
    connector: Optional[Path] = None
    cumo: Optional[Path] = None
    from_checkpoint: Optional[Path] = None
    clip_dir: Optional[Path] = None  # the CLIP a release names (releases name a hub id)
    tokenizer: Optional[Path] = None  # the tokenizer to carry (default: the source's own)

    def check(self) -> str:
        """The kind of source (``release``, ``ours``, ``modules``); raise on a bad combination."""
        modules = [n for n in ("vision", "language", "connector") if getattr(self, n) is not None]
        whole = [n for n in ("cumo", "from_checkpoint") if getattr(self, n) is not None]
        if len(whole) > 1 or (whole and modules):
            raise ConfigError(
                f"give either --cumo, --from-checkpoint, or --vision/--language[/--connector]; got "
                f"{', '.join('--' + n.replace('_', '-') for n in whole + modules)}"
            )
        if whole:
            return "release" if whole[0] == "cumo" else "ours"
        if self.vision is None or self.language is None:
            raise ConfigError("per-module sources need both --vision and --language (--connector is optional)")
        return "modules"


@dataclass
class Summary:
    """What a conversion produced."""

    out_dir: Path
    model_cfg: ModelConfig
    params: dict  # `ParamCounts.as_dict()`
    bytes: int
    seconds: float
    tensors: int
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        """A human-readable report (parameter table in millions, size, time)."""
        lines = [f"wrote {self.out_dir}", f"{'module':<10} {'total':>14} {'active':>14}"]
        for name, row in self.params.items():
            lines.append(f"{name:<10} {row['total']:>14,} {row['active']:>14,}")
        lines.append(f"size {self.bytes / 2**20:.1f} MiB, {self.tensors} tensors, {self.seconds:.1f} s")
        lines += self.notes
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Atomic output
# ------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(out: Path) -> None:
    """Remove temp directories of earlier conversions to ``out`` whose process is gone (SIGKILL)."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(path.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


class Interrupted(UserError, RuntimeError):
    """The conversion was stopped by a signal (exit status 1: nothing was written)."""

    label = "conversion stopped"
    exit_status = EXIT_FAILURE


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM (and SIGINT) into an exception so the temp directory is removed."""

    def handler(signum, _frame):
        raise Interrupted(f"interrupted by signal {signal.Signals(signum).name}; nothing was written")

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def atomic_output(out: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory that becomes ``out`` when the block succeeds, and vanishes otherwise.

    Refuses an existing ``out`` unless ``overwrite``. Temp directories ``.<name>.tmp-<pid>`` of
    killed runs are cleaned up on the next run. SIGTERM/SIGINT during the block raise
    `Interrupted` (and clean up).
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _signals_raise():
            yield tmp
            if out.exists():  # overwrite: move the old one aside first, so a crash keeps one of them
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------
# Model building
# ------------------------------------------------------------------------------------------------


def _world_of_one(seed: int = 0) -> None:
    """A single-process megatron world (the conversion tools run in one process)."""
    import cumo_megatron.platform as platform

    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != 1:
        raise CheckpointError("the conversion runs in one process; do not launch it with torchrun")
    platform.initialize(platform.ParallelSizes(), seed=seed)


def build_empty_model(model_cfg: ModelConfig):
    """A world-of-one `CuMoModel` with uninitialised (``torch.empty``) weights, to be filled."""
    from cumo_megatron.models.cumo import build_model
    from cumo_megatron.models.transformer_configs import shape_only_build

    with shape_only_build():
        return build_model(model_cfg, ParallelConfig())


def _fresh_connector(model_cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """A freshly initialised connector (stage 1 trains it from scratch), seeded."""
    from cumo_megatron.models.connector import build_connector

    torch.manual_seed(seed)
    state = build_connector(model_cfg).state_dict()
    return {"connector." + name: t for name, t in state.items() if not name.endswith("_extra_state")}


def count_params(model) -> dict:
    """Total and active parameters per module (`cumo_megatron.models.params`)."""
    from cumo_megatron.models.params import count_parameters

    return count_parameters(model).as_dict()


def _module_of(name: str) -> str:
    for module, prefix in MODULES.items():
        if name.startswith(prefix):
            return module
    return "other"


# ------------------------------------------------------------------------------------------------
# Sources -> (config, tensor stream, passthrough, provenance)
# ------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    model_cfg: ModelConfig  # what the source holds (dense or not)
    source: object  # our names -> tensors, random access (`streaming`'s names / shape / get)
    passthrough: dict = field(default_factory=dict)  # "<module>::<source key>" -> tensor
    info: dict = field(default_factory=dict)  # provenance recorded in conversion.json
    source_jsons: dict = field(default_factory=dict)  # "<module>/<file>" -> path
    fresh_connector: bool = False


def _jsons_of(directory: Optional[Path], module: str) -> dict:
    if directory is None or not directory.is_dir():
        return {}
    return {f"{module}/{name}": directory / name for name in _SOURCE_JSONS if (directory / name).is_file()}


def _vision_plan(path: Path) -> tuple:
    """(VisionConfig, lazy source, layout, key prefix) of a HF CLIP or OpenCLIP checkpoint."""
    src = open_checkpoint(path)
    layout, prefix = _locate_tower(list(src.keys()))
    directory = path if path.is_dir() else path.parent
    if layout == "open_clip":
        config_path = directory / "open_clip_config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{directory}: an OpenCLIP checkpoint needs its open_clip_config.json")
        cfg = vision_config_from_open_clip(config_path)
    elif layout == "hf":
        config = read_json(directory, "config.json")
        cfg = vision_config_from_hf(config, read_json(directory, "preprocessor_config.json", required=False))
    else:
        raise CheckpointError(
            f"{path} holds a CuMo CLIP-MoE tower; convert the whole release with --cumo instead of --vision"
        )
    return cfg, src, layout, prefix


def _plan_modules(sources: Sources, overrides: Sequence[str]) -> _Plan:
    vision_cfg, vsrc, vlayout, vprefix = _vision_plan(sources.vision)
    lang_dir = sources.language if sources.language.is_dir() else sources.language.parent
    language_cfg = language_config_from_hf(read_json(lang_dir, "config.json"))
    lsrc = open_checkpoint(sources.language)
    model_cfg = ModelConfig(vision=vision_cfg, connector=ConnectorConfig(), language=language_cfg)
    model_cfg = _apply_overrides(model_cfg, overrides)
    source = clip_to_megatron(vsrc, model_cfg.vision, layout=vlayout)
    passthrough = {f"vision::{k}": vsrc[k] for k in clip_unused_keys(vsrc.keys(), model_cfg.vision, vlayout)}
    info = {
        "kind": "modules",
        "vision": {"path": str(sources.vision), "layout": vlayout, "prefix": vprefix},
        "language": {"path": str(sources.language), "arch": language_cfg.arch},
    }
    fresh = sources.connector is None
    if not fresh:
        csrc = open_checkpoint(sources.connector)
        clayout, cprefix = locate_connector(csrc.keys())
        source = source + connector_to_megatron(csrc, model_cfg, layout=clayout)
        info["connector"] = {"path": str(sources.connector), "layout": clayout, "prefix": cprefix}
    source = source + hf_lm_to_megatron(lsrc, model_cfg.language)
    passthrough.update({f"language::{k}": lsrc[k] for k in hf_lm_unused_keys(lsrc.keys(), model_cfg.language)})
    jsons = {**_jsons_of(sources.vision if sources.vision.is_dir() else None, "vision"), **_jsons_of(lang_dir, "language")}
    return _Plan(model_cfg, source, passthrough, info, jsons, fresh_connector=fresh)


def _plan_release(sources: Sources, overrides: Sequence[str]) -> _Plan:
    src = open_checkpoint(sources.cumo)
    model_cfg = model_config_from_release(sources.cumo, clip_dir=sources.clip_dir)
    model_cfg = _apply_overrides(model_cfg, overrides)
    source = release_to_megatron(src, model_cfg)
    passthrough = {f"release::{k}": src[k] for k in release_unused_keys(src.keys(), model_cfg)}
    info = {"kind": "release", "release": {"path": str(sources.cumo)}}
    return _Plan(model_cfg, source, passthrough, info, _jsons_of(sources.cumo, "release"))


def _plan_ours(sources: Sources, overrides: Sequence[str]) -> _Plan:
    from cumo_megatron.checkpoint.streaming import LazyCheckpointState, build_meta_model

    directory = ours.resolve_checkpoint_dir(sources.from_checkpoint)  # a trainer's save dir: its latest
    model_cfg = ours.read_model_config(directory)
    state = LazyCheckpointState(build_meta_model(model_cfg), directory)  # one tensor at a time
    if overrides:
        model_cfg = _apply_overrides(model_cfg, overrides)
    info = dict(ours.read_conversion_info(directory))
    info["from_checkpoint"] = str(directory)
    src_dir = Path(directory) / ours.SOURCE_DIR
    jsons = {}
    if src_dir.is_dir():
        jsons = {str(p.relative_to(src_dir)): p for p in src_dir.rglob("*.json")}
    return _Plan(model_cfg, state, ours.read_passthrough(directory), info, jsons)


def _generation_assets(sources: Sources, kind: str, source_cfg: ModelConfig) -> tuple:
    """``(tokenizer source or None, GenerationSettings, notes)`` of the checkpoint being written.

    The tokenizer is ``--tokenizer`` when given, else the source's own (the LLM directory, the
    release, or what the source checkpoint carries); it is loaded and checked against the
    model's vocabulary before anything is written: a ``--tokenizer`` that fails is refused, a
    source's own that fails is left out with a warning. The template follows the *source* LLM family
    (an LLM upcycled to Mixtral keeps its chat template) unless the source checkpoint says.
    """
    settings = assets.GenerationSettings(assets.default_template(source_cfg.language.arch))
    if kind == "release":
        where = Path(sources.cumo)
        settings.aspect = assets.aspect_of_release(read_json(where, "config.json", required=False) or {})
    elif kind == "ours":
        src = ours.resolve_checkpoint_dir(sources.from_checkpoint)
        settings = assets.read_generation_settings(src) or settings
        where = src / assets.TOKENIZER_DIR
    else:
        where = sources.language if sources.language.is_dir() else sources.language.parent
    tokenizer = Path(sources.tokenizer) if sources.tokenizer is not None else where
    notes = []
    if not assets.tokenizer_files(tokenizer):
        if sources.tokenizer is not None:
            raise CheckpointError(f"--tokenizer {tokenizer} holds no tokenizer (a tokenizer.model file, or a "
                                  "directory with tokenizer.model or tokenizer.json)")
        notes.append(f"warning: {where} holds no tokenizer (tokenizer.model or tokenizer.json), so the checkpoint "
                     "carries none: pass --tokenizer to this tool, or --tokenizer to cumo_megatron.generate")
        return None, settings, notes
    try:
        assets.load_checked_tokenizer(tokenizer, source_cfg.language.vocab_size, "--tokenizer")
    except CheckpointError as err:
        if sources.tokenizer is not None:
            raise
        # The source's own tokenizer does not work with us: the weights still convert (training
        # names its tokenizer itself); generation will ask for --tokenizer.
        notes.append(f"warning: {err}; the checkpoint carries no tokenizer")
        return None, settings, notes
    return tokenizer, settings, notes


def _chain(streams: list) -> Iterator:
    for stream in streams:
        yield from stream


def _apply_overrides(model_cfg: ModelConfig, overrides: Sequence[str]) -> ModelConfig:
    """``model_cfg`` with ``dotted.key=value`` overrides (keys relative to the model config)."""
    if not overrides:
        return model_cfg
    data = apply_overrides(to_dict(model_cfg), list(overrides))
    cfg = from_dict(ModelConfig, data)
    validate_tree(cfg)
    return cfg


def upcycled_config(model_cfg: ModelConfig, opts: UpcycleOptions) -> ModelConfig:
    """The target config: ``model_cfg`` with the MoE modules ``opts`` asks for."""
    cfg = from_dict(ModelConfig, to_dict(model_cfg))  # deep copy
    if opts.vision_experts is not None:
        if cfg.vision.moe is not None:
            raise CheckpointError("the source's vision tower is already MoE; upcycling starts from a dense one")
        cfg.vision.moe = MoEConfig(num_experts=opts.vision_experts, top_k=opts.top_k)
        cfg.vision.moe_layers = list(opts.vision_layers) if opts.vision_layers is not None else None
    elif opts.vision_layers is not None:
        raise CheckpointError("--vision-layers needs --vision-experts")
    if opts.connector_experts is not None:
        if cfg.connector.moe is not None:
            raise CheckpointError("the source's connector is already MoE; upcycling starts from a dense one")
        cfg.connector.moe = MoEConfig(num_experts=opts.connector_experts, top_k=opts.top_k)
    if opts.llm_experts is not None:
        if cfg.language.moe is not None:
            raise CheckpointError("the source LLM is already MoE (Mixtral); it cannot be upcycled again")
        # An upcycled LLaMA/Mistral is a Mixtral: same layers, MoE MLPs (what the HF export writes).
        cfg.language.moe = MoEConfig(num_experts=opts.llm_experts, top_k=opts.top_k)
        cfg.language.arch = "mixtral"
    validate_tree(cfg)
    return cfg


# ------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------


def _delay() -> float:
    try:
        return float(os.environ.get(DELAY_ENV, "0") or 0)
    except ValueError:
        return 0.0


def import_checkpoint(
    sources: Sources,
    out: PathLike,
    upcycle: UpcycleOptions = UpcycleOptions(),
    parallel: ParallelConfig = ParallelConfig(),
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    progress: Progress = None,
) -> Summary:
    """Convert ``sources`` into our checkpoint at ``out`` (see the module docstring).

    ``parallel`` is the target layout: it is checked against the (upcycled) model config before
    anything is written and recorded; the checkpoint itself loads at any layout the config allows.
    ``overrides`` are ``dotted.key=value`` settings of the model config (``precision=bf16``,
    ``vision.s2_scales=[1,3]``, ...). Raises `CheckpointError` / `ConfigError` with what to fix;
    then nothing is left at ``out``.
    """
    start = time.time()
    kind = sources.check()
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    _world_of_one(upcycle.seed)
    plan = {"modules": _plan_modules, "release": _plan_release, "ours": _plan_ours}[kind](sources, overrides)
    target_cfg = upcycled_config(plan.model_cfg, upcycle) if upcycle.any else plan.model_cfg
    parallel.validate()
    check_parallel_layout(target_cfg, parallel)
    tokenizer, generation, asset_notes = _generation_assets(sources, kind, plan.model_cfg)

    from cumo_megatron.checkpoint.io import check_named_tensors
    from cumo_megatron.checkpoint.streaming import (
        DictSource, SourceChain, SpillSource, TensorSpill, build_meta_model, meta_tensors,
    )

    with atomic_output(out, overwrite) as tmp:
        model = build_meta_model(target_cfg)  # shapes only: tensors go from the source to the writer
        expected = meta_tensors(model)
        source = plan.source
        if plan.fresh_connector:
            source = SourceChain([source, DictSource(_fresh_connector(plan.model_cfg, upcycle.seed))])
        dtypes: dict[str, str] = dict(plan.info.get("dtypes", {}))
        delay = _delay()
        total = len(expected) + (len(source.names()) if upcycle.any else 0)
        done = 0

        def note(name: str, tensor: torch.Tensor) -> None:
            nonlocal done
            if tensor.is_floating_point():
                dtypes.setdefault(_module_of(name), str(tensor.dtype).replace("torch.", ""))
            done += 1
            if progress is not None:
                progress(done, total, name)
            if delay:
                time.sleep(delay)

        spill = None
        try:
            if upcycle.any:
                from cumo_megatron.moe.upcycling import upcycle_sources

                # The dense model only exists as tensors to copy from: park it on disk, in order.
                spill = TensorSpill(tmp / ".dense.spill")
                for name in source.names():
                    tensor = source.get(name)
                    note(name, tensor)
                    spill.put(name, tensor)
                try:
                    source = SpillSource(spill, upcycle_sources(spill.metas(), target_cfg, upcycle.seed))
                except ConfigError as err:
                    raise CheckpointError(str(err)) from err
            # Names and shapes are checked before anything is written.
            shapes = ((n, torch.empty(source.shape(n), device="meta")) for n in source.names())
            check_named_tensors(expected, shapes, lambda name, tensor: None)
            written: set[str] = set()

            def tensor_for(name: str) -> torch.Tensor:
                tensor = source.get(name)
                if name not in written:  # a SwiGLU fc1 is asked for once per half
                    written.add(name)
                    note(name, tensor)
                return tensor

            info = dict(plan.info)
            info.update(
                dtypes=dtypes,  # filled while writing; the sidecars are written after the tensors
                target_layout=dataclasses.asdict(parallel),
                upcycled=dataclasses.asdict(upcycle) if upcycle.any else None,
                upcycled_history=list(plan.info.get("upcycled_history", [])) + ([dataclasses.asdict(upcycle)] if upcycle.any else []),
                fresh_connector=plan.fresh_connector or plan.info.get("fresh_connector", False),
            )
            ours.save_model_checkpoint_streaming(model, tensor_for, target_cfg, tmp, passthrough=plan.passthrough, info=info)
        finally:
            if spill is not None:
                spill.close()
        for rel, path in plan.source_jsons.items():
            dest = tmp / ours.SOURCE_DIR / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
        assets.write_generation_assets(tmp, tokenizer, generation)
        params = count_params(model)
        del model
        size = ours.checkpoint_bytes(tmp)
    notes = []
    precision = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[target_cfg.precision]
    wider = sorted(m for m, d in dtypes.items() if d != precision and _itemsize(d) > _itemsize(precision))
    if wider:
        notes.append(f"warning: model precision {target_cfg.precision} is narrower than the source dtype of "
                     f"{', '.join(wider)}; those weights were rounded (exports will not be bit-exact)")
    if plan.fresh_connector:
        notes.append("connector: freshly initialised (no --connector given)")
    notes += asset_notes
    return Summary(out, target_cfg, params, size, time.time() - start, total, notes)


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def _itemsize(name: str) -> int:
    return torch.empty(0, dtype=getattr(torch, name)).element_size()


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return getattr(torch, name) if name else None


def _split_passthrough(passthrough: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key, tensor in passthrough.items():
        module, _, name = key.partition("::")
        out.setdefault(module, {})[name] = tensor
    return out


def _copy_jsons(ckpt: Path, module: str, dest: Path, skip: Sequence[str] = ()) -> list[str]:
    src = ckpt / ours.SOURCE_DIR / module
    copied = []
    if src.is_dir():
        for path in sorted(src.glob("*.json")):
            if path.name not in skip:
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest / path.name)
                copied.append(path.name)
    return copied


def _read_source_json(ckpt: Path, rel: str) -> Optional[dict]:
    path = ckpt / ours.SOURCE_DIR / rel
    return json.loads(path.read_text()) if path.is_file() else None


def _counted(stream, counter: list, progress: Progress, total: int):
    for name, tensor in stream:
        counter[0] += 1
        if progress is not None:
            progress(counter[0], total, name)
        yield name, tensor


def export_checkpoint(
    checkpoint: PathLike,
    out: PathLike,
    fmt: str = "auto",
    overwrite: bool = False,
    progress: Progress = None,
) -> Summary:
    """Export our checkpoint (written at any layout) to publishers' layouts in ``out``.

    ``fmt``: ``"split"`` writes ``language/`` (HF ``*ForCausalLM``), then for a dense vision tower
    ``vision/`` (the source's CLIP layout, else a HF ``CLIPVisionModel``) and for a dense connector
    ``mm_projector.bin`` (LLaVA); MoE vision tower / connector go to ``multimodal.safetensors``
    under the CuMo release names (``model.vision_tower.vision_model.*``, ``model.mm_projector.*``)
    with the release ``config.json`` beside it. ``"release"`` writes one original CuMo release
    directory. ``"auto"``: ``release`` when the checkpoint came from a release, else ``split``.
    A release (and the split's multimodal part) holds the whole CLIP the model came from and names
    it (``mm_vision_tower``: its hub id, else ``vision_tower/`` with its config, written beside);
    what has no place there is listed in the summary's notes.
    """
    start = time.time()
    checkpoint = ours.resolve_checkpoint_dir(checkpoint)
    model_cfg = ours.read_model_config(checkpoint)
    info = ours.read_conversion_info(checkpoint)
    if fmt == "auto":
        fmt = "release" if info.get("kind") == "release" else "split"
    if fmt not in ("split", "release"):
        raise CheckpointError(f"unknown export format {fmt!r}; choose split, release or auto")
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    _world_of_one()
    from cumo_megatron.checkpoint.streaming import LazyCheckpointState, build_meta_model

    model = build_meta_model(model_cfg)
    state = LazyCheckpointState(model, checkpoint)  # tensors load one at a time, as they are written
    params = count_params(model)
    del model
    passthrough = _split_passthrough(ours.read_passthrough(checkpoint))
    dtypes = info.get("dtypes", {})
    total = len(state) + sum(len(v) for v in passthrough.values())
    counter = [0]

    def go(stream):
        return _counted(stream, counter, progress, total)

    with atomic_output(out, overwrite) as tmp:
        if fmt == "release":
            notes = _export_release(state, model_cfg, passthrough, dtypes, info, checkpoint, tmp, out, go)
        else:
            notes = _export_split(state, model_cfg, passthrough, dtypes, info, checkpoint, tmp, out, go)
        notes += _export_tokenizer(checkpoint, tmp if fmt == "release" else tmp / "language")
        size = ours.checkpoint_bytes(tmp)
    return Summary(out, model_cfg, params, size, time.time() - start, counter[0], notes)


def _export_tokenizer(checkpoint: Path, dest: Path) -> list[str]:
    """The carried tokenizer into ``dest`` (the LLM's directory), as ``AutoTokenizer`` reads it; notes."""
    carried = assets.carried_tokenizer(checkpoint)
    if carried is None:
        return [f"warning: {checkpoint} carries no tokenizer, so {dest.name}/ has none (AutoTokenizer cannot load "
                "it): convert the checkpoint again with tools/upcycle_checkpoint.py --tokenizer, or copy one there"]
    assets.export_hf_tokenizer(carried, dest)
    return []


def _left_out_note(left: Sequence[str]) -> list[str]:
    if not left:
        return []
    shown = ", ".join(sorted(left)[:3]) + (", ..." if len(left) > 3 else "")
    return [f"note: {len(left)} tensors of the CLIP checkpoint have no place in a CuMo release and were "
            f"left out (a text tower, projections: {shown}); --format split keeps them with a dense CLIP"]


def _filled_note(layers: Sequence[int]) -> list[str]:
    if not layers:
        return []
    return [f"note: ViT layer(s) {', '.join(map(str, layers))} past the feature layer were not in the checkpoint "
            "(no source tensors kept); written as identity (all-zero) layers, which the features never use"]


def _write_release_clip(tmp: Path, model_cfg: ModelConfig, checkpoint: Path) -> None:
    """The CLIP config the release's ``mm_vision_tower`` may name, beside the weights."""
    write_clip_config(tmp / BUNDLED_CLIP_DIR, model_cfg, checkpoint / ours.SOURCE_DIR / "vision" / "preprocessor_config.json")


def _export_release(state, model_cfg, passthrough, dtypes, info, checkpoint, tmp, out, go) -> list[str]:
    """One original CuMo release directory: every tensor of the source (unbuilt ViT layers and
    ``post_layernorm`` from the passthrough, in release names), the real CLIP named."""
    dtype = _dtype(dtypes.get("language"))
    base = _read_source_json(checkpoint, "release/config.json")
    extra = {k: v for k, v in passthrough.get("release", {}).items() if not k.startswith(VISION_PREFIX)}
    extra.update(passthrough.get("language", {}))  # a per-module import's LLM: HF names = release names
    tail, left = release_vision_tail(passthrough, info, model_cfg)
    tail, filled = fill_missing_layers(tail, info, model_cfg)
    extra.update(tail)
    config = release_config(model_cfg, base=base, vision_tower=release_tower_name(info, base, Path(out)),
                            dtype=str(dtype or torch.float32).replace("torch.", ""))
    write_safetensors(tmp, go(megatron_to_release(state, model_cfg, passthrough=extra)), dtype=dtype, config=config)
    _copy_jsons(checkpoint, "release", tmp, skip=("config.json",))
    _copy_jsons(checkpoint, "language", tmp, skip=("config.json",))
    _write_release_clip(tmp, model_cfg, checkpoint)
    return _left_out_note(left) + _filled_note(filled)


def _export_split(state, model_cfg, passthrough, dtypes, info, checkpoint, tmp, out, go) -> list[str]:
    lang = model_cfg.language
    lang_dtype = _dtype(dtypes.get("language"))
    release_extra = passthrough.get("release", {})
    lm_extra = dict(passthrough.get("language", {}))
    lm_extra.update({k: v for k, v in release_extra.items() if not k.startswith(VISION_PREFIX)})
    base = _read_source_json(checkpoint, "language/config.json") or _read_source_json(checkpoint, "release/config.json")
    if base is not None and base.get("model_type", "").startswith("llava"):
        base = {k: v for k, v in base.items() if not k.startswith("mm_") and k not in _RELEASE_ONLY_FIELDS}
    if base is not None and base.get("model_type") not in (None, lang.arch):
        base = {k: v for k, v in base.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    hf_cfg = hf_config_from_language(lang, base=base, dtype=str(lang_dtype or torch.float32).replace("torch.", ""))
    write_safetensors(tmp / "language", go(megatron_to_hf_lm(state, lang, passthrough=lm_extra)),
                      dtype=lang_dtype, config=hf_cfg)
    _copy_jsons(checkpoint, "language", tmp / "language", skip=("config.json",))
    _copy_jsons(checkpoint, "release", tmp / "language", skip=("config.json",))

    vision_dtype = _dtype(dtypes.get("vision"))
    connector_dtype = _dtype(dtypes.get("connector"))
    multimodal = []
    notes: list[str] = []
    if model_cfg.vision.moe is None:
        source = info.get("vision", {})
        layout = source.get("layout", "hf")
        prefix = source.get("prefix", "") if "layout" in source else None
        if "layout" in source:
            extra = passthrough.get("vision", {})
        else:  # from a release (or no source kept): the unbuilt layers, post_layernorm in CLIPVisionModel names
            tail, filled = fill_missing_layers(
                {k: v for k, v in release_extra.items() if k.startswith(VISION_PREFIX)}, info, model_cfg)
            notes += _filled_note(filled)
            extra, _ = tower_tail_to_layout(tail, model_cfg.vision, "cumo_release", RELEASE_PREFIX, dst_prefix="")
        vdir = tmp / "vision"
        files = write_safetensors(vdir, go(megatron_to_clip(state, model_cfg.vision, layout=layout,
                                                            passthrough=extra, hf_prefix=prefix)), dtype=vision_dtype)
        copied = _copy_jsons(checkpoint, "vision", vdir)
        if layout == "open_clip":
            files[0].rename(vdir / "open_clip_model.safetensors")
        if "config.json" not in copied and layout == "hf":
            (vdir / "config.json").write_text(json.dumps(clip_vision_config(model_cfg.vision), indent=2) + "\n")
        if "preprocessor_config.json" not in copied and layout == "hf":
            (vdir / "preprocessor_config.json").write_text(json.dumps(clip_preprocessor_config(model_cfg.vision), indent=2) + "\n")
    else:
        tail, left = release_vision_tail(passthrough, info, model_cfg)
        tail, filled = fill_missing_layers(tail, info, model_cfg)
        notes += _left_out_note(left) + _filled_note(filled)
        multimodal.append(megatron_to_clip(state, model_cfg.vision, layout="cumo_release", passthrough=tail))
    if model_cfg.connector.moe is None:
        prefix = info.get("connector", {}).get("prefix", CONNECTOR_PREFIX)
        projector = {}
        for name, tensor in go(megatron_to_connector(state, model_cfg, layout="llava", source_prefix=prefix)):
            tensor = tensor.detach().contiguous().clone()
            projector[name] = tensor.to(connector_dtype) if connector_dtype and tensor.is_floating_point() else tensor
        torch.save(projector, tmp / "mm_projector.bin")
    else:
        multimodal.append(megatron_to_connector(state, model_cfg, layout="cumo_release", source_prefix=PROJECTOR_PREFIX))
    if multimodal:
        mdir = tmp / ".multimodal"
        write_safetensors(mdir, go(_chain(multimodal)), dtype=vision_dtype or connector_dtype)
        (mdir / "model.safetensors").rename(tmp / "multimodal.safetensors")
        shutil.rmtree(mdir)
        base = _read_source_json(checkpoint, "release/config.json")
        config = release_config(model_cfg, base=base, vision_tower=release_tower_name(info, base, Path(out)))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if model_cfg.vision.moe is not None:  # the image processor beside the vision tower it feeds
            (tmp / "preprocessor_config.json").write_text(json.dumps(clip_preprocessor_config(model_cfg.vision), indent=2) + "\n")
        _write_release_clip(tmp, model_cfg, checkpoint)
    return notes


# Fields of a release config.json that describe the multimodal wrapper, not the LLM.
_RELEASE_ONLY_FIELDS = (
    "clip_smoe", "mlp_smoe", "num_experts", "num_selected", "scales", "balance_loss_coef",
    "router_z_loss_coef", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "image_aspect_ratio",
    "tokenizer_model_max_length", "tokenizer_padding_side", "use_mm_proj", "local_rank",
)


class TensorProgress:
    """The tools' progress callback: a tqdm bar over tensors on stderr, made on the first update."""

    def __init__(self, desc: str, quiet: bool = False):
        self.desc = desc
        self.quiet = quiet
        self.bar = None

    def __call__(self, done: int, total: int, name: str) -> None:
        """Advance the bar to ``done`` of ``total`` tensors."""
        if self.quiet:
            return
        if self.bar is None:
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="tensor", desc=self.desc, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        """Close the bar if one was shown."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_with_progress(desc: str, quiet: bool, convert) -> int:
    """Run ``convert(progress)`` for a tool with a progress bar; print its summary; return 0.

    User errors propagate to `cumo_megatron.errors.run_cli`, which the tools wrap their main with
    (one line, the error's exit status). A missing or unreadable file, or a value the adapters
    refuse, reported by code below the tools as a plain ``OSError``/``ValueError``, becomes a
    `CheckpointError`: a conversion's inputs are checkpoints.
    """
    progress = TensorProgress(desc, quiet)
    try:
        summary = convert(progress)
    except UserError:
        raise
    except (OSError, ValueError) as err:
        raise CheckpointError(str(err)) from err
    finally:
        progress.close()
    print(summary.format())
    return 0
