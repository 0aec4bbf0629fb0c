"""The three CuMo training stages as configuration: which parameters train, and a freezing check.

- stage 1 (pre-training): the connector only; the ViT and the LLM are frozen;
- stage 2 (pre-finetuning): everything, dense;
- stage 3 (visual instruction tuning): everything, with CLIP-MoE and MLP-MoE upcycled from stage 2
  (`cumo_megatron.training.checkpointing.load_weights` upcycles a dense checkpoint on load) and the
  routers' auxiliary losses.

Freezing is applied to the bare model *before* it is wrapped in megatron's DDP: DDP allocates
gradient buffers (and the optimizer its state) only for parameters that require gradients, so a
frozen parameter has no gradient and no optimizer state at all.
"""

from __future__ import annotations

import torch

from cumo_megatron.config.loader import ConfigError
from cumo_megatron.config.schema import ModelConfig

STAGES = (1, 2, 3)
# Top-level CuMoModel children each stage trains (None: all of them).
_TRAINABLE = {1: ("connector",), 2: None, 3: None}


def trains(stage: int, name: str) -> bool:
    """Whether parameter ``name`` (a `CuMoModel` name, wrapper prefixes allowed) trains in ``stage``."""
    if stage not in STAGES:
        raise ConfigError(f"train.stage={stage} is unknown; choose 1, 2 or 3")
    roots = _TRAINABLE[stage]
    if roots is None:
        return True
    parts = name.split(".")
    while parts and parts[0] == "module":  # DDP / Float16Module prefixes
        parts = parts[1:]
    return bool(parts) and parts[0] in roots


def check_stage_config(stage: int, model: ModelConfig) -> None:
    """Reject a model that does not fit the stage: stages 1 and 2 are dense on the vision side,
    stage 3 needs an MoE module (else it is stage 2 again)."""
    vision_connector_moe = model.vision.moe is not None or model.connector.moe is not None
    if stage in (1, 2) and vision_connector_moe:
        raise ConfigError(
            f"train.stage={stage} trains the dense model, but model.vision.moe / model.connector.moe are set; "
            "set them to null (CLIP-MoE and MLP-MoE are upcycled from the stage-2 weights in stage 3)"
        )
    if stage == 3 and not vision_connector_moe and model.language.moe is None:
        raise ConfigError(
            "train.stage=3 trains the co-upcycled MoE model, but no MoE module is configured; "
            "set model.vision.moe and model.connector.moe (or use train.stage=2)"
        )


def apply_stage(model: torch.nn.Module, stage: int) -> dict[str, int]:
    """Set ``requires_grad`` per the stage; return ``{"trainable": n, "frozen": m}`` element counts."""
    counts = {"trainable": 0, "frozen": 0}
    for name, param in model.named_parameters():
        train = trains(stage, name)
        param.requires_grad_(train)
        counts["trainable" if train else "frozen"] += param.numel()
    return counts


def snapshot_frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every frozen parameter (for `verify_frozen`)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


def verify_frozen(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> list[str]:
    """Names of frozen parameters that are no longer bit-identical to ``snapshot`` (empty: all good)."""
    params = dict(model.named_parameters())
    changed = []
    for name, before in snapshot.items():
        now = params[name].detach()
        if not bits_equal(now, before):
            changed.append(name)
    return changed


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN payloads and signed zeros included), not numeric equality."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _fingerprint(tensor: torch.Tensor) -> tuple[int, int]:
    """Two int64 checksums of a tensor's bits: their sum and a position-weighted sum.

    Cheap enough to take over a 7B model's frozen weights (no copy is kept); any single changed
    element changes the first, and a permutation changes the second.
    """
    raw = tensor.detach().contiguous().view(-1)
    if raw.element_size() == 8:
        bits = raw.view(torch.int64)
    elif raw.element_size() == 4:
        bits = raw.view(torch.int32).to(torch.int64)
    elif raw.element_size() == 2:
        bits = raw.view(torch.int16).to(torch.int64)
    else:
        bits = raw.view(torch.uint8).to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device) % 1_000_003
    return int(bits.sum()), int((bits * weights).sum())


def frozen_fingerprint(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Checksums of every frozen parameter (for `verify_fingerprint`; no copies kept)."""
    return {name: _fingerprint(p) for name, p in model.named_parameters() if not p.requires_grad}


def verify_fingerprint(model: torch.nn.Module, fingerprint: dict[str, tuple[int, int]]) -> list[str]:
    """Names of frozen parameters whose checksums changed since `frozen_fingerprint`."""
    params = dict(model.named_parameters())
    return [name for name, value in fingerprint.items() if _fingerprint(params[name]) != value]
