"""Self-checks of the plain-PyTorch CuMo oracle against hand computations and HF models."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures.tiny_models import (
    random_images,
    tiny_clip_vision_config,
    tiny_clip_vision_model,
    tiny_llama,
    tiny_reference_cumo,
)
from tests.reference.cumo_reference import (
    ReferenceCLIPMLP,
    ReferenceCLIPMoEVisionTower,
    ReferenceConnector,
    ReferenceConnectorExpert,
    ReferenceCuMo,
    ReferenceMoE,
    balance_loss,
    merge_chessboard,
    quick_gelu,
    route_topk,
    s2_features,
    split_chessboard,
    z_loss,
)


def test_route_topk_renormalises_top_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    weights, idx, probs = route_topk(logits, 2)
    assert torch.allclose(probs, torch.softmax(logits, -1))
    assert idx.tolist() == [[0, 1], [2, 3]]
    assert torch.allclose(weights.sum(-1), torch.ones(2))
    p = torch.softmax(logits[0], -1)
    assert torch.allclose(weights[0], torch.stack([p[0], p[1]]) / (p[0] + p[1]))
    assert weights.dtype == torch.float32
    # fp32 routing of bf16 logits
    w16, _, p16 = route_topk(logits.bfloat16(), 2)
    assert p16.dtype == torch.float32 and w16.dtype == torch.float32


def test_balance_loss_by_hand_and_matches_original_formula():
    torch.manual_seed(0)
    b, t, e = 3, 5, 4
    probs = torch.softmax(torch.randn(b, t, e), -1)
    top1 = probs.argmax(-1)
    # by hand, sample by sample
    per_sample = []
    for s in range(b):
        loss_s = 0.0
        for ex in range(e):
            p_e = probs[s, :, ex].mean()
            f_e = (top1[s] == ex).float().mean()
            loss_s += p_e * f_e
        per_sample.append(e * e * loss_s / e)
    expected = torch.stack(per_sample).mean()
    assert torch.allclose(balance_loss(probs, top1, e), expected)
    # the original: (density_1_proxy * density_1).mean() * E**2 with [B, E] densities
    original = (probs.mean(1) * F.one_hot(top1, e).float().mean(1)).mean() * e**2
    assert torch.allclose(balance_loss(probs, top1, e), original)
    # uniform router, perfectly balanced top-1 -> loss 1
    uniform = torch.full((1, 4, 4), 0.25)
    assert torch.allclose(balance_loss(uniform, torch.arange(4).view(1, 4), 4), torch.tensor(1.0))


def test_z_loss():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2.0) ** 2 + torch.logsumexp(torch.tensor([1.0, 2.0]), 0).item() ** 2) / 2
    assert abs(z_loss(logits).item() - expected) < 1e-6


def _vectorised_moe(moe, x):
    """An independent dense formulation: every expert on every token, masked by routing weights."""
    logits = moe.gate(x)
    weights, idx, probs = route_topk(logits, moe.top_k)
    dense_w = torch.zeros_like(probs).scatter(-1, idx, weights)  # [B,T,E]
    outs = torch.stack([expert(x) for expert in moe.experts], dim=-2)  # [B,T,E,D]
    return (dense_w.unsqueeze(-1) * outs).sum(-2)


def test_moe_of_identical_experts_equals_the_dense_mlp():
    torch.manual_seed(0)
    mlp = ReferenceCLIPMLP(16, 32)
    moe = ReferenceMoE(16, [copy.deepcopy(mlp) for _ in range(4)], top_k=2)
    x = torch.randn(3, 7, 16)
    out, bal, z = moe(x)
    assert torch.allclose(out, mlp(x), atol=1e-6)
    assert bal.ndim == 0 and z.ndim == 0 and bal > 0 and z > 0


def test_moe_loop_matches_dense_formulation_and_backprops():
    torch.manual_seed(1)
    experts = [ReferenceConnectorExpert(12, 20) for _ in range(4)]
    moe = ReferenceMoE(12, experts, top_k=2, d_out=20)
    x = torch.randn(2, 9, 12, requires_grad=True)
    out, bal, z = moe(x)
    assert out.shape == (2, 9, 20)
    assert torch.allclose(out, _vectorised_moe(moe, x), atol=1e-6)
    (out.square().mean() + bal + z).backward()
    assert x.grad is not None and moe.gate.weight.grad is not None
    assert moe.gate.weight.grad.abs().sum() > 0


def test_quick_gelu_and_connector_expert():
    x = torch.linspace(-3, 3, 11)
    assert torch.allclose(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    exp = ReferenceConnectorExpert(4, 6)
    assert [k for k in exp.state_dict()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    y = torch.randn(2, 4)
    assert torch.allclose(exp(y), exp[2](F.gelu(exp[0](y))))


def test_dense_tower_equals_hf_clip_penultimate_layer():
    hf = tiny_clip_vision_model(seed=0)
    tower = ReferenceCLIPMoEVisionTower(hf.config, num_experts=None)
    tower.load_hf_clip_vision_state_dict(hf.state_dict())
    images = random_images(2, 28, seed=0)
    with torch.no_grad():
        expected = hf(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]
        got, bal, z = tower(images)
    assert bal is None and z is None
    assert got.shape == (2, 4, 32)
    assert (got - expected).abs().max().item() <= 1e-5


def test_upcycled_moe_tower_equals_dense_tower_and_counts_run_layers():
    hf = tiny_clip_vision_model(seed=0, patch_size=7)
    prefixed = {"vision_model." + k: v for k, v in hf.state_dict().items()}
    dense = ReferenceCLIPMoEVisionTower(hf.config, num_experts=None)
    dense.load_hf_clip_vision_state_dict(prefixed)
    moe = ReferenceCLIPMoEVisionTower(hf.config, num_experts=4, top_k=2)
    moe.load_hf_clip_vision_state_dict(prefixed)
    assert moe.num_layers_run == 2 and moe.moe_layers == [0, 1, 2]
    images = random_images(2, 28, seed=1)
    calls = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: calls.append(o)) for layer in moe.encoder.layers]
    with torch.no_grad():
        a, _, _ = dense(images)
        b, bal, z = moe(images)
    for h in hooks:
        h.remove()
    assert (a - b).abs().max().item() <= 1e-5
    assert len(calls) == 2  # the last layer is not run
    per_layer = []
    for logits in calls:
        _, idx, probs = route_topk(logits, 2)
        per_layer.append(balance_loss(probs, idx[..., 0], 4))
    expected_bal = torch.stack(per_layer).mean()
    expected_z = torch.stack([z_loss(c) for c in calls]).mean()
    assert torch.allclose(bal, expected_bal) and torch.allclose(z, expected_z)


def test_tower_mixed_dense_and_moe_layers():
    cfg = tiny_clip_vision_config()
    tower = ReferenceCLIPMoEVisionTower(cfg, num_experts=4, moe_layers=[1])
    assert not tower.encoder.layers[0].is_moe and tower.encoder.layers[1].is_moe
    keys = tower.state_dict().keys()
    assert "encoder.layers.0.mlp.fc1.weight" in keys
    assert "encoder.layers.1.mlp.gate.weight" in keys and "encoder.layers.1.mlp.experts.3.fc2.bias" in keys
    _, bal, z = tower(random_images(1, 28))
    assert bal is not None


def test_chessboard_split_merge_roundtrip_and_order():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    crops = split_chessboard(x, 3)
    assert crops.shape == (18, 1, 2, 2)
    # crop (i=0, j=1) of sample 1 sits at batch index (0*3 + 1)*B + 1
    assert torch.equal(crops[(0 * 3 + 1) * 2 + 1], x[1, :, 0:2, 2:4])
    assert torch.equal(crops[(2 * 3 + 0) * 2 + 0], x[0, :, 4:6, 0:2])
    assert torch.equal(merge_chessboard(crops, 3), x)


def test_s2_features_by_hand():
    cfg = tiny_clip_vision_config(patch_size=7)
    torch.manual_seed(0)
    tower = ReferenceCLIPMoEVisionTower(cfg, num_experts=4)
    images = random_images(2, 28, seed=3)
    with torch.no_grad():
        feats, bal, z = s2_features(tower, images, (1, 3))
        f1, b1, z1 = tower(images)
        big = F.interpolate(images, size=84, mode="bicubic", align_corners=False)
        grid = torch.zeros(2, 32, 12, 12)
        crops_b, crops_z = [], []
        all_crops = []
        for i in range(3):
            for j in range(3):
                all_crops.append(big[:, :, 28 * i : 28 * (i + 1), 28 * j : 28 * (j + 1)])
        f3, b3, z3 = tower(torch.cat(all_crops, 0))
        for n, (i, j) in enumerate([(i, j) for i in range(3) for j in range(3)]):
            fm = f3[n * 2 : (n + 1) * 2].transpose(1, 2).reshape(2, 32, 4, 4)
            grid[:, :, 4 * i : 4 * (i + 1), 4 * j : 4 * (j + 1)] = fm
        # area 12x12 -> 4x4 is a 3x3 average pool
        pooled = F.avg_pool2d(grid, 3).flatten(2).transpose(1, 2)
    assert feats.shape == (2, 16, 64)
    assert torch.allclose(feats[..., :32], f1, atol=1e-6)
    assert torch.allclose(feats[..., 32:], pooled, atol=1e-5)
    assert torch.allclose(bal, (b1 + b3) / 2) and torch.allclose(z, (z1 + z3) / 2)


def test_connector_dense_and_moe_upcycled():
    torch.manual_seed(0)
    dense = ReferenceConnector(8, 16)
    moe = ReferenceConnector(8, 16, num_experts=4, top_k=2)
    moe.upcycle_from_dense(dense.net.state_dict())
    x = torch.randn(2, 5, 8)
    yd, bd, zd = dense(x)
    ym, bm, zm = moe(x)
    assert bd is None and zd is None and bm is not None
    assert torch.allclose(yd, ym, atol=1e-6)
    assert sorted(moe.state_dict())[:3] == ["net.experts.0.0.bias", "net.experts.0.0.weight", "net.experts.0.2.bias"]


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_reference_cumo_text_only_equals_hf_lm(kind):
    ref = tiny_reference_cumo(kind, scales=(1,))
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        out = ref(ids)
        hf_logits = ref.lm(input_ids=ids).logits
    assert torch.allclose(out["logits"], hf_logits, atol=1e-6)
    # next-token CE, last position unlabeled
    ce = F.cross_entropy(hf_logits[:, :-1].reshape(-1, hf_logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert torch.allclose(out["lm_loss"], ce, atol=1e-6)
    assert out["per_token_loss"][:, -1].abs().sum() == 0
    if kind == "mixtral":
        assert set(out["balance_losses"]) == {"llm"}
        expected = out["lm_loss"] + 0.1 * out["balance_losses"]["llm"] + 0.01 * out["z_losses"]["llm"]
        assert torch.allclose(out["total_loss"], expected)
    else:
        assert out["balance_losses"] == {} and torch.equal(out["total_loss"], out["lm_loss"])


def _original_mixtral_block_losses(router_logits_te: torch.Tensor, top_k: int):
    """The aux losses of CuMo's ``smoe_mixtral_helper.py`` block, line by line, on the router
    logits of the flattened micro-batch ``[B*T, E]`` (einops ``reduce '... n e -> ... e'`` is
    the mean over the token dimension)."""
    num_experts = router_logits_te.shape[-1]
    router_z_loss = torch.logsumexp(router_logits_te, dim=-1).square().mean()
    routing_weights = F.softmax(router_logits_te, dim=1, dtype=torch.float)
    density_1_proxy = routing_weights.mean(dim=-2)
    _, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    one_hot_gate_indices = F.one_hot(selected_experts.t(), num_experts).float()[0]
    density_1 = one_hot_gate_indices.mean(dim=-2)
    balance_loss_ = (density_1_proxy * density_1).mean() * float(num_experts**2)
    return balance_loss_, router_z_loss


def test_reference_llm_aux_is_the_original_block_over_the_flattened_micro_batch():
    """Micro-batch of 3 with padding: the LLM's losses are the original block's on all the real
    tokens at once (padding left out: the documented deliberate difference), averaged over layers;
    not the mean of per-sample losses, and not the original's with the padding counted."""
    ref = tiny_reference_cumo("mixtral", scales=(1,))
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (3, 10), generator=gen)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0  # right padding, as the data pipeline pads
    mask[2, 3:] = 0
    k = ref.lm.config.num_experts_per_tok
    with torch.no_grad():
        out = ref(ids, attention_mask=mask)
        router_logits = ref.lm(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
    assert len(router_logits) == ref.lm.config.num_hidden_layers == 2
    real_t = mask.reshape(-1).bool()
    per_layer = [_original_mixtral_block_losses(lg[real_t], k) for lg in router_logits]
    balance = torch.stack([b for b, _ in per_layer]).mean()
    z = torch.stack([z for _, z in per_layer]).mean()
    torch.testing.assert_close(out["balance_losses"]["llm"], balance, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["z_losses"]["llm"], z, rtol=1e-6, atol=1e-6)
    # Without padding it is the original's number exactly.
    with torch.no_grad():
        full = ref(ids)
        full_logits = ref.lm(input_ids=ids, output_router_logits=True).router_logits
    original = torch.stack([_original_mixtral_block_losses(lg, k)[0] for lg in full_logits]).mean()
    torch.testing.assert_close(full["balance_losses"]["llm"], original, rtol=1e-6, atol=1e-6)
    # The groupings it is not (each would fail the checks above).
    per_sample = []
    for lg in router_logits:
        lg_bte = lg.view(3, 10, -1)
        per_sample.append(torch.stack([
            _original_mixtral_block_losses(lg_bte[i, mask[i].bool()], k)[0] for i in range(3)
        ]).mean())
    assert abs(float(torch.stack(per_sample).mean() - balance)) > 1e-3
    with_padding = torch.stack([_original_mixtral_block_losses(lg, k)[0] for lg in router_logits]).mean()
    assert abs(float(with_padding - balance)) > 1e-3


def test_reference_cumo_with_images_splices_features_and_sums_losses():
    ref = tiny_reference_cumo("mistral", scales=(1, 3))
    n_img = ref.num_image_tokens
    assert n_img == 4
    images = random_images(3, 28, seed=5)
    img = ref.image_token_id
    # sample 0: one image; sample 1: two images (text between)
    row0 = [1, 10, 11] + [img] * n_img + [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
    row1 = [1] + [img] * n_img + [30, 31] + [img] * n_img + [32, 33, 34, 35, 36, 37, 38]
    ids = torch.tensor([row0, row1])
    loss_mask = (ids != img).float()
    loss_mask[:, :-1] *= (ids[:, 1:] != img).float()  # no loss where the next token is an image slot
    with torch.no_grad():
        out = ref(ids, images, loss_mask=loss_mask)
        feats, _, _ = s2_features(ref.tower, images, (1, 3))
        emb, _, _ = ref.connector(feats)
        embeds = ref.lm.get_input_embeddings()(ids.clamp(min=0))
        embeds[0, 3 : 3 + n_img] = emb[0]
        embeds[1, 1 : 1 + n_img] = emb[1]
        embeds[1, 3 + n_img : 3 + 2 * n_img] = emb[2]
        hf_logits = ref.lm(inputs_embeds=embeds).logits
    assert torch.allclose(out["logits"], hf_logits, atol=1e-5)
    assert set(out["balance_losses"]) == {"vision", "connector"}
    bal = sum(out["balance_losses"].values())
    zs = sum(out["z_losses"].values())
    assert torch.allclose(out["total_loss"], out["lm_loss"] + 0.1 * bal + 0.01 * zs)
    m = out["loss_mask"]
    assert torch.allclose(out["lm_loss"], out["per_token_loss"].sum() / m.sum())
    with pytest.raises(ValueError):
        ref(ids, images[:2])


def test_reference_cumo_generate_greedy_matches_manual_loop():
    ref = tiny_reference_cumo("llama", scales=(1,), num_experts=None, moe_connector=False)
    images = random_images(1, 28, seed=2)
    ids = torch.tensor([[1, 5, 6] + [ref.image_token_id] * ref.num_image_tokens + [7, 8]])
    new = ref.generate(images, ids, max_new_tokens=4)
    assert new.shape == (1, 4)
    seq = ids
    for step in range(4):
        with torch.no_grad():
            logits = ref(seq, images)["logits"]
        nxt = logits[:, -1].argmax(-1)
        assert nxt.item() == new[0, step].item()
        seq = torch.cat([seq, nxt[:, None]], 1)
    # eos handling stops early
    first = new[0, 0].item()
    assert ref.generate(images, ids, max_new_tokens=4, eos_token_id=first).shape == (1, 1)
