"""The local-spec replacements: `SDPACoreAttention`, `SequenceParallelTorchNorm`, `ExpertRowParallelLinear`.

Each is compared with a plain re-statement of what it computes, and with the megatron module it
stands in for where that one runs (or shown to fail where it does not).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from cumo_megatron.models.attention import SDPACoreAttention
from cumo_megatron.models.linear import ExpertRowParallelLinear
from cumo_megatron.models.norms import SequenceParallelTorchNorm
from cumo_megatron.platform import ParallelSizes, initialize

ATOL = 1e-5


@pytest.fixture(autouse=True)
def world_of_one():
    """megatron's linear layers look up (world-of-one) process groups; seed for reproducible data."""
    initialize(ParallelSizes(), seed=77)
    yield


def _config(**fields) -> TransformerConfig:
    base = dict(
        num_layers=1, hidden_size=32, num_attention_heads=4, kv_channels=8, attention_dropout=0.0,
        masked_softmax_fusion=False, bias_activation_fusion=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
    )
    base.update(fields)
    return TransformerConfig(**base)


# --- SDPACoreAttention --------------------------------------------------------------------------


def reference_attention(q_sbhd, k_sbgd, v_sbgd, causal: bool, allowed_qk=None):
    """softmax(Q K^T / sqrt(d)) V per head; head h reads KV group h // (heads / groups).

    Causal masking is bottom-right aligned: query i (of sq) is key position i + sk - sq.
    Returns [sq, b, heads * d].
    """
    sq, b, heads, d = q_sbhd.shape
    sk, groups = k_sbgd.shape[0], k_sbgd.shape[2]
    out = torch.empty(sq, b, heads, d)
    for h in range(heads):
        g = h // (heads // groups)
        for n in range(b):
            scores = q_sbhd[:, n, h] @ k_sbgd[:, n, g].T / math.sqrt(d)  # [sq, sk]
            if causal:
                query_pos = torch.arange(sq).unsqueeze(1) + (sk - sq)
                scores = scores.masked_fill(torch.arange(sk).unsqueeze(0) > query_pos, float("-inf"))
            if allowed_qk is not None:
                scores = scores.masked_fill(~allowed_qk, float("-inf"))
            out[:, n, h] = scores.softmax(dim=-1) @ v_sbgd[:, n, g]
    return out.reshape(sq, b, heads * d)


def _qkv(sq, sk, b=2, heads=4, groups=4, d=8):
    return torch.randn(sq, b, heads, d), torch.randn(sk, b, groups, d), torch.randn(sk, b, groups, d)


@pytest.mark.parametrize("groups", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.no_mask], ids=["causal", "no_mask"])
def test_sdpa_attention_matches_reference(mask_type, groups):
    """Full sequence (sq == sk), with and without the causal mask, MHA / GQA / MQA."""
    attention = SDPACoreAttention(_config(num_query_groups=groups), 1, mask_type).eval()
    q, k, v = _qkv(6, 6, groups=groups)
    out = attention(q, k, v, None)
    assert out.shape == (6, 2, 32)
    expected = reference_attention(q, k, v, causal=mask_type == AttnMaskType.causal)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.no_mask], ids=["causal", "no_mask"])
def test_sdpa_attention_matches_megatron_dot_product_attention(mask_type):
    """Same numbers as megatron's own DotProductAttention (which runs here under the CPU adaptations)."""
    config = _config(num_query_groups=2)
    ours = SDPACoreAttention(config, 1, mask_type).eval()
    stock = DotProductAttention(config, 1, mask_type, "self").eval()
    q, k, v = _qkv(5, 5, groups=2)
    torch.testing.assert_close(ours(q, k, v, None), stock(q, k, v, None), rtol=0, atol=ATOL)


@pytest.mark.parametrize("sq", [1, 3])
def test_sdpa_causal_decode_is_bottom_right_aligned(sq):
    """Query shorter than key (KV-cache decode): the last query sees every key, earlier ones fewer."""
    attention = SDPACoreAttention(_config(num_query_groups=2), 1, AttnMaskType.causal).eval()
    q, k, v = _qkv(sq, 7, groups=2)
    out = attention(q, k, v, None)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True), rtol=0, atol=ATOL)
    # Top-left alignment (query i sees keys <= i) would give something else.
    top_left = reference_attention(q, k, v, causal=False, allowed_qk=torch.ones(sq, 7, dtype=torch.bool).tril())
    assert (out - top_left).abs().max() > 1e-2


def test_sdpa_explicit_mask_overrides_mask_type():
    """A boolean attention_mask (True = masked out, megatron's convention) replaces the causal mask."""
    attention = SDPACoreAttention(_config(), 1, AttnMaskType.causal).eval()
    q, k, v = _qkv(4, 4)
    masked_out = torch.zeros(4, 4, dtype=torch.bool)
    masked_out[:, 1] = True  # nobody may attend to key 1
    out = attention(q, k, v, masked_out.view(1, 1, 4, 4))
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=False, allowed_qk=~masked_out),
                               rtol=0, atol=ATOL)


def test_sdpa_dropout_only_in_training():
    """attention_dropout applies in train mode only; eval equals the reference."""
    attention = SDPACoreAttention(_config(attention_dropout=0.5), 1, AttnMaskType.no_mask)
    q, k, v = _qkv(6, 6)
    expected = reference_attention(q, k, v, causal=False)
    assert (attention.train()(q, k, v, None) - expected).abs().max() > 1e-2
    torch.testing.assert_close(attention.eval()(q, k, v, None), expected, rtol=0, atol=ATOL)


# --- SequenceParallelTorchNorm ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_norm_matches_torch(kind):
    """Same output and gradients as torch.nn.LayerNorm / RMSNorm with the same affine parameters."""
    norm = SequenceParallelTorchNorm(_config(normalization=kind), hidden_size=16, eps=1e-5)
    reference = torch.nn.LayerNorm(16, eps=1e-5) if kind == "LayerNorm" else torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
        reference.weight.copy_(norm.weight)
        if kind == "LayerNorm":
            norm.bias.copy_(torch.randn(16))
            reference.bias.copy_(norm.bias)
    assert sorted(n for n, _ in norm.named_parameters()) == (["bias", "weight"] if kind == "LayerNorm" else ["weight"])
    x = 3 * torch.randn(5, 2, 16) + 1
    ours, theirs = norm(x), reference(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    torch.testing.assert_close(norm.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_norm_marks_params_sequence_parallel(sequence_parallel):
    """Params carry `sequence_parallel` as configured (megatron all-reduces those grads over TP);
    megatron's WrappedTorchNorm refuses sequence parallelism altogether."""
    config = _config(normalization="LayerNorm", tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
    norm = SequenceParallelTorchNorm(config, hidden_size=16)
    assert [getattr(p, "sequence_parallel", None) for p in norm.parameters()] == [sequence_parallel] * 2
    if sequence_parallel:
        with pytest.raises(AssertionError, match="sequence parallel"):
            WrappedTorchNorm(config, hidden_size=16)


def test_norm_rejects_unsupported_options():
    """Zero-centered gamma and unknown normalizations raise clear errors."""
    with pytest.raises(ValueError, match="zero-centered gamma"):
        SequenceParallelTorchNorm(_config(layernorm_zero_centered_gamma=True), hidden_size=16)
    with pytest.raises(ValueError, match="unsupported normalization"):
        SequenceParallelTorchNorm(_config(), hidden_size=16, normalization="BatchNorm")


# --- ExpertRowParallelLinear ------------------------------------------------------------------


def _expert_config(**fields) -> TransformerConfig:
    return _config(hidden_size=8, num_attention_heads=2, ffn_hidden_size=16, add_bias_linear=True,
                   activation_func=F.gelu, **fields)


def _biased_expert(fc2) -> MLP:
    return MLP(_expert_config(), MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=fc2),
               is_expert=True, ffn_hidden_size=16)


def _expected_expert(expert: MLP, x, p):
    fc1, fc2 = expert.linear_fc1, expert.linear_fc2
    return p.unsqueeze(-1) * (F.gelu(x @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias)


def test_stock_row_parallel_fc2_fails_for_biased_expert():
    """megatron's MLP adds a biased expert's scaled fc2 bias in place on a custom-Function view."""
    expert = _biased_expert(RowParallelLinear)
    x = torch.randn(5, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        output, _ = expert(x, per_token_scale=torch.rand(5))
        output.sum().backward()


def test_expert_row_parallel_fc2_computes_scaled_biased_mlp():
    """With our fc2 the expert runs forward and backward and equals p * (W2 act(W1 x + b1) + b2)."""
    expert = _biased_expert(ExpertRowParallelLinear)
    x = torch.randn(5, 8, requires_grad=True)
    p = torch.rand(5)
    output, output_bias = expert(x, per_token_scale=p)
    assert output_bias is None  # the bias is already in the output, scaled by p

    fc1, fc2 = expert.linear_fc1, expert.linear_fc2
    x_ref = x.detach().clone().requires_grad_(True)
    w1, b1, w2, b2 = (t.detach().clone().requires_grad_(True) for t in (fc1.weight, fc1.bias, fc2.weight, fc2.bias))
    expected = p.unsqueeze(-1) * (F.gelu(x_ref @ w1.T + b1) @ w2.T + b2)
    torch.testing.assert_close(output, expected, rtol=0, atol=ATOL)

    upstream = torch.randn(5, 8)
    (output * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for ours, ref in ((x.grad, x_ref.grad), (fc1.weight.grad, w1.grad), (fc1.bias.grad, b1.grad),
                      (fc2.weight.grad, w2.grad), (fc2.bias.grad, b2.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=ATOL)


def test_sequential_mlp_with_biased_experts():
    """megatron's SequentialMLP (the local MoE experts) with our fc2: each expert's token slice gets
    p * (W2 act(W1 x + b1) + b2); forward and backward run."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.experts import SequentialMLP

    config = _expert_config(num_moe_experts=2, moe_ffn_hidden_size=16)
    experts = SequentialMLP(
        2, config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=ExpertRowParallelLinear),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    x = torch.randn(7, 8, requires_grad=True)
    p = torch.rand(7)
    tokens_per_expert = torch.tensor([3, 4])
    output, output_bias = experts(x, tokens_per_expert, p)
    assert output_bias is None
    expected = torch.cat([
        _expected_expert(experts.local_experts[0], x[:3], p[:3]),
        _expected_expert(experts.local_experts[1], x[3:], p[3:]),
    ])
    torch.testing.assert_close(output, expected, rtol=0, atol=ATOL)
    output.sum().backward()
    assert all(param.grad is not None for param in experts.parameters())
