"""Original CuMo releases -> our CuMoModel: per-token loss, logits and the MoE auxiliary losses
equal the plain-PyTorch reference (with S2 and images); release -> ours -> release is bit-exact;
an exported release reads back as the same model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import cumo_megatron.platform as platform
from cumo_megatron.checkpoint.adapters.common import CheckpointError
from cumo_megatron.checkpoint.adapters.cumo_release import (
    KNOWN_CLIP_TOWERS,
    megatron_to_release,
    model_config_from_release,
    release_config,
    release_to_megatron,
    release_unused_keys,
)
from cumo_megatron.checkpoint.io import load_into, open_checkpoint, write_safetensors
from cumo_megatron.config.schema import ParallelConfig
from cumo_megatron.models.cumo import build_model
from cumo_megatron.moe.router import CuMoRouter
from tests.fixtures.tiny_models import random_images, reference_from_cumo_release, save_cumo_release

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    platform.initialize(platform.ParallelSizes(), seed=0)


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Tiny releases: CLIP-MoE on every layer + MLP-MoE connector (4 experts, top-2), S2 [1, 3]."""
    return {
        kind: save_cumo_release(tmp_path_factory.mktemp(kind) / f"cumo-{kind}", llm_kind=kind, scales=(1, 3))
        for kind in ("mistral", "mixtral")
    }


def _load(release_dir):
    cfg = model_config_from_release(release_dir)
    src = open_checkpoint(release_dir)
    model = build_model(cfg, ParallelConfig()).eval()
    load_into(model, release_to_megatron(src, cfg), strict=True)
    return cfg, src, model


def _batch(cfg, seed: int = 0):
    """Two samples with one image each, pre-expanded to ``tokens_per_image`` copies of -200."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.language.vocab_size, (2, 14), generator=g)
    n = cfg.vision.tokens_per_image
    ids[0, 1:1 + n] = cfg.image_token_id
    ids[1, 6:6 + n] = cfg.image_token_id
    images = random_images(2, size=cfg.vision.image_size, seed=seed + 1)
    return ids, images


def _module_aux(model) -> dict[str, tuple[float, float]]:
    """Per MoE module: sum over its routers of the share-weighted balance and z losses."""
    out: dict[str, list[float]] = {}
    for module in model.modules():
        if isinstance(module, CuMoRouter):
            stats = module.take_stats()
            entry = out.setdefault(module.settings.module, [0.0, 0.0])
            entry[0] += float(stats.balance)
            entry[1] += float(stats.z_loss)
    return {k: tuple(v) for k, v in out.items()}


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_loss_logits_and_aux_losses_equal_the_reference(releases, kind):
    release = releases[kind]
    cfg, _, model = _load(release.path)
    assert cfg.vision.s2_scales == [1, 3] and cfg.vision.built_layers == 2
    assert cfg.vision.moe.num_experts == 4 and cfg.connector.moe.top_k == 2
    assert cfg.language.arch == kind
    ids, images = _batch(cfg)
    with torch.no_grad():
        ref = release.reference(ids, images)
        _module_aux(model)  # start from clean router statistics
        logits = model(ids, images)
        aux = _module_aux(model)
        # Ours take labels pre-shifted: label[t] is the token at t+1. Invalid ones (image
        # placeholders, the last position) are out of the reference's loss mask.
        labels = torch.zeros_like(ids)
        labels[:, :-1] = ids[:, 1:]
        labels = labels.clamp(min=0)
        loss = model(ids, images, labels=labels)
    assert logits.shape == ref["logits"].shape
    assert (logits - ref["logits"]).abs().max().item() <= TOL
    mask = ref["loss_mask"] > 0
    assert int(mask.sum()) == 2 * (13 - cfg.vision.tokens_per_image)  # text labels only
    assert (loss[mask] - ref["per_token_loss"][mask]).abs().max().item() <= TOL
    expected = {"vision": "vision", "connector": "connector"}
    if kind == "mixtral":
        expected["language"] = "llm"
    assert set(aux) == set(expected)
    for ours, theirs in expected.items():
        assert abs(aux[ours][0] - ref["balance_losses"][theirs].item()) <= TOL, ours
        assert abs(aux[ours][1] - ref["z_losses"][theirs].item()) <= TOL, ours


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_round_trip_is_bit_exact_with_passthrough(releases, kind):
    cfg, src, model = _load(releases[kind].path)
    unused = release_unused_keys(src.keys(), cfg)
    # Exactly the last ViT layer (after the feature layer) is not built.
    assert unused and all(k.startswith("model.vision_tower.vision_model.encoder.layers.2.") for k in unused)
    back = dict(megatron_to_release(model.state_dict(), cfg, passthrough={k: src[k] for k in unused}))
    assert sorted(back) == sorted(src.keys())
    for key, tensor in back.items():
        assert tensor.dtype == src[key].dtype and torch.equal(tensor, src[key]), key


def test_export_reads_back_as_the_same_model(releases, tmp_path):
    """Our model written as a release (weights + `release_config`) is read by the fixture's own
    loader (independent of our adapters, LLM via ``from_pretrained``) into the same CuMo."""
    release = releases["mistral"]
    cfg, src, model = _load(release.path)
    out = tmp_path / "exported"
    passthrough = {k: src[k] for k in release_unused_keys(src.keys(), cfg)}
    config = release_config(cfg, base=release.config)
    write_safetensors(out, megatron_to_release(model.state_dict(), cfg, passthrough), max_shard_bytes=150_000, config=config)
    assert model_config_from_release(out) == cfg
    reference = reference_from_cumo_release(out)
    ids, images = _batch(cfg, seed=5)
    with torch.no_grad():
        expected = release.reference(ids, images)["logits"]
        assert (reference(ids, images)["logits"] - expected).abs().max().item() <= TOL
        assert (model(ids, images) - expected).abs().max().item() <= TOL


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


def test_config_fields_and_clip_sources(releases):
    release = releases["mistral"]
    cfg = model_config_from_release(release.path)
    assert cfg.vision.hidden_size == 32 and cfg.vision.num_layers == 3 and cfg.vision.feature_layer == -2
    assert cfg.vision.drop_cls and cfg.vision.moe.balance_coeff == 0.1 and cfg.vision.moe.z_loss_coeff == 0.01
    assert cfg.connector.moe is not None and cfg.vision.feature_channels == 64
    # clip_dir overrides mm_vision_tower; a hub id CuMo used needs no local copy.
    moved = dict(release.config, mm_vision_tower="/nonexistent/clip")
    assert model_config_from_release(moved, clip_dir=release.clip_path) == cfg
    hub = dict(release.config, mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=1024)
    big = model_config_from_release(hub)
    assert big.vision.hidden_size == 1024 and big.vision.image_size == 336 and big.vision.num_layers == 24
    assert big.vision.tokens_per_image == 576 and big.vision.feature_channels == 2048
    assert set(KNOWN_CLIP_TOWERS) >= {"openai/clip-vit-large-patch14-336"}


def test_dense_stage2_release_config():
    """A stage-2 (dense) release: mlp2x_gelu projector, no CLIP-MoE."""
    config = {
        "model_type": "llava_mistral", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1e6,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "mm_projector_type": "mlp2x_gelu",
        "clip_smoe": False, "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 1024,
        "mm_vision_select_layer": -2, "scales": [1],
    }
    cfg = model_config_from_release(config)
    assert cfg.vision.moe is None and cfg.connector.moe is None and cfg.vision.s2_scales == [1]
    assert model_config_from_release(release_config(cfg)) == cfg


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mm_projector_type": "linear"}, "mm_projector_type='linear'"),
        ({"mm_hidden_size": 48}, "mm_hidden_size=48"),
        ({"mm_vision_tower": "someone/unknown-clip"}, "pass --clip-dir"),
        ({"model_type": "mistral"}, "not a LLaVA/CuMo release"),
        ({"mm_patch_merge_type": "spatial_unpad"}, "only 'flat'"),
        ({"scales": [1, 1.5]}, "only integer S2 scales"),
    ],
)
def test_unsupported_release_configs_are_refused(releases, change, message):
    with pytest.raises(CheckpointError, match=message):
        model_config_from_release(dict(releases["mistral"].config, **change))


def test_mismatched_release_fails_before_reading(releases):
    release = releases["mistral"]
    cfg = model_config_from_release(release.path)
    src = open_checkpoint(release.path)
    fewer_experts = dataclasses.replace(
        cfg, connector=dataclasses.replace(cfg.connector, moe=dataclasses.replace(cfg.connector.moe, num_experts=2))
    )
    with pytest.raises(CheckpointError, match="num_experts"):
        release_to_megatron(src, fewer_experts)
