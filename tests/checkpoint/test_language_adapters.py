"""HF LLaMA / Mistral / Mixtral <-> our megatron GPTModel: our logits equal HF's for every
architecture and on-disk layout, round trips are bit-exact, exports load with ``from_pretrained``,
and configurations or checkpoints we cannot represent fail clearly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import cumo_megatron.platform as platform
from cumo_megatron.checkpoint.adapters.common import CheckpointError, MissingKeyError
from cumo_megatron.checkpoint.adapters.language import (
    fuse_qkv,
    hf_config_from_language,
    hf_lm_to_megatron,
    hf_lm_unused_keys,
    language_config_from_hf,
    megatron_to_hf_lm,
    split_qkv,
)
from cumo_megatron.checkpoint.io import load_into, open_checkpoint, write_safetensors
from cumo_megatron.config.schema import LanguageConfig, ModelConfig, MoEConfig, ParallelConfig
from cumo_megatron.models.language import build_language_model
from tests.fixtures.tiny_models import LM_LAYOUTS, save_hf_lm, tiny_llm_config

TOL = 1e-4
# One layout per architecture for the logits check; the other layouts must give identical tensors.
LOGITS_LAYOUT = {"llama": "bin_sharded", "mistral": "safetensors_sharded", "mixtral": "safetensors"}


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    platform.initialize(platform.ParallelSizes(), seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``kind -> (hf model, {layout: dir})`` for every architecture and layout (same weights)."""
    out = {}
    for kind in LOGITS_LAYOUT:
        dirs = {}
        for layout in LM_LAYOUTS:
            path = tmp_path_factory.mktemp(f"{kind}-{layout}")
            model = save_hf_lm(path, kind, layout, seed=0)
            dirs[layout] = path
        out[kind] = (model, dirs)
    return out


def _ours(lang: LanguageConfig, named_tensors):
    model = build_language_model(ModelConfig(language=lang), ParallelConfig()).eval()
    load_into(model, named_tensors, strict=True)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, position_ids=None, attention_mask=None)


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(LOGITS_LAYOUT))
def test_logits_equal_hf_and_layouts_agree(saved, kind):
    hf, dirs = saved[kind]
    src = open_checkpoint(dirs[LOGITS_LAYOUT[kind]])
    lang = language_config_from_hf(dirs[LOGITS_LAYOUT[kind]])
    assert lang.arch == kind and lang.num_kv_heads == 2 and (lang.moe is not None) == (kind == "mixtral")
    converted = dict(hf_lm_to_megatron(src, lang, prefix=""))
    ours = _ours(lang, converted.items())
    ids = _ids(lang.vocab_size)
    ref = hf(ids).logits
    got = _logits(ours, ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= TOL
    for layout, path in dirs.items():  # every on-disk layout converts to the same tensors
        other = dict(hf_lm_to_megatron(open_checkpoint(path), language_config_from_hf(path), prefix=""))
        assert other.keys() == converted.keys(), layout
        assert all(torch.equal(other[k], converted[k]) for k in converted), layout


@pytest.mark.parametrize("kind", list(LOGITS_LAYOUT))
def test_round_trip_is_bit_exact_and_export_loads_in_transformers(saved, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, dirs = saved[kind]
    src = open_checkpoint(dirs["safetensors"])
    lang = language_config_from_hf(dirs["safetensors"])
    ours = _ours(lang, hf_lm_to_megatron(src, lang, prefix=""))
    back = dict(megatron_to_hf_lm(ours.state_dict(), lang, prefix=""))
    assert sorted(back) == sorted(src.keys())
    for key in back:
        assert back[key].dtype == src[key].dtype and torch.equal(back[key], src[key]), key

    write_safetensors(tmp_path, back.items(), max_shard_bytes=100_000, config=hf_config_from_language(lang))
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == type(hf).__name__
    assert language_config_from_hf(tmp_path) == lang
    ids = _ids(lang.vocab_size, seed=1)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, hf(ids).logits, atol=1e-6, rtol=0)


def test_transformers5_in_memory_mixtral_names(saved):
    """A live transformers-5 Mixtral has fused experts (``mlp.experts.gate_up_proj``) and
    ``mlp.gate``; they convert to the same tensors as the on-disk per-expert names."""
    hf, dirs = saved["mixtral"]
    in_memory = hf.state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in in_memory)
    lang = language_config_from_hf(dirs["safetensors"])
    from_memory = dict(hf_lm_to_megatron(in_memory, lang))
    from_disk = dict(hf_lm_to_megatron(open_checkpoint(dirs["safetensors"]), lang))
    assert from_memory.keys() == from_disk.keys()
    assert all(torch.equal(from_memory[k], from_disk[k]) for k in from_disk)


def test_tied_embeddings(tmp_path):
    hf = save_hf_lm(tmp_path, "llama", "safetensors", seed=3, tie_word_embeddings=True)
    lang = language_config_from_hf(tmp_path)
    assert lang.tie_embeddings
    src = open_checkpoint(tmp_path)
    ours = _ours(lang, hf_lm_to_megatron(src, lang, prefix=""))
    assert "output_layer.weight" not in dict(ours.named_parameters())
    ids = _ids(lang.vocab_size)
    assert (_logits(ours, ids) - hf(ids).logits).abs().max().item() <= TOL
    exported = dict(megatron_to_hf_lm(ours.state_dict(), lang, prefix=""))
    assert "lm_head.weight" not in exported
    assert hf_lm_unused_keys(list(src.keys()) + ["lm_head.weight"], lang) == ["lm_head.weight"]


def test_qkv_fusing_matches_megatron_grouping():
    """Rows of group g: its query heads, then its key head, then its value head."""
    heads, groups, d = 4, 2, 3
    q = torch.arange(heads * d).float().unsqueeze(1)
    k = 100 + torch.arange(groups * d).float().unsqueeze(1)
    v = 200 + torch.arange(groups * d).float().unsqueeze(1)
    fused = fuse_qkv(q, k, v, heads, groups).squeeze(1).tolist()
    expected = []
    for g in range(groups):
        expected += q[g * 2 * d:(g + 1) * 2 * d, 0].tolist() + k[g * d:(g + 1) * d, 0].tolist() + v[g * d:(g + 1) * d, 0].tolist()
    assert fused == expected
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fuse_qkv(q, k, v, heads, groups), heads, groups), (q, k, v)))


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


def _tf5_config(kind: str, **overrides) -> dict:
    return tiny_llm_config(kind, **overrides).to_dict()  # rope_parameters, dtype: transformers 5 style


@pytest.mark.parametrize("kind", list(LOGITS_LAYOUT))
def test_config_styles_of_transformers_4_and_5_agree(saved, kind):
    legacy = language_config_from_hf(saved[kind][1]["safetensors"] / "config.json")  # top-level rope_theta
    assert legacy == language_config_from_hf(_tf5_config(kind))
    assert legacy.rope_theta == (1e4 if kind == "llama" else 1e6)
    if kind == "mixtral":
        assert legacy.moe == MoEConfig(num_experts=4, top_k=2)
    assert language_config_from_hf(hf_config_from_language(legacy)) == legacy


@pytest.mark.parametrize("kind", list(LOGITS_LAYOUT))
def test_omitted_fields_take_transformers_defaults(kind):
    """A sparse config.json means what transformers' config class makes of it."""
    import transformers

    sparse = dict(
        model_type=kind, vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8,  # Mistral/Mixtral default to 8 KV heads
    )
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "mixtral": transformers.MixtralConfig}[kind]
    full = config_cls(**{k: v for k, v in sparse.items() if k != "model_type"}).to_dict()
    ours = language_config_from_hf(sparse, allow_sliding_window=True)
    assert ours == language_config_from_hf(full, allow_sliding_window=True)
    assert ours.rms_norm_eps == (1e-5 if kind == "mixtral" else 1e-6)
    if kind == "mistral":  # transformers' MistralConfig defaults to a 4096-token window
        with pytest.raises(CheckpointError, match="sliding_window=4096"):
            language_config_from_hf(sparse)


def test_llava_model_types_and_missing_kv_heads():
    cfg = _tf5_config("mistral")
    cfg.update(model_type="llava_mistral", architectures=["LlavaMistralForCausalLM"])
    assert language_config_from_hf(cfg).arch == "mistral"
    llama = _tf5_config("llama")
    del llama["num_key_value_heads"]
    assert language_config_from_hf(llama).num_kv_heads is None
    assert language_config_from_hf(dict(llama, model_type="llava")).arch == "llama"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "not a LLaMA, Mistral or Mixtral"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type='linear'"),
        ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
        ({"attention_bias": True}, "attention_bias/mlp_bias"),
        ({"mlp_bias": True}, "attention_bias/mlp_bias"),
        ({"head_dim": 32}, "head_dim=32"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"vocab_size": None}, "missing field 'vocab_size'"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    cfg = dict(_tf5_config("llama"), **change)
    with pytest.raises(CheckpointError, match=message):
        language_config_from_hf(cfg)


def test_sliding_window_needs_consent():
    cfg = _tf5_config("mistral", sliding_window=64)
    with pytest.raises(CheckpointError, match="sliding_window=64"):
        language_config_from_hf(cfg)
    assert language_config_from_hf(cfg, allow_sliding_window=True).arch == "mistral"
    assert language_config_from_hf(_tf5_config("mistral", sliding_window=4096)).arch == "mistral"  # >= max positions


# ---------------------------------------------------------------------------------------------
# Checkpoints that do not fit
# ---------------------------------------------------------------------------------------------


def test_mismatched_checkpoints_fail_by_name(saved):
    src = dict(open_checkpoint(saved["llama"][1]["safetensors"]).items())
    lang = language_config_from_hf(saved["llama"][1]["safetensors"])
    with pytest.raises(CheckpointError, match="layers.*language.num_layers=3"):
        hf_lm_to_megatron(src, dataclasses.replace(lang, num_layers=3))
    with pytest.raises(CheckpointError, match=r"'model.embed_tokens.weight' has shape \[320, 64\], expected \[330, 64\]"):
        list(hf_lm_to_megatron(src, dataclasses.replace(lang, vocab_size=330)))
    with pytest.raises(CheckpointError, match="no place for.*q_proj.bias"):
        hf_lm_to_megatron(dict(src, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}), lang)
    incomplete = {k: v for k, v in src.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        list(hf_lm_to_megatron(incomplete, lang))
    with pytest.raises(MissingKeyError, match="not a Mixtral state dict"):
        hf_lm_to_megatron(src, language_config_from_hf(_tf5_config("mixtral")))
    # Stored rotary buffers of old transformers 4 checkpoints are harmless and reported as unused.
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    with_buffer = dict(src, **{inv_freq: torch.ones(8)})
    assert len(list(hf_lm_to_megatron(with_buffer, lang))) == len(list(hf_lm_to_megatron(src, lang)))
    assert hf_lm_unused_keys(with_buffer, lang) == [inv_freq]
