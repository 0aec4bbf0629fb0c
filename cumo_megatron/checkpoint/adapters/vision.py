"""CLIP vision tower <-> our megatron `CLIPVisionTower` (``vision.vit.*``), TP = PP = EP = 1.

Layouts (DESIGN.md section 5):

* ``"hf"``: HF ``CLIPVisionModel`` (transformers 5: no prefix; transformers 4: ``vision_model.``) or
  a whole ``CLIPModel`` (``vision_model.*`` beside ``text_model.*``, projections, ``logit_scale``).
* ``"open_clip"``: ``visual.conv1``, ``visual.class_embedding``, ``visual.positional_embedding``,
  ``visual.ln_pre``, ``visual.transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2,
  mlp.c_fc, mlp.c_proj}`` (q, k, v fused as ``[q; k; v]``).
* ``"cumo_release"``: HF names under ``model.vision_tower.vision_model.``; a CLIP-MoE layer holds
  ``encoder.layers.N.gate.weight`` and ``encoder.layers.N.experts.j.{fc1, fc2}`` instead of ``mlp``.

Only the layers up to the feature layer are built (``VisionConfig.built_layers``); the later
layers, ``post_layernorm`` / ``ln_post`` / ``proj`` and any text tower are not consumed:
`clip_unused_keys` lists them so that an export can pass them through unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Union

import torch

from cumo_megatron.checkpoint.adapters.common import (
    CheckpointError,
    MissingKeyError,
    Rule,
    RuleStream,
    describe_keys,
    fetch,
    fuse_qkv_per_head,
    identity_rule,
    reshape_rule,
    split_qkv_per_head,
    stream_to_ours,
    stream_to_theirs,
)
from cumo_megatron.config.schema import VisionConfig

LAYOUTS = ("hf", "open_clip", "cumo_release")
RELEASE_PREFIX = "model.vision_tower.vision_model."
# Key prefix of the tower that `megatron_to_clip` writes when none is given.
DEFAULT_EXPORT_PREFIX = {"hf": "", "open_clip": "visual.", "cumo_release": RELEASE_PREFIX}
OURS_PREFIX = "vision.vit."

_HF_ANCHOR = "embeddings.patch_embedding.weight"
_OPEN_CLIP_ANCHOR = "conv1.weight"
_HF_LAYERS = "encoder.layers."
_OPEN_CLIP_LAYERS = "transformer.resblocks."
_EXPERT_RE = re.compile(r"experts\.(\d+)\.")

# transformers' CLIPVisionConfig defaults: hub configs omit fields equal to them.
_HF_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}
_ACTIVATIONS = ("quick_gelu", "gelu")  # what our ViT builds (models.transformer_configs)
# open_clip.model.CLIPVisionCfg options that change the ViT's maths or parameters: not supported.
_OPEN_CLIP_UNSUPPORTED = (
    "timm_model_name", "ls_init_value", "no_ln_pre", "block_type", "qk_norm", "scaled_cosine_attn",
    "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "act_kwargs", "input_patchnorm",
)


# ------------------------------------------------------------------------------------------------
# Layout detection
# ------------------------------------------------------------------------------------------------


def _prefixes(keys: list[str], anchor: str) -> list[str]:
    """Prefixes P such that ``P + anchor`` is a key (P empty or ending with a dot)."""
    found = set()
    for key in keys:
        if key.endswith(anchor):
            prefix = key[: len(key) - len(anchor)]
            if prefix == "" or prefix.endswith("."):
                found.add(prefix)
    return sorted(found)


def _locate_tower(keys: list[str]) -> tuple[str, str]:
    """``(layout, prefix)`` of the one CLIP vision tower among ``keys``; ValueError otherwise."""
    hf = _prefixes(keys, _HF_ANCHOR)
    open_clip = [p for p in _prefixes(keys, _OPEN_CLIP_ANCHOR) if any(k.startswith(p + _OPEN_CLIP_LAYERS) for k in keys)]
    towers = [("hf", p) for p in hf] + [("open_clip", p) for p in open_clip]
    if not towers:
        raise CheckpointError(
            "no CLIP vision tower recognised in the checkpoint ("
            + describe_keys(keys)
            + "); expected HF names ('[vision_model.]embeddings.patch_embedding.weight', "
            "'encoder.layers.N.self_attn.q_proj.weight', ...), OpenCLIP names "
            "('visual.conv1.weight', 'visual.transformer.resblocks.N.attn.in_proj_weight', ...) or a "
            "CuMo release ('model.vision_tower.vision_model.*')"
        )
    if len(towers) > 1:
        raise CheckpointError(
            f"the checkpoint holds several vision towers (prefixes {[p for _, p in towers]}); "
            "pass a mapping restricted to one of them"
        )
    layout, prefix = towers[0]
    if layout == "hf":
        root = prefix + _HF_LAYERS
        moe = any(
            k.startswith(root) and (".gate." in k[len(root):] or ".experts." in k[len(root):]) for k in keys
        )
        if prefix == RELEASE_PREFIX or moe:
            layout = "cumo_release"
    return layout, prefix


def detect_clip_layout(keys: Iterable[str]) -> str:
    """Which CLIP layout ``keys`` are in: ``"hf"``, ``"open_clip"`` or ``"cumo_release"``.

    ``"hf"``: HF ``CLIPVisionModel`` / ``CLIPModel`` (with or without ``vision_model.``);
    ``"open_clip"``: ``visual.transformer.resblocks.N.*``; ``"cumo_release"``: HF names under
    ``model.vision_tower.vision_model.``, possibly with MoE layers (``encoder.layers.N.gate`` /
    ``experts.j``). Raises ValueError (`CheckpointError`) naming what was seen otherwise.
    """
    return _locate_tower(list(keys))[0]


# ------------------------------------------------------------------------------------------------
# Rules: one list per (configuration, layout), used in both directions
# ------------------------------------------------------------------------------------------------


def _norm_rules(ours: str, theirs: str, h: int) -> list[Rule]:
    return [identity_rule(f"{ours}.{p}", f"{theirs}.{p}", (h,)) for p in ("weight", "bias")]


def _linear_rules(ours: str, theirs: str, out_features: int, in_features: int) -> list[Rule]:
    return [
        identity_rule(f"{ours}.weight", f"{theirs}.weight", (out_features, in_features)),
        identity_rule(f"{ours}.bias", f"{theirs}.bias", (out_features,)),
    ]


def _separate_qkv_rules(ours: str, theirs: str, h: int, heads: int) -> list[Rule]:
    """HF ``self_attn.{q,k,v}_proj`` -> megatron ``linear_qkv`` (interleaved per head)."""
    rules = []
    for param, shape in (("weight", (h, h)), ("bias", (h,))):
        rules.append(
            Rule(
                f"{ours}.{param}",
                tuple(f"{theirs}.{x}_proj.{param}" for x in "qkv"),
                (3 * h, *shape[1:]),
                (shape, shape, shape),
                lambda q, k, v: fuse_qkv_per_head(q, k, v, heads),
                lambda qkv: split_qkv_per_head(qkv, heads),
            )
        )
    return rules


def _fused_qkv_rules(ours: str, theirs: str, h: int, heads: int) -> list[Rule]:
    """OpenCLIP ``attn.in_proj_{weight,bias}`` (``[q; k; v]``) -> megatron ``linear_qkv``."""
    rules = []
    for param, shape in (("weight", (3 * h, h)), ("bias", (3 * h,))):
        rules.append(
            Rule(
                f"{ours}.{param}",
                (f"{theirs}.in_proj_{param}",),
                shape,
                (shape,),
                lambda qkv: fuse_qkv_per_head(*qkv.chunk(3, dim=0), heads),
                lambda qkv: (torch.cat(split_qkv_per_head(qkv, heads), dim=0),),
            )
        )
    return rules


def _hf_layer_rules(cfg: VisionConfig, ours: str, theirs: str, moe: bool) -> list[Rule]:
    """One HF-named encoder layer (dense ``mlp.fc1/fc2`` or release MoE ``gate`` + ``experts.j``)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    rules = _norm_rules(ours + "input_layernorm", theirs + "layer_norm1", h)
    rules += _separate_qkv_rules(ours + "self_attention.linear_qkv", theirs + "self_attn", h, cfg.num_heads)
    rules += _linear_rules(ours + "self_attention.linear_proj", theirs + "self_attn.out_proj", h, h)
    rules += _norm_rules(ours + "pre_mlp_layernorm", theirs + "layer_norm2", h)
    if not moe:
        rules += _linear_rules(ours + "mlp.linear_fc1", theirs + "mlp.fc1", f, h)
        rules += _linear_rules(ours + "mlp.linear_fc2", theirs + "mlp.fc2", h, f)
        return rules
    rules.append(identity_rule(ours + "mlp.router.weight", theirs + "gate.weight", (cfg.moe.num_experts, h)))
    for j in range(cfg.moe.num_experts):
        expert = f"{ours}mlp.experts.local_experts.{j}."
        rules += _linear_rules(expert + "linear_fc1", f"{theirs}experts.{j}.fc1", f, h)
        rules += _linear_rules(expert + "linear_fc2", f"{theirs}experts.{j}.fc2", h, f)
    return rules


def _open_clip_layer_rules(cfg: VisionConfig, ours: str, theirs: str) -> list[Rule]:
    """One OpenCLIP residual block (always dense)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    rules = _norm_rules(ours + "input_layernorm", theirs + "ln_1", h)
    rules += _fused_qkv_rules(ours + "self_attention.linear_qkv", theirs + "attn", h, cfg.num_heads)
    rules += _linear_rules(ours + "self_attention.linear_proj", theirs + "attn.out_proj", h, h)
    rules += _norm_rules(ours + "pre_mlp_layernorm", theirs + "ln_2", h)
    rules += _linear_rules(ours + "mlp.linear_fc1", theirs + "mlp.c_fc", f, h)
    rules += _linear_rules(ours + "mlp.linear_fc2", theirs + "mlp.c_proj", h, f)
    return rules


def _rules(cfg: VisionConfig, layout: str, theirs: str, ours: str) -> list[Rule]:
    """Every tensor of our tower (``ours`` prefix) and where it lives in ``layout`` (``theirs``)."""
    h, p = cfg.hidden_size, cfg.patch_size
    positions = (cfg.patches_per_side**2 + 1, h)
    moe_layers = set(cfg.moe_layer_indices())
    if layout == "open_clip":
        rules = [
            reshape_rule(ours + "class_token", theirs + "class_embedding", (1, 1, h), (h,)),
            identity_rule(ours + "conv1.weight", theirs + "conv1.weight", (h, 3, p, p)),
            identity_rule(ours + "position_embeddings.weight", theirs + "positional_embedding", positions),
        ]
        rules += _norm_rules(ours + "ln_pre", theirs + "ln_pre", h)
    else:
        rules = [
            reshape_rule(ours + "class_token", theirs + "embeddings.class_embedding", (1, 1, h), (h,)),
            identity_rule(ours + "conv1.weight", theirs + _HF_ANCHOR, (h, 3, p, p)),
            identity_rule(ours + "position_embeddings.weight", theirs + "embeddings.position_embedding.weight", positions),
        ]
        rules += _norm_rules(ours + "ln_pre", theirs + "pre_layrnorm", h)  # sic: HF's spelling
    for i in range(cfg.built_layers):
        our_layer = f"{ours}decoder.layers.{i}."
        if layout == "open_clip":
            rules += _open_clip_layer_rules(cfg, our_layer, f"{theirs}{_OPEN_CLIP_LAYERS}{i}.")
        else:
            rules += _hf_layer_rules(cfg, our_layer, f"{theirs}{_HF_LAYERS}{i}.", i in moe_layers)
    return rules


# ------------------------------------------------------------------------------------------------
# Checking a source against the configuration
# ------------------------------------------------------------------------------------------------


@dataclass
class _ImportPlan:
    layout: str
    prefix: str  # the source tower's key prefix
    rules: list[Rule]

    @property
    def where(self) -> str:
        return f"CLIP vision checkpoint ({self.layout} layout, key prefix {self.prefix!r})"


def _layer_keys(keys: list[str], root: str) -> dict[int, list[str]]:
    """Source keys per layer index under ``root`` (``...encoder.layers.`` / ``...resblocks.``)."""
    layers: dict[int, list[str]] = {}
    for key in keys:
        if key.startswith(root):
            index = key[len(root):].split(".", 1)[0]
            if index.isdigit():
                layers.setdefault(int(index), []).append(key)
    return layers


def _resolve_layout(keys: list[str], layout: Optional[str]) -> tuple[str, str]:
    detected, prefix = _locate_tower(keys)
    if layout is None:
        return detected, prefix
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown CLIP layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    # "hf" and "cumo_release" share HF names; only OpenCLIP differs.
    if (layout == "open_clip") != (detected == "open_clip"):
        raise CheckpointError(f"the checkpoint's keys are in the {detected!r} layout, not {layout!r}")
    return layout, prefix


def _index_ranges(indices: list[int]) -> str:
    """``0..23`` for a contiguous run, else the list (for error messages)."""
    if not indices:
        return "none"
    if indices == list(range(indices[0], indices[-1] + 1)) and len(indices) > 2:
        return f"{indices[0]}..{indices[-1]}"
    return ", ".join(map(str, indices))


def _check_layers(cfg: VisionConfig, plan: _ImportPlan, keys: list[str]) -> None:
    """Layer count, dense/MoE agreement per layer, expert count, no unknown tensors in built layers."""
    root = plan.prefix + (_OPEN_CLIP_LAYERS if plan.layout == "open_clip" else _HF_LAYERS)
    layers = _layer_keys(keys, root)
    count = max(layers) + 1 if layers else 0
    # Strict: the feature layer counts from the end, so a wrong layer count would silently pick
    # features from another layer.
    if count != cfg.num_layers or sorted(layers) != list(range(count)):
        raise CheckpointError(
            f"{plan.where}: the tower has {len(layers)} layers (indices {_index_ranges(sorted(layers))}) "
            f"but vision.num_layers={cfg.num_layers}; set vision.num_layers from the checkpoint's "
            "config (vision_config_from_hf / vision_config_from_open_clip)"
        )
    moe_layers = set(cfg.moe_layer_indices())
    for i in range(cfg.built_layers):
        rest = [k[len(root) + len(str(i)) + 1:] for k in layers[i]]
        source_moe = any(r.startswith(("gate.", "experts.")) for r in rest)
        if i in moe_layers and not source_moe:
            raise CheckpointError(
                f"{plan.where}: vision.moe is set (layer {i} is an MoE layer) but the checkpoint's "
                f"layer {i} has a dense MLP. Load it with a dense vision config (vision.moe: null) "
                "and upcycle the dense MLPs into experts (a separate step), or load a CuMo release"
            )
        if source_moe and i not in moe_layers:
            raise CheckpointError(
                f"{plan.where}: the checkpoint's layer {i} is an MoE layer (gate / experts) but the "
                "configuration builds a dense MLP there; set vision.moe (and vision.moe_layers) to "
                "match the checkpoint"
            )
        if source_moe:
            experts = {int(m.group(1)) for r in rest if (m := _EXPERT_RE.match(r))}
            if experts != set(range(cfg.moe.num_experts)):
                raise CheckpointError(
                    f"{plan.where}: layer {i} has experts {_index_ranges(sorted(experts))} but "
                    f"vision.moe.num_experts={cfg.moe.num_experts}"
                )
    consumed = {k for rule in plan.rules for k in rule.theirs}
    unknown = [k for i in range(min(cfg.built_layers, count)) for k in layers[i] if k not in consumed]
    if unknown:
        raise CheckpointError(
            f"{plan.where}: tensors in the built layers that our ViT has no place for "
            f"({describe_keys(unknown)}); this CLIP variant (layer scale, extra norms, ...) is not supported"
        )


def _import_plan(keys: list[str], cfg: VisionConfig, layout: Optional[str], ours: str) -> _ImportPlan:
    layout, prefix = _resolve_layout(keys, layout)
    plan = _ImportPlan(layout, prefix, _rules(cfg, layout, prefix, ours))
    _check_layers(cfg, plan, keys)
    return plan


# ------------------------------------------------------------------------------------------------
# Public conversions
# ------------------------------------------------------------------------------------------------


def clip_to_megatron(
    src: Mapping[str, torch.Tensor],
    cfg: VisionConfig,
    layout: Optional[str] = None,
    prefix: str = OURS_PREFIX,
) -> RuleStream:
    """Stream a CLIP checkpoint's vision tower as our tensors ``(prefix + name, tensor)``.

    ``src`` may be lazy: only its keys are listed up front and each tensor is read when its turn
    comes. Layers past ``cfg.built_layers`` are skipped. The layout (detected when None) and the
    configuration are checked before anything is read: layer counts, dense vs MoE per layer
    (a dense checkpoint for an MoE config must be upcycled first), expert counts, unknown tensors
    in converted layers, missing tensors (all named, `MissingKeyError`); shape mismatches are
    reported by key and both shapes while streaming. Dtypes are kept.
    """
    keys = list(src.keys())
    plan = _import_plan(keys, cfg, layout, prefix)
    # Name every missing tensor before anything is read or written (streaming would stop at the first).
    present = set(keys)
    missing = [k for rule in plan.rules for k in rule.theirs if k not in present]
    if missing:
        raise MissingKeyError(f"{plan.where}: tensors missing from the checkpoint: {describe_keys(missing)}")
    return stream_to_ours(plan.rules, src, plan.where)


def clip_unused_keys(src_keys: Iterable[str], cfg: VisionConfig, layout: Optional[str] = None) -> list[str]:
    """Source keys `clip_to_megatron` does not consume, in source order.

    The layers past the feature layer, ``post_layernorm`` / ``ln_post`` / ``proj``, buffers such
    as ``position_ids``, a ``CLIPModel``'s text tower and projections, an OpenCLIP model's text
    tower. When the tower sits inside a multimodal checkpoint (prefix ``model.vision_tower.``),
    only keys under that module are listed: the LLM's and the projector's belong to their adapters.
    Pass ``{k: src[k] for k in clip_unused_keys(...)}`` as `megatron_to_clip`'s ``passthrough``.
    """
    keys = list(src_keys)
    plan = _import_plan(keys, cfg, layout, "")
    consumed = {k for rule in plan.rules for k in rule.theirs}
    scope = ""
    if plan.prefix.startswith("model."):
        scope = ".".join(plan.prefix.split(".")[:2]) + "."  # e.g. model.vision_tower.
    return [k for k in keys if k not in consumed and k.startswith(scope)]


def megatron_to_clip(
    src: Mapping[str, torch.Tensor],
    cfg: VisionConfig,
    layout: str = "hf",
    passthrough: Optional[Mapping[str, torch.Tensor]] = None,
    hf_prefix: Optional[str] = None,
    prefix: str = OURS_PREFIX,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream our tower (``prefix + name`` in ``src``) in a publisher's ``layout``.

    ``"hf"`` writes transformers-5 ``CLIPVisionModel`` names under ``hf_prefix`` (default ``""``;
    ``"vision_model."`` for the transformers-4 style or a ``CLIPModel``), ``"open_clip"`` under
    ``visual.`` by default, ``"cumo_release"`` under ``model.vision_tower.vision_model.`` with MoE
    layers as ``gate`` + ``experts.j.fc1/fc2``. Only built layers are written; ``passthrough``
    tensors (the source's unused keys, see `clip_unused_keys`) follow unchanged, which makes
    source -> ours -> source bit-exact.
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown CLIP layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if cfg.moe is not None and layout != "cumo_release":
        raise CheckpointError(
            f"vision.moe is set but the {layout!r} layout has no MoE layers; export with "
            "layout='cumo_release' (CuMo's CLIP-MoE names)"
        )
    theirs = DEFAULT_EXPORT_PREFIX[layout] if hf_prefix is None else hf_prefix
    where = f"our vision tower (keys {prefix!r}*) -> {layout} layout"
    return stream_to_theirs(_rules(cfg, layout, theirs, prefix), src, where, passthrough)


# ------------------------------------------------------------------------------------------------
# Configurations
# ------------------------------------------------------------------------------------------------

JsonLike = Union[dict, str, Path]


def _as_dict(obj: Optional[JsonLike]) -> Optional[dict]:
    if obj is None or isinstance(obj, dict):
        return obj
    return json.loads(Path(obj).read_text())


def _square(value, field_name: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{where}: {field_name}={list(value)} is not square; only square ViTs are supported")
        value = value[0]
    return int(value)


def _activation(name: str, where: str) -> str:
    if name not in _ACTIVATIONS:
        raise CheckpointError(f"{where}: activation {name!r} is not supported; our ViT builds {', '.join(_ACTIVATIONS)}")
    return name


def _image_stats(preprocessor: Optional[dict], mean_key: str, std_key: str) -> dict:
    if not preprocessor:
        return {}
    out = {}
    if preprocessor.get(mean_key) is not None:
        out["image_mean"] = [float(x) for x in preprocessor[mean_key]]
    if preprocessor.get(std_key) is not None:
        out["image_std"] = [float(x) for x in preprocessor[std_key]]
    return out


def _finish(fields: dict, overrides: dict) -> VisionConfig:
    cfg = dataclasses.replace(VisionConfig(**fields), **overrides)
    cfg.validate()
    return cfg


def vision_config_from_hf(
    config_json: JsonLike, preprocessor: Optional[JsonLike] = None, **overrides
) -> VisionConfig:
    """Our `VisionConfig` from a HF ``config.json`` (dict or path) of a CLIP model.

    Accepts a ``CLIPVisionModel`` config (``model_type: clip_vision_model``) or a full
    ``CLIPModel`` one (its ``vision_config``, updated by a transformers-4 ``vision_config_dict``),
    as transformers 4 or 5 wrote them; missing fields take transformers' defaults. ``preprocessor``
    (``preprocessor_config.json``) supplies ``image_mean`` / ``image_std``. ``overrides`` set any
    `VisionConfig` field (``moe``, ``s2_scales``, ``feature_layer``, ...).
    """
    config = _as_dict(config_json)
    where = "CLIP config.json"
    model_type = config.get("model_type")
    if "vision_config" in config or "vision_config_dict" in config:
        if model_type not in (None, "clip"):
            raise CheckpointError(f"{where}: model_type={model_type!r} is not a CLIP model")
        fields = dict(config.get("vision_config") or {})
        fields.update(config.get("vision_config_dict") or {})
    elif model_type in (None, "clip_vision_model"):
        fields = config
    else:
        hint = " (a LLaVA/CuMo config: read the CLIP config its mm_vision_tower names)" if "mm_vision_tower" in config else ""
        raise CheckpointError(f"{where}: model_type={model_type!r} is not a CLIP vision config{hint}")
    fields = {**_HF_VISION_DEFAULTS, **{k: v for k, v in fields.items() if v is not None}}
    if fields["num_channels"] != 3:
        raise CheckpointError(f"{where}: num_channels={fields['num_channels']}; our ViT takes RGB (3)")
    ours = dict(
        hidden_size=int(fields["hidden_size"]),
        num_layers=int(fields["num_hidden_layers"]),
        num_heads=int(fields["num_attention_heads"]),
        ffn_hidden_size=int(fields["intermediate_size"]),
        image_size=_square(fields["image_size"], "image_size", where),
        patch_size=_square(fields["patch_size"], "patch_size", where),
        layernorm_eps=float(fields["layer_norm_eps"]),
        activation=_activation(fields["hidden_act"], where),
    )
    ours.update(_image_stats(_as_dict(preprocessor), "image_mean", "image_std"))
    return _finish(ours, overrides)


def vision_config_from_open_clip(
    cfg_json: JsonLike, preprocess: Optional[JsonLike] = None, **overrides
) -> VisionConfig:
    """Our `VisionConfig` from an OpenCLIP config: ``open_clip_config.json`` (``{"model_cfg",
    "preprocess_cfg"}``) or a bare model config (``{"embed_dim", "vision_cfg", "quick_gelu"?}``).

    ``heads = width / head_width``, ``ffn = width * mlp_ratio``, activation ``quick_gelu`` when the
    model config says so else exact ``gelu``, LayerNorm eps from ``norm_kwargs`` (default 1e-5);
    missing fields take ``open_clip.CLIPVisionCfg``'s defaults. Mean/std come from ``preprocess``
    or the file's ``preprocess_cfg``. Variants our ViT cannot express (timm towers, layer scale,
    no ``ln_pre``, ...) are refused.
    """
    config = _as_dict(cfg_json)
    model_cfg = config.get("model_cfg", config)
    where = "OpenCLIP config"
    vision = model_cfg.get("vision_cfg")
    if not isinstance(vision, dict):
        raise CheckpointError(f"{where}: no 'vision_cfg' (keys seen: {sorted(model_cfg)})")
    unsupported = [k for k in _OPEN_CLIP_UNSUPPORTED if vision.get(k)]
    if vision.get("pos_embed_type", "learnable") != "learnable":
        unsupported.append("pos_embed_type")
    if unsupported:
        raise CheckpointError(f"{where}: vision_cfg options {unsupported} are not supported by our ViT")
    layers = vision.get("layers", 12)
    if isinstance(layers, (list, tuple)):
        raise CheckpointError(f"{where}: vision_cfg.layers={layers} describes a ResNet; only ViTs are supported")
    width = int(vision.get("width", 768))
    head_width = int(vision.get("head_width", 64))
    if width % head_width:
        raise CheckpointError(f"{where}: width={width} is not divisible by head_width={head_width}")
    ours = dict(
        hidden_size=width,
        num_layers=int(layers),
        num_heads=width // head_width,
        ffn_hidden_size=int(width * float(vision.get("mlp_ratio", 4.0))),
        image_size=_square(vision.get("image_size", 224), "image_size", where),
        patch_size=_square(vision.get("patch_size", 16), "patch_size", where),
        layernorm_eps=float((vision.get("norm_kwargs") or {}).get("eps", 1e-5)),
        activation="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
    )
    preprocess = _as_dict(preprocess) if preprocess is not None else config.get("preprocess_cfg")
    ours.update(_image_stats(preprocess, "mean", "std"))
    return _finish(ours, overrides)


# ------------------------------------------------------------------------------------------------
# The tensors a tower's import does not consume, moved to another layout
# ------------------------------------------------------------------------------------------------

_NEUTRAL = "layer."  # our names for one layer, only used to pair a source rule with a target rule


def _moe_ized(layer: dict[str, torch.Tensor], root: str, num_experts: int, seed: int) -> dict[str, torch.Tensor]:
    """A dense HF-named layer (keys under ``root``) in CLIP-MoE form: experts copy the MLP, fresh gate.

    What CuMo's own upcycling does to every layer of the tower (``llava_arch.py``,
    ``vision_tower_dir``): the experts load the dense ``mlp.fc1/fc2`` and the gate keeps a fresh
    init. Here the gate is `fresh_router_weight`, seeded by ``seed`` and the gate's name.
    """
    from cumo_megatron.moe.upcycling import fresh_router_weight

    out: dict[str, torch.Tensor] = {}
    mlp = {k[len(root + "mlp."):]: v for k, v in layer.items() if k.startswith(root + "mlp.")}
    if set(mlp) != {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}:
        return dict(layer)  # not a plain CLIP MLP: leave the layer as it is
    for key, tensor in layer.items():
        if not key.startswith(root + "mlp."):
            out[key] = tensor
    fc1 = mlp["fc1.weight"]
    out[root + "gate.weight"] = fresh_router_weight(root + "gate.weight", num_experts, fc1.shape[1], seed, fc1)
    for j in range(num_experts):
        for name, tensor in mlp.items():
            out[f"{root}experts.{j}.{name}"] = tensor.clone()
    return out


def _open_clip_tail_to_hf(
    tensors: Mapping[str, torch.Tensor], cfg: VisionConfig, src_prefix: str, dst_prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """OpenCLIP resblocks past the feature layer and ``ln_post`` in HF names (the same rules as the
    built layers, so q/k/v are split exactly as an import would); (converted, left over)."""
    converted: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    layers = _layer_keys(list(tensors), src_prefix + _OPEN_CLIP_LAYERS)
    for i in sorted(layers):
        theirs = _open_clip_layer_rules(cfg, _NEUTRAL, f"{src_prefix}{_OPEN_CLIP_LAYERS}{i}.")
        ours = {rule.ours: rule for rule in _hf_layer_rules(cfg, _NEUTRAL, f"{dst_prefix}{_HF_LAYERS}{i}.", moe=False)}
        where = f"OpenCLIP layer {i} (not built)"
        for rule in theirs:
            if not all(k in tensors for k in rule.theirs):
                continue  # an incomplete tensor set stays as it is (left over)
            parts = [fetch(tensors, k, s, where) for k, s in zip(rule.theirs, rule.theirs_shapes)]
            target = ours[rule.ours]
            converted.update(zip(target.theirs, target.to_theirs(rule.to_ours(*parts))))
            used.update(rule.theirs)
    for param in ("weight", "bias"):
        key = f"{src_prefix}ln_post.{param}"
        if key in tensors:
            converted[f"{dst_prefix}post_layernorm.{param}"] = tensors[key]
            used.add(key)
    return converted, {k: v for k, v in tensors.items() if k not in used}


def tower_tail_to_layout(
    tensors: Mapping[str, torch.Tensor],
    cfg: VisionConfig,
    src_layout: str,
    src_prefix: str,
    dst_prefix: str = RELEASE_PREFIX,
    moe_seed: Optional[int] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tower tensors an import left unconverted (`clip_unused_keys`: the layers past the
    feature layer, ``post_layernorm`` / ``ln_post``), in HF names under ``dst_prefix``.

    ``tensors``: those unused tensors as the source held them (``src_layout`` ``hf``,
    ``cumo_release`` or ``open_clip``, tower prefix ``src_prefix``). HF names move by prefix;
    OpenCLIP blocks go through the import's own rules (bit-exact: q/k/v are split, nothing is
    computed). With ``moe_seed`` (a CLIP-MoE export: the original CuMo builds every layer of the
    tower as an MoE layer) a dense layer becomes an MoE one, experts copying its MLP
    (`_moe_ized`). Returns (converted, left over): what has no place in a HF vision tower (a
    text tower, OpenCLIP's ``proj``, ``logit_scale``) is left over, under its source name.
    """
    if src_layout == "open_clip":
        converted, rest = _open_clip_tail_to_hf(tensors, cfg, src_prefix, dst_prefix)
    else:
        converted = {dst_prefix + k[len(src_prefix):]: v for k, v in tensors.items() if k.startswith(src_prefix)}
        rest = {k: v for k, v in tensors.items() if not k.startswith(src_prefix)}
    if moe_seed is None or cfg.moe is None:
        return converted, rest
    root = dst_prefix + _HF_LAYERS
    layers = _layer_keys(list(converted), root)
    in_layers = {k for keys in layers.values() for k in keys}
    out: dict[str, torch.Tensor] = {k: v for k, v in converted.items() if k not in in_layers}
    for i in sorted(layers):
        layer = {k: converted[k] for k in layers[i]}
        out.update(_moe_ized(layer, f"{root}{i}.", cfg.moe.num_experts, moe_seed))
    return out, rest


def identity_layer(cfg: VisionConfig, prefix: str, index: int) -> dict[str, torch.Tensor]:
    """An all-zero dense HF-named layer ``prefix + encoder.layers.<index>.*`` (fp32).

    A pre-norm residual layer whose every weight is zero adds nothing: both LayerNorms output
    zeros, so attention and MLP add zero to the residual stream. It stands for a layer past the
    feature layer that a model trained from scratch never had (its output is never used), so
    that the tower has the depth its config names.
    """
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    root = f"{prefix}{_HF_LAYERS}{index}."
    shapes = {"layer_norm1": [(h,)], "layer_norm2": [(h,)], "mlp.fc1": [(f, h), (f,)], "mlp.fc2": [(h, f), (h,)]}
    shapes.update({f"self_attn.{p}_proj": [(h, h), (h,)] for p in ("q", "k", "v", "out")})
    out = {}
    for module, (first, *rest) in shapes.items():
        out[f"{root}{module}.weight"] = torch.zeros(first)
        out[f"{root}{module}.bias"] = torch.zeros(rest[0] if rest else first)
    return out
