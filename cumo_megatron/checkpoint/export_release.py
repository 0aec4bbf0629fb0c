"""What an export in the CuMo release layout needs besides the converted weights (`convert`).

* `release_vision_tail`: the tower tensors the model does not build (the layers after the feature
  layer, ``post_layernorm``), kept in the checkpoint's passthrough under the source's names, in the
  release's names: the original code builds every layer of the CLIP, so a release without them
  loads neither there nor in our importer.
* `fill_missing_layers`: identity layers where a model trained from scratch has none.
* `release_tower_name`: what ``mm_vision_tower`` says: the hub id the CLIP came from, else the
  copy of its config written beside the weights (`write_clip_config`).
* `clip_vision_config` / `clip_preprocessor_config`: a transformers ``CLIPVisionModel`` config and
  ``CLIPImageProcessor`` config for our tower (what the original ``CLIPVisionTower`` reads).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Mapping, Optional

import torch

from cumo_megatron.checkpoint.adapters.cumo_release import BUNDLED_CLIP_DIR, VISION_PREFIX
from cumo_megatron.checkpoint.adapters.vision import RELEASE_PREFIX, identity_layer, tower_tail_to_layout
from cumo_megatron.config.schema import ModelConfig, VisionConfig

# A hub id (``org/name``), as LLaVA/CuMo configs name their CLIP; a path has more parts or a root.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# The hub cache's layout: .../models--<org>--<name>/snapshots/<revision>
_HUB_CACHE = re.compile(r"models--([\w.-]+?)--([\w.-]+)/snapshots/")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub id (``openai/clip-vit-large-patch14-336``), not a path
    (absolute, or a relative one that exists here)."""
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).is_absolute() and not Path(name).exists()


def hub_id_of_path(path: str) -> Optional[str]:
    """The hub id of a checkpoint that lives in the hub's cache (``models--org--name/snapshots``)."""
    match = _HUB_CACHE.search(Path(path).absolute().as_posix() + "/")
    return f"{match.group(1)}/{match.group(2)}" if match else None


def release_tower_name(info: Mapping, base: Optional[Mapping], out: Path) -> str:
    """``mm_vision_tower`` of an export: the hub id the model's CLIP came from (a release that
    named one, a ``--vision`` directory in the hub cache), else the CLIP config written beside the
    release (``out/vision_tower``, absolute: the original code resolves it from its own cwd)."""
    named = (base or {}).get("mm_vision_tower")
    if isinstance(named, str) and is_hub_id(named):
        return named
    source = info.get("vision", {}).get("path")
    if source and (hub := hub_id_of_path(source)):
        return hub
    return str(Path(out).absolute() / BUNDLED_CLIP_DIR)


def clip_vision_config(vision: VisionConfig, num_layers: Optional[int] = None) -> dict:
    """A transformers ``CLIPVisionModel`` ``config.json`` for our tower with ``num_layers``
    layers (default: all of the CLIP's, built or not)."""
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": vision.hidden_size,
        "intermediate_size": vision.ffn_hidden_size,
        "num_hidden_layers": vision.num_layers if num_layers is None else num_layers,
        "num_attention_heads": vision.num_heads,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "num_channels": 3,
        "hidden_act": vision.activation,
        "layer_norm_eps": vision.layernorm_eps,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }


def clip_preprocessor_config(vision: VisionConfig) -> dict:
    """A ``CLIPImageProcessor`` ``preprocessor_config.json`` (CLIP's resize / crop, our mean and std)."""
    return {
        "crop_size": {"height": vision.image_size, "width": vision.image_size},
        "do_center_crop": True, "do_normalize": True, "do_resize": True, "do_rescale": True,
        "do_convert_rgb": True, "rescale_factor": 1 / 255, "resample": 3,
        "size": {"shortest_edge": vision.image_size},
        "image_mean": list(vision.image_mean), "image_std": list(vision.image_std),
        "image_processor_type": "CLIPImageProcessor",
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_clip_config(directory: Path, model_cfg: ModelConfig, preprocessor: Optional[Path] = None) -> None:
    """``directory/config.json`` + ``preprocessor_config.json``: the CLIP as the original
    ``CLIPVisionTower`` reads it (``CLIPVisionConfig`` / ``CLIPImageProcessor.from_pretrained``).

    ``preprocessor``: the source CLIP's own file, copied when there is one (it may carry settings
    we do not model); else one is written from our mean and std.
    """
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "config.json", clip_vision_config(model_cfg.vision))
    if preprocessor is not None and preprocessor.is_file():
        shutil.copyfile(preprocessor, directory / "preprocessor_config.json")
    else:
        _write_json(directory / "preprocessor_config.json", clip_preprocessor_config(model_cfg.vision))


def _router_seed(info: Mapping) -> int:
    """The seed of the upcycling that made the tower MoE (its fresh routers'), else 0."""
    for entry in reversed(info.get("upcycled_history") or []):
        if entry and entry.get("vision_experts") is not None:
            return int(entry.get("seed", 0))
    return 0


def release_vision_tail(
    passthrough: Mapping[str, Mapping[str, torch.Tensor]],
    info: Mapping,
    model_cfg: ModelConfig,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The passthrough's tower tensors in the release's names (``model.vision_tower.vision_model.*``).

    ``passthrough``: the checkpoint's, by module (``vision``: a per-module import's CLIP tensors
    under the source's names; ``release``: a release import's, already in release names). For a
    CLIP-MoE every layer the release holds is an MoE layer, as in the original code: dense
    leftovers become experts copying the MLP and a fresh gate (seeded as the upcycling was).
    Returns (tensors, source keys with no place in a release: a text tower, OpenCLIP's ``proj``).
    """
    vision = model_cfg.vision
    all_moe = vision.moe is not None and (
        vision.moe_layers is None or sorted(vision.moe_layers) == list(range(vision.built_layers))
    )
    seed = _router_seed(info) if all_moe else None
    source = info.get("vision", {})
    tail: dict[str, torch.Tensor] = {}
    left: list[str] = []
    if "layout" in source:  # a per-module import: the CLIP's own layout and prefix
        moved, rest = tower_tail_to_layout(
            passthrough.get("vision", {}), vision, source["layout"], source.get("prefix", ""), RELEASE_PREFIX, seed
        )
        tail.update(moved)
        left += list(rest)
    release = {k: v for k, v in passthrough.get("release", {}).items() if k.startswith(VISION_PREFIX)}
    if release:
        moved, rest = tower_tail_to_layout(release, vision, "cumo_release", RELEASE_PREFIX, RELEASE_PREFIX, seed)
        tail.update(moved)
        tail.update(rest)  # under model.vision_tower. but outside its vision_model: keep as it was
    return tail, left


def fill_missing_layers(
    tail: dict[str, torch.Tensor], info: Mapping, model_cfg: ModelConfig
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """``tail`` with an identity layer (`identity_layer`) for every unbuilt layer it lacks: a model
    trained from scratch has no source, so nothing kept those layers; without them neither the
    original code nor our importer builds the depth the CLIP config names. Returns the layers added."""
    vision = model_cfg.vision
    missing = [i for i in range(vision.built_layers, vision.num_layers)
               if not any(k.startswith(f"{RELEASE_PREFIX}encoder.layers.{i}.") for k in tail)]
    if not missing:
        return tail, []
    filled: dict[str, torch.Tensor] = {}
    for i in missing:
        filled.update(identity_layer(vision, RELEASE_PREFIX, i))
    all_moe = vision.moe is not None and (
        vision.moe_layers is None or sorted(vision.moe_layers) == list(range(vision.built_layers))
    )
    if all_moe:
        filled, _ = tower_tail_to_layout(filled, vision, "cumo_release", RELEASE_PREFIX, RELEASE_PREFIX, _router_seed(info))
    return {**tail, **filled}, missing
