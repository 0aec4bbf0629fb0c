"""Shared fixtures of the inference tests: tiny CuMo releases (random weights) and their models."""

from __future__ import annotations

import pytest
import torch

import cumo_megatron.platform as platform
from cumo_megatron.checkpoint.adapters.cumo_release import model_config_from_release, release_to_megatron
from cumo_megatron.checkpoint.io import load_into, open_checkpoint
from cumo_megatron.config.schema import ParallelConfig
from cumo_megatron.models.cumo import build_model
from tests.fixtures.tiny_models import random_images, save_cumo_release, tiny_sentencepiece


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """megatron's parallel state at tp = pp = ep = 1 in this process."""
    platform.initialize(platform.ParallelSizes(), seed=0)


@pytest.fixture(scope="session")
def release_factory(tmp_path_factory):
    """``release_factory(kind)``: a tiny CuMo release (CLIP-MoE, MLP-MoE connector) with a matching
    sentencepiece ``tokenizer.model`` (vocab 320) inside; made once per kind. Mistral has S2 [1, 3];
    Mixtral one scale (each S2 image costs ten tower passes and the no-cache path repeats them)."""
    made = {}

    def make(kind: str):
        if kind not in made:
            scales = (1, 3) if kind == "mistral" else (1,)
            release = save_cumo_release(tmp_path_factory.mktemp(kind) / f"cumo-{kind}", llm_kind=kind, scales=scales)
            tiny_sentencepiece(release.path)
            made[kind] = release
        return made[kind]

    return make


def load_release_model(path):
    """Our CuMoModel (world of one, eval mode) with the release's weights, and its config."""
    cfg = model_config_from_release(path)
    model = build_model(cfg, ParallelConfig()).eval()
    load_into(model, release_to_megatron(open_checkpoint(path), cfg), strict=True)
    return model, cfg


def prompt_batch(cfg, batch: int = 2, length: int = 10, seed: int = 0):
    """``batch`` prompts of equal length with one image each, expanded to ``tokens_per_image``
    placeholders at different positions, and their images."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, cfg.language.vocab_size, (batch, length), generator=g)
    n = cfg.vision.tokens_per_image
    rows = []
    for b in range(batch):
        at = 1 + b % (length - 1)
        rows.append(torch.cat([text[b, :at], torch.full((n,), cfg.image_token_id), text[b, at:]]))
    return torch.stack(rows), random_images(batch, size=cfg.vision.image_size, seed=seed + 1)
