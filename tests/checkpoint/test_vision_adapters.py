"""CLIP vision adapters: every publisher layout gives, in our tower, the publisher's own features;
round trips source -> ours -> source are bit-exact; mismatches fail with clear errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import cumo_megatron.platform as platform
from cumo_megatron.checkpoint.adapters.common import CheckpointError, MissingKeyError
from cumo_megatron.checkpoint.adapters.vision import (
    clip_to_megatron,
    clip_unused_keys,
    detect_clip_layout,
    megatron_to_clip,
    vision_config_from_hf,
    vision_config_from_open_clip,
)
from cumo_megatron.checkpoint.io import load_into, open_checkpoint
from cumo_megatron.config.schema import ModelConfig, MoEConfig, ParallelConfig, VisionConfig
from cumo_megatron.models.vision import CLIPVisionTower
from cumo_megatron.moe.router import CuMoRouter
from tests.fixtures.tiny_models import (
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    CLIP_LAYOUTS,
    open_clip_penultimate_features,
    random_images,
    save_cumo_release,
    save_hf_clip_vision,
    save_open_clip,
)
from tests.reference.cumo_reference import s2_features

TOL = 1e-4
HF_PREFIX = {"clip_full": "vision_model.", "clip_full_bin": "vision_model.", "vision_tf4": "vision_model.", "vision_tf5": ""}


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    platform.initialize(platform.ParallelSizes(), seed=0)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny original CuMo release (CLIP-MoE in every layer, 4 experts top-2, S2 scales 1 and 3)."""
    return save_cumo_release(tmp_path_factory.mktemp("release") / "cumo-mistral", "mistral", scales=(1, 3))


def _json(path) -> dict:
    return json.loads(path.read_text())


def _load_tower(src, cfg: VisionConfig) -> CLIPVisionTower:
    tower = CLIPVisionTower(ModelConfig(vision=cfg), ParallelConfig()).eval()
    load_into(tower, clip_to_megatron(src, cfg, prefix="vit."), strict=True)
    return tower


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def _assert_same_tensors(got: dict, expected_keys, src) -> None:
    assert sorted(got) == sorted(expected_keys)
    for key in expected_keys:
        assert got[key].dtype == src[key].dtype, key
        assert torch.equal(got[key], src[key]), key


def _hf_cfg(directory, **overrides) -> VisionConfig:
    return vision_config_from_hf(
        _json(directory / "config.json"), preprocessor=_json(directory / "preprocessor_config.json"), **overrides
    )


# --------------------------------------------------------------------------------------------
# HF transformers layouts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", CLIP_LAYOUTS)
def test_hf_layout_gives_hf_penultimate_features_and_round_trips(tmp_path, layout):
    hf = save_hf_clip_vision(tmp_path, layout)
    src = open_checkpoint(tmp_path)
    cfg = _hf_cfg(tmp_path)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.ffn_hidden_size) == (32, 3, 4, 64)
    assert (cfg.image_size, cfg.patch_size, cfg.activation, cfg.built_layers) == (28, 14, "quick_gelu", 2)
    assert cfg.image_mean == CLIP_IMAGE_MEAN and cfg.image_std == CLIP_IMAGE_STD
    assert detect_clip_layout(src.keys()) == "hf"

    tower = _load_tower(src, cfg)
    images = random_images(3, 28, seed=1)
    with torch.no_grad():
        ours = tower(images)
        theirs = hf(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert ours.shape == (3, 4, 32)
    assert _max_diff(ours, theirs) <= TOL

    unused = clip_unused_keys(src.keys(), cfg)
    prefix = HF_PREFIX[layout]
    assert f"{prefix}post_layernorm.weight" in unused
    assert f"{prefix}encoder.layers.2.self_attn.q_proj.weight" in unused
    assert not any(k.startswith(f"{prefix}encoder.layers.1.") for k in unused)
    if layout.startswith("clip_full"):
        assert {"logit_scale", "visual_projection.weight", "text_model.final_layer_norm.weight"} <= set(unused)
    back = dict(
        megatron_to_clip(
            tower.state_dict(), cfg, "hf", passthrough={k: src[k] for k in unused}, hf_prefix=prefix, prefix="vit."
        )
    )
    _assert_same_tensors(back, list(src.keys()), src)


def test_megatron_qkv_is_interleaved_per_head(tmp_path):
    """Negative control: fusing q, k, v by plain concatenation (not per head) changes the features."""
    hf = save_hf_clip_vision(tmp_path, "vision_tf5")
    src = open_checkpoint(tmp_path)
    cfg = _hf_cfg(tmp_path)
    tower = _load_tower(src, cfg)
    with torch.no_grad():
        for i in range(cfg.built_layers):
            for kind in ("weight", "bias"):
                naive = torch.cat([src[f"encoder.layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv"])
                getattr(tower.vit.decoder.layers[i].self_attention.linear_qkv, kind).copy_(naive)
        images = random_images(2, 28)
        wrong = tower(images)
        theirs = hf(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert _max_diff(wrong, theirs) > 1e-2


def test_vision_config_from_hf_variants():
    tf4_full = {
        "model_type": "clip",
        "vision_config": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                          "image_size": 224, "patch_size": 16},
        # old transformers 4 files carry both; vision_config_dict wins, as in transformers 4
        "vision_config_dict": {"hidden_size": 48, "intermediate_size": 96, "image_size": 32},
        "torch_dtype": "float32",
    }
    cfg = vision_config_from_hf(tf4_full, s2_scales=[1, 3], moe=MoEConfig())
    assert (cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, cfg.image_size, cfg.patch_size) == (48, 96, 4, 32, 16)
    assert cfg.activation == "quick_gelu" and cfg.layernorm_eps == 1e-5  # CLIPVisionConfig defaults
    assert cfg.s2_scales == [1, 3] and cfg.moe == MoEConfig()
    gelu = vision_config_from_hf({"model_type": "clip_vision_model", "hidden_act": "gelu", "dtype": "bfloat16",
                                  "layer_norm_eps": 1e-6})
    assert gelu.activation == "gelu" and gelu.layernorm_eps == 1e-6
    with pytest.raises(ValueError, match="activation 'gelu_new' is not supported"):
        vision_config_from_hf({"model_type": "clip_vision_model", "hidden_act": "gelu_new"})
    with pytest.raises(ValueError, match="model_type='llava_mistral'.*mm_vision_tower"):
        vision_config_from_hf({"model_type": "llava_mistral", "mm_vision_tower": "openai/clip"})


# --------------------------------------------------------------------------------------------
# OpenCLIP
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("weights", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_open_clip_gives_penultimate_features_and_round_trips(tmp_path, act, weights):
    model = save_open_clip(tmp_path, act=act)
    cfg = vision_config_from_open_clip(_json(tmp_path / "open_clip_config.json"))
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.ffn_hidden_size, cfg.activation) == (32, 3, 4, 64, act)
    assert cfg.image_mean == CLIP_IMAGE_MEAN
    src = open_checkpoint(tmp_path / weights)
    assert detect_clip_layout(src.keys()) == "open_clip"

    tower = _load_tower(src, cfg)
    images = random_images(3, 28, seed=2)
    with torch.no_grad():
        ours = tower(images)
    theirs = open_clip_penultimate_features(model, images)
    assert _max_diff(ours, theirs) <= TOL

    # The activation is read from the config, and it matters.
    other = dataclasses.replace(cfg, activation="gelu" if act == "quick_gelu" else "quick_gelu")
    with torch.no_grad():
        assert _max_diff(_load_tower(src, other)(images), theirs) > 1e-3

    unused = clip_unused_keys(src.keys(), cfg)
    assert {"visual.ln_post.weight", "visual.proj", "visual.transformer.resblocks.2.attn.in_proj_weight",
            "token_embedding.weight", "logit_scale"} <= set(unused)
    back = dict(megatron_to_clip(tower.state_dict(), cfg, "open_clip", passthrough={k: src[k] for k in unused},
                                 prefix="vit."))
    _assert_same_tensors(back, list(src.keys()), src)


def test_vision_config_from_open_clip_refuses_what_our_vit_cannot_hold():
    base = {"vision_cfg": {"layers": 24, "width": 1024, "patch_size": 14, "image_size": [336, 336]}, "quick_gelu": True}
    cfg = vision_config_from_open_clip(base, preprocess={"mean": [0.5] * 3, "std": [0.5] * 3})
    assert (cfg.num_heads, cfg.ffn_hidden_size, cfg.image_size, cfg.activation) == (16, 4096, 336, "quick_gelu")
    assert cfg.image_mean == [0.5] * 3
    with pytest.raises(ValueError, match="ls_init_value"):
        vision_config_from_open_clip({"vision_cfg": dict(base["vision_cfg"], ls_init_value=1e-5)})
    with pytest.raises(ValueError, match="timm_model_name"):
        vision_config_from_open_clip({"vision_cfg": {"timm_model_name": "vit_base", "width": 768, "layers": 12}})


# --------------------------------------------------------------------------------------------
# Original CuMo release (CLIP-MoE)
# --------------------------------------------------------------------------------------------


def _release_cfg(release, scales) -> VisionConfig:
    return _hf_cfg(
        release.clip_path,
        moe=MoEConfig(num_experts=release.config["num_experts"], top_k=release.config["num_selected"]),
        s2_scales=list(scales),
    )


def _router_losses(tower) -> tuple[float, float]:
    """Our module losses: the routers' share-weighted statistics, summed."""
    balance = z = 0.0
    routers = [m for m in tower.modules() if isinstance(m, CuMoRouter)]
    assert len(routers) == tower.cfg.built_layers
    for router in routers:
        stats = router.take_stats()
        balance, z = balance + float(stats.balance), z + float(stats.z_loss)
    return balance, z


@pytest.mark.parametrize("scales", [(1,), (1, 3)])
def test_release_moe_tower_matches_reference_features_and_losses(release, scales):
    src = open_checkpoint(release.path)
    assert detect_clip_layout(src.keys()) == "cumo_release"
    cfg = _release_cfg(release, scales)
    tower = _load_tower(src, cfg)
    images = random_images(3, 28, seed=3)
    with torch.no_grad():
        ours = tower(images)
        ref_feats, ref_balance, ref_z = s2_features(release.reference.tower, images, scales)
    balance, z = _router_losses(tower)
    assert ours.shape == (3, 4, 32 * len(scales))
    assert _max_diff(ours, ref_feats) <= TOL
    assert abs(balance - float(ref_balance)) <= TOL and abs(z - float(ref_z)) <= TOL
    assert balance > 0.5 and z > 0.1  # real losses, not zeros


def test_release_round_trip_is_exact(release):
    src = open_checkpoint(release.path)
    cfg = _release_cfg(release, (1, 3))
    tower = _load_tower(src, cfg)
    vision_keys = [k for k in src.keys() if k.startswith("model.vision_tower.")]
    unused = clip_unused_keys(src.keys(), cfg)
    # Only the unused last layer: the LLM and projector are not vision keys.
    assert unused and all(k.startswith("model.vision_tower.vision_model.encoder.layers.2.") for k in unused)
    assert "model.vision_tower.vision_model.encoder.layers.2.experts.3.fc2.bias" in unused
    back = dict(megatron_to_clip(tower.state_dict(), cfg, "cumo_release",
                                 passthrough={k: src[k] for k in unused}, prefix="vit."))
    _assert_same_tensors(back, vision_keys, src)


def test_moe_dense_mismatches_are_refused(release, tmp_path):
    src = open_checkpoint(release.path)
    dense_cfg = _hf_cfg(release.clip_path)
    with pytest.raises(CheckpointError, match="layer 0 is an MoE layer.*set vision.moe"):
        clip_to_megatron(src, dense_cfg)
    with pytest.raises(CheckpointError, match=r"layer 0 has experts 0\.\.3 but vision.moe.num_experts=8"):
        clip_to_megatron(src, dataclasses.replace(dense_cfg, moe=MoEConfig(num_experts=8)))
    save_hf_clip_vision(tmp_path, "vision_tf5")
    with pytest.raises(CheckpointError, match="dense MLP.*upcycle"):
        clip_to_megatron(open_checkpoint(tmp_path), _hf_cfg(tmp_path, moe=MoEConfig()))
    with pytest.raises(CheckpointError, match="layout='cumo_release'"):
        megatron_to_clip({}, _release_cfg(release, (1,)), "hf")


def test_open_clip_into_moe_config_asks_for_upcycling(tmp_path):
    save_open_clip(tmp_path)
    cfg = vision_config_from_open_clip(_json(tmp_path / "open_clip_config.json"), moe=MoEConfig())
    with pytest.raises(CheckpointError, match="upcycle"):
        clip_to_megatron(open_checkpoint(tmp_path), cfg)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf4_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tf4")
    save_hf_clip_vision(directory, "vision_tf4")
    return dict(open_checkpoint(directory)), _hf_cfg(directory)


def test_missing_key_is_named(tf4_checkpoint):
    sd, cfg = tf4_checkpoint
    gone = "vision_model.encoder.layers.1.self_attn.k_proj.weight"
    broken = {k: v for k, v in sd.items() if k != gone}
    with pytest.raises(MissingKeyError, match=gone.replace(".", r"\.")):
        clip_to_megatron(broken, cfg)
    # A tensor of a layer that is not converted may be missing.
    last = {k: v for k, v in sd.items() if k != "vision_model.encoder.layers.2.mlp.fc1.weight"}
    assert len(list(clip_to_megatron(last, cfg))) == len(list(clip_to_megatron(sd, cfg)))


def test_shape_mismatch_names_key_and_both_shapes(tf4_checkpoint):
    sd, cfg = tf4_checkpoint
    with pytest.raises(CheckpointError, match=r"'vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight' has shape "
                                              r"\[64, 32\], expected \[128, 32\]"):
        list(clip_to_megatron(sd, dataclasses.replace(cfg, ffn_hidden_size=128)))


def test_layer_count_and_layout_errors(tf4_checkpoint):
    sd, cfg = tf4_checkpoint
    with pytest.raises(CheckpointError, match=r"has 3 layers \(indices 0\.\.2\) but vision.num_layers=4"):
        clip_to_megatron(sd, dataclasses.replace(cfg, num_layers=4))
    with pytest.raises(ValueError, match="not 'open_clip'"):
        clip_to_megatron(sd, cfg, layout="open_clip")
    with pytest.raises(ValueError, match=r"no CLIP vision tower recognised.*'model\.embed_tokens\.weight'"):
        detect_clip_layout(["model.embed_tokens.weight", "lm_head.weight"])
    stray = dict(sd, **{"vision_model.encoder.layers.0.mlp.fc3.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="no place for.*fc3"):
        clip_to_megatron(stray, cfg)


def test_conversion_streams_tensors_one_at_a_time(tf4_checkpoint):
    """Nothing is read before the first tensor is asked for, and each source tensor is read once."""
    sd, cfg = tf4_checkpoint

    class CountingMapping(dict):
        def __init__(self, *args):
            super().__init__(*args)
            self.reads: list[str] = []

        def __getitem__(self, key):
            self.reads.append(key)
            return super().__getitem__(key)

    src = CountingMapping(sd)
    stream = clip_to_megatron(src, cfg)
    assert src.reads == []
    names = stream.names()  # random access: names and shapes without reading
    assert stream.shape("vision.vit.class_token") == (1, 1, cfg.hidden_size) and src.reads == []
    pairs = iter(stream)
    name, _ = next(pairs)
    assert name == names[0] == "vision.vit.class_token" and src.reads == ["vision_model.embeddings.class_embedding"]
    list(pairs)
    assert len(src.reads) == len(set(src.reads)) == len(sd) - len(clip_unused_keys(sd.keys(), cfg))
    src.reads.clear()
    assert torch.equal(stream.get(names[-1]), dict(clip_to_megatron(sd, cfg))[names[-1]]) and len(src.reads) == 1
