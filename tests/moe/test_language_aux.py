"""Each MoE module's aux losses in a built CuMo model, grouped as the original CuMo code groups them,
against the oracle at a micro-batch of 3 with padding: per sample for the vision tower and the
connector, over the whole micro-batch's real tokens for the Mixtral LLM (the original's
``smoe_mixtral_helper.py`` flattens ``batch x sequence`` before routing)."""

from __future__ import annotations

import pytest
import torch

from cumo_megatron.checkpoint.adapters.cumo_release import model_config_from_release, release_to_megatron
from cumo_megatron.checkpoint.io import load_into, open_checkpoint
from cumo_megatron.config.schema import ParallelConfig
from cumo_megatron.models.cumo import build_model
from cumo_megatron.moe.stats import collect_moe_stats
from tests.fixtures.tiny_models import random_images, save_cumo_release

TOL = 1e-5
B, SEQ = 3, 16
REAL = (16, 11, 8)  # real tokens per sample; the rest is right padding, as the data pipeline pads


@pytest.fixture(scope="module")
def release_and_model(tmp_path_factory):
    """A tiny CuMo-Mixtral release (CLIP-MoE, MLP-MoE connector, 4 experts top-2, S2 [1, 3]) and
    our model loaded from it."""
    release = save_cumo_release(tmp_path_factory.mktemp("release") / "cumo-mixtral", llm_kind="mixtral")
    cfg = model_config_from_release(release.path)
    model = build_model(cfg, ParallelConfig()).eval()
    load_into(model, release_to_megatron(open_checkpoint(release.path), cfg), strict=True)
    return release, cfg, model


def _batch(cfg):
    """Three samples with one image each; sample i is real up to ``REAL[i]``, then padding."""
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, cfg.language.vocab_size, (B, SEQ), generator=gen)
    n = cfg.vision.tokens_per_image
    for i in range(B):
        ids[i, 1 + i:1 + i + n] = cfg.image_token_id
    real_bs = torch.arange(SEQ).unsqueeze(0) < torch.tensor(REAL).unsqueeze(1)
    return ids, random_images(B, size=cfg.vision.image_size, seed=6), real_bs


def test_aux_losses_per_module_equal_the_original_grouping_with_padding(release_and_model):
    release, cfg, model = release_and_model
    assert cfg.language.arch == "mixtral" and cfg.language.moe.num_experts == 4
    ids, images, real_bs = _batch(cfg)
    with torch.no_grad():
        ref = release.reference(ids, images, attention_mask=real_bs.long())
        collect_moe_stats(model)  # start from empty router statistics
        model(ids, images, padding_mask=~real_bs)
        ours = collect_moe_stats(model)["modules"]
    assert set(ours) == {"vision", "connector", "language"}
    for module, theirs in (("vision", "vision"), ("connector", "connector"), ("language", "llm")):
        assert ours[module]["balance"] == pytest.approx(ref["balance_losses"][theirs].item(), abs=TOL), module
        assert ours[module]["z_loss"] == pytest.approx(ref["z_losses"][theirs].item(), abs=TOL), module
