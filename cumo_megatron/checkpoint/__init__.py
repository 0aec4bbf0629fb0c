"""Checkpoints in publishers' layouts <-> our megatron-core CuMoModel (world of one: TP = PP = EP = 1).

* `io`: `open_checkpoint` (lazy, read-only ``Mapping[str, Tensor]`` over safetensors / sharded
  safetensors / ``.bin`` / sharded ``.bin`` / OpenCLIP / ``mm_projector.bin``), `read_json`,
  `write_safetensors`, `load_into` (strict copy of converted tensors into a model).
* `adapters.language`: HF LLaMA / Mistral / Mixtral <-> our ``language_model.*``
  (`language_config_from_hf`, `hf_lm_to_megatron`, `megatron_to_hf_lm`, `hf_config_from_language`).
* `adapters.vision`: HF CLIP (transformers 4/5, full ``CLIPModel``), OpenCLIP, CuMo CLIP-MoE <->
  ``vision.vit.*``.
* `adapters.connector`: LLaVA ``mm_projector`` / CuMo MLP-MoE <-> ``connector.*``.
* `adapters.cumo_release`: a whole original CuMo release directory <-> the whole CuMoModel.
* `ours` (import it directly: it builds megatron models): our checkpoint directory, a megatron
  ``dist_checkpointing`` checkpoint plus ``model_config.yaml``, loadable at any TP/PP/EP layout.
* `export_release`: what a CuMo-release export needs besides the weights (the unbuilt ViT layers
  in release names, the CLIP it names and that CLIP's config).
* `convert`: the library behind ``tools/upcycle_checkpoint.py`` and ``tools/export_checkpoint.py``.

Every converter is a generator of ``(name, tensor)`` that reads one source tensor at a time, so a
lazy checkpoint streams through. Typical import::

    src = open_checkpoint(release_dir)
    cfg = model_config_from_release(release_dir)
    model = build_model(cfg, ParallelConfig())
    load_into(model, release_to_megatron(src, cfg))
"""

from cumo_megatron.checkpoint.adapters.common import CheckpointError, MissingKeyError
from cumo_megatron.checkpoint.adapters.connector import (
    connector_to_megatron,
    detect_connector_layout,
    megatron_to_connector,
)
from cumo_megatron.checkpoint.adapters.cumo_release import (
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
    clip_to_megatron,
    clip_unused_keys,
    detect_clip_layout,
    megatron_to_clip,
    vision_config_from_hf,
)
from cumo_megatron.checkpoint.io import (
    LazyStateDict,
    load_into,
    open_checkpoint,
    read_json,
    tensor_shape,
    write_safetensors,
)

__all__ = [
    "CheckpointError",
    "MissingKeyError",
    "LazyStateDict",
    "open_checkpoint",
    "read_json",
    "tensor_shape",
    "write_safetensors",
    "load_into",
    "language_config_from_hf",
    "hf_lm_to_megatron",
    "hf_lm_unused_keys",
    "megatron_to_hf_lm",
    "hf_config_from_language",
    "detect_clip_layout",
    "clip_to_megatron",
    "clip_unused_keys",
    "megatron_to_clip",
    "vision_config_from_hf",
    "detect_connector_layout",
    "connector_to_megatron",
    "megatron_to_connector",
    "model_config_from_release",
    "release_to_megatron",
    "release_unused_keys",
    "megatron_to_release",
    "release_config",
]
