"""Parameter accounting: total and active (per-token) parameters of a CuMo model, per module.

"Active" parameters are those one token passes through: every non-expert parameter (routers
included) plus, in each MoE block, ``top_k`` of its ``E`` equally-sized experts, i.e. the block's
expert parameters scaled by ``top_k / E``.

Three ways to the same numbers, which the tests hold equal:

- `count_parameters(model)`: walks a built model (any device, meta included). Counts what *this
  rank* holds: under TP/PP/EP a rank has a shard, so the numbers are per rank.
- `count_from_config(model_cfg)`: builds the whole model at model-parallel size 1 on the meta
  device (nothing is allocated; a CuMo-8x7B builds in seconds) and counts it: the global figures.
- `hand_count(model_cfg)`: the same global figures from explicit formulas, no model built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fractions import Fraction

import torch

from cumo_megatron.config.schema import ModelConfig, MoEConfig, ParallelConfig

# Top-level child of `CuMoModel` -> the module it belongs to in `ParamCounts`.
_SECTIONS = {"vision": "vision", "connector": "connector", "language_model": "language"}
# Expert parameters live under a MoE block's `experts` child: megatron's SequentialMLP
# (`<block>.experts.local_experts.<j>.`) and our connector (`connector.experts.<j>.`).
_EXPERTS = ".experts."


@dataclass(frozen=True)
class Count:
    """Parameters of one module: all of them, and those a single token uses."""

    total: int
    active: int

    def __add__(self, other: "Count") -> "Count":
        return Count(self.total + other.total, self.active + other.active)


@dataclass(frozen=True)
class ParamCounts:
    """Total and active parameter counts of the vision tower, the connector and the LLM."""

    vision: Count
    connector: Count
    language: Count

    @property
    def total(self) -> Count:
        """The whole model."""
        return self.vision + self.connector + self.language

    def as_dict(self) -> dict[str, dict[str, int]]:
        """``{"vision": {"total": ..., "active": ...}, ..., "total": {...}}`` (for logs / JSON)."""
        rows = {"vision": self.vision, "connector": self.connector, "language": self.language}
        rows["total"] = self.total
        return {name: dataclasses.asdict(count) for name, count in rows.items()}


# --------------------------------------------------------------------------- #
# Counting a built model
# --------------------------------------------------------------------------- #


def _section_of(name: str) -> str:
    """Module a parameter belongs to, skipping wrapper prefixes such as DDP's ``module.``."""
    for part in name.split("."):
        if part in _SECTIONS:
            return _SECTIONS[part]
    raise ValueError(
        f"parameter {name!r} is in none of the CuMo modules {sorted(_SECTIONS)}; "
        "count_parameters expects a CuMoModel (possibly wrapped by DDP / Float16Module)"
    )


def _expert_share(model: torch.nn.Module, block_name: str) -> Fraction:
    """``top_k / num_experts`` of the MoE block ``block_name``, from its router's config.

    Both megatron's `MoELayer` and our `MoEConnector` hold a router built from the block's
    megatron `TransformerConfig` (``moe_router_topk``, ``num_moe_experts`` = global E).
    """
    block = model.get_submodule(block_name)
    router = getattr(block, "router", None)
    config = getattr(router, "config", None)
    if config is None or not config.num_moe_experts:
        raise ValueError(
            f"{block_name!r} holds expert parameters but no router with an MoE config; "
            "cannot tell how many of its experts a token uses"
        )
    return Fraction(config.moe_router_topk, config.num_moe_experts)


def count_parameters(model: torch.nn.Module) -> ParamCounts:
    """Total and active parameters of a built `CuMoModel`, per module, as held by this rank.

    Expert parameters are recognised by name (``.experts.``) and scaled by their block's
    ``top_k / E``; everything else (attention, norms, embeddings, routers) counts fully. Tied
    parameters count once. Works on any device, meta included (only shapes are read).

    Per rank: under TP / PP a rank holds a shard of the model, and under EP only its local
    experts (still scaled by ``top_k`` over the *global* E, so summing the expert share over the
    EP group gives the global figure). For whole-model figures use `count_from_config` or
    `hand_count`.
    """
    totals = {section: 0 for section in _SECTIONS.values()}
    dense = dict(totals)
    experts_by_block: dict[tuple[str, str], int] = {}
    for name, param in model.named_parameters():
        section = _section_of(name)
        totals[section] += param.numel()
        if _EXPERTS in name:
            block = name.split(_EXPERTS, 1)[0]
            experts_by_block[(section, block)] = experts_by_block.get((section, block), 0) + param.numel()
        else:
            dense[section] += param.numel()
    active: dict[str, Fraction] = {section: Fraction(n) for section, n in dense.items()}
    for (section, block), numel in experts_by_block.items():
        active[section] += numel * _expert_share(model, block)
    # Exact integers at EP = 1 (E equal experts scaled by k/E); a rank's EP shard may round.
    return ParamCounts(**{s: Count(totals[s], round(active[s])) for s in totals})


# --------------------------------------------------------------------------- #
# Counting from a configuration
# --------------------------------------------------------------------------- #


def _ensure_single_model_parallel_world(seed: int) -> None:
    """Bring up a world of one if nothing is up; refuse a model-parallel layout other than 1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from cumo_megatron.platform import ParallelSizes, initialize

    if not parallel_state.model_parallel_is_initialized():
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                "count_from_config needs megatron's parallel state at tp=pp=ep=1; in a "
                f"{dist.get_world_size()}-rank job initialise it first, or use hand_count(model_cfg)"
            )
        initialize(ParallelSizes(), seed)
        return
    sizes = {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
    }
    if any(size != 1 for size in sizes.values()):
        layout = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise RuntimeError(
            f"count_from_config builds the whole model and needs tp=pp=ep=1, but this process "
            f"is initialised with {layout}; use hand_count(model_cfg) for global figures"
        )


def count_from_config(model_cfg: ModelConfig, seed: int = 1234) -> ParamCounts:
    """Global counts: build the whole model on the meta device (allocating nothing) and count it.

    Needs megatron's parallel state at tp = pp = ep = 1; a process with none gets a world of
    one (`cumo_megatron.platform.initialize`, which also seeds the RNGs with ``seed``). The
    model is built with the local spec: the parameter shapes of the TE spec are the same.
    """
    from cumo_megatron.models.cumo import build_model
    from cumo_megatron.models.transformer_configs import shape_only_build
    from cumo_megatron.platform import cpu

    _ensure_single_model_parallel_world(seed)
    # Settings that do not change shapes but could touch a device while building.
    cfg = dataclasses.replace(model_cfg, spec="local", fp8=None, recompute=None, token_dispatcher="allgather")
    # megatron's CLIPViTModel moves its position ids with `.cuda()`, which a meta tensor cannot
    # do on a CUDA host; the CUDA->CPU mode makes it a no-op (on CPU hosts it is already active).
    with shape_only_build(), torch.device("meta"), cpu.CudaToCpuMode():
        model = build_model(cfg, ParallelConfig())
    allocated = [name for name, param in model.named_parameters() if not param.is_meta]
    if allocated:
        raise RuntimeError(f"meta build allocated parameters (a module ignores the meta device): {allocated[:5]}")
    return count_parameters(model)


# --------------------------------------------------------------------------- #
# Counting by hand
# --------------------------------------------------------------------------- #


def _moe_count(expert: int, router_width: int, moe: MoEConfig | None) -> Count:
    """An MLP of ``expert`` parameters, or E copies of it plus a bias-free router ``E x width``."""
    if moe is None:
        return Count(expert, expert)
    router = moe.num_experts * router_width
    return Count(moe.num_experts * expert + router, moe.top_k * expert + router)


def _hand_vision(model_cfg: ModelConfig) -> Count:
    v = model_cfg.vision
    h, f = v.hidden_size, v.ffn_hidden_size
    tokens = v.patches_per_side**2 + 1  # + class token
    stem = 3 * v.patch_size**2 * h + h + tokens * h + 2 * h  # conv (no bias), CLS, positions, ln_pre
    attention = (3 * h * h + 3 * h) + (h * h + h)  # fused qkv with bias, output projection with bias
    norms = 2 * 2 * h  # input and pre-MLP LayerNorms, weight and bias
    mlp = (h * f + f) + (f * h + h)
    moe_layers = set(v.moe_layer_indices())
    count = Count(stem, stem)
    for layer in range(v.built_layers):
        count += Count(attention + norms, attention + norms)
        count += _moe_count(mlp, h, v.moe if layer in moe_layers else None)
    return count


def _hand_connector(model_cfg: ModelConfig) -> Count:
    c, d = model_cfg.vision.feature_channels, model_cfg.connector_hidden
    moe = model_cfg.connector.moe
    mlp = (c * d + d) + (d * d + d)
    return _moe_count(mlp, c, moe)


def _hand_language(model_cfg: ModelConfig) -> Count:
    lang = model_cfg.language
    h, f, v = lang.hidden_size, lang.ffn_hidden_size, lang.vocab_size
    head_dim = h // lang.num_heads
    qkv = h * (lang.num_heads + 2 * lang.kv_heads) * head_dim  # GQA: kv_heads key and value heads
    proj = lang.num_heads * head_dim * h
    norms = 2 * h  # RMSNorm: weight only
    mlp = h * 2 * f + f * h  # SwiGLU: fc1 = [gate; up], fc2
    per_layer = Count(qkv + proj + norms, qkv + proj + norms)
    per_layer += _moe_count(mlp, h, lang.moe)
    outer = v * h + h + (0 if lang.tie_embeddings else v * h)  # embedding, final norm, output layer
    count = Count(outer, outer)
    for _ in range(lang.num_layers):
        count += per_layer
    return count


def hand_count(model_cfg: ModelConfig) -> ParamCounts:
    """Global counts from explicit formulas (what the built model must match, parameter for parameter).

    - ViT: patch conv (no bias), class token, positions (patches + 1), ln_pre; per built layer
      fused QKV + projection with biases, two LayerNorms, MLP fc1/fc2 with biases, or E such
      experts and a bias-free router ``E x h``. No post-LayerNorm (features are taken before it).
    - Connector: fc1 ``c -> d`` and fc2 ``d -> d`` with biases (c = hidden x S2 scales), or E
      experts and a router ``E x c``.
    - LLM: embeddings, per layer GQA QKV, projection, SwiGLU fc1 (2 x ffn) and fc2, two RMSNorms,
      or E experts and a router ``E x h``; final RMSNorm and an output layer unless tied.
    """
    return ParamCounts(
        vision=_hand_vision(model_cfg),
        connector=_hand_connector(model_cfg),
        language=_hand_language(model_cfg),
    )


def format_counts(counts: ParamCounts) -> str:
    """A small table of the counts in billions, two decimals."""
    lines = [f"{'module':<10} {'total (B)':>10} {'active (B)':>11}"]
    for name, row in counts.as_dict().items():
        lines.append(f"{name:<10} {row['total'] / 1e9:>10.2f} {row['active'] / 1e9:>11.2f}")
    return "\n".join(lines)
