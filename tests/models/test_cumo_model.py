"""The composed CuMo model: splicing order, text-only and mixed batches, loss convention, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cumo_megatron.platform as platform
from cumo_megatron.config.presets import tiny
from cumo_megatron.config.schema import ParallelConfig
from cumo_megatron.models.cumo import build_model, splice_image_features


@pytest.fixture(scope="module")
def model_and_cfg():
    platform.initialize(platform.ParallelSizes(), seed=11)
    cfg = tiny(moe=True)
    model = build_model(cfg, ParallelConfig()).eval()
    return model, cfg


def test_splice_puts_images_in_sample_then_position_order():
    text_bsh = torch.zeros(2, 6, 1)
    positions_bs = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    features_nth = torch.arange(1.0, 7.0).view(3, 2, 1)  # image 0 -> 1,2; image 1 -> 3,4; image 2 -> 5,6
    out = splice_image_features(text_bsh, features_nth, positions_bs)
    assert out[0, :, 0].tolist() == [0, 1, 2, 0, 3, 4]
    assert out[1, :, 0].tolist() == [5, 6, 0, 0, 0, 0]


def test_splice_refuses_a_count_mismatch():
    with pytest.raises(ValueError, match="image-token positions"):
        splice_image_features(torch.zeros(1, 4, 1), torch.zeros(1, 3, 1), torch.ones(1, 4, dtype=torch.bool))


def test_mixed_batch_equals_samples_run_alone(model_and_cfg):
    """A text-only sample and a two-image sample batched together give their solo results."""
    model, cfg = model_and_cfg
    n = cfg.vision.tokens_per_image
    gen = torch.Generator().manual_seed(0)
    seq = 2 * n + 6
    text_only = torch.randint(0, cfg.language.vocab_size, (1, seq), generator=gen)
    two_images = torch.randint(0, cfg.language.vocab_size, (1, seq), generator=gen)
    two_images[0, 1:1 + n] = cfg.image_token_id
    two_images[0, 3 + n:3 + 2 * n] = cfg.image_token_id
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    with torch.no_grad():
        batched = model(torch.cat([text_only, two_images]), images)  # [b, s, V]
        alone_text = model(text_only, None)
        alone_images = model(two_images, images)
    torch.testing.assert_close(batched[0], alone_text[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1], alone_images[0], rtol=1e-5, atol=1e-5)
    # The images matter: swapping them changes the output after the image positions.
    with torch.no_grad():
        swapped = model(two_images, images.flip(0))
    assert not torch.allclose(swapped[0, -1], alone_images[0, -1])


def test_loss_is_token_cross_entropy_of_the_logits(model_and_cfg):
    model, cfg = model_and_cfg
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.language.vocab_size, (2, 10), generator=gen)
    labels = torch.randint(0, cfg.language.vocab_size, (2, 10), generator=gen)
    with torch.no_grad():
        logits_bsv = model(ids, None)
        loss_bs = model(ids, None, labels=labels)
    expected_bs = F.cross_entropy(logits_bsv.transpose(1, 2), labels, reduction="none")
    torch.testing.assert_close(loss_bs, expected_bs, rtol=1e-5, atol=1e-5)


def test_placeholders_without_images_are_an_error(model_and_cfg):
    model, cfg = model_and_cfg
    ids = torch.zeros(1, 8, dtype=torch.long)
    ids[0, :cfg.vision.tokens_per_image] = cfg.image_token_id
    with pytest.raises(ValueError, match="no images"):
        model(ids, None)


def test_padding_is_left_out_of_the_llm_routers_losses_and_counts():
    """With ``padding_mask`` (True = padding), a right-padded row routes and weighs like its real part."""
    from cumo_megatron.moe.stats import collect_moe_stats

    platform.initialize(platform.ParallelSizes(), seed=12)
    cfg = tiny(moe=False, llm_moe=True)
    model = build_model(cfg, ParallelConfig()).train()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.language.vocab_size, (2, 12), generator=gen)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 7:] = True  # row 1: 7 real tokens, 5 padding
    collect_moe_stats(model)  # start from empty counters
    model(ids, None, padding_mask=padding).sum().backward()
    masked = collect_moe_stats(model)
    model.zero_grad()
    # The same two sequences without their padding, one at a time, add up to the same counts.
    alone = []
    for row, n in ((0, 12), (1, 7)):
        model(ids[row:row + 1, :n], None).sum().backward()
        alone.append(collect_moe_stats(model))
    top_k = cfg.language.moe.top_k
    llm_layers = [k for k in masked["layers"] if k.startswith("language")]
    assert llm_layers
    for key in llm_layers:
        assert sum(masked["layers"][key]) == top_k * (12 + 7), key
        assert masked["layers"][key] == [a + b for a, b in zip(alone[0]["layers"][key], alone[1]["layers"][key])]
    # Unmasked, the padding is counted.
    collect_moe_stats(model)
    model(ids, None).sum().backward()
    unmasked = collect_moe_stats(model)
    assert all(sum(unmasked["layers"][k]) == top_k * 24 for k in llm_layers)
