"""Lazy checkpoint reading: every publisher layout, laziness, and clear failures on bad files."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cumo_megatron.checkpoint import io as ckpt_io
from cumo_megatron.checkpoint.io import (
    CheckpointError,
    LazyStateDict,
    load_into,
    open_checkpoint,
    read_json,
    tensor_shape,
    write_safetensors,
)


def _tensors(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"model.layers.{i}.weight": torch.randn(4, 3, generator=g) for i in range(n)}
    out["model.norm.weight"] = torch.randn(3, generator=g).to(torch.bfloat16)
    out["model.count"] = torch.arange(5)
    return out


def _write_sharded(directory: Path, sd: dict, kind: str, num_shards: int = 3) -> list[Path]:
    """Shards + index in the HF naming (``model-*.safetensors`` / ``pytorch_model-*.bin``)."""
    keys = list(sd)
    per = -(-len(keys) // num_shards)
    stem, ext = ("model", "safetensors") if kind == "safetensors" else ("pytorch_model", "bin")
    weight_map, paths = {}, []
    for s in range(num_shards):
        name = f"{stem}-{s + 1:05d}-of-{num_shards:05d}.{ext}"
        chunk = {k: sd[k].contiguous() for k in keys[s * per:(s + 1) * per]}
        if kind == "safetensors":
            save_file(chunk, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(chunk, directory / name)
        weight_map.update({k: name for k in chunk})
        paths.append(directory / name)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / f"{'model.safetensors' if kind == 'safetensors' else 'pytorch_model.bin'}.index.json").write_text(
        json.dumps(index)
    )
    return paths


def _assert_same(lazy, sd):
    assert isinstance(lazy, LazyStateDict)
    assert sorted(lazy.keys()) == sorted(sd)
    assert len(lazy) == len(sd)
    for key, value in sd.items():
        assert key in lazy
        assert lazy[key].dtype == value.dtype
        assert torch.equal(lazy[key], value), key


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    ["model.safetensors", "safetensors_sharded", "pytorch_model.bin", "bin_sharded",
     "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "mm_projector.bin"],
)
def test_every_directory_layout_reads_back_exactly(tmp_path, layout):
    sd = _tensors()
    if layout == "safetensors_sharded":
        _write_sharded(tmp_path, sd, "safetensors")
    elif layout == "bin_sharded":
        _write_sharded(tmp_path, sd, "bin")
    elif layout.endswith(".safetensors"):
        save_file(sd, str(tmp_path / layout))
    else:
        torch.save(sd, tmp_path / layout)
    _assert_same(open_checkpoint(tmp_path), sd)


def test_a_weights_file_or_an_index_can_be_opened_directly(tmp_path):
    sd = _tensors()
    save_file(sd, str(tmp_path / "x.safetensors"))
    torch.save(sd, tmp_path / "x.pt")
    _assert_same(open_checkpoint(tmp_path / "x.safetensors"), sd)
    _assert_same(open_checkpoint(tmp_path / "x.pt"), sd)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    _write_sharded(shard_dir, sd, "safetensors")
    _assert_same(open_checkpoint(shard_dir / "model.safetensors.index.json"), sd)


def test_safetensors_is_preferred_over_pickles_in_one_directory(tmp_path):
    sd = _tensors()
    save_file(sd, str(tmp_path / "model.safetensors"))
    torch.save({"other": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    lazy = open_checkpoint(tmp_path)
    assert lazy.files == [tmp_path / "model.safetensors"]


def test_wrapped_state_dict_is_unwrapped(tmp_path):
    sd = _tensors()
    torch.save({"state_dict": sd}, tmp_path / "pytorch_model.bin")
    _assert_same(open_checkpoint(tmp_path), sd)


def test_legacy_non_zip_pickle_is_read_without_mmap(tmp_path):
    sd = _tensors()
    torch.save(sd, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    _assert_same(open_checkpoint(tmp_path), sd)


# ---------------------------------------------------------------------------------------------
# Laziness
# ---------------------------------------------------------------------------------------------


def test_sharded_bin_loads_shards_lazily_memory_mapped_and_caches_one(tmp_path, monkeypatch):
    sd = _tensors(n=8)
    shards = _write_sharded(tmp_path, sd, "bin", num_shards=3)
    calls = []
    real_load = torch.load

    def counting_load(path, *args, **kwargs):
        calls.append((Path(path).name, kwargs.get("mmap"), kwargs.get("weights_only")))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_io.torch, "load", counting_load)
    lazy = open_checkpoint(tmp_path)
    assert sorted(lazy.keys()) == sorted(sd) and calls == []  # keys come from the index alone
    first_shard_keys = [k for k in sd if lazy.file_of(k) == shards[0]]
    for key in first_shard_keys:
        assert torch.equal(lazy[key], sd[key])
    assert calls == [(shards[0].name, True, True)]  # one load for the whole shard, mmap, weights only
    last = next(k for k in sd if lazy.file_of(k) == shards[2])
    lazy[last]
    lazy[first_shard_keys[0]]  # evicted: at most one shard is cached
    assert [c[0] for c in calls] == [shards[0].name, shards[2].name, shards[0].name]


def test_single_bin_is_loaded_once(tmp_path, monkeypatch):
    sd = _tensors()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(ckpt_io.torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    _assert_same(open_checkpoint(tmp_path), sd)
    assert len(calls) == 1 and calls[0]["mmap"] is True and calls[0]["weights_only"] is True


def test_safetensors_keys_and_shapes_without_reading_tensors(tmp_path, monkeypatch):
    sd = _tensors()
    _write_sharded(tmp_path, sd, "safetensors")
    lazy = open_checkpoint(tmp_path)

    def no_reads(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(LazyStateDict, "__getitem__", no_reads)
    assert sorted(lazy) == sorted(sd)
    assert tensor_shape(lazy, "model.layers.0.weight") == (4, 3)


# ---------------------------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------------------------


def test_truncated_safetensors_is_reported_by_name(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 7])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged or incomplete"):
        open_checkpoint(tmp_path)


def test_truncated_shard_is_reported_by_name_when_opening(tmp_path):
    shards = _write_sharded(tmp_path, _tensors(), "safetensors")
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:20])
    with pytest.raises(CheckpointError, match=rf"{shards[1].name} is damaged or incomplete"):
        open_checkpoint(tmp_path)


def test_corrupt_bin_is_reported_by_name(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is damaged, incomplete"):
        open_checkpoint(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    shards = _write_sharded(tmp_path, _tensors(), "safetensors")
    shards[2].unlink()
    with pytest.raises(CheckpointError, match=rf"names shard '{shards[2].name}'.*does not exist"):
        open_checkpoint(tmp_path)


def test_index_and_shard_that_disagree(tmp_path):
    sd = _tensors()
    _write_sharded(tmp_path, sd, "bin")
    index_path = tmp_path / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.ghost"] = "pytorch_model-00001-of-00003.bin"
    index_path.write_text(json.dumps(index))
    lazy = open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="model.ghost.*do not belong together"):
        lazy["model.ghost"]


def test_missing_key_names_key_and_checkpoint(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    lazy = open_checkpoint(tmp_path)
    with pytest.raises(KeyError) as info:
        lazy["model.layers.99.weight"]
    message = str(info.value)
    assert "model.layers.99.weight" in message and str(tmp_path) in message


def test_pickled_arbitrary_object_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    torch.save({"weight": torch.zeros(2), "payload": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        open_checkpoint(tmp_path)
    assert not marker.exists()


def test_pickled_non_tensor_values_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(2), "epoch": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="non-tensor entries.*epoch"):
        open_checkpoint(tmp_path)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="no weights found.*notes.txt"):
        open_checkpoint(tmp_path)


def test_read_json(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert read_json(tmp_path, "config.json") == {"a": 1}
    assert read_json(tmp_path, "absent.json", required=False) is None
    with pytest.raises(FileNotFoundError, match="absent.json"):
        read_json(tmp_path, "absent.json")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(CheckpointError, match="bad.json is not valid JSON"):
        read_json(tmp_path, "bad.json")


# ---------------------------------------------------------------------------------------------
# Writing and loading
# ---------------------------------------------------------------------------------------------


def test_write_safetensors_shards_and_reads_back(tmp_path):
    sd = _tensors(n=8)
    fused = torch.randn(8, 3)
    pairs = list(sd.items()) + [("half.a", fused[:4]), ("half.b", fused[4:])]  # views sharing storage
    files = write_safetensors(tmp_path, iter(pairs), max_shard_bytes=100, config={"model_type": "llama"})
    assert len(files) > 1 and all(f.name.startswith("model-") for f in files)
    lazy = open_checkpoint(tmp_path)
    _assert_same(lazy, dict(pairs))
    assert read_json(tmp_path, "config.json") == {"model_type": "llama"}
    single = tmp_path / "single"
    assert write_safetensors(single, iter(pairs)) == [single / "model.safetensors"]
    cast = tmp_path / "bf16"
    write_safetensors(cast, iter(pairs), dtype=torch.bfloat16)
    back = open_checkpoint(cast)
    assert back["half.a"].dtype == torch.bfloat16 and back["model.count"].dtype == torch.int64
    with pytest.raises(CheckpointError, match="given twice"):
        write_safetensors(tmp_path / "dup", iter(pairs + pairs[:1]))


def test_load_into_is_strict():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    good = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    load_into(model, good.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good.items())
    with pytest.raises(CheckpointError, match=r"not given: \['1.bias'\]"):
        load_into(model, [(k, v) for k, v in good.items() if k != "1.bias"])
    with pytest.raises(CheckpointError, match="does not have: \\['extra'\\]"):
        load_into(model, list(good.items()) + [("extra", torch.zeros(1))])
    with pytest.raises(CheckpointError, match=r"0.weight: model \(2, 3\) vs checkpoint \(3, 2\)"):
        load_into(model, [(k, v.t() if k == "0.weight" else v) for k, v in good.items()])
