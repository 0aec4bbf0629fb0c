"""Vision -> language connector: LLaVA / CuMo ``mm_projector`` <-> our connector (``connector.*``).

Layouts (``detect_connector_layout``):

* ``llava``: LLaVA's ``mlp2x_gelu`` projector, an ``nn.Sequential(Linear, GELU, Linear)``:
  ``model.mm_projector.{0,2}.{weight,bias}`` (in a full LLaVA checkpoint and in the stage-1
  ``mm_projector.bin``), also without the ``model.`` prefix.
* ``cumo_release``: CuMo's MLP-MoE (SHI-Labs/CuMo ``MLPMoE``): ``model.mm_projector.gate.weight``
  and ``model.mm_projector.experts.{j}.{0,2}.{weight,bias}``.

Ours: ``connector.linear_fc1/linear_fc2.{weight,bias}`` (`ConnectorMLP`) or
``connector.router.weight`` + ``connector.experts.{j}.linear_fc1/linear_fc2.*`` (`MoEConnector`).
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping, Optional

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
from cumo_megatron.config.schema import ModelConfig

LAYOUTS = ("llava", "cumo_release")
DEFAULT_SOURCE_PREFIX = "model.mm_projector."
OURS_PREFIX = "connector."
_ANCHOR = "mm_projector."
_EXPERT = re.compile(r"experts\.(\d+)\.")


def locate_connector(keys: Iterable[str]) -> tuple[str, str]:
    """``(layout, prefix)`` of the ``mm_projector`` among ``keys`` (prefix ends in ``mm_projector.``).

    Raises ``ValueError`` naming what was seen for no projector, several, or a projector type
    other than ``mlp2x_gelu`` / ``smoe_mlp``.
    """
    keys = list(keys)
    groups: dict[str, list[str]] = {}
    for key in keys:
        at = key.find(_ANCHOR)
        if at >= 0 and (at == 0 or key[at - 1] == "."):
            prefix = key[: at + len(_ANCHOR)]
            groups.setdefault(prefix, []).append(key[len(prefix):])
    if not groups:
        raise ValueError(
            "no connector found: expected 'model.mm_projector.{0,2}.*' (LLaVA mlp2x_gelu) or "
            "'model.mm_projector.gate.weight' + 'model.mm_projector.experts.{j}.*' (CuMo); the "
            "checkpoint has " + describe_keys(keys)
        )
    if len(groups) > 1:
        raise ValueError(f"more than one mm_projector, at key prefixes {sorted(groups)}; pass one of them")
    prefix, rest = next(iter(groups.items()))
    names = set(rest)
    if "gate.weight" in names or any(_EXPERT.match(n) for n in names):
        return "cumo_release", prefix
    if names >= {"0.weight", "2.weight"}:
        if any(n.split(".")[0] not in ("0", "2") for n in names):
            raise ValueError(
                f"the projector at {prefix!r} has more than two linear layers ({describe_keys(sorted(names))}); "
                "only LLaVA's mlp2x_gelu is supported"
            )
        return "llava", prefix
    raise ValueError(
        f"the projector at {prefix!r} is not LLaVA's mlp2x_gelu nor CuMo's MLP-MoE "
        f"({describe_keys(sorted(names))}); a single linear projector is not supported"
    )


def detect_connector_layout(keys: Iterable[str]) -> str:
    """``"llava"`` or ``"cumo_release"`` (see module doc)."""
    return locate_connector(keys)[0]


def _mlp_rules(dst: str, src: str, in_features: int, hidden: int) -> list[Rule]:
    return [
        identity_rule(dst + "linear_fc1.weight", src + "0.weight", (hidden, in_features)),
        identity_rule(dst + "linear_fc1.bias", src + "0.bias", (hidden,)),
        identity_rule(dst + "linear_fc2.weight", src + "2.weight", (hidden, hidden)),
        identity_rule(dst + "linear_fc2.bias", src + "2.bias", (hidden,)),
    ]


def _rules(model_cfg: ModelConfig, layout: str, source_prefix: str, ours: str) -> list[Rule]:
    in_features, hidden = model_cfg.vision.feature_channels, model_cfg.connector_hidden
    moe = model_cfg.connector.moe
    if layout == "llava":
        if moe is not None:
            raise CheckpointError(
                f"the projector at {source_prefix!r} is dense (LLaVA mlp2x_gelu) but connector.moe is "
                "set. Convert it with connector.moe unset, then upcycle it (copy it into every "
                "expert) as a separate step"
            )
        return _mlp_rules(ours, source_prefix, in_features, hidden)
    if moe is None:
        raise CheckpointError(
            f"the projector at {source_prefix!r} is CuMo's MLP-MoE but connector.moe is unset; set "
            "connector.moe (num_experts as in the checkpoint)"
        )
    rules = [identity_rule(ours + "router.weight", source_prefix + "gate.weight", (moe.num_experts, in_features))]
    for j in range(moe.num_experts):
        rules += _mlp_rules(f"{ours}experts.{j}.", f"{source_prefix}experts.{j}.", in_features, hidden)
    return rules


def connector_to_megatron(
    src: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    layout: Optional[str] = None,
    prefix: str = OURS_PREFIX,
) -> RuleStream:
    """Yield our connector tensors from a LLaVA / CuMo projector (``layout``: default detected).

    Shapes follow ``model_cfg``: input ``vision.feature_channels`` (hidden x S2 scales), output
    ``connector_hidden``. Dense/MoE mismatches, expert counts, missing tensors and unknown tensors
    under the projector's prefix raise `CheckpointError` before anything is yielded; wrong shapes
    raise while streaming.
    """
    keys = list(src.keys())
    found, source_prefix = locate_connector(keys)
    if layout is not None and layout != found:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown connector layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        raise ValueError(f"layout {layout!r} was asked for but the projector at {source_prefix!r} is {found!r}")
    rules = _rules(model_cfg, found, source_prefix, prefix)
    where = f"connector checkpoint (layout {found!r}, key prefix {source_prefix!r})"
    if found == "cumo_release":
        matches = (_EXPERT.match(k[len(source_prefix):]) for k in keys if k.startswith(source_prefix))
        experts = {int(m.group(1)) for m in matches if m}
        if experts != set(range(model_cfg.connector.moe.num_experts)):
            raise CheckpointError(
                f"{where}: has experts {sorted(experts)} but connector.moe.num_experts="
                f"{model_cfg.connector.moe.num_experts}"
            )
    consumed = {key for rule in rules for key in rule.theirs}
    strays = sorted(k for k in keys if k.startswith(source_prefix) and k not in consumed)
    if strays:
        raise CheckpointError(f"{where}: tensors this adapter does not know: {describe_keys(strays)}")
    missing = sorted(consumed.difference(keys))
    if missing:
        raise MissingKeyError(f"{where}: missing tensors {describe_keys(missing)}")
    return stream_to_ours(rules, src, where)


def megatron_to_connector(
    src: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    layout: str = "llava",
    source_prefix: str = DEFAULT_SOURCE_PREFIX,
    prefix: str = OURS_PREFIX,
    passthrough: Optional[Mapping[str, torch.Tensor]] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield our connector in a publisher's layout (``llava`` dense, ``cumo_release`` MoE).

    ``source_prefix``: key prefix of the projector (``"model.mm_projector."`` as in full
    checkpoints; ``"mm_projector."`` for bare projector files). ``passthrough`` tensors follow
    unchanged.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown connector layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "cumo_release" and model_cfg.connector.moe is None:
        raise CheckpointError(
            "the connector is dense; CuMo releases store a dense projector in the 'llava' layout"
        )
    if layout == "llava" and model_cfg.connector.moe is not None:
        raise CheckpointError("the connector is an MLP-MoE, which the 'llava' layout cannot hold; use 'cumo_release'")
    return stream_to_theirs(
        _rules(model_cfg, layout, source_prefix, prefix), src, f"our connector (prefix {prefix!r})", passthrough
    )
