"""Training checkpoints on megatron-core's `dist_checkpointing`: atomic, resumable, reshardable.

Layout of ``<save>/``::

    latest                      # "iter_0000004": the newest *complete* checkpoint
    iter_0000002/               # one checkpoint (see below)
    iter_0000004/
    iter_0000006.tmp/           # a save in progress (or interrupted): never loaded

Every ``iter_N`` is also a *model checkpoint* (`cumo_megatron.checkpoint.ours`): the tools
(``tools/upcycle_checkpoint.py --from-checkpoint``, ``tools/export_checkpoint.py``,
``python -m cumo_megatron.generate --load``) and ``ours.load_model_checkpoint`` open it directly::

    iter_0000004/
        model_config.yaml         # the run's model config
        metadata.json, common.pt, *.distcp
                                  # one megatron distributed checkpoint (torch_dist format): at the
                                  # top level the model's sharded state dict, as a model checkpoint
                                  # has it; under "optimizer" the optimizer's sharded tensors (fp32
                                  # main params, Adam moments); "trainer" is one object with the
                                  # optimizer's plain entries and the scheduler
        train_state.json          # counters (iteration, consumed samples, ...), world size, format
        ranks/rank00000.pt        # per rank: RNG states, data-loader position
        conversion.json, passthrough.safetensors, source/
                                  # copied from the checkpoint the run started from (train.load),
                                  # when it has them: exports stay exact for tensors the model
                                  # does not hold
        tokenizer/, generation.json
                                  # the run's data.tokenizer, data.template and data.aspect, so
                                  # generation needs no other flag (`cumo_megatron.checkpoint.assets`)

megatron puts every non-tensor entry of a checkpoint into ``common.pt``, which a model-only load
returns in full; keeping the optimizer's plain entries and the scheduler in one sharded object
(written by rank 0) leaves ``common.pt`` to the model, so `ours.load_model_checkpoint` loads only
the model's tensors, at any TP/PP/EP layout (megatron reshards).

Atomicity: everything is written under ``iter_N.tmp``; after a barrier rank 0 renames it to
``iter_N`` and then replaces ``latest`` (temp file + ``os.replace``), so a process killed at any
moment leaves ``latest`` naming a complete checkpoint. Older checkpoints beyond ``keep_last`` are
deleted after ``latest`` moved. A save is two steps, `stage_save` (everything under ``iter_N.tmp``)
and `commit_save` (the rename and ``latest``); an asynchronous save (`training.async_save`) stages
the same files but leaves the sharded tensors to a forked writer, and commits only after every
rank's writer is done, so the guarantee holds while training goes on.

Model weights alone (``train.load``: a converted, upcycled or earlier-stage checkpoint) load at any
TP/PP/EP layout. A dense (stage-2) checkpoint loaded into an MoE model is co-upcycled on the fly
(`load_weights`): experts copy the dense MLP, routers start fresh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject
from megatron.core.dist_checkpointing.dict_utils import merge
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.utils import extract_nonpersistent, extract_sharded_base

from cumo_megatron.checkpoint import ours
from cumo_megatron.config.loader import ConfigError, save_config
from cumo_megatron.training.pointers import (  # noqa: F401  (re-exported: the trainer's checkpoint API)
    LATEST,
    CheckpointError,
    fsync_dir,
    iteration_dir,
    list_checkpoints,
    load_latest,
    prune_checkpoints,
    read_latest,
    write_latest,
)

FORMAT = "cumo-train-ckpt-2"
TRAIN_STATE = "train_state.json"
# Top-level keys of the distributed checkpoint besides the model's own (which are dotted
# parameter names like "vision.vit.conv1.weight", so they cannot collide).
OPTIMIZER_KEY = "optimizer"
TRAINER_KEY = "trainer"
# Files of a model checkpoint that record where its weights came from (`ours`); a run carries
# them from its ``train.load`` checkpoint into each of its own.
PROVENANCE = (ours.CONVERSION_INFO, ours.PASSTHROUGH, ours.SOURCE_DIR)
# The distributed optimizer's state per DP rank as written ("dp_reshardable"): no gathers, fully
# parallel; megatron 0.16.1's default ("fully_sharded_model_space") needs flattened ranges that its
# own dist_checkpointing no longer accepts. An exact resume keeps the layout anyway.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every random stream a training step can touch on this rank."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- save / load


def _prime_torch_adam_state(optimizer) -> None:
    """Give every parameter of a fresh torch Adam(W) its state entries (step included).

    Saving and loading build the optimizer's sharded state dict from its *current* state;
    megatron's distributed optimizer without Apex/TE (CPU) reads a ``step`` from every entry, which
    a torch Adam only has after its first step. When loading, the zeros are placeholders that the
    checkpoint overwrites.
    """
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                if len(inner.state[param]) == 0:
                    inner.state[param]["step"] = torch.tensor(0.0)
                    inner.state[param]["exp_avg"] = torch.zeros_like(param.data)
                    inner.state[param]["exp_avg_sq"] = torch.zeros_like(param.data)


def _torch_adams(optimizer) -> list:
    inner = [getattr(sub, "optimizer", None) for sub in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [opt for opt in inner if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))]


def _unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own, correct ``step`` tensor after a load.

    megatron 0.16.1's distributed optimizer without Apex/TE (the CPU path) keeps the step count in
    the param groups of its checkpoint and restores it as one *shared* tensor into every
    parameter's state, and its dp_reshardable parameter state then overwrites that tensor with
    the placeholder of the loading template. torch Adam increments ``step`` in place per
    parameter, so a shared counter would also advance once per parameter per step. Either way the
    bias correction after a resume would differ from the uninterrupted run.
    """
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state.get(param)
                if not state or not isinstance(state.get("step"), torch.Tensor):
                    continue
                if "step" in group:
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)
                else:
                    state["step"] = state["step"].detach().clone()


def _trainer_object(data, rank: int) -> ShardedObject:
    """The checkpoint's one non-model, non-tensor entry; rank 0 writes it, every rank reads it."""
    return ShardedObject(f"{TRAINER_KEY}.common", data, (1,), (0,), replica_id=rank)


def _holds_parameters(optimizer) -> bool:
    """Whether the optimizer updates any parameter on this rank.

    It may not: in stage 1 (connector only) with PP > 1 the later stages train nothing, and
    megatron's distributed optimizer cannot build a state dict without parameters (it asserts on
    the step count of an empty state).
    """
    return any(len(group["params"]) for group in optimizer.param_groups)


def _optimizer_parts(optimizer, model_sd: dict, is_loading: bool) -> tuple[dict, dict]:
    """The optimizer's sharded state dict split as megatron's own save splits it.

    Returns ``(sharded, plain)``: what goes through `dist_checkpointing` (sharded tensors and
    objects; when loading, also the local placeholders megatron fills in), and the plain entries
    megatron would have put in ``common.pt`` (the sharding type; param groups without the
    distributed optimizer). Callers leave out a rank whose optimizer holds no parameter
    (`_holds_parameters`).
    """
    # Saving too: an optimizer that has not stepped yet (under fp16, every step so far skipped by
    # the loss scaler) has no Adam state, and megatron's state_dict asserts on it. The primed state
    # (step 0, zero moments) is exactly what torch Adam's first step would create.
    _prime_torch_adam_state(optimizer)
    state = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    if is_loading:  # dist_checkpointing.load keeps the structure and drops plain request entries
        return state, {}
    _, persistent = extract_nonpersistent(state)
    return extract_sharded_base(persistent)


def _copy_provenance(source: Optional[Path], dest: Path) -> list[str]:
    """Copy ``conversion.json`` / ``passthrough.safetensors`` / ``source/`` of ``source`` into ``dest``.

    Hard links where the file system allows (checkpoint files are never modified in place, and a
    large passthrough file is then not duplicated), copies otherwise. Returns what was copied.
    """
    if source is None:
        return []

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    copied = []
    for name in PROVENANCE:
        path = Path(source) / name
        if path.is_dir():
            shutil.copytree(path, dest / name, copy_function=link_or_copy)
        elif path.is_file():
            link_or_copy(path, dest / name)
        else:
            continue
        copied.append(name)
    return copied


@dataclasses.dataclass
class StagedSave:
    """A checkpoint being written under ``tmp`` and not yet committed (`stage_save`)."""

    root: Path
    iteration: int
    tmp: Path
    final: Path
    # Asynchronous staging only: megatron's request that writes the sharded tensors (its finalize
    # functions write ``.metadata`` and ``metadata.json``); None once everything is on disk.
    request: Optional[AsyncRequest] = None


def save_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    model,
    optimizer,
    scheduler,
    loader,
    train_state: dict,
    model_cfg=None,
    provenance: Optional[str | os.PathLike] = None,
    keep_last: int = 2,
    before_commit: Optional[Callable[[Path], None]] = None,
    generation_assets: Optional[Callable[[Path], object]] = None,
) -> Path:
    """Write checkpoint ``iteration`` atomically (collective: every rank calls it).

    ``model`` is the bare `CuMoModel` (not the DDP wrapper); ``loader`` has ``state_dict``;
    ``train_state`` is a small JSON-able dict of counters (rank 0's copy is stored). With
    ``model_cfg`` (a `ModelConfig`) the checkpoint is also a model checkpoint of ours
    (``model_config.yaml``); ``provenance`` is a checkpoint whose conversion records are carried
    over. ``before_commit`` runs on every rank after all data is written and before the rename
    (the trainer's `TrainingEvents.checkpoint_written`). ``generation_assets(directory)`` (rank 0) writes what generation needs
    (`cumo_megatron.checkpoint.assets.write_generation_assets`).
    """
    staged = stage_save(save_dir, iteration, model, optimizer, scheduler, loader, train_state, model_cfg=model_cfg,
                        provenance=provenance, generation_assets=generation_assets)
    return commit_save(staged, keep_last, before_commit)


def stage_save(
    save_dir: str | os.PathLike,
    iteration: int,
    model,
    optimizer,
    scheduler,
    loader,
    train_state: dict,
    model_cfg=None,
    provenance: Optional[str | os.PathLike] = None,
    generation_assets: Optional[Callable[[Path], object]] = None,
    asynchronous: bool = False,
) -> StagedSave:
    """Write everything of checkpoint ``iteration`` under ``iter_N.tmp`` (collective), uncommitted.

    Arguments as `save_checkpoint`. With ``asynchronous`` megatron only plans the sharded tensors'
    write and returns it as ``request`` (`training.async_save` runs it); everything else (megatron's
    ``common.pt``, the per-rank RNG and data-loader states, ``train_state.json`` and the run's
    files) is written now, so it holds the state of this iteration whenever the write finishes.
    """
    root = Path(save_dir)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank = _rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd = model.sharded_state_dict()
    state = dict(model_sd)
    plain = {"scheduler": scheduler.state_dict() if scheduler is not None else None, "optimizer": None}
    if optimizer is not None and _holds_parameters(optimizer):
        state[OPTIMIZER_KEY], plain["optimizer"] = _optimizer_parts(optimizer, model_sd, is_loading=False)
    state[TRAINER_KEY] = _trainer_object(plain, rank)
    if asynchronous:
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
    else:
        request = dist_checkpointing.save(state, str(tmp))
    per_rank = {"rng": rng_state(), "loader": loader.state_dict() if loader is not None else None,
                "world_size": _world()}
    (tmp / "ranks").mkdir(exist_ok=True)
    rank_file = tmp / "ranks" / f"rank{rank:05d}.pt"
    torch.save(per_rank, rank_file.with_suffix(".part"))
    os.replace(rank_file.with_suffix(".part"), rank_file)
    if rank == 0:
        record = dict(train_state, world_size=_world(), format=FORMAT)
        (tmp / TRAIN_STATE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        if model_cfg is not None:
            save_config(model_cfg, tmp / ours.MODEL_CONFIG)
        _copy_provenance(Path(provenance) if provenance else None, tmp)
        if generation_assets is not None:
            generation_assets(tmp)
    return StagedSave(root=root, iteration=iteration, tmp=tmp, final=final, request=request)


def commit_save(staged: StagedSave, keep_last: int = 2,
                before_commit: Optional[Callable[[Path], None]] = None) -> Path:
    """Make a staged checkpoint ``latest`` once every rank's data is written (collective).

    After a barrier rank 0 renames ``iter_N.tmp`` to ``iter_N``, points ``latest`` at it and
    prunes beyond ``keep_last``; ``before_commit(tmp)`` runs on every rank before the rename.
    An asynchronous save runs this as the last finalize function of its request (`async_save`).
    """
    root, final, tmp = staged.root, staged.final, staged.tmp
    _barrier()
    if before_commit is not None:
        before_commit(tmp)
    if _rank() == 0:
        if final.exists():  # left by a run that died between rename and `latest`: not referenced
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        write_latest(root, staged.iteration)
        prune_checkpoints(root, keep_last, protect=staged.iteration)
    _barrier()
    return final


def read_train_state(ckpt_dir: str | os.PathLike) -> dict:
    """``train_state.json`` of a checkpoint (counters, world size, format)."""
    path = Path(ckpt_dir) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: {ckpt_dir} was not written by this trainer (format {FORMAT}), so it "
            f"cannot be resumed; start a new run with train.load={ckpt_dir} (weights only)"
        )
    return json.loads(path.read_text())


def load_checkpoint(ckpt_dir: str | os.PathLike, model, optimizer, scheduler, loader) -> dict:
    """Restore a checkpoint written by `save_checkpoint` for an exact resume; return its train state.

    Restores model, optimizer (main params and moments), scheduler, this rank's data position and
    RNG states. Needs the world size it was saved with (per-rank state); for weights at another
    layout use `load_weights`.
    """
    ckpt = Path(ckpt_dir)
    train_state = read_train_state(ckpt)
    saved_world = train_state.get("world_size")
    if saved_world != _world():
        raise CheckpointError(
            f"{ckpt} was saved by {saved_world} processes, this run has {_world()}: an exact resume needs the "
            "same layout. To continue at another layout, start a new run with train.load="
            f"{ckpt} (weights only; the optimizer and data position start afresh)"
        )
    model_sd = model.sharded_state_dict()
    request = dict(model_sd)
    with_optimizer = optimizer is not None and _holds_parameters(optimizer)
    if with_optimizer:
        request[OPTIMIZER_KEY], _ = _optimizer_parts(optimizer, model_sd, is_loading=True)
    request[TRAINER_KEY] = _trainer_object(None, _rank())
    state = dist_checkpointing.load(request, str(ckpt))
    plain = state[TRAINER_KEY]
    model.load_state_dict({k: v for k, v in state.items() if k in model_sd})
    if with_optimizer:
        # Plain entries first, loaded tensors merged in: the order of megatron's own load.
        optimizer_state = merge(plain["optimizer"], state[OPTIMIZER_KEY])
        # Main params are leaves that require grad: megatron copies into them in place.
        with torch.no_grad():
            optimizer.load_state_dict(optimizer_state)
        _unshare_adam_steps(optimizer)
    if scheduler is not None and plain["scheduler"] is not None:
        scheduler.load_state_dict(plain["scheduler"])
    per_rank = torch.load(ckpt / "ranks" / f"rank{_rank():05d}.pt", weights_only=False)
    if loader is not None and per_rank["loader"] is not None:
        loader.load_state_dict(per_rank["loader"])
    set_rng_state(per_rank["rng"])
    return train_state


# --------------------------------------------------------------------------- weights only


def checkpoint_keys(directory: str | os.PathLike) -> set[str]:
    """Sharded-tensor keys stored in a distributed checkpoint."""
    return set(dist_checkpointing.load_tensors_metadata(str(directory)).keys())


def _load_model_only(model, directory: Path) -> None:
    sharded = model.sharded_state_dict()
    loaded = dist_checkpointing.load(sharded, str(directory))
    # Checkpoints of the first format (model nested under "model", scheduler and counters in
    # common.pt) return that common part too: keep the model's entries.
    model.load_state_dict({k: v for k, v in loaded.items() if k in sharded})


# Dense-MLP keys in a checkpoint, per MoE module (megatron's sharded keys, layers stacked).
_DENSE_KEYS = {
    "vision": "vision.vit.decoder.layers.mlp.linear_fc1.weight",
    "connector": "connector.linear_fc1.weight",
    "language": "language_model.decoder.layers.mlp.linear_fc1.weight",
}


def dense_modules_to_upcycle(keys: set[str], model_cfg) -> list[str]:
    """MoE modules of ``model_cfg`` that the checkpoint holds as dense MLPs (to be upcycled)."""
    moe = {"vision": model_cfg.vision.moe, "connector": model_cfg.connector.moe, "language": model_cfg.language.moe}
    return [name for name, cfg in moe.items() if cfg is not None and _DENSE_KEYS[name] in keys]


_EXPERT_RE = re.compile(r"^(?P<head>.*\.mlp\.)experts\.local_experts\.\d+\.(?P<tail>.+)$")
_CONNECTOR_EXPERT_RE = re.compile(r"^connector\.experts\.\d+\.(?P<tail>.+)$")


def _dense_name(moe_name: str) -> Optional[str]:
    """The dense-model parameter an MoE parameter is copied from (None: a router, fresh)."""
    if m := _EXPERT_RE.match(moe_name):
        return m.group("head") + m.group("tail")
    if m := _CONNECTOR_EXPERT_RE.match(moe_name):
        return "connector." + m.group("tail")
    if moe_name.endswith("router.weight"):
        return None
    return moe_name


def upcycle_into(dense_model, moe_model, seed: int) -> dict[str, int]:
    """Copy a dense (stage-2) model into its co-upcycled MoE model, shard by shard on this rank.

    Every local expert is an exact copy of the dense MLP of its layer (so the global expert index
    does not matter under EP); routers get `upcycling.fresh_router_weight` (the same values
    `upcycle_state_dict` gives at world size one, as long as layer names are global, i.e. PP = 1
    for the LLM). Everything else is copied. Returns counts of copied and fresh tensors.
    """
    from cumo_megatron.moe.upcycling import fresh_router_weight

    dense = dict(dense_model.named_parameters())
    counts = {"copied": 0, "router": 0}
    with torch.no_grad():
        for name, param in moe_model.named_parameters():
            source_name = _dense_name(name)
            if source_name is None:
                param.copy_(fresh_router_weight(name, param.shape[0], param.shape[1], seed, param))
                counts["router"] += 1
                continue
            source = dense.get(source_name)
            if source is None or source.shape != param.shape:
                raise CheckpointError(
                    f"upcycling: the MoE parameter {name} {tuple(param.shape)} has no dense counterpart "
                    f"{source_name} of the same shape (found {None if source is None else tuple(source.shape)})"
                )
            param.copy_(source)
            counts["copied"] += 1
    return counts


def load_weights(model, directory: str | os.PathLike, model_cfg, parallel_cfg, seed: int = 0) -> dict:
    """Load model weights only, at this run's TP/PP/EP layout (resharding as needed).

    ``directory`` is a distributed checkpoint of a CuMo model: a training checkpoint (``iter_N``),
    its parent directory (``latest`` is followed), or a converted one. When the model is MoE where
    the checkpoint is dense (stage 2 -> stage 3), the dense weights are co-upcycled on the fly.
    Returns ``{"path": ..., "upcycled": [modules]}``.
    """
    path = Path(directory)
    if (path / LATEST).is_file():
        path = read_latest(path)
    if not (path / "metadata.json").is_file():
        raise ConfigError(f"train.load={directory}: not a distributed checkpoint (no metadata.json in {path})")
    to_upcycle = dense_modules_to_upcycle(checkpoint_keys(path), model_cfg)
    if not to_upcycle:
        _load_model_only(model, path)
        return {"path": str(path), "upcycled": []}
    from cumo_megatron.models.cumo import build_model

    dense_cfg = dataclasses.replace(
        model_cfg,
        vision=dataclasses.replace(model_cfg.vision, moe=None) if "vision" in to_upcycle else model_cfg.vision,
        connector=dataclasses.replace(model_cfg.connector, moe=None)
        if "connector" in to_upcycle else model_cfg.connector,
        language=dataclasses.replace(model_cfg.language, moe=None, arch="llama" if model_cfg.language.arch == "mixtral"
                                     else model_cfg.language.arch)
        if "language" in to_upcycle else model_cfg.language,
    )
    # Building the dense twin draws init values; keep the caller's RNG streams untouched.
    saved = rng_state()
    dense_model = build_model(dense_cfg, parallel_cfg)
    set_rng_state(saved)
    _load_model_only(dense_model, path)
    upcycle_into(dense_model, model, seed)
    del dense_model
    return {"path": str(path), "upcycled": to_upcycle}
