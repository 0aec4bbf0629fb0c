"""TP=2 (with SP), EP=2 and PP=2 give the world-of-one loss and gradients on the full CuMo model.

The world-of-one run happens in this process; the layouts run one after another on the 2 gloo
ranks of one ``torchrun`` launch (`tests.helpers.shared_launch`, shared with the platform checks).
Each loads the same weights (a distributed checkpoint, resharded
by megatron), runs the same micro-batches, and writes its gradients as a distributed checkpoint,
which this process gathers by loading it into the world-of-one layout.
"""

from __future__ import annotations


import pytest
import torch
from megatron.core import dist_checkpointing

import cumo_megatron.platform as platform
from cumo_megatron.config.schema import ParallelConfig
from cumo_megatron.models.cumo import build_model
from cumo_megatron.moe.stats import collect_moe_stats
from cumo_megatron.models.parallelize import wrap_ddp
from cumo_megatron.training.step import forward_backward
from tests.helpers import shared_launch
from tests.models.parallel_workers import equivalence_model_config

SEQ = 16
MICROBATCHES = 2


def _microbatches(cfg) -> list[dict]:
    gen = torch.Generator().manual_seed(1234)
    tokens = cfg.vision.tokens_per_image
    out = []
    for i in range(MICROBATCHES):
        ids = torch.randint(0, cfg.language.vocab_size, (1, SEQ), generator=gen)
        ids[0, 1 + i:1 + i + tokens] = cfg.image_token_id
        loss_mask = torch.ones(1, SEQ)
        loss_mask[0, : 1 + i + tokens] = 0.0  # loss on the text after the image, as in training
        out.append(dict(
            input_ids=ids,
            images=torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen),
            labels=torch.randint(0, cfg.language.vocab_size, (1, SEQ), generator=gen),
            loss_mask=loss_mask,
        ))
    return out


LAYOUTS = {"tp2-sp": dict(tp=2, pp=1, ep=1), "ep2": dict(tp=1, pp=1, ep=2), "pp2": dict(tp=1, pp=2, ep=1)}
PART = "models.parallel_equivalence"


def _prepare(tmp) -> tuple[str, dict, dict]:
    """World-of-one weights, batches, loss and gradients; the 2-rank call that runs every layout."""
    platform.initialize(platform.ParallelSizes(), seed=7)
    cfg = equivalence_model_config()
    model = build_model(cfg, ParallelConfig())
    weights = tmp / "weights"
    weights.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(weights))
    batches = _microbatches(cfg)
    torch.save(batches, tmp / "batches.pt")
    ddp = wrap_ddp(model)
    ddp.zero_grad_buffer()
    loss = forward_backward(ddp, batches, MICROBATCHES, seq_length=SEQ, micro_batch_size=1)
    expert_load = collect_moe_stats(model, MICROBATCHES)["layers"]
    grads = {name: p.main_grad.clone() for name, p in model.named_parameters()}
    out_dirs = [str(tmp / f"grads-{name}") for name in LAYOUTS]
    args = dict(layouts=list(LAYOUTS.values()), weights=str(weights), batches=str(tmp / "batches.pt"),
                out_dirs=out_dirs, seq_length=SEQ)
    reference = dict(cfg=cfg, loss=loss, grads=grads, expert_load=expert_load, out_dirs=dict(zip(LAYOUTS, out_dirs)))
    return "tests.models.parallel_workers:loss_and_grads_per_layout", args, reference


shared_launch.register(PART, _prepare)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[dict, list]:
    """The world-of-one reference, and each rank's results per layout (from the shared launch)."""
    return shared_launch.results(PART, tmp_path_factory)


def _gathered_grads(reference, grads_dir: str) -> dict[str, torch.Tensor]:
    platform.initialize(platform.ParallelSizes(), seed=7)
    template = build_model(reference["cfg"], ParallelConfig())
    state = dist_checkpointing.load(template.sharded_state_dict(), grads_dir)
    template.load_state_dict(state)
    return {name: p.detach().clone() for name, p in template.named_parameters()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_world_of_one(launched, layout):
    reference, ranks = launched
    results = [rank[list(LAYOUTS).index(layout)] for rank in ranks]
    grads_dir = reference["out_dirs"][layout]
    assert all(r["replicas_identical"] for r in results), "TP replicas of vision/connector differ"
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses, "no rank reported a loss"
    for loss in losses:
        assert loss == pytest.approx(reference["loss"], rel=1e-5, abs=1e-6)
    gathered = _gathered_grads(reference, grads_dir)
    assert gathered.keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(gathered[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # The comparison proves something only if gradients flow almost everywhere (an expert that no
    # token of this small batch chose legitimately has none).
    flowing = [n for n, g in reference["grads"].items() if float(g.abs().sum()) > 0]
    assert len(flowing) >= 0.9 * len(reference["grads"]), sorted(set(reference["grads"]) - set(flowing))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_load_matches_world_of_one(launched, layout):
    """Every MoE layer's token counts per expert, summed over data-parallel ranks, are the
    world-of-one counts: TP ranks that split the sequence (SP) report the whole layer's load, each
    pipeline stage its own layers."""
    reference, ranks = launched
    results = [rank[list(LAYOUTS).index(layout)] for rank in ranks]
    want = reference["expert_load"]
    assert any(key.startswith("language") for key in want) and any(key.startswith("vision") for key in want)
    got: dict[str, list[int]] = {}
    for dp_rank in sorted({r["dp_rank"] for r in results}):
        replicas = [r["expert_load"] for r in results if r["dp_rank"] == dp_rank]
        for other in replicas[1:]:  # TP ranks of one DP rank (or stages, with disjoint layers)
            for key in set(other) & set(replicas[0]):
                assert other[key] == replicas[0][key], (layout, key)
        merged = {key: value for replica in replicas for key, value in replica.items()}
        for key, counts in merged.items():
            got[key] = [a + b for a, b in zip(got.get(key, [0] * len(counts)), counts)]
    assert got == want, layout
