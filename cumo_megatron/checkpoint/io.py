"""Read-only, lazy access to checkpoints in the layouts publishers ship.

`open_checkpoint(path)` returns a `LazyStateDict`: a ``Mapping[str, Tensor]`` whose keys are known
without reading any tensor, and whose tensors are read from disk only when asked for. Layouts
(a directory, or one of these files directly):

* ``model.safetensors`` or shards + ``model.safetensors.index.json`` (Mistral, Mixtral, today's
  ``save_pretrained``); headers checked with ``safetensors.safe_open``, tensors read one by one
  with positioned reads (`SafetensorsReader`);
* ``pytorch_model.bin`` or shards + ``pytorch_model.bin.index.json`` (Vicuna-7B-v1.5); each
  shard is loaded with ``torch.load(weights_only=True, mmap=True)`` when first needed, and at most
  one ``.bin`` shard is held at a time;
* OpenCLIP ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``;
* LLaVA ``mm_projector.bin``.

Pickled files are never unpickled beyond what ``weights_only=True`` allows, and any non-tensor
value in them is refused. Damaged files fail with the file named.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open

# One error type for every checkpoint problem (the adapters raise it too).
from cumo_megatron.checkpoint.adapters.common import CheckpointError, MissingKeyError

PathLike = Union[str, Path]

# Searched in this order inside a directory: the first present wins. Safetensors before pickles
# (same weights, safer and lazier to read).
DIRECTORY_LAYOUTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "mm_projector.bin",
)

# Containers some trainers wrap a state dict in (``torch.save({"state_dict": sd}, ...)``).
_WRAPPER_KEYS = ("state_dict", "model", "module")


def read_json(directory: PathLike, name: str, required: bool = True) -> Optional[dict]:
    """``directory/name`` parsed as JSON; ``None`` when absent and not ``required``.

    Raises ``FileNotFoundError`` (absent and required) or `CheckpointError` (not valid JSON), both
    naming the file.
    """
    path = Path(directory) / name
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} does not exist; the checkpoint directory needs a {name}")
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the file is damaged or incomplete") from err


def _safetensors_keys(path: Path) -> list[str]:
    """Tensor names in a safetensors file (reads only its header, which safetensors checks)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:  # SafetensorError is not importable by a stable name
        raise CheckpointError(
            f"{path} is damaged or incomplete (safetensors could not read it: {err}); "
            "download or copy the file again"
        ) from err


def _load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict, loaded memory-mapped with ``weights_only=True``; tensors only."""
    # mmap needs the zip format of torch.save (>= 1.6); older pickles are read into memory.
    mmap = zipfile.is_zipfile(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        text = str(err)
        said = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error" in line), None)
        said = said or (text.splitlines() or [type(err).__name__])[0]
        # The weights-only unpickler names the global it refused; anything else means bad bytes.
        if isinstance(err, pickle.UnpicklingError) and ("Unsupported global" in text or "Unsupported class" in text):
            raise CheckpointError(
                f"{path} holds pickled objects other than tensors and plain containers; refusing to "
                "unpickle it (that could run arbitrary code). Convert it to safetensors with a tool "
                f"you trust. torch.load said: {said}"
            ) from err
        raise CheckpointError(
            f"{path} is damaged, incomplete or not a PyTorch checkpoint (torch.load said: {said})"
        ) from err
    if isinstance(loaded, Mapping) and len(loaded) == 1:
        (only_key, inner), = loaded.items()
        if only_key in _WRAPPER_KEYS and isinstance(inner, Mapping):
            loaded = inner
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a state dict (name -> tensor)")
    bad = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if bad:
        raise CheckpointError(
            f"{path} holds non-tensor entries {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
            "a weights file must map names to tensors only"
        )
    return dict(loaded)


# safetensors dtype names -> torch dtypes (the ones model weights use).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsReader:
    """Reads tensors of one safetensors file with positioned reads into fresh memory.

    ``safe_open`` memory-maps the file: every page a read touches stays mapped, and counted in
    the process's resident memory, until the handle is closed, so reading a whole multi-GB
    checkpoint through one handle makes the process as big as the checkpoint. Plain ``pread``
    into a new tensor keeps only what the caller holds. The header is validated by
    `_safetensors_keys` (through ``safe_open``) before this reader is used.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with self.path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        self._data_start = 8 + length
        self._entries = header

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of ``key`` from the header."""
        return tuple(self._entries[key]["shape"])

    def get(self, key: str) -> torch.Tensor:
        """A new tensor holding ``key``."""
        entry = self._entries[key]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: {key!r} has dtype {entry['dtype']}, which cumo-megatron does not read")
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=dtype)
        if out.numel() * out.element_size() != end - begin:
            raise CheckpointError(f"{self.path}: {key!r} has {end - begin} bytes for shape {entry['shape']}; the file is damaged")
        if end > begin:
            from cumo_megatron.checkpoint.streaming import byte_view

            view = byte_view(out)
            with self.path.open("rb", buffering=0) as handle:
                got = os.preadv(handle.fileno(), [view], self._data_start + begin)
            if got != end - begin:
                raise CheckpointError(f"{self.path} is truncated: reading {key!r} got {got} of {end - begin} bytes")
        return out


class LazyStateDict(Mapping):
    """Read-only ``name -> Tensor`` view of a checkpoint; tensors are read on access.

    ``keys()`` / ``in`` / ``len`` never read tensor data. Safetensors files are read tensor by
    tensor; pickled ``.bin`` shards are loaded whole (memory-mapped) on first access, and only the
    most recently used one is kept (peak memory can reach one shard's size). Every tensor handed
    out is the caller's own. ``source`` names the checkpoint in errors.
    """

    def __init__(self, source: PathLike, weight_map: dict[str, Path], description: str = ""):
        self.source = Path(source)
        self.description = description or str(self.source)
        self._weight_map = weight_map  # tensor name -> file holding it
        self._bin_cache: tuple[Optional[Path], dict[str, torch.Tensor]] = (None, {})
        self._handles: dict[Path, Any] = {}

    @property
    def files(self) -> list[Path]:
        """The weight files, in first-use order."""
        return list(dict.fromkeys(self._weight_map.values()))

    def file_of(self, key: str) -> Path:
        """The file holding ``key``."""
        self._check_key(key)
        return self._weight_map[key]

    def _check_key(self, key: str) -> None:
        if key not in self._weight_map:
            raise MissingKeyError(f"tensor {key!r} is not in checkpoint {self.description}")

    def __getitem__(self, key: str) -> torch.Tensor:
        self._check_key(key)
        path = self._weight_map[key]
        if path.suffix == ".safetensors":
            try:
                return self._safetensors_handle(path).get(key)
            except CheckpointError:
                raise
            except Exception as err:
                if isinstance(err, KeyError) or "not found" in str(err).lower():
                    raise CheckpointError(
                        f"{path} does not hold {key!r} although the index of {self.description} says "
                        "it does; the index and the shards do not belong together"
                    ) from err
                raise CheckpointError(f"{path} is damaged or incomplete: reading {key!r} failed ({err})") from err
        cached_path, tensors = self._bin_cache
        if cached_path != path:
            tensors = _load_pickled_state_dict(path)
            self._bin_cache = (path, tensors)
        if key not in tensors:
            raise CheckpointError(
                f"{path} does not hold {key!r} although the index of {self.description} says it does; "
                "the index and the shards do not belong together"
            )
        # A copy: callers own what they get (the streaming writer frees tensors once written),
        # and the cached shard must stay intact for the next key.
        return tensors[key].clone()

    def _safetensors_handle(self, path: Path) -> "SafetensorsReader":
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = SafetensorsReader(path)
        return handle

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def __len__(self) -> int:
        return len(self._weight_map)

    def __contains__(self, key: object) -> bool:
        return key in self._weight_map

    def release(self) -> None:
        """Drop the cached ``.bin`` shard and open file handles (tensors handed out stay valid)."""
        self._bin_cache = (None, {})
        self._handles.clear()

    def __repr__(self) -> str:
        return f"LazyStateDict({self.description!r}, {len(self)} tensors in {len(self.files)} files)"


def _weight_map_from_index(index_path: Path) -> dict[str, Path]:
    index = read_json(index_path.parent, index_path.name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no 'weight_map' (tensor name -> shard file)")
    out: dict[str, Path] = {}
    checked: dict[str, Path] = {}
    for key, shard in weight_map.items():
        if shard not in checked:
            path = index_path.parent / shard
            if not path.is_file():
                raise CheckpointError(
                    f"{index_path} names shard {shard!r} (holding {key!r}) but {path} does not exist; "
                    "the download is incomplete"
                )
            if path.suffix == ".safetensors":
                _safetensors_keys(path)  # header check: a truncated shard fails now, by name
            checked[shard] = path
        out[key] = checked[shard]
    return out


def _open_file(path: Path, source: Path, description: str) -> LazyStateDict:
    """A `LazyStateDict` over one weights file or index (a lone ``.bin`` is loaded only once)."""
    if path.suffix in (".bin", ".pt", ".pth"):
        tensors = _load_pickled_state_dict(path)
        lazy = LazyStateDict(source, {key: path for key in tensors}, description)
        lazy._bin_cache = (path, tensors)
        return lazy
    return LazyStateDict(source, _weight_map_from_file(path), description)


def _weight_map_from_file(path: Path) -> dict[str, Path]:
    if path.name.endswith(".index.json"):
        return _weight_map_from_index(path)
    if path.suffix == ".safetensors":
        return {key: path for key in _safetensors_keys(path)}
    raise CheckpointError(
        f"{path} is not a known weights file (.safetensors, .bin/.pt/.pth, or a *.index.json)"
    )


def open_checkpoint(path: PathLike) -> LazyStateDict:
    """Open a checkpoint directory or weights file read-only (see the module docstring).

    Raises ``FileNotFoundError`` when nothing loadable is there, `CheckpointError` for a damaged,
    inconsistent or unsafe checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        for name in DIRECTORY_LAYOUTS:
            candidate = path / name
            if candidate.is_file():
                lazy = _open_file(candidate, path, f"{path} ({name})")
                if len(lazy) == 0:
                    raise CheckpointError(f"{candidate} holds no tensors")
                return lazy
        present = sorted(p.name for p in path.iterdir())[:20]
        raise FileNotFoundError(
            f"no weights found in {path}: expected one of {', '.join(DIRECTORY_LAYOUTS)}; "
            f"the directory holds {present}"
        )
    return _open_file(path, path, str(path))


def tensor_shape(src: Mapping, key: str) -> tuple[int, ...]:
    """Shape of ``src[key]``, from the safetensors header when ``src`` is lazy (no data read)."""
    if isinstance(src, LazyStateDict):
        path = src.file_of(key)
        if path.suffix == ".safetensors":
            return src._safetensors_handle(path).shape(key)
    return tuple(src[key].shape)


def check_named_tensors(expected: Mapping[str, torch.Tensor], named_tensors, sink, strict: bool = True) -> list[str]:
    """Check ``(name, tensor)`` pairs against ``expected`` (name -> tensor of the right shape) and
    hand each good one to ``sink(name, tensor)``; returns the names given.

    With ``strict`` every expected name must be given exactly once and no unknown name may
    appear (megatron's empty ``_extra_state`` entries are exempt); shapes must always match.
    Errors (`CheckpointError`) list the offending names.
    """
    seen: list[str] = []
    given: set[str] = set()
    unknown: list[str] = []
    shape_errors: list[str] = []
    for name, tensor in named_tensors:
        target = expected.get(name)
        if target is None or not isinstance(target, torch.Tensor):
            unknown.append(name)
            continue
        if tuple(target.shape) != tuple(tensor.shape):
            shape_errors.append(f"{name}: model {tuple(target.shape)} vs checkpoint {tuple(tensor.shape)}")
            continue
        if name not in given:
            sink(name, tensor)
            given.add(name)
        seen.append(name)
    duplicates = sorted(n for n, count in Counter(seen).items() if count > 1)
    missing = [
        n for n, v in expected.items()
        if isinstance(v, torch.Tensor) and n not in given and not n.endswith("_extra_state")
    ]
    problems = []
    if shape_errors:
        problems.append(f"shape mismatches: {shape_errors}")
    if strict and unknown:
        problems.append(f"names the model does not have: {unknown}")
    if strict and missing:
        problems.append(f"model tensors not given: {missing}")
    if strict and duplicates:
        problems.append(f"names given more than once: {duplicates}")
    if problems:
        raise CheckpointError("loading into the model failed: " + "; ".join(problems))
    return seen


def load_into(module: torch.nn.Module, named_tensors, strict: bool = True) -> list[str]:
    """Copy ``(name, tensor)`` pairs into ``module``'s state dict; returns the names loaded.

    Checked as `check_named_tensors` does (``strict``: every parameter and persistent buffer
    exactly once, no unknown name; shapes always).
    """
    own = module.state_dict(keep_vars=True)
    with torch.no_grad():
        return check_named_tensors(own, named_tensors, lambda name, tensor: own[name].copy_(tensor), strict)


def write_safetensors(
    directory: PathLike,
    named_tensors,
    max_shard_bytes: int = 5 * 2**30,
    config: Optional[Mapping] = None,
    dtype: Optional[torch.dtype] = None,
) -> list[Path]:
    """Write ``(name, tensor)`` pairs as a HF checkpoint: ``model.safetensors``, or shards
    ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` when they exceed
    ``max_shard_bytes``; ``config`` (if given) as ``config.json``. ``dtype`` casts floating-point
    tensors (e.g. back to a release's bf16: bf16 -> fp32 -> bf16 is lossless). Streams: at most one
    shard is held in memory. Returns the weight files written.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    weight_map: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        path = directory / f".shard-{len(shards):05d}.safetensors.tmp"
        save_file(current, str(path), metadata={"format": "pt"})
        shards.append(path)
        current, size = {}, 0

    for name, tensor in named_tensors:
        if name in weight_map or name in current:
            raise CheckpointError(f"write_safetensors: tensor {name!r} given twice")
        # Own, contiguous storage: safetensors refuses tensors that share memory (views of one fc1).
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.contiguous().clone()
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor
        weight_map[name] = len(shards)
        size += nbytes
        total += nbytes
    if current or not shards:
        flush()
    if len(shards) == 1:
        final = [directory / "model.safetensors"]
    else:
        final = [directory / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for tmp, path in zip(shards, final):
        tmp.replace(path)
    if len(final) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[i].name for k, i in weight_map.items()}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if config is not None:
        (directory / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return final
