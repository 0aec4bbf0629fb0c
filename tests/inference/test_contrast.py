"""Self-contrast decoding: alpha = 0 decodes as plain decoding; the contrasted scores equal those
recomputed from two plain forwards (the model, and the same weights built with top-1 routing),
without any KV cache; the weak routings really pick other experts and leave nothing behind; the
CLI takes the options and refuses a model without MoE modules.

The tiny Mixtral release has MoE in the vision tower, the connector and the LLM (4 experts, top-2),
so the weak routing acts on the prompt's image tokens and on every decoded token."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from safetensors.torch import save_file

from cumo_megatron.checkpoint.adapters.cumo_release import megatron_to_release, release_config, release_to_megatron
from cumo_megatron.checkpoint.io import load_into, open_checkpoint
from cumo_megatron.config.schema import MoEConfig, ParallelConfig
from cumo_megatron.data.tokenizer import load_tokenizer
from cumo_megatron.generate import main
from cumo_megatron.inference import generation
from cumo_megatron.inference.contrast import (
    ContrastSettings,
    check_contrast,
    contrast_scores,
    moe_routers,
    weak_routing,
)
from cumo_megatron.inference.generation import generate
from cumo_megatron.inference.session import InferenceSession, default_tokenizer_path
from cumo_megatron.models.cumo import build_model
from tests.inference.conftest import load_release_model, prompt_batch

NEW = 4
TOL = 1e-4  # fp32 logits of the same weights through the cached and the uncached path


@pytest.fixture(scope="module")
def mixtral(release_factory):
    """(release, model, cfg) of the tiny Mixtral release."""
    release = release_factory("mixtral")
    model, cfg = load_release_model(release.path)
    return release, model, cfg


def _with_top_k(moe: MoEConfig | None, k: int) -> MoEConfig | None:
    return None if moe is None else dataclasses.replace(moe, top_k=k)


def _top1_model(release, cfg):
    """The release's weights in a model *configured* with top-1 routing everywhere."""
    weak_cfg = dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, moe=_with_top_k(cfg.vision.moe, 1)),
        connector=dataclasses.replace(cfg.connector, moe=_with_top_k(cfg.connector.moe, 1)),
        language=dataclasses.replace(cfg.language, moe=_with_top_k(cfg.language.moe, 1)),
    )
    model = build_model(weak_cfg, ParallelConfig()).eval()
    load_into(model, release_to_megatron(open_checkpoint(release.path), weak_cfg), strict=True)
    return model


def _reference_scores(strong_bv, weak_bv, alpha, beta):
    """Contrastive decoding written out from probabilities (independent of `contrast_scores`)."""
    p_strong = torch.softmax(strong_bv.double(), dim=-1)
    p_weak = torch.softmax(weak_bv.double(), dim=-1)
    scores = (1 + alpha) * p_strong.log() - alpha * p_weak.log()
    plausible = p_strong >= beta * p_strong.max(dim=-1, keepdim=True).values
    return torch.where(plausible, scores, torch.full_like(scores, -math.inf))


def _record_scores(monkeypatch) -> list[torch.Tensor]:
    """Capture what `generate` hands to the sampler at every step."""
    seen: list[torch.Tensor] = []
    original = generation.sample_next

    def recording(logits_bv, *args, **kwargs):
        seen.append(logits_bv.clone())
        return original(logits_bv, *args, **kwargs)

    monkeypatch.setattr(generation, "sample_next", recording)
    return seen


def test_alpha_zero_decodes_as_plain_decoding(mixtral):
    _, model, cfg = mixtral
    ids, images = prompt_batch(cfg)
    plain = generate(model, ids, images, NEW)
    assert torch.equal(generate(model, ids, images, NEW, contrast=ContrastSettings(1, 0.0)), plain)
    # beta = 0: no plausibility cut, so the sampled distribution is the plain one.
    sampling = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=3)
    sampled = generate(model, ids[:1], images[:1], **sampling)
    assert torch.equal(generate(model, ids[:1], images[:1], **sampling, contrast=ContrastSettings(1, 0.0, beta=0.0)),
                       sampled)


def test_contrasted_scores_equal_two_plain_forwards(mixtral, monkeypatch):
    release, model, cfg = mixtral
    weak_model = _top1_model(release, cfg)
    ids, images = prompt_batch(cfg)
    alpha, beta = 1.5, 0.1
    seen = _record_scores(monkeypatch)
    tokens = generate(model, ids, images, NEW, contrast=ContrastSettings(1, alpha, beta))
    assert tokens.shape == (2, NEW) and len(seen) == NEW
    with torch.no_grad():
        for step in range(NEW):
            sequence = torch.cat([ids, tokens[:, :step]], dim=1)
            strong_bv = model(sequence, images)[:, -1]
            weak_bv = weak_model(sequence, images)[:, -1]
            expected = _reference_scores(strong_bv, weak_bv, alpha, beta)
            got = seen[step].double()
            assert torch.equal(torch.isfinite(got), torch.isfinite(expected)), step
            finite = torch.isfinite(expected)
            assert finite.sum(dim=-1).min() >= 1 and (~finite).any()  # the plausibility cut is active
            assert (got[finite] - expected[finite]).abs().max().item() <= TOL, step
            assert torch.equal(tokens[:, step], expected.argmax(dim=-1)), step
            # The weak model is not the strong one, so the contrast is not a no-op.
            assert (weak_bv - strong_bv).abs().max().item() > 1e-2, step


def _routing_probe(model):
    """Forward hooks on every router: each call's (router, input probabilities, routing map)."""
    calls = []

    def hook(router, inputs, outputs):
        hidden = inputs[0] if inputs[0].dim() == 3 else inputs[0].unsqueeze(1)
        probs_te = torch.softmax(hidden.float().reshape(-1, hidden.shape[-1]) @ router.weight.float().t(), dim=-1)
        calls.append((router, probs_te, outputs[1]))

    handles = [r.register_forward_hook(hook) for r in moe_routers(model)]
    return calls, handles


@pytest.mark.parametrize(
    "routing, k, expected_experts",
    [
        ("top", 1, lambda p: p.topk(1, dim=-1).indices),
        ("bottom", 1, lambda p: p.topk(1, dim=-1, largest=False).indices),
        ("rank", 2, lambda p: p.topk(2, dim=-1).indices[:, 1:]),
    ],
    ids=["top1", "bottom1", "rank2"],
)
def test_weak_routing_picks_other_experts_and_restores_the_model(mixtral, routing, k, expected_experts):
    _, model, cfg = mixtral
    ids, images = prompt_batch(cfg, batch=1)
    routers = moe_routers(model)
    assert {r.settings.module for r in routers} == {"vision", "connector", "language"}
    calls_before = [r.stats.calls for r in routers]
    calls, handles = _routing_probe(model)
    try:
        with torch.no_grad():
            with weak_routing(model, ContrastSettings(k, 1.0, weak_routing=routing)):
                assert all(r.config.moe_router_topk == 1 for r in routers)
                weak_logits = model(ids, images)
            weak_calls = list(calls)
            calls.clear()
            strong_logits = model(ids, images)
    finally:
        for handle in handles:
            handle.remove()
    assert len(weak_calls) == len(routers)
    for router, probs_te, map_te in weak_calls:
        chosen = torch.zeros_like(map_te).scatter(1, expected_experts(probs_te), True)
        assert torch.equal(map_te, chosen), router.settings.module
    for router, _, map_te in calls:
        assert (map_te.sum(dim=-1) == 2).all(), router.settings.module
    # Restored: configured top-k, the class's selection, statistics without the weak forward.
    for router, before in zip(routers, calls_before):
        assert router.topk == 2 and router.config.moe_router_topk == 2
        assert "select_experts" not in vars(router)
        assert router.stats.calls == before + 1
    assert (weak_logits - strong_logits).abs().max().item() > 1e-2


def test_contrast_scores_and_settings_checks(mixtral):
    strong = torch.tensor([[2.0, 1.0, -3.0, 0.0]])
    weak = torch.tensor([[2.0, -1.0, 0.0, 0.5]])
    assert torch.allclose(contrast_scores(strong, weak, 0.0, 0.0), torch.log_softmax(strong, -1))
    expected = _reference_scores(strong, weak, 0.5, 0.1).float()
    got = contrast_scores(strong, weak, 0.5, 0.1)
    assert torch.equal(torch.isinf(got), torch.tensor([[False, False, True, False]]))
    assert torch.allclose(got[torch.isfinite(got)], expected[torch.isfinite(expected)], atol=1e-6)
    _, model, _ = mixtral
    with pytest.raises(ValueError, match="routes exactly as the model does"):
        check_contrast(model, ContrastSettings(2, 1.0))
    with pytest.raises(ValueError, match="has 4"):
        check_contrast(model, ContrastSettings(5, 1.0, weak_routing="rank"))
    with pytest.raises(ValueError, match="beta"):
        ContrastSettings(1, 1.0, beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        ContrastSettings(1, -1.0)


@pytest.fixture(scope="module")
def dense_release(mixtral, tmp_path_factory):
    """A Mistral-like CuMo release without any MoE module (random weights, the Mixtral release's
    CLIP and tokenizer). It selects the last CLIP layer, so the release holds every layer of it."""
    release, _, cfg = mixtral
    dense_cfg = dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, moe=None, feature_layer=-1),
        connector=dataclasses.replace(cfg.connector, moe=None),
        language=dataclasses.replace(cfg.language, arch="mistral", moe=None),
    )
    model = build_model(dense_cfg, ParallelConfig())
    directory = tmp_path_factory.mktemp("dense") / "cumo-dense"
    directory.mkdir()
    weights = {k: v.contiguous() for k, v in megatron_to_release(model.state_dict(), dense_cfg)}
    save_file(weights, str(directory / "model.safetensors"))
    config = release_config(dense_cfg, vision_tower=str(release.clip_path))
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.model").write_bytes((release.path / "tokenizer.model").read_bytes())
    return directory


def test_cli_contrast_options(mixtral, dense_release, capsys):
    release, model, cfg = mixtral
    question = ["--prompt", "Say hi.", "--max-new-tokens", "6"]
    options = ["--contrast-weak-topk", "1", "--contrast-alpha", "1.0", "--contrast-beta", "0.05"]
    assert main(["--load", str(release.path), *question, *options]) == 0
    printed = capsys.readouterr().out
    session = InferenceSession(model, cfg, load_tokenizer(default_tokenizer_path(release.path)))
    expected = session.answer("Say hi.", max_new_tokens=6, contrast=ContrastSettings(1, 1.0, beta=0.05))
    plain = session.answer("Say hi.", max_new_tokens=6)
    assert expected.tokens != plain.tokens  # the options change the answer, so the check means something
    assert printed == expected.text + "\n"

    assert main(["--load", str(dense_release), *question, *options]) == 2
    assert "has none" in capsys.readouterr().err
    assert main(["--load", str(release.path), *question, "--contrast-weak-topk", "2", "--contrast-alpha", "1"]) == 2
    assert "below the configured top-k" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--load", str(release.path), *question, "--contrast-alpha", "1.0"])
    assert "both --contrast-weak-topk and --contrast-alpha" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--load", str(release.path), *question, *options[:4], "--contrast-beta", "2"])
    assert "beta must lie in [0, 1]" in capsys.readouterr().err
