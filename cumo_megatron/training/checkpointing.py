"""Training checkpoints on megatron-core's `dist_checkpointing`: atomic, resumable, reshardable.

Layout of ``<save>/``::

    latest                      # "iter_0000004": the newest *complete* checkpoint
    iter_0000002/               # a megatron distributed checkpoint (torch_dist format)
        metadata.json, common.pt, *.distcp
        ranks/rank00000.pt      # per rank: RNG states, data-loader position
    iter_0000004/
    iter_0000006.tmp/           # a save in progress (or interrupted): never loaded

Sharded part (``model`` and ``optimizer``, fp32 main params and Adam moments included) is written
by every rank through `dist_checkpointing.save`; the scheduler and train counters go to the common
part (rank 0). RNG states and the sampler position differ per rank and are stored as one small
file per rank. Atomicity: everything is written under ``iter_N.tmp``; after a barrier rank 0
renames it to ``iter_N`` and then replaces ``latest`` (temp file + ``os.replace``), so a process
killed at any moment leaves ``latest`` naming a complete checkpoint. Older checkpoints beyond
``keep_last`` are deleted after ``latest`` moved.

Model weights alone (``train.load``: a converted, upcycled or earlier-stage checkpoint) load at any
TP/PP/EP layout: `dist_checkpointing` reshards. A dense (stage-2) checkpoint loaded into an MoE
model is co-upcycled on the fly (`load_weights`): experts copy the dense MLP, routers start fresh.
"""

from __future__ import annotations

import dataclasses
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

from cumo_megatron.config.loader import ConfigError

LATEST = "latest"
FORMAT = "cumo-train-ckpt-1"
# The distributed optimizer's state per DP rank as written ("dp_reshardable"): no gathers, fully
# parallel; megatron 0.16.1's default ("fully_sharded_model_space") needs flattened ranges that its
# own dist_checkpointing no longer accepts. An exact resume keeps the layout anyway.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
_ITER_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what to do about it."""


def iteration_dir(save_dir: str | os.PathLike, iteration: int) -> Path:
    """``<save_dir>/iter_XXXXXXX``."""
    return Path(save_dir) / f"iter_{iteration:07d}"


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


# --------------------------------------------------------------------------- pointers


def read_latest(save_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint ``latest`` names, or None when there is none yet.

    Raises `CheckpointError` when ``latest`` names a directory that is missing or incomplete.
    """
    pointer = Path(save_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _ITER_RE.match(name):
        raise CheckpointError(f"{pointer} holds {name!r}, not an iter_XXXXXXX name; fix or delete the file")
    path = Path(save_dir) / name
    if not (path / "metadata.json").is_file():
        raise CheckpointError(
            f"{pointer} names {path}, which is missing or incomplete (no metadata.json); "
            "point `latest` at an earlier iter_* directory or remove it to start afresh"
        )
    return path


def load_latest(save_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint a resumed run continues from (``latest``), or None for a fresh start."""
    return read_latest(save_dir)


def _write_latest(save_dir: Path, iteration: int) -> None:
    tmp = save_dir / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(iteration_dir(save_dir, iteration).name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, save_dir / LATEST)
    _fsync_dir(save_dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(save_dir: str | os.PathLike) -> list[int]:
    """Iterations of the complete (renamed) checkpoints in ``save_dir``, ascending."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER_RE.match(p.name))]
    return sorted(found)


def prune_checkpoints(save_dir: str | os.PathLike, keep_last: int, protect: int) -> list[int]:
    """Delete all but the newest ``keep_last`` checkpoints (never ``protect``); return what went."""
    if keep_last <= 0:
        return []
    its = list_checkpoints(save_dir)
    doomed = [it for it in its[:-keep_last] if it != protect]
    for it in doomed:
        shutil.rmtree(iteration_dir(save_dir, it), ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------- save / load


def _prime_torch_adam_state(optimizer) -> None:
    """Give every parameter of a fresh torch Adam(W) its state entries (step included).

    Loading builds the optimizer's sharded state dict from its *current* state; megatron's
    distributed optimizer without Apex/TE (CPU) reads a ``step`` from every entry, which a torch
    Adam only has after its first step. Zeros are placeholders: the checkpoint overwrites them.
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


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    if is_loading and optimizer is not None:
        _prime_torch_adam_state(optimizer)
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return state


def save_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    model,
    optimizer,
    scheduler,
    loader,
    train_state: dict,
    keep_last: int = 2,
    before_commit: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write checkpoint ``iteration`` atomically (collective: every rank calls it).

    ``model`` is the bare `CuMoModel` (not the DDP wrapper); ``loader`` has ``state_dict``;
    ``train_state`` is a small dict of counters (rank 0's copy is stored). ``before_commit`` runs on
    every rank after all data is written and before the rename (a test hook).
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
    state = _sharded_state(model, optimizer, is_loading=False)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["train_state"] = dict(train_state, world_size=_world(), format=FORMAT)
    dist_checkpointing.save(state, str(tmp))
    per_rank = {"rng": rng_state(), "loader": loader.state_dict() if loader is not None else None,
                "world_size": _world()}
    (tmp / "ranks").mkdir(exist_ok=True)
    rank_file = tmp / "ranks" / f"rank{rank:05d}.pt"
    torch.save(per_rank, rank_file.with_suffix(".part"))
    os.replace(rank_file.with_suffix(".part"), rank_file)
    _barrier()
    if before_commit is not None:
        before_commit(tmp)
    if rank == 0:
        if final.exists():  # left by a run that died between rename and `latest`: not referenced
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_latest(root, iteration)
        prune_checkpoints(root, keep_last, protect=iteration)
    _barrier()
    return final


def load_checkpoint(ckpt_dir: str | os.PathLike, model, optimizer, scheduler, loader) -> dict:
    """Restore a checkpoint written by `save_checkpoint` for an exact resume; return its train state.

    Restores model, optimizer (main params and moments), scheduler, this rank's data position and
    RNG states. Needs the world size it was saved with (per-rank state); for weights at another
    layout use `load_weights`.
    """
    ckpt = Path(ckpt_dir)
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    saved_world = common.get("train_state", {}).get("world_size")
    if saved_world != _world():
        raise CheckpointError(
            f"{ckpt} was saved by {saved_world} processes, this run has {_world()}: an exact resume needs the "
            "same layout. To continue at another layout, start a new run with train.load="
            f"{ckpt} (weights only; the optimizer and data position start afresh)"
        )
    sharded = _sharded_state(model, optimizer, is_loading=True)
    state = dist_checkpointing.load(sharded, str(ckpt))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        # Main params are leaves that require grad: megatron copies into them in place.
        with torch.no_grad():
            optimizer.load_state_dict(state["optimizer"])
        _unshare_adam_steps(optimizer)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    per_rank = torch.load(ckpt / "ranks" / f"rank{_rank():05d}.pt", weights_only=False)
    if loader is not None and per_rank["loader"] is not None:
        loader.load_state_dict(per_rank["loader"])
    set_rng_state(per_rank["rng"])
    return state["train_state"]


# --------------------------------------------------------------------------- weights only


def checkpoint_keys(directory: str | os.PathLike) -> set[str]:
    """Sharded-tensor keys stored in a distributed checkpoint."""
    return set(dist_checkpointing.load_tensors_metadata(str(directory)).keys())


def _load_model_only(model, directory: Path) -> None:
    sharded = model.sharded_state_dict()
    loaded = dist_checkpointing.load(sharded, str(directory))
    # A training checkpoint's common part (scheduler, counters) comes back too: keep the model's.
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
