"""Megatron checkpoints written and read one tensor at a time (memory ~ the largest tensor).

Writing (`save_streaming`): the model is built on the meta device (shapes only, no memory), and
its ``sharded_state_dict()`` goes through megatron-core's own ``dist_checkpointing.save`` with a
save strategy of ours (`StreamingSaveStrategy`): the torch_dist format, written by PyTorch's
``FileSystemWriter`` (serial, one tensor in flight; early writeback and no CRC pass, see
`stream_writer`) with a planner whose ``resolve_data`` turns
each meta tensor into real data only when it is written. The real data of a parameter comes from
a ``tensor_for(name)`` callable; each meta shard megatron hands over (a whole parameter, one half
of a SwiGLU ``linear_fc1``, a layer of a stacked key...) is a view of a meta parameter, and the
same view (``as_strided`` with the meta view's size, strides and offset) is taken of the real
tensor. The result is the same checkpoint megatron's own writer makes: same keys, global shapes
and metadata, loadable at any layout.

PyTorch's writer keeps a reference to every tensor it wrote to a file until the file is closed
(for its safetensors flavour); the planner therefore hands out tensors with storages of their
own and empties each one's storage once the next is asked for, so at most two are alive.

The writer asks for tensors in its own order (largest first), so the tensors come from a
random-access *source*: an object with ``names()``, ``shape(name)`` and ``get(name)`` (the
adapters' `RuleStream`, `LazyCheckpointState`, `DictSource`, `SourceChain`, `SpillSource`).
`TensorSpill` parks tensors that only exist as a stream (the dense model being upcycled) in a
temporary file so that they can be fetched by name.

Reading (`LazyCheckpointState`): a ``Mapping`` over one of our checkpoints that loads a tensor
when it is asked for, through ``dist_checkpointing.load`` of a one-entry sharded state dict.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Callable, Optional, Union

import torch

PathLike = Union[str, Path]


# ------------------------------------------------------------------------------------------------
# Spill file
# ------------------------------------------------------------------------------------------------


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's data (any dtype, bf16 included).

    Through ctypes rather than ``.numpy()``: a tensor whose memory numpy has seen gets a
    storage that can no longer be resized, and the streaming writer frees storages by resizing.
    """
    import ctypes

    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("byte_view needs a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


class TensorSpill:
    """Tensors written to one temporary file as they come, read back by name (a fresh copy each).

    ``put`` appends the tensor's bytes; ``get`` reads them into a new tensor. Nothing is kept in
    memory but the index. The file is removed by `close` (also on garbage collection).
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._file = open(self.path, "w+b")
        self._index: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self._end = 0

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` under ``name`` (a name given twice is an error)."""
        if name in self._index:
            raise ValueError(f"tensor {name!r} given twice")
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._file.seek(self._end)
            self._file.write(byte_view(data))
        self._index[name] = (self._end, tuple(data.shape), data.dtype)
        self._end += data.numel() * data.element_size()

    def get(self, name: str) -> torch.Tensor:
        """A new tensor holding what was put under ``name``."""
        offset, shape, dtype = self._index[name]
        out = torch.empty(shape, dtype=dtype)
        if out.numel():
            self._file.flush()
            view = byte_view(out)
            got = os.preadv(self._file.fileno(), [view], offset)
            if got != view.nbytes:
                raise OSError(f"{self.path}: short read of {name!r} ({got} of {view.nbytes} bytes)")
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name`` (no data read)."""
        return self._index[name][1]

    def metas(self) -> dict[str, torch.Tensor]:
        """Meta tensors (shape and dtype, no data) standing for the tensors held, in order."""
        return {name: torch.empty(shape, dtype=dtype, device="meta") for name, (_, shape, dtype) in self._index.items()}

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        """Names in the order they were put."""
        return list(self._index)

    @property
    def nbytes(self) -> int:
        """Bytes held in the file."""
        return self._end

    def close(self) -> None:
        """Close and delete the file."""
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------------
# Random-access tensor sources (``names`` / ``shape`` / ``get``)
# ------------------------------------------------------------------------------------------------


class DictSource:
    """A source over tensors already in memory (small ones: a fresh connector); `get` copies."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = dict(tensors)

    def names(self) -> list[str]:
        """Names in insertion order."""
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name``."""
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        """A copy of ``name`` (the writer frees what it is given)."""
        return self._tensors[name].clone()


class SourceChain:
    """Several sources as one (names must not repeat)."""

    def __init__(self, sources):
        self._sources = list(sources)
        self._owner = {}
        for source in self._sources:
            for name in source.names():
                if name in self._owner:
                    raise ValueError(f"tensor {name!r} comes from two sources")
                self._owner[name] = source

    def names(self) -> list[str]:
        """All names, source by source."""
        return list(self._owner)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name``."""
        return self._owner[name].shape(name)

    def get(self, name: str) -> torch.Tensor:
        """``name`` from the source that has it."""
        return self._owner[name].get(name)


class SpillSource:
    """Target tensors drawn from a `TensorSpill`: ``{target name: spilled name, or a tensor}``.

    How co-upcycling streams: every expert reads its dense MLP's tensor from the spill, fresh
    routers are given as tensors.
    """

    def __init__(self, spill: TensorSpill, sources_of: Mapping[str, Union[str, torch.Tensor]]):
        self._spill = spill
        self._sources_of = dict(sources_of)

    def names(self) -> list[str]:
        """Target names in order."""
        return list(self._sources_of)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of target ``name``."""
        source = self._sources_of[name]
        return self._spill.shape(source) if isinstance(source, str) else tuple(source.shape)

    def get(self, name: str) -> torch.Tensor:
        """Target ``name``, read from the spill (or a copy of the given tensor)."""
        source = self._sources_of[name]
        return self._spill.get(source) if isinstance(source, str) else source.clone()


# ------------------------------------------------------------------------------------------------
# Meta model
# ------------------------------------------------------------------------------------------------


def build_meta_model(model_cfg):
    """A world-of-one `CuMoModel` on the meta device: shapes, names and sharding, no memory."""
    from cumo_megatron.config.schema import ParallelConfig
    from cumo_megatron.models.cumo import build_model
    from cumo_megatron.models.transformer_configs import shape_only_build
    from cumo_megatron.platform import cpu

    # megatron's CLIPViTModel moves its position ids with ``.cuda()``; the CUDA->CPU mode makes
    # that a no-op for meta tensors on a CUDA host (on CPU hosts it is already active).
    with shape_only_build(), torch.device("meta"), cpu.CudaToCpuMode():
        model = build_model(model_cfg, ParallelConfig())
    allocated = [name for name, p in model.state_dict(keep_vars=True).items()
                 if isinstance(p, torch.Tensor) and not p.is_meta]
    if allocated:
        raise RuntimeError(f"meta build allocated tensors (a module ignores the meta device): {allocated[:5]}")
    return model


def meta_tensors(model) -> dict[str, torch.Tensor]:
    """The model's state-dict tensors (meta), megatron's ``_extra_state`` entries left out."""
    return {
        name: t for name, t in model.state_dict(keep_vars=True).items()
        if isinstance(t, torch.Tensor) and not name.endswith("_extra_state")
    }


# ------------------------------------------------------------------------------------------------
# Streaming save
# ------------------------------------------------------------------------------------------------


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _planner_class():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    class LazySavePlanner(MCoreSavePlanner):
        """megatron's save planner, resolving meta shards to real data only when written."""

        def __init__(self, materialize: Callable[[torch.Tensor], torch.Tensor], **kwargs):
            super().__init__(**kwargs)
            self._materialize = materialize
            self._previous: Optional[torch.Tensor] = None

        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            if not isinstance(data, torch.Tensor) or not data.is_meta:
                return data
            # The writer has finished with the previous tensor but still references it: free it.
            self.release()
            real = self._materialize(data)
            self._previous = real
            return real

        def release(self) -> None:
            """Free the last tensor handed out."""
            if self._previous is not None:
                with contextlib.suppress(RuntimeError):  # a storage that cannot resize stays alive
                    self._previous.untyped_storage().resize_(0)
                self._previous = None

    return LazySavePlanner


def _strategy_class():
    from megatron.core.dist_checkpointing.strategies.torch import (
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
        """megatron's torch_dist format, written serially by PyTorch's ``FileSystemWriter``
        (`stream_writer.writeback_writer`, records without CRC)."""

        def __init__(self, materialize: Callable[[torch.Tensor], torch.Tensor]):
            super().__init__("torch_dist", 1, thread_count=1)
            self._materialize = materialize

        def save(self, sharded_state_dict, checkpoint_dir):
            """Write ``sharded_state_dict`` (meta tensors allowed) to ``checkpoint_dir``."""
            from torch.distributed import checkpoint as dcp

            from cumo_megatron.checkpoint.stream_writer import no_record_crc32, writeback_writer

            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
            planner = _planner_class()(self._materialize, dedup_replicated_tensors=None, flatten_state_dict=False)
            try:
                with no_record_crc32():
                    dcp.save(pyt_state_dict, storage_writer=writeback_writer(checkpoint_dir), planner=planner)
            finally:
                planner.release()

    return StreamingSaveStrategy


def save_streaming(model, tensor_for: Callable[[str], torch.Tensor], checkpoint_dir: PathLike) -> None:
    """Write ``model``'s megatron checkpoint (torch_dist) with data from ``tensor_for(name)``.

    ``model`` is a world-of-one model built on the meta device (`build_meta_model`);
    ``tensor_for`` returns the full tensor of a state-dict name (any dtype: it is cast to the
    model's). Each tensor is asked for when the writer needs it (a name may be asked for more
    than once: the two halves of a SwiGLU ``linear_fc1`` are written separately). What it returns
    becomes the writer's: its storage is freed once written, so it must not be a tensor the caller
    keeps (the sources hand out fresh tensors). ``checkpoint_dir`` must exist and be empty.
    Collective over a world of one.
    """
    from megatron.core import dist_checkpointing

    partial: dict[str, torch.Tensor] = {}  # at most one tensor whose other parts are still to write
    by_storage: dict[int, tuple[str, torch.Tensor]] = {}
    for name, meta in meta_tensors(model).items():
        by_storage.setdefault(_storage_key(meta), (name, meta))

    def materialize(view: torch.Tensor) -> torch.Tensor:
        found = by_storage.get(_storage_key(view))
        if found is None:
            raise RuntimeError(
                f"streaming save: megatron asked for a tensor of shape {tuple(view.shape)} that is no "
                "view of a model parameter (a sharded_state_dict factory that copies?)"
            )
        name, meta = found
        if name in partial:  # the other half of the SwiGLU fc1 made for the previous shard
            real = partial[name]
        else:
            partial.clear()
            real = tensor_for(name)
            if tuple(real.shape) != tuple(meta.shape):
                raise RuntimeError(f"streaming save: {name} has shape {tuple(real.shape)}, the model {tuple(meta.shape)}")
            real = real.detach().to(device="cpu", dtype=meta.dtype).contiguous()
        piece = real.as_strided(view.size(), view.stride(), view.storage_offset())
        if piece.nbytes == real.untyped_storage().nbytes() and piece.is_contiguous():
            partial.clear()
            return piece  # all of ``real``: handed over (the planner frees it once written)
        # A part (one half of a SwiGLU fc1): a copy of its own, and ``real`` kept for the next part,
        # which the writer asks for next (same key, same size).
        partial[name] = real
        return piece.clone()

    failure: list[Exception] = []

    def materialize_or_remember(view: torch.Tensor) -> torch.Tensor:
        try:
            return materialize(view)
        except Exception as err:  # PyTorch wraps it in its CheckpointException: keep the original
            failure.append(err)
            raise

    try:
        dist_checkpointing.save(
            model.sharded_state_dict(), str(checkpoint_dir), sharded_strategy=_strategy_class()(materialize_or_remember)
        )
    except BaseException:
        if failure:
            raise failure[0] from None
        raise


# ------------------------------------------------------------------------------------------------
# Lazy load
# ------------------------------------------------------------------------------------------------


def _flat_request(sh_ten):
    """``sh_ten`` with its prepended (stacked-layer) axes made real size-1 axes of its data.

    megatron's torch_dist loader takes tensors with prepended axes down a legacy path that
    expects every stacked layer of the key on this rank; a single layer written as an ordinary
    chunk of the global tensor loads through the regular path (DCP reshards any chunk).
    """
    import dataclasses

    if not sh_ten.prepend_axis_num:
        return sh_ten
    data = sh_ten.data.view((1,) * sh_ten.prepend_axis_num + tuple(sh_ten.local_shape))
    return dataclasses.replace(sh_ten, data=data, local_shape=tuple(data.shape), prepend_axis_num=0,
                               axis_fragmentations=None)


def _load_one(entry, directory: Path) -> torch.Tensor:
    """Load one ``sharded_state_dict`` entry (a sharded tensor or a factory) into new memory."""
    import dataclasses

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if not isinstance(entry, (ShardedTensor, ShardedTensorFactory)) or not isinstance(entry.data, torch.Tensor):
        raise TypeError(f"a {type(entry).__name__}, not a sharded tensor")
    real = torch.empty(entry.data.shape, dtype=entry.data.dtype)
    entry = dataclasses.replace(entry, data=real)
    if isinstance(entry, ShardedTensor):
        dist_checkpointing.load({"t": _flat_request(entry)}, str(directory), validate_access_integrity=False)
        return real  # loaded in place
    shapes: list[tuple[int, ...]] = []

    def flat(sh_ten):
        shapes.append(tuple(sh_ten.local_shape))
        return _flat_request(sh_ten)

    parts = dict_list_map_inplace(flat, entry.build())
    loaded = dist_checkpointing.load({"t": parts}, str(directory), validate_access_integrity=False)["t"]
    remaining = iter(shapes)
    loaded = dict_list_map_inplace(lambda t: t.reshape(next(remaining)), loaded)
    return entry.merge_fn(loaded)


class LazyCheckpointState(Mapping):
    """Read-only ``name -> Tensor`` view of one of our checkpoints; tensors load on access.

    Keys are the world-of-one model's state-dict names (``_extra_state`` left out); each access
    runs megatron's ``dist_checkpointing.load`` on that one tensor (resharding from whatever
    layout wrote it), so memory holds one tensor at a time.
    """

    def __init__(self, model, directory: PathLike):
        from cumo_megatron.checkpoint.adapters.common import CheckpointError

        self.directory = Path(directory)
        if not (self.directory / "metadata.json").is_file():
            raise CheckpointError(
                f"{self.directory} is not a megatron dist checkpoint (no metadata.json); give one of our "
                "checkpoints (tools/upcycle_checkpoint.py writes them, the trainer's iter_N are too)"
            )
        self._sharded = model.sharded_state_dict()
        self._metas = meta_tensors(model)
        self._names = list(self._metas)
        missing = [n for n in self._names if n not in self._sharded]
        if missing:
            raise RuntimeError(f"lazy load: no sharded entries for {missing[:5]}")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._sharded or name.endswith("_extra_state"):
            raise KeyError(name)
        from cumo_megatron.checkpoint.adapters.common import CheckpointError

        try:
            return _load_one(self._sharded[name], self.directory)
        except BaseException as err:  # torch's CheckpointException derives from BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointError(f"{self.directory}: loading {name} failed ({err})") from err

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def names(self) -> list[str]:
        """The state-dict names (source protocol of `save_streaming`'s callers)."""
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name`` (from the model; nothing is read)."""
        return tuple(self._metas[name].shape)

    def get(self, name: str) -> torch.Tensor:
        """``self[name]``."""
        return self[name]


__all__ = [
    "TensorSpill",
    "DictSource",
    "SourceChain",
    "SpillSource",
    "build_meta_model",
    "meta_tensors",
    "save_streaming",
    "LazyCheckpointState",
]
