"""Exports that load back: every round trip through our checkpoint is an identity.

* HF -> ours -> HF (``--format split``): the CLIP (HF, OpenCLIP gelu / quick_gelu) and the LLM
  (Llama, Mistral, Mixtral) come back bit-exact and load with their own libraries' loaders.
* ours -> release -> ours -> release, dense and co-upcycled: the two checkpoints hold the same
  tensors and the two releases the same tensors and config; the release is complete (the ViT layer
  the model does not build, ``post_layernorm``) and re-imports with no extra flag.
* The exported release is what the original CuMo code reads: its key names and ``config.json``
  fields are checked against lists taken from that code (below), not from our adapters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cumo_megatron.platform as platform
from cumo_megatron.checkpoint import open_checkpoint, ours
from cumo_megatron.checkpoint.adapters.common import CheckpointError
from cumo_megatron.checkpoint.adapters.cumo_release import model_config_from_release
from cumo_megatron.checkpoint.convert import Sources, UpcycleOptions, export_checkpoint, import_checkpoint
from cumo_megatron.checkpoint.streaming import LazyCheckpointState, build_meta_model
from tests.fixtures.tiny_models import save_hf_clip_vision, save_hf_lm, save_open_clip

# ------------------------------------------------------------------------------------------------
# What the original CuMo code reads (SHI-Labs/CuMo, main @ 6cd979a). Data, not our adapters.
# ------------------------------------------------------------------------------------------------

# config.json fields read without a default, so a release must carry them:
#   cumo/model/multimodal_encoder/builder.py      mm_vision_tower
#   cumo/model/multimodal_encoder/clip_encoder.py mm_vision_select_layer, clip_smoe, scales
#   cumo/model/multimodal_projector/builder.py    mm_hidden_size, hidden_size, scales
#   cumo/model/llava_arch.py                      mlp_smoe
#   cumo/model/language_model/llava_{llama,mistral,mixtral}.py (forward): training, and when
#       training with an MoE: local_rank, balance_loss_coef, router_z_loss_coef
ORIGINAL_CONFIG_FIELDS = (
    "mm_vision_tower", "mm_vision_select_layer", "clip_smoe", "scales", "mm_hidden_size", "hidden_size",
    "mlp_smoe", "training", "local_rank", "balance_loss_coef", "router_z_loss_coef",
)
# ... and for CLIP-MoE (clip_encoder.py: CLIPSMoEVisionTransformer(num_experts, num_selected)) or
# an MLP-MoE projector (multimodal_projector/builder.py: MLPMoE(..., num_layers, dropout)):
ORIGINAL_MOE_CONFIG_FIELDS = ("num_experts", "num_selected", "num_layers", "dropout")
# Read through getattr with a default that would change the model, so we write them:
#   clip_encoder.py mm_vision_select_feature ('patch'), projector builder.py mm_projector_type
#   ('linear'), llava_arch.py mm_patch_merge_type ('flat'), model/builder.py mm_use_im_patch_token
#   (True: adds a token and resizes the embeddings), mm_use_im_start_end (False)
ORIGINAL_DEFAULTED_FIELDS = {
    "mm_vision_select_feature": ("patch", "cls_patch"), "mm_projector_type": ("mlp2x_gelu", "smoe_mlp"),
    "mm_patch_merge_type": ("flat",), "mm_use_im_patch_token": (False,), "mm_use_im_start_end": (False,),
}
# language_model/llava_{llama,mistral,mixtral}.py: LlavaConfig / LlavaMistralConfig / LlavaMixtralConfig
ORIGINAL_MODEL_TYPES = {"llama": "llava_llama", "mistral": "llava_mistral", "mixtral": "llava_mixtral"}

# State-dict keys ({i}: layer, {j}: expert). The tower: clip_encoder.py CLIPVisionTower.vision_model
# = clip.py CLIPVisionTransformer / clip_smoe.py CLIPSMoEVisionTransformer, built with the CLIP
# config's num_hidden_layers layers (all of them: the last one's output is not used, the layer
# is there), no post_layernorm; llava_arch.py puts it at model.vision_tower.
ORIGINAL_VISION_PREFIX = "model.vision_tower.vision_model."
ORIGINAL_VISION_KEYS = (
    "embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
    "pre_layrnorm.weight", "pre_layrnorm.bias",
)
ORIGINAL_VISION_LAYER_KEYS = tuple(
    f"encoder.layers.{{i}}.{m}.{p}"
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1", "layer_norm2")
    for p in ("weight", "bias")
)
ORIGINAL_VISION_DENSE_MLP = tuple(f"encoder.layers.{{i}}.mlp.{m}.{p}" for m in ("fc1", "fc2") for p in ("weight", "bias"))
# clip_smoe.py CLIPEncoderMoELayer: gate (no bias) + experts = ModuleList(CLIPMLP)
ORIGINAL_VISION_MOE_MLP = ("encoder.layers.{i}.gate.weight",) + tuple(
    f"encoder.layers.{{i}}.experts.{{j}}.{m}.{p}" for m in ("fc1", "fc2") for p in ("weight", "bias")
)
# multimodal_projector/builder.py at model.mm_projector: Sequential(Linear, GELU, Linear) / MLPMoE
ORIGINAL_PROJECTOR_PREFIX = "model.mm_projector."
ORIGINAL_PROJECTOR_KEYS = {
    "mlp2x_gelu": ("0.weight", "0.bias", "2.weight", "2.bias"),
    "smoe_mlp": ("gate.weight",) + tuple(f"experts.{{j}}.{n}.{p}" for n in (0, 2) for p in ("weight", "bias")),
}
# The LLM: llava_*.py subclass transformers' (4.37) LlamaForCausalLM / MistralForCausalLM /
# MixtralForCausalLM, whose checkpoints use these names.
ORIGINAL_LM_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
ORIGINAL_LM_LAYER_KEYS = tuple(
    f"model.layers.{{i}}.{m}.weight"
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "input_layernorm", "post_attention_layernorm")
)
ORIGINAL_LM_DENSE_MLP = tuple(f"model.layers.{{i}}.mlp.{m}_proj.weight" for m in ("gate", "up", "down"))
ORIGINAL_LM_MOE_MLP = ("model.layers.{i}.block_sparse_moe.gate.weight",) + tuple(
    f"model.layers.{{i}}.block_sparse_moe.experts.{{j}}.w{n}.weight" for n in (1, 2, 3)
)
# Not read by the original code (its CLIP has no post_layernorm; from_pretrained ignores extra
# keys), written so that the CLIP's own tensors survive the round trip.
TOLERATED_EXTRA = (ORIGINAL_VISION_PREFIX + "post_layernorm.weight", ORIGINAL_VISION_PREFIX + "post_layernorm.bias")


def _expand(templates, prefix: str = "", **ranges) -> set[str]:
    out = set()
    for template in templates:
        names = [template]
        for var, count in ranges.items():
            if "{" + var + "}" in template:
                names = [n.replace("{" + var + "}", str(v)) for n in names for v in range(count)]
        out.update(prefix + n for n in names)
    return out


def original_release_keys(release: Path) -> set[str]:
    """The state-dict keys the original CuMo builds for ``release``, read as the original code
    reads its config: the CLIP from ``mm_vision_tower`` (``CLIPVisionConfig.from_pretrained``)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    config = json.loads((release / "config.json").read_text())
    clip = CLIPVisionConfig.from_pretrained(config["mm_vision_tower"])
    CLIPImageProcessor.from_pretrained(config["mm_vision_tower"])  # clip_encoder.py loads it too
    experts = config.get("num_experts", 0)
    keys = _expand(ORIGINAL_VISION_KEYS, ORIGINAL_VISION_PREFIX)
    layer = ORIGINAL_VISION_LAYER_KEYS + (ORIGINAL_VISION_MOE_MLP if config["clip_smoe"] else ORIGINAL_VISION_DENSE_MLP)
    keys |= _expand(layer, ORIGINAL_VISION_PREFIX, i=clip.num_hidden_layers, j=experts)
    keys |= _expand(ORIGINAL_PROJECTOR_KEYS[config["mm_projector_type"]], ORIGINAL_PROJECTOR_PREFIX, j=experts)
    lm_layer = ORIGINAL_LM_LAYER_KEYS + (
        ORIGINAL_LM_MOE_MLP if config["model_type"] == "llava_mixtral" else ORIGINAL_LM_DENSE_MLP
    )
    keys |= _expand(ORIGINAL_LM_KEYS) | _expand(lm_layer, i=config["num_hidden_layers"], j=config.get("num_local_experts", 0))
    return keys


def check_original_layout(release: Path, lm_kind: str) -> None:
    """``release`` as the original CuMo code would load it: config fields, keys, a few shapes."""
    config = json.loads((release / "config.json").read_text())
    assert config["model_type"] == ORIGINAL_MODEL_TYPES[lm_kind]
    missing = [f for f in ORIGINAL_CONFIG_FIELDS if f not in config]
    if config["clip_smoe"] or config["mm_projector_type"] == "smoe_mlp":
        missing += [f for f in ORIGINAL_MOE_CONFIG_FIELDS if f not in config]
    assert not missing, f"config.json lacks {missing}"
    for name, allowed in ORIGINAL_DEFAULTED_FIELDS.items():
        assert config.get(name) in allowed, (name, config.get(name))
    src = open_checkpoint(release)
    expected = original_release_keys(release)
    extra = set(src.keys()) - expected - set(TOLERATED_EXTRA)
    assert not extra and not (expected - set(src.keys())), (sorted(extra)[:5], sorted(expected - set(src.keys()))[:5])
    width = config["mm_hidden_size"] * len(config["scales"])
    first = "experts.0.0.weight" if config["mm_projector_type"] == "smoe_mlp" else "0.weight"
    assert tuple(src[ORIGINAL_PROJECTOR_PREFIX + first].shape) == (config["hidden_size"], width)
    assert src[ORIGINAL_VISION_PREFIX + "pre_layrnorm.weight"].shape[0] == config["mm_hidden_size"]
    if config["clip_smoe"]:
        gate = src[ORIGINAL_VISION_PREFIX + "encoder.layers.0.gate.weight"]
        assert tuple(gate.shape) == (config["num_experts"], config["mm_hidden_size"])


# ------------------------------------------------------------------------------------------------
# Sources and helpers
# ------------------------------------------------------------------------------------------------

VISIONS = ("hf", "hf_full", "open_clip_gelu", "open_clip_quick_gelu")
LMS = ("llama", "mistral", "mixtral")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny CLIPs (HF CLIPVisionModel, a whole CLIPModel, OpenCLIP gelu / quick_gelu; 3 layers)
    and LLMs (2 layers), on disk as published."""
    tmp = tmp_path_factory.mktemp("round-trip-src")
    save_hf_clip_vision(tmp / "hf", "vision_tf5", seed=1)
    save_hf_clip_vision(tmp / "hf_full", "clip_full", seed=2)
    save_open_clip(tmp / "open_clip_gelu", act="gelu", seed=3)
    save_open_clip(tmp / "open_clip_quick_gelu", act="quick_gelu", seed=4)
    for i, kind in enumerate(LMS):
        save_hf_lm(tmp / kind, kind, "safetensors", seed=5 + i)
    return tmp


@pytest.fixture(autouse=True)
def world_of_one():
    platform.initialize(platform.ParallelSizes(), seed=0)


def _tensors(path) -> dict:
    src = open_checkpoint(path)
    return {k: src[k] for k in src.keys()}


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:8]}"
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{what}: {key} differs"


def _model_tensors(checkpoint: Path) -> dict:
    cfg = ours.read_model_config(checkpoint)
    state = LazyCheckpointState(build_meta_model(cfg), checkpoint)
    return {k: state[k] for k in state}


def _vision_tail_of_source(vision: str, directory: Path) -> dict:
    """The source CLIP's last layer and final norm, renamed to the release's names by hand (an
    independent reference: OpenCLIP's ``in_proj`` is ``[q; k; v]`` rows)."""
    src = _tensors(directory)
    out = {}
    if vision.startswith("hf"):
        prefix = "vision_model." if vision == "hf_full" else ""
        for key, value in src.items():
            if key.startswith((prefix + "encoder.layers.2.", prefix + "post_layernorm.")):
                out[ORIGINAL_VISION_PREFIX + key[len(prefix):]] = value
        return out
    block, layer = "visual.transformer.resblocks.2.", ORIGINAL_VISION_PREFIX + "encoder.layers.2."
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for param in ("weight", "bias"):
        for theirs, hf in names.items():
            out[f"{layer}{hf}.{param}"] = src[f"{block}{theirs}.{param}"]
        for name, part in zip("qkv", src[f"{block}attn.in_proj_{param}"].chunk(3)):
            out[f"{layer}self_attn.{name}_proj.{param}"] = part
        out[f"{ORIGINAL_VISION_PREFIX}post_layernorm.{param}"] = src[f"visual.ln_post.{param}"]
    return out


# ------------------------------------------------------------------------------------------------
# HF -> ours -> HF
# ------------------------------------------------------------------------------------------------


def _load_open_clip(directory: Path):
    """An OpenCLIP model built from the export's own open_clip_config.json, weights loaded strictly."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    cfg = json.loads((directory / "open_clip_config.json").read_text())["model_cfg"]
    model = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
                 text_cfg=CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=cfg.get("quick_gelu", False))
    model.load_state_dict(load_file(str(directory / "open_clip_model.safetensors")), strict=True)
    return model


@pytest.mark.parametrize("vision, lm", [("hf", "mixtral"), ("open_clip_gelu", "llama"),
                                        ("open_clip_quick_gelu", "mistral")])
def test_hf_to_ours_to_hf_is_bit_exact(sources, tmp_path, vision, lm):
    ckpt, out = tmp_path / "ours", tmp_path / "export"
    import_checkpoint(Sources(vision=sources / vision, language=sources / lm), ckpt)
    export_checkpoint(ckpt, out, fmt="split")
    _assert_same(_tensors(sources / vision), _tensors(out / "vision"), "vision")
    _assert_same(_tensors(sources / lm), _tensors(out / "language"), "language")
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    assert type(AutoModelForCausalLM.from_pretrained(out / "language")).__name__.lower().startswith(lm)
    if vision.startswith("open_clip"):
        assert _load_open_clip(out / "vision").visual.transformer.resblocks[2] is not None
    else:
        assert CLIPVisionModel.from_pretrained(out / "vision").config.num_hidden_layers == 3


# ------------------------------------------------------------------------------------------------
# ours -> release -> ours -> release
# ------------------------------------------------------------------------------------------------

DENSE = UpcycleOptions()
MOE = UpcycleOptions(vision_experts=4, connector_experts=4, top_k=2, seed=7)
MOE_LLM = UpcycleOptions(vision_experts=2, connector_experts=2, llm_experts=2, top_k=1, seed=3)


@pytest.mark.parametrize("vision, lm, upcycle", [
    ("hf", "llama", DENSE),
    ("hf_full", "mistral", MOE),
    ("open_clip_gelu", "mixtral", MOE),
    ("open_clip_quick_gelu", "llama", MOE_LLM),
], ids=["hf+llama-dense", "clip-full+mistral-moe", "open-clip-gelu+mixtral-moe", "open-clip-quick+llama-moe-llm"])
def test_release_round_trip_is_an_identity(sources, tmp_path, vision, lm, upcycle):
    ours1, release1, ours2, release2 = (tmp_path / n for n in ("ours1", "release1", "ours2", "release2"))
    import_checkpoint(Sources(vision=sources / vision, language=sources / lm), ours1, upcycle)
    summary = export_checkpoint(ours1, release1, fmt="release")
    lm_kind = "mixtral" if upcycle.llm_experts else lm
    check_original_layout(release1, lm_kind)
    # Complete: the unbuilt last layer and post_layernorm of the source CLIP are there.
    exported = _tensors(release1)
    tail = _vision_tail_of_source(vision, sources / vision)
    layer = ORIGINAL_VISION_PREFIX + "encoder.layers.2."
    for key, value in tail.items():
        if upcycle.vision_experts and ".mlp." in key:  # CLIP-MoE: every layer's experts copy its MLP
            for j in range(upcycle.vision_experts):
                assert torch.equal(exported[key.replace(".mlp.", f".experts.{j}.")], value), key
        else:
            assert torch.equal(exported[key], value), key
    assert (layer + "gate.weight" in exported) == bool(upcycle.vision_experts)
    # A CLIPModel's text tower has no place in a release: said, not silently dropped.
    assert any("text_model" in n for n in summary.notes) == (vision == "hf_full")
    # The release names a CLIP the original code and our importer both read, without flags.
    config = json.loads((release1 / "config.json").read_text())
    assert config["mm_vision_tower"] == str(release1.absolute() / "vision_tower")

    import_checkpoint(Sources(cumo=release1), ours2)
    assert ours.read_model_config(ours2) == ours.read_model_config(ours1)
    _assert_same(_model_tensors(ours1), _model_tensors(ours2), "ours -> release -> ours")
    export_checkpoint(ours2, release2)  # auto: a release again
    _assert_same(exported, _tensors(release2), "release -> ours -> release")
    config2 = json.loads((release2 / "config.json").read_text())
    assert config2.pop("mm_vision_tower") == str(release2.absolute() / "vision_tower")
    config.pop("mm_vision_tower")
    assert config2 == config


def test_split_export_of_an_moe_model_is_complete(sources, tmp_path):
    """The split export's multimodal.safetensors holds the same vision and projector tensors as the
    release export (unbuilt layer and post_layernorm included), and its config loads back."""
    ckpt = tmp_path / "ours"
    import_checkpoint(Sources(vision=sources / "hf", language=sources / "mistral"), ckpt, MOE)
    export_checkpoint(ckpt, tmp_path / "split", fmt="split")
    export_checkpoint(ckpt, tmp_path / "release", fmt="release")
    release = {k: v for k, v in _tensors(tmp_path / "release").items()
               if k.startswith((ORIGINAL_VISION_PREFIX, ORIGINAL_PROJECTOR_PREFIX))}
    _assert_same(release, load_file(str(tmp_path / "split" / "multimodal.safetensors")), "multimodal")
    assert model_config_from_release(tmp_path / "split") == ours.read_model_config(ckpt)


def test_moved_release_still_loads_and_hub_ids_are_kept(sources, tmp_path):
    """A release moved elsewhere reads its CLIP from the config beside it; a release that named a hub
    id keeps naming it."""
    ckpt = tmp_path / "ours"
    import_checkpoint(Sources(vision=sources / "open_clip_gelu", language=sources / "llama"), ckpt)
    export_checkpoint(ckpt, tmp_path / "release", fmt="release")
    moved = tmp_path / "elsewhere" / "release"
    shutil.move(tmp_path / "release", moved)
    cfg = model_config_from_release(moved)
    assert cfg == ours.read_model_config(ckpt)
    # What `generate --load` does with a release: the same model, no flag needed.
    from cumo_megatron.inference.session import load_model

    model, loaded_cfg = load_model(moved)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert loaded_cfg == cfg
    _assert_same(_model_tensors(ckpt), state, "generate --load EXPORT")
    # A release naming a hub id: re-imported with --clip-dir (OpenCLIP accepted), exported with its name.
    config = json.loads((moved / "config.json").read_text())
    config["mm_vision_tower"] = "laion/some-open-clip"
    (moved / "config.json").write_text(json.dumps(config))
    shutil.rmtree(moved / "vision_tower")
    with pytest.raises(CheckpointError, match="pass --clip-dir") as err:
        model_config_from_release(moved)
    assert "PosixPath" not in str(err.value)
    import_checkpoint(Sources(cumo=moved, clip_dir=sources / "open_clip_gelu"), tmp_path / "ours2")
    export_checkpoint(tmp_path / "ours2", tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["mm_vision_tower"] == "laion/some-open-clip"
    assert model_config_from_release(tmp_path / "again") == cfg  # from the CLIP config written beside it


def test_wrong_clip_dir_is_refused_with_the_flag_to_use(sources, tmp_path):
    ckpt = tmp_path / "ours"
    import_checkpoint(Sources(vision=sources / "hf", language=sources / "llama"), ckpt)
    export_checkpoint(ckpt, tmp_path / "release", fmt="release")
    for wrong, message in [(sources / "missing", "is not a directory"), (tmp_path, "holds no CLIP config"),
                           (sources / "llama", "model_type='llama' is not a CLIP")]:
        with pytest.raises(CheckpointError, match=message) as err:
            model_config_from_release(tmp_path / "release", clip_dir=wrong)
        assert f"--clip-dir {wrong}" in str(err.value) and "PosixPath" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"mm_hidden_size=32 .* pass --clip-dir"):
        wide = tmp_path / "wide-clip"
        save_hf_clip_vision(wide, "vision_tf5", hidden_size=48, intermediate_size=96)
        model_config_from_release(tmp_path / "release", clip_dir=wide)


@pytest.mark.parametrize("upcycle", [DENSE, MOE], ids=["dense", "moe"])
def test_checkpoint_without_provenance_exports_a_loadable_release(sources, tmp_path, upcycle):
    """A model trained from scratch keeps no source tensors: the layer past the feature layer is
    written as an identity layer (checked with transformers' own CLIPEncoderLayer), so the release
    has the CLIP's depth and loads back as the same model."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    ckpt = tmp_path / "ours"
    import_checkpoint(Sources(vision=sources / "hf", language=sources / "mistral"), ckpt, upcycle)
    for name in (ours.CONVERSION_INFO, ours.PASSTHROUGH):
        (ckpt / name).unlink()
    shutil.rmtree(ckpt / ours.SOURCE_DIR)
    summary = export_checkpoint(ckpt, tmp_path / "release", fmt="release")
    assert any("identity" in note for note in summary.notes)
    check_original_layout(tmp_path / "release", "mistral")
    exported = _tensors(tmp_path / "release")
    root = ORIGINAL_VISION_PREFIX + "encoder.layers.2."
    layer = CLIPEncoderLayer(CLIPVisionConfig.from_pretrained(tmp_path / "release" / "vision_tower")).eval()
    weights = {k[len(root):]: v for k, v in exported.items() if k.startswith(root)}
    if upcycle.vision_experts:  # every expert is the (zero) dense MLP
        assert all(torch.equal(v, weights[k.replace("experts.0.", f"experts.{j}.")])
                   for k, v in weights.items() if k.startswith("experts.0.") for j in range(4))
        weights = {k.replace("experts.0.", "mlp."): v for k, v in weights.items() if not k.startswith(("gate", "experts."))
                   or k.startswith("experts.0.")}
    layer.load_state_dict(weights, strict=True)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = layer(x, None)
    assert torch.equal(out[0] if isinstance(out, tuple) else out, x)
    import_checkpoint(Sources(cumo=tmp_path / "release"), tmp_path / "ours2")
    _assert_same(_model_tensors(ckpt), _model_tensors(tmp_path / "ours2"), "ours -> release -> ours")
    if not upcycle.vision_experts:  # the split export's vision/ has the CLIP's depth too
        split = tmp_path / "split"
        summary = export_checkpoint(ckpt, split, fmt="split")
        assert any("identity" in note for note in summary.notes)
        assert CLIPVisionConfig.from_pretrained(split / "vision").num_hidden_layers == 3
        import_checkpoint(Sources(vision=split / "vision", language=split / "language",
                                  connector=split / "mm_projector.bin"), tmp_path / "ours3")
        _assert_same(_model_tensors(ckpt), _model_tensors(tmp_path / "ours3"), "ours -> split -> ours")


def test_hf_to_release_to_split_gives_the_sources_back(sources, tmp_path):
    """HF CLIP + LLaMA -> ours -> release -> ours (a dense, stage-2-like release) -> split: the
    release's unbuilt layer and post_layernorm land in vision/ under the CLIPVisionModel's names."""
    from transformers import CLIPVisionModel

    import_checkpoint(Sources(vision=sources / "hf", language=sources / "llama"), tmp_path / "ours1")
    export_checkpoint(tmp_path / "ours1", tmp_path / "release", fmt="release")
    import_checkpoint(Sources(cumo=tmp_path / "release"), tmp_path / "ours2")
    export_checkpoint(tmp_path / "ours2", tmp_path / "split", fmt="split")
    _assert_same(_tensors(sources / "hf"), _tensors(tmp_path / "split" / "vision"), "vision")
    _assert_same(_tensors(sources / "llama"), _tensors(tmp_path / "split" / "language"), "language")
    assert CLIPVisionModel.from_pretrained(tmp_path / "split" / "vision").config.num_hidden_layers == 3


def test_a_clip_from_the_hub_cache_is_named_by_its_hub_id(sources, tmp_path):
    """``--vision`` pointing into the hub cache: the release names the hub id (what the original
    code downloads) and still re-imports offline from the CLIP config written beside it."""
    cached = tmp_path / "hub" / "models--someone--tiny-clip" / "snapshots" / "0123abc"
    shutil.copytree(sources / "open_clip_quick_gelu", cached)
    import_checkpoint(Sources(vision=cached, language=sources / "llama"), tmp_path / "ours")
    export_checkpoint(tmp_path / "ours", tmp_path / "release", fmt="release")
    assert json.loads((tmp_path / "release" / "config.json").read_text())["mm_vision_tower"] == "someone/tiny-clip"
    assert model_config_from_release(tmp_path / "release") == ours.read_model_config(tmp_path / "ours")
