"""Original CuMo releases (SHI-Labs/CuMo: LLaVA-Mistral / LLaVA-Mixtral directories) <-> our CuMoModel.

A release directory holds one checkpoint (sharded safetensors + index) with three modules side by
side, and a ``config.json`` that is the LLM's config plus LLaVA/CuMo fields::

    model.embed_tokens / model.layers.N.* / model.norm / lm_head   the LLM (HF names)
    model.vision_tower.vision_model.*                              CLIP(-MoE): `adapters.vision`
    model.mm_projector.{gate, experts.J.{0,2}}.*                   MLP-MoE connector: `adapters.connector`

    config.json: model_type llava_mistral | llava_mixtral | llava_llama, mm_projector_type
    (smoe_mlp | mlp2x_gelu), num_experts, num_selected, scales (S2), mm_vision_select_layer,
    mm_vision_select_feature, mm_hidden_size (the CLIP width), clip_smoe, mlp_smoe,
    balance_loss_coef, router_z_loss_coef, mm_vision_tower (the CLIP checkpoint's hub id or path)

The CLIP's shape is not in the release: it comes from the CLIP checkpoint ``mm_vision_tower``
names (or ``clip_dir``), from the ``vision_tower/`` config our exports write beside the weights,
or, for the hub ids CuMo used, from a built-in table.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Optional, Union

import torch

from cumo_megatron.checkpoint.adapters.common import CheckpointError, RuleStream
from cumo_megatron.checkpoint.adapters.connector import connector_to_megatron, megatron_to_connector
from cumo_megatron.checkpoint.adapters.language import (
    hf_config_from_language,
    hf_lm_to_megatron,
    hf_lm_unused_keys,
    language_config_from_hf,
    megatron_to_hf_lm,
)
from cumo_megatron.checkpoint.adapters.vision import (
    clip_to_megatron,
    clip_unused_keys,
    megatron_to_clip,
    vision_config_from_hf,
    vision_config_from_open_clip,
)
from cumo_megatron.checkpoint.io import read_json
from cumo_megatron.config.schema import ConnectorConfig, MoEConfig, ModelConfig, VisionConfig

VISION_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
RELEASE_MODEL_TYPES = ("llava", "llava_llama", "llava_mistral", "llava_mixtral")
PROJECTOR_TYPES = {"smoe_mlp": "cumo_release", "mlp2x_gelu": "llava"}
# Where our exports put the CLIP's config.json / preprocessor_config.json beside the release's
# weights: the original code reads the CLIP's shape and image processor from ``mm_vision_tower``.
BUNDLED_CLIP_DIR = "vision_tower"

# The CLIPs CuMo and LLaVA name by hub id (their config.json, as published): usable without a copy.
KNOWN_CLIP_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024, num_layers=24, num_heads=16, ffn_hidden_size=4096, image_size=336, patch_size=14,
        layernorm_eps=1e-5, activation="quick_gelu",
    ),
    "openai/clip-vit-large-patch14": dict(
        hidden_size=1024, num_layers=24, num_heads=16, ffn_hidden_size=4096, image_size=224, patch_size=14,
        layernorm_eps=1e-5, activation="quick_gelu",
    ),
}


def _release_config(directory: Union[str, Path, Mapping]) -> tuple[dict, str, Optional[Path]]:
    """(config, where it came from for messages, the release directory or None for a dict)."""
    if isinstance(directory, Mapping):
        return dict(directory), "release config", None
    config = read_json(directory, "config.json")
    return config, str(Path(directory) / "config.json"), Path(directory)


def _scales(config: dict, where: str) -> list[int]:
    scales = config.get("scales") or [1]
    out = []
    for scale in scales:
        if float(scale) != int(scale):
            raise CheckpointError(f"{where}: scales={scales}; only integer S2 scales are supported")
        out.append(int(scale))
    return out


def _clip_from_dir(tower: Path, overrides: dict) -> Optional[VisionConfig]:
    """The CLIP config of a local CLIP directory: HF (``config.json``) or OpenCLIP
    (``open_clip_config.json``); None when it holds neither."""
    if (tower / "config.json").is_file():
        return vision_config_from_hf(
            read_json(tower, "config.json"),
            preprocessor=read_json(tower, "preprocessor_config.json", required=False),
            **overrides,
        )
    if (tower / "open_clip_config.json").is_file():
        return vision_config_from_open_clip(tower / "open_clip_config.json", **overrides)
    return None


def _vision_config(config: dict, where: str, release_dir: Optional[Path], clip_dir, moe: Optional[MoEConfig]) -> VisionConfig:
    select_feature = config.get("mm_vision_select_feature", "patch")
    if select_feature not in ("patch", "cls_patch"):
        raise CheckpointError(f"{where}: mm_vision_select_feature={select_feature!r}; expected 'patch' or 'cls_patch'")
    overrides = dict(
        feature_layer=int(config.get("mm_vision_select_layer", -2)),
        drop_cls=select_feature == "patch",
        moe=moe,
        s2_scales=_scales(config, where),
    )
    named = config.get("mm_vision_tower")
    if clip_dir is not None:
        tower = str(clip_dir)
        if not Path(clip_dir).is_dir():
            raise CheckpointError(f"--clip-dir {tower} is not a directory; pass the CLIP checkpoint's directory")
        try:
            vision = _clip_from_dir(Path(clip_dir), overrides)
        except CheckpointError as err:
            raise CheckpointError(f"--clip-dir {tower}: {err}; pass the CLIP checkpoint's directory") from err
        if vision is None:
            raise CheckpointError(
                f"--clip-dir {tower} holds no CLIP config (config.json of a HF CLIP or "
                "open_clip_config.json of an OpenCLIP); pass the CLIP checkpoint's directory"
            )
    else:
        if named is None:
            raise CheckpointError(f"{where}: no mm_vision_tower; pass --clip-dir (the CLIP checkpoint directory)")
        tower = str(named)
        # Where the CLIP can be read: the directory the release names, then the copy of its
        # config that our exports write beside the weights (the named path may be elsewhere).
        candidates = [Path(tower)] + ([release_dir / BUNDLED_CLIP_DIR] if release_dir is not None else [])
        vision = next((v for c in candidates if c.is_dir() and (v := _clip_from_dir(c, overrides)) is not None), None)
        if vision is None and tower in KNOWN_CLIP_TOWERS:
            vision = VisionConfig(**KNOWN_CLIP_TOWERS[tower], **overrides)
            vision.validate()
        if vision is None:
            raise CheckpointError(
                f"{where}: mm_vision_tower={tower} is neither a local CLIP checkpoint directory (with "
                f"config.json or open_clip_config.json) nor one of the known hub ids "
                f"{', '.join(sorted(KNOWN_CLIP_TOWERS))}; pass --clip-dir (a local copy of that CLIP)"
            )
    mm_hidden = config.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision.hidden_size:
        raise CheckpointError(
            f"{where}: mm_hidden_size={mm_hidden} but the CLIP ({tower}) has hidden_size={vision.hidden_size}; "
            "pass --clip-dir with the CLIP this release was trained with"
        )
    return vision


def model_config_from_release(
    directory: Union[str, Path, Mapping],
    clip_dir: Union[str, Path, None] = None,
    allow_sliding_window: bool = False,
) -> ModelConfig:
    """Our `ModelConfig` for a CuMo release directory (or its ``config.json`` as a dict).

    Vision: the CLIP named by ``mm_vision_tower`` (a local HF or OpenCLIP directory; else the copy
    of its config beside the weights, ``vision_tower/``, that our exports write; else one of the
    hub ids in `KNOWN_CLIP_TOWERS`); ``clip_dir`` overrides it (releases name a hub id). Features from ``mm_vision_select_layer``, CLS dropped for ``mm_vision_select_feature:
    patch``, S2 ``scales``, CLIP-MoE (``clip_smoe``) with ``num_experts`` / ``num_selected`` on every
    built layer. Connector: ``smoe_mlp`` (MoE) or ``mlp2x_gelu`` (dense). LLM: from the LLM fields
    (`language_config_from_hf`). Every MoE module takes ``balance_loss_coef`` /
    ``router_z_loss_coef`` (CuMo applies them to the Mixtral LLM's routers too). Precision stays
    the `ModelConfig` default; set it for training.
    """
    config, where, release_dir = _release_config(directory)
    model_type = config.get("model_type")
    if model_type not in RELEASE_MODEL_TYPES:
        raise CheckpointError(
            f"{where}: model_type={model_type!r} is not a LLaVA/CuMo release ({', '.join(RELEASE_MODEL_TYPES)})"
        )
    projector = config.get("mm_projector_type", "linear")
    if projector not in PROJECTOR_TYPES:
        raise CheckpointError(
            f"{where}: mm_projector_type={projector!r}; supported: {', '.join(PROJECTOR_TYPES)}"
        )
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise CheckpointError(f"{where}: mm_patch_merge_type={config['mm_patch_merge_type']!r}; only 'flat' is supported")
    balance = float(config.get("balance_loss_coef", MoEConfig.balance_coeff))
    z_loss = float(config.get("router_z_loss_coef", MoEConfig.z_loss_coeff))

    def cumo_moe() -> MoEConfig:
        if config.get("num_experts") is None:
            raise CheckpointError(f"{where}: clip_smoe / smoe_mlp need num_experts (and num_selected)")
        moe = MoEConfig(
            num_experts=int(config["num_experts"]),
            top_k=int(config.get("num_selected", 2)),
            balance_coeff=balance,
            z_loss_coeff=z_loss,
        )
        moe.check("release")
        return moe

    language = language_config_from_hf(config, allow_sliding_window=allow_sliding_window)
    if language.moe is not None:
        language.moe.balance_coeff, language.moe.z_loss_coeff = balance, z_loss
    vision = _vision_config(config, where, release_dir, clip_dir, cumo_moe() if config.get("clip_smoe") else None)
    connector = ConnectorConfig(moe=cumo_moe() if projector == "smoe_mlp" else None)
    model = ModelConfig(vision=vision, connector=connector, language=language)
    model.validate()
    return model


def _projector_layout(model_cfg: ModelConfig) -> str:
    return "cumo_release" if model_cfg.connector.moe is not None else "llava"


def release_to_megatron(
    src: Mapping[str, torch.Tensor], model_cfg: ModelConfig
) -> RuleStream:
    """Stream the whole CuMoModel (``vision.vit.*``, ``connector.*``, ``language_model.*``) from a
    release checkpoint (e.g. ``open_checkpoint(release_dir)``).

    All three adapters check the source's structure against ``model_cfg`` before anything is
    read; tensors are then read one at a time. The release's unused tensors (ViT layers after the
    feature layer, ``post_layernorm``, ...) are listed by `release_unused_keys`.
    """
    vision = clip_to_megatron(src, model_cfg.vision, layout="cumo_release", prefix="vision.vit.")
    connector = connector_to_megatron(src, model_cfg, layout=_projector_layout(model_cfg), prefix="connector.")
    language = hf_lm_to_megatron(src, model_cfg.language, prefix="language_model.", hf_prefix="")
    return vision + connector + language


def release_unused_keys(src_keys: Iterable[str], model_cfg: ModelConfig) -> list[str]:
    """Release keys that `release_to_megatron` does not read, in source order.

    Pass ``{k: src[k] for k in release_unused_keys(src.keys(), cfg)}`` as `megatron_to_release`'s
    ``passthrough`` for a bit-exact round trip.
    """
    keys = list(src_keys)
    unused = set(clip_unused_keys(keys, model_cfg.vision, layout="cumo_release"))
    unused.update(hf_lm_unused_keys(keys, model_cfg.language, hf_prefix=""))
    # The connector adapter refuses unknown tensors under the projector, so none are unused there;
    # anything outside the three modules is.
    unused.update(k for k in keys if not k.startswith(("model.", "lm_head.")))
    return [k for k in keys if k in unused]


def megatron_to_release(
    src: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    passthrough: Optional[Mapping[str, torch.Tensor]] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream our CuMoModel's state dict in the release layout: LLM, vision tower, projector
    (the release's order), then the ``passthrough`` tensors that belong to none of them.

    ``passthrough`` (see `release_unused_keys`) must not hold tensors the model writes. Pair the
    weights with `release_config` for a complete directory.
    """
    passthrough = dict(passthrough or {})
    vision_extra = {k: v for k, v in passthrough.items() if k.startswith(VISION_PREFIX)}
    lm_extra = {k: v for k, v in passthrough.items() if not k.startswith(VISION_PREFIX)}
    language = megatron_to_hf_lm(src, model_cfg.language, hf_prefix="", prefix="language_model.", passthrough=lm_extra)
    vision = megatron_to_clip(src, model_cfg.vision, layout="cumo_release", passthrough=vision_extra, prefix="vision.vit.")
    connector = megatron_to_connector(
        src, model_cfg, layout=_projector_layout(model_cfg), source_prefix=PROJECTOR_PREFIX, prefix="connector."
    )
    return itertools.chain(language, vision, connector)


_LLAVA_NAMES = {
    "llama": ("llava_llama", "LlavaLlamaForCausalLM"),
    "mistral": ("llava_mistral", "LlavaMistralForCausalLM"),
    "mixtral": ("llava_mixtral", "LlavaMixtralForCausalLM"),
}


# Fields the original code reads from config.json without a default (llava_arch.py, the
# projector builder, llava_{mistral,mixtral}.py's forward), with the values of a model loaded for
# inference: CuMo's eval scripts set ``training`` False themselves; ``mm_use_im_patch_token``
# defaults to True in its builder, which would add a token and resize the embeddings.
_ORIGINAL_DEFAULTS = dict(
    training=False, local_rank=0, num_layers=3, dropout=False, use_mm_proj=True,
    mm_use_im_patch_token=False, mm_use_im_start_end=False, image_aspect_ratio="pad",
    tokenizer_padding_side="right",
)


def _matching_hub_tower(vision: VisionConfig) -> Optional[str]:
    """The known hub id whose CLIP has ``vision``'s shape, if any."""
    for hub_id, shape in KNOWN_CLIP_TOWERS.items():
        if all(getattr(vision, name) == value for name, value in shape.items()):
            return hub_id
    return None


def release_config(
    model_cfg: ModelConfig,
    base: Optional[Mapping] = None,
    vision_tower: Optional[str] = None,
    dtype: str = "float32",
) -> dict:
    """A release ``config.json`` describing ``model_cfg`` (the inverse of `model_config_from_release`).

    ``base`` (the original release config) keeps the fields we do not model (tokenizer settings,
    training flags); the fields the original code reads without a default get inference values
    when ``base`` lacks them. ``vision_tower`` sets ``mm_vision_tower`` (default: ``base``'s, else
    the known hub id of a CLIP of this shape); a CLIP nobody names is refused.
    """
    vision, connector = model_cfg.vision, model_cfg.connector
    moes = [m for m in (vision.moe, connector.moe) if m is not None]
    if len({(m.num_experts, m.top_k, m.balance_coeff, m.z_loss_coeff) for m in moes}) > 1:
        raise CheckpointError(
            "a release config has one num_experts / num_selected / loss coefficients for the vision and "
            f"connector MoEs, but they differ: vision.moe={vision.moe}, connector.moe={connector.moe}; "
            "export with --format split"
        )
    if vision.moe is not None and vision.moe_layers is not None and sorted(vision.moe_layers) != list(range(vision.built_layers)):
        raise CheckpointError(
            "a release's CLIP-MoE covers every layer but vision.moe_layers selects a subset; export with --format split"
        )
    base = dict(base or {})
    tower = vision_tower or base.get("mm_vision_tower") or _matching_hub_tower(vision)
    if tower is None:
        raise CheckpointError(
            "the release must name its CLIP (mm_vision_tower) and none is known for this vision tower; "
            "pass vision_tower= (a hub id or a CLIP directory)"
        )
    out = hf_config_from_language(model_cfg.language, base=base, dtype=dtype)
    for name, value in _ORIGINAL_DEFAULTS.items():
        out.setdefault(name, value)
    model_type, arch = _LLAVA_NAMES[model_cfg.language.arch]
    out.update(
        model_type=model_type,
        architectures=[arch],
        mm_projector_type="smoe_mlp" if connector.moe is not None else "mlp2x_gelu",
        mm_hidden_size=vision.hidden_size,
        mm_vision_select_layer=vision.feature_layer,
        mm_vision_select_feature="patch" if vision.drop_cls else "cls_patch",
        mm_vision_tower=str(tower),
        mm_patch_merge_type="flat",
        scales=list(vision.s2_scales),
        clip_smoe=vision.moe is not None,
        mlp_smoe=connector.moe is not None,
    )
    # One set of loss coefficients for every MoE module (CuMo applies them to a Mixtral's too).
    coefficients = moes + ([model_cfg.language.moe] if model_cfg.language.moe is not None else [])
    out.setdefault("balance_loss_coef", MoEConfig.balance_coeff)
    out.setdefault("router_z_loss_coef", MoEConfig.z_loss_coeff)
    if coefficients:
        out.update(balance_loss_coef=coefficients[0].balance_coeff, router_z_loss_coef=coefficients[0].z_loss_coeff)
    if moes:
        out.update(num_experts=moes[0].num_experts, num_selected=moes[0].top_k)
    return out
