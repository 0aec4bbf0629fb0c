"""Our checkpoint format: a directory any TP x PP x EP layout can load.

Layout of a model checkpoint directory (what `tools/upcycle_checkpoint.py` writes and the
trainer's ``train.load`` reads)::

    model_config.yaml          our `ModelConfig` (`cumo_megatron.config.save_config`)
    metadata.json, common.pt,  a megatron-core ``dist_checkpointing`` checkpoint (torch_dist format)
    __*.distcp                 of ``CuMoModel.sharded_state_dict()``
    conversion.json            provenance: sources, their layouts and dtypes, target layout, sizes
    passthrough.safetensors    (optional) source tensors the model does not use, so exports are exact
    source/                    (optional) the sources' JSON configs, reused by exports
    tokenizer/, generation.json  what generation needs: the LLM's tokenizer files, the template
                               and image aspect handling (`cumo_megatron.checkpoint.assets`)

The torch_dist format stores global tensors with their shard offsets, so a checkpoint written by one
process loads at any layout the model config allows (megatron reshards at load time), and one
written at TP2/PP2/EP2 loads in a world of one. Loading reads tensors only: megatron's
``common.pt`` goes through ``torch.load`` whose default is ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from cumo_megatron.checkpoint.adapters.common import CheckpointError
from cumo_megatron.config.loader import load_config, save_config
from cumo_megatron.config.schema import ModelConfig

PathLike = Union[str, Path]

MODEL_CONFIG = "model_config.yaml"
CONVERSION_INFO = "conversion.json"
PASSTHROUGH = "passthrough.safetensors"
SOURCE_DIR = "source"


def resolve_checkpoint_dir(directory: PathLike) -> Path:
    """``directory``, or the checkpoint its ``latest`` file names (a trainer's save directory)."""
    directory = Path(directory)
    pointer = directory / "latest"
    if pointer.is_file() and not (directory / MODEL_CONFIG).is_file():
        return directory / pointer.read_text().strip()
    return directory


def is_model_checkpoint(directory: PathLike) -> bool:
    """Whether ``directory`` looks like one of our model checkpoints (config + megatron metadata)."""
    directory = resolve_checkpoint_dir(directory)
    return (directory / MODEL_CONFIG).is_file() and (directory / "metadata.json").is_file()


def read_model_config(directory: PathLike) -> ModelConfig:
    """The `ModelConfig` stored in a checkpoint directory (validated)."""
    directory = resolve_checkpoint_dir(directory)
    path = directory / MODEL_CONFIG
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: {directory} is not a cumo-megatron model checkpoint "
            "(write one with tools/upcycle_checkpoint.py)"
        )
    return load_config(ModelConfig, path)


def read_conversion_info(directory: PathLike) -> dict:
    """``conversion.json`` of a checkpoint ({} when absent)."""
    path = resolve_checkpoint_dir(directory) / CONVERSION_INFO
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is damaged") from err


def read_passthrough(directory: PathLike) -> dict[str, torch.Tensor]:
    """The passthrough tensors of a checkpoint ({} when there are none)."""
    path = resolve_checkpoint_dir(directory) / PASSTHROUGH
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{path} is damaged or incomplete ({err})") from err


def _ensure_process_group() -> None:
    """megatron's checkpoint code needs torch.distributed; bring up a world of one if absent."""
    if not torch.distributed.is_initialized():
        import cumo_megatron.platform as platform

        platform.initialize(platform.ParallelSizes(), seed=0)


def _write_sidecars(model_cfg: ModelConfig, out_dir: Path, passthrough, info) -> None:
    """Rank 0's part of a model checkpoint: the config, passthrough tensors and provenance."""
    save_config(model_cfg, out_dir / MODEL_CONFIG)
    if passthrough:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in passthrough.items()}, str(out_dir / PASSTHROUGH))
    if info is not None:
        (out_dir / CONVERSION_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def save_model_checkpoint(
    model,
    model_cfg: ModelConfig,
    out_dir: PathLike,
    passthrough: Optional[Mapping[str, torch.Tensor]] = None,
    info: Optional[dict] = None,
) -> None:
    """Write ``model`` (a `CuMoModel` of this rank's layout) with its config into ``out_dir``.

    Collective: every rank calls it with the same ``out_dir``. Rank 0 writes the config, the
    ``passthrough`` tensors and ``info`` (as ``conversion.json``). ``out_dir`` must exist or be
    creatable; it is written in place (atomic directories are `convert.atomic_output`'s job).
    """
    from megatron.core import dist_checkpointing

    _ensure_process_group()
    out_dir = Path(out_dir)
    rank = torch.distributed.get_rank()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(out_dir))
    if rank == 0:
        _write_sidecars(model_cfg, out_dir, passthrough, info)
    torch.distributed.barrier()


def save_model_checkpoint_streaming(
    meta_model,
    tensor_for,
    model_cfg: ModelConfig,
    out_dir: PathLike,
    passthrough: Optional[Mapping[str, torch.Tensor]] = None,
    info: Optional[dict] = None,
) -> None:
    """Write a model checkpoint one tensor at a time (world of one; the conversion tools' path).

    ``meta_model`` is the model built on the meta device (`streaming.build_meta_model`);
    ``tensor_for(name)`` returns each state-dict tensor when the writer needs it, as a tensor
    the writer may free (`streaming.save_streaming`). Same files as `save_model_checkpoint`.
    """
    from cumo_megatron.checkpoint.streaming import save_streaming

    _ensure_process_group()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_streaming(meta_model, tensor_for, out_dir)
    _write_sidecars(model_cfg, out_dir, passthrough, info)


def require_model_checkpoint(directory: PathLike) -> Path:
    """The checkpoint directory ``directory`` stands for; `CheckpointError` if it is not one of ours."""
    directory = resolve_checkpoint_dir(directory)
    if not is_model_checkpoint(directory):
        raise CheckpointError(
            f"{directory} is not a cumo-megatron model checkpoint (needs {MODEL_CONFIG} and megatron's "
            "metadata.json); convert weights with tools/upcycle_checkpoint.py first"
        )
    return directory


def load_model_checkpoint(model, directory: PathLike, strict: bool = True) -> None:
    """Load a checkpoint directory into ``model`` (any layout: megatron reshards).

    Raises `CheckpointError` naming the directory when it is not one of ours or does not fit
    the model (missing tensors, wrong shapes).
    """
    from megatron.core import dist_checkpointing

    directory = require_model_checkpoint(directory)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    _ensure_process_group()
    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
    except (Exception, CheckpointException) as err:
        raise CheckpointError(
            f"loading {directory} into the model failed: {err}. Check that the model is built from "
            f"the checkpoint's {MODEL_CONFIG}"
        ) from err
    model.load_state_dict(state, strict=strict)


def checkpoint_bytes(directory: PathLike) -> int:
    """Total size of the files in a directory tree."""
    total = 0
    for root, _, files in os.walk(directory):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total


__all__ = [
    "resolve_checkpoint_dir",
    "MODEL_CONFIG",
    "CONVERSION_INFO",
    "PASSTHROUGH",
    "SOURCE_DIR",
    "is_model_checkpoint",
    "require_model_checkpoint",
    "read_model_config",
    "read_conversion_info",
    "read_passthrough",
    "save_model_checkpoint",
    "save_model_checkpoint_streaming",
    "load_model_checkpoint",
    "checkpoint_bytes",
]
