"""Rank-side halves of `test_convert.py` (run under `tests.helpers.distributed.run_distributed`)."""

from __future__ import annotations

import cumo_megatron.platform as platform
from cumo_megatron.checkpoint import ours
from cumo_megatron.config.schema import ParallelConfig
from cumo_megatron.models.cumo import build_model


def reshard(checkpoint: str, layouts: list[dict], out_prefix: str) -> list[dict]:
    """Load our checkpoint at each layout and save it again from that layout.

    For every layout ``{"tp", "pp", "ep"[, "etp"]}``: bring up the groups, build the model for this rank's
    stage, `ours.load_model_checkpoint` (megatron reshards the global tensors), record what this
    rank holds, and `ours.save_model_checkpoint` to ``{out_prefix}-tp{tp}pp{pp}ep{ep}``.
    Returns, per layout, the number of parameters this rank held (a shard, so less than the whole).
    """
    model_cfg = ours.read_model_config(checkpoint)
    held = []
    for layout in layouts:
        sizes = dict(tp=layout["tp"], pp=layout["pp"], ep=layout["ep"], etp=layout.get("etp"))
        platform.initialize(platform.ParallelSizes(**sizes), seed=3)
        parallel = ParallelConfig(**sizes)
        model = build_model(model_cfg, parallel)
        ours.load_model_checkpoint(model, checkpoint)
        out = f"{out_prefix}-tp{layout['tp']}pp{layout['pp']}ep{layout['ep']}"
        ours.save_model_checkpoint(model, model_cfg, out)
        held.append({"layout": layout, "numel": sum(p.numel() for p in model.parameters())})
    return held
