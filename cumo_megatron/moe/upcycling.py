"""Co-upcycling: a dense (stage-2) CuMo state dict -> the MoE (stage-3) state dict.

CuMo initialises every expert as an exact copy (no noise) of the dense MLP it replaces and starts
each router afresh with `nn.Linear`'s default init (../shared/DESIGN.md, section 1):

- every MoE ViT layer ``vision.vit.decoder.layers.{i}.mlp.linear_fc{1,2}.*`` ->
  ``...mlp.experts.local_experts.{j}.linear_fc{1,2}.*`` and ``...mlp.router.weight [E, h]``;
- the connector ``connector.linear_fc{1,2}.*`` -> ``connector.experts.{j}.linear_fc{1,2}.*`` and
  ``connector.router.weight [E, in]``;
- the LLM only when ``language.moe`` is configured and the source LLM is dense (upcycling the LLM
  is an option, not the default); an LLM that is already MoE (Mixtral) passes through.

Every other tensor passes through untouched (same object). The state dicts are full, world-of-one
state dicts with our parameter names (``CuMoModel.state_dict()`` at TP = PP = EP = 1).

megatron's own ``upcycling_utils`` refuses ``quick_gelu`` and only finds the language model's
MLPs; for plain copies at granularity 1 this routine is simpler.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cumo_megatron.config.loader import ConfigError
from cumo_megatron.config.schema import ModelConfig

_VISION_LAYER = "vision.vit.decoder.layers.{i}.mlp."
_LANGUAGE_LAYER = "language_model.decoder.layers.{i}.mlp."
_CONNECTOR = "connector."
# Expert names relative to the MLP: megatron's SequentialMLP, and our MoE connector.
_MEGATRON_EXPERT = "experts.local_experts.{j}."
_CONNECTOR_EXPERT = "experts.{j}."
_VISION_LAYER_RE = re.compile(r"^vision\.vit\.decoder\.layers\.(\d+)\.")
_LANGUAGE_LAYER_RE = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class _DenseMLP:
    """One dense MLP to upcycle: where it lives, what its weights must look like, where experts go."""

    prefix: str  # e.g. "vision.vit.decoder.layers.0.mlp."
    expert_prefix: str  # relative to ``prefix``, formatted with the expert index j
    weight_shapes: dict[str, tuple[int, ...]]  # suffix (relative to prefix) -> expected shape
    router_in: int
    num_experts: int


def fresh_router_weight(
    name: str, num_experts: int, in_features: int, seed: int, like: torch.Tensor
) -> torch.Tensor:
    """A router weight ``[E, in]`` with `nn.Linear`'s default init, seeded per router name.

    Same init as `cumo_megatron.moe.router.default_linear_init_` (kaiming-uniform, a=sqrt(5)),
    drawn in fp32 from a generator seeded with ``seed`` and the router's name, so that one router's
    values do not depend on which other tensors the state dict holds. Cast to ``like``'s dtype
    and device.
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    weight = torch.empty(num_experts, in_features, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    # ``like`` may be a meta tensor standing for a weight on disk (streaming conversion).
    return weight.to(dtype=like.dtype, device="cpu" if like.is_meta else like.device)


def _keys_under(state_dict: dict, prefix: str) -> list[str]:
    return [key for key in state_dict if key.startswith(prefix)]


def _is_moe_mlp(state_dict: dict, prefix: str) -> bool:
    moe_prefixes = (prefix + "router.", prefix + "experts.")
    return any(key.startswith(moe_prefixes) for key in state_dict)


def _check_dense_source(state_dict: dict, mlp: _DenseMLP, what: str) -> list[str]:
    """The dense MLP's keys (source order); raise if missing, already MoE, or mis-shaped."""
    if _is_moe_mlp(state_dict, mlp.prefix):
        raise ConfigError(
            f"upcycling: {what} ({mlp.prefix}*) is already MoE in the source state dict; "
            "co-upcycling starts from a dense (stage-2) checkpoint"
        )
    keys = _keys_under(state_dict, mlp.prefix)
    for suffix, shape in mlp.weight_shapes.items():
        key = mlp.prefix + suffix
        if key not in state_dict:
            raise ConfigError(
                f"upcycling: {key} is missing from the source state dict; it must be a full dense "
                f"CuMo state dict for this model config ({what})"
            )
        got = tuple(state_dict[key].shape)
        if got != shape:
            raise ConfigError(
                f"upcycling: {key} has shape {list(got)} but the model config expects {list(shape)} "
                f"({what}); check the config against the checkpoint"
            )
    return keys


def _emit_upcycled(out: dict, state_dict: dict, keys: list[str], mlp: _DenseMLP, seed: int) -> None:
    """Router first, then each expert's source keys, in the order a built MoE model lists them."""
    router_name = mlp.prefix + "router.weight"
    like = state_dict[mlp.prefix + "linear_fc1.weight"]
    out[router_name] = fresh_router_weight(router_name, mlp.num_experts, mlp.router_in, seed, like)
    for j in range(mlp.num_experts):
        expert = mlp.prefix + mlp.expert_prefix.format(j=j)
        for key in keys:
            out[expert + key[len(mlp.prefix):]] = key


def _layer_indices(state_dict: dict, pattern: re.Pattern) -> set[int]:
    return {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}


def _vision_mlps(state_dict: dict, cfg: ModelConfig) -> list[tuple[_DenseMLP, str]]:
    vision = cfg.vision
    present = _layer_indices(state_dict, _VISION_LAYER_RE)
    if present and present != set(range(vision.built_layers)):
        raise ConfigError(
            f"upcycling: the source has vision layers {sorted(present)} but the model config builds "
            f"{vision.built_layers} (vision.num_layers={vision.num_layers}, "
            f"vision.feature_layer={vision.feature_layer})"
        )
    moe_layers = set(vision.moe_layer_indices())
    for i in sorted(present - moe_layers):  # dense in the config: must be dense in the source too
        if _is_moe_mlp(state_dict, _VISION_LAYER.format(i=i)):
            raise ConfigError(
                f"upcycling: vision layer {i} is already MoE in the source state dict but dense in the "
                "model config (vision.moe / vision.moe_layers); co-upcycling starts from a dense "
                "(stage-2) checkpoint"
            )
    if vision.moe is None:
        return []
    h, f = vision.hidden_size, vision.ffn_hidden_size
    shapes = {
        "linear_fc1.weight": (f, h),
        "linear_fc1.bias": (f,),
        "linear_fc2.weight": (h, f),
        "linear_fc2.bias": (h,),
    }
    return [
        (
            _DenseMLP(_VISION_LAYER.format(i=i), _MEGATRON_EXPERT, shapes, h, vision.moe.num_experts),
            f"vision layer {i}",
        )
        for i in sorted(moe_layers)
    ]


def _connector_mlp(state_dict: dict, cfg: ModelConfig) -> list[tuple[_DenseMLP, str]]:
    if cfg.connector.moe is None:
        if _is_moe_mlp(state_dict, _CONNECTOR):
            raise ConfigError(
                "upcycling: the source connector is MoE but connector.moe is not set in the model config"
            )
        return []
    c_in, c_out = cfg.vision.feature_channels, cfg.connector_hidden
    shapes = {
        "linear_fc1.weight": (c_out, c_in),
        "linear_fc1.bias": (c_out,),
        "linear_fc2.weight": (c_out, c_out),
        "linear_fc2.bias": (c_out,),
    }
    mlp = _DenseMLP(_CONNECTOR, _CONNECTOR_EXPERT, shapes, c_in, cfg.connector.moe.num_experts)
    return [(mlp, "the connector")]


def _count_experts(state_dict: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"experts\.local_experts\.(\d+)\.")
    return len({m.group(1) for key in state_dict if (m := pattern.match(key))})


def _language_mlps(state_dict: dict, cfg: ModelConfig) -> list[tuple[_DenseMLP, str]]:
    lang = cfg.language
    present = sorted(_layer_indices(state_dict, _LANGUAGE_LAYER_RE))
    if present and present != list(range(lang.num_layers)):
        raise ConfigError(
            f"upcycling: the source has LLM layers {present} but language.num_layers={lang.num_layers}"
        )
    mlps = []
    for i in present:
        prefix = _LANGUAGE_LAYER.format(i=i)
        if _is_moe_mlp(state_dict, prefix):
            # Already an MoE LLM (Mixtral): it passes through, and must agree with the config.
            if lang.moe is None:
                raise ConfigError(
                    f"upcycling: LLM layer {i} is MoE in the source but language.moe is not set"
                )
            found = _count_experts(state_dict, prefix)
            if found != lang.moe.num_experts:
                raise ConfigError(
                    f"upcycling: LLM layer {i} has {found} experts in the source but "
                    f"language.moe.num_experts={lang.moe.num_experts}"
                )
            continue
        if lang.moe is None:
            continue
        h, f = lang.hidden_size, lang.ffn_hidden_size
        # SwiGLU: linear_fc1 = [gate; up] on dim 0.
        shapes = {"linear_fc1.weight": (2 * f, h), "linear_fc2.weight": (h, f)}
        mlps.append((_DenseMLP(prefix, _MEGATRON_EXPERT, shapes, h, lang.moe.num_experts), f"LLM layer {i}"))
    return mlps


def upcycle_sources(dense_sd: Mapping[str, torch.Tensor], model_cfg: ModelConfig, seed: int) -> dict:
    """Where each tensor of the upcycled state dict comes from, without copying any data.

    Returns ``{name: source}`` in the order a built MoE model lists its tensors, where ``source``
    is the dense key (a ``str``: the tensor passes through, or an expert copies it) or a tensor
    (a fresh router). ``dense_sd`` is only asked for names, shapes and dtypes, so it may hold meta
    tensors standing for weights on disk. Checks and errors as `upcycle_state_dict`.
    """
    plan = (
        _vision_mlps(dense_sd, model_cfg)
        + _connector_mlp(dense_sd, model_cfg)
        + _language_mlps(dense_sd, model_cfg)
    )
    keys_of = {}
    first_key = {}
    for mlp, what in plan:
        keys = _check_dense_source(dense_sd, mlp, what)
        keys_of[mlp.prefix] = (mlp, keys)
        first_key[keys[0]] = mlp.prefix
    upcycled_keys = {key for _, keys in keys_of.values() for key in keys}

    out: dict = {}
    for key in dense_sd:
        if key in first_key:
            mlp, keys = keys_of[first_key[key]]
            _emit_upcycled(out, dense_sd, keys, mlp, seed)
        elif key not in upcycled_keys:
            out[key] = key
    return out


def upcycle_state_dict(dense_sd: dict[str, torch.Tensor], model_cfg: ModelConfig, seed: int) -> dict:
    """The MoE model's state dict from a dense one: experts = exact copies, routers fresh.

    ``dense_sd`` is a world-of-one ``CuMoModel.state_dict()`` of the dense model; ``model_cfg``
    describes the MoE model to build (which vision layers are MoE, the connector's and, optionally,
    the LLM's MoE). Routers are seeded by ``seed`` and their names: the same seed gives the same
    routers. Tensors that are not upcycled pass through (same object); experts are independent
    copies. Raises `ConfigError` when the source is already MoE where the config asks for an
    upcycle, or when its shapes do not match the config.
    """
    out = {}
    for name, source in upcycle_sources(dense_sd, model_cfg, seed).items():
        if not isinstance(source, str):
            out[name] = source
        elif name == source:
            out[name] = dense_sd[source]
        else:  # independent copies: experts must diverge once training updates them
            value = dense_sd[source]
            out[name] = value.clone() if isinstance(value, torch.Tensor) else value
    return out
