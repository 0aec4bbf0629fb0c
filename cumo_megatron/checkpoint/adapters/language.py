"""Hugging Face LLaMA / Mistral / Mixtral causal LMs <-> our megatron `GPTModel` (TP = PP = EP = 1).

Name map (HF ``model.`` prefix of ``*ForCausalLM``; ours under ``language_model.``)::

    model.embed_tokens.weight                       embedding.word_embeddings.weight
    model.layers.N.input_layernorm.weight           decoder.layers.N.input_layernorm.weight
    model.layers.N.self_attn.{q,k,v}_proj.weight    decoder.layers.N.self_attention.linear_qkv.weight
    model.layers.N.self_attn.o_proj.weight          decoder.layers.N.self_attention.linear_proj.weight
    model.layers.N.post_attention_layernorm.weight  decoder.layers.N.pre_mlp_layernorm.weight
    model.layers.N.mlp.{gate,up}_proj.weight        decoder.layers.N.mlp.linear_fc1.weight  (cat[gate, up])
    model.layers.N.mlp.down_proj.weight             decoder.layers.N.mlp.linear_fc2.weight
    model.norm.weight                               decoder.final_layernorm.weight
    lm_head.weight                                  output_layer.weight  (absent when tied)

Mixtral on disk (every publisher, and what transformers 5 still writes)::

    model.layers.N.block_sparse_moe.gate.weight          decoder.layers.N.mlp.router.weight
    model.layers.N.block_sparse_moe.experts.J.w1/w3      ...mlp.experts.local_experts.J.linear_fc1 (cat[w1, w3])
    model.layers.N.block_sparse_moe.experts.J.w2         ...mlp.experts.local_experts.J.linear_fc2

transformers 5's in-memory Mixtral (a ``model.state_dict()`` handed over directly) is also read:
``mlp.gate.weight`` and fused ``mlp.experts.gate_up_proj [E, 2F, H]`` (gate rows first) /
``mlp.experts.down_proj [E, H, F]``.

Megatron's fused QKV keeps, per query group g, the rows of the group's query heads, then its key
head, then its value head. HF RoPE rotates halves (``rotate_half``), as megatron does with
``rotary_interleaved=False``, so q/k rows need no permutation.

Converters are generators of ``(name, tensor)`` that read one source tensor at a time from a
(lazy) mapping, so a 47B checkpoint streams through without being held twice.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

from cumo_megatron.checkpoint.adapters.common import (
    CheckpointError,
    MissingKeyError,
    Rule,
    RuleStream,
    describe_keys,
    identity_rule,
    stream_to_ours,
    stream_to_theirs,
)
from cumo_megatron.checkpoint.io import read_json
from cumo_megatron.config.schema import LanguageConfig, MoEConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
# LLaVA-family model types whose LLM is one of ours (LLaVA-1.5 Vicuna uses plain "llava").
_MODEL_TYPE_ALIASES = {
    "llama": "llama",
    "mistral": "mistral",
    "mixtral": "mixtral",
    "llava": "llama",
    "llava_llama": "llama",
    "llava_mistral": "mistral",
    "llava_mixtral": "mixtral",
}
_ACCEPTED_ROPE_TYPES = (None, "default")
# transformers' config-class defaults (4.x and 5.x agree) for fields a config.json may omit;
# an explicit ``null`` in the file is kept.
_HF_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048, rope_theta=1e4),
    "mistral": dict(
        rms_norm_eps=1e-6, max_position_embeddings=131072, rope_theta=1e4, num_key_value_heads=8, sliding_window=4096
    ),
    "mixtral": dict(
        rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=1e6, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2,
    ),
}


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------


def _as_config_dict(config_json: Union[Mapping, str, Path]) -> tuple[dict, str]:
    if isinstance(config_json, Mapping):
        return dict(config_json), "config"
    path = Path(config_json)
    if path.is_dir():
        return read_json(path, "config.json"), str(path / "config.json")
    return read_json(path.parent, path.name), str(path)


def _arch_of(cfg: dict, where: str) -> str:
    model_type = cfg.get("model_type")
    if model_type in _MODEL_TYPE_ALIASES:
        return _MODEL_TYPE_ALIASES[model_type]
    for name in cfg.get("architectures") or []:
        lowered = str(name).lower()
        for arch in ("mixtral", "mistral", "llama"):
            if arch in lowered:
                return arch
    raise CheckpointError(
        f"{where}: model_type={model_type!r} (architectures={cfg.get('architectures')}) is not a "
        "LLaMA, Mistral or Mixtral causal LM; only those language models can be converted"
    )


def _rope_theta(cfg: dict, where: str) -> float:
    """RoPE base from transformers 4 (top-level ``rope_theta`` / ``rope_scaling``) or 5
    (``rope_parameters``) style; scaled RoPE variants are refused."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    for field, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise CheckpointError(f"{where}: {field} must be a mapping, got {value!r}")
        rope_type = value.get("rope_type", value.get("type"))
        if rope_type not in _ACCEPTED_ROPE_TYPES:
            raise CheckpointError(
                f"{where}: {field} has rope_type={rope_type!r}; only plain RoPE is implemented "
                "(no linear/dynamic/yarn/llama3 scaling)"
            )
        if "rope_theta" in value:
            theta = value["rope_theta"]
    theta = 10000.0 if theta is None else float(theta)
    if theta != int(theta):
        # megatron's GPTModel takes an integer rotary base.
        raise CheckpointError(f"{where}: rope_theta={theta} is not an integer, which megatron's RoPE requires")
    return theta


def language_config_from_hf(
    config_json: Union[Mapping, str, Path],
    allow_sliding_window: bool = False,
) -> LanguageConfig:
    """`LanguageConfig` from a HF ``config.json`` (a dict, the file, or its directory).

    Understands LLaMA (Vicuna), Mistral and Mixtral configs written by transformers 4 or 5, and the
    LLaVA variants of them (``llava``, ``llava_mistral``, ``llava_mixtral``). Refuses what the model
    cannot represent: attention/MLP biases, a head size other than ``hidden / heads``, activations
    other than SiLU, scaled RoPE, and (unless ``allow_sliding_window``: full attention then equals
    the original only for sequences no longer than the window) sliding-window attention.
    Mixtral's experts become a `MoEConfig` with CuMo's default loss coefficients.
    """
    cfg, where = _as_config_dict(config_json)
    if "text_config" in cfg and cfg.get("model_type") not in _MODEL_TYPE_ALIASES:
        cfg = dict(cfg["text_config"])  # HF-native multimodal wrappers (llava-hf)
        where += ":text_config"
    arch = _arch_of(cfg, where)
    rope_given = "rope_theta" in cfg or "rope_theta" in (cfg.get("rope_parameters") or {})
    for key, value in _HF_DEFAULTS[arch].items():
        if key == "rope_theta" and rope_given:
            continue
        cfg.setdefault(key, value)

    def need(key: str):
        if cfg.get(key) is None:
            raise CheckpointError(f"{where}: missing field {key!r}")
        return cfg[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError(f"{where}: attention_bias/mlp_bias are set; LLaMA-style layers here have no biases")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and heads and int(head_dim) * heads != hidden:
        raise CheckpointError(
            f"{where}: head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}; "
            "a decoupled head size is not supported"
        )
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"{where}: hidden_act={act!r}; only SiLU (SwiGLU MLPs) is supported")
    window = cfg.get("sliding_window")
    use_window = cfg.get("use_sliding_window", True)
    max_positions = int(cfg["max_position_embeddings"])
    if window is not None and use_window and int(window) < max_positions and not allow_sliding_window:
        raise CheckpointError(
            f"{where}: sliding_window={window} < max_position_embeddings={max_positions}; sliding-window "
            "attention is not implemented. Pass allow_sliding_window=True if your sequences are never "
            "longer than the window (then full attention is identical)"
        )
    moe = None
    if arch == "mixtral":
        if float(cfg.get("router_jitter_noise") or 0.0) > 0.0:
            warnings.warn(f"{where}: router_jitter_noise is ignored (training-time noise is not implemented)")
        moe = MoEConfig(num_experts=int(need("num_local_experts")), top_k=int(need("num_experts_per_tok")))
    kv_heads = cfg.get("num_key_value_heads")
    lang = LanguageConfig(
        arch=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=None if kv_heads is None or int(kv_heads) == heads else int(kv_heads),
        ffn_hidden_size=int(need("intermediate_size")),
        rms_norm_eps=float(cfg["rms_norm_eps"]),
        rope_theta=_rope_theta(cfg, where),
        max_position_embeddings=max_positions,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        moe=moe,
    )
    lang.validate()
    return lang


def hf_config_from_language(
    cfg: LanguageConfig,
    arch: Optional[str] = None,
    base: Optional[Mapping] = None,
    dtype: str = "float32",
) -> dict:
    """A ``config.json`` for ``AutoModelForCausalLM.from_pretrained`` describing ``cfg``.

    Written in the hub's (transformers 4) style, which transformers 5 also reads: top-level
    ``rope_theta``, ``torch_dtype``. ``base`` (e.g. the original ``config.json``) supplies fields we
    do not model (token ids, ...); ours override it.
    """
    arch = arch or cfg.arch
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"arch={arch!r} is unknown; choose one of {sorted(ARCHITECTURES)}")
    if (arch == "mixtral") != (cfg.moe is not None):
        raise CheckpointError(f"arch={arch!r} does not match language.moe={cfg.moe} (Mixtral needs it, others not)")
    out: dict[str, Any] = dict(base or {})
    for stale in ("rope_parameters", "dtype", "text_config", "auto_map", "_name_or_path"):
        out.pop(stale, None)
    out.update(
        architectures=[ARCHITECTURES[arch]],
        model_type=arch,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=float(cfg.rope_theta),
        rope_scaling=None,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_embeddings,
        torch_dtype=dtype,
        attention_dropout=0.0,
    )
    out.setdefault("bos_token_id", 1)
    out.setdefault("eos_token_id", 2)
    if arch == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out["sliding_window"] = None
    if arch == "mixtral":
        out.update(num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k)
        out.setdefault("router_jitter_noise", 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# Tensor layout helpers
# ---------------------------------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """HF ``q [nh*d, h]``, ``k/v [ng*d, h]`` -> megatron ``linear_qkv [ng*(nh/ng + 2)*d, h]``."""
    d = q.shape[0] // num_heads
    rest = q.shape[1:]
    q_g = q.reshape(num_groups, num_heads // num_groups, d, *rest)
    k_g = k.reshape(num_groups, 1, d, *rest)
    v_g = v.reshape(num_groups, 1, d, *rest)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(-1, *rest).contiguous()


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`: megatron ``linear_qkv`` -> HF ``(q, k, v)``, each contiguous."""
    per_group = num_heads // num_groups + 2
    d = qkv.shape[0] // (num_groups * per_group)
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_groups, per_group, d, *rest)
    q = grouped[:, : per_group - 2].reshape(-1, *rest).contiguous()
    k = grouped[:, per_group - 2].reshape(-1, *rest).contiguous()
    v = grouped[:, per_group - 1].reshape(-1, *rest).contiguous()
    return q, k, v


def _concat_rule(ours: str, first: str, second: str, half_shape: tuple[int, int]) -> Rule:
    """Ours = ``cat([first, second], dim 0)`` (SwiGLU ``linear_fc1`` = [gate; up])."""
    rows = half_shape[0]
    return Rule(
        ours,
        (first, second),
        (2 * rows, half_shape[1]),
        (half_shape, half_shape),
        lambda a, b: torch.cat([a, b], dim=0),
        lambda t: (t[:rows].contiguous(), t[rows:].contiguous()),
    )


def _fused_expert_rule(ours: str, theirs: str, index: int, ours_shape, theirs_shape) -> Rule:
    """One expert's slice of transformers 5's fused ``[E, ...]`` expert tensor (import only)."""

    def refuse(_):
        raise CheckpointError("export writes Mixtral's on-disk per-expert names, not transformers 5's fused tensors")

    return Rule(ours, (theirs,), ours_shape, (theirs_shape,), lambda t: t[index].contiguous(), refuse)


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------

MIXTRAL_STYLES = ("legacy", "fused")


def _mixtral_style(keys: list[str], hf_prefix: str) -> str:
    """``legacy`` (``block_sparse_moe.*``: on disk) or ``fused`` (transformers 5 in memory)."""
    body = f"{hf_prefix}model.layers.0."
    if f"{body}block_sparse_moe.gate.weight" in keys:
        return "legacy"
    if f"{body}mlp.experts.gate_up_proj" in keys:
        return "fused"
    raise MissingKeyError(
        f"neither {body}block_sparse_moe.gate.weight (Mixtral on disk) nor {body}mlp.experts.gate_up_proj "
        f"(transformers 5 in memory) is in the checkpoint ({describe_keys(keys)}): not a Mixtral state dict"
    )


def language_rules(
    cfg: LanguageConfig,
    prefix: str = "language_model.",
    hf_prefix: str = "",
    mixtral_style: str = "legacy",
) -> list[Rule]:
    """The conversion rules of the whole LM (ours under ``prefix``, HF under ``hf_prefix``)."""
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    nh, ng = cfg.num_heads, cfg.kv_heads
    d = h // nh
    m = f"{hf_prefix}model."
    rules = [identity_rule(f"{prefix}embedding.word_embeddings.weight", f"{m}embed_tokens.weight", (v, h))]
    for i in range(cfg.num_layers):
        src, dst = f"{m}layers.{i}.", f"{prefix}decoder.layers.{i}."
        attn = f"{src}self_attn."
        rules += [
            identity_rule(f"{dst}input_layernorm.weight", f"{src}input_layernorm.weight", (h,)),
            Rule(
                f"{dst}self_attention.linear_qkv.weight",
                (f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight"),
                ((nh + 2 * ng) * d, h),
                ((nh * d, h), (ng * d, h), (ng * d, h)),
                lambda q, k, vv: fuse_qkv(q, k, vv, nh, ng),
                lambda t: split_qkv(t, nh, ng),
            ),
            identity_rule(f"{dst}self_attention.linear_proj.weight", f"{attn}o_proj.weight", (h, nh * d)),
            identity_rule(f"{dst}pre_mlp_layernorm.weight", f"{src}post_attention_layernorm.weight", (h,)),
        ]
        if cfg.moe is None:
            rules += [
                _concat_rule(f"{dst}mlp.linear_fc1.weight", f"{src}mlp.gate_proj.weight", f"{src}mlp.up_proj.weight", (f, h)),
                identity_rule(f"{dst}mlp.linear_fc2.weight", f"{src}mlp.down_proj.weight", (h, f)),
            ]
            continue
        experts, e_count = f"{dst}mlp.experts.local_experts.", cfg.moe.num_experts
        if mixtral_style == "legacy":
            moe = f"{src}block_sparse_moe."
            rules.append(identity_rule(f"{dst}mlp.router.weight", f"{moe}gate.weight", (e_count, h)))
            for j in range(e_count):
                e = f"{moe}experts.{j}."
                rules += [
                    _concat_rule(f"{experts}{j}.linear_fc1.weight", f"{e}w1.weight", f"{e}w3.weight", (f, h)),
                    identity_rule(f"{experts}{j}.linear_fc2.weight", f"{e}w2.weight", (h, f)),
                ]
        elif mixtral_style == "fused":
            rules.append(identity_rule(f"{dst}mlp.router.weight", f"{src}mlp.gate.weight", (e_count, h)))
            for j in range(e_count):
                rules += [
                    _fused_expert_rule(
                        f"{experts}{j}.linear_fc1.weight", f"{src}mlp.experts.gate_up_proj", j, (2 * f, h), (e_count, 2 * f, h)
                    ),
                    _fused_expert_rule(
                        f"{experts}{j}.linear_fc2.weight", f"{src}mlp.experts.down_proj", j, (h, f), (e_count, h, f)
                    ),
                ]
        else:
            raise ValueError(f"mixtral_style={mixtral_style!r}; choose one of {MIXTRAL_STYLES}")
    rules.append(identity_rule(f"{prefix}decoder.final_layernorm.weight", f"{m}norm.weight", (h,)))
    if not cfg.tie_embeddings:
        rules.append(identity_rule(f"{prefix}output_layer.weight", f"{hf_prefix}lm_head.weight", (v, h)))
    return rules


# Stored buffers some transformers 4 checkpoints carry; recomputed by every implementation.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def _check_structure(keys: list[str], cfg: LanguageConfig, rules: list[Rule], hf_prefix: str, where: str) -> None:
    """Layer count and no unknown tensors inside the layers (biases, extra norms, ...)."""
    root = f"{hf_prefix}model.layers."
    layers = {int(k[len(root):].split(".", 1)[0]) for k in keys if k.startswith(root) and k[len(root):].split(".", 1)[0].isdigit()}
    if layers != set(range(cfg.num_layers)):
        raise CheckpointError(
            f"{where}: the checkpoint has layers {sorted(layers)[:3]}...{sorted(layers)[-3:]} "
            f"({len(layers)} layers) but language.num_layers={cfg.num_layers}; take the configuration from "
            "the checkpoint's config.json (language_config_from_hf)"
        )
    consumed = {k for rule in rules for k in rule.theirs}
    unknown = [k for k in keys if k.startswith(root) and k not in consumed and not k.endswith(_IGNORABLE_SUFFIXES)]
    if unknown:
        raise CheckpointError(
            f"{where}: tensors our LLaMA-style layers have no place for ({describe_keys(unknown)}); "
            "this model variant (biases, extra norms, a different expert count, ...) is not supported"
        )


# ---------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------


def hf_lm_to_megatron(
    src: Mapping[str, torch.Tensor],
    cfg: LanguageConfig,
    prefix: str = "language_model.",
    hf_prefix: str = "",
) -> RuleStream:
    """Stream ``(our name, tensor)`` for the whole LM from a HF ``*ForCausalLM`` state dict.

    ``src`` is any mapping (e.g. `open_checkpoint`'s lazy one); ``hf_prefix`` is what precedes
    ``model.`` / ``lm_head.`` in it (``""`` for HF checkpoints and CuMo/LLaVA releases). Layer count
    and unknown per-layer tensors are checked from the keys before anything is read; missing
    tensors (`MissingKeyError`, a ``KeyError``) and shape mismatches (`CheckpointError`) are
    reported by name while streaming. Dtypes are kept.
    """
    keys = list(src.keys())
    style = _mixtral_style(keys, hf_prefix) if cfg.moe is not None else "legacy"
    rules = language_rules(cfg, prefix, hf_prefix, style)
    where = f"language-model checkpoint ({cfg.arch}, key prefix {hf_prefix!r})"
    _check_structure(keys, cfg, rules, hf_prefix, where)
    return stream_to_ours(rules, src, where)


def hf_lm_unused_keys(src_keys: Iterable[str], cfg: LanguageConfig, hf_prefix: str = "") -> list[str]:
    """Keys under ``hf_prefix`` + ``model.`` / ``lm_head.`` that `hf_lm_to_megatron` does not read
    (stored ``rotary_emb.inv_freq`` buffers, a tied model's ``lm_head``), in source order. Keys of
    other modules (a multimodal checkpoint's vision tower and projector) are not listed."""
    keys = list(src_keys)
    style = _mixtral_style(keys, hf_prefix) if cfg.moe is not None else "legacy"
    consumed = {k for rule in language_rules(cfg, "", hf_prefix, style) for k in rule.theirs}
    roots = (f"{hf_prefix}model.", f"{hf_prefix}lm_head.")
    multimodal = (f"{hf_prefix}model.vision_tower.", f"{hf_prefix}model.mm_projector.")
    return [k for k in keys if k.startswith(roots) and not k.startswith(multimodal) and k not in consumed]


def megatron_to_hf_lm(
    src: Mapping[str, torch.Tensor],
    cfg: LanguageConfig,
    hf_prefix: str = "",
    prefix: str = "language_model.",
    passthrough: Optional[Mapping[str, torch.Tensor]] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream HF ``*ForCausalLM`` names and tensors from our LM (inverse of `hf_lm_to_megatron`).

    Mixtral experts get the on-disk names ``block_sparse_moe.experts.J.w1/w2/w3`` that
    ``from_pretrained`` loads in transformers 4 and 5. A tied model writes no ``lm_head.weight``.
    ``passthrough`` tensors (see `hf_lm_unused_keys`) follow unchanged.
    """
    where = f"our language model (keys {prefix!r}*) -> HF {cfg.arch}"
    return stream_to_theirs(language_rules(cfg, prefix, hf_prefix, "legacy"), src, where, passthrough)
